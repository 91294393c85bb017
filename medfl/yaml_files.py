"""The one YAML loader of medfl: safe tags only, no key given twice, no anchors or aliases.

Every YAML file medfl reads (site and experiment configs, recipes, a run folder's config.yaml, an NVFlare
job's settings) goes through `load_yaml`. Aliases are refused while the document is composed, before any
value exists: nine nested aliases of nine items each (an "alias bomb") are a few hundred bytes of text that
expand to hundreds of millions of values as soon as anything walks them. medfl's configs never need them.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (often a misspelt edit)."""


class AliasRefused(yaml.composer.ComposerError):
    """An alias (`*name`) in a medfl YAML file."""


class MedflYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (at composition) and keys given twice (at construction)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(None, None, f"alias '*{event.anchor}' refused (medfl reads no YAML anchors and aliases: "
                                           "write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def _construct_unique_mapping(loader: MedflYamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKey(None, None, f"key '{key}' is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


MedflYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str) -> Any:
    """The one document of `text`; yaml.YAMLError (see `describe_error`) when it is not medfl's YAML."""
    return yaml.load(text, Loader=MedflYamlLoader)  # noqa: S506 - a SafeLoader subclass


def describe_error(error: yaml.YAMLError) -> str:
    """A YAML error on one line, with the line and column where the parser found it (the file is named by
    the caller)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f"{error.context} " if error.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {' '.join((context + (error.problem or '')).split())}"
    return " ".join(str(error).split())
