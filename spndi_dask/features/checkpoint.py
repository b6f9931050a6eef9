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

The original study's released weights (``diffractiontest_best.pkl``) are a plain PyTorch
state_dict of its ``ReconstructionNet`` (``encoder.*``, ``decoder.*``, 1×1 ``Conv1d`` layers);
:func:`load_study_weights` reads one with ``torch.load(weights_only=True)`` and maps its names
(:data:`STUDY_NAMES`) onto the study variant of :class:`~spndi_dask.features.model.FoldingNet`.
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
    "STUDY_HYPER",
    "STUDY_NAMES",
    "CheckpointError",
    "check_grid",
    "load_checkpoint",
    "load_study_weights",
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


#: the study's layer names (``ReconstructionNet`` state_dict prefixes) → this FoldingNet's
STUDY_NAMES = {
    "encoder.mlp1.0": "mlp1.0",
    "encoder.mlp1.2": "mlp1.2",
    "encoder.mlp1.4": "mlp1.4",
    "encoder.linear1": "graph1.0",
    "encoder.conv1": "graph1.1",
    "encoder.linear2": "graph2.0",
    "encoder.conv2": "graph2.1",
    "encoder.mlp2.0": "mlp2.0",
    "encoder.mlp2.2": "mlp2.2",
    "decoder.folding1.0": "fold1.0",
    "decoder.folding1.2": "fold1.2",
    "decoder.folding1.4": "fold1.4",
    "decoder.folding2.0": "fold2.0",
    "decoder.folding2.2": "fold2.2",
    "decoder.folding2.4": "fold2.4",
}

#: FoldingNet constructor arguments of the study's released run (its log.txt: k=32,
#: feat_dims=512, num_points=2048, shape='gaussian')
STUDY_HYPER = {
    "n_points": 2048,
    "latent_dim": 512,
    "k": 32,
    "hidden": 512,
    "local_feature": "study",
    "source": "gaussian",
    "chamfer": "sum",
}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path} carries pickled code and is refused (only tensors and plain values are "
            f"loaded; torch says: {first}). Re-save the weights as a plain state_dict "
            "(torch.save(model.state_dict(), path))"
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable torch file: {exc}") from None


def load_study_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load the original study's released state_dict at ``path`` into ``model`` (in place).

    ``model`` is a study-variant FoldingNet (``build_model("foldingnet", **STUDY_HYPER)``).
    A ``module.`` prefix (DataParallel) is dropped; 1×1 ``Conv1d`` weights ``(out, in, 1)``
    become ``Linear`` weights ``(out, in)``.

    Raises
    ------
    CheckpointError
        Pickled code (refused), not a state_dict, names missing or unknown, or a shape that
        does not fit (the first mismatch is named with both shapes).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"study weights {path} do not exist; give the path of the study's "
            "models/.../diffractiontest_best.pkl ([features] weights or --weights)"
        )
    obj = _torch_load(path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} is not a PyTorch state_dict (a dict of tensors), as the study's "
            "diffractiontest_best.pkl is"
        )
    theirs = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for old, new in STUDY_NAMES.items():
        for leaf in ("weight", "bias"):
            name = f"{old}.{leaf}"
            if name not in theirs:
                raise CheckpointError(
                    f"{path} has no parameter {name!r} of the study's FoldingNet "
                    f"(encoder 'foldnet', decoder 'gaussian'); is it a checkpoint of another "
                    "encoder (dgcnn_*) or shape (plane, sphere)?"
                )
            t = theirs.pop(name)
            want = ours[f"{new}.{leaf}"].shape
            if t.ndim == 3 and t.shape[-1] == 1 and len(want) == 2:
                t = t[..., 0]
            if t.shape != want:
                raise CheckpointError(
                    f"{path}: parameter {name!r} has shape {tuple(_obj_shape(obj, name))} but the "
                    f"study model expects {tuple(want)} ({new}.{leaf}); these weights were "
                    "trained with other sizes (feat_dims, k or shape) than the study's released "
                    "run: use the study's diffractiontest_best.pkl or train with recipe = 'study'"
                )
            mapped[f"{new}.{leaf}"] = t.to(ours[f"{new}.{leaf}"].dtype)
    if theirs:
        raise CheckpointError(
            f"{path} has parameters the study's FoldingNet does not: {sorted(theirs)[:5]}; is "
            "it a checkpoint of another encoder (dgcnn_*)?"
        )
    model.load_state_dict(mapped)
    return model


def _obj_shape(obj: dict[str, torch.Tensor], name: str) -> torch.Size:
    """The shape of parameter ``name`` in a state_dict, with or without ``module.``."""
    return (obj[name] if name in obj else obj["module." + name]).shape


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
        obj = _torch_load(path)
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
