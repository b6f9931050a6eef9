"""Cheap imports: the package, the stage table and ``spndi --help`` load no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

import spndi_dask

HELP = "from spndi_dask.cli import main\ntry:\n    main({args})\nexcept SystemExit:\n    pass"
HEAVY = ("dask", "distributed", "xarray", "zarr", "numba", "torch", "scipy", "matplotlib")


def _loaded(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import spndi_dask",
        "import spndi_dask.stages",
        "import spndi_dask.io.layout",
        "import spndi_dask.config",
        HELP.format(args=["--help"]),
        HELP.format(args=["reduce", "--help"]),
        HELP.format(args=["run", "--help"]),
    ],
)
def test_light_entry_points_load_no_heavy_library(code):
    assert _loaded(code) == []


def test_public_names_resolve_on_first_use():
    assert set(spndi_dask.__all__) == {"__version__", *spndi_dask._EXPORTS}
    for name in spndi_dask._EXPORTS:
        assert getattr(spndi_dask, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        spndi_dask.nope  # noqa: B018
