"""The examples/ notebook runs top to bottom (attach, run stages, open lazily, plot, explore)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "spndi_walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SPNDI_EXAMPLE_DIR", str(tmp_path / "beamtime"))
    monkeypatch.setenv("SPNDI_CLUSTER", "local")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "dask.array" in text  # the results opened lazily
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the maps were plotted
    assert (tmp_path / "beamtime" / "results" / "particles.csv").is_file()
    assert (tmp_path / "beamtime" / "results" / "clusters.csv").is_file()  # features, clusters
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # maps, clusters, pattern
    # its example data is clean: no warning of its own (e.g. the ROI at the detector edge)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "detector edge" not in stderr, stderr
    # the explorer was served by the kernel and shown inline (a Bokeh server session)
    exec_mime = "application/vnd.bokehjs_exec.v0+json"
    assert any("server_id" in o.get("metadata", {}).get(exec_mime, {}) for o in outputs)
