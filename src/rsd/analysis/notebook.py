"""Run a notebook headless with papermill-style parameters (``nbclient``), e.g.
``execute_notebook('notebooks/compare_runs.ipynb', {'log_dir': 'logs'})``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def execute_notebook(path: str | Path, parameters: Mapping[str, Any] | None = None,
                     out_path: str | Path | None = None, timeout: int = 600, cwd: str | Path | None = None,
                     kernel_name: str = "python3"):
    """Execute a notebook with papermill-style parameters (a cell injected after the one tagged
    ``parameters``); writes the executed notebook to ``out_path`` when given. Raises on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    if parameters:
        src = "# Parameters (injected)\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
        idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])),
                   -1)
        nb.cells.insert(idx + 1, cell)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(cwd or Path(path).parent)}})
    client.execute()
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(out_path))
    return nb
