"""Autoencoder models (torch only): a 3D-conv model on the q grid and FoldingNet on point clouds.

Both models expose ``encode(x) -> (batch, latent_dim)``, ``forward(x) -> reconstruction`` and
``loss(x)`` (the training objective of the model), and are built from plain hyper-parameters
with :func:`build_model` so a checkpoint can rebuild them from its JSON metadata.

* :class:`Conv3dAutoencoder` (``conv3d``, the default): normalised patterns
  ``(batch, n, n, n)`` → three stride-2 convolutions → ``latent_dim``; mirrored transposed
  convolutions back; mean squared error.
* :class:`FoldingNet` (``foldingnet``, the model of the original study; Yang et al., CVPR 2018):
  point clouds ``(batch, n_points, 3)`` → per-point coordinates + k-NN local covariance (12
  features) → point MLP → two graph layers (k-NN max pooling + 1×1 convolutions) → global max
  pool → 512-d codeword; a two-stage folding decoder deforms a 2D grid into the cloud;
  Chamfer loss.

  The study variant (``[features] recipe = "study"``: ``local_feature="study"``,
  ``source="gaussian"``, ``chamfer="sum"``, ``k=32``) follows the original study's released
  code (YijinLiu-Lab/NanoDiffractionAnalysis, ``foldingnet/model.py``, facts only): its
  "local covariance" is the 3×3 outer product of each point with its nearest other point; the
  decoder folds 2025 fixed Gaussian source points (codeword + 3 inputs) instead of a 2D grid;
  its Chamfer loss sums squared nearest-neighbour distances over the points. The layer sizes
  are the same as the default FoldingNet's, so the study's weights map one to one (its 1×1
  ``Conv1d`` weights are this model's ``Linear`` weights with a trailing axis of 1; see
  :func:`spndi_dask.features.checkpoint.load_study_weights`).
"""

from __future__ import annotations

import itertools
import math
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "MODEL_KINDS",
    "Conv3dAutoencoder",
    "FoldingNet",
    "build_model",
    "chamfer_distance",
    "knn_indices",
    "rotate_clouds",
    "source_points",
]

MODEL_KINDS = ("conv3d", "foldingnet")


class Conv3dAutoencoder(nn.Module):
    """3D convolutional autoencoder of patterns on an ``n³`` grid.

    The grid is zero-padded to a multiple of 8 (three stride-2 stages) and the reconstruction
    cropped back, so any grid size works.

    Parameters
    ----------
    grid : int
        Points per axis of the pattern grid.
    latent_dim : int
        Size of the latent vector.
    channels : tuple of int
        Channels of the three encoder stages (mirrored in the decoder).

    Examples
    --------
    >>> m = Conv3dAutoencoder(grid=16, latent_dim=8)
    >>> x = torch.rand(2, 16, 16, 16)
    >>> m.encode(x).shape, m(x).shape
    (torch.Size([2, 8]), torch.Size([2, 16, 16, 16]))
    """

    def __init__(
        self, grid: int = 32, latent_dim: int = 32, channels: tuple[int, int, int] = (8, 16, 32)
    ) -> None:
        super().__init__()
        self.grid = int(grid)
        self.padded = 8 * math.ceil(self.grid / 8)
        c1, c2, c3 = (int(c) for c in channels)
        s = self.padded // 8
        self._bottom = (c3, s, s, s)
        self.encoder = nn.Sequential(
            nn.Conv3d(1, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv3d(c1, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv3d(c2, c3, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c3 * s**3, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c3 * s**3),
            nn.ReLU(),
            nn.Unflatten(1, self._bottom),
            nn.ConvTranspose3d(c3, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose3d(c2, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose3d(c1, 1, 4, stride=2, padding=1),
        )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padded - self.grid
        x = x.unsqueeze(1)
        return nn.functional.pad(x, (0, p, 0, p, 0, p)) if p else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``(batch, latent_dim)`` of patterns ``(batch, n, n, n)``."""
        return self.encoder(self._pad(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Patterns ``(batch, n, n, n)`` from latent vectors."""
        n = self.grid
        return self.decoder(z)[:, 0, :n, :n, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error."""
        return nn.functional.mse_loss(self(x), x)


# -- FoldingNet ---------------------------------------------------------------------------------
def knn_indices(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(batch, n, k)`` of the ``k`` nearest points of every point (itself included)."""
    d = torch.cdist(points, points)
    return d.topk(k, dim=-1, largest=False).indices


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, n, c) at neighbour indices ``idx`` (batch, n, k) → (batch, n, k, c)."""
    b, n, k = idx.shape
    flat = idx.reshape(b, n * k, 1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, flat).reshape(b, n, k, x.shape[-1])


def _local_covariance(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per point: coordinates + the flattened 3×3 covariance of its neighbourhood (12 features)."""
    nb = _gather(points, idx)
    nb = nb - nb.mean(dim=2, keepdim=True)
    cov = torch.einsum("bnki,bnkj->bnij", nb, nb) / idx.shape[-1]
    return torch.cat([points, cov.flatten(2)], dim=-1)


def _study_local_feature(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per point: coordinates + the flattened outer product of the point with its nearest
    other point (the original study's ``local_cov``; 12 features)."""
    nb = _gather(points, idx[..., :2])
    outer = nb[:, :, 0, :, None] * nb[:, :, 1, None, :]
    return torch.cat([points, outer.flatten(2)], dim=-1)


@cache
def _gaussian_source() -> np.ndarray:
    return np.load(Path(__file__).with_name("data") / "foldingnet_gaussian.npy")


def source_points(source: str, n_points: int) -> torch.Tensor:
    """The decoder's source points: a ``m × m`` plane (2D) or the study's Gaussian set (3D).

    Examples
    --------
    >>> source_points("plane", 64).shape, source_points("gaussian", 2048).shape
    (torch.Size([64, 2]), torch.Size([2025, 3]))
    """
    if source == "gaussian":
        return torch.as_tensor(_gaussian_source(), dtype=torch.float32)
    if source != "plane":
        raise ValueError(f"unknown FoldingNet source {source!r}; use 'plane' or 'gaussian'")
    m = max(2, round(math.sqrt(n_points)))
    u = torch.linspace(-0.3, 0.3, m)
    return torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1).reshape(-1, 2)


def rotate_clouds(
    x: torch.Tensor, degrees: torch.Tensor, axes: tuple[int, int] = (0, 2)
) -> torch.Tensor:
    """Clouds ``(batch, n, 3)`` rotated about the origin by ``degrees`` (batch,) in ``axes``.

    The study's augmentation: random multiples of 15° in the (detector row, angle) plane, the
    cloud's axes 0 and 2. Other coordinates are unchanged.

    Examples
    --------
    >>> c = torch.tensor([[[1.0, 5.0, 0.0]]])
    >>> (rotate_clouds(c, torch.tensor([90.0])).round(decimals=6) + 0.0).tolist()
    [[[0.0, 5.0, 1.0]]]
    """
    a, b = axes
    t = torch.deg2rad(degrees.to(x.dtype))[:, None]
    c, s = torch.cos(t), torch.sin(t)
    out = x.clone()
    out[..., a] = c * x[..., a] - s * x[..., b]
    out[..., b] = s * x[..., a] + c * x[..., b]
    return out


def _point_mlp(sizes: list[int], last_relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FoldingNet(nn.Module):
    """FoldingNet point-cloud autoencoder (graph encoder, two-stage folding decoder).

    Parameters
    ----------
    n_points : int
        Points per input cloud; the decoder folds a ``m × m`` grid with ``m = round(√n_points)``.
    latent_dim : int
        Codeword size (512 in the original study).
    k : int
        Neighbours of the k-NN graph.
    hidden : int
        Width of the folding MLPs.
    local_feature : {'covariance', 'study'}
        Per-point input features: the centred k-NN covariance, or the study's outer product of
        each point with its nearest other point.
    source : {'plane', 'gaussian'}
        Decoder source points: a 2D grid of ``≈ n_points`` points, or the study's 2025 fixed
        3D Gaussian points (decoder input = codeword + 3).
    chamfer : {'mean', 'sum'}
        Chamfer loss per cloud: mean (default) or sum (the study) over the points.

    Examples
    --------
    >>> m = FoldingNet(n_points=64, latent_dim=16, k=8, hidden=32)
    >>> x = torch.rand(2, 64, 3)
    >>> m.encode(x).shape, m(x).shape
    (torch.Size([2, 16]), torch.Size([2, 64, 3]))
    """

    def __init__(
        self,
        n_points: int = 2048,
        latent_dim: int = 512,
        k: int = 16,
        hidden: int = 512,
        local_feature: Literal["covariance", "study"] = "covariance",
        source: Literal["plane", "gaussian"] = "plane",
        chamfer: Literal["mean", "sum"] = "mean",
    ) -> None:
        super().__init__()
        self.n_points = int(n_points)
        self.k = int(k)
        if local_feature not in ("covariance", "study") or chamfer not in ("mean", "sum"):
            raise ValueError(
                f"FoldingNet local_feature {local_feature!r} / chamfer {chamfer!r}: use "
                "'covariance' or 'study' / 'mean' or 'sum'"
            )
        self.local_feature, self.chamfer = local_feature, chamfer
        self.mlp1 = _point_mlp([12, 64, 64, 64])
        self.graph1 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128), nn.ReLU())
        self.graph2 = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 1024))
        self.mlp2 = _point_mlp([1024, latent_dim, latent_dim], last_relu=False)
        plane = source_points(source, self.n_points)
        self.register_buffer("plane", plane, persistent=False)
        self.fold1 = _point_mlp([latent_dim + plane.shape[1], hidden, hidden, 3], last_relu=False)
        self.fold2 = _point_mlp([latent_dim + 3, hidden, hidden, 3], last_relu=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codewords ``(batch, latent_dim)`` of clouds ``(batch, n, 3)``."""
        idx = knn_indices(x, min(self.k, x.shape[1]))
        local = _study_local_feature if self.local_feature == "study" else _local_covariance
        f = self.mlp1(local(x, idx))
        f = self.graph1(_gather(f, idx).amax(dim=2))
        f = self.graph2(_gather(f, idx).amax(dim=2))
        return self.mlp2(f.amax(dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Clouds ``(batch, m², 3)`` folded from codewords."""
        b, m2 = z.shape[0], self.plane.shape[0]
        code = z.unsqueeze(1).expand(-1, m2, -1)
        p = self.fold1(torch.cat([code, self.plane.expand(b, -1, -1)], dim=-1))
        return self.fold2(torch.cat([code, p], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Chamfer distance between the clouds and their reconstructions (batch mean)."""
        return chamfer_distance(x, self(x), reduction=self.chamfer).mean()


def chamfer_distance(
    a: torch.Tensor, b: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Symmetric Chamfer distance per cloud: squared nearest-neighbour distances both ways.

    ``reduction='mean'`` averages them over each cloud's points, ``'sum'`` adds them up (the
    original study; it also summed over the batch, which Adam's scale invariance makes
    equivalent to the batch mean used here up to its ε).

    Examples
    --------
    >>> a = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]])
    >>> chamfer_distance(a, a + torch.tensor([0.0, 0.5, 0])).tolist()
    [0.5]
    >>> chamfer_distance(a, a + torch.tensor([0.0, 0.5, 0]), reduction="sum").tolist()
    [1.0]
    """
    d = torch.cdist(a, b).square()
    if reduction == "sum":
        return d.min(dim=2).values.sum(dim=1) + d.min(dim=1).values.sum(dim=1)
    return d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)


def build_model(kind: Literal["conv3d", "foldingnet"], **hyper: Any) -> nn.Module:
    """A model of ``kind`` from its hyper-parameters (as stored in checkpoint metadata)."""
    if kind == "conv3d":
        hyper = {**hyper}
        if "channels" in hyper:
            hyper["channels"] = tuple(hyper["channels"])
        return Conv3dAutoencoder(**hyper)
    if kind == "foldingnet":
        return FoldingNet(**hyper)
    raise ValueError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
