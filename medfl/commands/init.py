"""`medfl init DIR`: write a commented site config and experiment config per task, to start a federation from.

The templates ship inside the package (medfl/examples/<modality>/site.yaml and experiment.yaml), so a
hospital that installed only the wheel has them. Once `data_root` is filled in, `medfl check` and `medfl run`
accept them as they are. Existing files are never overwritten: nothing is written when one exists.
"""

from __future__ import annotations

import argparse

TEMPLATES = ("site.yaml", "experiment.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medfl init`."""
    parser.add_argument("folder", metavar="DIR", help="where to write <modality>/site.yaml and experiment.yaml")
    parser.add_argument("--task", choices=("classification", "segmentation"), action="append", dest="tasks",
                        help="the task(s) to write configs for (repeatable; default: both)")


def run(args: argparse.Namespace) -> int:
    """Write the templates of every chosen task, after checking that none of the files exists."""
    import importlib.resources
    from pathlib import Path

    from medfl.checkpoints import atomic_write_text
    from medfl.commands import folder_to_write
    from medfl.errors import ConfigError
    from medfl.tasks import TASKS, task_for

    folder = folder_to_write(args.folder, "DIR")
    tasks = [task_for(key) for key in args.tasks] if args.tasks else list(TASKS.values())
    examples = importlib.resources.files("medfl") / "examples"
    plan = {folder / task.modality / name: (examples / task.modality / name).read_text(encoding="utf-8")
            for task in tasks for name in TEMPLATES}
    taken = [str(path) for path in plan if path.exists()]
    if taken:
        raise ConfigError(f"{', '.join(taken)} already exist(s): medfl init never overwrites; choose another DIR")
    for path, text in plan.items():
        atomic_write_text(path, text)
        print(f"wrote {path}")
    for task in tasks:
        site = Path(folder / task.modality / "site.yaml")
        print(f"{task.key.value}: fill in data_root in {site}, then: medfl check {site}; "
              f"medfl run {site.with_name('experiment.yaml')}")
    return 0
