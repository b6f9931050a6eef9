"""Dataset and attribute names ``spndi init`` looks for, and how a name matches one."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Dataset and attribute names looked for, per kind (lower case; digits may follow, e.g.
#: ``ic1``). ``--names KEY=a,b`` replaces a list, ``--names KEY+=a,b`` extends it.
NAMES: dict[str, tuple[str, ...]] = {
    "monitor": ("i0", "io", "izero", "i_zero", "monitor", "ic", "ion_chamber", "sclr_i0"),
    "xrf": ("xrf", "fluo", "fluorescence", "xspress", "xspress3", "mca", "falcon", "falconx",
            "vortex", "ketek", "sdd"),
    "xrf_energy": ("energy", "energies", "bin_energy", "energy_bins", "e_bins"),
    "mask": ("pixel_mask", "mask", "bad_pixel_mask", "detector_mask"),
    "angle": ("theta", "eta", "omega", "angle", "rocking_angle", "th"),
    "energy": ("energy", "energy_kev", "incident_energy", "photon_energy", "mono_energy"),
    "distance": ("distance", "detector_distance", "detector_distance_m", "det_distance",
                 "sample_distance"),
    "pixel_size": ("pixel_size", "pixel_size_m"),
    "x_pixel_size": ("x_pixel_size",),
    "y_pixel_size": ("y_pixel_size",),
    "beam_center_x": ("beam_center_x",),
    "beam_center_y": ("beam_center_y",),
    "gamma": ("gamma", "gamma_deg"),
    "delta": ("delta", "delta_deg"),
    "scan_shape": ("scan_shape", "scan_dims", "scan_size"),
    "scan_step": ("scan_step_um", "scan_step", "step_um"),
    "saturation": ("saturation_value", "countrate_correction_count_cutoff"),
}  # fmt: skip

#: (slow-axis y, fast-axis x) name pairs of recorded positions; ``--names positions=Y:X,...``.
POSITION_PAIRS: tuple[tuple[str, str], ...] = (
    ("samy", "samx"),
    ("sam_y", "sam_x"),
    ("piezo_y", "piezo_x"),
    ("pos_y", "pos_x"),
    ("y_pos", "x_pos"),
    ("zpssy", "zpssx"),
    ("dssy", "dssx"),
    ("ssy", "ssx"),
    ("sample_y", "sample_x"),
    ("fine_y", "fine_x"),
    ("sy", "sx"),
    ("y", "x"),
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROCKING_AXES = ("x+", "x-", "y+", "y-", "z+", "z-")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` is one of ``patterns``, optionally followed by digits (``ic1``, ``i0_2``)."""
    name = name.lower()
    return any(re.fullmatch(re.escape(p) + r"(?:[_-]?\d+)?", name) for p in patterns)
