"""The config references in docs/ are generated from the pydantic models and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from medfl.cli import main
from medfl.config import SiteConfig
from medfl.config_reference import (
    REGENERATE,
    model_sections,
    references,
    stale_references,
    undocumented_keys,
)
from medfl.experiment import ExperimentConfig
from medfl.network_facts import _from_source, inspected
from medfl.tasks import TASKS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_committed_references_are_the_generated_ones() -> None:
    stale = [str(path.relative_to(DOCS.parent)) for path in stale_references(DOCS)]
    assert not stale, f"{', '.join(stale)} differ from the pydantic models: regenerate with `{REGENERATE}` (make docs)"


@pytest.mark.parametrize("model", [SiteConfig, ExperimentConfig])
def test_every_key_is_documented(model: type[BaseModel]) -> None:
    missing = undocumented_keys(model)
    assert not missing, (f"undocumented {model.__name__} keys {missing}: give each a Field(description=...) or a "
                         "'- `key`: meaning' bullet in its model's docstring, then run `" + REGENERATE + "`")


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _keys(field.annotation, f"{prefix}{name}.")
    return keys


def test_references_have_a_row_for_every_key_methods_and_networks() -> None:
    texts = references()
    for key in _keys(SiteConfig):
        assert f"| `{key}` |" in texts["site-config.md"]
    for key in _keys(ExperimentConfig):
        assert f"| `{key}` |" in texts["experiment-config.md"]
    assert "| `metadata_table` | path or null | `null` |" in texts["site-config.md"]
    assert "| `fedbn` |" in texts["experiment-config.md"] and "| `unet` |" in texts["experiment-config.md"]


class _Inner(BaseModel):
    """Inner settings.

    - `size`: how big.
    """

    size: int = Field(default=3, ge=1)


class _Outer(BaseModel):
    """Outer settings, documented two ways.

    - `a` and `b`: two keys in one bullet,
      continued on a second line.
    """

    a: int = 1
    b: list[str] | None = None
    c: str = Field(default="x", description="from the field")
    inner: _Inner = Field(default_factory=_Inner)
    missing: float = 0.5


def test_sections_take_descriptions_from_fields_and_docstring_bullets() -> None:
    text = "\n".join(model_sections(_Outer))
    assert "| `a` | integer | `1` |  | `a` and `b`: two keys in one bullet, continued on a second line. |" in text
    assert "| `b` | list of text or null | `null` |" in text
    assert "| `c` | text | `\"x\"` |  | from the field |" in text
    assert "### `inner`" in text and "| `inner.size` | integer | `3` | >= 1 | how big. |" in text
    assert undocumented_keys(_Outer) == ["inner", "missing"]


def test_command_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-reference", "--check", str(tmp_path)]) == 1
    assert "stale or missing" in capsys.readouterr().err
    assert main(["config-reference", "--out", str(tmp_path)]) == 0
    assert main(["config-reference", "--check", str(tmp_path)]) == 0
    (tmp_path / "site-config.md").write_text("edited by hand\n", encoding="utf-8")
    assert main(["config-reference", "--check", str(tmp_path)]) == 1
    assert main(["config-reference"]) == 0
    assert "# Site-config reference" in capsys.readouterr().out


@pytest.mark.parametrize("task", list(TASKS.values()), ids=lambda task: task.key.value)
def test_networks_read_from_their_source_are_the_imported_classes(task) -> None:
    """The reference and the config checks read networks from source (no torch); the classes must agree."""
    for name, target in task.network_classes.items():
        from_source = _from_source(name, target)
        assert from_source is not None, f"{target}: not readable from its source"
        assert from_source == inspected(name, target)


def test_the_reference_and_the_network_checks_need_no_torch() -> None:
    code = ("import sys\nfrom medfl.cli import main\n"
            f"status = main(['config-reference', '--check', {str(DOCS)!r}])\n"
            "from medfl.experiment import ExperimentConfig\n"
            "try:\n    ExperimentConfig(task='segmentation', sites=['s.yaml'], model={'name': 'unet', 'options': {'kernel': 3}})\n"
            "except ValueError as error:\n    refused = 'valid options: channels' in str(error)\n"
            "print(status, refused, 'torch' in sys.modules, 'monai' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "True", "False", "False"], result.stderr
