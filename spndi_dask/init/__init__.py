"""``spndi init``: write a beamtime manifest from a folder of raw scan files.

:func:`init_manifest` inspects a folder of per-angle HDF5 files or TIFF stacks (angle files) and
returns the text of a commented ``beamtime.toml`` (every value says where it came from) and an
:class:`InitReport` of what it found and every guess it made. Nothing is guessed silently:
anything ambiguous (two candidate detector datasets of the same size, two monitors, angle files
of a scan with different shapes, angles that go back and forth, a file that cannot be read) is an
:class:`InitError` that lists every problem at once, each naming the file or dataset and the flag
of ``spndi init`` (the keyword of :class:`InitOptions`) that settles it.

How the folder is read
----------------------
* **Files**: ``.h5 .hdf5 .hdf .nxs .nx5 .cxi`` (HDF5) and ``.tif .tiff`` (one page per scan
  point), in any folder under ``RAW_DIR``; other files are listed as skipped. Files whose names
  say dark, flat, mask or background are skipped too (set ``dark``/``mask`` yourself).
* **Angle files**: one file per rocking angle, or one folder per angle holding it split across
  several files (``scan_<id>/data_000.h5, data_001.h5``: a folder named like a beamline scan,
  ``scan_12`` or ``12``, or a folder of files named like parts, ``data_000``, ``part1``), listed
  in order of their numbers.
* **Scans** (the ``[[scans]]`` entries): every folder holding angle files is a scan (nested
  folders joined by ``_``), or ``group`` (``--group``) is a regular expression with a named group
  ``scan`` (or ``particle``, its old name) searched in each angle file's path relative to
  ``RAW_DIR``.
* **Order**: by the scan number in the names (the last number of the file or split-folder name,
  compared as a number: ``scan_99999 < scan_100000``), else by the recorded angle; the recorded
  angles must then be strictly monotonic (``sort = "angle"`` orders by the angle instead).
* **Datasets** (HDF5), by name, case-insensitive, optionally followed by digits (``ic1``): see
  :data:`NAMES`; ``names`` (``--names KEY=a,b`` or ``KEY+=a,b``) replaces or extends a list.

  - detector: the largest 3-D ``(n_points, rows, cols)`` or 4-D ``(scan_rows, scan_cols, rows,
    cols)`` integer dataset (float if there is no integer one) outside the XRF groups;
  - monitor: a per-point dataset named like :data:`NAMES` ``monitor`` (or ``data`` in a group so
    named);
  - XRF: a per-point dataset in a group or with a name like :data:`NAMES` ``xrf``: a map
    ``(n_points,)`` or spectra ``(n_points, [channels,] bins)``; spectra need ``xrf_window_kev``
    and the bins' energies: a 1-D dataset named like ``xrf_energy`` beside them, or
    ``xrf_calibration``;
  - detector mask: a 2-D dataset of the detector's shape named like ``mask``;
  - positions: a pair of per-point datasets named like :data:`POSITION_PAIRS`
    (``samy``/``samx``, ``piezo_y``/``piezo_x``, ``y``/``x``, ...); their ``units`` attribute
    (µm if absent, noted as a guess);
  - rocking angle: a scalar (or constant per-point) dataset or an attribute named like ``angle``
    (``theta``, ``eta``, ``omega``, ...) whose value differs between the angle files of a scan;
  - geometry: NeXus-style ``<detector group>/x_pixel_size, y_pixel_size, distance,
    beam_center_x, beam_center_y`` and ``.../monochromator/energy`` (or attributes such as
    ``energy_kev``), detector arm ``gamma``, ``delta``, with their ``units`` (values without
    units are converted by their size and reported as guesses); what is recorded nowhere must
    be given (``energy_kev``, ``distance_m``, ``pixel_size_m``, ``beam_center``, ``gamma_deg``,
    ``delta_deg``); ``rocking_axis`` is ``y+`` unless given;
  - ``<detector group>/saturation_value``: ``[reduce] saturation`` (or ``saturation``).
* **Scan grid**: from the recorded positions (:func:`infer_grid`: lines of the fast axis, rows
  of the slow axis, steps; robust to jitter and overshoot; snake or raster), else from a 4-D
  detector dataset's scan axes or a ``scan_shape`` attribute, else ``scan_shape`` and
  ``step_um`` must be given.

Modules: ``names`` (:data:`NAMES`, :data:`POSITION_PAIRS`), ``options`` (:class:`InitOptions`,
:class:`InitError`, the argument parsers), ``report`` (:class:`InitReport`, :class:`InitResult`),
``files`` (finding and reading the angle files), ``geometry``, ``grid`` (:func:`infer_grid`),
``angles``, ``inference`` (per scan) and ``manifest`` (:func:`init_manifest`).

Examples
--------
>>> import tempfile, h5py, numpy as np
>>> raw = Path(tempfile.mkdtemp()) / "raw"
>>> for i, theta in enumerate([10.0, 10.1, 10.2]):
...     (raw / "p1").mkdir(parents=True, exist_ok=True)
...     with h5py.File(raw / "p1" / f"scan_{i + 1}.h5", "w") as f:
...         _ = f.create_dataset("/entry/detector/data", data=np.zeros((6, 4, 4), "u2"))
...         f["/entry"].attrs["theta"] = theta
>>> result = init_manifest(raw, manifest=raw.parent / "beamtime.toml", options=InitOptions(
...     scan_shape=(2, 3), step_um=(0.1, 0.1), energy_kev=9.0, distance_m=0.5,
...     pixel_size_m=55e-6, beam_center=(2.0, 2.0), gamma_deg=20.0, delta_deg=0.0))
>>> m = result.manifest
>>> m.scans[0].frames, m.scans[0].angles.tolist()
(['raw/p1/scan_1.h5', 'raw/p1/scan_2.h5', 'raw/p1/scan_3.h5'], [10.0, 10.1, 10.2])
>>> "/entry@theta" in result.text
True
"""

from __future__ import annotations

from pathlib import Path  # noqa: F401  (the doctest above uses it)

# ``X as X``: public names re-exported though not in __all__ (the CLI uses the parsers)
from spndi_dask.init.files import HDF5_SUFFIXES as HDF5_SUFFIXES
from spndi_dask.init.files import NOT_A_SCAN as NOT_A_SCAN
from spndi_dask.init.files import PART_FILE as PART_FILE
from spndi_dask.init.files import SPLIT_DIR as SPLIT_DIR
from spndi_dask.init.files import TIFF_SUFFIXES as TIFF_SUFFIXES
from spndi_dask.init.grid import GridFit, infer_grid
from spndi_dask.init.manifest import init_manifest
from spndi_dask.init.names import NAMES, POSITION_PAIRS
from spndi_dask.init.options import InitError, InitOptions
from spndi_dask.init.options import parse_angles as parse_angles
from spndi_dask.init.options import parse_names as parse_names
from spndi_dask.init.options import parse_pair as parse_pair
from spndi_dask.init.options import parse_positions as parse_positions
from spndi_dask.init.options import parse_positive as parse_positive
from spndi_dask.init.options import parse_shape as parse_shape
from spndi_dask.init.options import parse_step as parse_step
from spndi_dask.init.options import parse_window as parse_window
from spndi_dask.init.report import InitReport, InitResult
from spndi_dask.init.report import ParticleFound as ParticleFound
from spndi_dask.init.report import ScanFound as ScanFound

__all__ = [
    "NAMES",
    "POSITION_PAIRS",
    "GridFit",
    "InitError",
    "InitOptions",
    "InitReport",
    "InitResult",
    "infer_grid",
    "init_manifest",
]
