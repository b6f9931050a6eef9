"""The beamtime manifest (input contract): typed, validated, versioned.

A beamtime is one TOML file (see ``DESIGN.md`` and the README). Paths in it are relative to the
file. :func:`load_manifest` reads and validates it; every problem is reported at once, naming the
key, the value and the fix, as a :class:`ManifestError`.

Examples
--------
>>> cfg = Manifest.from_dict({
...     "name": "bt", "geometry": {"energy_kev": 9.0, "detector_distance_m": 0.5,
...                                "pixel_size_m": 55e-6, "beam_center": [32, 32]},
...     "particles": [{"name": "p1", "frames": "raw/p1/angle_{index:03d}.h5",
...                    "angles_deg": {"start": -0.5, "stop": 0.5, "num": 3},
...                    "scan_shape": [4, 5], "scan_step_um": [0.05, 0.05]}]})
>>> cfg.particles[0].angles.tolist()
[-0.5, 0.0, 0.5]
>>> cfg.particles[0].frame_paths(cfg.base_dir)[-1].name
'angle_002.h5'
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spndi_dask.geometry import AXIS_NAMES, Geometry

__all__ = [
    "MANIFEST_VERSION",
    "AngleRange",
    "ClusterSettings",
    "FeatureSettings",
    "GeometrySettings",
    "IngestSettings",
    "Manifest",
    "ManifestError",
    "ParticleSettings",
    "ReduceSettings",
    "SegmentSettings",
    "load_manifest",
]

#: Version of the manifest format this package writes and reads.
MANIFEST_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ManifestError(ValueError):
    """The manifest is invalid; the message lists every problem with its fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Axis = Literal["x+", "x-", "y+", "y-", "z+", "z-"]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class GeometrySettings(_Model):
    """``[geometry]``: detector and rocking geometry (see DESIGN.md, Geometry)."""

    energy_kev: PositiveFloat = Field(
        allow_inf_nan=False, description="photon energy in keV, e.g. 9.0"
    )
    detector_distance_m: PositiveFloat = Field(
        allow_inf_nan=False, description="sample-detector distance in metres, e.g. 0.5"
    )
    pixel_size_m: PositiveFloat = Field(
        allow_inf_nan=False, description="detector pixel pitch in metres, e.g. 55e-6"
    )
    gamma_deg: FiniteFloat = Field(0.0, description="detector arm yaw about +y in degrees")
    delta_deg: FiniteFloat = Field(0.0, description="detector arm elevation about -x in degrees")
    beam_center: tuple[FiniteFloat, FiniteFloat] = Field(
        description="(row, col) of the pixel on the detector-arm axis, e.g. [256.0, 256.0]"
    )
    row_direction: Axis = Field("y-", description=f"one of {', '.join(AXIS_NAMES)}")
    col_direction: Axis = Field("x+", description=f"one of {', '.join(AXIS_NAMES)}")
    rocking_axis: Axis = Field("y+", description=f"one of {', '.join(AXIS_NAMES)}")

    @model_validator(mode="after")
    def _detector_plane(self) -> GeometrySettings:
        self.to_geometry()
        return self

    def to_geometry(self) -> Geometry:
        """The :class:`~spndi_dask.geometry.Geometry` these settings describe."""
        return Geometry(**self.model_dump())


class AngleRange(_Model):
    """``angles_deg = { start, stop, num }``: ``num`` evenly spaced angles, both ends included."""

    start: FiniteFloat
    stop: FiniteFloat
    num: int = Field(ge=2, description="number of rocking angles (>= 2)")

    def values(self) -> np.ndarray:
        """The angles as an array (degrees)."""
        return np.linspace(self.start, self.stop, self.num)


class ParticleSettings(_Model):
    """One ``[[particles]]`` entry: a scan of one particle at every rocking angle."""

    name: str = Field(description="letters, digits, '_', '.', '-' (used as a Zarr node name)")
    frames: str | list[str] = Field(
        description="path template with {index} (0-based angle index), e.g. "
        "'raw/p1/angle_{index:03d}.h5', or a list with one path per angle"
    )
    dataset: str = Field(
        "/entry/instrument/detector/data",
        description="HDF5 dataset of frames, shape (n_points, det_rows, det_cols)",
    )
    monitor: str | None = Field(None, description="HDF5 dataset of per-point incident flux")
    xrf: str | None = Field(None, description="HDF5 dataset of per-point fluorescence")
    angles_deg: list[FiniteFloat] | AngleRange = Field(
        description="strictly monotonic list of angles, or {start, stop, num}"
    )
    scan_shape: tuple[PositiveInt, PositiveInt] = Field(description="raster [rows, cols]")
    scan_step_um: tuple[PositiveFloat, PositiveFloat] = Field(
        description="raster step [row, col] in µm, e.g. [0.05, 0.05]"
    )
    scan_order: Literal["raster", "snake"] = Field(
        "raster", description="'raster' (row-major) or 'snake' (every other row reversed)"
    )
    dark: str | None = Field(None, description="HDF5 file with dark frames at the same dataset")
    mask: str | None = Field(None, description="user mask (TIFF or .npy), nonzero = particle")
    allow_incomplete: bool | None = Field(
        None, description="fill missing points of aborted scans (default: [ingest] setting)"
    )
    geometry: dict[str, Any] = Field(
        default_factory=dict, description="overrides of [geometry] keys for this particle"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
            )
        return v

    @field_validator("angles_deg")
    @classmethod
    def _angles_ok(cls, v: list[float] | AngleRange) -> list[float] | AngleRange:
        values = v.values() if isinstance(v, AngleRange) else np.asarray(v, dtype=float)
        if values.size < 2:
            raise ValueError("needs at least 2 rocking angles")
        steps = np.diff(values)
        if np.any(steps == 0):
            i = int(np.flatnonzero(steps == 0)[0]) + 1
            raise ValueError(f"angle {values[i]} at index {i} is duplicated; remove it")
        if not (np.all(steps > 0) or np.all(steps < 0)):
            i = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0]) + 1
            raise ValueError(
                f"angles must be strictly monotonic; angle {values[i]} at index {i} breaks the "
                "order: list them in acquisition order without going back"
            )
        return v

    @field_validator("geometry")
    @classmethod
    def _geometry_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(GeometrySettings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown geometry key(s) {unknown}; allowed: "
                f"{', '.join(GeometrySettings.model_fields)}"
            )
        return v

    @model_validator(mode="after")
    def _frames_match_angles(self) -> ParticleSettings:
        n = self.angles.size
        if isinstance(self.frames, list):
            if len(self.frames) != n:
                raise ValueError(
                    f"frames lists {len(self.frames)} files but angles_deg has {n} angles; "
                    "give one file per angle"
                )
        elif "{index" not in self.frames:
            raise ValueError(
                f"frames = {self.frames!r} has no {{index}} placeholder; use e.g. "
                "'raw/p1/angle_{index:03d}.h5' or a list of one path per angle"
            )
        else:
            try:
                self.frames.format(index=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"frames = {self.frames!r} is not a valid template ({exc}); only the "
                    "{index} placeholder is available"
                ) from None
        return self

    @property
    def angles(self) -> np.ndarray:
        """Rocking angles in degrees, in acquisition order."""
        if isinstance(self.angles_deg, AngleRange):
            return self.angles_deg.values()
        return np.asarray(self.angles_deg, dtype=float)

    @property
    def n_points(self) -> int:
        """Scan points per angle (rows × cols)."""
        return self.scan_shape[0] * self.scan_shape[1]

    def frame_paths(self, base_dir: Path) -> list[Path]:
        """Absolute path of the frame file of every angle."""
        if isinstance(self.frames, list):
            names = self.frames
        else:
            names = [self.frames.format(index=i) for i in range(self.angles.size)]
        return [_resolve(base_dir, p) for p in names]


class IngestSettings(_Model):
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


class ReduceSettings(_Model):
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


class SegmentSettings(_Model):
    """``[segment]``: particle segmentation (``spndi stats``).

    A particle's ``mask`` in the manifest (TIFF/.npy) replaces the automatic segmentation.
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


class FeatureSettings(_Model):
    """``[features]``: autoencoder training and encoding."""

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
        8192, description="training patterns drawn across all particles of the beamtime"
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

    @property
    def latent_size(self) -> int:
        """The latent size of the chosen model."""
        if self.latent_dim == "auto":
            return 32 if self.model == "conv3d" else 512
        return int(self.latent_dim)


class ClusterSettings(_Model):
    """``[cluster]``: k-means over the latent vectors of all particles."""

    k: Literal["auto"] | PositiveInt = Field("auto", description="'auto' (elbow) or a fixed K")
    k_max: int = Field(10, ge=2, description="largest K tried by the elbow rule")
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


class Manifest(_Model):
    """A validated beamtime manifest.

    Build with :func:`load_manifest` / :meth:`from_toml` (paths relative to the file) or
    :meth:`from_dict` (paths relative to ``base_dir``).
    """

    manifest_version: int = Field(
        MANIFEST_VERSION, description=f"manifest format version ({MANIFEST_VERSION})"
    )
    name: str = Field(description="beamtime name")
    output: str = Field("results", description="results directory (relative to the manifest)")
    geometry: dict[str, Any] = Field(
        default_factory=dict, description="default geometry of every particle"
    )
    particles: list[ParticleSettings] = Field(min_length=1, description="at least one particle")
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    reduce: ReduceSettings = Field(default_factory=ReduceSettings)
    segment: SegmentSettings = Field(default_factory=SegmentSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<manifest>")

    @field_validator("manifest_version")
    @classmethod
    def _version_ok(cls, v: int) -> int:
        if v != MANIFEST_VERSION:
            raise ValueError(
                f"this spndi_dask reads manifest_version {MANIFEST_VERSION}; "
                "update the file or the package"
            )
        return v

    @field_validator("geometry")
    @classmethod
    def _geometry_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        ParticleSettings._geometry_keys(v)
        # check the values given here on their own (particles may add the missing keys)
        stand_in = {
            "energy_kev": 1.0,
            "detector_distance_m": 1.0,
            "pixel_size_m": 1.0,
            "beam_center": (0.0, 0.0),
        }
        try:
            GeometrySettings(**{**stand_in, **v})
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                if err["loc"]:
                    key = err["loc"][0]
                    lines.append(
                        f"geometry.{key} = {err['input']!r}: {msg}{_hint(('geometry', key))}"
                    )
                else:
                    lines.append(f"geometry: {msg}")
            raise ValueError("\n".join(lines)) from None
        return v

    @field_validator("particles")
    @classmethod
    def _particles_ok(
        cls, particles: list[ParticleSettings], info: ValidationInfo
    ) -> list[ParticleSettings]:
        names = [p.name for p in particles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"particle names must be unique; repeated: {dupes}")
        if "geometry" not in info.data:  # [geometry] itself is invalid: reported there
            return particles
        default_geometry = info.data["geometry"]
        lines: list[str] = []
        for i, p in enumerate(particles):
            try:
                GeometrySettings(**{**default_geometry, **p.geometry})
            except ValidationError as exc:
                for err in exc.errors():
                    key = err["loc"][0] if err["loc"] else None
                    if key is None:  # a check across keys (detector plane)
                        where = "geometry" if not p.geometry else f"particles[{i}] ('{p.name}')"
                        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
                    elif err["type"] == "missing":
                        lines.append(
                            f"geometry.{key} is required{_hint(('geometry', key))}; set it in "
                            f"[geometry] or in [particles.geometry] of particle '{p.name}'"
                        )
                    else:
                        where = (
                            f"particles[{i}] ('{p.name}').geometry"
                            if key in p.geometry
                            else ("geometry")
                        )
                        lines.append(
                            f"{where}.{key} = {err['input']!r}: {err['msg']}"
                            f"{_hint(('geometry', key))}"
                        )
        if lines:
            raise ValueError("\n".join(dict.fromkeys(lines)))
        return particles

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, base_dir: str | Path | None = None, source: str = "<dict>"
    ) -> Manifest:
        """Validate a manifest given as a dict; raises :class:`ManifestError`."""
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            msg = "\n".join(f"  - {line}" for line in _format_errors(exc, data=data))
            raise ManifestError(f"{source}: invalid manifest\n{msg}") from None
        cfg._base_dir = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
        cfg._source = source
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest TOML file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"manifest {path} does not exist") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, base_dir=path.resolve().parent, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of every setting (defaults filled in)."""
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        """The manifest as TOML text (defaults filled in)."""
        return _dump_toml(self.to_dict())

    # -- derived ------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """Directory paths in the manifest are relative to."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the manifest came from (file path or ``<dict>``)."""
        return self._source

    @property
    def output_dir(self) -> Path:
        """Absolute results directory."""
        return _resolve(self.base_dir, self.output)

    @property
    def manifest_hash(self) -> str:
        """SHA-256 of the canonical JSON of all settings (provenance)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def particle(self, name: str) -> ParticleSettings:
        """The particle called ``name``."""
        for p in self.particles:
            if p.name == name:
                return p
        raise KeyError(
            f"no particle {name!r} in {self.source}; particles: {[p.name for p in self.particles]}"
        )

    def select_particles(
        self, names: list[str] | None, *, error: type[Exception] = ValueError
    ) -> list[str]:
        """The named particle scans in the given order (default: all, manifest order).

        Names not in the manifest raise ``error`` naming them and the manifest's particles.
        """
        order = [p.name for p in self.particles]
        unknown = sorted(set(names or []) - set(order))
        if unknown:
            raise error(f"particles {unknown} are not in the manifest (it has {order})")
        return list(names) if names else order

    def geometry_for(self, particle: str | ParticleSettings) -> Geometry:
        """Geometry of a particle: ``[geometry]`` with its own overrides applied."""
        p = self.particle(particle) if isinstance(particle, str) else particle
        return GeometrySettings(**{**self.geometry, **p.geometry}).to_geometry()

    def resolve(self, path: str) -> Path:
        """A manifest path made absolute."""
        return _resolve(self.base_dir, path)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a beamtime manifest (see :class:`Manifest`)."""
    return Manifest.from_toml(path)


# -- helpers ----------------------------------------------------------------------------------
def _resolve(base_dir: Path, path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


_MODELS: dict[str, type[BaseModel]] = {
    "": Manifest,
    "particles": ParticleSettings,
    "ingest": IngestSettings,
    "reduce": ReduceSettings,
    "segment": SegmentSettings,
    "features": FeatureSettings,
    "cluster": ClusterSettings,
    "geometry": GeometrySettings,
    "AngleRange": AngleRange,
}


def _loc_text(loc: tuple[Any, ...], data: dict[str, Any] | None) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if loc[:i] == ("particles",) and data is not None:
                try:
                    out += f" ('{data['particles'][part]['name']}')"
                except (KeyError, IndexError, TypeError):
                    pass
        elif part in ("list[float]", "AngleRange", "str", "list[str]", "function-after"):
            continue
        elif part.startswith(("list[", "literal[", "tuple[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _hint(loc: tuple[Any, ...]) -> str:
    names = [p for p in loc if isinstance(p, str)]
    if not names or isinstance(loc[-1], int):
        return ""
    field = names[-1]
    table = names[0] if len(names) > 1 else ""
    model = _MODELS.get(table, Manifest)
    info = model.model_fields.get(field) or Manifest.model_fields.get(field)
    if info is None and table == "particles":
        info = GeometrySettings.model_fields.get(field)
    return f" (expected: {info.description})" if info is not None and info.description else ""


def _format_errors(
    exc: ValidationError, *, data: dict[str, Any] | None = None, prefix: str = ""
) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = _loc_text(loc, data)
        if prefix:
            where = f"{prefix}.{where}" if where != "(top level)" else prefix
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        tags = [p for p in loc if isinstance(p, str)]
        if (any(t.startswith("list[") for t in tags) and isinstance(value, dict)) or (
            "AngleRange" in tags and isinstance(value, list)
        ):
            continue  # the other member of the angles_deg union applies
        if not loc or (loc == ("geometry",) and msg.startswith("geometry")):
            lines.extend(msg.split("\n"))
        elif err["type"] == "extra_forbidden":
            parent = loc[:-1]
            model = _model_at(parent)
            allowed = ", ".join(model.model_fields) if model else ""
            lines.append(
                f"unknown key '{loc[-1]}' in {_loc_text(parent, data)}; "
                f"allowed keys: {allowed} (check the spelling)"
            )
        elif err["type"] == "missing":
            lines.append(f"{where} is required{_hint(loc)}")
        else:
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"{where}{shown}: {msg}{_hint(loc)}")
    return lines


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return Manifest
    if names[-1] == "angles_deg":
        return AngleRange
    return _MODELS.get(names[-1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _dump_toml(d: dict[str, Any]) -> str:
    """Minimal TOML writer for manifests (scalars, arrays, tables, arrays of tables)."""
    lines: list[str] = []
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in d.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    for k, v in d.items():
        if k in tables or k in arrays or v is None:
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables.items():
        lines += ["", f"[{k}]"]
        lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    for k, items in arrays.items():
        for item in items:
            lines += ["", f"[[{k}]]"]
            sub = {kk: vv for kk, vv in item.items() if isinstance(vv, dict) and kk != "angles_deg"}
            for kk, vv in item.items():
                if vv is None or kk in sub:
                    continue
                lines.append(f"{kk} = {_toml_value(vv)}")
            for kk, vv in sub.items():
                if vv:
                    lines += [f"[{k}.{kk}]"] + [f"{a} = {_toml_value(b)}" for a, b in vv.items()]
    return "\n".join(lines) + "\n"
