"""The `medfl` command's conventions: version, exit statuses, stderr for messages, one device default,
configs validated before torch and MONAI load, and no process-wide settings on `import medfl`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import medfl
from medfl.cli import COMMANDS, build_parser, main


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env if env is not None else dict(os.environ))


def _python_args(code: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=600)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"medfl {medfl.__version__}"


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2 and "required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2


def test_a_config_problem_exits_1_with_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("task: classification\nsites: [site.yaml]\nrouns: 3\n", encoding="utf-8")
    assert main(["run", str(experiment)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("medfl run: error: ") and len(captured.err.splitlines()) == 1
    assert "unknown key 'rouns' (did you mean 'rounds'?)" in captured.err


def test_an_interrupt_exits_130_with_the_message_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import medfl.commands.synth as synth

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "run", interrupted)
    assert main(["synth"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == "medfl synth: interrupted"


def test_every_device_option_defaults_to_auto() -> None:
    parser = build_parser()
    assert parser.parse_args(["predict", "export", "image.jpg", "--out", "out"]).device == "auto"
    assert parser.parse_args(["evaluate", "export", "site.yaml"]).device == "auto"
    assert parser.parse_args(["report", "run"]).device == "auto"
    # `run` takes the config's device, whose default is auto too
    assert parser.parse_args(["run", "experiment.yaml"]).device is None
    from medfl.experiment import ExperimentConfig

    assert ExperimentConfig.model_fields["device"].default == "auto"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name, _, _ in COMMANDS)


def test_import_medfl_leaves_the_environment_alone_and_the_command_sets_openmp_waiting() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, medfl, medfl.config, medfl.experiment, medfl.data, medfl.cli\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n"
            "medfl.cli.main([])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    lines = _python(code, env).stdout.splitlines()
    assert lines[0] == "None" and lines[-1] == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert _python(code, env).stdout.splitlines()[-1] == "ACTIVE"  # the user's choice wins


def _after(code: str) -> tuple[dict[str, object], str]:
    """Run `code` (which sets `status`) in a fresh interpreter: status, whether torch and MONAI were loaded,
    and everything printed."""
    result = _python(code + "\nimport json, sys\n"
                     "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules, "
                     "'monai': 'monai' in sys.modules}))")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stdout + result.stderr


def test_configs_are_validated_without_torch_or_monai(ham10000_site, tmp_path: Path) -> None:
    site = ham10000_site()
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"task": "classification", "sites": [str(site)],
                                          "data": {"classes": ["nv", "bkl", "mel"]}}), encoding="utf-8")
    code = (f"from medfl.config import load_site_config\nfrom medfl.experiment import load_experiment_config\n"
            f"load_site_config({str(site)!r})\nload_experiment_config({str(experiment)!r}).load_sites()\n"
            "from medfl.data import inspect_site\nstatus = 0")
    assert _after(code)[0] == {"status": 0, "torch": False, "monai": False}
    # `medfl check` reads a dermoscopy site through its task (the composition layer) without either
    code = (f"from medfl.config import load_site_config\nfrom medfl.data import inspect_site\n"
            f"from medfl.tasks import task_for\nsite = load_site_config({str(site)!r})\n"
            "status = len(inspect_site(site, task=task_for(site.task)).report.errors)")
    assert _after(code)[0] == {"status": 0, "torch": False, "monai": False}


@pytest.mark.parametrize("command", ["check", "run", "evaluate", "nvflare-job", "predict", "export", "report"])
def test_a_misspelt_key_or_a_missing_folder_is_reported_before_torch_loads(command: str, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("name: a\ntask: classification\ndata_root: .\nlayuot: csv\nlabel_map: {x: x}\n", encoding="utf-8")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("task: classification\nsites: [site.yaml]\ndata: {classes: [x, y]}\n", encoding="utf-8")
    missing = str(tmp_path / "missing")
    arguments = {
        "check": [str(site)],
        "run": [str(experiment)],
        "evaluate": [str(tmp_path), str(site)],
        "nvflare-job": [str(experiment), "--out", str(tmp_path / "job")],
        "predict": [missing, "image.jpg", "--out", str(tmp_path / "out")],
        "export": [missing],
        "report": [missing],
    }[command]
    outcome, printed = _after(f"import medfl.cli\nstatus = medfl.cli.main({[command, *arguments]!r})")
    assert outcome == {"status": 1, "torch": False, "monai": False}
    assert ("unknown key 'layuot'" if command in ("check", "run", "evaluate", "nvflare-job")
            else f"{missing}: ") in printed


@pytest.mark.parametrize(("command", "misspelt"), [("check", "site"), ("run", "site"), ("run", "experiment"),
                                                   ("run", "method")])
def test_a_misspelt_task_or_method_is_reported_before_torch_or_monai_loads(command: str, misspelt: str,
                                                                          tmp_path: Path) -> None:
    """The task keys and the method table are config-level facts: no task behaviour, torch or MONAI needed."""
    site = tmp_path / "site.yaml"
    task = "clasification" if misspelt == "site" else "classification"
    site.write_text(f"name: a\ntask: {task}\ndata_root: .\nlayout: csv\nlabel_map: {{x: x}}\n", encoding="utf-8")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(f"task: {'segmentaton' if misspelt == 'experiment' else 'classification'}\n"
                          f"method: {'fedprx' if misspelt == 'method' else 'prr'}\nsites: [site.yaml]\n"
                          "data: {classes: [x, y]}\n", encoding="utf-8")
    arguments = [str(site)] if command == "check" else [str(experiment)]
    outcome, printed = _after(f"import medfl.cli\nstatus = medfl.cli.main({[command, *arguments]!r})")
    assert outcome == {"status": 1, "torch": False, "monai": False}
    expected = ("unknown method 'fedprx'" if misspelt == "method"
                else "key 'task': Input should be 'classification' or 'segmentation'")
    assert expected in printed


def test_a_full_disk_that_escapes_the_writers_is_still_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """As torch.save reports it: a RuntimeError raised while the OSError of the full disk was handled."""
    import errno

    import medfl.commands.report

    def full(args):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/report/figure.png")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 62976 vs 62872") from None

    monkeypatch.setattr(medfl.commands.report, "run", full)
    assert main(["report", "run"]) == 1
    assert capsys.readouterr().err == ("medfl report: error: /data/report/figure.png: cannot write "
                                       "(No space left on device)\n")


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished two-site classification run, its export root (both sites), a segmentation run, site configs,
    and a folder of odd paths (a file, a folder)."""
    from test_export import tiny_runs

    from medfl.deliver import export_run
    from medfl.tasks import task_for

    runs = tiny_runs(tmp_path_factory)
    exports = tmp_path_factory.mktemp("fast_answers") / "exports"
    export_run(runs["classification"], out=exports, task=task_for("classification"))
    odd = exports.parent
    (odd / "a_file.txt").write_text("not a folder")
    (odd / "a_folder").mkdir()
    (odd / "job").mkdir()
    (odd / "job" / "kept.txt").write_text("a job folder that is not empty")
    (odd / "predicted").mkdir()
    (odd / "predicted" / "predictions.csv").write_text("image\n")
    (odd / "dermoscopy").mkdir()
    (odd / "dermoscopy" / "site.yaml").write_text("name: mine\n")
    configs = runs["federation"] / "site_configs"
    return {"run": runs["classification"], "exports": exports, "odd": odd,
            "derm_a": configs / "dermoscopy" / "derm_a.yaml", "prost_a": configs / "prostate" / "prost_a.yaml",
            "image": next((runs["federation"] / "dermoscopy" / "derm_a").rglob("*.jpg"))}


def _no_gpu_build() -> bool:
    from medfl.devices import installed_torch_gpu_backends

    return installed_torch_gpu_backends() == set()


FAST_ANSWERS = {  # case -> (arguments with placeholders, a fragment of the one error line)
    "export --site nosuch": (["export", "{run}", "--site", "nosuch", "--out", "{odd}/e1"], "no site 'nosuch' in this run"),
    "export --round 9": (["export", "{run}", "--round", "9", "--out", "{odd}/e2"], "round 9 does not exist"),
    "export --round x": (["export", "{run}", "--round", "x", "--out", "{odd}/e3"], "--round must be"),
    "export existing": (["export", "{run}", "--out", "{exports}"], "an export is never overwritten"),
    "export --out file": (["export", "{run}", "--out", "{odd}/a_file.txt"], "must be a folder"),
    "predict root without --site": (["predict", "{exports}", "{image}", "--out", "{odd}/p"], "choose one with --site"),
    "predict --site nosuch": (["predict", "{exports}", "{image}", "--out", "{odd}/p", "--site", "nosuch"],
                              "no export of site 'nosuch'"),
    "predict a folder": (["predict", "{exports}/derm_a", "{odd}/a_folder", "--out", "{odd}/p"], "is a folder"),
    "predict a missing file": (["predict", "{exports}/derm_a", "{odd}/absent.jpg", "--out", "{odd}/p"],
                               "file not found"),
    "predict a volume": (["predict", "{exports}/derm_a", "{odd}/a_file.txt", "--out", "{odd}/p"], "unknown file type"),
    "predict --out file": (["predict", "{exports}/derm_a", "{image}", "--out", "{odd}/a_file.txt"], "must be a folder"),
    "predict existing": (["predict", "{exports}/derm_a", "{image}", "--out", "{odd}/predicted"], "never overwritten"),
    "predict --device cuda": (["predict", "{exports}/derm_a", "{image}", "--out", "{odd}/p", "--device", "cuda"],
                              "no CUDA GPU"),
    "evaluate root without --site": (["evaluate", "{exports}", "{derm_a}"], "choose one with --site"),
    "evaluate another task": (["evaluate", "{exports}/derm_a", "{prost_a}"], "a segmentation site cannot score"),
    "evaluate --out folder": (["evaluate", "{exports}/derm_a", "{derm_a}", "--out", "{odd}/a_folder"], "must be a file"),
    "evaluate --device cuda": (["evaluate", "{exports}/derm_a", "{derm_a}", "--device", "cuda"], "no CUDA GPU"),
    "report not a run": (["report", "{odd}/a_folder"], "not a medfl run folder"),
    "report --out file": (["report", "{run}", "--out", "{odd}/a_file.txt"], "must be a folder"),
    "report --device cuda": (["report", "{run}", "--out", "{odd}/r", "--device", "cuda"], "no CUDA GPU"),
    "run --device cuda": (["run", "{run}/config.yaml", "--out", "{odd}/run", "--device", "cuda"], "no CUDA GPU"),
    "nvflare-job existing": (["nvflare-job", "{run}/config.yaml", "--out", "{odd}/job"], "is not empty"),
    "nvflare-job --min-sites": (["nvflare-job", "{run}/config.yaml", "--out", "{odd}/j", "--min-sites", "5"],
                                "min_sites must be between 1 and"),
    "synth --out file": (["synth", "--out", "{odd}/a_file.txt"], "must be a folder"),
    "synth --shift-strength mild": (["synth", "--out", "{odd}/s", "--shift-strength", "0.5"], "add --shift realistic"),
    "synth --shift-strength nan": (["synth", "--out", "{odd}/s", "--shift", "realistic", "--shift-strength", "nan"],
                                   "--shift-strength must be a number from 0"),
    "init existing": (["init", "{odd}", "--task", "classification"], "never overwrites"),
    "docs nosuch": (["docs", "nosuch"], "no page 'nosuch'"),
}


# Runs `medfl` commands (a JSON list of argument lists) one after another in this one fresh interpreter and prints,
# as JSON, per command: its status, everything it printed, whether torch and MONAI were loaded by its end (a
# module once loaded stays loaded, so each command is seen as by a fresh interpreter of its own unless an earlier
# one loaded them, which fails that earlier case too) and which of the paths in argv[2] existed by its end.
COMMANDS_RUNNER = """
import contextlib, io, json, os, sys, traceback
import medfl.cli
results = []
for arguments in json.loads(sys.argv[1]):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            status = medfl.cli.main(arguments)
        except SystemExit as stop:
            status = stop.code
        except Exception:
            status = None
            traceback.print_exc()
    results.append({"status": status, "torch": "torch" in sys.modules, "monai": "monai" in sys.modules,
                    "printed": printed.getvalue(), "written": [p for p in json.loads(sys.argv[2]) if os.path.exists(p)]})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fast_answers(delivered) -> dict[str, dict[str, object]]:
    """case -> what its command did, every case of FAST_ANSWERS in one fresh interpreter (COMMANDS_RUNNER). The
    cuda cases are left out on a GPU build of torch, where they ask torch itself."""
    cases = [case for case in FAST_ANSWERS if "cuda" not in case or _no_gpu_build()]
    commands = [[part.format(**delivered) for part in FAST_ANSWERS[case][0]] for case in cases]
    watched = [str(delivered["odd"] / "p"), str(delivered["odd"] / "r")]
    result = _python_args(COMMANDS_RUNNER, json.dumps(commands), json.dumps(watched))
    assert result.returncode == 0, result.stderr
    return dict(zip(cases, json.loads(result.stdout.splitlines()[-1]), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAST_ANSWERS))
def test_argument_path_manifest_and_device_errors_come_before_torch_and_monai(case: str, fast_answers) -> None:
    if "cuda" in case and not _no_gpu_build():
        pytest.skip("a GPU build of torch: whether CUDA is usable is asked of torch itself (MONAI still not loaded)")
    answer = fast_answers[case]
    printed = answer["printed"]
    assert {k: answer[k] for k in ("status", "torch", "monai")} == {"status": 1, "torch": False, "monai": False}, printed
    assert FAST_ANSWERS[case][1] in printed and "Traceback" not in printed
    assert answer["written"] == []  # nothing written: neither predictions (p) nor a report (r)


def test_the_torch_build_is_read_without_importing_torch() -> None:
    from medfl.devices import gpu_backends_in

    cpu = "from typing import Optional\n__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n"
    assert gpu_backends_in(cpu) == set()
    assert gpu_backends_in(cpu.replace("cuda: Optional[str] = None", "cuda: Optional[str] = '12.4'")) == {"cuda"}
    assert gpu_backends_in(cpu.replace("hip: Optional[str] = None", "hip = '6.2.41133'")) == {"hip"}
    assert gpu_backends_in("__version__ = '1.0'\ncuda = None\n") is None  # unknown: torch itself is asked
    assert gpu_backends_in(cpu.replace("= None\nhip", "= get()\nhip")) is None
    code = ("import sys\nfrom medfl.devices import installed_torch_gpu_backends\n"
            "print(sorted(installed_torch_gpu_backends()), 'torch' in sys.modules)")
    result = _python(code).stdout.strip()
    import torch

    expected = sorted(name for name in ("cuda", "hip") if getattr(torch.version, name) is not None)
    assert result == f"{expected} False"


def test_python_dash_m_medfl_is_the_medfl_command() -> None:
    result = subprocess.run([sys.executable, "-m", "medfl", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"medfl {medfl.__version__}"
