"""Raw files (HDF5 or TIFF stacks, one or several per rocking angle) -> ``<output>/raw.zarr``.

Parallel (one dask task per shard: an angle's scan tile; plus one task per angle that records
monitor, XRF, validity, the detector projection, the flagged pixels and the frame file's pixel
mask and then marks the angle done), shard-aligned, bit-exact and resumable:
an angle counts as done only once all of its shards and per-point arrays are written, and only
while its source files hold what was ingested (the same size, modification time and path, or
path relative to the manifest, else the same SHA-256: a beamtime folder moved or copied whole is
not ingested again) with the same dataset names and layout.
A re-run writes only angles that are not done. Every input is checked before anything is
written; one bad particle does not stop the others.

Where the frames come from. An angle's frames are one file, or several whose frames are
concatenated in the order listed (a scan split across files); a frames dataset is ``(n_points,
det_rows, det_cols)`` or has the scan's axes first (e.g. ``(rows, cols, det_rows, det_cols)``,
read row-major). A task reads only the points of its tile (HDF5 hyperslabs, across file
boundaries), never a whole file. Monitor, XRF and positions are concatenated across the files
the same way.

Where each frame goes. Without recorded positions, point ``i`` of an angle is node
``divmod(i, cols)`` of the scan grid (``scan_order = "snake"``: every other row reversed); an
aborted scan's missing points are 0 and marked invalid in ``valid``. With ``positions = {y, x,
units}`` (fly scans: jittered, overshooting, snaked) every frame is placed by its recorded
position (:mod:`spndi_dask.positions`), the same way at every angle:

- the grid is ``scan_shape`` nodes ``scan_step_um`` apart; its origin (node (0, 0)) is the one
  offset per particle, common to all angles, that puts the most points within half a step of a
  node (found from the points of all angles; a jittered first point or points overshooting the
  fast axis do not move it);
- each point goes to its nearest node if it lies within half a step of it in both axes; points
  beyond the grid are dropped and counted; of several points on one node the nearest is kept;
- a node without a point is invalid: frames 0, ``valid`` false, as for an aborted scan (a
  warning names the angles); ``scan_order`` and ``allow_incomplete`` play no part.

The positions of the point placed on each node are kept as ``position_y``/``position_x``
(angle, y, x) in µm from node (0, 0) (NaN where none; the origin is in ``attrs["positions"]``,
with the largest and RMS distance of a placed point from its node, the points dropped and the
nodes left empty).

Detector traits: values equal to the detector's invalid value (``[ingest] invalid_value``, e.g.
2^32 − 1 in the gaps and defective pixels of an Eiger or Pilatus) are stored as 0 and counted
per pixel and angle in ``flagged`` (:func:`~spndi_dask.ingest.write._flag_invalid`); a
particle's ``mask_dataset`` is copied from every angle file into ``pixel_mask``. ``reduce`` masks
both. XRF spectra are summed over channels and the energy window while they are read
(:func:`~spndi_dask.io.sources.read_xrf`).

Examples
--------
>>> import tempfile
>>> from spndi_dask.simulate import preset, simulate_beamtime
>>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1, n_angles=3))
>>> summary = ingest(m)
>>> summary["p1"]["status"], summary["p1"]["angles_written"]
('ingested', 3)
>>> ingest(m)["p1"]["status"]
'up to date'
"""

from spndi_dask.ingest.errors import IngestError
from spndi_dask.ingest.plan import IngestPlan, plan_ingest
from spndi_dask.ingest.run import ingest

__all__ = ["IngestError", "IngestPlan", "ingest", "plan_ingest"]
