"""What ``spndi init`` found and guessed (:class:`InitReport`), and its result."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spndi_dask._deprecate import renamed_attribute
from spndi_dask.init.options import InitError

if TYPE_CHECKING:
    from spndi_dask.config import Manifest


logger = logging.getLogger("spndi_dask.init")


# -- report --------------------------------------------------------------------------------------
@dataclass
class ScanFound:
    """What was found for one scan (one row of the table :meth:`InitReport.format` prints)."""

    name: str
    where: str
    angle_files: int
    files: int
    angles: tuple[float, float] | None = None
    angle_source: str = ""
    scan_shape: tuple[int, int] | None = None
    step_um: tuple[float, float] | None = None
    scan_order: str = ""
    grid_source: str = ""
    detector: str = ""
    datasets: dict[str, str] = field(default_factory=dict)


#: the old name of :class:`ScanFound` (a manifest entry was called a particle)
ParticleFound = ScanFound


@dataclass
class InitReport:
    """What ``spndi init`` found: per scan, the geometry, its guesses and skipped files."""

    raw_dir: Path
    scans: list[ScanFound] = field(default_factory=list)
    geometry: dict[str, str] = field(default_factory=dict)
    guesses: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    particles = renamed_attribute("InitReport", "particles", "scans")  # the old name

    def format(self) -> str:
        """The table and the lists, as printed by ``spndi init``."""
        rows = [("scan", "angle files", "files", "angles (deg)", "grid", "step (µm)", "order")]
        for p in self.scans:
            lo, hi = p.angles or (float("nan"), float("nan"))
            rows.append(
                (
                    p.name,
                    str(p.angle_files),
                    str(p.files),
                    f"{lo:.4g} … {hi:.4g}",
                    "×".join(map(str, p.scan_shape or ())),
                    "×".join(f"{s:.4g}" for s in p.step_um or ()),
                    p.scan_order,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"found in {self.raw_dir}:"]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        ]
        for p in self.scans:
            lines.append(f"\n  {p.name} ({p.where}):")
            lines.append(f"    angles      {p.angle_source}")
            lines.append(f"    scan grid   {p.grid_source}")
            lines.append(f"    detector    {p.detector}")
            for key, text in p.datasets.items():
                lines.append(f"    {key:<11} {text}")
        if self.geometry:
            lines.append("\n  geometry:")
            lines += [f"    {k:<20} {v}" for k, v in self.geometry.items()]
        if self.guesses:
            lines.append("\nguesses (check them; the flag named settles each):")
            lines += [f"  - {g}" for g in self.guesses]
        if self.skipped:
            lines.append("\nskipped:")
            lines += [f"  - {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class InitResult:
    """The manifest text, where it goes and what was found."""

    text: str
    path: Path
    report: InitReport
    manifest: Manifest

    def write(self, *, force: bool = False) -> Path:
        """Write the manifest to :attr:`path`; an existing file only with ``force``."""
        if self.path.exists() and not force:
            raise InitError(
                f"{self.path} exists; pass --force to replace it, or -o another file name"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self.text)
        os.replace(tmp, self.path)
        logger.debug("wrote %s", self.path)
        return self.path
