"""Autoencoder features: models, training, distributed encoding, PLY export.

``train`` fits the ``[features]`` model on a sample of pixels of the whole beamtime and writes a
checkpoint; ``encode`` writes ``latent(y, x, feature)`` for every reduced scan on the dask
workers; ``export_ply`` writes patterns as point clouds with intensity.
"""

from spndi_dask.features.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spndi_dask.features.inference import encode, encode_patterns, latent_array
from spndi_dask.features.model import Conv3dAutoencoder, FoldingNet, build_model, chamfer_distance
from spndi_dask.features.train import FeatureError, checkpoint_path, fit, sample_patterns, train

__all__ = [
    "CheckpointError",
    "Conv3dAutoencoder",
    "FeatureError",
    "FoldingNet",
    "build_model",
    "chamfer_distance",
    "checkpoint_path",
    "encode",
    "encode_patterns",
    "fit",
    "latent_array",
    "load_checkpoint",
    "sample_patterns",
    "save_checkpoint",
    "train",
]
