"""The commented manifest text, and :func:`init_manifest`, the entry point."""

from __future__ import annotations

import datetime
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from spndi_dask.init.files import (
    _GENERIC_DIRS,
    HDF5_SUFFIXES,
    _assign_scans,
    _discover,
    _natural,
    _Particle,
    _shape,
)
from spndi_dask.init.inference import _Inference
from spndi_dask.init.names import _ROCKING_AXES
from spndi_dask.init.options import InitError, InitOptions
from spndi_dask.init.report import InitResult, ScanFound

logger = logging.getLogger("spndi_dask.init")


# -- the manifest text -----------------------------------------------------------------------------
def _line(key: str, value: Any, comment: str = "") -> str:
    from spndi_dask.config._toml import toml_value

    text = f"{key} = {toml_value(value)}"
    return f"{text.ljust(43)} # {comment}" if comment else text


def _array_lines(key: str, items: list[Any], comments: list[str], head: str) -> list[str]:
    from spndi_dask.config._toml import toml_value

    lines = [f"{(key + ' = [').ljust(43)} # {head}"]
    for item, comment in zip(items, comments, strict=True):
        text = f"    {toml_value(item)},"
        lines.append(f"{text.ljust(43)} # {comment}" if comment else text)
    return [*lines, "]"]


def _template(files: list[str]) -> str | None:
    """A ``{index:0Nd}`` template that spells ``files`` in order (0, 1, ...), if there is one."""
    first = files[0]
    for m in reversed(list(re.finditer(r"\d+", first))):
        if int(m.group()) != 0:
            continue
        width = len(m.group())
        spec = f"{{index:0{width}d}}" if width > 1 else "{index}"
        template = first[: m.start()] + spec + first[m.end() :]
        if "{" in first or "}" in first:
            return None
        if all(template.format(index=i) == f for i, f in enumerate(files)):
            return template
    return None


def _toml(
    inf: _Inference,
    entries: list[_Particle],
    geometry: dict[str, tuple[Any, str]],
    reduce: dict[str, tuple[Any, str]],
    name: str,
    name_src: str,
) -> str:
    from spndi_dask._version import __version__
    from spndi_dask.config._toml import toml_value
    from spndi_dask.config.manifest import MANIFEST_VERSION

    when = datetime.date.today().isoformat()
    lines = [
        f"# Beamtime manifest written by `spndi init {inf.raw}` (spndi_dask {__version__}, "
        f"{when}).",
        "# Each value says where it came from. Check the guesses spndi init printed, then:",
        "#     spndi run <this file>",
        _line("manifest_version", MANIFEST_VERSION),
        _line("name", name, name_src),
        _line("output", inf.options.results, "results folder, relative to this file"),
        "",
        f"{'[geometry]'.ljust(43)} # every scan (a scan may override keys)",
    ]
    for key, (value, src) in geometry.items():
        lines.append(_line(key, value, src))
    if reduce:
        lines += ["", f"{'[reduce]'.ljust(43)} # other settings: defaults (README: The manifest)"]
        lines += [_line(key, value, src) for key, (value, src) in reduce.items()]
    for p in entries:
        e, c = p.entry, p.comments
        lines += ["", "[[scans]]", _line("name", p.name, p.where)]
        files = [[inf.rel(f) for f in s.files] for s in p.scans]
        singles = [f[0] for f in files if len(f) == 1]
        template = _template(singles) if len(singles) == len(files) else None
        labels = []
        for s in p.scans:
            angle = f"angle {s.angle:g}, " if s.angle is not None else ""
            labels.append(
                f"{angle}{s.n_points} points"
                + (f", {len(s.files)} files" if len(s.files) > 1 else "")
            )
        order = e.get("_order", "")
        if template:
            lines.append(_line("frames", template, f"{len(files)} angle files in {order} order"))
        else:
            items = [f[0] if len(f) == 1 else f for f in files]
            lines += _array_lines("frames", items, labels, f"one entry per angle, {order} order")
        for key in ("dataset", "monitor", "xrf", "xrf_window_kev", "xrf_calibration",
                    "xrf_energy", "mask_dataset", "positions"):  # fmt: skip
            if key in e:
                lines.append(_line(key, e[key], c.get(key, "")))
        angles = e["angles_deg"]
        if isinstance(angles, list):
            rows = [angles[i : i + 6] for i in range(0, len(angles), 6)]
            lines.append(f"{'angles_deg = ['.ljust(43)} # {c['angles_deg']}")
            lines += ["    " + ", ".join(map(toml_value, row)) + "," for row in rows]
            lines.append("]")
        else:
            lines.append(_line("angles_deg", angles, c["angles_deg"]))
        lines.append(_line("scan_shape", e["scan_shape"], c["scan_shape"]))
        lines.append(_line("scan_step_um", e["scan_step_um"], "µm, [row (y), column (x)]"))
        order_note = (
            "irrelevant with positions (each frame goes to its nearest grid node)"
            if "positions" in e
            else ("--scan-order" if inf.options.scan_order else "check: raster assumed")
        )
        lines.append(_line("scan_order", e["scan_order"], order_note))
        if e.get("allow_incomplete"):
            lines.append(_line("allow_incomplete", True, c["allow_incomplete"]))
        own = {k: v for k, v in p.geometry.items() if k not in geometry}
        if own:
            lines.append("[scans.geometry]")
            lines += [_line(k, v, src) for k, (v, src) in own.items()]
    return "\n".join(lines) + "\n"


# -- the entry point -----------------------------------------------------------------------------
def init_manifest(
    raw_dir: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] = "beamtime.toml",
    options: InitOptions | None = None,
    force: bool = False,
) -> InitResult:
    """Inspect a folder of raw scan files and compose its beamtime manifest.

    Parameters
    ----------
    raw_dir : path
        The folder of per-angle HDF5 files or TIFF stacks (in sub-folders per scan, or
        grouped with ``options.group``).
    manifest : path
        Where the manifest will be written (paths in it are relative to its folder); nothing is
        written here: call :meth:`InitResult.write`.
    options : InitOptions, optional
        What to use instead of finding it (the flags of ``spndi init``).
    force : bool
        Allow ``manifest`` to exist already (it is replaced by :meth:`InitResult.write`).

    Returns
    -------
    InitResult
        The manifest text (validated: :func:`~spndi_dask.config.load_manifest` reads it
        unchanged), its validated :class:`~spndi_dask.config.Manifest` and the
        :class:`InitReport`.

    Raises
    ------
    InitError
        Every problem found at once: unreadable files, ambiguous or missing datasets, angles,
        scan grids and geometry, each with the flag that settles it.
    """
    from spndi_dask.config import Manifest, ManifestError

    options = options or InitOptions()
    raw = Path(raw_dir).expanduser().resolve()
    path = Path(manifest).expanduser().absolute()
    if not raw.is_dir():
        raise InitError(f"{raw_dir} is not a folder; give the folder of the raw scan files")
    if path.exists() and not force:
        raise InitError(f"{path} exists; pass --force to replace it, or -o another file name")
    inf = _Inference(raw, path.parent.resolve(), options)
    results = (path.parent / options.results).resolve()
    if options.rocking_axis is not None and options.rocking_axis not in _ROCKING_AXES:
        inf.problems.add(
            f"--rocking-axis {options.rocking_axis!r}: use one of {', '.join(_ROCKING_AXES)}"
        )
    outputs = {"raw.zarr", "results.zarr", "analysis.zarr", "logs", "report", ".tmp"}
    is_output = results.is_dir() and any((results / name).exists() for name in outputs)
    scans = _discover(raw, options, {results} if is_output else set(), inf.report)
    if not scans:
        raise InitError(
            f"{raw} holds no HDF5 ({', '.join(HDF5_SUFFIXES)}) or TIFF angle files"
            + (" (" + "; ".join(inf.report.skipped) + ")" if inf.report.skipped else "")
        )
    frame_dirs = {f.parent.resolve() for scan in scans for f in scan.files}
    if results == raw or results in frame_dirs:
        inf.problems.add(
            f"the results folder {results} would be "
            + ("RAW_DIR itself" if results == raw else "a folder of frame files")
            + ": spndi writes and replaces raw.zarr, results.zarr, figures/ ... there; pass "
            "--results DIR (relative to the manifest), or -o a manifest elsewhere"
        )
    grouped = _assign_scans(raw, scans, options, inf.problems, inf.report)
    inf.read_files(grouped)
    entries: list[_Particle] = []
    for pname in sorted(grouped, key=_natural):
        group = grouped[pname]
        p = _Particle(pname, group[0].where, group)
        p.found = ScanFound(pname, p.where, len(group), sum(len(s.files) for s in group))
        entries.append(p)
        inf.detector(p)  # the readable files at least: one bad file never hides another's problem
        if any(len(s.infos) != len(s.files) for s in group):  # unreadable files: listed already
            p.broken = True
        if p.broken:
            continue
        inf.frames_path = p.entry.get("dataset")
        inf.angles(p)
        inf.monitor(p)
        inf.xrf(p)
        inf.mask(p)
        inf.grid(p)
        inf.geometry(p)
        found = p.found
        found.scan_order = p.entry.get("scan_order", "")
        shape, dtype = p.entry["_detector"]
        found.detector = f"{p.entry.get('dataset', 'TIFF pages')} {_shape(shape)} {dtype}"
        for key in ("monitor", "xrf", "xrf_energy", "mask_dataset"):
            label = "mask" if key == "mask_dataset" else key
            found.datasets[label] = p.entry.get(key, "none found" if key != "xrf_energy" else "")
        if "positions" in p.entry:
            pos = p.entry["positions"]
            found.datasets["positions"] = f"{pos['y']}, {pos['x']} ({pos['units']})"
        else:
            found.datasets["positions"] = "none found"
        found.datasets = {k: v for k, v in found.datasets.items() if v}
        inf.report.scans.append(found)
    geometry = _merge_geometry(inf, entries)
    reduce = _reduce_settings(inf, entries)
    if inf.problems:
        n = len(inf.problems.lines)
        raise InitError(
            f"spndi init {raw}: {n} problem{'s' if n > 1 else ''}; nothing written:\n"
            + "\n".join(f"  - {line}" for line in inf.problems.lines)
        )
    name, name_src = _beamtime_name(raw, options)
    text = _toml(inf, entries, geometry, reduce, name, name_src)
    try:
        data = tomllib.loads(text)
        validated = Manifest.from_dict(data, base_dir=path.parent, source=str(path))
    except (tomllib.TOMLDecodeError, ManifestError) as exc:
        raise InitError(f"the manifest spndi init composed is not valid:\n{exc}") from None
    inf.report.geometry = {k: f"{v}  ({src})" for k, (v, src) in geometry.items()}
    logger.debug(
        "%s: %d scans, %d angle files", raw, len(entries), sum(len(p.scans) for p in entries)
    )
    return InitResult(text, path, inf.report, validated)


def _reduce_settings(inf: _Inference, entries: list[_Particle]) -> dict[str, tuple[Any, str]]:
    """``[reduce]``: the detector's saturation level, from ``--saturation`` or the files."""
    if inf.options.saturation is not None:
        return {"saturation": (float(inf.options.saturation), "--saturation")}
    recorded = {p.name: p.entry["_saturation"] for p in entries if "_saturation" in p.entry}
    values = {v for v, _ in recorded.values()}
    if len(values) == 1 and len(recorded) == len(entries):
        value, src = next(iter(recorded.values()))
        return {"saturation": (float(value), f"counts at which pixels saturate: {src}")}
    if recorded:
        listing = ", ".join(f"{name} {v:g}" for name, (v, _) in recorded.items())
        inf.guess(
            f"the recorded saturation level is not the same for every scan ({listing}); "
            "[reduce] saturation left at its default (the dtype maximum): --saturation COUNTS"
        )
    return {}


def _beamtime_name(raw: Path, options: InitOptions) -> tuple[str, str]:
    if options.name:
        return options.name, "--name"
    folder = raw.parent if raw.name.lower() in _GENERIC_DIRS and raw.parent != raw else raw
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name).strip("_") or "beamtime"
    return name, f"the folder name {folder.name!r} (--name)"


def _merge_geometry(inf: _Inference, entries: list[_Particle]) -> dict[str, tuple[Any, str]]:
    """``[geometry]``: the flags, else values every scan's metadata agrees on.

    A value that differs between scans stays in their ``[scans.geometry]``; a key found
    nowhere is a problem naming its flag.
    """
    opt = inf.options
    flags: dict[str, tuple[Any, str]] = {}
    for key, value, flag in (
        ("energy_kev", opt.energy_kev, "--energy-kev"),
        ("detector_distance_m", opt.distance_m, "--distance-m"),
        ("pixel_size_m", opt.pixel_size_m, "--pixel-size-m"),
        ("beam_center", list(opt.beam_center) if opt.beam_center else None, "--beam-center"),
        ("gamma_deg", opt.gamma_deg, "--gamma-deg"),
        ("delta_deg", opt.delta_deg, "--delta-deg"),
    ):
        if value is not None:
            flags[key] = (value, flag)
    live = [p for p in entries if not p.broken]
    geometry: dict[str, tuple[Any, str]] = {}
    missing = []
    for key, flag in (
        ("energy_kev", "--energy-kev KEV"),
        ("detector_distance_m", "--distance-m M"),
        ("pixel_size_m", "--pixel-size-m M"),
        ("beam_center", "--beam-center ROW,COL"),
        ("gamma_deg", "--gamma-deg DEG"),
        ("delta_deg", "--delta-deg DEG"),
    ):
        if key in flags:
            geometry[key] = flags[key]
            recorded = {p.name: p.geometry[key] for p in live if key in p.geometry}
            for pname, (value, src) in recorded.items():
                if not np.allclose(value, flags[key][0], rtol=1e-3):
                    inf.guess(
                        f"{flags[key][1]} {flags[key][0]} differs from {value} {src[9:]} of "
                        f"scan '{pname}'; the flag wins"
                    )
            for p in live:
                p.geometry.pop(key, None)
            continue
        values = [p.geometry.get(key) for p in live]
        if live and all(v is not None for v in values):
            first = values[0]
            if all(np.allclose(v[0], first[0], rtol=1e-4) for v in values):  # type: ignore[index]
                geometry[key] = first  # type: ignore[assignment]
                for p in live:
                    p.geometry.pop(key, None)
            continue  # else: per scan
        if any(v is not None for v in values):
            lacking = [p.name for p, v in zip(live, values, strict=True) if v is None]
            missing.append(f"{flag} (not recorded for {', '.join(lacking)})")
        elif live:
            missing.append(flag)
    if missing:
        inf.problems.add(
            "geometry not recorded in the files (looked for NeXus-style <detector>/x_pixel_size, "
            "distance, beam_center_x/y, monochromator/energy and attributes like energy_kev): "
            f"pass {', '.join(missing)} (gamma = detector arm yaw about +y, delta = elevation "
            "about -x, 0 0 for a detector on the beam axis; README: Geometry)"
        )
    axis = opt.rocking_axis or "y+"
    geometry["rocking_axis"] = (
        axis,
        "--rocking-axis" if opt.rocking_axis else "default: sample rotation axis (--rocking-axis)",
    )
    if not opt.rocking_axis and live:
        inf.guess(
            "rocking axis y+ (vertical, the default): pass --rocking-axis if the sample rocks "
            "about another lab axis"
        )
    return geometry
