"""The ingest plan: every input of a particle checked, and the angles still to write, before
anything is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spndi_dask._version import __version__
from spndi_dask.config import Manifest, ScanSettings
from spndi_dask.ingest.errors import IngestError, _prefix
from spndi_dask.ingest.placement import _place_points
from spndi_dask.ingest.records import _recorded_paths
from spndi_dask.io.hashing import same_source, stable_key
from spndi_dask.io.integrity import is_damage
from spndi_dask.io.layout import check_output
from spndi_dask.io.raw_store import RawLayout
from spndi_dask.io.sources import (
    SourceError,
    SourceInfo,
    XrfSource,
    probe_source,
    probe_xrf,
    read_per_point,
    read_pixel_mask,
)

logger = logging.getLogger(__name__)


@dataclass
class IngestPlan:
    """What ingesting one particle will do (built and checked before anything is written)."""

    particle: ScanSettings
    root: Path
    sources: list[SourceInfo]
    layout: RawLayout
    fingerprints: list[int]
    todo: list[int]
    allow_incomplete: bool
    bad_values: str
    checksum: str
    attrs: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True
    #: angles whose file moved or was touched but holds what was ingested: record kept, updated
    moved: dict[int, dict[str, Any]] = field(default_factory=dict)
    base_dir: Path = Path(".")
    #: per angle (rows, cols) source point of every node, -1 none: from recorded positions;
    #: None: points in scan_order
    index_maps: list[np.ndarray] | None = None
    #: per angle the grid nodes without a point
    empty_nodes: list[int] = field(default_factory=list)
    #: recorded positions: (y dataset, x dataset, factor to µm, grid origin in µm)
    positions: tuple[str, str, float, tuple[float, float]] | None = None
    #: the detector value that flags a bad pixel (None: none), resolved from [ingest]
    invalid: int | float | None = None
    #: how the per-point fluorescence is read (None: not recorded)
    xrf: XrfSource | None = None

    @property
    def name(self) -> str:
        """Particle name."""
        return self.particle.name

    @property
    def group_url(self) -> str:
        """Path of the particle's group in ``raw.zarr``."""
        return str(self.root / self.particle.name)


def plan_ingest(manifest: Manifest, particle: ScanSettings, *, force: bool = False) -> IngestPlan:
    """Check every angle file of a particle and decide which angles still need writing.

    Raises
    ------
    IngestError
        Missing files (all listed), unreadable files, missing datasets (existing ones listed),
        detector shape or dtype changing between angles or between the files of an angle, scans
        with too many points, or too few without ``allow_incomplete``, a monitor without flux
        (0, negative or NaN) at every point of an angle, recorded positions whose length is not
        the number of frames, a ``mask_dataset`` missing or not of the detector's shape, XRF with
        too few points, spectra without an energy window (or a map with one), a window outside
        the spectra's energies, an ``xrf_energy`` whose length is not the number of bins.
    ForeignOutputError
        The output's ``raw.zarr`` (or ``results.zarr``) was not written by spndi: it stops the
        whole ingest before anything is written.
    """
    check_output(manifest.output_dir)
    p = particle
    files = p.frame_files(manifest.base_dir)
    paths = [f for parts in files for f in parts]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        shown = "\n    ".join(missing[:10]) + (
            f"\n    ... {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise IngestError(
            f"{_prefix(p)}: {len(missing)} of {len(paths)} angle files are missing:\n    {shown}\n"
            "copy them, or list only the measured angles in angles_deg/frames"
        )
    infos = []
    for parts in files:
        try:
            infos.append(probe_source(parts, p.dataset))
        except SourceError as exc:
            raise IngestError(f"{_prefix(p)}: {exc}") from None
    first = infos[0]
    for a, info in enumerate(infos[1:], start=1):
        if info.detector_shape != first.detector_shape or info.dtype != first.dtype:
            raise IngestError(
                f"{_prefix(p)}: angle file {info.path} (index {a}) has frames "
                f"{info.detector_shape} {info.dtype}, but {first.path} (index 0) has "
                f"{first.detector_shape} {first.dtype}; all angles of a particle must use one "
                "detector setting: split the particle into two manifest entries"
            )
    settings = manifest.ingest
    allow = p.allow_incomplete if p.allow_incomplete is not None else settings.allow_incomplete
    ny, nx = p.scan_shape
    if p.positions is None:  # point i is node divmod(i, nx): the counts must fit the grid
        for info in infos:
            if info.n_points > p.n_points:
                raise IngestError(
                    f"{_prefix(p)}: {_files(info)} {info.n_points} frames, scan_shape "
                    f"{ny}×{nx} needs {p.n_points}; correct scan_shape (or give the recorded "
                    "`positions` of a fly scan)"
                )
            if info.n_points < p.n_points and not allow:
                raise IngestError(
                    f"{_prefix(p)}: {_files(info)} {info.n_points} frames, scan_shape "
                    f"{ny}×{nx} needs {p.n_points}; set `allow_incomplete = true` to fill "
                    "missing points"
                )
    invalid = _invalid_value(settings.invalid_value, np.dtype(first.dtype), p)
    xrf = _xrf_source(p)
    _check_traits(p, infos, first.detector_shape, xrf)
    for what, ds in (("monitor", p.monitor),):
        if ds is not None:
            for a, info in enumerate(infos):
                try:
                    flux = read_per_point(info, ds, what, key=what)
                except SourceError as exc:
                    raise IngestError(f"{_prefix(p)}: {exc} (manifest key `{what}`)") from None
                if what == "monitor" and not np.any(np.isfinite(flux) & (flux > 0)):
                    # reduce divides by the monitor: points without flux are masked, but an
                    # angle without any is a broken file, not a beam loss
                    raise IngestError(
                        f"{_prefix(p)}: angle file {info.describe()} (angle index {a}, "
                        f"{p.angles[a]:g}°) has monitor {ds} = 0, negative or not finite at "
                        "every scan point: the frames cannot be normalised by it; fix the file, "
                        "remove `monitor` from the particle to skip the normalisation, or drop "
                        "this angle from angles_deg and frames"
                    )
    index_maps = None
    positions = None
    position_attrs = None
    if p.positions is not None:
        index_maps, positions, position_attrs = _place_points(p, infos)
        empty = position_attrs["nodes_empty_per_angle"]
    else:
        empty = [max(p.n_points - info.n_points, 0) for info in infos]

    layout = RawLayout(
        (len(infos), ny, nx, *first.detector_shape),
        first.dtype,
        scan_chunk=settings.scan_chunk,
        scan_shard=settings.scan_shard,
        detector_chunk=settings.detector_chunk,
        compressor=settings.compressor,
        clevel=settings.clevel,
    )
    layout_key = json.dumps(layout.describe(), sort_keys=True)
    # what an angle was ingested from and with: the file's size and modification time (not its
    # place: a beamtime folder moved whole keeps them) and the settings; a file that was copied
    # or touched is compared by its content with the recorded SHA-256 (same_file)
    settings_key: tuple[Any, ...] = (
        p.dataset,
        p.monitor,
        p.xrf,
        p.scan_shape,
        p.scan_order,
        layout_key,
        _traits_key(p, invalid, xrf),
    )
    if positions is not None:  # where each frame goes: the datasets and the grid's origin
        settings_key += ("positions", *positions)
    fingerprints = [stable_key(*info.stamp, *settings_key) for info in infos]
    root = manifest.layout.raw
    todo = list(range(len(infos)))
    fresh = True
    moved: dict[int, dict[str, Any]] = {}
    existing = root / p.name / "zarr.json"
    if existing.exists() and not force:
        try:
            group = zarr.open_group(str(root / p.name), mode="r")
            attrs = dict(group.attrs)
            if attrs.get("layout") == layout.describe() and (
                ("position_y" in group) == (positions is not None)
            ):
                done = np.asarray(group["done"][:])
                recorded = list(attrs.get("sources") or [])
                recorded += [None] * (len(infos) - len(recorded))
                same_settings = attrs.get("settings_key") == stable_key(*settings_key)
                todo = []
                for a, info in enumerate(infos):
                    if int(done[a]) == fingerprints[a]:
                        if _recorded_paths(recorded[a]) != info.paths:  # moved, unrecorded
                            moved[a] = recorded[a] or {}
                    elif (
                        done[a] != 0
                        and same_settings
                        and same_source(info.paths, recorded[a], manifest.base_dir)
                    ):
                        moved[a] = recorded[a]
                    else:
                        todo.append(a)
                fresh = False
        except Exception as exc:  # damaged metadata or done marks: write the particle again
            if not is_damage(exc) and not isinstance(exc, ValueError | OSError | KeyError):
                raise
            logger.warning(
                "scan '%s': %s is damaged (%s); ingesting it again", p.name, root / p.name, exc
            )
    attrs = {
        "spndi_dask": {"kind": "raw", "version": __version__},
        "particle": p.name,
        "angles_deg": [float(a) for a in p.angles],
        "scan_shape": list(p.scan_shape),
        "scan_step_um": list(p.scan_step_um),
        "scan_order": p.scan_order if positions is None else "recorded positions",
        "geometry": manifest.geometry_for(p).to_dict(),
        "detector_shape": list(first.detector_shape),
        "dtype": first.dtype,
        "layout": layout.describe(),
        "dataset": p.dataset,
        "monitor_dataset": p.monitor,
        "xrf_dataset": p.xrf,
        "xrf": None if xrf is None else xrf.describe(),
        "mask_dataset": p.mask_dataset,
        "invalid_value": invalid,
        "manifest_hash": manifest.manifest_hash,
        "manifest": manifest.source,
        "settings_key": stable_key(*settings_key),
    }
    if position_attrs is not None:
        attrs["positions"] = position_attrs
    return IngestPlan(
        particle=p,
        root=root,
        sources=infos,
        layout=layout,
        fingerprints=fingerprints,
        todo=todo,
        allow_incomplete=allow,
        bad_values=settings.bad_values,
        checksum=settings.checksum,
        attrs=attrs,
        fresh=fresh,
        moved=moved,
        base_dir=manifest.base_dir,
        index_maps=index_maps,
        empty_nodes=empty,
        positions=positions,
        invalid=invalid,
        xrf=xrf,
    )


def _invalid_value(setting: str | int, dtype: np.dtype, p: ScanSettings) -> int | float | None:
    """The value that flags a bad pixel in frames of ``dtype`` (``[ingest] invalid_value``).

    ``'auto'``: the largest value of an unsigned integer dtype (Eiger and Pilatus write
    2^32 − 1, or 2^16 − 1 in 16-bit mode, into gaps and defective pixels); none for signed and
    float frames. A number that frames of ``dtype`` cannot hold flags nothing (logged).
    """
    if setting == "none":
        return None
    if setting == "auto":
        return int(np.iinfo(dtype).max) if dtype.kind == "u" else None
    value = int(setting)
    if dtype.kind in "ui" and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
        logger.warning(
            "%s: [ingest] invalid_value = %d cannot occur in %s frames (at most %d): no value is "
            "flagged; set the detector's invalid value, or 'auto'",
            _prefix(p),
            value,
            dtype,
            np.iinfo(dtype).max,
        )
        return None
    return float(value) if dtype.kind == "f" else value


def _xrf_source(p: ScanSettings) -> XrfSource | None:
    """How the particle's fluorescence is read (manifest ``xrf`` and its window keys)."""
    if p.xrf is None:
        return None
    cal = p.xrf_calibration
    return XrfSource(
        p.xrf,
        None if p.xrf_window_kev is None else tuple(p.xrf_window_kev),
        offset_kev=cal.offset_kev if cal else 0.0,
        gain_kev=cal.gain_kev if cal else None,
        energy_dataset=p.xrf_energy,
    )


def _check_traits(
    p: ScanSettings,
    infos: list[SourceInfo],
    detector_shape: tuple[int, int],
    xrf: XrfSource | None,
) -> None:
    """Check every angle file's mask dataset and fluorescence before anything is written."""
    for info in infos:
        for part in info.parts:  # every file of a split scan holds its share of the points
            try:
                if p.mask_dataset is not None and part is info.parts[0]:
                    read_pixel_mask(part.path, p.mask_dataset, detector_shape, check_only=True)
                n_xrf = None if xrf is None else probe_xrf(part.path, xrf, n_frames=part.n_points)
            except SourceError as exc:
                raise IngestError(f"{_prefix(p)}: {exc}") from None
            if n_xrf is not None and n_xrf < part.n_points:
                raise IngestError(
                    f"{_prefix(p)}: {part.path}:{xrf.dataset} (xrf) has {n_xrf} "
                    f"{'values' if xrf.is_map else 'spectra'} for {part.n_points} frames; fix "
                    "the file or remove `xrf`"
                )


def _traits_key(p: ScanSettings, invalid: int | float | None, xrf: XrfSource | None) -> str:
    """The settings of the detector traits and XRF that change what ingest writes."""
    return json.dumps(
        {
            "mask_dataset": p.mask_dataset,
            "invalid_value": invalid,
            "xrf": None if xrf is None else xrf.describe(),
        },
        sort_keys=True,
    )


def _files(info: SourceInfo) -> str:
    """'angle file X has' or 'angle files X + Y have' (for messages)."""
    if len(info.parts) == 1:
        return f"angle file {info.path} has"
    return f"angle files {info.describe()} have"
