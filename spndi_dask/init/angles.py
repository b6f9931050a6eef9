"""The rocking angle of each angle file of a scan, and the order of the angle files."""

from __future__ import annotations

from collections import Counter

import numpy as np

from spndi_dask.init.files import _File, _natural, _Particle
from spndi_dask.init.geometry import _round_angle
from spndi_dask.init.names import _matches


class _AnglesMixin:
    """The rocking-angle methods of the per-scan inference (inference.py)."""

    # the rocking angle -------------------------------------------------------------------------
    def angle_candidates(self, info: _File) -> dict[str, tuple[float, str]]:
        """``{path: (degrees, note)}`` of every angle-named scalar, constant series or attribute."""
        out: dict[str, tuple[float, str]] = {}
        names = self.names["angle"]
        for d in info.datasets.values():
            if d.value is None or not _matches(d.base, names) or d.kind not in "iuf":
                continue
            v = d.value
            if v.size == 1:
                out[d.path] = self.degrees(float(v[0]), d.units)
            elif v.size > 1 and np.ptp(v) <= 1e-4 * max(1.0, abs(float(np.mean(v)))):
                out[d.path] = self.degrees(float(np.mean(v)), d.units)
        for key, v in info.attrs.items():
            base = key.rsplit("@", 1)[-1].lower()
            if isinstance(v, np.ndarray) and v.size == 1 and _matches(base, names):
                out[key] = (float(v[0]), "")
        return out

    @staticmethod
    def degrees(value: float, units: str | None) -> tuple[float, str]:
        u = (units or "").lower()
        if u in ("rad", "radian", "radians"):
            return float(np.degrees(value)), " (rad, converted)"
        if u in ("mdeg", "millidegree", "millidegrees"):
            return value / 1000.0, " (mdeg, converted)"
        return value, ""

    def read_angle_path(self, info: _File, path: str) -> float | None:
        if "@" in path:
            where, _, key = path.rpartition("@")
            key_path = f"{where or '/'}@{key}"
            v = info.attrs.get(key_path)
            return float(v[0]) if isinstance(v, np.ndarray) and v.size >= 1 else None
        d = info.datasets.get(path)
        if d is None or d.value is None:
            if d is not None and d.size > 4:  # a per-point series not read with the layout
                return self.read_series_mean(info, path)
            return None
        return self.degrees(float(np.mean(d.value)), d.units)[0]

    @staticmethod
    def read_series_mean(info: _File, path: str) -> float | None:
        import h5py

        with h5py.File(info.path, "r") as f:
            v = np.asarray(f[path][()], dtype=float)
        return float(np.mean(v)) if v.size else None

    def angles(self, p: _Particle) -> None:
        opt = self.options
        self.check_split(p)
        if p.broken:
            return
        recorded: list[float] | None = None
        source = ""
        hdf5 = all(s.infos and s.infos[0].kind == "hdf5" for s in p.scans)
        if opt.angle_path:
            values = []
            for scan in p.scans:
                v = self.read_angle_path(scan.infos[0], opt.angle_path) if hdf5 else None
                if v is None:
                    self.problems.add(
                        f"{scan.infos[0].rel}: --angle-path {opt.angle_path} is missing (write "
                        "a dataset path, or GROUP@ATTRIBUTE for an attribute, e.g. /entry@theta)"
                    )
                    p.broken = True
                values.append(v)
            if not p.broken:
                recorded, source = values, f"{opt.angle_path} (--angle-path)"  # type: ignore[assignment]
        elif hdf5:
            cands = [self.angle_candidates(s.infos[0]) for s in p.scans]
            common = set(cands[0]).intersection(*cands[1:]) if cands else set()
            vectors: dict[tuple[float, ...], list[str]] = {}
            for path in sorted(common, key=lambda k: ("@" in k, k)):  # datasets first
                vec = tuple(round(c[path][0], 9) for c in cands)
                vectors.setdefault(vec, []).append(path)
            varying = {v: ps for v, ps in vectors.items() if len(set(v)) > 1}
            counts = Counter(k for c in cands for k in c)
            strict = opt.angles is None  # with --angles, recorded angles are only compared
            for path, n in sorted(counts.items()):
                values = {c[path][0] for c in cands if path in c}
                if strict and n < len(cands) and len(values) > 1:  # an angle some files lack
                    lacking = [
                        s.label for s, c in zip(p.scans, cands, strict=True) if path not in c
                    ]
                    self.problems.add(
                        f"scan '{p.name}': {path} changes between the angle files but is missing "
                        f"from {', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}; "
                        "leave those out with --exclude, or pass --angles START:STOP:NUM or "
                        "--angle-path PATH"
                    )
                    p.broken = True
            if p.broken:
                return
            if len(varying) > 1 and not strict:
                varying = {}
            if len(varying) > 1:
                listing = "; ".join(
                    f"{' = '.join(ps)} ({min(v):.4g} … {max(v):.4g})" for v, ps in varying.items()
                )
                self.problems.add(
                    f"scan '{p.name}': several recorded angles change between the angle files "
                    f"({listing}); pass --angle-path PATH (GROUP@ATTRIBUTE for an attribute)"
                )
                p.broken = True
                return
            if varying:
                vec, paths = next(iter(varying.items()))
                recorded = [c[paths[0]][0] for c in cands]
                note = cands[0][paths[0]][1]
                source = paths[0] + note + (f" (= {', '.join(paths[1:])})" if paths[1:] else "")
            elif vectors and opt.angles is None:
                const = ", ".join(ps[0] for ps in vectors.values())
                self.guess(
                    f"scan '{p.name}': {const} has the same value in every angle file: not the "
                    "rocking angle"
                )
        for scan, v in zip(p.scans, recorded or [None] * len(p.scans), strict=True):
            scan.angle = v
        if len(p.scans) < 2:
            self.problems.add(
                f"scan '{p.name}' ({p.where}) has only {len(p.scans)} angle file; a rocking curve "
                "needs at least 2 angles: leave it out with --exclude, or group its files with "
                "others (--group)"
            )
            p.broken = True
            return
        self.order(p, recorded is not None)
        if opt.angles is not None:
            start, stop, num = opt.angles
            if num != len(p.scans):
                self.problems.add(
                    f"scan '{p.name}' has {len(p.scans)} angle files but --angles {start}:{stop}:"
                    f"{num} gives {num} angles; give NUM = {len(p.scans)}"
                )
                p.broken = True
                return
            p.entry["angles_deg"] = {"start": start, "stop": stop, "num": num}
            p.comments["angles_deg"] = "--angles"
            if recorded is not None:
                given = np.linspace(start, stop, num)
                got = np.array([s.angle for s in p.scans], dtype=float)
                if np.max(np.abs(given - got)) > 1e-3:
                    self.guess(
                        f"scan '{p.name}': --angles differ from the recorded {source} "
                        f"({got.min():.4g} … {got.max():.4g}) by up to "
                        f"{np.max(np.abs(given - got)):.3g}°; the flag wins"
                    )
            p.found.angles, p.found.angle_source = (start, stop), "--angles"  # type: ignore[union-attr]
            return
        if recorded is None:
            looked = ", ".join(self.names["angle"])
            what = "TIFF files record no angle" if not hdf5 else (
                f"no rocking angle recorded in its files (looked for datasets and attributes "
                f"named {looked} whose value changes between the angle files)"
            )  # fmt: skip
            self.problems.add(
                f"scan '{p.name}': {what}; pass --angles START:STOP:NUM, or --angle-path "
                "PATH if it is recorded under another name"
            )
            p.broken = True
            return
        values = [float(s.angle) for s in p.scans]  # type: ignore[arg-type]
        if not self.monotonic(p, values):
            return
        p.entry["angles_deg"] = [_round_angle(v) for v in values]
        p.comments["angles_deg"] = f"recorded {source}"
        p.found.angles = (values[0], values[-1])  # type: ignore[union-attr]
        p.found.angle_source = f"recorded {source}"  # type: ignore[union-attr]

    def check_split(self, p: _Particle) -> None:
        """The parts of a split angle file must record one angle (else they are angle files)."""
        for scan in p.scans:
            if len(scan.infos) < 2 or any(i.kind != "hdf5" for i in scan.infos):
                continue
            if self.options.angle_path:
                path = self.options.angle_path
                per_part = [{path: self.read_angle_path(i, path)} for i in scan.infos]
            else:
                per_part = [
                    {k: v[0] for k, v in self.angle_candidates(i).items()} for i in scan.infos
                ]
            for path in sorted(set(per_part[0]).intersection(*per_part[1:])):
                values = [part[path] for part in per_part]
                known = [v for v in values if v is not None]
                if not known or np.ptp(known) <= 1e-6 * max(1.0, abs(known[0])):
                    continue
                listing = ", ".join(
                    f"{i.path.name}: {v:g}"
                    for i, v in zip(scan.infos, values, strict=True)
                    if v is not None
                )
                self.problems.add(
                    f"{scan.label} was taken for one angle file split across "
                    f"{len(scan.files)} files (a folder named like a beamline scan, or of files "
                    f"named like parts), but their {path} differ ({listing}); if each file is "
                    "an angle of its own, pass --no-split"
                )
                p.broken = True
                break

    def order(self, p: _Particle, recorded: bool) -> None:
        """Acquisition order: by the scan number in the names, else by recorded angle, else name."""
        ids = [s.id for s in p.scans]
        unique_ids = None not in ids and len(set(ids)) == len(ids)
        how = self.options.sort
        if how == "id" and not unique_ids:
            self.problems.add(
                f"scan '{p.name}': --sort id, but not every angle file's name has its own number "
                f"({', '.join(s.label for s in p.scans[:4])} ...); use --sort angle"
            )
            p.broken = True
            how = "auto"
        if how == "angle" or (how == "auto" and not unique_ids and recorded):
            if not recorded:
                self.problems.add(
                    f"scan '{p.name}': --sort angle needs recorded angles; pass --angle-path"
                )
                p.broken = True
                return
            p.scans.sort(key=lambda s: (s.angle, _natural(s.name)))
            p.entry["_order"] = "recorded angle"
        elif unique_ids:
            p.scans.sort(key=lambda s: s.id)  # type: ignore[arg-type, return-value]
            p.entry["_order"] = "scan number"
        else:
            p.scans.sort(key=lambda s: _natural(s.rel))
            p.entry["_order"] = "name"
            self.guess(
                f"scan '{p.name}': angle files ordered by name (no scan numbers in their names, no "
                "recorded angles); check the frames list"
            )

    def monotonic(self, p: _Particle, values: list[float]) -> bool:
        steps = np.diff(values)
        if np.any(steps == 0):
            i = int(np.flatnonzero(steps == 0)[0])
            a, b = p.scans[i], p.scans[i + 1]
            self.problems.add(
                f"scan '{p.name}': {a.label} and {b.label} record the same angle {values[i]:g} "
                "(a repeated acquisition?); leave one out with --exclude"
            )
            p.broken = True
            return False
        if not (np.all(steps > 0) or np.all(steps < 0)):
            bad = np.flatnonzero(np.sign(steps) != np.sign(np.median(steps)))
            listing = ", ".join(
                f"{p.scans[i].label} ({values[i]:g}) -> {p.scans[i + 1].label} ({values[i + 1]:g})"
                for i in bad[:4]
            )
            self.problems.add(
                f"scan '{p.name}': the recorded angles are not monotonic in "
                f"{p.entry.get('_order', 'scan number')} order: {listing}; leave the stray "
                "angle files out with --exclude, or pass --sort angle to order them by angle"
            )
            p.broken = True
            return False
        return True
