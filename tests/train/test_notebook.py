"""The notebooks run top to bottom (smoke-size setting) on CPU."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")


def run_notebook(name: str, workdir: str, monkeypatch) -> str:
    """Executes notebooks/NAME.ipynb in smoke size; returns the text of every code cell's outputs."""
    monkeypatch.setenv("TTT_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TTT_NOTEBOOK_WORKDIR", workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(workdir)}}).execute()
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    outputs = run_notebook("quickstart", str(tmp_path / "run"), monkeypatch)
    assert "same predictions: True" in outputs
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")


def test_memory_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    outputs = run_notebook("memory", str(tmp_path / "run"), monkeypatch)
    assert "memory reloaded identically: True" in outputs
    assert "nats/token without the memory" in outputs
