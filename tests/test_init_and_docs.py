"""`medfl init` (commented site and experiment configs per task, accepted once data_root is filled in) and
`medfl docs` (the documentation the package carries: listed, printed, written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfl.cli import main
from medfl.commands.docs import docs_folder
from medfl.config import load_site_config
from medfl.experiment import load_experiment_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
PLACEHOLDER = "FILL_IN_YOUR_DATA_FOLDER"


def _fill_in(site: Path, data_root: Path) -> None:
    text = site.read_text(encoding="utf-8")
    assert text.count(PLACEHOLDER) == 1
    site.write_text(text.replace(PLACEHOLDER, str(data_root)), encoding="utf-8")


def test_init_writes_commented_configs_that_are_refused_until_data_root_is_filled_in(tmp_path, capsys):
    assert main(["init", str(tmp_path / "start")]) == 0
    written = sorted(p.relative_to(tmp_path / "start").as_posix() for p in (tmp_path / "start").rglob("*.yaml"))
    assert written == ["dermoscopy/experiment.yaml", "dermoscopy/site.yaml", "prostate/experiment.yaml",
                       "prostate/site.yaml"]
    for path in (tmp_path / "start").rglob("*.yaml"):
        assert path.read_text(encoding="utf-8").startswith("# ")  # commented for the person filling it in
    out = capsys.readouterr().out
    assert "fill in data_root in" in out
    assert main(["check", str(tmp_path / "start" / "dermoscopy" / "site.yaml")]) == 1
    assert f"{PLACEHOLDER}: data_root folder not found" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "only"), "--task", "segmentation"]) == 0
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["prostate"]


def test_init_never_overwrites(tmp_path, capsys):
    assert main(["init", str(tmp_path), "--task", "classification"]) == 0
    site = tmp_path / "dermoscopy" / "site.yaml"
    site.write_text("name: mine\n", encoding="utf-8")
    assert main(["init", str(tmp_path)]) == 1
    assert "never overwrites" in capsys.readouterr().err
    assert site.read_text(encoding="utf-8") == "name: mine\n" and not (tmp_path / "prostate").exists()


@pytest.mark.slow
def test_the_templates_check_and_run_on_synthetic_data_once_data_root_is_filled_in(tiny_federation, tmp_path,
                                                                                   capsys, one_thread):
    start = tmp_path / "start"
    assert main(["init", str(start)]) == 0
    _fill_in(start / "dermoscopy" / "site.yaml", tiny_federation / "dermoscopy" / "derm_a")
    _fill_in(start / "prostate" / "site.yaml", tiny_federation / "prostate" / "prost_a")
    capsys.readouterr()
    assert main(["check", str(start / "dermoscopy" / "site.yaml"), str(start / "prostate" / "site.yaml")]) == 0
    assert "2 of 2 site(s) ready" in capsys.readouterr().out
    for task in ("dermoscopy", "prostate"):  # the experiments validate with their sites as they are
        config = load_experiment_config(start / task / "experiment.yaml")
        assert [site.source_path for site in config.load_sites()] == [(start / task / "site.yaml").resolve()]
    experiment = start / "dermoscopy" / "experiment.yaml"
    assert main(["run", str(experiment), "--rounds", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    assert load_site_config(start / "dermoscopy" / "site.yaml").name == "my_hospital"


def test_docs_lists_prints_and_writes_the_pages(tmp_path, capsys):
    assert docs_folder() == DOCS  # in a checkout: the repository's docs/ (the wheel carries the same files)
    pages = sorted(path.stem for path in DOCS.glob("*.md"))
    assert main(["docs"]) == 0
    listed = capsys.readouterr().out
    assert all(any(line.startswith(f"{page} ") for line in listed.splitlines()) for page in pages)
    assert "Installing medfl" in listed
    assert main(["docs", "install"]) == 0
    assert capsys.readouterr().out == (DOCS / "install.md").read_text(encoding="utf-8")
    assert main(["docs", "site-config.md", "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["site-config.md"]
    assert main(["docs", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.stem for p in (tmp_path / "all").iterdir()) == pages
    assert all((tmp_path / "all" / p.name).read_bytes() == p.read_bytes() for p in DOCS.glob("*.md"))
    capsys.readouterr()
    assert main(["docs", "--out", str(tmp_path / "all")]) == 1 and "never overwrites" in capsys.readouterr().err
    assert main(["docs", "instal"]) == 1 and "no page 'instal'; pages: README, " in capsys.readouterr().err


def test_every_template_is_read_by_the_config_models(tmp_path, capsys) -> None:
    """Fast: the templates as written, data_root filled in, pass the models (an unknown key would not)."""
    assert main(["init", str(tmp_path)]) == 0
    for task in ("dermoscopy", "prostate"):
        _fill_in(tmp_path / task / "site.yaml", tmp_path)
        assert load_site_config(tmp_path / task / "site.yaml").data_root == tmp_path
        assert load_experiment_config(tmp_path / task / "experiment.yaml").sites == [(tmp_path / task / "site.yaml")]
