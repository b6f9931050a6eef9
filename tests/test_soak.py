"""Soak: the whole pipeline again and again on one output, then with a particle added.

Memory of the client and of the workers must not grow from run to run, and the results must
stay identical.
"""

from __future__ import annotations

import numpy as np
import psutil
import pytest

from spndi_dask.config import load_manifest
from spndi_dask.dask_clusters import open_cluster
from spndi_dask.pipeline import RunOptions, run
from spndi_dask.reduce import open_results
from spndi_dask.simulate import preset, simulate_beamtime

pytestmark = pytest.mark.slow
STAGES = "ingest-analyze"
MB = 2**20


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _results(m, names) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        ds = open_results(m.output_dir, name)
        for var in ("d_spacing", "strain", "tilt_x", "label", "pattern", "latent", "cluster"):
            out[f"{name}/{var}"] = np.asarray(ds[var].values)
    return out


def test_repeated_runs_keep_memory_flat_and_results_identical(tmp_path):
    simulate_beamtime(tmp_path, preset("tiny", n_particles=3), scheduler="sync")
    text = (tmp_path / "beamtime.toml").read_text()
    two = tmp_path / "beamtime-2.toml"  # the beamtime before p3 was measured
    two.write_text("[[scans]]".join(text.split("[[scans]]")[:3]))
    m2, m3 = load_manifest(two), load_manifest(tmp_path / "beamtime.toml")
    assert [p.name for p in m2.scans] == ["p1", "p2"]

    memory, first = [], None
    with open_cluster(n_workers=2, dashboard_address="127.0.0.1:0") as s:
        for _ in range(4):
            options = RunOptions(progress=False, force=True, k=2)
            r = run(m2, s.client, stages=STAGES, options=options)
            assert not any(x.failed for x in r)
            res = _results(m2, ["p1", "p2"])  # compared at once: only the first run's are kept
            first = first or res
            for key, value in first.items():
                assert np.array_equal(res[key], value, equal_nan=True), key
            del res
            workers = s.client.run(_rss)
            memory.append((_rss(), max(workers.values())))
        # p3 is measured: only it is ingested, reduced and segmented
        r = run(m3, s.client, stages="ingest-stats", options=RunOptions(progress=False))
    status = {x.stage: x.scans for x in r}
    assert status["ingest"] == {"p1": "up to date", "p2": "up to date", "p3": "ingested"}
    assert status["reduce"] == {"p1": "up to date", "p2": "up to date", "p3": "reduced"}
    assert status["stats"]["p3"] == "done"
    after = _results(m3, ["p1", "p2"])
    for key, value in first.items():
        assert np.array_equal(after[key], value, equal_nan=True), key
    # after a warm-up run, neither the client nor a worker keeps growing
    client = [c for c, _ in memory]
    worker = [w for _, w in memory]
    assert client[-1] - client[1] < 64 * MB, [c // MB for c in client]
    assert worker[-1] - worker[1] < 64 * MB, [w // MB for w in worker]
