"""Training the autoencoder on a sample of pixels drawn across all scans of a beamtime.

``train(manifest)`` draws ``[features] sample_size`` pixels (inside segmented particles when
``spndi stats`` has run, else all pixels with signal) from every reduced scan, in proportion to
their number, reads only their patterns (one dask computation), fits the model with Adam on a
seeded train/validation split with early stopping, and writes the best weights with their
metadata to ``<output>/features/model.safetensors`` (+ ``model.json``).

Under a distributed client the fit is one task on a worker (a ``GPU`` worker when there is one,
else the worker with the most threads; see :mod:`spndi_dask.features.remote`): the workers read
the sample and send it there, the client only waits and passes each epoch's row to
``callback`` as it arrives. Without a client the fit runs in this process. Either way the model
is the same for the same seed and number of torch threads (all the cores the process may use).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from torch import nn

from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import active_client, compute
from spndi_dask.config import FeatureSettings, Manifest
from spndi_dask.features import _kernels as K
from spndi_dask.features.checkpoint import (
    STUDY_HYPER,
    load_checkpoint,
    load_study_weights,
    save_checkpoint,
)
from spndi_dask.features.model import build_model, rotate_clouds
from spndi_dask.features.remote import choose_worker, run_on_worker
from spndi_dask.interrupt import check_interrupted, deferred
from spndi_dask.io.hashing import sha256_file
from spndi_dask.io.results_store import open_results
from spndi_dask.stages import Outcome, StageError

__all__ = [
    "FeatureError",
    "TrainingResult",
    "checkpoint_path",
    "fit",
    "model_inputs",
    "resolve_device",
    "sample_patterns",
    "train",
]

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


class FeatureError(StageError, RuntimeError):
    """The feature stage cannot run on these results (nothing to train on, no patterns...)."""


def checkpoint_path(manifest: Manifest) -> Path:
    """The checkpoint ``encode`` uses: ``[features] checkpoint`` or ``<output>/features/model``."""
    return manifest.checkpoint


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when this process sees a GPU, else CPU; ``cuda`` without a GPU raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatureError(
            "device 'cuda' was asked for but torch sees no CUDA GPU here; use --device cpu or auto"
        )
    return torch.device(device)


def hyper_parameters(settings: FeatureSettings, grid_n: int) -> dict[str, Any]:
    """Constructor arguments of the configured model."""
    if settings.model == "conv3d":
        return {"grid": grid_n, "latent_dim": settings.latent_size}
    if settings.recipe == "study":
        return {
            **STUDY_HYPER,
            "n_points": settings.n_points,
            "latent_dim": settings.latent_size,
            "hidden": settings.latent_size,
            "k": settings.k_neighbours,
        }
    return {
        "n_points": settings.n_points,
        "latent_dim": settings.latent_size,
        "k": settings.k_neighbours,
    }


def normalisation(settings: FeatureSettings, grid: dict[str, Any]) -> dict[str, Any]:
    """How patterns become model inputs (stored with the model; see ``features/_kernels.py``)."""
    if settings.model == "conv3d":
        return {"patterns": "unit_sum_log1p", "n": grid["n"]}
    if settings.recipe == "study":
        # the study's clouds from the q-grid pattern: (dq_x, dq_y, dq_z) voxel indices stand
        # for (row, col, angle); the grid is isotropic, so the angle axis is not stretched
        return {
            "patterns": "study_cloud",
            "n_points": settings.n_points,
            "clip": 0.05,
            "threshold": 1e-4,
            "angle_scale": 1.0,
            "n_neighbours": 100,
            "std_ratio": 0.8,
            "centre": "mean",
            "seed": settings.seed,
        }
    return {
        "patterns": "point_cloud",
        "n_points": settings.n_points,
        "threshold": settings.cloud_threshold,
        "centre": "mean",
        "scale": [float(e) for e in grid["extent"]],
        "seed": settings.seed,
    }


def model_inputs(
    patterns: np.ndarray,
    meta: dict[str, Any],
    *,
    yx: np.ndarray,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Model inputs of usable patterns ``(k, n, n, n)`` as the checkpoint ``meta`` prescribes.

    ``yx`` (k, 2) are the pixels' scan indices: the point cloud of a pixel is drawn with its own
    seeded generator, so it is the same however the scan is split into tasks.
    """
    norm = meta["normalisation"]
    if norm["patterns"] == "unit_sum_log1p":
        return K.normalise_patterns(patterns)
    clouds = np.empty((len(patterns), norm["n_points"], 3), dtype=np.float32)
    if norm["patterns"] == "study_cloud":
        keys = ("n_points", "clip", "threshold", "angle_scale", "n_neighbours", "std_ratio")
        for i, (p, (y, x)) in enumerate(zip(patterns, yx, strict=True)):
            check_interrupted()
            rng = K.pixel_rng(norm["seed"], y, x)
            c = K.study_cloud(p, rng=rng, **{k: norm[k] for k in keys})
            clouds[i] = c - c.mean(axis=0)
        return clouds
    for i, (p, (y, x)) in enumerate(zip(patterns, yx, strict=True)):
        check_interrupted()
        c = K.cloud_from_pattern(
            p,
            offsets,
            n_points=norm["n_points"],
            threshold=norm["threshold"],
            rng=K.pixel_rng(norm["seed"], y, x),
        )
        clouds[i] = K.normalise_cloud(c, np.asarray(norm["scale"]))
    return clouds


@dataclass
class TrainingResult:
    """What :func:`fit` returns: the best model (by validation loss) and the loss history."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    n_train: int = 0
    n_val: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def _mean_loss(model: nn.Module, data: torch.Tensor, batch: int, device: torch.device) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            xb = data[i : i + batch].to(device)
            total += float(model.loss(xb)) * len(xb)
    return total / max(1, len(data))


def fit(
    model: nn.Module,
    data: np.ndarray | torch.Tensor,
    *,
    validation_fraction: float = 0.1,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    rotate_step: float | None = None,
    max_epochs: int = 40,
    patience: int = 5,
    min_improvement: float = 0.002,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callback: EpochCallback | None = None,
) -> TrainingResult:
    """Fit ``model`` (its ``loss(x)``) with Adam; keep the weights of the best validation epoch.

    Parameters
    ----------
    model : torch.nn.Module
        A model of :mod:`spndi_dask.features.model`.
    data : array (n, ...)
        Model inputs. A seeded ``validation_fraction`` of them (at least one) is held out;
        with ``validation_fraction=0`` the training loss decides (over-fitting on purpose).
    max_epochs, patience : int
        Stop after ``max_epochs`` or after ``patience`` epochs in which the validation loss did
        not improve on the best by more than ``min_improvement`` (relative).
    callback : callable, optional
        Called after every epoch with ``{"epoch", "max_epochs", "train_loss", "val_loss",
        "seconds"}`` (progress display).
    weight_decay : float
        Adam weight decay.
    rotate_step : float, optional
        Point clouds only: rotate each training cloud of each batch by a seeded random multiple
        of this many degrees in its (axis 0, axis 2) plane (:func:`rotate_clouds`).

    Examples
    --------
    >>> from spndi_dask.features.model import Conv3dAutoencoder
    >>> x = np.random.default_rng(0).random((20, 8, 8, 8), dtype=np.float32)
    >>> r = fit(Conv3dAutoencoder(grid=8, latent_dim=4), x, max_epochs=3)
    >>> len(r.history), r.best_val_loss < r.history[0]["val_loss"] * 1.0001
    (3, True)
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)
    data = torch.as_tensor(np.asarray(data, dtype=np.float32))
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(len(data)))
    n_val = round(validation_fraction * len(data))
    if validation_fraction > 0:
        n_val = min(max(1, n_val), len(data) - 1)
    val, trn = data[order[:n_val]], data[order[n_val:]]
    if len(trn) == 0:
        raise FeatureError("no training data: the sample is empty")
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    turns = round(360 / rotate_step) if rotate_step else 0
    result = TrainingResult(model=model, n_train=len(trn), n_val=n_val)
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    for epoch in range(1, max_epochs + 1):
        te = time.perf_counter()
        model.train()
        total = 0.0
        for idx in torch.randperm(len(trn), generator=gen).split(batch_size):
            check_interrupted()  # a signal swallowed where it arrived (a gc callback) stops here
            xb = trn[idx]
            if turns:
                steps = torch.randint(turns, (len(idx),), generator=gen)
                xb = rotate_clouds(xb, steps.to(xb.dtype) * rotate_step)
            xb = xb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = model.loss(xb)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_loss = total / len(trn)
        val_loss = _mean_loss(model, val, 4 * batch_size, device) if n_val else train_loss
        row = {
            "epoch": epoch,
            "max_epochs": max_epochs,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - te,
        }
        result.history.append(row)
        logger.debug(
            "epoch %d/%d: train %.4g, validation %.4g (%.1f s)",
            epoch,
            max_epochs,
            train_loss,
            val_loss,
            row["seconds"],
        )
        if callback is not None:
            callback(row)
        check_interrupted()
        if val_loss < result.best_val_loss:
            better = val_loss < result.best_val_loss * (1 - min_improvement)
            result.best_val_loss, result.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0 if better else since_best + 1
        else:
            since_best += 1
        if since_best >= patience:
            result.stopped_early = epoch < max_epochs
            break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    logger.info(
        "trained %d epochs in %.1f s; best validation loss %.4g at epoch %d",
        len(result.history),
        result.seconds,
        result.best_val_loss,
        result.best_epoch,
    )
    return result


# -- beamtime sample ----------------------------------------------------------------------------
@dataclass
class Sample:
    """Patterns drawn for training and where they come from."""

    patterns: np.ndarray  # (k, n, n, n) float32, all usable
    scans: list[str]
    index: np.ndarray  # (k, 3) int: scan number, y, x
    grid: dict[str, Any]
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray]
    candidates: dict[str, int]
    source: str  # 'label' or 'valid'
    fingerprint: str


def _scan_candidates(ds: Any) -> tuple[np.ndarray, str]:
    valid = np.asarray(ds["valid"].values, dtype=bool)
    if "label" in ds and ds.attrs.get("particles"):
        return (np.asarray(ds["label"].values) > 0) & valid, "label"
    return valid, "valid"


@dataclass
class _Draw:
    """Which pixels a training sample takes (before any pattern is read) and its fingerprint."""

    datasets: dict[str, Any]
    scans: list[str]
    pixels: list[tuple[np.ndarray, np.ndarray]]  # (ys, xs) per scan
    candidates: dict[str, int]
    source: str
    fingerprint: str
    grid: dict[str, Any]
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray]


def _draw(manifest: Manifest, size: int | None, seed: int | None, scans: list[str] | None) -> _Draw:
    """Choose the sample's pixels: proportional across scans, seeded within each scan.

    Reads only the ``valid``/``label`` maps; the fingerprint is the drawn pixels and the reduce
    fingerprints of their scans, so a trained model can be recognised without reading patterns.
    """
    settings = manifest.features
    size = settings.sample_size if size is None else size
    seed = settings.seed if seed is None else seed
    root = manifest.layout.results
    names = manifest.select_scans(scans, error=FeatureError)
    rng = np.random.default_rng(seed)
    cands: dict[str, np.ndarray] = {}
    datasets: dict[str, Any] = {}
    sources = set()
    for name in names:
        check_interrupted()
        try:
            ds = open_results(root, name)
        except FileNotFoundError:
            logger.warning("scan '%s' has no reduce result; left out of training", name)
            continue
        if "pattern" not in ds:
            raise FeatureError(
                f"scan '{name}' in {root} has no q-grid patterns; reduce with patterns "
                "(`spndi reduce`) before training"
            )
        mask, source = _scan_candidates(ds)
        sources.add(source)
        cands[name], datasets[name] = np.flatnonzero(mask), ds
    total = sum(len(c) for c in cands.values())
    if total == 0:
        raise FeatureError(
            f"no pixels with signal in any reduced scan of {root}: nothing to train on"
        )
    # proportional allocation (largest remainder), then a seeded draw within each scan
    share = {n: len(c) * min(1.0, size / total) for n, c in cands.items()}
    take = {n: int(np.floor(s)) for n, s in share.items()}
    for n in sorted(share, key=lambda n: share[n] - take[n], reverse=True)[
        : min(size, total) - sum(take.values())
    ]:
        take[n] += 1
    pixels, scans = [], []
    for name, c in cands.items():
        if not take[name]:
            continue
        flat = np.sort(rng.choice(c, size=take[name], replace=False))
        pixels.append(np.unravel_index(flat, datasets[name]["valid"].shape))
        scans.append(name)
    key = {
        "reduce": {n: datasets[n].attrs.get("spndi_dask", {}).get("fingerprint") for n in scans},
        "pixels": dask.base.tokenize([(ys.tobytes(), xs.tobytes()) for ys, xs in pixels], scans),
    }
    first = datasets[scans[0]]
    return _Draw(
        datasets=datasets,
        scans=scans,
        pixels=pixels,
        candidates={n: len(c) for n, c in cands.items()},
        source="label" if sources == {"label"} else "valid" if sources == {"valid"} else "mixed",
        fingerprint=dask.base.tokenize(json.dumps(key, sort_keys=True)),
        grid=dict(first.attrs["q_grid"]),
        offsets=tuple(np.asarray(first[d].values) for d in ("dq_x", "dq_y", "dq_z")),  # type: ignore[arg-type]
    )


def _parts(draw: _Draw) -> list[Any]:
    """The drawn patterns of each scan: lazy ``vindex`` selections, (k_scan, n, n, n)."""
    return [
        draw.datasets[name]["pattern"].data.vindex[ys, xs]
        for name, (ys, xs) in zip(draw.scans, draw.pixels, strict=True)
    ]


def _assemble(parts: list[np.ndarray], draw: _Draw) -> Sample:
    """The sample from the scans' drawn patterns; masked (NaN) or empty patterns are dropped."""
    patterns = np.concatenate(parts, axis=0).astype(np.float32, copy=False)
    index = np.concatenate(
        [np.stack([np.full(len(ys), i), ys, xs], axis=1) for i, (ys, xs) in enumerate(draw.pixels)],
        axis=0,
    )
    ok = K.usable_patterns(patterns)
    if not ok.all():
        logger.info("%d drawn patterns are masked (NaN) or empty; left out", int((~ok).sum()))
    patterns, index = patterns[ok], index[ok]
    if not len(patterns):
        raise FeatureError("all drawn patterns are masked or empty")
    return Sample(
        patterns=patterns,
        scans=draw.scans,
        index=index,
        grid=draw.grid,
        offsets=draw.offsets,
        candidates=draw.candidates,
        source=draw.source,
        fingerprint=draw.fingerprint,
    )


def _read(draw: _Draw, progress: bool) -> Sample:
    """Read the drawn patterns into this process (``vindex``, one computation)."""
    return _assemble(compute(_parts(draw), progress), draw)


@renamed_keyword(particles="scans")
def sample_patterns(
    manifest: Manifest,
    *,
    size: int | None = None,
    seed: int | None = None,
    scans: list[str] | None = None,
    progress: bool = False,
) -> Sample:
    """Draw up to ``size`` pixels across all (or the named) reduced scans; read their patterns.

    Pixels come from segmented particles (``label > 0``) where ``spndi stats`` ran, else from
    every pixel with signal (``valid``); each scan contributes in proportion to its candidates.
    Only the drawn patterns are read (``vindex`` on the lazy arrays, one computation).
    """
    return _read(_draw(manifest, size, seed, scans), progress)


def _training_key(settings: FeatureSettings, sample: Sample | _Draw) -> str:
    fields = settings.model_dump(mode="json")
    fields.pop("checkpoint", None)
    fields.pop("device", None)
    fields.pop("block", None)
    for name in ("recipe", "weights", "weight_decay", "rotate_step"):  # added later: at their
        if fields[name] == FeatureSettings.model_fields[name].default:  # defaults the key of
            fields.pop(name)  # an existing default checkpoint stays the same
    return dask.base.tokenize(sample.fingerprint, json.dumps(fields, sort_keys=True), __version__)


#: ``[features]`` settings that are keyword arguments of :func:`fit`
FIT_SETTINGS = {
    "validation_fraction",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "rotate_step",
    "max_epochs",
    "patience",
    "min_improvement",
    "seed",
}


@contextmanager
def _all_cores(device: torch.device) -> Iterator[None]:
    """Torch on every usable core of this process while it trains on the CPU.

    A distributed LocalCluster started in this process sets ``OMP_NUM_THREADS=1`` here (for its
    workers), so torch, first used after that, would train on one thread.
    """
    old = torch.get_num_threads()
    if device.type == "cpu":
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(len(cores) if cores else (os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class _Fitted:
    """A fit of the sample and where it ran (what a training task sends back)."""

    result: TrainingResult  # its model on the CPU
    meta: dict[str, Any]  # kind, hyper, normalisation
    sample: Sample  # without its patterns
    device: str
    threads: int
    worker: str | None = None


def _fit_sample(
    sample: Sample,
    settings: FeatureSettings,
    device: str | torch.device,
    *,
    callback: EpochCallback | None = None,
) -> _Fitted:
    """Model inputs of the sample, the seeded model, :func:`fit` on all cores of this process."""
    dev = resolve_device(device) if isinstance(device, str) else device
    hyper = hyper_parameters(settings, sample.grid["n"])
    norm = normalisation(settings, sample.grid)
    meta: dict[str, Any] = {"kind": settings.model, "hyper": hyper, "normalisation": norm}
    inputs = model_inputs(sample.patterns, meta, yx=sample.index[:, 1:], offsets=sample.offsets)
    torch.manual_seed(settings.seed)  # the initial weights too: the same model in any process
    model = build_model(settings.model, **hyper)
    logger.info(
        "training %s on %d patterns from %d scans (%s) on %s",
        settings.model,
        len(inputs),
        len(sample.scans),
        sample.source,
        dev,
    )
    with _all_cores(dev):
        threads = torch.get_num_threads()
        kwargs = settings.model_dump(include=FIT_SETTINGS)
        result = fit(model, inputs, device=dev, callback=callback, **kwargs)
    result.model = result.model.cpu()
    return _Fitted(result, meta, sample, str(dev), threads)


def _fit_task(
    parts: list[np.ndarray],
    draw: _Draw,
    settings: FeatureSettings,
    device: str,
    *,
    callback: EpochCallback | None = None,
) -> _Fitted:
    """On the training worker: the sample from the parts the workers read, fitted there."""
    from distributed import get_worker

    address = get_worker().address
    try:
        fitted = _fit_sample(_assemble(parts, draw), settings, device, callback=callback)
    except FeatureError as exc:
        raise FeatureError(f"worker {address}: {exc}") from None
    fitted.sample = dataclasses.replace(fitted.sample, patterns=fitted.sample.patterns[:0])
    fitted.worker = address
    return fitted


def _fit_on_worker(
    client: Any,
    draw: _Draw,
    settings: FeatureSettings,
    device: str,
    *,
    callback: EpochCallback | None,
    progress: bool,
) -> _Fitted:
    """The fit as one task on the worker :func:`choose_worker` picks; the workers read the sample.

    The drawn patterns are computed on the workers and move to the training worker as the
    task's arguments; the client receives only the epochs' rows and the trained weights.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cuda = None
    if device == "cuda":
        cuda = {a for a, ok in client.run(torch.cuda.is_available).items() if ok}
    target = choose_worker(workers, device=device, cuda=cuda) if workers else {}
    if target is None:
        raise FeatureError(
            "device 'cuda' was asked for but no dask worker sees a CUDA GPU; use --device cpu "
            "or auto, or start GPU workers (cluster_configs/slurm-gpu.yaml)"
        )
    logger.info("training on %s", target.get("workers", target.get("resources", "any worker")))
    parts = client.compute(_parts(draw))
    try:
        if progress:
            from distributed import progress as show_progress

            show_progress(parts)
        light = dataclasses.replace(draw, datasets={})
        fitted, _ = run_on_worker(
            client,
            _fit_task,
            parts,
            light,
            settings,
            device,
            target=target,
            callback=callback,
            final_rows=lambda f: f.result.history,
        )
    finally:
        client.cancel(parts)  # the sample's memory on the workers
    return fitted


@renamed_keyword(particles="scans")
def train(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    force: bool = False,
    device: str | None = None,
    progress: bool = False,
    callback: EpochCallback | None = None,
    on_worker: bool | None = None,
    weights: str | Path | None = None,
) -> dict[str, Any]:
    """Train the ``[features]`` model on a beamtime sample; write ``<output>/features/model``.

    With ``weights`` (or ``[features] weights``; recipe ``study``) nothing is trained: the
    original study's released state_dict is loaded into the study model
    (:func:`~spndi_dask.features.checkpoint.load_study_weights`) and written as the checkpoint.

    Parameters
    ----------
    manifest : Manifest
    scans : list of str, optional
        Draw from these scans only (default: all reduced ones).
    force : bool
        Retrain even if the checkpoint was trained on the same sample with the same settings.
    device : {'auto', 'cpu', 'cuda'}, optional
        Default ``[features] device``; ``auto`` is resolved where the model trains.
    progress : bool
        A progress bar while the sample is read.
    callback : callable, optional
        Called with each epoch's row (``epoch``, ``max_epochs``, ``train_loss``, ``val_loss``,
        ``seconds``) as the epoch ends, in this thread, also when the fit runs on a worker.
    on_worker : bool, optional
        Fit as a task on a dask worker (see :mod:`spndi_dask.features.remote`); default: when
        a distributed client is active. ``False`` fits in this process.
    weights : str or Path, optional
        The study's released weights (a PyTorch state_dict ``.pkl``) to load instead of
        training; default ``[features] weights`` (relative to the manifest).

    Returns
    -------
    dict
        ``status`` ('trained' or 'up to date'), ``checkpoint``, ``n_train``, ``n_val``,
        ``epochs``, ``best_val_loss``, ``seconds``, ``device``, ``worker`` (the address, or
        None in this process) and ``threads`` (torch threads of the fit).
    """
    settings = manifest.features
    device = device or settings.device
    client = active_client() if on_worker is not False else None
    if on_worker and client is None:
        raise FeatureError("on_worker=True needs an active dask distributed Client")
    if client is None:
        resolve_device(device)  # 'cuda' without a GPU: say so before reading anything
    t0 = time.perf_counter()
    if weights is None and settings.weights:
        weights = manifest.resolve(settings.weights)
    if weights is not None:
        return _from_study_weights(manifest, Path(weights), scans, force=force)
    draw = _draw(manifest, None, None, scans)
    out = manifest.layout.checkpoint
    key = _training_key(settings, draw)
    if not force and out.exists():
        try:
            _, meta = load_checkpoint(out)
            if meta.get("training", {}).get("key") == key:
                return {"status": Outcome.UP_TO_DATE, "checkpoint": str(out), "seconds": 0.0}
        except (ValueError, OSError) as exc:  # unreadable: retrain over it
            logger.warning("existing checkpoint %s is unusable (%s); retraining", out, exc)
    if client is None:
        fitted = _fit_sample(_read(draw, progress), settings, device, callback=callback)
    else:
        fitted = _fit_on_worker(
            client, draw, settings, device, callback=callback, progress=progress
        )
    result, meta, sample = fitted.result, fitted.meta, fitted.sample
    meta.update(
        {
            "grid": sample.grid,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "training": {
                "key": key,
                "fingerprint": sample.fingerprint,
                "scans": {
                    n: int((sample.index[:, 0] == i).sum()) for i, n in enumerate(sample.scans)
                },
                "candidates": sample.candidates,
                "source": sample.source,
                "n_train": result.n_train,
                "n_val": result.n_val,
                "epochs": len(result.history),
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "stopped_early": result.stopped_early,
                "history": result.history,
                "seed": settings.seed,
                "device": fitted.device,
                "threads": fitted.threads,
                "worker": fitted.worker,
                "seconds": round(time.perf_counter() - t0, 2),
                "settings": settings.model_dump(mode="json"),
            },
        }
    )
    with deferred():  # weights and their JSON copy both, or neither
        path = save_checkpoint(result.model, out, meta)
    return {
        "status": Outcome.TRAINED,
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "seconds": round(time.perf_counter() - t0, 2),
        "device": fitted.device,
        "worker": fitted.worker,
        "threads": fitted.threads,
    }


def _from_study_weights(
    manifest: Manifest, weights: Path, scans: list[str] | None, *, force: bool
) -> dict[str, Any]:
    """The checkpoint of the study model with the study's released ``weights`` (no training)."""
    settings = manifest.features
    if settings.recipe != "study":
        raise FeatureError(
            f"study weights {weights} load into the study model only; set [features] recipe = "
            "'study' in the manifest"
        )
    t0 = time.perf_counter()
    draw = _draw(manifest, None, None, scans)  # the q grid (reads valid/label maps only)
    if not weights.exists():
        raise FeatureError(
            f"study weights {weights} do not exist; give the path of the study's "
            "models/.../diffractiontest_best.pkl ([features] weights or --weights)"
        )
    digest = sha256_file(weights)
    key = _training_key(settings, draw) + ":" + digest
    out = manifest.layout.checkpoint
    if not force and out.exists():
        try:
            _, meta = load_checkpoint(out)
            if meta.get("training", {}).get("key") == key:
                return {"status": Outcome.UP_TO_DATE, "checkpoint": str(out), "seconds": 0.0}
        except (ValueError, OSError) as exc:
            logger.warning("existing checkpoint %s is unusable (%s); rewriting", out, exc)
    hyper = hyper_parameters(settings, draw.grid["n"])
    model = build_model("foldingnet", **hyper)
    try:
        load_study_weights(weights, model)
    except ValueError as exc:  # CheckpointError
        raise FeatureError(str(exc)) from None
    meta: dict[str, Any] = {
        "kind": "foldingnet",
        "hyper": hyper,
        "normalisation": normalisation(settings, draw.grid),
        "grid": draw.grid,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "key": key,
            "weights": str(weights),
            "weights_sha256": digest,
            "epochs": 0,
            "settings": settings.model_dump(mode="json"),
        },
    }
    with deferred():
        path = save_checkpoint(model.eval(), out, meta)
    logger.info("study weights %s written as checkpoint %s", weights, path)
    return {
        "status": Outcome.TRAINED,
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "n_train": 0,
        "n_val": 0,
        "epochs": 0,
        "best_epoch": 0,
        "best_val_loss": float("nan"),
        "seconds": round(time.perf_counter() - t0, 2),
        "device": "cpu",
        "worker": None,
        "threads": torch.get_num_threads(),
        "weights": str(weights),
    }
