"""`medfl check`: tables per site, one line per problem, exit status, no traceback."""

from __future__ import annotations

import pytest

from medfl.cli import main
from medfl.config import load_site_config


def _check(capsys, *args: str) -> tuple[int, str]:
    status = main(["check", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_good_sites_print_counts_and_exit_zero(capsys, ham10000_site, prostate_site):
    status, out = _check(capsys, str(ham10000_site()), str(prostate_site()), "--input-size", "16")
    assert status == 0
    assert "site 'derm_a' (classification)" in out and "site 'prost_a' (segmentation)" in out
    assert "akiec 2" in out and "slices with prostate" in out
    assert "2 of 2 site(s) ready" in out and "Traceback" not in out


def test_options_choose_classes_split_and_seed(capsys, ham10000_site):
    status, out = _check(capsys, str(ham10000_site()), "--classes", "nv,mel", "--split", "0.6,0.2,0.2",
                         "--seed", "4")
    header = next(line for line in out.splitlines() if "split" in line and "nv" in line)
    assert status == 0 and "mel" in header and "bkl" not in header and "bkl 14" in out


def test_every_site_is_checked_and_each_problem_is_one_line(capsys, ham10000_site, prostate_site, write_config):
    bad_key = write_config({"name": "typo", "task": "segmentation", "data_root": ".", "layout": "nifti",
                            "mask_sufix": "_seg"})
    derm = ham10000_site()
    next(load_site_config(derm).data_root.rglob("ISIC_nv002a.jpg")).unlink()
    status, out = _check(capsys, str(bad_key), str(derm), str(prostate_site()))
    assert status == 1
    lines = out.splitlines()
    assert any("unknown key 'mask_sufix' (did you mean 'mask_suffix'?)" in line and str(bad_key) in line
               for line in lines)
    assert any(line.startswith("error: site 'derm_a'") and "ISIC_nv002a" in line for line in lines)
    assert "site 'prost_a' (segmentation)" in out
    assert "1 of 3 site(s) ready, 2 with problems" in out and "Traceback" not in out


def test_warnings_alone_keep_exit_status_zero(capsys, prostate_site):
    status, out = _check(capsys, str(prostate_site(cases=("Case01", "Case02"))), "--input-size", "8")
    assert status == 0 and "warning: site 'prost_a'" in out and "the test split is empty" in out


def test_bad_options_are_reported_without_traceback(capsys, ham10000_site):
    status, out = _check(capsys, str(ham10000_site()), "--split", "0.5,0.1,0.1")
    assert status == 1 and "fractions must sum to 1" in out
    with pytest.raises(SystemExit):
        main(["check", str(ham10000_site()), "--split", "half"])


def test_strict_turns_warnings_into_failure(capsys, prostate_site):
    status, out = _check(capsys, str(prostate_site(cases=("Case01", "Case02"))), "--input-size", "8", "--strict")
    assert status == 1 and "0 of 1 site(s) ready, 1 with problems" in out
