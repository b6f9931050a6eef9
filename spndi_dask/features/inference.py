"""Distributed encoding of every pixel's pattern into ``latent(y, x, feature)``.

The lazy layer is :func:`latent_array`: ``map_blocks`` over ``block × block`` pixel tiles of the
``pattern`` array. A task carries only the checkpoint's path; each worker process loads the
model once (:class:`ModelPlugin` at registration, or the per-process cache on first use) and
keeps it. Torch threads per worker are set so that threads × worker threads ≤ cores of the
host; CUDA is used where a worker sees a GPU (``device='auto'``) and tasks are routed to
workers that declare a ``GPU`` resource when there are any.

Pixels whose pattern is masked (NaN) or empty, and pixels without signal, are not encoded and
stay NaN.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from distributed.diagnostics.plugin import WorkerPlugin
from torch import nn

from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import active_client, compute_each
from spndi_dask.config import Manifest
from spndi_dask.features import _kernels as K
from spndi_dask.features.checkpoint import check_grid, load_checkpoint
from spndi_dask.features.train import (
    FeatureError,
    checkpoint_path,
    model_inputs,
    resolve_device,
)
from spndi_dask.interrupt import check_interrupted
from spndi_dask.io.hashing import sha256_file
from spndi_dask.io.integrity import read
from spndi_dask.io.results_store import mark_complete, open_results, replace_array
from spndi_dask.stages import Outcome, StageError

__all__ = [
    "ModelPlugin",
    "cached_model",
    "encode",
    "encode_patterns",
    "latent_array",
    "torch_threads",
]

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[Any, ...], tuple[nn.Module, dict[str, Any], torch.device]] = {}
_LOCK = threading.Lock()


def cached_model(checkpoint: str, device: str = "auto") -> tuple[nn.Module, dict[str, Any], Any]:
    """``(model, metadata, torch.device)`` of a checkpoint, loaded once per process.

    Keyed by path, modification time and size: a retrained checkpoint is loaded again.
    """
    p = Path(checkpoint)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, device)
    with _LOCK:
        if key not in _CACHE:
            dev = resolve_device(device)
            model, meta = load_checkpoint(p, device=dev)
            _CACHE.clear()
            _CACHE[key] = (model, meta, dev)
            logger.debug("pid %d loaded %s on %s", os.getpid(), p, dev)
        return _CACHE[key]


#: Inference batch on CPU. Small batches keep the conv3d activations in cache and below glibc's
#: mmap threshold: one core encodes ~1450 patterns/s (32³, normalisation included) in batches of
#: 32 against ~1050 in batches of 256. A GPU takes a whole tile per batch.
CPU_BATCH = 32


def _batch_size(batch: int | None, device: Any, n: int) -> int:
    if batch:
        return int(batch)
    return max(n, 1) if torch.device(device).type == "cuda" else CPU_BATCH


def _encode_inputs(
    model: nn.Module, inputs: np.ndarray, device: Any, batch: int | None
) -> np.ndarray:
    batch = _batch_size(batch, device, len(inputs))
    out = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            xb = torch.from_numpy(np.ascontiguousarray(inputs[i : i + batch])).to(device)
            out.append(model.encode(xb).float().cpu().numpy())
    return np.concatenate(out, axis=0)


def encode_patterns(
    patterns: np.ndarray,
    model: nn.Module,
    meta: dict[str, Any],
    *,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    mask: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
    batch: int | None = None,
    device: Any = "cpu",
) -> np.ndarray:
    """Latent vectors ``(ty, tx, latent_dim)`` of a tile of patterns ``(ty, tx, n, n, n)``.

    The single-process reference of :func:`latent_array`. Pixels outside ``mask`` or with an
    unusable pattern (NaN, empty) are NaN. ``origin`` is the tile's first scan pixel (it seeds
    the point clouds of FoldingNet).
    """
    ty, tx = patterns.shape[:2]
    f = int(meta["hyper"]["latent_dim"])
    out = np.full((ty * tx, f), np.nan, dtype=np.float32)
    flat = patterns.reshape(ty * tx, *patterns.shape[2:])
    grid_input = meta["normalisation"]["patterns"] == "unit_sum_log1p"
    if grid_input:
        x, ok = K.normalise_patterns(flat, return_usable=True)
    else:
        ok = K.usable_patterns(flat)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool).reshape(ty * tx)
    sel = np.flatnonzero(ok)
    if len(sel):
        if grid_input:
            inputs = x if len(sel) == len(x) else x[sel]
        else:
            if offsets is None:
                raise ValueError("point-cloud models need the grid offsets")
            yx = np.stack([sel // tx + origin[0], sel % tx + origin[1]], axis=1)
            inputs = model_inputs(flat[sel], meta, yx=yx, offsets=offsets)
        out[sel] = _encode_inputs(model, inputs, device, batch)
    return out.reshape(ty, tx, f)


def _encode_block(
    patterns: np.ndarray | None,
    mask: np.ndarray,
    *,
    checkpoint: str,
    device: str,
    batch: int | None,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    source: zarr.Array | None = None,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """Encode one tile; with ``source`` the tile's patterns are read here (no transfer)."""
    model, meta, dev = cached_model(checkpoint, device)
    loc = (
        block_info[0]["array-location"] if block_info else [(0, mask.shape[0]), (0, mask.shape[1])]
    )
    (y0, y1), (x0, x1) = loc[0], loc[1]
    if source is not None:
        patterns = read(source, (slice(y0, y1), slice(x0, x1)))
    return encode_patterns(
        patterns,  # type: ignore[arg-type]
        model,
        meta,
        offsets=offsets,
        mask=mask.reshape(mask.shape[0], mask.shape[1]),
        origin=(y0, x0),
        batch=batch,
        device=dev,
    )


def _encode_with_source(
    mask: np.ndarray, *, block_info: dict[Any, Any] | None = None, **kwargs: Any
) -> np.ndarray:
    if block_info is None:  # dask passes it only to functions that name it
        raise RuntimeError("reading a tile from the pattern store needs dask's block_info")
    return _encode_block(None, mask, block_info=block_info, **kwargs)


def latent_array(
    patterns: da.Array | zarr.Array,
    mask: da.Array,
    checkpoint: str | Path,
    *,
    latent_dim: int,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    device: str = "auto",
    block: int = 16,
    batch: int | None = None,
) -> da.Array:
    """Lazy ``latent (y, x, latent_dim)`` float32 of ``patterns (y, x, n, n, n)``.

    ``patterns`` is a lazy dask array, or a ``zarr.Array`` that each task reads its tile of
    itself (one task per tile, no pattern bytes between workers: what :func:`encode` uses).
    ``mask (y, x)`` selects the pixels to encode. One task per ``block × block`` tile; the
    task holds the checkpoint's path, never the model. ``batch`` defaults to the whole tile on a
    GPU and :data:`CPU_BATCH` on CPU.
    """
    ny, nx = patterns.shape[:2]
    chunks = (min(block, ny), min(block, nx))
    common = {
        "checkpoint": str(checkpoint),
        "device": device,
        "batch": batch,
        "offsets": tuple(np.asarray(o) for o in offsets),
    }
    name = "encode-" + dask.base.tokenize(
        patterns if isinstance(patterns, da.Array) else (str(patterns.store), patterns.path),
        mask,
        common,
        block,
    )
    mask = mask.astype(bool).rechunk(chunks)
    if not isinstance(patterns, da.Array):
        return da.map_blocks(
            _encode_with_source,
            mask,
            source=patterns,
            **common,
            new_axis=[2],
            chunks=(*mask.chunks, (latent_dim,)),
            dtype=np.float32,
            meta=np.empty((0, 0, 0), np.float32),
            name=name,
        )
    patterns = patterns.rechunk((*chunks, -1, -1, -1))
    return da.map_blocks(
        _encode_block,
        patterns,
        mask[:, :, None, None, None],
        **common,
        drop_axis=[2, 3, 4],
        new_axis=[2],
        chunks=(*patterns.chunks[:2], (latent_dim,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        name=name,
    )


# -- workers ------------------------------------------------------------------------------------
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(client: Any) -> dict[str, int]:
    """Torch threads per worker address: the host's cores ÷ the worker threads on that host."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(_cores)
    per_host: dict[str, int] = defaultdict(int)
    for w in workers.values():
        per_host[w["host"]] += int(w["nthreads"])
    return {
        addr: max(1, int(cores.get(addr, 1)) // max(1, per_host[w["host"]]))
        for addr, w in workers.items()
    }


class ModelPlugin(WorkerPlugin):
    """Worker plugin: set torch threads and load the checkpoint once in every worker process."""

    name = "spndi-features-model"

    def __init__(self, checkpoint: str, device: str, threads: dict[str, int]) -> None:
        self.checkpoint, self.device, self.threads = str(checkpoint), device, threads

    def setup(self, worker: Any) -> None:
        n = self.threads.get(worker.address)
        if n:
            torch.set_num_threads(n)
        cached_model(self.checkpoint, self.device)


def _gpu_workers(client: Any) -> bool:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU") for w in workers)


# -- orchestration ------------------------------------------------------------------------------
def _fingerprint(ds: Any, digest: str) -> str:
    reduce_fp = ds.attrs.get("spndi_dask", {}).get("fingerprint")
    return dask.base.tokenize(reduce_fp, digest, __version__)


def _prepare_node(node: Path, shape: tuple[int, int], latent_dim: int, block: int) -> zarr.Array:
    """An empty (NaN) ``latent`` array in a scan's node; the node's features attrs dropped."""
    return replace_array(
        node,
        "latent",
        stage="features",
        dims=["y", "x", "feature"],
        long_name="autoencoder latent vector (NaN = not encoded)",
        shape=(*shape, latent_dim),
        dtype=np.float32,
        chunks=(min(block, shape[0]), min(block, shape[1]), latent_dim),
        fill_value=np.nan,
    )


@renamed_keyword(particles="scans")
def encode(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Encode every pixel with signal of every (or the named) reduced scan; write ``latent``.

    All scans are encoded in one distributed computation (on the active dask client if any).

    Returns
    -------
    dict
        Per scan: ``status`` ('encoded', 'up to date' or 'failed'), ``pixels`` (encoded),
        ``seconds``, and ``warning`` / ``error``.
    """
    settings = manifest.features
    device = device or settings.device
    ckpt = Path(checkpoint) if checkpoint else checkpoint_path(manifest)
    _, meta = load_checkpoint(ckpt)
    root = manifest.layout.results
    grid = dict(zarr.open_group(str(root), mode="r").attrs).get("q_grid")
    if not grid:
        raise FeatureError(f"{root} has no q grid: reduce with patterns before encoding")
    check_grid(meta, grid, checkpoint=ckpt, results=root)
    digest = sha256_file(ckpt)
    latent_dim = int(meta["hyper"]["latent_dim"])
    names = manifest.select_scans(scans, error=FeatureError)
    summary: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[str, Any, Any, str, int]] = []
    for name in names:
        check_interrupted()
        try:
            ds = open_results(root, name)
        except (FileNotFoundError, RuntimeError, StageError) as exc:
            summary[name] = {"status": Outcome.FAILED, "error": str(exc)}
            continue
        if "pattern" not in ds:
            summary[name] = {
                "status": Outcome.FAILED,
                "error": f"scan '{name}' has no patterns",
            }
            continue
        fp = _fingerprint(ds, digest)
        done = ds.attrs.get("features", {})
        if not force and done.get("fingerprint") == fp and "latent" in ds:
            summary[name] = {
                "status": Outcome.UP_TO_DATE,
                "pixels": done.get("pixels"),
                "seconds": 0.0,
            }
            continue
        try:
            valid = np.asarray(ds["valid"].values)
        except StageError as exc:  # a damaged map
            summary[name] = {"status": Outcome.FAILED, "error": str(exc)}
            continue
        mask = da.from_array(valid)
        n_mask = int(valid.sum())
        arr = _prepare_node(root / name, ds["valid"].shape, latent_dim, settings.block)
        if n_mask == 0:
            logger.warning("scan '%s' has no pixels with signal; latent stays NaN", name)
            summary[name] = {"warning": "no pixels with signal: latent is all NaN"}
            jobs.append((name, None, arr, fp, 0))
            continue
        lat = latent_array(
            zarr.open_array(str(root / name / "pattern"), mode="r"),
            mask,
            ckpt,
            latent_dim=latent_dim,
            offsets=tuple(np.asarray(ds[d].values) for d in ("dq_x", "dq_y", "dq_z")),
            device=device,
            block=settings.block,
        )
        jobs.append((name, lat, arr, fp, n_mask))
    if not jobs:
        return summary
    client = active_client()
    annotations: dict[str, Any] = {}
    if client is None:
        resolve_device(device)  # 'cuda' without a GPU: say so before any work
    else:
        if device == "cuda" and not any(client.run(torch.cuda.is_available).values()):
            raise FeatureError(
                "device 'cuda' was asked for but no dask worker sees a CUDA GPU; use "
                "--device cpu or auto, or start GPU workers (cluster_configs/slurm-gpu.yaml)"
            )
        client.register_plugin(ModelPlugin(str(ckpt), device, torch_threads(client)))
        if device != "cpu" and _gpu_workers(client):
            annotations["resources"] = {"GPU": 1}
    t0 = time.perf_counter()
    reading = [j for j in jobs if j[1] is not None]
    with dask.annotate(**annotations):
        stores = [da.store(lat, arr, lock=False, compute=False) for _, lat, arr, _, _ in reading]
    done = compute_each(stores, progress)  # one scan failing (a damaged chunk) stops no other
    errors = {j[0]: e for j, (_, e) in zip(reading, done, strict=True) if e is not None}
    seconds = round(time.perf_counter() - t0, 2)
    for name, lat, arr, fp, _ in jobs:
        check_interrupted()
        if name in errors:
            logger.error("scan '%s': encoding failed: %s", name, errors[name])
            summary[name] = {"status": Outcome.FAILED, "error": str(errors[name])}
            continue
        encoded = 0
        if lat is not None:
            encoded = int(np.isfinite(arr[:, :, 0]).sum())
        info = {
            "fingerprint": fp,
            "checkpoint": str(ckpt),
            "checkpoint_sha256": digest,
            "model": meta["kind"],
            "latent_dim": latent_dim,
            "pixels": encoded,
            "device": device,
            "version": __version__,
        }
        mark_complete(root / name, "features", info)
        summary[name] = {**summary.get(name, {}), "status": Outcome.ENCODED, "pixels": encoded}
        summary[name]["seconds"] = seconds
    return summary
