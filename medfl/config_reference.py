"""The site-config and experiment-config references, generated from the pydantic models themselves.

Every key's type, default and limits come from the model's fields; its description comes from the field's
`description=` or, as DataSettings does, from a bullet of its model's docstring that names it in backticks
(`` - `key`: what it means``; one bullet may name several keys). The methods and networks tables come from
their registries. `medfl config-reference --out docs` rewrites docs/site-config.md and
docs/experiment-config.md; a test fails when the committed files differ from what this module generates.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from medfl.config import SiteConfig
from medfl.experiment import ExperimentConfig
from medfl.methods import METHODS
from medfl.network_facts import task_networks
from medfl.task_facts import FACTS

REGENERATE = "medfl config-reference --out docs"
FILES = {"site-config.md": "site", "experiment-config.md": "experiment"}
_BULLET = re.compile(r"^-\s+(?P<head>[^:]*`\w+`[^:]*):\s*(?P<text>.*)$", re.S)


def _docstring_parts(model: type[BaseModel]) -> tuple[str, dict[str, str]]:
    """A model's docstring: its prose (before the first bullet) and {key: text} from its bullets."""
    doc = inspect.cleandoc(model.__doc__ or "")
    prose: list[str] = []
    bullets: list[list[str]] = []
    for line in doc.splitlines():
        if line.startswith("- "):
            bullets.append([line])
        elif bullets and line.startswith("  ") and line.strip():
            bullets[-1].append(line.strip())
        elif not bullets:
            prose.append(line)
    described: dict[str, str] = {}
    for lines in bullets:
        match = _BULLET.match(" ".join(lines))
        if match:
            keys = re.findall(r"`(\w+)`", match["head"])
            text = " ".join(match["text"].split())
            for key in keys:  # a bullet about several keys keeps its head, which says how they relate
                described[key] = text if len(keys) == 1 else f"{' '.join(match['head'].split())}: {text}"
    return " ".join(" ".join(prose).split()), described


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _type_name(annotation: Any, inner: bool = False) -> str:
    """A reader's name for a field's type: text, integer, path, one of `a`, `b`, list of ...

    `inner`: the type sits inside a list or mapping, where a union is written in parentheses."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a, inner) for a in args if a is not type(None)]
        text = " or ".join(names) + (" or null" if type(None) in args else "")
        return f"({text})" if inner else text
    if origin is list:
        return f"list of {_type_name(args[0], True)}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a, True) for a in args) + "]"
    if origin is dict:
        if args[1] is Any:
            return "mapping"
        return f"mapping of {_type_name(args[0], True)} to {_type_name(args[1], True)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {str: "text", int: "integer", float: "number", bool: "true or false", Path: "path"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _limits(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                words.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "min_length", None) is not None:
            text = field.annotation is str
            words.append("not empty" if text and item.min_length == 1 else
                         f"at least {item.min_length} {'character' if text else 'item'}(s)")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matches `{item.pattern}`")
    return ", ".join(words)


def _default(field: FieldInfo, nested: type[BaseModel] | None) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return "see below" if nested else f"`{json.dumps(field.default_factory())}`"
    value = field.default
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def undocumented_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys of `model` (nested ones dotted) with neither a description nor a docstring bullet."""
    _, bullets = _docstring_parts(model)
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or bullets.get(name)):
            missing.append(prefix + name)
        nested = _nested_model(field.annotation)
        if nested is not None:
            missing += undocumented_keys(nested, f"{prefix}{name}.")
    return missing


def model_sections(model: type[BaseModel], prefix: str = "", level: int = 2) -> list[str]:
    """Markdown: one table of `model`'s keys, then a section for every nested model."""
    prose, bullets = _docstring_parts(model)
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top-level keys"
    lines = [f"{'#' * level} {title}", ""]
    if prose:
        lines += [prose, ""]
    lines += ["| key | type | default | limits | meaning |", "|---|---|---|---|---|"]
    nested_models = []
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        description = field.description or bullets.get(name, "")
        if nested is not None:
            nested_models.append((name, nested))
            description = f"{description} Keys: section `{prefix}{name}` below.".strip()
        row = [f"`{prefix}{name}`", _type_name(field.annotation), _default(field, nested), _limits(field),
               description]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    lines.append("")
    for name, nested in nested_models:
        lines += model_sections(nested, f"{prefix}{name}.", level + 1)
    return lines


def _methods_table() -> list[str]:
    lines = ["## Methods (`method`)", "", "| method | what it is | models per site | server | loss |",
             "|---|---|---|---|---|"]
    for name, spec in METHODS.items():
        models = "P and D" if spec.two_models else "one"
        server = spec.aggregation or "none (no communication)"
        lines.append(f"| `{name}` | {_cell(spec.description)} | {models} | {server} | {spec.loss} |")
    return [*lines, ""]


def _networks_table() -> list[str]:
    lines = ["## Networks (`model.name`) and their options (`model.options`)", "",
             "| task | `model.name` | network | `model.options` (default) |", "|---|---|---|---|"]
    for task in FACTS.values():
        for name, network in task_networks(task).items():
            options = [f"`{option}` ({_literal(default)})" for option, default in network.options.items()]
            lines.append(f"| {task.key.value} | `{name}` | {_cell(network.summary)} | "
                         f"{_cell(', '.join(options) or 'none')} |")
    return [*lines, ""]


def _literal(value: Any) -> str:
    """A default as it would be written in YAML flow style (JSON), else as Python writes it."""
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _header(title: str, intro: str) -> list[str]:
    return [f"<!-- Generated from medfl's pydantic models by `{REGENERATE}`: do not edit by hand. -->", "",
            f"# {title}", "", intro, ""]


def site_config_reference() -> str:
    """docs/site-config.md: every key of a site config."""
    intro = ("A site config is a YAML file of facts about one site's data. Unknown or misspelt keys are errors "
             "naming the key and the file; `${VAR}` environment variables are expanded in paths; `data_root` "
             "and `split_file` resolve against the config file's folder, `table` and `metadata_table` against "
             "`data_root`. `medfl synth` writes site configs of this form for its synthetic sites. "
             "Check one with `medfl check SITE.yaml`.")
    lines = _header("Site-config reference", intro) + model_sections(SiteConfig)
    return "\n".join(lines).rstrip() + "\n"


def experiment_config_reference() -> str:
    """docs/experiment-config.md: every key of an experiment config, the methods and the networks."""
    intro = ("An experiment config is a YAML file of choices: sites, classes, model, method, budget, runtime. "
             "Unknown or misspelt keys are errors naming the key and the file; relative paths (`sites`, "
             "`output_dir`) resolve against the experiment file's folder. `medfl run`, `medfl nvflare-job` and "
             "the options `--rounds`, `--method`, `--seed`, `--device` override top-level keys. The resolved "
             "config is written into every run folder as `config.yaml`.")
    lines = _header("Experiment-config reference", intro) + model_sections(ExperimentConfig)
    lines += _methods_table() + _networks_table()
    return "\n".join(lines).rstrip() + "\n"


def references() -> dict[str, str]:
    """{file name: text} of every generated reference."""
    generators = {"site": site_config_reference, "experiment": experiment_config_reference}
    return {name: generators[kind]() for name, kind in FILES.items()}


def write_references(folder: str | Path) -> list[Path]:
    """Write every reference into `folder`; the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in references().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


def stale_references(folder: str | Path) -> list[Path]:
    """The references in `folder` that are missing or differ from what the models generate."""
    folder = Path(folder)
    return [folder / name for name, text in references().items()
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text]
