"""Pure NumPy kernels of the scan drift registration (phase correlation of per-angle maps).

Re-exported by :mod:`spndi_dask.reduce._kernels`.
"""

from __future__ import annotations

import numpy as np
from skimage.registration import phase_cross_correlation

__all__ = ["register_chain", "register_to_reference"]


def _prepare(image: np.ndarray) -> np.ndarray:
    # median-subtracted and zero-padded (no wrap-around of content shifted across the scan
    # edge); no apodising window: a fixed window under moving content biases the shift
    im = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=np.nanmedian(image))
    pad = max(im.shape) // 4 + 1
    return np.pad(im - np.median(im), pad)


def register_to_reference(images: np.ndarray, *, reference: int, upsample: int = 20) -> np.ndarray:
    """Sub-pixel shift of each image relative to ``images[reference]`` (phase correlation).

    Returns the displacement ``d`` of each image's content (content at ``p`` in the reference
    appears at ``p + d``), shape ``(n, 2)`` in scan pixels (y, x); 0 for the reference.
    """
    ref = _prepare(images[reference])
    out = np.zeros((len(images), 2))
    for a, im in enumerate(images):
        if a == reference or not np.any(np.nan_to_num(im)):
            continue
        shift, _, _ = phase_cross_correlation(
            ref, _prepare(im), upsample_factor=upsample, normalization=None
        )
        out[a] = -shift
    return out


def register_chain(images: np.ndarray, *, reference: int, upsample: int = 20) -> np.ndarray:
    """Displacements by registering each image to its neighbour and chaining from ``reference``.

    For maps that change slowly with angle (ROI intensity: domains diffract at different angles)
    neighbouring angles are similar where distant ones are not; the chained shifts are summed
    outward from the reference. An image without signal takes its neighbour's displacement.
    """
    n = len(images)
    out = np.zeros((n, 2))
    for a in range(reference + 1, n):
        pair = np.stack([images[a - 1], images[a]])
        out[a] = out[a - 1] + register_to_reference(pair, reference=0, upsample=upsample)[1]
    for a in range(reference - 1, -1, -1):
        pair = np.stack([images[a + 1], images[a]])
        out[a] = out[a + 1] + register_to_reference(pair, reference=0, upsample=upsample)[1]
    return out
