"""Checksums of every stored chunk, the errors a damaged chunk gives, and ``spndi verify``.

Every array spndi writes (``raw.zarr``, ``results.zarr``, ``analysis.zarr``) ends its codec
chain with Zarr v3's ``crc32c`` codec (:func:`checksummed`), and every chunk is written even
where it holds only the fill value (``write_empty_chunks``), so a flipped byte, a truncated file
or a missing chunk is found when it is read instead of being served as data.

A read that meets a damaged chunk raises :class:`DamagedStoreError`, which names the store, the
particle, the array and the chunk, the stage that makes the array and the command that recomputes
it (:func:`damage_error`). :func:`verify` reads every chunk of an output (the two large arrays,
the raw frames and the patterns, by their shard index and chunk files unless ``deep``) and reports
the damage per particle and stage; unless told not to, it marks each damaged part as not done
(an ingested angle as not ingested, a stage's completion record removed), so the next
``spndi run`` recomputes only what is damaged.

Examples
--------
>>> [type(c).__name__ for c in checksummed(None)]
['ZstdCodec', 'Crc32cCodec']
>>> is_damage(ValueError("Stored and computed checksum do not match."))
True
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.io.layout import OutputLayout, disk_usage, read_attrs
from spndi_dask.io.shards import ShardError, ShardReader
from spndi_dask.stages import StageError
from spndi_dask.stages import stage as stage_of

__all__ = [
    "Damage",
    "DamagedStoreError",
    "VerifyReport",
    "checksummed",
    "damage_error",
    "guarded_getter",
    "is_damage",
    "mark_damaged",
    "read",
    "verify",
    "writable",
]

logger = logging.getLogger(__name__)

#: Words of the errors zarr, numcodecs and the shard reader give for a damaged chunk.
_DAMAGE_WORDS = (
    "checksum",
    "decompress",
    "crc",
    "corrupt",
    "truncat",
    "invalid header",
    "cannot be decoded",
    "error during decompression",
    "compressed data",
)
#: The arrays of a results node that a later stage adds (all others are written by reduce).
_MADE_BY = {"label": "stats", "latent": "encode", "cluster": "cluster", "region": "analyze"}
#: The two large arrays, checked by their files (and their shard index) unless ``deep``.
_LARGE = {("raw", "frames"), ("results", "pattern")}


class DamagedStoreError(StageError, ValueError):
    """A stored chunk fails its checksum or cannot be decoded; the message says what recomputes it.

    Attributes
    ----------
    damage : list of Damage
        What was found damaged (empty when it could not be located).
    """

    def __init__(self, message: str, damage: list[Damage] | None = None) -> None:
        super().__init__(message)
        self.damage = list(damage or [])


@dataclass(frozen=True)
class Damage:
    """One damaged chunk (or a damaged array, where the chunk cannot be told)."""

    store: str  # "raw", "results" or "analysis"
    particle: str | None
    array: str  # the array's path inside its store, e.g. "p1/strain"
    chunk: str  # the chunk's key, e.g. "c/0/0"
    reason: str
    stage: str  # the stage that makes the array
    angle: int | None = None  # raw frames: the angle index
    output: str = ""  # the output directory holding the store

    def where(self, full: bool = False) -> str:
        """``raw.zarr/p2/frames, angle index 3 (c/3/0/0/0/0)`` or
        ``results.zarr/p1/strain (chunk c/0/0)``; with ``full`` from the output's path."""
        store = f"{self.output}/{self.store}.zarr" if full and self.output else f"{self.store}.zarr"
        if self.angle is not None:
            return f"{store}/{self.array}, angle index {self.angle} ({self.chunk})"
        return f"{store}/{self.array} (chunk {self.chunk})"


# -- writing ----------------------------------------------------------------------------------
def checksummed(compressors: Iterable[Any] | None) -> list[Any]:
    """A codec chain that ends with ``crc32c`` (``None``: Zstandard level 0, zarr's default)."""
    chain = [ZstdCodec(level=0)] if compressors is None else list(compressors)
    if not any(isinstance(c, Crc32cCodec) for c in chain):
        chain.append(Crc32cCodec())
    return chain


def checksum_encoding(
    names: Iterable[str], encoding: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """xarray ``to_zarr`` encoding: a checksummed codec chain for every variable in ``names``."""
    out = {k: dict(v) for k, v in (encoding or {}).items()}
    for name in names:
        enc = out.setdefault(name, {})
        enc["compressors"] = checksummed(enc.get("compressors"))
    return out


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` set to write every chunk, even one that holds only fill values.

    So a chunk file that is missing is damage, never a chunk of fill values. Set on the array,
    not in zarr's global config (a ``config.set`` block is not thread-safe: threads entering and
    leaving it can leave the setting changed for the whole process).
    """
    return array.with_config({"write_empty_chunks": True})


# -- recognising damage -----------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it came from) says a stored chunk is damaged."""
    for e in _chain(exc):
        if isinstance(e, DamagedStoreError | ShardError):
            return True
        if isinstance(e, ValueError | RuntimeError | OSError) and any(
            w in str(e).lower() for w in _DAMAGE_WORDS
        ):
            return True
    return False


def _store_of(path: Path) -> tuple[str, Path, str] | None:
    """``(kind, store root, path inside)`` of a path inside a ``*.zarr`` store."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].endswith(".zarr"):
            kind = parts[i][: -len(".zarr")]
            return kind, Path(*parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def _stage_of(kind: str, array: str) -> str:
    if kind == "raw":
        return "ingest"
    if kind == "analysis":
        return "analyze"
    return _MADE_BY.get(array.rsplit("/", 1)[-1], "reduce")


def _particle_of(kind: str, array: str) -> str | None:
    return array.split("/", 1)[0] if kind in ("raw", "results") and "/" in array else None


def _array_path(array: zarr.Array) -> Path | None:
    """The local directory of a zarr array (``None`` for a store that is not a local one)."""
    root = getattr(array.store, "root", None)
    return None if root is None else Path(root) / array.path


def recompute_command(d: Damage, manifest: str = "beamtime.toml") -> str:
    """The command that makes the damaged part again."""
    if d.stage == "ingest":
        return f"spndi verify {manifest} && spndi run {manifest}"
    if d.stage in ("cluster", "analyze") or d.particle is None:
        return f"spndi {d.stage} {manifest} --force"
    return f"spndi {d.stage} {manifest} --scans {d.particle} --force"


def describe(damage: list[Damage], manifest: str = "beamtime.toml") -> str:
    """The damage in words, with the command that recomputes each part."""
    lines = []
    for d in damage[:10]:
        lines.append(
            f"{d.where(full=True)} is damaged ({d.reason}); it is made by `{d.stage}`: "
            f"recompute it with `{recompute_command(d, manifest)}`"
        )
    if len(damage) > 10:
        lines.append(f"... and {len(damage) - 10} more damaged chunks")
    lines.append(f"(`spndi verify {manifest}` checks every chunk of the output)")
    return "\n".join(lines)


def _manifest_of(store_root: Path) -> str:
    """The manifest of an output, for the commands an error suggests: the one ingest recorded
    when it lies beside the output, else the only manifest there, else ``beamtime.toml``."""
    out = store_root.parent
    recorded = None
    for node in sorted(OutputLayout(out).raw.glob("*/zarr.json"))[:1]:
        recorded = (read_attrs(node.parent) or {}).get("manifest")
    if recorded and Path(recorded).exists() and Path(recorded).parent in (out, out.parent):
        return str(recorded)
    beside = sorted(out.parent.glob("*.toml"))
    if len(beside) == 1:
        return str(beside[0])
    return "beamtime.toml"


def _shard_damage(exc: BaseException) -> tuple[Damage, Path] | None:
    """The damaged shard a :class:`~spndi_dask.io.shards.ShardError` names (angle = first index)
    and its store's root."""
    for e in _chain(exc):
        if isinstance(e, ShardError) and getattr(e, "path", None):
            where = _store_of(Path(e.path))
            if where is None or "/c/" not in where[2]:
                return None
            kind, root, inside = where
            array, key = inside.split("/c/", 1)
            angle = int(key.split("/", 1)[0]) if kind == "raw" else None
            reason = str(e).split(": ", 1)[-1]
            stage = _stage_of(kind, array)
            particle = _particle_of(kind, array)
            output = str(root.parent)
            damage = Damage(kind, particle, array, f"c/{key}", reason, stage, angle, output)
            return damage, root
    return None


def damage_error(
    exc: BaseException,
    *,
    array: zarr.Array | Path | None = None,
    within: tuple[slice, ...] | None = None,
) -> DamagedStoreError:
    """The :class:`DamagedStoreError` for ``exc`` raised while reading ``array``.

    The array (when given; only its part ``within`` where that is given) is checked chunk by
    chunk to name the damaged chunks.
    """
    if isinstance(exc, DamagedStoreError):
        return exc
    shard = _shard_damage(exc)
    if shard is not None:
        damage, root = shard
        return DamagedStoreError(describe([damage], _manifest_of(root)), [damage])
    path = _array_path(array) if isinstance(array, zarr.Array) else array
    reason = f"{type(exc).__name__}: {exc}"
    where = _store_of(Path(path)) if path is not None else None
    if where is None:
        return DamagedStoreError(f"a stored chunk is damaged ({reason}); run `spndi verify`")
    kind, root, inside = where
    found = _check_array(kind, root, inside, deep=True, within=within)
    if not found:
        found = [
            Damage(
                kind,
                _particle_of(kind, inside),
                inside,
                "?",
                reason,
                _stage_of(kind, inside),
                output=str(root.parent),
            )
        ]
    return DamagedStoreError(describe(found, _manifest_of(root)), found)


# -- checking ---------------------------------------------------------------------------------
def _units(array: zarr.Array) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Index and region of every stored unit of ``array`` (its shards, else its chunks)."""
    unit = array.shards or array.chunks
    grid = [
        range(math.ceil(s / u)) if s else range(0) for s, u in zip(array.shape, unit, strict=True)
    ]
    for idx in itertools.product(*grid):
        yield (
            idx,
            tuple(
                slice(i * u, min((i + 1) * u, s))
                for i, u, s in zip(idx, unit, array.shape, strict=True)
            ),
        )


def _has_checksum(array: zarr.Array) -> bool:
    meta = array.metadata
    codecs = list(getattr(meta, "codecs", ()))
    inner = []
    for c in codecs:
        inner.extend(getattr(c, "codecs", ()))
    return any(isinstance(c, Crc32cCodec) for c in (*codecs, *inner))


def _done_angles(root: Path, inside: str) -> np.ndarray | None:
    """Raw frames: which angles ingest marked done (only those must have every shard)."""
    try:
        group = zarr.open_group(str(root / inside.rsplit("/", 1)[0]), mode="r")
        return np.asarray(group["done"][:]) != 0
    except Exception:  # the done array itself is damaged: it is reported on its own
        return None


def _overlaps(sel: tuple[slice, ...], within: tuple[slice, ...] | None) -> bool:
    if within is None:
        return True
    for s, w in zip(sel, within, strict=False):
        lo = 0 if w.start is None else w.start
        hi = s.stop if w.stop is None else w.stop
        if s.stop <= lo or s.start >= hi:
            return False
    return True


def _check_array(
    kind: str,
    root: Path,
    inside: str,
    *,
    deep: bool,
    within: tuple[slice, ...] | None = None,
) -> list[Damage]:
    """Every damaged unit of one array (read whole, or by files and shard index when not deep;
    only the units that overlap ``within`` where that is given)."""
    particle = _particle_of(kind, inside)
    stage = _stage_of(kind, inside)
    try:
        array = zarr.open_array(str(root / inside), mode="r")
    except Exception as exc:
        return [
            Damage(
                kind,
                particle,
                inside,
                "zarr.json",
                f"unreadable metadata: {exc}",
                stage,
                output=str(root.parent),
            )
        ]
    name = inside.rsplit("/", 1)[-1]
    large = (kind, name) in _LARGE
    per_angle = kind == "raw" and name != "done"
    done = _done_angles(root, inside) if per_angle else None
    encode = array.metadata.encode_chunk_key
    # written by a version that writes every chunk (``done`` is written only once an angle is)
    strict = _has_checksum(array) and name != "done"
    reader: Any = array
    codecs = list(getattr(array.metadata, "codecs", ()))
    crc_last = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    shard_check = None
    if array.shards:
        try:
            shard_check = ShardReader(array)
            reader = shard_check
        except ValueError:
            shard_check = None
    out = []
    for idx, sel in _units(array):
        if not _overlaps(sel, within):
            continue
        key = encode(idx)
        angle = idx[0] if per_angle else None
        if angle is not None and done is not None and not done[angle]:
            continue  # not ingested yet: nothing to check
        path = root / inside / key
        reason = None
        if not path.exists():
            if strict:
                reason = "chunk file missing"
        elif large and not deep:
            try:
                size = path.stat().st_size
                if shard_check is not None:
                    with open(path, "rb") as f:
                        shard_check._index(path, f.fileno(), size)
                elif size <= 4:
                    reason = f"chunk file of {size} bytes"
            except (ShardError, OSError) as exc:
                reason = str(exc)
        elif shard_check is not None:  # every inner chunk by its checksum (nothing decoded)
            try:
                shard_check.check_file(path)
            except (ShardError, OSError) as exc:
                reason = str(exc).split(": ", 1)[-1]
        elif crc_last:  # the chunk's checksum over its stored bytes (nothing decoded)
            data = np.frombuffer(path.read_bytes(), np.uint8)
            if len(data) < 4 or (
                np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:].tobytes()
            ):
                reason = "ValueError: stored and computed checksum do not match"
        else:
            try:
                reader[sel]
            except Exception as exc:
                if not is_damage(exc) and not isinstance(exc, ValueError | OSError):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            out.append(Damage(kind, particle, inside, key, reason, stage, angle, str(root.parent)))
    return out


def _arrays(root: Path) -> Iterator[str]:
    """Paths (inside the store) of every array of a Zarr v3 store, in sorted order."""
    for meta in sorted(root.rglob("zarr.json")):
        node = meta.parent
        if node == root:
            continue
        try:
            if json.loads(meta.read_text()).get("node_type") == "array":
                yield node.relative_to(root).as_posix()
        except (OSError, ValueError):
            yield node.relative_to(root).as_posix()  # unreadable metadata: reported as damage


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    damage: list[Damage] = field(default_factory=list)
    arrays: int = 0
    bytes: int = 0
    seconds: float = 0.0
    deep: bool = False
    marked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage found."""
        return not self.damage

    @property
    def mb_per_s(self) -> float:
        """Stored megabytes checked per second."""
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def by_particle(self) -> dict[str, dict[str, list[Damage]]]:
        """``{particle or 'all': {stage: [damage]}}``."""
        out: dict[str, dict[str, list[Damage]]] = {}
        for d in self.damage:
            out.setdefault(d.particle or "all", {}).setdefault(d.stage, []).append(d)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": self.ok,
            "deep": self.deep,
            "arrays": self.arrays,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 1),
            "damage": [asdict(d) for d in self.damage],
            "marked": self.marked,
        }


@renamed_keyword(particles="scans")
def verify(
    manifest: Any,
    *,
    deep: bool = False,
    mark: bool = True,
    scans: list[str] | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Read every chunk of ``raw.zarr``, ``results.zarr`` and ``analysis.zarr`` of an output.

    Parameters
    ----------
    manifest : Manifest
        The beamtime (its output is checked).
    deep : bool
        Also decode every chunk of the raw frames and the patterns (default: their chunk files
        must exist and each raw shard's index must pass its checksum).
    mark : bool
        Mark every damaged part as not done, so that the next ``spndi run`` recomputes only it
        (:func:`mark_damaged`).
    scans : list of str, optional
        Only these scans' nodes (``analysis.zarr`` is checked always).
    threads : int, optional
        Arrays checked at once (default: the usable cores).
    progress : callable, optional
        Called with each array's path as it is checked.

    Returns
    -------
    VerifyReport
    """
    layout = manifest.layout
    wanted = set(scans) if scans else {p.name for p in manifest.scans}
    jobs = []
    checked = 0
    for kind, root in (
        ("raw", layout.raw),
        ("results", layout.results),
        ("analysis", layout.analysis),
    ):
        if not (root / "zarr.json").exists():
            continue
        for inside in _arrays(root):
            particle = _particle_of(kind, inside)
            if particle is not None and particle not in wanted:
                continue
            name = inside.rsplit("/", 1)[-1]
            if deep or (kind, name) not in _LARGE:
                checked += disk_usage(root / inside)
            jobs.append((kind, root, inside))
    t0 = time.perf_counter()
    n = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

    def one(job: tuple[str, Path, str]) -> list[Damage]:
        if progress is not None:
            progress(f"{job[0]}.zarr/{job[2]}")
        return _check_array(*job, deep=deep)

    with ThreadPoolExecutor(n) as pool:
        found = [d for ds in pool.map(one, jobs) for d in ds]
    report = VerifyReport(
        damage=found,
        arrays=len(jobs),
        bytes=checked,
        seconds=time.perf_counter() - t0,
        deep=deep,
    )
    if found and mark:
        report.marked = mark_damaged(layout, found)
    return report


# -- marking ----------------------------------------------------------------------------------
def mark_damaged(layout: OutputLayout, damage: list[Damage]) -> list[str]:
    """Mark every damaged part as not done; returns what was marked, in words.

    * raw frames (or per-angle arrays) of an angle: the angle is marked not ingested, so ingest
      rewrites that angle only (and reduce then recomputes the particle);
    * any other raw array: every angle of the particle is marked not ingested;
    * an array of a results node: the stage that made it loses its completion record for that
      particle (reduce: the node reads as incomplete);
    * ``analysis.zarr``: its fingerprint is removed, so analyze runs again.
    """
    marked = []
    for (kind, particle, stage), items in _grouped(damage).items():
        try:
            if kind == "raw" and particle is not None:
                group = zarr.open_group(str(layout.raw_node(particle)), mode="r+")
                angles = sorted({d.angle for d in items if d.angle is not None})
                n = group["done"].shape[0]
                per_angle = all(d.angle is not None for d in items)
                todo = angles if per_angle else list(range(n))
                done = group["done"]
                for a in todo:
                    done[a] = 0
                attrs = dict(group.attrs)
                attrs["spndi_dask"] = {**attrs.get("spndi_dask", {}), "complete": False}
                group.attrs.put(attrs)
                marked.append(f"{particle}: angles {todo} to be ingested again")
            elif kind == "results" and particle is not None:
                group = zarr.open_group(str(layout.node(particle)), mode="r+")
                attrs = dict(group.attrs)
                if stage == "reduce":
                    attrs["spndi_dask"] = {**attrs.get("spndi_dask", {}), "complete": False}
                else:
                    attrs.pop(stage_of(stage).attrs_key, None)
                group.attrs.put(attrs)
                marked.append(f"{particle}: {stage} to be recomputed")
            elif kind == "analysis":
                group = zarr.open_group(str(layout.analysis), mode="r+")
                attrs = dict(group.attrs)
                attrs.pop("fingerprint", None)
                group.attrs.put(attrs)
                marked.append("analysis.zarr: analyze to be recomputed")
        except Exception as exc:  # metadata itself damaged: say so, the rest goes on
            logger.error("cannot mark %s %s as damaged: %s", kind, particle, exc)
            marked.append(f"{kind} {particle}: could not be marked ({exc}); remove it by hand")
    return marked


def _grouped(damage: list[Damage]) -> dict[tuple[str, str | None, str], list[Damage]]:
    out: dict[tuple[str, str | None, str], list[Damage]] = {}
    for d in damage:
        out.setdefault((d.store, d.particle, d.stage), []).append(d)
    return out


# -- reading ----------------------------------------------------------------------------------
def _zarr_array_in(obj: Any) -> zarr.Array | None:
    """The zarr array under xarray's lazy wrappers (adapter → copy-on-write → lazy → backend)."""
    for _ in range(12):
        if isinstance(obj, zarr.Array):
            return obj
        nxt = getattr(obj, "array", None)
        if nxt is None:
            nxt = getattr(obj, "_array", None)
        if nxt is None:
            return None
        obj = nxt
    return None


def guarded_getter(a: Any, b: Any, asarray: bool = True, lock: Any = None) -> Any:
    """dask's ``getter`` that turns a damaged chunk into a :class:`DamagedStoreError`.

    Given to ``from_array`` (xarray's ``from_array_kwargs={"getitem": ...}``) by
    :func:`~spndi_dask.io.results_store.open_results`, so a damaged chunk read anywhere (a stage,
    the report, a notebook) names its array, particle and the command that recomputes it.
    """
    from dask.array.core import getter

    try:
        return getter(a, b, asarray=asarray, lock=lock)
    except Exception as exc:
        if not is_damage(exc):
            raise
        array = _zarr_array_in(a)
        within = b if isinstance(b, tuple) and all(isinstance(s, slice) for s in b) else None
        raise damage_error(exc, array=array, within=within) from exc


def read(array: zarr.Array, selection: Any) -> np.ndarray:
    """``array[selection]``; a damaged chunk raises :class:`DamagedStoreError` naming it.

    ``selection`` is a tuple of slices and integers (an integer reads one index), or ``...``.
    """
    try:
        return array[selection]
    except Exception as exc:
        if not is_damage(exc):
            raise
        raise damage_error(exc, array=array, within=_as_slices(selection)) from exc


def _as_slices(selection: Any) -> tuple[slice, ...] | None:
    """A basic selection as slices (an integer ``i`` as ``i:i+1``); None for anything else."""
    if not isinstance(selection, tuple):
        selection = (selection,)
    out = []
    for s in selection:
        if isinstance(s, (int, np.integer)) and s >= 0:
            out.append(slice(int(s), int(s) + 1))
        elif isinstance(s, slice) and s.step in (None, 1):
            out.append(s)
        else:  # Ellipsis, arrays: check the whole array
            return None
    return tuple(out)
