"""Model checkpoints: weights + JSON metadata, loaded without executing code.

The written format is safetensors (``.safetensors``): tensors plus a string metadata entry
``spndi_dask`` holding the JSON below. Loading also accepts a torch ``.pt`` file holding
``{"state_dict": {...}, "metadata": "<json>"}``, read with ``torch.load(weights_only=True)``;
a ``.pt`` that carries pickled code (classes, functions) is refused.

Metadata (JSON)::

    {"format": "spndi_dask.features/1", "kind": "conv3d" | "foldingnet",
     "hyper": {...constructor arguments...},
     "grid": {"h", "axes", "extent", "n"} | null,     # common q grid the model was trained on
     "normalisation": {...},                          # see features/_kernels.py
     "version": package version, "torch": torch version, "created": ISO time,
     "training": {"fingerprint", "n_train", "n_val", "epochs", "history", ...}}
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from spndi_dask._version import __version__
from spndi_dask.features.model import MODEL_KINDS, build_model
from spndi_dask.io.layout import atomic_path, write_text_atomic
from spndi_dask.stages import StageError

__all__ = [
    "FORMAT",
    "CheckpointError",
    "check_grid",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "spndi_dask.features/1"


class CheckpointError(StageError, ValueError):
    """A checkpoint that cannot be used (unsafe, unreadable, or made for other data)."""


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` (must contain ``kind`` and ``hyper``).

    A ``.safetensors`` file (any other suffix is replaced) and its metadata as ``.json`` beside
    it. Each is written to a temporary name first and moved into place, so a reader never sees
    half a checkpoint.
    """
    if metadata.get("kind") not in MODEL_KINDS or "hyper" not in metadata:
        raise ValueError("checkpoint metadata needs 'kind' (conv3d|foldingnet) and 'hyper'")
    meta = {"format": FORMAT, "version": __version__, "torch": torch.__version__, **metadata}
    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"spndi_dask": json.dumps(meta, default=_json)})
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, default=_json) + "\n")
    return path


def _json(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("spndi_dask")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file: {exc}"
            ) from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(
                f"checkpoint {path} carries pickled code and is refused (only tensors and plain "
                f"values are loaded; torch says: {first}). Use a checkpoint written by "
                "`spndi train` (.safetensors) or re-save the weights as a plain state_dict"
            ) from None
        except (RuntimeError, OSError, EOFError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is not a readable torch file: {exc}"
            ) from None
        if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
            raise CheckpointError(
                f"checkpoint {path} is not a spndi_dask checkpoint: a .pt file must hold "
                "{'state_dict': ..., 'metadata': '<json>'}"
            )
        tensors, raw = obj["state_dict"], obj["metadata"]
    if not raw:
        raise CheckpointError(f"checkpoint {path} has no spndi_dask metadata")
    try:
        meta = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: metadata is not JSON ({exc})") from None
    return tensors, meta


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model (in eval mode, on ``device``) and metadata of a checkpoint.

    Raises
    ------
    CheckpointError
        Unsafe (pickled code), unreadable, or not a spndi_dask checkpoint.

    Examples
    --------
    >>> import tempfile
    >>> from spndi_dask.features.model import Conv3dAutoencoder
    >>> m = Conv3dAutoencoder(grid=8, latent_dim=4)
    >>> p = save_checkpoint(m, tempfile.mkdtemp() + "/m", {"kind": "conv3d",
    ...                     "hyper": {"grid": 8, "latent_dim": 4}})
    >>> m2, meta = load_checkpoint(p)
    >>> meta["kind"], p.suffix
    ('conv3d', '.safetensors')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train one with `spndi train beamtime.toml`"
        )
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT or meta.get("kind") not in MODEL_KINDS:
        raise CheckpointError(
            f"checkpoint {path}: metadata format {meta.get('format')!r} / kind "
            f"{meta.get('kind')!r} is not a {FORMAT} checkpoint"
        )
    model = build_model(meta["kind"], **meta.get("hyper", {}))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model ({exc})") from None
    return model.to(device).eval(), meta


def check_grid(
    meta: dict[str, Any], grid: dict[str, Any], *, checkpoint: Any, results: Any
) -> None:
    """Raise if a checkpoint was trained on another q grid than the results' ``grid``.

    Patterns are offsets from each beamtime's own reference vector, so a model carries over to
    another beamtime when the grid size and extent agree.
    """
    trained = meta.get("grid")
    if trained is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} was not trained on beamtime patterns (no q grid in its "
            f"metadata); train one on {results} with `spndi train`"
        )
    same = trained.get("n") == grid.get("n") and np.allclose(
        np.asarray(trained.get("extent")), np.asarray(grid.get("extent")), rtol=1e-6, atol=0
    )
    if not same:
        ext = np.asarray(trained.get("extent"), dtype=float).tolist()
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained on a q grid of n={trained.get('n')} points, "
            f"half-extent {np.round(ext, 6).tolist()} 1/Å, but {results} has n={grid.get('n')}, "
            f"half-extent {np.round(np.asarray(grid.get('extent'), dtype=float), 6).tolist()} "
            "1/Å; retrain with `spndi train` on these results, or reduce with [reduce] "
            f"pattern_grid = {trained.get('n')} and pattern_extent = {ext}"
        )
