"""The processing-settings tables of a manifest, each optional, with documented defaults.

``[ingest]``, ``[reduce]``, ``[segment]``, ``[features]`` and ``[cluster]``: every key has a
default and a ``description``, which error messages quote as what is expected.

Examples
--------
>>> ReduceSettings().pattern_grid, FeatureSettings(model="foldingnet").latent_size
(32, 512)
>>> try:
...     IngestSettings(scan_chunk=(8, 8), scan_shard=(12, 12))
... except ValueError as exc:  # pydantic's ValidationError
...     print(exc.errors()[0]["msg"])
Value error, scan_shard [12, 12] must be a multiple of scan_chunk [8, 8]
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from spndi_dask.config._base import SettingsModel

__all__ = [
    "STUDY_RECIPE",
    "AnalysisSettings",
    "ClusterSettings",
    "DecomposeSettings",
    "FeatureSettings",
    "IngestSettings",
    "ReduceSettings",
    "SegmentSettings",
]


class IngestSettings(SettingsModel):
    """``[ingest]``: raw frames -> ``raw.zarr`` layout and checks.

    The defaults were chosen by ``scripts/bench_ingest.py`` for the access pattern of ``reduce``
    (all angles of a scan tile, detector ROI tiles).
    """

    scan_chunk: tuple[PositiveInt, PositiveInt] = Field(
        (8, 8), description="scan points (y, x) per Zarr chunk, e.g. [8, 8]"
    )
    detector_chunk: tuple[PositiveInt, PositiveInt] = Field(
        (32, 32), description="detector pixels (rows, cols) per Zarr chunk, e.g. [32, 32]"
    )
    scan_shard: tuple[PositiveInt, PositiveInt] = Field(
        (16, 16), description="scan points (y, x) per shard (a multiple of scan_chunk)"
    )
    compressor: Literal["lz4", "zstd", "blosclz", "none"] = Field(
        "lz4", description="Blosc compressor: 'lz4' (fast, default), 'zstd', 'blosclz' or 'none'"
    )
    clevel: int = Field(5, ge=0, le=9, description="Blosc compression level 0-9")
    allow_incomplete: bool = Field(
        False, description="fill the missing points of aborted scans with 0 and mark them invalid"
    )
    bad_values: Literal["error", "zero"] = Field(
        "error", description="NaN/negative counts in float frames: 'error' or 'zero' (replace)"
    )
    invalid_value: Literal["auto", "none"] | NonNegativeInt = Field(
        "auto",
        description="detector value that flags a bad pixel (e.g. 4294967295 on Eiger/Pilatus): "
        "'auto' = the largest value of an unsigned integer dtype; such pixels are masked",
    )
    checksum: Literal["sha256", "none"] = Field(
        "sha256", description="content checksum of source files recorded in provenance"
    )

    @model_validator(mode="after")
    def _shard_multiple(self) -> IngestSettings:
        for s, c in zip(self.scan_shard, self.scan_chunk, strict=True):
            if s % c:
                raise ValueError(
                    f"scan_shard {list(self.scan_shard)} must be a multiple of scan_chunk "
                    f"{list(self.scan_chunk)}"
                )
        return self


class ReduceSettings(SettingsModel):
    """``[reduce]``: corrections, ROI, strain reference and the common q grid."""

    roi: Literal["auto"] | tuple[int, int, int, int] = Field(
        "auto", description="'auto' or detector [row_start, row_stop, col_start, col_stop]"
    )
    roi_padding: int = Field(8, ge=0, description="pixels added around the automatic ROI")
    strain_reference: Literal["particle_mean", "beamtime_median", "d0"] = Field(
        "particle_mean", description="'particle_mean', 'beamtime_median' or 'd0'"
    )
    d0_angstrom: PositiveFloat | None = Field(
        None, description="reference d-spacing in Å (required when strain_reference = 'd0')"
    )
    pattern_grid: PositiveInt = Field(32, description="points per axis of the common q grid")
    pattern_extent: Literal["auto"] | tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        "auto",
        description="'auto' or half-widths [x, y, z] (1/Å) of the common q grid along the crystal "
        "axes; 'auto' takes pattern_extent_sigma × the beamtime's mean peak widths",
    )
    pattern_extent_sigma: PositiveFloat = Field(
        3.5, description="half-width of the automatic q grid in standard deviations of the peak"
    )
    registration: Literal["auto", "xrf", "intensity", "none"] = Field(
        "auto",
        description="drift registration: 'xrf' (fluorescence maps), 'intensity' (the ROI "
        "intensity maps of neighbouring angles, chained), 'none', or 'auto' (xrf when recorded)",
    )
    registration_upsample: PositiveInt = Field(
        20, description="sub-pixel precision of the registration: 1/upsample scan pixels"
    )
    peak: Literal["moments", "gaussian"] = Field(
        "moments",
        description="peak centre and widths of each scan pixel: 'moments' (centre of mass and "
        "spread of the ROI, default) or 'gaussian' (a 3D Gaussian + constant fitted to the "
        "pixel's pattern on the common q grid; robust to a weak second peak)",
    )
    min_snr: PositiveFloat = Field(
        5.0, description="a scan pixel is valid when its ROI signal exceeds min_snr × its noise"
    )
    saturation: Literal["auto"] | PositiveFloat = Field(
        "auto",
        description="counts at or above which a detector value is saturated and masked ('auto': "
        "the maximum of an integer detector dtype)",
    )
    hot_sigma: PositiveFloat = Field(
        10.0, description="a pixel is hot when this many sigma above its neighbours at most angles"
    )
    detector_mask: str | None = Field(
        None, description="user detector mask (TIFF, .npy or HDF5 /mask), nonzero = bad pixel"
    )
    flat: str | None = Field(
        None, description="flat field (TIFF, .npy or HDF5 /flat): relative pixel efficiency"
    )

    @model_validator(mode="after")
    def _d0_given(self) -> ReduceSettings:
        if self.strain_reference == "d0" and self.d0_angstrom is None:
            raise ValueError("strain_reference = 'd0' needs d0_angstrom, e.g. d0_angstrom = 4.68")
        if self.roi != "auto":
            r0, r1, c0, c1 = self.roi
            if not (0 <= r0 < r1 and 0 <= c0 < c1):
                raise ValueError(
                    f"roi = {list(self.roi)} must be [row_start, row_stop, col_start, col_stop] "
                    "with 0 <= start < stop"
                )
        return self


class SegmentSettings(SettingsModel):
    """``[segment]``: particle segmentation (``spndi stats``).

    A scan's ``mask`` in the manifest (TIFF/.npy) replaces the automatic segmentation.
    """

    source: Literal["intensity", "xrf"] = Field(
        "intensity",
        description="image segmented: 'intensity' (ROI-integrated Bragg intensity, default) or "
        "'xrf' (drift-registered fluorescence, needs xrf in the manifest)",
    )
    method: Literal["otsu", "li", "triangle"] = Field(
        "otsu", description="threshold method: 'otsu', 'li' or 'triangle'"
    )
    smooth_sigma: float = Field(
        0.5, ge=0, description="Gaussian smoothing (scan pixels) before thresholding"
    )
    edge_fraction: float | None = Field(
        0.3,
        gt=0,
        lt=1,
        description="outline level as a fraction of the particle's median level above the "
        "background (probe-blurred edges); null: the threshold itself",
    )
    split_touching: bool = Field(
        True, description="split touching particles at the neck of their distance transform"
    )
    min_size: PositiveInt = Field(20, description="smallest particle kept (scan pixels)")
    erosion: int = Field(0, ge=0, description="erosion margin in scan pixels")


#: what ``[features] recipe = "study"`` sets (keys given in the manifest win, except ``model``)
STUDY_RECIPE = {
    "model": "foldingnet",
    "latent_dim": 512,
    "n_points": 2048,
    "k_neighbours": 32,
    "batch_size": 16,
    "learning_rate": 1e-4,
    "weight_decay": 1e-6,
    "rotate_step": 15.0,
}


class FeatureSettings(SettingsModel):
    """``[features]``: autoencoder training and encoding.

    ``recipe = "study"`` is the original study's FoldingNet recipe: it sets
    :data:`STUDY_RECIPE` for every key the manifest does not give (``model`` must be
    ``foldingnet``) and the study's local feature, Gaussian decoder source, summed Chamfer loss
    and point clouds (``features/_kernels.py``). ``spndi`` (conv3d) stays the default: on the
    demo it finds the true domains far better and trains ~100× faster per epoch on a CPU
    (``scripts/compare_recipes.py``; the numbers are in the README's Features section).
    """

    recipe: Literal["spndi", "study"] = Field(
        "spndi",
        description="'spndi' (default) or 'study' (the original study's FoldingNet recipe: "
        "k=32, Gaussian source points, batch 16, Adam lr 1e-4, weight decay 1e-6, 15° rotations)",
    )
    weights: str | None = Field(
        None,
        description="the original study's released weights (a PyTorch state_dict .pkl) to "
        "load into the study model instead of training (recipe 'study')",
    )
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    rotate_step: float | None = Field(
        None,
        gt=0,
        le=180,
        description="augment training clouds by random rotations in multiples of this many "
        "degrees in the cloud's (axis 0, axis 2) plane; null: none",
    )
    model: Literal["conv3d", "foldingnet"] = Field(
        "conv3d", description="'conv3d' (default) or 'foldingnet'"
    )
    latent_dim: Literal["auto"] | PositiveInt = Field(
        "auto", description="latent size; 'auto' = 32 for conv3d, 512 for foldingnet"
    )
    n_points: int = Field(2048, ge=16, description="points per cloud for foldingnet")
    k_neighbours: int = Field(16, ge=2, description="k of the foldingnet k-NN graph")
    cloud_threshold: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="foldingnet: voxels below this fraction of the max are left out",
    )
    checkpoint: str | None = Field(
        None, description="trained checkpoint to encode with (default <output>/features/model)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto', 'cpu' or 'cuda'")
    seed: int = Field(0, description="random seed for sampling and training")
    sample_size: PositiveInt = Field(
        8192, description="training patterns drawn across all scans of the beamtime"
    )
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="held-out share")
    max_epochs: PositiveInt = Field(40, description="upper bound on training epochs")
    patience: PositiveInt = Field(
        5, description="stop after this many epochs without a better validation loss"
    )
    min_improvement: float = Field(
        0.002, ge=0, lt=1, description="relative validation-loss gain that resets patience"
    )
    batch_size: PositiveInt = Field(64, description="training minibatch")
    learning_rate: PositiveFloat = Field(1e-3, description="Adam learning rate")
    block: PositiveInt = Field(
        16,
        description="inference task = block × block scan pixels (one batch per task on a GPU, "
        "batches of 32 on CPU)",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("recipe") != "study":
            return data
        if data.get("model", "foldingnet") != "foldingnet":
            raise ValueError(
                f"recipe 'study' is a foldingnet recipe but model = {data['model']!r}; remove "
                "model or set model = 'foldingnet'"
            )
        return {**STUDY_RECIPE, **data}

    @model_validator(mode="after")
    def _weights_need_study(self) -> FeatureSettings:
        if self.weights is not None and self.recipe != "study":
            raise ValueError(
                "weights (the study's released state_dict) load into the study model only; "
                "set recipe = 'study'"
            )
        if self.rotate_step is not None and self.model != "foldingnet":
            raise ValueError(
                "rotate_step rotates point clouds: it needs model = 'foldingnet' (or recipe = "
                "'study'); remove it for conv3d"
            )
        return self

    @property
    def latent_size(self) -> int:
        """The latent size of the chosen model."""
        if self.latent_dim == "auto":
            return 32 if self.model == "conv3d" else 512
        return int(self.latent_dim)


class DecomposeSettings(SettingsModel):
    """``[decompose]``: PCA and NMF of the particle pixels' patterns (``spndi decompose``)."""

    run: Literal["auto", "always", "never"] = Field(
        "auto",
        description="whether `spndi run` decomposes: 'auto' (when [cluster] features is 'pca' "
        "or 'nmf'), 'always' or 'never'",
    )
    pca_components: PositiveInt = Field(8, description="PCA components kept")
    nmf_components: PositiveInt = Field(6, description="NMF components")
    sample_size: PositiveInt = Field(
        2048,
        description="particle pixels drawn across all scans to fit on (seeded; every pixel is "
        "then projected)",
    )
    nmf_max_iter: PositiveInt = Field(400, description="iterations of the NMF fit")
    seed: int = Field(0, description="random seed of the sample and the fits")


class ClusterSettings(SettingsModel):
    """``[cluster]``: k-means over the latent vectors of all scans."""

    features: Literal["latent", "pca", "nmf", "moments"] = Field(
        "latent",
        description="what is clustered: 'latent' (autoencoder), 'pca' or 'nmf' (loadings of "
        "`spndi decompose`), 'moments' (d_spacing, tilt_x, tilt_y, width_x/y/z of reduce)",
    )
    k: Literal["auto"] | PositiveInt = Field("auto", description="'auto' (elbow) or a fixed K")
    k_min: PositiveInt = Field(1, description="smallest K tried by the elbow rule")
    k_max: Literal["auto"] | Annotated[int, Field(ge=2)] = Field(
        "auto",
        description="largest K tried by the elbow rule: 'auto' is the original study's range, "
        "15 for one scan and 80 for a joint clustering of several, capped at one K per "
        "`pixels_per_k` particle pixels; or a number ≥ 2",
    )
    pixels_per_k: PositiveInt = Field(
        100, description="k_max = 'auto': at most one K per this many particle pixels"
    )
    init: Literal["k-means||", "k-means++"] = Field(
        "k-means||", description="'k-means||' (default) or 'k-means++'"
    )
    n_init: PositiveInt = Field(4, description="restarts, the lowest inertia is kept")
    init_rounds: PositiveInt = Field(
        5, description="k-means|| oversampling rounds (5 suffice, Bahmani et al. 2012)"
    )
    scan_restarts: PositiveInt = Field(
        1, description="restarts per K while choosing K (the chosen K gets n_init)"
    )
    standardize: Literal["minmax", "zscore"] = Field(
        "minmax", description="'minmax' (as the original study) or 'zscore'"
    )
    seed: int = Field(0, description="random seed")
    elbow_fraction: float = Field(
        0.95, gt=0, le=1, description="elbow: smallest K explaining this share of the inertia drop"
    )
    silhouette_sample: PositiveInt = Field(
        5000, description="pixels drawn for the silhouette score of each K"
    )
    max_iter: PositiveInt = Field(300, description="Lloyd iterations per restart")
    tol: float = Field(1e-4, gt=0, description="convergence tolerance of k-means")
    engine: Literal["auto", "memory", "dask"] = Field(
        "auto",
        description="'auto': scikit-learn on a worker when the matrix fits (memory_fraction), "
        "else Lloyd passes over dask blocks; 'memory' or 'dask' force a path",
    )
    memory_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="in memory when the matrix is at most this share of a worker's memory limit",
    )

    @model_validator(mode="after")
    def _k_range(self) -> ClusterSettings:
        if self.k_max != "auto" and self.k_min >= self.k_max:
            raise ValueError(f"k_min {self.k_min} must be smaller than k_max {self.k_max}")
        return self

    def k_range(self, pixels: int, scans: int) -> tuple[int, int]:
        """``(k_min, k_max)`` of the elbow scan for ``pixels`` feature vectors of ``scans`` scans.

        Examples
        --------
        >>> s = ClusterSettings()
        >>> s.k_range(50_000, 1), s.k_range(50_000, 8), s.k_range(1_200, 3), s.k_range(90, 2)
        ((1, 15), (1, 80), (1, 12), (1, 2))
        """
        if self.k_max == "auto":
            top = 15 if scans == 1 else 80
            top = max(2, min(top, pixels // self.pixels_per_k))
        else:
            top = self.k_max
        top = min(top, pixels)
        return min(self.k_min, top), top


class AnalysisSettings(SettingsModel):
    """``[analysis]``: domains vs boundaries (``spndi analyze``)."""

    rim_width: float = Field(
        1.0,
        ge=0,
        description="particle pixels within this many scan pixels of the particle outline are "
        "left out of the domains (the study: the Canny edge of the mask, about 1 pixel); 0 keeps "
        "them",
    )
    permutations: NonNegativeInt = Field(
        1000,
        description="random relabellings of the permutation test of each domain − boundary "
        "difference (0: no test)",
    )
    seed: int = Field(0, description="random seed of the permutation test")
    detector_images: bool = Field(
        False,
        description="also average the raw frames of each cluster over angle and pixels (the "
        "study's detector-plane image per cluster; reads every raw frame once more)",
    )
