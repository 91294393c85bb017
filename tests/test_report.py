"""medfl report: run folders and their grouping, tables, figures, TensorBoard scalars, and the report of
real tiny runs (confusion matrices and segmentation examples rescored from the selected-round models)."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run

from medfl import tensorboard
from medfl.checkpoints import atomic_write_csv as write_csv
from medfl.cli import main
from medfl.errors import ConfigError, MedflError
from medfl.report.plots import curve, retrogress_by_round
from medfl.report.predictions import (
    SplitCache,
    choose_examples,
    confusion_matrices,
    load_selected_model,
    predict_examples,
)
from medfl.report.runs import RunGroup, group_runs, load_run
from medfl.report.tables import format_values, result_columns, results_table
from medfl.report.writer import default_out, write_report
from medfl.runfolder import METRIC_COLUMNS, config_digest
from medfl.tasks import task_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["nv", "bkl", "mel"]


# ----------------------------------------------------------------------------- hand-made run folders
def fake_run(root, method="prr", seed=0, f1=(0.5, 0.7), task="classification", **config):
    """A run folder with the files `medfl run` writes: two sites, 2 rounds of 2 epochs, test macro-F1 ``f1``."""
    folder = root / f"{method}-seed{seed}-{len(list(root.glob('*')))}"
    folder.mkdir(parents=True)
    sites = ["a", "b"]
    metric = "macro_f1" if task == "classification" else "dice"
    resolved = {"name": "fake", "task": task, "method": method, "seed": seed, "rounds": 2, "local_epochs": 2,
                "data": {"classes": CLASSES, "input_size": 32}, "optimizer": {"lr": 0.01},
                "output_dir": str(root / f"out{seed}"), "device": "auto", "runtime": {"threads": seed + 1}}
    resolved.update(config)
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    two = method in ("prr", "fml")
    models = ["P", "D"] if two else ["M"]
    rows, det, retro = [], [], []
    for site_index, site in enumerate(sites):
        for round_ in range(2):
            for epoch in range(3):
                for model in models:
                    value = 0.1 * (round_ * 2 + epoch) + 0.01 * site_index
                    rows.append({"round": round_, "epoch": epoch, "site": site, "model": model, "split": "val",
                                 "metric": metric, "value": value})
                if epoch:
                    det.append({"round": round_, "epoch": epoch, "site": site,
                                "state": "recover" if epoch == 1 else "exchange" if two else "",
                                "phi_P": 0.5, "loss_P": 1.0 / (1 + round_)})
            rows.append({"round": round_, "epoch": 2, "site": site, "model": models[0], "split": "test",
                         "metric": metric, "value": f1[site_index]})
        retro.append({"round": 1, "site": site, "model": models[-1], "before": 0.3, "after": 0.1,
                      "after_first_epoch": 0.2, "retrogress": 0.2, "recovery": 0.1})
    write_csv(folder / "metrics.csv", rows, METRIC_COLUMNS)
    write_csv(folder / "det_states.csv", det)
    write_csv(folder / "retrogress.csv", retro)
    site_entries = {
        site: {"selected_round": 1, f"val_{metric}": 0.4, "test": {metric: f1[i], "auc": math.nan},
               "test_last_round": {metric: f1[i]}, "retrogress": 0.2, "recovery": 0.1, "curve_dips": 0.0}
        for i, site in enumerate(sites)
    }
    mean = {"test": {metric: float(np.mean(f1)), "auc": None}, "test_last_round": {metric: float(np.mean(f1))},
            "retrogress": 0.2, "recovery": 0.1, "curve_dips": 0.0}
    summary = {"experiment": "fake", "method": method, "task": task, "metric": metric, "completed_rounds": 2,
               "rounds": 2, "finished": True, "sites": site_entries, "mean": mean}
    (folder / "summary.json").write_text(json.dumps(summary))
    record = {"schema_version": 1, "medfl_version": "0.1.0", "experiment": "fake", "task": task, "method": method,
              "config_sha256": config_digest(resolved), "rounds": 2, "completed_rounds": 2}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def test_load_run_reads_a_run_folder_and_refuses_other_folders(tmp_path):
    run = load_run(fake_run(tmp_path))
    assert (run.method, run.seed, run.task, run.metric, run.sites) == ("prr", 0, "classification", "macro_f1",
                                                                        ["a", "b"])
    assert (run.used_model, run.receiving_model, run.local_epochs) == ("P", "D", 2)
    assert run.metrics[0]["round"] == 0 and isinstance(run.metrics[0]["value"], float)
    with pytest.raises(MedflError, match="no such run folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedflError, match="not a medfl run folder"):
        load_run(tmp_path / "empty")


def test_load_run_refuses_binary_or_foreign_run_files_in_one_line(tmp_path):
    folder = fake_run(tmp_path)
    (folder / "config.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MedflError, match="unreadable run config"):
        load_run(folder)
    folder = fake_run(tmp_path, "fedavg", 1)
    (folder / "summary.json").write_text("[1, 2]")
    with pytest.raises(MedflError, match="not a medfl run summary"):
        load_run(folder)


def test_runs_differing_only_by_seed_form_one_group(tmp_path):
    runs = [load_run(fake_run(tmp_path, "prr", 1)), load_run(fake_run(tmp_path, "fedavg", 0)),
            load_run(fake_run(tmp_path, "prr", 0))]
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["prr", "fedavg"]
    assert groups[0].seeds == [0, 1]  # output_dir, device and threads differ too: they cannot change results


def test_groups_of_one_method_are_labelled_by_the_setting_that_differs(tmp_path):
    runs = [load_run(fake_run(tmp_path, "prr", 0)), load_run(fake_run(tmp_path, "prr", 0, optimizer={"lr": 0.1}))]
    assert [g.label for g in group_runs(runs)] == ["prr (optimizer.lr=0.01)", "prr (optimizer.lr=0.1)"]


def test_grouping_refuses_mixed_tasks_and_a_folder_given_twice(tmp_path):
    derm = load_run(fake_run(tmp_path))
    prostate = load_run(fake_run(tmp_path, task="segmentation"))
    with pytest.raises(ConfigError, match="different tasks"):
        group_runs([derm, prostate])
    with pytest.raises(ConfigError, match="listed twice"):
        group_runs([derm, load_run(derm.path)])


def test_format_values_shows_mean_and_sample_std_and_skips_missing_values():
    assert format_values([0.5]) == "0.500"
    assert format_values([0.5, 0.7, math.nan]) == f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f}"
    assert format_values([math.nan]) == "–"
    assert format_values([12.345, 13.0], digits=2) == "12.67 ± 0.46"


def test_results_table_aggregates_seeds_per_site_and_mean(tmp_path):
    runs = [load_run(fake_run(tmp_path, "prr", 0, f1=(0.5, 0.7))), load_run(fake_run(tmp_path, "prr", 1, f1=(0.7, 0.9))),
            load_run(fake_run(tmp_path, "fedavg", 0, f1=(0.2, 0.4)))]
    groups = group_runs(runs)
    columns = result_columns(task_for("classification"), CLASSES, "macro_f1")
    mean_table = results_table(groups, columns).splitlines()
    assert mean_table[0].startswith("| method | seeds | macro-F1 | F1 nv | F1 bkl | F1 mel | AUC |")
    assert mean_table[2].startswith(f"| prr | 2 | 0.700 ± {np.std([0.6, 0.8], ddof=1):.3f} |")
    assert mean_table[3].startswith("| fedavg | 1 | 0.300 |")
    assert "| – |" in mean_table[3]  # AUC is missing in every fake run (NaN and null)
    site_b = results_table(groups, columns, "b").splitlines()
    assert site_b[2].startswith(f"| prr | 2 | 0.800 ± {np.std([0.7, 0.9], ddof=1):.3f} |")


def test_result_columns_per_task():
    headers = [c.header for c in result_columns(task_for("classification"), CLASSES, "macro_f1")]
    assert headers[:4] == ["macro-F1", "F1 nv", "F1 bkl", "F1 mel"]
    assert {"AUC", "accuracy", "balanced acc.", "retrogress", "recovery", "curve dips"} <= set(headers)
    headers = [c.header for c in result_columns(task_for("segmentation"), [], "dice")]
    assert headers[:2] == ["Dice", "HD95 (mm)"] and "F1 nv" not in headers


def test_curve_puts_communication_drops_at_the_round_boundary(tmp_path):
    runs = [load_run(fake_run(tmp_path, seed=0)), load_run(fake_run(tmp_path, seed=1))]
    x, y = curve(runs, "a", "P", "macro_f1")
    assert x.tolist() == [0.0, 0.5, 1.0, 1.0, 1.5, 2.0]  # round 0 epoch 2 and round 1 epoch 0 share x = 1
    assert y[2] == pytest.approx(0.2) and y[3] == pytest.approx(0.2)


@pytest.mark.parametrize("rounds", [2, 30])
def test_retrogress_plot_ticks_are_whole_rounds_even_with_one_communication(tmp_path, rounds):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    folder = fake_run(tmp_path)
    if rounds > 2:  # a long run: a communication before every round but the first
        rows = [{"round": r, "site": s, "model": "D", "before": 0.3, "after": 0.1, "after_first_epoch": 0.2,
                 "retrogress": 0.2, "recovery": 0.1} for r in range(1, rounds) for s in ("a", "b")]
        write_csv(folder / "retrogress.csv", rows)
    figure = retrogress_by_round(group_runs([load_run(folder)]))
    FigureCanvasAgg(figure).draw()
    for ax in figure.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert low <= 1 and high >= rounds - 1 and len(ticks) <= 12


def test_report_of_hand_made_runs_without_predictions(tmp_path):
    folders = [fake_run(tmp_path / "runs", "prr", 0), fake_run(tmp_path / "runs", "prr", 1),
               fake_run(tmp_path / "runs", "fedavg", 0)]
    report = write_report(folders, tmp_path / "report", predictions=False, task=task_for("classification"))
    text = report.path.read_text()
    assert "## Test results, mean over sites" in text and "### a" in text and "### b" in text
    assert "Confusion matrices" not in text
    assert {p.name for p in report.figures} == {"validation_curves.png", "retrogress.png", "det_states.png"}
    for figure in report.figures:
        assert figure.read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({figure.name})" in text
    again = write_report(folders, tmp_path / "report", predictions=False, task=task_for("classification"))  # a report is derived: replaced
    assert again.path.read_text() == text
    assert default_out([folders[0]]) == folders[0] / "report"
    assert str(default_out(folders)) == "report"


def test_report_refuses_no_runs_and_negative_examples(tmp_path):
    with pytest.raises(Exception, match="no run folder"):
        write_report([], tmp_path, task=task_for("classification"))
    with pytest.raises(ConfigError, match="negative"):
        write_report([fake_run(tmp_path)], tmp_path / "r", examples=-1, task=task_for("classification"))


# ----------------------------------------------------------------------------- TensorBoard
def test_round_scalars_take_one_round_with_epoch_steps(tmp_path):
    run = load_run(fake_run(tmp_path))
    timing = [{"round": 0, "train_s": 1.0}, {"round": 1, "train_s": 2.0}]
    scalars = tensorboard.round_scalars(1, 2, run.metrics, run.det, run.retrogress, timing)
    by_tag = {(tag, step): value for tag, value, step in scalars}
    assert by_tag[("val/macro_f1/a/P", 3)] == pytest.approx(0.3)  # round 1, epoch 1: step 1 * 2 + 1
    assert by_tag[("val_after_communication/macro_f1/a/D", 1)] == pytest.approx(0.2)
    assert by_tag[("test/macro_f1/b/P", 1)] == pytest.approx(0.7)
    assert by_tag[("det_state/a", 4)] == 1  # exchange
    assert by_tag[("loss/a/P", 3)] == pytest.approx(0.5)
    assert by_tag[("retrogress/b", 1)] == pytest.approx(0.2)
    assert by_tag[("timing/train_s", 1)] == 2.0
    assert all(step >= 1 for _, _, step in scalars)  # nothing of round 0
    assert not any(math.isnan(value) for _, value, _ in scalars)


def test_without_tensorboard_scalars_are_skipped_with_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    tensorboard.summary_writer_class.cache_clear()
    try:
        run = load_run(fake_run(tmp_path))
        for round_ in (0, 1):
            assert tensorboard.write_round_scalars(tmp_path / "run" / "tensorboard", round_, 2, run.metrics, run.det, []) is None
    finally:
        tensorboard.summary_writer_class.cache_clear()
    notices = [line for line in capsys.readouterr().err.splitlines() if "tensorboard" in line]
    assert len(notices) == 1 and "skipped" in notices[0]
    assert not (tmp_path / "run").exists()


def read_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_round_scalars_are_readable_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run = load_run(fake_run(tmp_path))
    for round_ in (0, 1):
        folder = tensorboard.write_round_scalars(tmp_path / "run" / "tensorboard", round_, 2, run.metrics, run.det, run.retrogress)
    assert folder == tmp_path / "run" / "tensorboard"
    scalars = read_scalars(folder)
    assert [step for step, _ in scalars["val/macro_f1/a/P"]] == [1, 2, 3, 4]
    assert scalars["retrogress/a"] == [(1, pytest.approx(0.2))]


# ----------------------------------------------------------------------------- real tiny runs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Real runs on a tiny synthetic federation: dermoscopy prr (seeds 0, 1) and fedavg, prostate prr (the tiny
    experiments; conftest.tiny_run, whose runs other modules share: tests here copy a run before changing it)."""
    tasks = {"derm": "classification", "prostate": "segmentation"}
    return {(data, method, seed): tiny_run(tmp_path_factory, tasks[data], method=method, seed=seed)[0]
            for data, method, seed in [("derm", "prr", 0), ("derm", "prr", 1), ("derm", "fedavg", 0),
                                       ("prostate", "prr", 0)]}


@pytest.mark.slow
def test_coordinator_writes_tensorboard_scalars_matching_metrics_csv(tiny_runs):
    pytest.importorskip("tensorboard")
    folder = tiny_runs[("derm", "prr", 0)]
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per round
    scalars = read_scalars(folder / "tensorboard")
    run = load_run(folder)
    expected = [(row["round"] * 1 + row["epoch"], row["value"]) for row in run.metrics
                if (row["site"], row["model"], row["split"], row["metric"]) == ("derm_a", "P", "val", "macro_f1")
                and row["epoch"] > 0]
    assert scalars["val/macro_f1/derm_a/P"] == [(step, pytest.approx(value)) for step, value in expected]
    assert {"det_state/derm_a", "retrogress/derm_b", "test/accuracy/derm_b/P", "timing/round_s"} <= set(scalars)


@pytest.mark.slow
def test_confusion_matrices_agree_with_the_runs_test_metrics(tiny_runs):
    splits = SplitCache(task_for("classification"))
    for key in [("derm", "prr", 0), ("derm", "prr", 1), ("derm", "fedavg", 0)]:
        run = load_run(tiny_runs[key])
        matrices = confusion_matrices(RunGroup(run.method, [run]), splits, torch.device("cpu"))
        records = splits.records(run)
        for site, matrix in matrices.items():
            assert matrix.shape == (3, 3)
            counts = np.bincount([r["label"] for r in records[site]], minlength=3)
            assert matrix.sum(axis=1).tolist() == counts.tolist()
            accuracy = np.trace(matrix) / matrix.sum()
            assert accuracy == pytest.approx(run.summary["sites"][site]["test"]["accuracy"])


@pytest.mark.slow
def test_report_command_compares_methods_and_seeds(tiny_runs, tmp_path):
    folders = [str(tiny_runs[k]) for k in [("derm", "prr", 0), ("derm", "fedavg", 0), ("derm", "prr", 1)]]
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| prr | 2 |" in text and "| fedavg | 1 |" in text
    assert "## Confusion matrices" in text and "| true \\ predicted | nv | bkl | mel |" in text
    assert "segmentation_examples.png" not in text
    assert (tmp_path / "report" / "validation_curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_segmentation_report_draws_example_slices(tiny_runs, tmp_path):
    folder = shutil.copytree(tiny_runs[("prostate", "prr", 0)], tmp_path / "run")  # the report goes inside
    report = write_report([folder], examples=1, task=task_for("segmentation"))
    text = report.path.read_text()
    assert "| Dice | HD95 (mm) |" in text and "Confusion" not in text and not report.notes
    assert "![Segmentation examples](segmentation_examples.png)" in text
    assert (folder / "report" / "segmentation_examples.png").read_bytes().startswith(PNG_SIGNATURE)
    run = load_run(folder)
    splits = SplitCache(task_for("segmentation"))
    examples = choose_examples(splits.records(run), 2)
    for site, site_examples in examples.items():
        assert len(site_examples) == 2 and site_examples[0].case_id != site_examples[1].case_id
        assert all(example.truth.any() for example in site_examples)
        masks = predict_examples(run, examples, splits, torch.device("cpu"))[site]
        assert [m.shape for m in masks] == [e.image.shape for e in site_examples]


@pytest.mark.slow
def test_report_without_the_sites_data_still_writes_tables_and_says_why(tiny_runs, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(tiny_runs[("derm", "fedavg", 0)], copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["sites"] = [str(tmp_path / "gone" / "derm_a.yaml"), str(tmp_path / "gone" / "derm_b.yaml")]
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    record = json.loads((copy / "run.json").read_text())  # as if the run had named them
    (copy / "run.json").write_text(json.dumps({**record, "config_sha256": config_digest(config)}))
    report = write_report([copy], task=task_for("classification"))
    assert report.path == copy / "report" / "report.md"
    assert [note.split(" skipped: ")[0] for note in report.notes] == [
        "confusion matrix of site 'derm_a'", "confusion matrix of site 'derm_b'"]
    assert all(f"{tmp_path / 'gone'}" in note and "config file not found" in note for note in report.notes)
    assert "## Notes" in report.path.read_text() and "## Test results per site" in report.path.read_text()


@pytest.mark.slow
def test_selected_model_file_missing_is_a_data_error(tiny_runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_runs[("derm", "prr", 1)], copy)
    run = load_run(copy)
    selected = run.summary["sites"]["derm_a"]["selected_round"]
    (copy / "sites" / "derm_a" / "models" / f"round_{selected:04d}.pt").unlink()
    with pytest.raises(Exception, match="site 'derm_a': .*round_0000.pt: file not found"):
        load_selected_model(run, "derm_a", torch.device("cpu"))


@pytest.mark.slow
def test_report_with_one_sites_data_out_of_reach_scores_every_other_site(tmp_path_factory, tmp_path, monkeypatch,
                                                                          capsys):
    from test_export import SITE_VARIABLES, variable_run

    run, values = variable_run(tmp_path_factory)
    monkeypatch.setenv(SITE_VARIABLES["derm_a"], values[SITE_VARIABLES["derm_a"]])
    monkeypatch.delenv(SITE_VARIABLES["derm_b"], raising=False)  # derm_b's data lies at another hospital
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    matrices = text[text.index("## Confusion matrices"):]
    assert "### derm_a\n\n**fedavg**\n\n| true \\ predicted |" in matrices
    assert "### derm_b\n\n###" in matrices or "### derm_b\n\n## " in matrices  # derm_b's heading, no matrix
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: confusion matrix of site 'derm_b' skipped: {run.parent / 'site_configs'}"
                     f"/dermoscopy/derm_b.yaml: key 'data_root': environment variable '{SITE_VARIABLES['derm_b']}' "
                     "is not set"]


def test_report_refuses_a_run_config_changed_after_the_run(tmp_path, capsys):
    folder = fake_run(tmp_path)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "rounds": 3}))  # rounds may change (a resume)
    assert load_run(folder).config["rounds"] == 3
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "local_epochs": 1}))
    assert main(["report", str(folder), "--no-predictions", "--out", str(tmp_path / "report")]) == 1
    error = capsys.readouterr().err
    assert error == (f"medfl report: error: {folder / 'config.yaml'}: changed after the run (it is not the config "
                     "whose sha256 run.json records); put back the config.yaml the run wrote\n")
    assert not (tmp_path / "report").exists()
