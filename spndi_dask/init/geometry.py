"""NeXus-style geometry of a scan's files, with the unit conversions it needs."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from spndi_dask.init.files import _Particle
from spndi_dask.init.names import _matches


class _GeometryMixin:
    """The geometry methods of the per-scan inference (inference.py)."""

    # geometry -------------------------------------------------------------------------------------
    def geometry(self, p: _Particle) -> None:
        """Metadata geometry of one scan: ``p.geometry[key] = (value, source)``."""
        infos = [s.infos[0] for s in p.scans if s.infos and s.infos[0].kind == "hdf5"]
        if not infos:
            return
        det_group = p.entry.get("dataset", "").rsplit("/", 1)[0]

        def scalar(key: str, convert: Any) -> tuple[float, str] | None:
            per_file = []
            for info in infos:
                hits: dict[str, tuple[float, str]] = {}
                for d in info.datasets.values():
                    if d.value is not None and d.size == 1 and _matches(d.base, self.names[key]):
                        if key == "energy" and self.is_xrf_path(d.path):
                            continue
                        conv = convert(float(d.value[0]), d.units, d.base)
                        if conv is not None:
                            hits[d.path] = conv
                for k, v in info.attrs.items():
                    base = k.rsplit("@", 1)[-1].lower()
                    if (
                        isinstance(v, np.ndarray)
                        and v.size == 1
                        and _matches(base, self.names[key])
                    ):
                        conv = convert(float(v[0]), None, base)
                        if conv is not None:
                            hits[k] = conv
                per_file.append(hits)
            paths = set(per_file[0]).intersection(*per_file[1:])
            if not paths:
                return None

            def rank(path: str) -> tuple[bool, int, bool]:
                # the detector's own group first (for its keys), then the order of NAMES[key]
                base = re.split(r"[/@]", path)[-1].lower()
                order = next(i for i, n in enumerate(self.names[key]) if _matches(base, (n,)))
                near = bool(det_group) and path.startswith((det_group + "/", det_group + "@"))
                return (key != "energy" and not near, order, "@" in path)

            best = min(rank(pp) for pp in paths)
            pick = sorted(pp for pp in paths if rank(pp) == best)
            values = {pp: [h[pp][0] for h in per_file] for pp in paths}
            first = pick[0]
            flag = _GEOMETRY_FLAGS[key]
            if not all(np.allclose(values[pp], values[first], rtol=1e-4) for pp in pick):
                listing = ", ".join(f"{pp} = {values[pp][0]:.6g}" for pp in pick)
                self.problems.add(
                    f"scan '{p.name}': {len(pick)} different recorded {key.replace('_', ' ')}"
                    f" values ({listing}); pass {flag}"
                )
                return None
            for pp in sorted(paths - set(pick)):
                if not np.allclose(values[pp], values[first], rtol=1e-3):
                    self.guess(
                        f"scan '{p.name}': {key.replace('_', ' ')} from {first} "
                        f"({values[first][0]:.6g}), not {pp} ({values[pp][0]:.6g}); {flag} "
                        "overrides"
                    )
            vals = np.array(values[first])
            if not np.allclose(vals, vals[0], rtol=1e-4):
                listing = ", ".join(
                    f"{i.rel}: {v:.6g}" for i, v in list(zip(infos, vals, strict=True))[:4]
                )
                self.problems.add(
                    f"scan '{p.name}': {first} differs between its files ({listing}); pass "
                    f"{_GEOMETRY_FLAGS[key]}"
                )
                return None
            note = per_file[0][first][1]
            if "assumed" in note:
                self.guess(
                    f"scan '{p.name}': {first}{note}; {flag} overrides (or a units "
                    "attribute in the files)"
                )
            value = float(np.median(vals))
            if note:  # converted: 350 mm -> 0.35 m, not 0.35000000000000003
                value = float(f"{value:.12g}")
            return value, f"recorded {first}{note}"

        got: dict[str, tuple[float, str] | None] = {
            "energy": scalar("energy", _energy_kev),
            "distance": scalar("distance", _length_m),
            "pixel_size": scalar("pixel_size", _length_m),
            "x_pixel_size": scalar("x_pixel_size", _length_m),
            "y_pixel_size": scalar("y_pixel_size", _length_m),
            "gamma": scalar("gamma", _angle_deg),
            "delta": scalar("delta", _angle_deg),
        }
        if got["energy"]:
            p.geometry["energy_kev"] = got["energy"]
        if got["distance"]:
            p.geometry["detector_distance_m"] = got["distance"]
        px, py = got["x_pixel_size"], got["y_pixel_size"]
        if px and py and not np.isclose(px[0], py[0], rtol=1e-3):
            self.problems.add(
                f"scan '{p.name}': pixels are not square (x {px[0]:.4g} m, y {py[0]:.4g} m); "
                "spndi needs square pixels: pass --pixel-size-m if one of them is wrong"
            )
        elif px or py or got["pixel_size"]:
            p.geometry["pixel_size_m"] = px or py or got["pixel_size"]  # type: ignore[assignment]
        for key, axis in (("gamma", "gamma_deg"), ("delta", "delta_deg")):
            if got[key]:
                value, src = got[key]  # type: ignore[misc]
                p.geometry[axis] = (value, src + " (check spndi's convention, README: Geometry)")
        saturation = scalar("saturation", lambda v, u, b: (v, ""))
        if saturation:
            p.entry["_saturation"] = saturation
        pixel = p.geometry.get("pixel_size_m", (self.options.pixel_size_m, ""))[0]
        bx = scalar("beam_center_x", lambda v, u, b: _pixels(v, u, pixel))
        by = scalar("beam_center_y", lambda v, u, b: _pixels(v, u, pixel))
        if bx and by:
            where = f"{by[1]}, {bx[1].removeprefix('recorded ')}"
            p.geometry["beam_center"] = ([by[0], bx[0]], f"{where} (row = y, col = x)")


_GEOMETRY_FLAGS = {
    "energy": "--energy-kev",
    "distance": "--distance-m",
    "pixel_size": "--pixel-size-m",
    "x_pixel_size": "--pixel-size-m",
    "y_pixel_size": "--pixel-size-m",
    "gamma": "--gamma-deg",
    "delta": "--delta-deg",
    "beam_center_x": "--beam-center R,C",
    "beam_center_y": "--beam-center R,C",
    "scan_shape": "--scan-shape R,C",
    "scan_step": "--step Y,X",
    "saturation": "--saturation COUNTS",
}


def _unit(u: str | None) -> str:
    return (u or "").strip().lower().replace("µ", "u").replace("μ", "u")


def _length_unit(u: str | None) -> str | None:
    u = _unit(u)
    table = {"um": "um", "micron": "um", "microns": "um", "micrometer": "um",
             "micrometre": "um", "nm": "nm", "nanometer": "nm", "mm": "mm", "millimeter": "mm",
             "m": "m", "meter": "m", "metre": "m"}  # fmt: skip
    return table.get(u, u) if u else None


def _energy_kev(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _unit(units)
    if u == "kev" or name.endswith("_kev"):
        return v, ""
    if u == "ev":
        return v / 1000.0, f" ({v:g} eV)"
    if u:
        return None  # not an energy we know
    if v > 100:
        return v / 1000.0, f" ({v:g}, no units: eV assumed)"
    return v, " (no units: keV assumed)"


def _length_m(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _length_unit(units)
    scale = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "nm": 1e-9}
    if u in scale:
        return v * scale[u], "" if u == "m" else f" ({v:g} {u})"
    if name.endswith("_m"):
        return v, ""
    if u:
        return None
    if "pixel" in name:  # 55e-6 m, 0.055 mm or 55 µm
        if v < 1e-3:
            return v, " (no units: m assumed)"
        if v < 1:
            return v * 1e-3, f" ({v:g}, no units: mm assumed)"
        return v * 1e-6, f" ({v:g}, no units: µm assumed)"
    if v > 20:
        return v * 1e-3, f" ({v:g}, no units: mm assumed)"
    return v, " (no units: m assumed)"


def _angle_deg(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _unit(units)
    if u in ("rad", "radian", "radians"):
        return float(np.degrees(v)), f" ({v:g} rad)"
    if u in ("", "deg", "degree", "degrees"):
        return v, ""
    return None


def _pixels(v: float, units: str | None, pixel_m: float | None) -> tuple[float, str] | None:
    u = _length_unit(units)
    if u in (None, "pixel", "pixels", "px"):
        return v, ""
    scale = {"m": 1.0, "mm": 1e-3, "um": 1e-6}
    if u in scale and pixel_m:
        return v * scale[u] / pixel_m, f" ({v:g} {u} / pixel size)"
    return None


def _round(v: float) -> float:
    """``v`` to 10 significant digits (position medians carry float noise)."""
    return float(f"{v:.10g}")


def _nice_step(v: float, n: int) -> float:
    """An inferred step with the fewest significant digits that stay within 1/10 step over
    ``n`` steps, less than the jitter of fly scans (``0.0500131`` over 200 points is ``0.05``)."""
    for digits in (2, 3, 4, 5, 6):
        r = float(f"{v:.{digits}g}")
        if abs(r - v) * n <= 0.1 * v:
            return r
    return _round(v)


def _round_angle(v: float) -> float:
    """A recorded angle as written: the shortest text that reads back as its float32 or float64."""
    f32 = float(np.float32(v))
    return float(str(np.float32(v))) if f32 == v else float(v)
