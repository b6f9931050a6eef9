"""The stage contract, in one place: which stages there are, what each needs, how they end.

``pipeline`` (order, what a failure skips), ``status`` (which columns, what makes a stage stale),
``report`` (stage sections) and ``cli`` (one subcommand per stage) all read :data:`STAGES`. Every
error a stage raises for bad input or a missing upstream result derives from :class:`StageError`,
and every per-scan (or beamtime) summary carries an :class:`Outcome` under ``"status"``.

This module imports nothing from the package, so the command line can read it without loading
dask, xarray or torch.

Examples
--------
>>> [s.name for s in STAGES if s.per_scan]
['ingest', 'reduce', 'stats', 'encode']
>>> stage("features").name, stage("encode").needs
('encode', ('reduce', 'train'))
>>> Outcome.REDUCED == "reduced", f"{Outcome.UP_TO_DATE}", Outcome("failed") is Outcome.FAILED
(True, 'up to date', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ALIASES",
    "STAGES",
    "STAGE_NAMES",
    "Outcome",
    "Stage",
    "StageError",
    "parse_stages",
    "stage",
    "status_stages",
]


class StageError(Exception):
    """A stage cannot do its work with what it was given; the message names the input and fix.

    Stage errors also derive from the builtin type that fits them (``ValueError`` for bad
    input, ``RuntimeError`` for a missing environment), so older ``except`` clauses still work.
    """


class Outcome(str, Enum):
    """How a stage ended, for one scan or for the beamtime (``summary["status"]``).

    ``INTERRUPTED``: a signal stopped the run while the stage ran; ``NOT_RUN``: the run stopped
    before the stage started (both only in a run's records).

    A ``str`` subclass: it compares equal to, prints, shows and serialises as its value (so
    summaries read as before and JSON records stay plain strings).
    """

    INGESTED = "ingested"
    REDUCED = "reduced"
    DONE = "done"
    TRAINED = "trained"
    ENCODED = "encoded"
    DECOMPOSED = "decomposed"
    CLUSTERED = "clustered"
    WRITTEN = "written"
    UP_TO_DATE = "up to date"
    NOT_NEEDED = "not needed"
    NO_PARTICLE = "no particle"
    SKIPPED = "skipped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_RUN = "not run"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes
    ----------
    name : str
        The stage's name (``spndi <name>``, ``--stages``).
    made : Outcome
        The outcome of a run that did the stage's work.
    needs : tuple of str
        Stages whose results this one reads; a failed need skips it.
    per_scan : bool
        True when its summary is ``{scan: {...}}`` (False: one dict for the beamtime).
    attrs_key : str or None
        The attrs key of a ``results.zarr/<scan>`` node (``raw.zarr/<scan>`` for ingest)
        that records the stage complete for that scan; None for stages with nothing per scan.
        The stages with a key are the columns of ``spndi status``.
    aliases : tuple of str
        Other names accepted for it.
    help : str
        One line for ``spndi --help``.
    description : str
        The subcommand's description.
    options : tuple of str
        Command-line options of its subcommand beyond ``--scans``, ``--force`` and the
        cluster options (names of ``cli``'s option table).
    label : str
        What ``spndi status`` and the report call the stage's product per scan (default: the
        name; ``features`` for encode, ``analysis`` for analyze).
    """

    name: str
    made: Outcome
    needs: tuple[str, ...] = ()
    per_scan: bool = True
    attrs_key: str | None = None
    aliases: tuple[str, ...] = ()
    help: str = ""
    description: str = ""
    options: tuple[str, ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        Outcome.INGESTED,
        attrs_key="spndi_dask",
        help="raw frames -> <output>/raw.zarr (parallel, resumable)",
        description="Ingest the raw frames of a beamtime manifest into <output>/raw.zarr.",
    ),
    Stage(
        "reduce",
        Outcome.REDUCED,
        needs=("ingest",),
        attrs_key="spndi_dask",
        help="raw.zarr -> results.zarr: maps, rocking curves, q-grid patterns",
        description="Reduce the ingested frames of a beamtime into <output>/results.zarr "
        "(d-spacing, strain, tilt, widths, rocking curves, drift, 3D patterns).",
    ),
    Stage(
        "stats",
        Outcome.DONE,
        needs=("reduce",),
        attrs_key="particles",
        aliases=("particles", "segment"),
        help="results.zarr -> particle labels, particles.csv, figures",
        description="Segment every reduced scan into particles (or use the manifest's masks), "
        "write label to results.zarr, per-particle statistics to <output>/particles.csv and "
        "figures to <output>/figures/.",
        options=("figures",),
    ),
    Stage(
        "train",
        Outcome.TRAINED,
        needs=("reduce", "stats"),
        per_scan=False,
        help="train the autoencoder on a sample of all scans -> <output>/features/model",
        description="Train the [features] autoencoder (conv3d or foldingnet) on patterns drawn "
        "across all scans of the beamtime; write weights + JSON metadata. With --weights "
        "(recipe 'study') load the original study's released weights instead of training.",
        options=("device", "weights", "train_in_client"),
    ),
    Stage(
        "encode",
        Outcome.ENCODED,
        needs=("reduce", "train"),
        attrs_key="features",
        aliases=("features",),
        label="features",
        help="encode every pixel on the dask workers -> latent(y, x, feature)",
        description="Encode the pattern of every pixel with signal into latent vectors with a "
        "trained checkpoint (distributed; CPU or GPU workers).",
        options=("checkpoint", "device"),
    ),
    Stage(
        "decompose",
        Outcome.DECOMPOSED,
        needs=("reduce", "stats"),
        per_scan=False,
        help="PCA and NMF of the particle pixels' patterns -> pca_loading, nmf_loading",
        description="Fit PCA and NMF on patterns drawn across all scans and project every "
        "particle pixel: pca_loading and nmf_loading in results.zarr, the components in "
        "<output>/decomposition.zarr, figures. `spndi run` runs it when [cluster] features is "
        "'pca' or 'nmf' (or [decompose] run = 'always').",
        options=("figures",),
    ),
    Stage(
        "cluster",
        Outcome.CLUSTERED,
        needs=("encode", "stats"),
        per_scan=False,
        attrs_key="cluster",
        help="k-means over the features of all scans -> cluster, clusters.csv",
        description="Cluster the [cluster] features (latent vectors by default; PCA or NMF "
        "loadings, or the moment maps) of every pixel inside a particle of all scans "
        "jointly with k-means (K from the elbow rule unless fixed); write the cluster "
        "maps, <output>/clusters.csv and figures.",
        options=("k", "figures"),
    ),
    Stage(
        "analyze",
        Outcome.DONE,
        needs=("cluster",),
        per_scan=False,
        attrs_key="analysis",
        aliases=("analysis",),
        label="analysis",
        help="cluster rocking curves, mean patterns, domains vs boundaries",
        description="Per-cluster rocking curves and mean 3D patterns, domains vs boundaries "
        "between clusters: <output>/analysis.zarr, region(y, x), regions.csv, figures.",
        options=("boundary_width", "figures"),
    ),
    Stage(
        "report",
        Outcome.WRITTEN,
        per_scan=False,
        help="write <output>/report/index.html from what the stages wrote",
        description="Write the self-contained HTML report of a beamtime (maps, statistics, "
        "clusters, analysis, provenance) from the results that exist; `spndi run` writes it too.",
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
ALIASES: dict[str, str] = {a: s.name for s in STAGES for a in s.aliases}
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The stage called ``name`` (or one of its aliases).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the stages and aliases.
    """
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    try:
        return _BY_NAME[key]
    except KeyError:
        raise ValueError(
            f"unknown stage {name!r} in --stages; the stages are {', '.join(STAGE_NAMES)} "
            f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})"
        ) from None


def status_stages() -> tuple[Stage, ...]:
    """The stages that record per-scan completion: the columns of ``spndi status``."""
    return tuple(s for s in STAGES if s.attrs_key is not None)


def parse_stages(stages: list[str] | str | None) -> list[str]:
    """Stage names in pipeline order; accepts aliases, commas and ranges like ``reduce-encode``.

    Examples
    --------
    >>> parse_stages("encode,cluster")
    ['encode', 'cluster']
    >>> parse_stages(["stats-encode"])
    ['stats', 'train', 'encode']
    >>> parse_stages(["particles", "report"])
    ['stats', 'report']
    """
    if not stages:
        return list(STAGE_NAMES)
    items = [
        s for part in ([stages] if isinstance(stages, str) else stages) for s in part.split(",")
    ]
    chosen: set[str] = set()
    for item in (i.strip() for i in items if i.strip()):
        lo, _, hi = item.partition("-") if item.count("-") == 1 else (item, "", "")
        i = STAGE_NAMES.index(stage(lo).name)
        j = STAGE_NAMES.index(stage(hi).name) if hi else i
        chosen.update(STAGE_NAMES[min(i, j) : max(i, j) + 1])
    return [s for s in STAGE_NAMES if s in chosen]
