"""YAML alias bombs: every YAML file medfl reads refuses aliases before any value is walked.

A nine-level bomb (`&a [x x 9]`, `&b [*a x 9]`, ... `&i [*h x 9]`) is a few hundred bytes that expands to
9^9 values once anything walks it (medfl.models.base.plain_data walked model.options and passed 3.6 GB).
Each case is read in its own process under a 2 GiB address-space limit (torch and MONAI need under 1 GiB),
so that a loader which walks the bomb fails there instead of filling this machine's memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

MEMORY_LIMIT = 2 * 2**30
LETTERS = "abcdefghi"


def bomb() -> str:
    """A flow-style YAML list holding the nine anchored levels; the last one is the bomb's full size."""
    levels = ["&a [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&{letter} [" + ", ".join([f"*{previous}"] * 9) + "]"
               for previous, letter in zip(LETTERS[:-1], LETTERS[1:], strict=True)]
    return "[" + ", ".join(levels) + "]"


# Run in a fresh process: reads each (kind, path) as medfl would; prints what medfl said about each, as JSON.
DRIVER = """
import json, sys
from medfl.errors import MedflError

def read(kind, path):
    if kind == "experiment":
        from medfl.experiment import load_experiment_config
        from medfl.models.base import plain_data
        plain_data(load_experiment_config(path).model_dump())  # what building the network does with its options
    elif kind == "site":
        from medfl.config import load_site_config
        load_site_config(path)
    elif kind == "recipe":
        from medfl.data.recipes import resolve_recipe
        resolve_recipe(path)
    elif kind == "run_folder":
        from medfl.runfolder import RunFolder
        RunFolder(path).config()
    elif kind == "job":
        from medfl.config import load_yaml_mapping
        load_yaml_mapping(path)

said = {}
for kind, path in json.loads(sys.argv[1]):
    try:
        read(kind, path)
        said[path] = "read without a word"
    except MedflError as error:
        said[path] = str(error)
    except MemoryError:
        said[path] = "MemoryError"
print(json.dumps(said))
"""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _read(files: list[tuple[str, Path]]) -> dict[str, str]:
    """What medfl says about each file, read in one process under the memory limit."""
    argument = json.dumps([(kind, str(path)) for kind, path in files])
    result = subprocess.run([sys.executable, "-c", DRIVER, argument], capture_output=True, text=True,
                            env=_environment(), preexec_fn=_limit_memory, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _with_bomb(text: str) -> str:
    return text.replace("BOMB", bomb())


EXPERIMENT = """name: bombed
task: classification
sites: [site.yaml]
data: {classes: [nv, mel]}
model: {name: slim_vgg16, width: 0.125, options: {bias: BOMB}}
"""
SITE = "name: site_a\ntask: classification\ndata_root: .\nlayout: csv\nlabel_map: {nv: nv, mel: BOMB}\n"
CASES = {
    "model.options": ("experiment", "experiment.yaml", EXPERIMENT),
    "optimizer": ("experiment", "experiment.yaml", EXPERIMENT.replace("bias: BOMB", "bias: true")
                  + "optimizer: {name: sgd, lr: BOMB}\n"),
    "method options (pfa, det, cpa, baselines)": ("experiment", "experiment.yaml",
                                                  EXPERIMENT.replace("bias: BOMB", "bias: true")
                                                  + "cpa: {beta: BOMB}\nbaselines: {fedprox_mu: BOMB}\n"),
    "site label_map": ("site", "site.yaml", SITE),
    "site filter": ("site", "site.yaml", SITE.replace("mel: BOMB", "mel: mel")
                    + "filter: {column: dataset, values: BOMB}\n"),
    "recipe variables": ("recipe", "recipe.yaml",
                         "variables: {input_size: BOMB}\ntransforms:\n  - EnsureChannelFirstd: {keys: [image]}\n"),
    "recipe arguments": ("recipe", "recipe.yaml",
                         "transforms:\n  - EnsureChannelFirstd: {keys: [image], channel_dim: BOMB}\n"),
    "NVFlare job settings": ("job", "job.yaml", "run_dir: BOMB\n"),
}


def test_an_alias_bomb_is_refused_in_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    cases = []  # (case, kind, what medfl is given, the YAML file that holds the bomb)
    for number, (case, (kind, name, text)) in enumerate(CASES.items()):
        path = tmp_path / str(number) / name
        path.parent.mkdir()
        path.write_text(_with_bomb(text), encoding="utf-8")
        cases.append((case, kind, path, path))
    run_folder = tmp_path / "run"  # a run folder's config.yaml (read on --resume, export and report)
    run_folder.mkdir()
    record = {"schema_version": 1, "medfl_version": "0", "experiment": "bombed", "task": "classification",
              "method": "fedavg", "config_sha256": "0" * 64, "rounds": 2}
    (run_folder / "run.json").write_text(json.dumps(record), encoding="utf-8")
    (run_folder / "config.yaml").write_text(_with_bomb(EXPERIMENT), encoding="utf-8")
    cases.append(("run folder config.yaml", "run_folder", run_folder, run_folder / "config.yaml"))
    said = _read([(kind, given) for _, kind, given, _ in cases])
    for case, _, given, path in cases:
        message = said[str(given)]
        line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if "&a" in text)
        assert len(message.splitlines()) == 1, (case, message[:500])
        assert message.startswith(f"{path}: line {line}, column ") or f" {path}: line {line}, column " in message, \
            (case, message[:500])
        assert "alias '*a' refused" in message, (case, message[:500])


def test_medfl_run_refuses_the_bomb_before_torch_loads(tmp_path: Path) -> None:
    """The reproduction of the issue, through the command: one line on stderr, exit 1."""
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(_with_bomb(EXPERIMENT), encoding="utf-8")
    code = ("import sys; from medfl.cli import main; status = main(['run', sys.argv[1]]); "
            "assert 'torch' not in sys.modules; sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(experiment)], capture_output=True, text=True,
                            env=_environment(), preexec_fn=_limit_memory, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("medfl run: error: ") and len(result.stderr.splitlines()) == 1
    assert str(experiment) in result.stderr and "alias '*a' refused" in result.stderr


def test_anchors_without_aliases_and_plain_values_still_load(tmp_path: Path) -> None:
    from medfl.config import load_yaml_mapping

    path = tmp_path / "plain.yaml"
    path.write_text("name: &n site_a\nvalues: [1, 2]\n", encoding="utf-8")
    assert load_yaml_mapping(path) == {"name": "site_a", "values": [1, 2]}
    assert yaml.safe_load(bomb())[0] == ["x"] * 9  # the bomb is valid YAML: only medfl's loader refuses it
