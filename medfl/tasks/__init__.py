"""Tasks: what a federation learns, one object each (dermoscopy classification, prostate MRI segmentation).

A task owns what differs between tasks: its site layouts and reader, its class list and label handling, the
supervised loss, the metrics and evaluation, the recipes, and what `medfl check`, reports and exports say
about it. Code outside this package never compares a task's name: it asks the task (`task_for(key)`).
Adding a task means writing one module with a `Task` subclass and registering it in `registry.py`; see
docs/architecture.md for what a task must provide.

Importing this package loads neither torch nor MONAI: configs are validated before they load.
"""

from medfl.tasks.base import Task, TaskKey
from medfl.tasks.registry import TASKS, task_for

__all__ = ["TASKS", "Task", "TaskKey", "task_for"]
