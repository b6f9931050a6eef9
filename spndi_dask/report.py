"""Self-contained HTML report of a processed beamtime: ``<output>/report/index.html``.

One file, readable offline: inline CSS, no script, no external resource; every figure of
``<output>/figures/`` embedded as a base64 PNG ``data:`` URI. Sections:

* **summary**: beamtime name, dates, package version, the status of every stage per scan;
* **beamtime overview**: ``beamtime_overview.png`` and the per-particle statistics;
* **one section per particle scan**: reduction notes, the statistics of ``particles.csv``, the
  maps, rocking curves, strain–tilt density and cluster maps;
* **features**: the autoencoder and its training;
* **clustering**: K, how it was chosen, inertia and silhouette per K, cluster statistics;
* **analysis**: cluster rocking curves and mean patterns, domains vs boundaries;
* **run**: the stage timings and the cluster a pipeline ran on;
* **provenance**: library versions, the manifest (text and SHA-256), input file fingerprints and
  the attrs every stage stored.

The report only reads what the stages wrote (attrs, CSV tables, PNG figures): no array is
computed. A stage that has not run shows as "not run"; a missing figure is skipped with a note.

The module follows the package's layers: HTML fragments from plain data (``_table``, ``_kv``,
``_figure``...), cheap readers (``_attrs``, ``_csv``, :func:`file_fingerprint`) and the
orchestration :func:`write_report`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import logging
import math
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from spndi_dask._version import __version__
from spndi_dask.config import Manifest
from spndi_dask.particles import MAPS, STATS
from spndi_dask.reduce.maps import MAP_VARIABLES
from spndi_dask.status import read_attrs, scan_status

__all__ = [
    "LIBRARIES",
    "file_fingerprint",
    "input_fingerprints",
    "library_versions",
    "render_report",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Distributions whose versions the provenance lists (besides Python and spndi_dask).
LIBRARIES = (
    "numpy",
    "dask",
    "distributed",
    "zarr",
    "xarray",
    "torch",
    "dask-ml",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "h5py",
    "hdf5plugin",
)

#: Stages whose completion is recorded per particle scan: (column, where, attrs key).
STAGES = (
    ("ingest", "raw", "spndi_dask"),
    ("reduce", "results", "spndi_dask"),
    ("stats", "results", "particles"),
    ("features", "results", "features"),
    ("cluster", "results", "cluster"),
    ("analysis", "results", "analysis"),
)

_PNG = b"\x89PNG\r\n\x1a\n"
_EDGE = 1 << 20  # bytes hashed at each end of an input file
_STAT_SUFFIXES = STATS
_UNITS = {k: MAP_VARIABLES[k].split(" ")[0] for k in MAPS}
#: Per-scan figures of plot.py: (file suffix, caption).
_PARTICLE_FIGURES = (
    ("maps", "Maps: strain, tilts, d-spacing and intensity (grey = background)"),
    ("rocking_curve", "Rocking curve of every particle label"),
    ("strain_tilt_kde", "Joint density of strain and tilt"),
)
_ANALYSIS_FIGURES = (
    ("cluster_rocking_curves.png", "Rocking curves per cluster; domains vs boundaries"),
    ("cluster_patterns.png", "Mean 3D pattern of every cluster (three projections)"),
    ("region_patterns.png", "Mean 3D pattern of domains and of boundaries"),
)
_BEAMTIME_FIGURES = {
    "beamtime_overview.png",
    "clusters_k.png",
    *(f for f, _ in _ANALYSIS_FIGURES),
}

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 "DejaVu Sans","Liberation Sans",Arial,sans-serif;color:#1d2433;
background:#eef1f5}
nav{position:fixed;top:0;left:0;bottom:0;width:210px;overflow-y:auto;background:#1f2a3c;
color:#dfe6f0;padding:18px 14px;font-size:13px}
nav .title{font-weight:bold;color:#fff;font-size:15px;margin-bottom:10px;word-break:break-all}
nav a{color:#c6d3e6;text-decoration:none;display:block;padding:2px 4px;border-radius:3px}
nav a:hover{background:#2f3d55;color:#fff}
nav ol{list-style:none;margin:0;padding:0}nav ol ol{padding-left:14px}
nav li>span{display:block;padding:2px 4px;color:#8fa3bf}
main{margin-left:210px;padding:18px 26px;max-width:1320px}
header{padding:6px 0 12px}header h1{margin:0 0 4px;font-size:26px}
header .sub{color:#55627a}
section{background:#fff;border-radius:6px;box-shadow:0 1px 3px rgba(20,30,50,.12);
padding:14px 20px 18px;margin:0 0 18px}
h2{margin:4px 0 10px;font-size:20px;border-bottom:2px solid #3b6fb6;padding-bottom:4px}
h3{margin:16px 0 6px;font-size:16px;color:#23406b}h4{margin:12px 0 4px;font-size:14px}
figure{margin:10px 0;flex:1 1 360px;min-width:0}
figure img{max-width:100%;height:auto;display:block;border:1px solid #e1e5ec;background:#fff}
figcaption{font-size:12px;color:#55627a;margin-top:3px}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
th,td{padding:3px 9px;border-bottom:1px solid #e4e8ef;text-align:right;vertical-align:top}
th{background:#f3f6fa;font-weight:600}
th:first-child,td:first-child,td.text,th.text{text-align:left}td.text{white-space:nowrap}
tr.chosen td,tr.total td{font-weight:bold;background:#fff7dd}
table.kv th{text-align:left;white-space:nowrap}table.kv td{text-align:left}
code,pre,.mono{font-family:"DejaVu Sans Mono","Liberation Mono",monospace;font-size:12px}
pre{background:#f6f8fb;border:1px solid #e1e5ec;padding:8px 10px;overflow:auto;
max-height:520px;white-space:pre-wrap;overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;white-space:nowrap}
.done{background:#d8f1e1;color:#17653a}.not-run{background:#e9ecf1;color:#5b6475}
.warn{background:#fdebd0;color:#8a4b00}.error{background:#f9d6d5;color:#9b1c1c}
p.note{color:#5b6475;font-style:italic;margin:6px 0}
p.warning{color:#8a4b00;margin:6px 0}
details{margin:6px 0}summary{cursor:pointer;color:#23406b;font-weight:600}
@media (max-width:900px){nav{position:static;width:auto}main{margin-left:0}}
@media print{nav{display:none}main{margin-left:0}section{box-shadow:none}pre{max-height:none}}
"""


# -- HTML fragments from plain data ---------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _fmt(value: Any, *, numeric_strings: bool = False) -> str:
    """A cell's text (escaped): floats to 4 significant digits, lists joined.

    With ``numeric_strings``, strings that read as floats (CSV cells) are formatted as floats.

    Examples
    --------
    >>> _fmt(0.000123456), _fmt("0.000123456", numeric_strings=True), _fmt("3.10")
    ('0.0001235', '0.0001235', '3.10')
    >>> _fmt(float("nan")), _fmt(None), _fmt(["a<b", 2])
    ('—', '—', 'a&lt;b, 2')
    """
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return _esc(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "—"
    if isinstance(value, dict):
        return _esc(json.dumps(value, default=str))
    if isinstance(value, str) and (not numeric_strings or value.lstrip("-").isdigit()):
        return _esc(value)
    x = _number(value)
    if x is None:
        return _esc(value)
    if not math.isfinite(x):
        return "—"
    return _esc(f"{x:.4g}")


def _table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: dict[str, str] | None = None,
    row_class: Callable[[dict[str, Any]], str] | None = None,
    text: Iterable[str] = (),
) -> str:
    """An HTML table of ``rows`` (dicts); ``columns`` default to every key, in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    headers = headers or {}
    text = set(text)
    cls = {c: ' class="text"' if c in text else "" for c in columns}
    head = "".join(f"<th{cls[c]}>{_esc(headers.get(c, c))}</th>" for c in columns)
    body = []
    for r in rows:
        rc = row_class(r) if row_class else ""
        cells = "".join(
            f"<td{cls[c]}>{_fmt(r.get(c), numeric_strings=c not in text)}</td>" for c in columns
        )
        body.append(f'<tr class="{_esc(rc)}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    return (
        f'<div class="wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _kv(items: dict[str, Any]) -> str:
    """A two-column key/value table."""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items.items())
    return f'<div class="wrap"><table class="kv"><tbody>{rows}</tbody></table></div>'


def _badge(status: str) -> str:
    kind = {
        "done": "done",
        "not run": "not-run",
        "failed": "error",
        "missing": "error",
        "changed": "warn",
    }.get(status, "warn")
    return f'<span class="badge {kind}">{_esc(status)}</span>'


def _text(text: str) -> str:
    """Escaped text with `backquoted` commands as <code>."""
    return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", _esc(text))


def _not_run(what: str, hint: str = "") -> str:
    extra = f" ({_text(hint)})" if hint else ""
    return f'<p class="note">{_badge("not run")} {_text(what)} not run{extra}.</p>'


def _note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


def _pre(text: str) -> str:
    return f"<pre>{_esc(text)}</pre>"


def _figure(path: Path, caption: str) -> str:
    """The PNG at ``path`` embedded as a data URI, or a note when it is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return _note(f"figure {path.name} not written.")
    if not data.startswith(_PNG):
        return _note(f"figure {path.name} is not a PNG file; left out.")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{_esc(path.name)}">'
        f"<figcaption>{_esc(caption)} <span class='mono'>({_esc(path.name)})</span>"
        "</figcaption></figure>"
    )


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{_esc(sid)}"><h2>{_esc(title)}</h2>{body}</section>'


def _compact(obj: Any, *, items: int = 8, chars: int = 400) -> Any:
    """``obj`` with long lists shortened (for showing stage attrs)."""
    if isinstance(obj, dict):
        return {k: _compact(v, items=items, chars=chars) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        head = [_compact(v, items=items, chars=chars) for v in obj[:items]]
        return head + ([f"… {len(obj) - items} more"] if len(obj) > items else [])
    if isinstance(obj, str) and len(obj) > chars:
        return obj[:chars] + f"… ({len(obj)} characters)"
    return obj


def _json(obj: Any) -> str:
    return json.dumps(_compact(obj), indent=1, default=str, ensure_ascii=False)


def _anchor(prefix: str, name: str) -> str:
    return f"{prefix}-{name}"


# -- cheap readers --------------------------------------------------------------------------------
def _csv(path: Path) -> list[dict[str, str]] | None:
    """Rows of a CSV table, or None when it does not exist."""
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def file_fingerprint(path: str | Path, *, edge: int = _EDGE) -> dict[str, Any]:
    """Size, modification time and SHA-256 of the first and last ``edge`` bytes of a file.

    Files of at most ``2 * edge`` bytes are hashed whole. A missing file gives
    ``{"path": ..., "status": "missing"}``.

    Parameters
    ----------
    path : path
        The file.
    edge : int
        Bytes hashed at each end (1 MiB): enough to tell files apart without reading terabytes.

    Returns
    -------
    dict
        ``path``, ``status`` ('present' or 'missing'), ``size``, ``mtime`` (ISO 8601, UTC),
        ``mtime_ns`` and ``edge_sha256``.

    Examples
    --------
    >>> import tempfile, hashlib
    >>> p = Path(tempfile.mkdtemp()) / "a.bin"
    >>> _ = p.write_bytes(b"spndi")
    >>> fp = file_fingerprint(p)
    >>> fp["size"], fp["edge_sha256"] == hashlib.sha256(b"spndi").hexdigest()
    (5, True)
    >>> file_fingerprint(p.with_name("b.bin"))["status"]
    'missing'
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "status": "missing"}
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= 2 * edge:
            h.update(f.read())
        else:
            h.update(f.read(edge))
            f.seek(st.st_size - edge)
            h.update(f.read(edge))
    return {
        "path": str(path),
        "status": "present",
        "size": st.st_size,
        "mtime": _iso(st.st_mtime),
        "mtime_ns": st.st_mtime_ns,
        "edge_sha256": h.hexdigest(),
    }


def input_fingerprints(manifest: Manifest) -> list[dict[str, Any]]:
    """Fingerprints (:func:`file_fingerprint`) of every input file the manifest names.

    Per particle its frame files (one per angle), dark and mask; then the ``[reduce]`` detector
    mask and flat field. Each row also has ``particle`` and ``role`` ('frames 3', 'dark', ...)
    and, for frame files, ``vs_ingest``: whether size and mtime are those recorded by ingest
    ('same', 'changed', or '' when not ingested).
    """
    raw = manifest.output_dir / "raw.zarr"
    rows: list[dict[str, Any]] = []
    for p in manifest.particles:
        sources = (read_attrs(raw / p.name) or {}).get("sources") or []
        recorded = {s.get("path"): s for s in sources if s}
        for i, path in enumerate(p.frame_paths(manifest.base_dir)):
            fp = file_fingerprint(path)
            rec = recorded.get(str(path))
            vs = ""
            if rec is not None:
                same = rec.get("size") == fp.get("size") and rec.get("mtime_ns") == fp.get(
                    "mtime_ns"
                )
                vs = "same" if same else "changed"
            rows.append({"particle": p.name, "role": f"frames {i}", **fp, "vs_ingest": vs})
        for role in ("dark", "mask"):
            value = getattr(p, role)
            if value:
                rows.append(
                    {"particle": p.name, "role": role, **file_fingerprint(manifest.resolve(value))}
                )
    for role in ("detector_mask", "flat"):
        value = getattr(manifest.reduce, role)
        if value:
            rows.append(
                {"particle": "all", "role": role, **file_fingerprint(manifest.resolve(value))}
            )
    return rows


def library_versions() -> dict[str, str]:
    """Versions of Python, spndi_dask and :data:`LIBRARIES` (without importing them).

    Examples
    --------
    >>> v = library_versions()
    >>> v["spndi_dask"] == __version__ and "numpy" in v
    True
    """
    out = {"python": platform.python_version(), "spndi_dask": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["platform"] = f"{platform.system()} {platform.release()} {platform.machine()}"
    return out


# -- sections -----------------------------------------------------------------------------------
class _Context:
    """What the sections read, gathered once (attrs, tables, paths)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._status: dict[str, dict[str, tuple[str, str]]] | None = None
        self.out = manifest.output_dir
        self.figures = self.out / "figures"
        self.names = [p.name for p in manifest.particles]
        results = self.out / "results.zarr"
        self.root = read_attrs(results) or {}
        self.node = {n: read_attrs(results / n) for n in self.names}
        self.raw = {n: read_attrs(self.out / "raw.zarr" / n) for n in self.names}
        self.clusters = self.root.get("clusters") or None
        self.particles_csv = _csv(self.out / "particles.csv")
        self.clusters_csv = _csv(self.out / "clusters.csv")
        self.regions_csv = _csv(self.out / "regions.csv")
        self.analysis = read_attrs(self.out / "analysis.zarr")
        pngs = sorted(self.figures.glob("*.png")) if self.figures.is_dir() else []
        self.particle_pngs: dict[str, list[Path]] = {n: [] for n in self.names}
        self.other_pngs: list[Path] = []
        for png in pngs:
            owner = max(
                (n for n in self.names if png.name.startswith(f"{n}_")), key=len, default=None
            )
            if owner is not None:
                self.particle_pngs[owner].append(png)
            elif png.name not in _BEAMTIME_FIGURES:
                self.other_pngs.append(png)

    def stage_status(self, name: str) -> dict[str, str]:
        """``done`` / ``not run`` / ``incomplete`` / ``stale`` / ``failed`` of every stage."""
        if self._status is None:
            self._status = scan_status(self.manifest)
        return {stage: state for stage, (state, _) in self._status[name].items()}

    def checkpoint(self) -> Path:
        """The checkpoint encode used (from the attrs), else the one train writes."""
        for attrs in self.node.values():
            ckpt = ((attrs or {}).get("features") or {}).get("checkpoint")
            if ckpt:
                return Path(ckpt)
        if self.manifest.features.checkpoint:  # as spndi_dask.features.checkpoint_path
            return self.manifest.resolve(self.manifest.features.checkpoint)
        return self.out / "features" / "model.safetensors"


def _dates(ctx: _Context) -> dict[str, str]:
    ingested = sorted(a["ingested_at"] for a in ctx.raw.values() if a and a.get("ingested_at"))
    reduced = sorted(a["reduced_at"] for a in ctx.node.values() if a and a.get("reduced_at"))
    out = {}
    if ingested:
        out["ingested"] = ingested[0][:10] + (
            f" – {ingested[-1][:10]}" if ingested[-1][:10] != ingested[0][:10] else ""
        )
    if reduced:
        out["reduced"] = reduced[-1]
    return out


def _header(ctx: _Context, generated: str) -> str:
    m = ctx.manifest
    dates = _dates(ctx)
    sub = [f"generated {generated}", f"spndi_dask {__version__}"]
    sub += [f"{k} {v}" for k, v in dates.items()]
    return (
        f"<header><h1>{_esc(m.name)}</h1><div class='sub'>SPNDI beamtime report · "
        f"{' · '.join(_esc(s) for s in sub)}</div></header>"
    )


def _summary(ctx: _Context) -> str:
    m = ctx.manifest
    info = {
        "beamtime": m.name,
        "manifest": m.source,
        "output": str(ctx.out),
        "particle scans": len(ctx.names),
        "report generated with": f"spndi_dask {__version__}",
    }
    info.update(_dates(ctx))
    if ctx.clusters:
        info["clusters"] = f"K = {ctx.clusters.get('k')} ({ctx.clusters.get('k_source')})"
    rows = []
    for name in ctx.names:
        p = m.particle(name)
        status = ctx.stage_status(name)
        rows.append(
            {
                "particle": f'<a href="#{_esc(_anchor("particle", name))}">{_esc(name)}</a>',
                "angles": str(p.angles.size),
                "scan": f"{p.scan_shape[0]} × {p.scan_shape[1]}",
                **{s: _badge(v) for s, v in status.items()},
            }
        )
    head = "".join(f"<th>{_esc(c)}</th>" for c in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r.values()) + "</tr>" for r in rows)
    status_table = (
        f'<div class="wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )
    return _kv(info) + "<h3>Stages per particle scan</h3>" + status_table


_OVERVIEW_COLUMNS = (
    "particle",
    "label",
    "pixels",
    "area_um2",
    "d_spacing_mean",
    "strain_mean",
    "strain_std",
    "tilt_x_mean",
    "tilt_y_mean",
    "corr_strain_tilt_x",
    "corr_strain_tilt_y",
    "warning",
)


def _overview(ctx: _Context) -> str:
    parts = [_figure(ctx.figures / "beamtime_overview.png", "Per-particle distributions")]
    if ctx.particles_csv is None:
        parts.append(_not_run("Particle statistics (`spndi stats`)", "no particles.csv"))
    elif ctx.particles_csv:
        cols = [c for c in _OVERVIEW_COLUMNS if c in ctx.particles_csv[0]]
        parts.append("<h3>Particles (particles.csv)</h3>")
        parts.append(_table(ctx.particles_csv, cols, text=("particle", "warning")))
    return "".join(parts)


def _stats_tables(rows: list[dict[str, str]]) -> str:
    """The particles.csv rows of one scan: a summary table, then per label its statistics."""
    cols = list(rows[0])
    quantities = [c[: -len("_mean")] for c in cols if c.endswith("_mean")]
    stat_cols = {f"{q}_{s}" for q in quantities for s in _STAT_SUFFIXES}
    summary_cols = [c for c in cols if c not in stat_cols and c != "particle"]
    parts = [_table(rows, summary_cols, text=("warning",))]
    for r in rows:
        stat_rows = []
        for q in quantities:
            unit = _UNITS.get(q, "")
            row: dict[str, Any] = {"quantity": f"{q} ({unit})" if unit else q}
            row.update({s: r.get(f"{q}_{s}") for s in _STAT_SUFFIXES if f"{q}_{s}" in r})
            stat_rows.append(row)
        label = r.get("label", "?")
        parts.append(f"<h4>Label {_esc(label)}: statistics over its pixels</h4>")
        parts.append(_table(stat_rows, text=("quantity",)))
    return "".join(parts)


def _reduce_notes(attrs: dict[str, Any]) -> str:
    keys = {
        "reduced_at": "reduced",
        "roi": "detector ROI [r0, r1, c0, c1]",
        "roi_at_detector_edge": "ROI at detector edge",
        "has_signal": "has signal",
        "drift_method": "drift registration",
        "reference_angle_index": "reference angle index",
        "hot_pixels": "hot pixels",
        "dead_pixels": "dead pixels",
        "strain_reference": "strain reference",
    }
    info = {label: attrs[k] for k, label in keys.items() if k in attrs}
    warn = "".join(f'<p class="warning">warning: {_esc(w)}</p>' for w in attrs.get("warnings", []))
    return _kv(info) + warn


def _particle(ctx: _Context, name: str) -> str:
    p = ctx.manifest.particle(name)
    status = ctx.stage_status(name)
    parts = [
        f"<p>{p.angles.size} rocking angles {p.angles.min():.4g}–{p.angles.max():.4g}°, "
        f"scan {p.scan_shape[0]} × {p.scan_shape[1]} points of "
        f"{p.scan_step_um[0]:g} × {p.scan_step_um[1]:g} µm. Stages: "
        + " ".join(f"{_esc(s)} {_badge(v)}" for s, v in status.items())
        + "</p>"
    ]
    attrs = ctx.node.get(name)
    parts.append("<h3>Reduction</h3>")
    parts.append(
        _reduce_notes(attrs) if attrs and status["reduce"] == "done" else _not_run("Reduce")
    )
    parts.append("<h3>Statistics</h3>")
    rows = [r for r in ctx.particles_csv or [] if r.get("particle") == name]
    if rows:
        parts.append(_stats_tables(rows))
    elif status["stats"] != "done":
        parts.append(_not_run("Particle statistics", "`spndi stats`"))
    else:
        parts.append(_note("No row for this scan in particles.csv."))
    pngs = {png.name: png for png in ctx.particle_pngs.get(name, [])}
    parts.append("<h3>Maps and rocking curves</h3>")
    if status["stats"] != "done" and not pngs:
        parts.append(_not_run("Figures (`spndi stats`)"))
    else:
        maps, *small = _PARTICLE_FIGURES
        parts.append(_figure(ctx.figures / f"{name}_{maps[0]}.png", maps[1]))
        row = [_figure(ctx.figures / f"{name}_{f}.png", cap) for f, cap in small]
        parts.append(f'<div class="row">{"".join(row)}</div>')
    if f"{name}_clusters.png" in pngs:
        parts.append(
            f'<p>Cluster map: see <a href="#{_esc(_anchor("clusters", name))}">clustering</a>.</p>'
        )
    known = {f"{name}_{f}.png" for f, _ in _PARTICLE_FIGURES} | {f"{name}_clusters.png"}
    others = [png for n, png in pngs.items() if n not in known]
    if others:
        parts.append("<h3>Other figures</h3>")
        parts.append("".join(_figure(png, png.stem) for png in others))
    return "".join(parts)


def _features(ctx: _Context) -> str:
    done = {n: (a or {}).get("features") for n, a in ctx.node.items()}
    ckpt = ctx.checkpoint()
    meta_path = ckpt.with_suffix(".json")
    parts = []
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            meta = {}
            parts.append(_note(f"cannot read {meta_path}: {exc}"))
        training = meta.get("training") or {}
        info = {
            "checkpoint": str(ckpt),
            "model": meta.get("kind"),
            "hyper-parameters": meta.get("hyper"),
            "created": meta.get("created"),
            "torch": meta.get("torch"),
        }
        for key in (
            "n_train",
            "n_val",
            "epochs",
            "best_epoch",
            "best_val_loss",
            "stopped_early",
            "device",
            "seconds",
            "scans",
        ):
            if key in training:
                info[f"training {key}"] = training[key]
        parts.append(_kv(info))
        history = training.get("history") or []
        if history:
            cols = [c for c in ("epoch", "train_loss", "val_loss", "seconds") if c in history[0]]
            parts.append(
                "<details><summary>Training history</summary>"
                + _table(history, cols)
                + "</details>"
            )
    else:
        parts.append(_not_run("Training", "`spndi train`; no checkpoint metadata"))
    rows = [
        {
            "particle": n,
            "encoded pixels": (d or {}).get("pixels"),
            "model": (d or {}).get("model"),
            "latent_dim": (d or {}).get("latent_dim"),
            "checkpoint sha256": (d or {}).get("checkpoint_sha256"),
        }
        for n, d in done.items()
    ]
    if any(done.values()):
        parts.append("<h3>Encoding</h3>" + _table(rows, text=("checkpoint sha256", "model")))
    else:
        parts.append(_not_run("Encoding", "`spndi encode`"))
    return "".join(parts)


def _k_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    inertia = {int(k): v for k, v in (info.get("inertia_by_k") or {}).items()}
    sil = {int(k): v for k, v in (info.get("silhouette_by_k") or {}).items()}
    ks = sorted(set(inertia) | set(sil))
    if not ks:
        return []
    first, last = (inertia.get(ks[0]), inertia.get(ks[-1])) if inertia else (None, None)
    drop = first - last if first is not None and last is not None else None
    rows = []
    for k in ks:
        share = None
        if drop and k in inertia:
            share = (first - inertia[k]) / drop
        rows.append(
            {
                "K": k,
                "inertia": inertia.get(k),
                "share of inertia drop": share,
                "silhouette": sil.get(k),
            }
        )
    return rows


def _how_chosen(info: dict[str, Any], manifest: Manifest) -> str:
    k, source = info.get("k"), info.get("k_source")
    s = manifest.cluster
    if source == "elbow":
        return (
            f"K = {k} by the elbow rule: the smallest K whose share of the inertia drop from "
            f"K = 1 to K = {s.k_max} reaches {s.elbow_fraction:g} ([cluster] elbow_fraction); the "
            f"silhouette score of each K on a sample of up to {s.silhouette_sample} pixels is "
            "shown beside it."
        )
    if source == "manifest":
        return f"K = {k} fixed in the manifest ([cluster] k = {k})."
    if source == "argument":
        return f"K = {k} given for this run (command line or k argument)."
    return f"K = {k} ({source})."


def _clustering(ctx: _Context) -> str:
    info = ctx.clusters
    if not info:
        return _not_run("Clustering", "`spndi cluster` after `spndi encode`")
    sil = (info.get("silhouette_by_k") or {}).get(str(info.get("k")))
    parts = [f"<p><b>{_esc(_how_chosen(info, ctx.manifest))}</b></p>"]
    parts.append(
        _kv(
            {
                "K": info.get("k"),
                "K chosen by": info.get("k_source"),
                "initialisation": info.get("init"),
                "restarts (n_init)": info.get("n_init"),
                "seed of the kept restart": info.get("seed"),
                "feature scaling": info.get("standardize"),
                "inertia (kept restart)": info.get("inertia"),
                "inertia of every restart": info.get("restart_inertias"),
                "silhouette at K": sil,
                "pixels clustered": info.get("pixels"),
                "particle scans": info.get("particles"),
                "version": info.get("version"),
            }
        )
    )
    rows = _k_rows(info)
    if rows:
        k = info.get("k")
        parts.append("<h3>Inertia and silhouette per K</h3>")
        parts.append(_table(rows, row_class=lambda r: "chosen" if r["K"] == k else ""))
    parts.append(_figure(ctx.figures / "clusters_k.png", "Choosing K: inertia (elbow), silhouette"))
    if ctx.clusters_csv:
        parts.append("<h3>Clusters per scan (clusters.csv)</h3>")
        parts.append(
            _table(
                ctx.clusters_csv,
                text=("particle",),
                row_class=lambda r: "total" if r.get("particle") == "all" else "",
            )
        )
    parts.append("<h3>Cluster maps</h3>")
    for name in ctx.names:
        status = ctx.stage_status(name)["cluster"]
        parts.append(
            f'<h4 id="{_esc(_anchor("clusters", name))}">{_esc(name)} {_badge(status)}</h4>'
        )
        if status == "not run":
            parts.append(_not_run(f"Clustering of {name}"))
        else:
            parts.append(_figure(ctx.figures / f"{name}_clusters.png", f"{name}: cluster map"))
    return "".join(parts)


def _region_rows(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """regions.csv as rows (particle, quantity): domain and boundary mean ± std, difference."""
    out = []
    for r in rows:
        quantities = [
            c[len("domain_") : -len("_mean")]
            for c in r
            if c.startswith("domain_") and c.endswith("_mean")
        ]
        for q in quantities:
            out.append(
                {
                    "particle": r.get("particle"),
                    "quantity": f"{q} ({_UNITS.get(q, '')})",
                    "domain pixels": r.get("domain_pixels"),
                    "boundary pixels": r.get("boundary_pixels"),
                    "domain mean": r.get(f"domain_{q}_mean"),
                    "domain std": r.get(f"domain_{q}_std"),
                    "boundary mean": r.get(f"boundary_{q}_mean"),
                    "boundary std": r.get(f"boundary_{q}_std"),
                    "boundary − domain (mean)": r.get(f"diff_{q}_mean"),
                }
            )
    return out


def _analysis(ctx: _Context) -> str:
    if ctx.analysis is None and ctx.regions_csv is None:
        return _not_run("Analysis", "`spndi analyze` after `spndi cluster`")
    parts = []
    if ctx.analysis:
        parts.append(
            _kv(
                {
                    "K": ctx.analysis.get("k"),
                    "boundary width (scan pixels)": ctx.analysis.get("boundary_width"),
                    "version": ctx.analysis.get("version"),
                }
            )
        )
        if ctx.clusters and ctx.clusters.get("k") != ctx.analysis.get("k"):
            parts.append(
                '<p class="warning">The analysis is of an older clustering; rerun '
                "`spndi analyze`.</p>"
            )
    parts.append(
        "<p>A particle pixel is a <i>boundary</i> pixel when a pixel of another cluster lies "
        "within the boundary width, else a <i>domain</i> pixel.</p>"
    )
    for fname, caption in _ANALYSIS_FIGURES:
        parts.append(_figure(ctx.figures / fname, caption))
    if ctx.regions_csv:
        parts.append("<h3>Domains vs boundaries (regions.csv)</h3>")
        rows = _region_rows(ctx.regions_csv)
        parts.append(
            _table(rows, text=("particle", "quantity")) if rows else _table(ctx.regions_csv)
        )
    return "".join(parts)


def _run(
    ctx: _Context, timings: list[dict[str, Any]] | None, run_info: dict[str, Any] | None
) -> str:
    parts = ["<h3>Stage timings</h3>"]
    if timings:
        rows = [dict(r) for r in timings]
        for r in rows:
            if isinstance(r.get("particles"), (list, tuple)):
                r["particles"] = ", ".join(map(str, r["particles"]))
        total = sum(x for r in rows if (x := _number(r.get("seconds"))) is not None)
        cols = list(dict.fromkeys(k for r in rows for k in r))
        rows.append({cols[0]: "total", "seconds": total})
        parts.append(
            _table(
                rows,
                cols,
                text=[c for c in cols if c != "seconds"],
                row_class=lambda r: "total" if r.get(cols[0]) == "total" else "",
            )
        )
    else:
        parts.append(_note("No timings given (the report was written outside `spndi run`)."))
    parts.append("<h3>Cluster and run</h3>")
    parts.append(_kv(run_info) if run_info else _note("No run information given."))
    logs = (
        sorted((ctx.out / "logs").glob("run-*"), reverse=True)
        if (ctx.out / "logs").is_dir()
        else []
    )
    if logs:
        parts.append("<h3>Run logs</h3>")
        parts.append(
            _table(
                [
                    {"file": str(f), "bytes": f.stat().st_size, "modified": _iso(f.stat().st_mtime)}
                    for f in logs[:10]
                ],
                text=("file", "modified"),
            )
        )
    return "".join(parts)


def _manifest_text(manifest: Manifest) -> tuple[str, str | None, str]:
    """(text, sha256 of the file or None, where it came from)."""
    src = Path(manifest.source)
    if src.is_file():
        data = src.read_bytes()
        return data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest(), str(src)
    return manifest.to_toml(), None, f"{manifest.source} (no file: settings written as TOML)"


def _provenance(ctx: _Context) -> str:
    m = ctx.manifest
    text, digest, where = _manifest_text(m)
    parts = ["<h3>Software</h3>", _kv(library_versions())]
    stored = sorted(
        {a.get("manifest_hash") for a in ctx.node.values() if a and a.get("manifest_hash")}
    )
    info = {
        "manifest file": where,
        "manifest sha256 (file)": digest or "—",
        "settings hash (canonical JSON, as stored by the stages)": m.manifest_hash,
    }
    if stored:
        info["settings hash stored in results.zarr"] = ", ".join(stored)
    parts += ["<h3>Manifest</h3>", _kv(info)]
    if stored and stored != [m.manifest_hash]:
        parts.append(
            '<p class="warning">Some results were produced with other settings than this '
            "manifest's; rerun the stages (they redo what changed).</p>"
        )
    parts.append(_pre(text))
    parts.append(_inputs(ctx))
    parts.append("<h3>Stage records (attrs)</h3>")
    parts.append(
        _note(
            "What every stage stored when it completed (long lists shortened). The ingest record "
            "lists the full SHA-256 of each source file when [ingest] checksum = 'sha256'."
        )
    )
    root = dict(ctx.root)
    if root:
        parts.append(
            f"<details><summary>results.zarr (beamtime)</summary>{_pre(_json(root))}</details>"
        )
    for name in ctx.names:
        recs = {}
        if ctx.raw.get(name):
            recs["ingest (raw.zarr)"] = ctx.raw[name]
        node = ctx.node.get(name) or {}
        staged = {key for _, where, key in STAGES if where == "results" and key != "spndi_dask"}
        if node:
            recs["reduce (results.zarr)"] = {k: v for k, v in node.items() if k not in staged}
        for stage, where, key in STAGES:
            if where == "results" and key != "spndi_dask" and node.get(key):
                recs[stage] = node[key]
        body = "".join(f"<h4>{_esc(k)}</h4>{_pre(_json(v))}" for k, v in recs.items())
        parts.append(
            f"<details><summary>{_esc(name)}</summary>"
            f"{body or _not_run('Ingest and reduce')}</details>"
        )
    if ctx.analysis:
        parts.append(
            f"<details><summary>analysis.zarr</summary>{_pre(_json(ctx.analysis))}</details>"
        )
    return "".join(parts)


def _inputs(ctx: _Context) -> str:
    rows = input_fingerprints(ctx.manifest)
    parts = [
        "<h3>Input files</h3>",
        _note(
            "Size, modification time and SHA-256 of the first and last MiB of every input file "
            "(whole file when smaller than 2 MiB); 'vs ingest': size and mtime as recorded by "
            "ingest."
        ),
    ]
    summary = []
    for owner in dict.fromkeys(r["particle"] for r in rows):
        mine = [r for r in rows if r["particle"] == owner]
        present = [r for r in mine if r["status"] == "present"]
        vs = [r.get("vs_ingest") for r in mine if r.get("vs_ingest") is not None]
        changed = sum(v == "changed" for v in vs)
        summary.append(
            {
                "particle": owner,
                "files": len(mine),
                "present": len(present),
                "missing": len(mine) - len(present),
                "bytes": sum(r["size"] for r in present),
                "newest mtime": max((r["mtime"] for r in present), default=None),
                "vs ingest": (
                    f"{changed} changed"
                    if changed
                    else ("same" if vs and all(vs) else "not ingested")
                ),
            }
        )
    parts.append(_table(summary, text=("particle", "newest mtime", "vs ingest")))
    base = ctx.manifest.base_dir
    shown = []
    for r in rows:
        path = Path(r["path"])
        rel = path.relative_to(base) if path.is_relative_to(base) else path
        shown.append({**r, "path": str(rel)})
    cols = ["particle", "role", "path", "status", "size", "mtime", "edge_sha256", "vs_ingest"]
    parts.append(
        f"<details><summary>All {len(rows)} input files (paths relative to {_esc(base)})</summary>"
        + _table(
            shown,
            cols,
            text=("particle", "role", "path", "status", "mtime", "edge_sha256", "vs_ingest"),
        )
        + "</details>"
    )
    return "".join(parts)


def _safe(build: Callable[[], str], what: str) -> str:
    """A section's HTML; an unexpected error becomes a note (the report is written anyway)."""
    try:
        return build()
    except Exception as exc:
        logger.warning("report section %s failed: %s", what, exc, exc_info=True)
        return (
            f'<p class="warning">{_badge("failed")} this section could not be rendered: '
            f"{_esc(exc)}</p>"
        )


def _page(title: str, nav: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def render_report(
    manifest: Manifest,
    *,
    timings: list[dict[str, Any]] | None = None,
    run_info: dict[str, Any] | None = None,
    generated: str | None = None,
) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    ctx = _Context(manifest)
    generated = generated or datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections: list[tuple[str, str, str]] = [
        ("summary", "Summary", _safe(lambda: _summary(ctx), "summary")),
        ("overview", "Beamtime overview", _safe(lambda: _overview(ctx), "overview")),
    ]
    for name in ctx.names:
        sections.append(
            (
                _anchor("particle", name),
                f"Particle scan {name}",
                _safe(lambda n=name: _particle(ctx, n), f"particle {name}"),
            )
        )
    sections += [
        ("features", "Features", _safe(lambda: _features(ctx), "features")),
        ("clustering", "Clustering", _safe(lambda: _clustering(ctx), "clustering")),
        ("analysis", "Analysis: domains and boundaries", _safe(lambda: _analysis(ctx), "analysis")),
    ]
    if ctx.other_pngs:
        others = "".join(_figure(p, p.stem) for p in ctx.other_pngs)
        sections.append(("other-figures", "Other figures", others))
    sections += [
        ("run", "Run", _safe(lambda: _run(ctx, timings, run_info), "run")),
        ("provenance", "Provenance", _safe(lambda: _provenance(ctx), "provenance")),
    ]
    nav = _nav(sections, manifest.name)
    body = _header(ctx, generated) + "".join(_section(s, t, b) for s, t, b in sections)
    return _page(f"{manifest.name} – spndi_dask report", nav, body)


def _nav(sections: list[tuple[str, str, str]], name: str) -> str:
    out, in_particles = [], False
    for sid, title, _ in sections:
        is_particle = sid.startswith("particle-")
        if is_particle and not in_particles:
            out.append("<li><span>Particle scans</span><ol>")
        if not is_particle and in_particles:
            out.append("</ol></li>")
        in_particles = is_particle
        label = title.removeprefix("Particle scan ")
        out.append(f'<li><a href="#{_esc(sid)}">{_esc(label)}</a></li>')
    if in_particles:
        out.append("</ol></li>")
    return f'<div class="title">{_esc(name)}</div><ol>{"".join(out)}</ol>'


def write_report(
    manifest: Manifest,
    *,
    timings: list[dict[str, Any]] | None = None,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Write the self-contained HTML report of a beamtime to ``<output>/report/index.html``.

    Reads only what the stages wrote (attrs, ``particles.csv``, ``clusters.csv``,
    ``regions.csv``, the PNG figures, the checkpoint metadata); stages that have not run show
    as "not run". The file is written to a temporary name in the same directory and moved into
    place, so a reader never sees half a report.

    Parameters
    ----------
    manifest : Manifest
        The beamtime.
    timings : list of dict, optional
        Stage timings of the run (``stage``, ``particles``, ``status``, ``seconds``, and any
        other keys), shown as a table with the total.
    run_info : dict, optional
        Facts about the run (cluster type, dashboard link, workers...), shown as a table.
        Links are shown as text: the report references no external resource.

    Returns
    -------
    Path
        The report.

    Examples
    --------
    A report before any stage ran: every section says "not run".

    >>> import tempfile
    >>> m = Manifest.from_dict({
    ...     "name": "bt", "geometry": {"energy_kev": 9.0, "detector_distance_m": 0.5,
    ...                                "pixel_size_m": 55e-6, "beam_center": [32, 32]},
    ...     "particles": [{"name": "p1", "frames": "raw/p1/angle_{index:03d}.h5",
    ...                    "angles_deg": {"start": -0.5, "stop": 0.5, "num": 3},
    ...                    "scan_shape": [4, 5], "scan_step_um": [0.05, 0.05]}]},
    ...     base_dir=tempfile.mkdtemp())
    >>> path = write_report(m, timings=[{"stage": "ingest", "status": "failed", "seconds": 1}])
    >>> path.relative_to(m.output_dir).as_posix()
    'report/index.html'
    >>> "Clustering not run" in path.read_text()
    True
    """
    text = render_report(manifest, timings=timings, run_info=run_info)
    out_dir = manifest.output_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".index-", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote report %s (%.2f MB)", path, len(text.encode()) / 1e6)
    return path
