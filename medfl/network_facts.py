"""What configs may know about a network without importing torch: its name, one-line summary and options.

Each task's facts name its networks as "module:Class" (`TaskFacts.network_classes`, medfl.task_facts); the
classes themselves are torch modules, so importing one loads torch and MONAI. What configs are checked
against (a network's name and its own options) and what the experiment-config reference prints (the summary
and the options' defaults) is read here from the classes' source with `ast` instead, so that `medfl run`
refuses an unknown network or option and `medfl config-reference` answers before torch loads. Where the
source cannot be read (an installation without .py files), the class is imported and inspected;
tests/test_config_reference.py checks that both ways describe every network alike. This module sits in the
config layer: it imports nothing of medfl.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# The arguments every network takes from the experiment (not options of its own).
BASE_ARGUMENTS = ("num_classes", "in_channels", "width", "spatial_dims")
_MISSING = object()


@dataclass(frozen=True)
class NetworkInfo:
    """One network: its config name, "module:Class", the first paragraph of its docstring and its own options
    (name -> default, in signature order)."""

    name: str
    target: str
    summary: str
    options: dict[str, Any]


def _summary(docstring: str | None) -> str:
    return " ".join(inspect.cleandoc(docstring or "").split("\n\n")[0].split())


def _source_file(module: str) -> Path | None:
    """The .py file of `module`, found without importing it (only its parent packages are imported, and
    `medfl.models` is found, not imported, as the parent of its modules)."""
    package, _, leaf = module.rpartition(".")
    spec = importlib.util.find_spec(package) if package else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / f"{leaf}.py"
        if path.is_file():
            return path
    return None


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level names bound to literals (`UNET_CHANNELS: tuple[int, ...] = (16, 32, ...)`)."""
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                constants[target.id] = ast.literal_eval(value)
            except ValueError:
                continue
    return constants


def _default(node: ast.expr, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _MISSING


def _from_source(name: str, target: str) -> NetworkInfo | None:
    """The network described from its module's source, or None when the source is absent or not plain."""
    module, _, class_name = target.partition(":")
    path = _source_file(module)
    if path is None:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None) if node else None
    if init is None:
        return None
    arguments = init.args.args[1:]  # without self
    defaults = [_MISSING] * (len(arguments) - len(init.args.defaults)) + list(init.args.defaults)
    constants = _constants(tree)
    options = {}
    for argument, default in zip(arguments, defaults, strict=True):
        if argument.arg in BASE_ARGUMENTS:
            continue
        value = _default(default, constants) if default is not _MISSING else _MISSING
        if value is _MISSING:
            return None  # an option without a literal default: let inspect describe it
        options[argument.arg] = value
    return NetworkInfo(name, target, _summary(ast.get_docstring(node, clean=False)), options)


def import_network(target: str) -> type:
    """The network class "module:Class" names (this imports torch and MONAI)."""
    module, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module), class_name)


def inspected(name: str, target: str) -> NetworkInfo:
    """The network described from the imported class itself (loads torch)."""
    network = import_network(target)
    options = {p.name: p.default for p in inspect.signature(network).parameters.values()
               if p.name not in BASE_ARGUMENTS}
    return NetworkInfo(name, target, _summary(network.__doc__), options)


@cache
def network_info(name: str, target: str) -> NetworkInfo:
    """A network's description, from its source when possible, else from the imported class."""
    return _from_source(name, target) or inspected(name, target)


def task_networks(task: Any) -> dict[str, NetworkInfo]:
    """Every network of a task (its `medfl.task_facts.TaskFacts`, or the Task), by name, in the task's order."""
    return {name: network_info(name, target) for name, target in task.network_classes.items()}


def check_network(task: Any, name: str, options: dict[str, Any]) -> None:
    """ValueError when a task has no network `name` or the network has no such option."""
    networks = task_networks(task)
    if name not in networks:
        raise ValueError(f"unknown {task.key.value} model '{name}'; valid names: {', '.join(networks)}")
    unknown = sorted(set(options) - set(networks[name].options))
    if unknown:
        valid = ", ".join(networks[name].options) or "none"
        raise ValueError(f"model '{name}': unknown option(s) {', '.join(unknown)}; valid options: {valid}")


# Networks without a `strides` option halve their input this many times (MONAI's BasicUNet: four max-pools).
DEFAULT_DOWNSAMPLINGS = 4


def downsampling_factor(task: Any, name: str, options: dict[str, Any]) -> int:
    """How many times network `name` shrinks its input in total: every input edge must be a multiple of it.
    A network with `strides` (MONAI's UNet) shrinks by their product, others by 2^DEFAULT_DOWNSAMPLINGS."""
    chosen = {**task_networks(task)[name].options, **options}
    if "strides" in chosen:
        factor = 1
        for stride in chosen["strides"]:
            factor *= int(stride) if isinstance(stride, int) else max(int(s) for s in stride)
        return factor
    return 2**DEFAULT_DOWNSAMPLINGS
