"""Per-scan inference: the detector, monitor, XRF, mask and position datasets."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from spndi_dask.init.angles import _AnglesMixin
from spndi_dask.init.files import (
    TIFF_SUFFIXES,
    _Dataset,
    _File,
    _none,
    _Particle,
    _Problems,
    _read_hdf5,
    _read_tiff,
    _Scan,
    _shape,
)
from spndi_dask.init.geometry import _GeometryMixin
from spndi_dask.init.grid import _GridMixin
from spndi_dask.init.names import NAMES, POSITION_PAIRS, _matches
from spndi_dask.init.options import InitOptions
from spndi_dask.init.report import InitReport


# -- per-scan inference ----------------------------------------------------------------------------
class _Inference(_AnglesMixin, _GridMixin, _GeometryMixin):
    def __init__(self, raw: Path, manifest_dir: Path, options: InitOptions) -> None:
        self.raw = raw
        self.manifest_dir = manifest_dir
        self.options = options
        self.problems = _Problems()
        self.report = InitReport(raw)
        self.frames_path: str | None = None  # the scan's detector dataset, once chosen
        self.names = {k: tuple(v) for k, v in NAMES.items()}
        self.pairs = POSITION_PAIRS
        for key, values, extend in options.names:
            if key == "positions":
                new = tuple(tuple(v.split(":")) for v in values)
                self.pairs = (*self.pairs, *new) if extend else new  # type: ignore[assignment]
            else:
                self.names[key] = (*self.names[key], *values) if extend else values

    # helpers ------------------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.manifest_dir)).as_posix()

    def shown(self, path: Path) -> str:
        """A path as shown in messages: relative to RAW_DIR's parent (``raw/p1/scan_1.h5``)."""
        try:
            return path.relative_to(self.raw.parent).as_posix()
        except ValueError:
            return str(path)

    def guess(self, text: str) -> None:
        if text not in self.report.guesses:
            self.report.guesses.append(text)

    def is_xrf_path(self, path: str) -> bool:
        return any(_matches(part, self.names["xrf"]) for part in path.strip("/").split("/"))

    # reading ----------------------------------------------------------------------------------
    def read_files(self, grouped: dict[str, list[_Scan]]) -> None:
        """Read every file's layout; every unreadable file is a problem (all are listed)."""
        for scans in grouped.values():
            for scan in scans:
                for path in scan.files:
                    rel = self.shown(path)
                    try:
                        if path.suffix.lower() in TIFF_SUFFIXES:
                            scan.infos.append(_read_tiff(path, rel))
                        else:
                            scan.infos.append(_read_hdf5(path, rel, self.names["angle"]))
                    except Exception as exc:  # h5py/tifffile raise many kinds
                        reason = str(exc) or type(exc).__name__
                        glob = path.relative_to(self.raw).as_posix()
                        self.problems.add(
                            f"{rel}: cannot be read ({reason}); copy it again from the beamline, "
                            f"or leave it out with --exclude '{glob}'"
                        )

    # the detector dataset ------------------------------------------------------------------------
    def detector(self, p: _Particle) -> None:
        chosen: dict[str, list[str]] = {}
        for scan in p.scans:
            n_points = 0
            dims: tuple[int, int] | None = None
            for info in scan.infos:
                if info.kind == "tiff":
                    assert info.tiff is not None
                    pages, shape, dtype = info.tiff
                    n_points += pages
                    chosen.setdefault("(TIFF pages)", []).append(info.rel)
                    p.entry.setdefault("_detector", (shape, dtype))
                    continue
                d = self.pick_detector(info)
                if d is None:
                    p.broken = True
                    continue
                chosen.setdefault(d.path, []).append(info.rel)
                p.entry.setdefault("_detector", (d.shape[-2:], d.dtype))
                if d.shape[-2:] != p.entry["_detector"][0]:
                    self.problems.add(
                        f"{info.rel}: detector frames {_shape(d.shape[-2:])} differ from "
                        f"{_shape(p.entry['_detector'][0])} of the other files of scan "
                        f"'{p.name}'; leave it out with --exclude, or put it in a scan folder "
                        "of its own"
                    )
                if len(d.shape) == 4:
                    dims = (d.shape[0] + (dims[0] if dims else 0), d.shape[1])
                    n_points += d.shape[0] * d.shape[1]
                else:
                    n_points += d.shape[0]
            scan.n_points, scan.scan_dims = n_points, dims
        if p.broken:
            return
        if len(chosen) > 1:
            listing = "; ".join(f"{k} in {len(v)} files (e.g. {v[0]})" for k, v in chosen.items())
            self.problems.add(
                f"scan '{p.name}': its files hold their frames in different datasets "
                f"({listing}); pass --dataset PATH"
            )
            p.broken = True
        else:
            path = next(iter(chosen))
            shape, dtype = p.entry["_detector"]
            if path != "(TIFF pages)":
                p.entry["dataset"] = path
            p.comments.setdefault("dataset", f"frames {_shape(shape)} {dtype}")

    def pick_detector(self, info: _File) -> _Dataset | None:
        opt = self.options.dataset
        if opt:
            d = info.datasets.get(opt)
            if d is None or len(d.shape) not in (3, 4):
                found = "missing" if d is None else f"{_shape(d.shape)}, not 3-D or 4-D"
                self.problems.add(
                    f"{info.rel}: --dataset {opt} is {found}; frame datasets in the file: "
                    f"{self.list_frames(info) or 'none'}"
                )
                return None
            return d
        frames = [
            d
            for d in info.datasets.values()
            if len(d.shape) in (3, 4) and d.kind in "iuf" and not self.is_xrf_path(d.path)
            and min(d.shape[-2:]) >= 2
        ]  # fmt: skip
        ints = [d for d in frames if d.kind in "iu"]
        pool = ints or frames
        if not pool:
            self.problems.add(
                f"{info.rel}: no 3-D (n_points, rows, cols) or 4-D (scan rows, scan cols, rows, "
                f"cols) dataset of frames; datasets: {self.list_all(info)}; pass --dataset PATH, "
                "or leave the file out with --exclude"
            )
            return None
        pool.sort(key=lambda d: d.size, reverse=True)
        best = pool[0]
        ties = [d for d in pool if d.size == best.size]
        if len(ties) > 1:
            self.problems.add(
                f"{info.rel}: {len(ties)} candidate detector datasets of the same size: "
                f"{', '.join(d.describe() for d in ties)}; pass --dataset PATH"
            )
            return None
        if not ints:
            self.guess(f"{best.path}: frames are {best.dtype}, not integer counts (--dataset)")
        if len(pool) > 1:
            others = ", ".join(d.describe() for d in pool[1:3])
            self.guess(
                f"{best.path} is the detector: the largest of {len(pool)} frame-shaped datasets "
                f"(also {others}); --dataset PATH picks another"
            )
        return best

    @staticmethod
    def list_frames(info: _File) -> str:
        return ", ".join(d.describe() for d in info.datasets.values() if len(d.shape) in (3, 4))

    @staticmethod
    def list_all(info: _File) -> str:
        shown = [d.describe() for d in info.datasets.values()][:12]
        return ", ".join(shown) or "none"

    # per-point datasets ------------------------------------------------------------------------
    def per_point(self, d: _Dataset, scan: _Scan, info: _File) -> bool:
        """``d``'s leading axes are the scan points of this file."""
        det = self.frames_of(info)
        if det is None:
            return False
        lead = det.shape[:2] if len(det.shape) == 4 else det.shape[:1]
        return d.shape[: len(lead)] == lead or (
            len(lead) == 2 and len(d.shape) >= 1 and d.shape[0] == lead[0] * lead[1]
        )

    def frames_of(self, info: _File) -> _Dataset | None:
        """The frames dataset of the scan being inferred (``frames_path``) in ``info``."""
        return info.datasets.get(self.frames_path) if self.frames_path else None

    def find_per_point(
        self,
        p: _Particle,
        key: str,
        flag: str,
        accept: Any,
        what: str,
    ) -> str | None:
        """The one per-point dataset of ``p`` named like ``NAMES[key]`` (or the flag's)."""
        given = getattr(self.options, key if key != "mask" else "mask_dataset")
        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        if not infos or _none(given):
            return None
        if given:
            for scan, info in infos:
                d = info.datasets.get(given)
                if d is None or not accept(d, scan, info):
                    state = "missing" if d is None else f"{_shape(d.shape)}, not {what}"
                    self.problems.add(f"{info.rel}: {flag} {given} is {state}")
                    p.broken = True
            return given
        # candidates of each file; the choice must be the same in every file
        found: dict[str, int] = {}
        for scan, info in infos:
            for d in info.datasets.values():
                if accept(d, scan, info) and self.named(d, key):
                    found[d.path] = found.get(d.path, 0) + 1
        everywhere = [k for k, n in found.items() if n == len(infos)]
        if len(everywhere) > 1:
            self.problems.add(
                f"scan '{p.name}': {len(everywhere)} candidate {what} datasets: "
                f"{', '.join(everywhere)}; pass {flag} PATH (or {flag} none)"
            )
            p.broken = True
            return None
        partial = [k for k in found if k not in everywhere]
        if partial:
            self.guess(
                f"scan '{p.name}': {', '.join(partial)} ({what}) is not in every file; not "
                f"used ({flag} PATH uses it)"
            )
        return everywhere[0] if everywhere else None

    def named(self, d: _Dataset, key: str) -> bool:
        names = self.names[key]
        if _matches(d.base, names):
            return True
        group = d.parent.rsplit("/", 1)[-1]
        if key == "xrf":
            return self.is_xrf_path(d.parent) and not _matches(d.base, self.names["xrf_energy"])
        return d.base in ("data", "counts", "value") and _matches(group, names)

    def monitor(self, p: _Particle) -> None:
        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            return d.kind in "iuf" and self.per_point(d, scan, info) and d.size == self.points(info)

        path = self.find_per_point(p, "monitor", "--monitor", accept, "per-point monitor")
        if path:
            p.entry["monitor"] = path
            p.comments["monitor"] = "per-point incident flux" + (
                " (--monitor)" if self.options.monitor else " (found by name)"
            )

    def points(self, info: _File) -> int:
        det = self.frames_of(info)
        if det is None:
            return -1
        return int(np.prod(det.shape[:2] if len(det.shape) == 4 else det.shape[:1]))

    def xrf(self, p: _Particle) -> None:
        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            det = self.frames_of(info)
            lead = 2 if det is not None and len(det.shape) == 4 else 1
            return (
                d.kind in "iuf"
                and self.per_point(d, scan, info)
                and len(d.shape) <= lead + 2
                and (det is None or d.path != det.path)
            )

        path = self.find_per_point(p, "xrf", "--xrf", accept, "XRF")
        if not path:
            if self.options.xrf_window_kev:
                self.problems.add(
                    f"scan '{p.name}': --xrf-window is given but no XRF dataset was found; "
                    "pass --xrf PATH"
                )
            return
        p.entry["xrf"] = path
        info = next(i for s in p.scans for i in s.infos if i.kind == "hdf5")
        d = info.datasets[path]
        det = self.frames_of(info)
        lead = 2 if det is not None and len(det.shape) == 4 else 1
        if len(d.shape) == lead:
            p.comments["xrf"] = "per-point fluorescence map" + (
                " (--xrf)" if self.options.xrf else " (found by name)"
            )
            if self.options.xrf_window_kev:
                self.guess(
                    f"scan '{p.name}': {path} is a per-point map, not spectra: "
                    "--xrf-window does not apply to it"
                )
            return
        bins = d.shape[-1]
        spectra = _shape(("n_points", *d.shape[lead:]))
        p.comments["xrf"] = f"XRF spectra {spectra}: summed over channels and the window"
        window = self.options.xrf_window_kev
        if window is None:
            self.problems.add(
                f"scan '{p.name}': {path} {_shape(d.shape)} holds XRF spectra; pass "
                "--xrf-window LOW:HIGH (keV, the emission line's window, e.g. 6.8:7.1 for Co "
                "Kα), or --xrf none to leave XRF out"
            )
            p.broken = True
            return
        p.entry["xrf_window_kev"] = list(window)
        p.comments["xrf_window_kev"] = "--xrf-window"
        if self.options.xrf_calibration:
            offset, gain = self.options.xrf_calibration
            p.entry["xrf_calibration"] = {"offset_kev": offset, "gain_kev": gain}
            p.comments["xrf_calibration"] = "--xrf-calibration"
            return
        energy = self.options.xrf_energy
        if energy is None:
            near = [
                e.path
                for e in info.datasets.values()
                if e.parent == d.parent and len(e.shape) == 1 and e.shape[0] == bins
                and _matches(e.base, self.names["xrf_energy"])
            ]  # fmt: skip
            if len(near) > 1:
                self.problems.add(
                    f"scan '{p.name}': {len(near)} candidate XRF bin-energy datasets beside "
                    f"{path}: {', '.join(near)}; pass --xrf-energy PATH"
                )
                p.broken = True
                return
            if not near:
                self.problems.add(
                    f"scan '{p.name}': no dataset of the energy of the {bins} bins of {path} "
                    "(looked for " + ", ".join(self.names["xrf_energy"]) + " beside it); pass "
                    "--xrf-calibration OFFSET:GAIN (keV of bin 0 : keV per bin) or "
                    "--xrf-energy PATH"
                )
                p.broken = True
                return
            energy = near[0]
            p.comments["xrf_energy"] = f"the bins' energies ({bins} values, found by name)"
        else:
            p.comments["xrf_energy"] = "--xrf-energy"
            e = info.datasets.get(energy)
            if e is None or e.shape != (bins,):
                state = "missing" if e is None else f"{_shape(e.shape)}, not ({bins},)"
                self.problems.add(
                    f"{info.rel}: --xrf-energy {energy} is {state} (one energy per bin of {path})"
                )
                p.broken = True
                return
        p.entry["xrf_energy"] = energy
        units = (info.datasets[energy].units or "").lower() if energy in info.datasets else ""
        if units == "ev":
            self.problems.add(
                f"scan '{p.name}': {energy} is in eV; the manifest's xrf_energy is in keV: "
                "pass --xrf-calibration OFFSET:GAIN in keV instead"
            )
            p.broken = True

    def mask(self, p: _Particle) -> None:
        shape = p.entry.get("_detector", (None,))[0]

        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            return tuple(d.shape) == tuple(shape or ()) and d.kind in "iub"

        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        given = self.options.mask_dataset
        if given and not _none(given):
            missing = [i.rel for _, i in infos if given not in i.datasets]
            if missing:
                self.problems.add(
                    f"scan '{p.name}': --mask-dataset {given} is missing from "
                    f"{', '.join(missing[:3])}"
                )
            p.entry["mask_dataset"] = given
            p.comments["mask_dataset"] = "--mask-dataset"
            return
        path = self.find_per_point(p, "mask", "--mask-dataset", accept, "detector mask")
        if path:
            p.entry["mask_dataset"] = path
            p.comments["mask_dataset"] = f"detector pixel mask {_shape(shape or ())}, nonzero = bad"

    def positions(self, p: _Particle) -> tuple[str, str] | None:
        given = self.options.positions
        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        if _none(given) or not infos:
            return None
        if given:
            for _, info in infos:
                for path in given:
                    if path not in info.datasets:
                        self.problems.add(f"{info.rel}: --positions dataset {path} is missing")
                        p.broken = True
            return given  # type: ignore[return-value]
        counts: Counter[tuple[str, str]] = Counter()
        for scan, info in infos:
            for d in info.datasets.values():
                if not (d.kind in "iuf" and self.per_point(d, scan, info)):
                    continue
                if d.size != self.points(info):
                    continue
                for ny, nx in self.pairs:
                    if _matches(d.base, (ny,)):
                        partner = self.partner(info, d, nx + d.base[len(ny) :])
                        if partner:
                            counts[(d.path, partner)] += 1
                        break
        everywhere = [k for k, n in counts.items() if n == len(infos)]
        if len(everywhere) > 1:
            listing = "; ".join(f"{y},{x}" for y, x in everywhere)
            self.problems.add(
                f"scan '{p.name}': {len(everywhere)} candidate pairs of recorded positions "
                f"({listing}); pass --positions Y_PATH,X_PATH (or --positions none)"
            )
            p.broken = True
            return None
        return everywhere[0] if everywhere else None

    @staticmethod
    def partner(info: _File, d: _Dataset, base: str) -> str | None:
        """The dataset called ``base`` beside ``d``, of its shape."""
        for cand in info.datasets.values():
            if cand.parent == d.parent and cand.base == base and cand.shape == d.shape:
                return cand.path
        return None
