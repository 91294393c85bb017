"""notebooks/quickstart.ipynb: committed without outputs, and it runs end to end with tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_valid_and_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def _text(cell) -> str:
    return "".join(output.get("text", "") + str(output.get("data", {}).get("text/markdown", ""))
                   for output in cell.get("outputs", []))


@pytest.mark.slow
def test_notebook_runs_with_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFL_QUICKSTART_TINY", "1")
    monkeypatch.setenv("MEDFL_QUICKSTART_DIR", str(tmp_path / "work"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    work = tmp_path / "work"
    outputs = "\n".join(_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "2 sites, 2 rounds" in outputs
    assert "| prr | 1 |" in outputs and "| fedavg | 1 |" in outputs
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert (work / "report" / "report.md").is_file()
    assert (work / "predictions" / "predictions.csv").is_file()
    assert len(list((work / "runs" / "quickstart-prr-seed0" / "export").iterdir())) == 1
    assert "macro_f1" in outputs
