"""The scan grid: :func:`infer_grid` from recorded positions, and per scan."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from spndi_dask.init.files import _Particle, _Scan
from spndi_dask.init.geometry import _length_unit, _nice_step, _round
from spndi_dask.init.names import _matches


# -- the scan grid from recorded positions -------------------------------------------------------
@dataclass(frozen=True)
class GridFit:
    """A scan grid inferred from recorded positions (see :func:`infer_grid`).

    Attributes
    ----------
    shape : (int, int)
        Grid nodes along y (rows) and x (columns).
    step : (float, float)
        Node spacing along y and x, in the positions' units.
    order : {'raster', 'snake'}
        Whether consecutive lines run the same way or alternate.
    fast_axis : {'x', 'y'}
        The axis that moves point to point.
    n_points, on_grid : int
        Recorded points, and those within half a step of a node of the grid.
    """

    shape: tuple[int, int]
    step: tuple[float, float]
    order: Literal["raster", "snake"]
    fast_axis: Literal["x", "y"]
    n_points: int
    on_grid: int


def _lattice(v: np.ndarray, s0: float) -> tuple[float, float]:
    """Spacing near ``s0`` and offset of the lattice ``offset + k·spacing`` that best fit ``v``.

    The phase coherence ``|mean exp(2πi v/s)|`` peaks at the true spacing; searched within ±3 %
    of ``s0`` finely enough that the phase error across the whole span stays below 1/50 period.
    """
    v = np.asarray(v, dtype=float)
    if v.size > 2000:  # enough to find the lattice: the least-squares fit refines it
        v = v[np.linspace(0, v.size - 1, 2000).astype(int)]
    centre = float(np.median(v))
    w = v - centre
    periods = max(float(np.ptp(w)) / s0, 1.0)
    n = int(min(6001, max(61, 2 * 0.03 * periods / 0.02)))
    best_s, best_c = s0, -1.0
    for chunk in np.array_split(s0 * (1 + np.linspace(-0.03, 0.03, n)), max(1, n // 100)):
        c = np.abs(np.exp(2j * np.pi * w[None, :] / chunk[:, None]).mean(axis=1))
        i = int(np.argmax(c))
        if c[i] > best_c:
            best_s, best_c = float(chunk[i]), float(c[i])
    phase = float(np.angle(np.exp(2j * np.pi * w / best_s).mean())) / (2 * np.pi)
    return best_s, centre + phase * best_s


def infer_grid(y: Any, x: Any) -> GridFit:
    """The scan grid that recorded positions were taken on.

    The fast axis is the one that keeps moving the same way from point to point. Lines are
    the runs between reversals (snake) or fly-backs (raster) of the fast axis; the slow step is
    the spacing of the lines' median slow positions, the fast step that of consecutive points,
    both refined to the lattice that fits all positions best. A fast-axis node belongs to the
    grid when at least 90 % of the lines pass it (overshoot at the turning points of a snake
    reaches only every other line). Robust to position jitter up to about 0.15 step and to
    missing points.

    Parameters
    ----------
    y, x : array_like
        Slow- and fast-axis (or fast and slow) positions of every point, in acquisition order.

    Returns
    -------
    GridFit

    Raises
    ------
    ValueError
        Too few points, no line structure, or irregular line spacing (the message says which).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rows, cols = np.mgrid[0:6, 0:8].astype(float)
    >>> cols[1::2] = cols[1::2, ::-1]  # snake
    >>> y = 0.2 * rows.ravel() + rng.normal(0, 0.02, 48)
    >>> x = 0.1 * cols.ravel() + rng.normal(0, 0.015, 48)
    >>> fit = infer_grid(y, x)
    >>> fit.shape, [round(s, 2) for s in fit.step], fit.order, fit.fast_axis
    ((6, 8), [0.2, 0.1], 'snake', 'x')
    """
    y = np.asarray(y, dtype=float).reshape(-1)
    x = np.asarray(x, dtype=float).reshape(-1)
    if y.shape != x.shape:
        raise ValueError(f"y has {y.size} positions, x {x.size}")
    keep = np.isfinite(y) & np.isfinite(x)
    y, x = y[keep], x[keep]
    n = y.size
    if n < 4:
        raise ValueError(f"only {n} finite positions")

    def persistence(v: np.ndarray) -> float:
        s = np.sign(np.diff(v))
        return float(np.mean((s[1:] == s[:-1]) & (s[1:] != 0)))

    py, px = persistence(y), persistence(x)
    if max(px, py) < 0.5:
        raise ValueError("neither axis keeps moving the same way from point to point (no lines)")
    fast_axis: Literal["x", "y"] = "x" if px >= py else "y"
    f, s = (x, y) if fast_axis == "x" else (y, x)
    d = np.diff(f)
    sign = np.sign(d)
    steady = np.r_[False, (sign[1:] == sign[:-1]) & (sign[1:] != 0)]
    step_f = float(np.median(np.abs(d[steady])))
    if not step_f > 0:
        raise ValueError("the fast axis does not move")
    # line breaks: between two confident moves of opposite direction, at the pair least like a
    # step along a line: no fast move (snake turn) or a fly-back (raster), and a slow jump
    confident = np.flatnonzero(np.abs(d) > 0.5 * step_f)
    reversals = [(a, b) for a, b in itertools.pairwise(confident) if sign[a] != sign[b]]
    odd_move = np.abs(np.abs(d) / step_f - 1)
    ds = np.abs(np.diff(s))

    def split(score: np.ndarray) -> list[np.ndarray]:
        breaks = sorted({int(a + np.argmax(score[a : b + 1])) for a, b in reversals})
        edges = [0, *(b + 1 for b in breaks), n]
        return [np.arange(lo, hi) for lo, hi in itertools.pairwise(edges) if hi - lo >= 2]

    lines = split(odd_move)
    if len(lines) >= 2:  # again, with the slow jump between lines as further evidence
        step_s0 = float(np.median(np.abs(np.diff([np.median(s[ln]) for ln in lines]))))
        if step_s0 > 0:
            lines = split(odd_move + ds / step_s0)
    if len(lines) < 2:
        raise ValueError("the positions form a single line; the slow step is unknown")
    centres = np.array([np.median(s[ln]) for ln in lines])
    gaps = np.abs(np.diff(centres))
    step_s0 = float(np.median(gaps))
    if not step_s0 > 0 or np.any(gaps < 0.5 * step_s0) or np.any(gaps > 1.5 * step_s0):
        odd = np.flatnonzero((gaps < 0.5 * step_s0) | (gaps > 1.5 * step_s0))[:3]
        raise ValueError(
            f"irregular line spacing: lines {', '.join(str(i) for i in odd)} are "
            f"{', '.join(f'{gaps[i]:.4g}' for i in odd)} from the next, the median is {step_s0:.4g}"
        )
    if not (np.all(np.diff(centres) > 0) or np.all(np.diff(centres) < 0)):
        raise ValueError("the lines do not advance steadily along the slow axis")
    # consecutive lines are consecutive rows (spacing checked): a straight-line fit
    n_lines = len(lines)
    slope, off_s = np.polyfit(np.arange(n_lines), centres, 1)
    step_s = abs(float(slope))
    step_f, off_f = _lattice(f, step_f)
    j = np.round((f - off_f) / step_f).astype(int)
    near = np.abs(f - off_f - j * step_f) <= 0.5 * step_f
    if np.unique(j[near]).size >= 2:  # refine: least squares over every point on a node
        step_f, off_f = (float(v) for v in np.polyfit(j[near], f[near], 1))
        j = np.round((f - off_f) / step_f).astype(int)
    hits: Counter[int] = Counter()
    for ln in lines:
        hits.update(set(j[ln].tolist()))
    nodes = sorted(c for c, h in hits.items() if h >= 0.9 * len(lines))
    if not nodes:
        raise ValueError("no fast-axis position is passed by most lines")
    j0, j1 = nodes[0], nodes[-1]
    n_nodes = j1 - j0 + 1
    direction = np.array([np.sign(np.median(np.diff(f[ln]))) for ln in lines])
    alternate = float(np.mean(direction[1:] != direction[:-1]))
    order: Literal["raster", "snake"] = "snake" if alternate > 0.5 else "raster"
    on_fast = (j >= j0) & (j <= j1) & (np.abs(f - off_f - j * step_f) <= 0.5 * step_f)
    slow_node = np.round((s - off_s) / slope)
    on_slow = (slow_node >= 0) & (slow_node < n_lines)
    on_slow &= np.abs(s - off_s - slow_node * slope) <= 0.5 * step_s
    on_grid = int(np.sum(on_fast & on_slow))
    if fast_axis == "x":
        shape, step = (n_lines, n_nodes), (step_s, step_f)
    else:
        shape, step = (n_nodes, n_lines), (step_f, step_s)
    return GridFit(shape, (float(step[0]), float(step[1])), order, fast_axis, n, on_grid)


class _GridMixin:
    """The scan-grid methods of the per-scan inference (inference.py)."""

    # the scan grid --------------------------------------------------------------------------------
    def grid(self, p: _Particle) -> None:
        """``scan_shape``, ``scan_step_um``, ``scan_order`` (and ``positions``) of ``p``.

        Checked whatever else went wrong with the scan, except the positions themselves.
        """
        opt = self.options
        before = len(self.problems.lines)
        positions = self.positions(p)
        if positions:
            y, x = positions
            units = self.position_units(p, positions)
            if units is not None:
                p.entry["positions"] = {"y": y, "x": x, "units": units}
                p.comments["positions"] = (
                    "recorded per-point positions (--positions)"
                    if opt.positions
                    else "recorded per-point positions (found by name)"
                )
        if len(self.problems.lines) > before:  # the positions are wrong: nothing to check
            return
        if opt.scan_shape and opt.step_um:
            self.set_grid(p, opt.scan_shape, opt.step_um, "--scan-shape, --step")
            p.entry["scan_order"] = opt.scan_order or "raster"
            self.check_points(p)
            return
        if "positions" in p.entry:
            self.grid_from_positions(p)
            return
        shape, shape_src = self.metadata_shape(p)
        step, step_src = self.metadata_step(p)
        if opt.scan_shape:
            shape, shape_src = opt.scan_shape, "--scan-shape"
        if opt.step_um:
            step, step_src = opt.step_um, "--step"
        missing = [f for f, v in (("--scan-shape R,C", shape), ("--step Y,X", step)) if v is None]
        if missing:
            self.problems.add(
                f"scan '{p.name}': no recorded positions (looked for pairs "
                f"{', '.join(f'{a}/{b}' for a, b in self.pairs[:5])}, ...) and no scan "
                f"{'shape' if shape is None else 'step'} in the files; pass {' and '.join(missing)}"
                " (or --positions Y_PATH,X_PATH)"
            )
            p.broken = True
            return
        self.set_grid(p, shape, step, f"{shape_src}; step {step_src}")  # type: ignore[arg-type]
        if opt.scan_order:
            p.entry["scan_order"] = opt.scan_order
        else:
            p.entry["scan_order"] = "raster"
            self.guess(
                f"scan '{p.name}': raster order (row by row, same direction) assumed: no "
                "positions recorded; pass --scan-order snake if every other row runs backwards"
            )
        self.check_points(p)

    def set_grid(self, p: _Particle, shape: Sequence[int], step: Sequence[float], src: str) -> None:
        p.entry["scan_shape"] = [int(shape[0]), int(shape[1])]
        p.entry["scan_step_um"] = [_round(float(step[0])), _round(float(step[1]))]
        p.comments["scan_shape"] = src
        p.found.scan_shape = (int(shape[0]), int(shape[1]))  # type: ignore[union-attr]
        p.found.step_um = tuple(p.entry["scan_step_um"])  # type: ignore[union-attr]
        p.found.grid_source = src  # type: ignore[union-attr]

    def check_points(self, p: _Particle) -> None:
        if "positions" in p.entry:
            return
        rows, cols = p.entry["scan_shape"]
        need = rows * cols
        short = [s for s in p.scans if s.n_points < need]
        long = [s for s in p.scans if s.n_points > need]
        for s in long:
            self.problems.add(
                f"{s.label}: {s.n_points} frames, more than scan_shape {rows}×{cols} = {need}; "
                "pass the right --scan-shape R,C"
            )
            p.broken = True
        if short and not self.options.allow_incomplete:
            listing = ", ".join(f"{s.label} ({s.n_points})" for s in short[:4])
            self.problems.add(
                f"scan '{p.name}': angle files with fewer frames than scan_shape {rows}×{cols} = "
                f"{need}: {listing}; pass the right --scan-shape R,C, or --allow-incomplete if "
                "they were aborted (missing points are filled and marked invalid)"
            )
            p.broken = True
        elif short:
            p.entry["allow_incomplete"] = True
            p.comments["allow_incomplete"] = (
                f"--allow-incomplete: {len(short)} angle file(s) have fewer than {need} frames"
            )

    def metadata_shape(self, p: _Particle) -> tuple[tuple[int, int] | None, str]:
        dims = {s.scan_dims for s in p.scans}
        if None not in dims:
            if len(dims) > 1:
                self.problems.add(
                    f"scan '{p.name}': its angle files have different scan shapes "
                    f"({', '.join(map(str, sorted(dims)))}) in their 4-D frames; pass "
                    "--scan-shape R,C or leave the odd angle files out with --exclude"
                )
                p.broken = True
                return None, ""
            return next(iter(dims)), "the scan axes of the 4-D frames"  # type: ignore[return-value]
        found = self.metadata_value(p, "scan_shape", size=2)
        if found is None:
            return None, ""
        value, where = found
        return (int(value[0]), int(value[1])), f"recorded {where}"

    def metadata_step(self, p: _Particle) -> tuple[tuple[float, float] | None, str]:
        found = self.metadata_value(p, "scan_step", size=2)
        if found is None:
            return None, ""
        value, where = found
        return (float(value[0]), float(value[1])), f"recorded {where}"

    def metadata_value(self, p: _Particle, key: str, size: int) -> tuple[np.ndarray, str] | None:
        """A small value named like ``NAMES[key]`` in every file, identical everywhere."""
        per_scan = []
        for scan in p.scans:
            info = scan.infos[0]
            if info.kind != "hdf5":
                return None
            hits = {}
            for k, v in info.attrs.items():
                if (
                    isinstance(v, np.ndarray)
                    and v.size == size
                    and _matches(k.rsplit("@", 1)[-1], self.names[key])
                ):
                    hits[k] = v
            for d in info.datasets.values():
                if (
                    d.value is not None
                    and d.value.size == size
                    and _matches(d.base, self.names[key])
                ):
                    hits[d.path] = d.value
            per_scan.append(hits)
        common = set(per_scan[0]).intersection(*per_scan[1:]) if per_scan else set()
        for path in sorted(common):
            values = [h[path] for h in per_scan]
            if all(np.allclose(v, values[0]) for v in values):
                return values[0], path
            listing = ", ".join(
                f"{s.label}: {v.tolist()}" for s, v in list(zip(p.scans, values, strict=True))[:4]
            )
            self.problems.add(
                f"scan '{p.name}': inconsistent {path} between its files ({listing}); pass "
                f"--scan-shape R,C --step Y,X, or leave the odd angle files out with --exclude"
            )
            p.broken = True
            return None
        return None

    def position_units(self, p: _Particle, paths: tuple[str, str]) -> str | None:
        if self.options.positions_units:
            return self.options.positions_units
        units = set()
        for scan in p.scans:
            for info in scan.infos:
                for path in paths:
                    d = info.datasets.get(path)
                    if d is not None:
                        units.add(_length_unit(d.units))
        units.discard(None)
        known = {u for u in units if u in ("um", "nm", "mm")}
        if len(units) > 1 or units - known:
            self.problems.add(
                f"scan '{p.name}': positions {paths[0]}, {paths[1]} have units "
                f"{sorted(map(str, units))}; the manifest reads um, nm or mm: pass "
                "--positions-units um|nm|mm"
            )
            p.broken = True
            return None
        if not units:
            self.guess(
                f"scan '{p.name}': positions {paths[0]}, {paths[1]} have no units attribute; "
                "µm assumed (--positions-units um|nm|mm)"
            )
            return "um"
        return units.pop()

    def grid_from_positions(self, p: _Particle) -> None:
        paths = (p.entry["positions"]["y"], p.entry["positions"]["x"])
        scale = {"um": 1.0, "nm": 1e-3, "mm": 1e3}[p.entry["positions"]["units"]]
        fits: list[tuple[_Scan, GridFit]] = []
        failed = False
        for scan in p.scans:
            try:
                y, x = self.read_positions(scan, paths)
                fits.append((scan, infer_grid(y * scale, x * scale)))
            except (OSError, ValueError, KeyError) as exc:
                self.problems.add(
                    f"{scan.label}: the scan grid cannot be inferred from {paths[0]}, {paths[1]} "
                    f"({exc}); pass --scan-shape R,C --step Y,X"
                )
                p.broken = failed = True
        if failed or not fits:
            return
        shapes = Counter(f.shape for _, f in fits)
        if len(shapes) > 1 and not self.options.scan_shape:
            common = shapes.most_common(1)[0][0]
            odd = ", ".join(
                f"{s.label} {f.shape[0]}×{f.shape[1]}" for s, f in fits if f.shape != common
            )
            self.problems.add(
                f"scan '{p.name}': inconsistent scan shapes between its files: most are "
                f"{common[0]}×{common[1]}, but {odd}; pass --scan-shape R,C --step Y,X, or leave "
                "the odd angle files out with --exclude"
            )
            p.broken = True
            return
        steps = np.array([f.step for _, f in fits])
        step = np.median(steps, axis=0)
        off = np.abs(steps / step - 1).max(axis=1)
        if np.any(off > 0.15) and not self.options.step_um:
            odd = ", ".join(
                f"{s.label} {f.step[0]:.4g}×{f.step[1]:.4g}"
                for (s, f), o in zip(fits, off, strict=True)
                if o > 0.15
            )
            self.problems.add(
                f"scan '{p.name}': inconsistent scan steps between its files (median "
                f"{step[0]:.4g}×{step[1]:.4g} µm; {odd}); pass --scan-shape R,C --step Y,X"
            )
            p.broken = True
            return
        orders = Counter(f.order for _, f in fits)
        order = orders.most_common(1)[0][0]
        fit = fits[0][1]
        src = f"inferred from {paths[0]}, {paths[1]} of every angle file"
        shape = fit.shape
        step_um = tuple(_nice_step(float(v), max(shape)) for v in step)
        if self.options.scan_shape:
            shape, src = self.options.scan_shape, f"--scan-shape; step {src}"
        if self.options.step_um:
            step_um, src = self.options.step_um, f"{src}; --step"
        self.set_grid(p, shape, step_um, src)
        p.entry["scan_order"] = self.options.scan_order or order
        lost = max(1 - f.on_grid / max(f.n_points, 1) for _, f in fits)
        p.found.grid_source += (  # type: ignore[union-attr]
            f" (fast axis {fit.fast_axis}, {order}; up to {lost:.0%} of the points off the grid)"
        )
        if lost > 0.25:
            self.guess(
                f"scan '{p.name}': up to {lost:.0%} of an angle file's points lie off the inferred "
                f"{fit.shape[0]}×{fit.shape[1]} grid (overshoot?); check --scan-shape/--step"
            )

    @staticmethod
    def read_positions(scan: _Scan, paths: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        ys, xs = [], []
        for info in scan.infos:
            with h5py.File(info.path, "r") as f:
                ys.append(np.asarray(f[paths[0]][()], dtype=float).reshape(-1))
                xs.append(np.asarray(f[paths[1]][()], dtype=float).reshape(-1))
        return np.concatenate(ys), np.concatenate(xs)
