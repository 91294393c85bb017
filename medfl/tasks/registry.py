"""Every task medfl knows, by key: the one place that maps a task's name to its object."""

from __future__ import annotations

from medfl.task_facts import TaskKey
from medfl.tasks.base import Task
from medfl.tasks.classification import Classification
from medfl.tasks.segmentation import Segmentation

TASKS: dict[TaskKey, Task] = {task.key: task for task in (Classification(), Segmentation())}


def task_for(key: str | TaskKey | Task) -> Task:
    """The task of a config's `task` value (a Task is returned as it is); ValueError naming the valid keys
    otherwise."""
    if isinstance(key, Task):
        return key
    try:
        return TASKS[TaskKey(str(key))]
    except ValueError:
        raise ValueError(f"unknown task '{key}'; valid tasks: {', '.join(k.value for k in TASKS)}") from None
