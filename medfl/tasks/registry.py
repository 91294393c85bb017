"""Every task medfl knows, by key: the one place that maps a task's name to its object."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from medfl.config import DataSettings
from medfl.experiment import EvaluationSettings
from medfl.task_facts import TaskKey
from medfl.tasks.base import Task
from medfl.tasks.classification import Classification
from medfl.tasks.segmentation import Segmentation
from medfl.tasks.volumetric import VolumetricSegmentation

TASKS: dict[TaskKey, Task] = {task.key: task for task in (Classification(), Segmentation())}


def task_for(key: str | TaskKey | Task, settings: Any = None) -> Task:
    """The task of a config's `task` value (a Task is returned as it is); ValueError naming the valid keys
    otherwise. `settings` (an ExperimentConfig or its DataSettings) choose a variant: segmentation with data.dims 3
    is VolumetricSegmentation, configured with the experiment's patch and sliding-window settings."""
    if isinstance(key, Task):
        return key
    try:
        task = TASKS[TaskKey(str(key))]
    except ValueError:
        raise ValueError(f"unknown task '{key}'; valid tasks: {', '.join(k.value for k in TASKS)}") from None
    data = settings if isinstance(settings, DataSettings) else getattr(settings, "data", None)
    if data is not None and data.dims == 3 and task.volumetric:
        return VolumetricSegmentation(data, getattr(settings, "evaluation", None))
    return task


def task_for_export(manifest: Mapping[str, Any]) -> Task:
    """The task of an export's manifest (checked by medfl.manifests): for a 3-D export, configured with the data
    settings and the sliding window it records, so that `medfl evaluate` scores as the run scored."""
    data = DataSettings.model_validate(manifest["data_settings"])
    window = manifest["preprocessing"].get("sliding_window") if data.dims == 3 else None
    evaluation = EvaluationSettings.model_validate(window) if window else None
    return task_for(manifest["task"], SimpleNamespace(data=data, evaluation=evaluation))
