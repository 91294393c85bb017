"""`medfl check`: tables per site, one line per problem, exit status, no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

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


def _cells(out: str, title: str, label: str) -> list[str]:
    """The cells of the row `label` in the first table printed after a line containing `title`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    for line in lines[start:]:
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row '{label}' after '{title}'")


def _rewrite_images(config: Path, gain: float) -> None:
    """Replace a site's images with smooth skin-like JPEGs, `gain` times brighter (same seeds at every site)."""
    for i, path in enumerate(sorted(load_site_config(config).data_root.rglob("*.jpg"))):
        rng = np.random.default_rng(i)
        pixels = rng.normal(rng.uniform(90, 130), 12, (24, 24, 3)) * (1.0, 0.8, 0.7)
        Image.fromarray(np.clip(pixels * gain, 0, 255).astype(np.uint8)).save(path, quality=95)


def test_several_sites_print_their_distance_from_the_pooled_sites(capsys, ham10000_site):
    configs = [ham10000_site(name=name) for name in ("derm_a", "derm_b", "derm_c")]
    for config, gain in zip(configs, (1.0, 1.0, 1.3), strict=True):
        _rewrite_images(config, gain)
    status, out = _check(capsys, *map(str, configs))
    words = " ".join(out.split())  # a table's title wraps at the table's width
    assert status == 0 and "distance from the pooled 3 sites" in words and "in within-site SDs" in words
    same, other, bright = (_cells(out, "site shift", site) for site in ("derm_a", "derm_b", "derm_c"))
    assert same == other and float(bright[-1]) > 2  # the pooled mean lies a third of the way to the bright site
    assert float(bright[-1]) == pytest.approx(2 * float(same[-1]), rel=0.02)
    assert "root mean square" in out and "pooled within-site SD" in out
    assert float(_cells(out, "site means", "derm_c")[0]) > 1.2 * float(_cells(out, "site means", "derm_a")[0])


def test_identical_sites_are_at_zero_and_a_lone_site_shows_its_own_statistics(capsys, ham10000_site):
    twins = [ham10000_site(name=name) for name in ("derm_a", "derm_b")]
    _, out = _check(capsys, *map(str, twins))
    assert set(_cells(out, "site shift", "derm_b")) == {"0.00"}
    _, out = _check(capsys, str(twins[0]))
    assert "site shift," not in out and "site 'derm_a': colour and content per image (42 samples)" in out
    assert [_cells(out, "colour and content per image", row)[-1] != "" for row in ("mean", "SD", "min", "max")] == [True] * 4
    assert _cells(out, "acquisition", "mean") == ["24.0", "24.0"]


def test_normalisation_removes_the_raw_scale_that_check_shows(capsys, prostate_site):
    plain, scaled = prostate_site(name="prost_a"), prostate_site(name="prost_b")
    for path in load_site_config(scaled).data_root.glob("*.nii.gz"):
        if "segmentation" not in path.name.lower():
            image = sitk.ReadImage(str(path))
            brighter = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 1.3)
            brighter.CopyInformation(image)
            sitk.WriteImage(brighter, str(path))
    status, out = _check(capsys, str(plain), str(scaled), "--input-size", "16")
    assert status == 0 and set(_cells(out, "site shift", "prost_b")) == {"0.00"}
    raw = [float(_cells(out, "acquisition", site)[0]) for site in ("prost_a", "prost_b")]
    assert raw[1] == pytest.approx(1.3 * raw[0], rel=0.01)
    assert _cells(out, "acquisition", "prost_a")[1:] == ["0.60", "3.00", "14.4", "24.0", "6.00"]
    noise_spread = float(_cells(out, "site means", "within-site SD")[2])  # small values keep their digits
    assert 0 < noise_spread < 0.1


def test_the_header_names_the_classes_of_each_task(capsys, ham10000_site, prostate_site):
    _, out = _check(capsys, str(prostate_site()), "--input-size", "8")
    header = out.splitlines()[0]
    assert header.startswith("classes: background (mask value 0), prostate (any value > 0);")
    assert "label-map" not in header and "training slices: all" in header
    _, out = _check(capsys, str(ham10000_site()), "--input-size", "8")
    assert out.splitlines()[0].startswith("classes: each site's label-map targets;") and "slices" not in out.splitlines()[0]
    _, out = _check(capsys, str(ham10000_site()), str(prostate_site()), "--input-size", "8", "--classes", "nv,mel")
    header = out.splitlines()[0]
    assert "classification classes: nv, mel;" in header and "segmentation classes: background (mask value 0), prostate" in header


def test_errors_and_warnings_go_to_stderr_and_the_tables_to_stdout(capsys, ham10000_site, prostate_site,
                                                                   write_config):
    bad_key = write_config({"name": "typo", "task": "segmentation", "data_root": ".", "layout": "nifti",
                            "mask_sufix": "_seg"})
    warned = prostate_site(cases=("Case01", "Case02"))
    assert main(["check", str(bad_key), str(warned), "--input-size", "8"]) == 1
    captured = capsys.readouterr()
    problems = [line for line in captured.err.splitlines() if line.startswith(("error: ", "warning: "))]
    assert any("mask_sufix" in line for line in problems) and any("the test split is empty" in line for line in problems)
    assert not any(line.startswith(("error: ", "warning: ")) for line in captured.out.splitlines())
    assert "site 'prost_a' (segmentation)" in captured.out and "1 of 2 site(s) ready" in captured.out


def test_long_site_names_are_never_cut_when_the_output_is_redirected(capsys, monkeypatch, ham10000_site):
    monkeypatch.delenv("COLUMNS", raising=False)
    names = ("ham_vidir_modern_vienna", "ham_vidir_molemax_vienna", "ham_rosendahl_queensland")
    status, out = _check(capsys, *(str(ham10000_site(name=name)) for name in names))
    assert status == 0 and "…" not in out
    for name in names:
        assert _cells(out, "site shift", name) and _cells(out, "site means", name)
        assert _cells(out, "acquisition (shown, not compared)", name)


def test_check_and_run_refuse_an_all_zero_image_volume(capsys, prostate_site, tmp_path):
    import yaml

    from medfl.data import load_site
    from medfl.errors import DataError
    from medfl.tasks import task_for

    path = prostate_site()
    site = load_site_config(path)
    image = sitk.ReadImage(str(site.data_root / "Case05.nii.gz"))
    blank = sitk.Image(image.GetSize(), image.GetPixelID())
    blank.CopyInformation(image)
    sitk.WriteImage(blank, str(site.data_root / "Case05.nii.gz"))
    status, out = _check(capsys, str(path))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert status == 1 and len(errors) == 1
    assert errors[0].startswith("error: site 'prost_a': ") and "Case05.nii.gz: image holds only the value(s) 0" in errors[0]
    with pytest.raises(DataError, match="Case05.nii.gz: image holds only the value"):
        load_site(site, task=task_for(site.task))  # what `run` does at every site before anything is written
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"task": "segmentation", "sites": [str(path)], "rounds": 1, "device": "cpu",
                                          "model": {"name": "unet", "width": 0.25},
                                          "data": {"input_size": 32, "num_workers": 0}}), encoding="utf-8")
    assert main(["run", str(experiment), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "site 'prost_a'" in err and "Case05.nii.gz: image holds only the value(s) 0" in err
    assert not (tmp_path / "run").exists()


def test_two_sites_get_the_mean_shift_and_advice_and_one_site_is_told_why_not(capsys, ham10000_site, monkeypatch):
    import medfl.data.regimes as regimes
    from medfl.data.shift import DERMOSCOPY

    configs = [ham10000_site(name=name) for name in ("derm_a", "derm_b")]
    for config, gain in zip(configs, (1.0, 1.3), strict=True):
        _rewrite_images(config, gain)
    _, out = _check(capsys, *map(str, configs))
    lines = out.splitlines()
    mean = next(i for i, line in enumerate(lines) if line.startswith("mean site shift: "))
    assert float(lines[mean].split()[3]) == pytest.approx(float(_cells(out, "site shift", "derm_a")[-1]), abs=0.01)
    shipped = regimes.shipped_figures()  # the sweep's figures once they ship, else the line saying none do
    assert lines[mean + 1].startswith("This federation's mean site shift (" if shipped.measured
                                      else "no advice on which method fits: this medfl ships no measurement")
    assert lines.index(next(line for line in lines if "site means" in line)) > mean + 1  # after the shift table

    scores = {"prr": (0.70, 0.72), "fedavg": (0.72, 0.73)}
    figures = regimes.Figures(measured=True, commit="0" * 40, kind=DERMOSCOPY.title, statistics=DERMOSCOPY.compared,
                              labels={"fedavg": "FedAvg with fine-tuning"},
                              regimes=(regimes.Regime(0.5, 0.5, (0, 1), scores),
                                       regimes.Regime(1.5, 9.0, (0, 1), {"prr": (0.66, 0.67), "fedavg": (0.61, 0.61)})))
    monkeypatch.setattr(regimes, "shipped_figures", lambda: figures)
    _, out = _check(capsys, *map(str, configs))
    words = " ".join(out.split())
    assert "At this shift, on synthetic federations, FedAvg with fine-tuning led prr by 0.015 ± 0.007" in words
    assert "nearest the sweep's strength 0.5" in words
    _, out = _check(capsys, str(configs[0]))
    assert "no advice on which method fits: one site has no site shift to measure" in " ".join(out.split())
