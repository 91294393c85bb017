"""Tasks: what a federation learns, one object each (dermoscopy classification, prostate MRI segmentation).

The composition layer. A task's facts (medfl.task_facts: its key, layouts, classes, metric, networks by
name) are what configs validate with; its behaviour composes the layers below: its site reader (medfl.data),
its supervised loss and scorer (medfl.federated), its report columns (medfl.report) and its part of an export
(medfl.deliver). Only this package and the entry points (medfl.commands, medfl.nvflare) turn a key into a
Task (`task_for`); they hand it down as an argument, and nothing below compares a task's name. Adding a task
means a facts class in medfl/task_facts.py, one module here with its `Task` subclass, and a line in
`registry.py`; see docs/architecture.md.

Importing this package loads neither torch nor MONAI: `medfl check` reads sites through it.
"""

from medfl.tasks.base import Task
from medfl.tasks.registry import TASKS, task_for, task_for_export

__all__ = ["TASKS", "Task", "task_for", "task_for_export"]
