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
