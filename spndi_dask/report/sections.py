"""The data of every section of the report, as plain dicts for its template.

One function per section (``summary``, ``overview``, ``particle``, ``features``, ``clustering``,
``analysis``, ``run``, ``provenance``), each reading a :class:`~.context.ReportContext` and
returning the dict its template (``templates/<section>.html``) lays out. Sections decide what
is shown and in which order; the templates decide how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spndi_dask._version import __version__
from spndi_dask.config import Manifest
from spndi_dask.particles import MAPS, STATS
from spndi_dask.provenance import input_fingerprints, iso_time, library_versions, manifest_source
from spndi_dask.report.context import (
    ANALYSIS_FIGURES,
    DECOMPOSITION_FIGURES,
    PARTICLE_FIGURES,
    ReportContext,
)
from spndi_dask.report.format import Badge, Link, anchor, as_json, kv, number, table
from spndi_dask.stages import status_stages
from spndi_dask.status import NO_WORK, read_stage_timings
from spndi_dask.units import QUANTITIES, column, label

__all__ = [
    "analysis",
    "clustering",
    "decomposition",
    "features",
    "header",
    "other_figures",
    "overview",
    "particle",
    "provenance",
    "run",
    "summary",
]

_OVERVIEW_COLUMNS = (
    "scan",
    "label",
    "pixels",
    "area_um2",
    column("d_spacing", "mean"),
    column("strain", "mean"),
    column("strain", "std"),
    column("tilt_x", "mean"),
    column("tilt_y", "mean"),
    "corr_strain_tilt_x",
    "corr_strain_tilt_y",
    "warning",
)
_REDUCE_NOTES = {
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
_TRAINING_KEYS = (
    "n_train",
    "n_val",
    "epochs",
    "best_epoch",
    "best_val_loss",
    "stopped_early",
    "device",
    "seconds",
    "scans",
)
#: Stages that store their record under their own attrs key of a results.zarr node (ingest
#: and reduce share the node's ``spndi_dask`` key and are shown on their own).
_KEYED_STAGES = tuple(s for s in status_stages() if s.name not in ("ingest", "reduce"))


def header(ctx: ReportContext, generated: str) -> dict[str, Any]:
    """The page header: beamtime name, generation time, version and dates."""
    sub = [f"generated {generated}", f"spndi_dask {__version__}"]
    sub += [f"{k} {v}" for k, v in ctx.dates().items()]
    return {"name": ctx.manifest.name, "sub": sub}


def summary(ctx: ReportContext) -> dict[str, Any]:
    """The beamtime's facts and the state of every stage per scan."""
    m = ctx.manifest
    info = {
        "beamtime": m.name,
        "manifest": m.source,
        "output": str(ctx.layout.root),
        "scans": len(ctx.names),
        "report generated with": f"spndi_dask {__version__}",
    }
    info.update(ctx.dates())
    if ctx.clusters:
        info["clusters"] = f"K = {ctx.clusters.get('k')} ({ctx.clusters.get('k_source')})"
    rows = []
    for name in ctx.names:
        p = m.scan(name)
        rows.append(
            {
                "scan": Link(anchor("particle", name), name),
                "angles": str(p.angles.size),
                "points": f"{p.scan_shape[0]} × {p.scan_shape[1]}",
                **{s: Badge(v) for s, v in ctx.stage_status(name).items()},
            }
        )
    return {"info": kv(info), "stages": table(rows)}


def overview(ctx: ReportContext) -> dict[str, Any]:
    """``beamtime_overview.png`` and the per-particle statistics of ``particles.csv``."""
    rows = ctx.particles_csv
    particles = None
    if rows:
        cols = [c for c in _OVERVIEW_COLUMNS if c in rows[0]]
        particles = table(rows, cols, text=("scan", "warning"))
    return {
        "figure": ctx.figure("beamtime_overview.png", "Per-particle distributions"),
        "kde": ctx.figure(
            "tilt_d_spacing_kde.png",
            "Per scan: tilt_y vs d-spacing centred on the means of its particles, one scale for "
            "all scans, with marginal densities",
        ),
        "not_run": rows is None,
        "particles": particles,
    }


def _stats_tables(rows: list[dict[str, str]]) -> dict[str, Any]:
    """The particles.csv rows of one scan: a summary table, then per label its statistics."""
    cols = list(rows[0])
    quantities = [q for q in MAPS if column(q, "mean") in cols]
    stat_cols = {column(q, s) for q in quantities for s in STATS}
    summary_cols = [c for c in cols if c not in stat_cols and c != "scan"]
    labels = []
    for r in rows:
        stat_rows = []
        for q in quantities:
            row: dict[str, Any] = {"quantity": label(q)}
            row.update({s: r.get(column(q, s)) for s in STATS if column(q, s) in r})
            stat_rows.append(row)
        labels.append({"label": r.get("label", "?"), "table": table(stat_rows, text=("quantity",))})
    return {"summary": table(rows, summary_cols, text=("warning",)), "labels": labels}


def _masked_text(masked: dict[str, int]) -> str:
    """The reduce record of masked detector pixels in words.

    Examples
    --------
    >>> _masked_text({"module_gaps": 124, "hot": 1, "dead": 0, "total": 125, "in_roi": 123,
    ...               "filled_in_roi": 123})
    '125 (module gaps 124, hot 1); 123 in the ROI, 123 of them filled from their neighbours'
    """
    totals = ("total", "in_roi", "filled_in_roi")
    reasons = [f"{k.replace('_', ' ')} {n}" for k, n in masked.items() if n and k not in totals]
    text = f"{masked.get('total', 0)}" + (f" ({', '.join(reasons)})" if reasons else "")
    if masked.get("in_roi"):
        text += (
            f"; {masked['in_roi']} in the ROI, {masked.get('filled_in_roi', 0)} of them filled "
            "from their neighbours"
        )
    return text


def particle(ctx: ReportContext, name: str) -> dict[str, Any]:
    """One scan: reduction notes, statistics of its particles, maps and rocking curves."""
    p = ctx.manifest.scan(name)
    status = ctx.stage_status(name)
    attrs = ctx.node.get(name)
    out: dict[str, Any] = {
        "intro": (
            f"{p.angles.size} rocking angles {p.angles.min():.4g}–{p.angles.max():.4g}°, "
            f"scan {p.scan_shape[0]} × {p.scan_shape[1]} points of "
            f"{p.scan_step_um[0]:g} × {p.scan_step_um[1]:g} µm."
        ),
        "status": list(status.items()),
        "reduce": None,
    }
    if attrs and status["reduce"] == "done":
        notes = {label: attrs[k] for k, label in _REDUCE_NOTES.items() if k in attrs}
        if isinstance(attrs.get("masked_pixels"), dict):
            notes["masked detector pixels"] = _masked_text(attrs["masked_pixels"])
        out["reduce"] = {"info": kv(notes), "warnings": list(attrs.get("warnings", []))}
    rows = [r for r in ctx.particles_csv or [] if r.get("scan") == name]
    out["stats"] = _stats_tables(rows) if rows else None
    out["stats_done"] = status["stats"] == "done"
    pngs = {png.name: png for png in ctx.particle_pngs.get(name, [])}
    out["figures"] = None
    if status["stats"] == "done" or pngs:
        figures = [ctx.figure(f"{name}_{f}.png", caption) for f, caption in PARTICLE_FIGURES]
        out["figures"] = {"maps": figures[0], "small": figures[1:]}
    out["cluster_link"] = anchor("clusters", name) if f"{name}_clusters.png" in pngs else None
    known = {f"{name}_{f}.png" for f, _ in PARTICLE_FIGURES} | {f"{name}_clusters.png"}
    out["others"] = [ctx.figure(n, png.stem) for n, png in pngs.items() if n not in known]
    return out


def features(ctx: ReportContext) -> dict[str, Any]:
    """The autoencoder's checkpoint and training, and what encode wrote per scan."""
    done = {n: (a or {}).get("features") for n, a in ctx.node.items()}
    ckpt = ctx.checkpoint()
    meta, error = ctx.checkpoint_metadata()
    out: dict[str, Any] = {"error": error, "training": None, "history": None, "encoding": None}
    if meta is not None:
        training = meta.get("training") or {}
        info = {
            "checkpoint": str(ckpt),
            "model": meta.get("kind"),
            "hyper-parameters": meta.get("hyper"),
            "created": meta.get("created"),
            "torch": meta.get("torch"),
        }
        info.update({f"training {k}": training[k] for k in _TRAINING_KEYS if k in training})
        out["training"] = kv(info)
        history = training.get("history") or []
        if history:
            cols = [c for c in ("epoch", "train_loss", "val_loss", "seconds") if c in history[0]]
            out["history"] = table(history, cols)
    if any(done.values()):
        rows = [
            {
                "scan": n,
                "encoded pixels": (d or {}).get("pixels"),
                "model": (d or {}).get("model"),
                "latent_dim": (d or {}).get("latent_dim"),
                "checkpoint sha256": (d or {}).get("checkpoint_sha256"),
            }
            for n, d in done.items()
        ]
        out["encoding"] = table(rows, text=("checkpoint sha256", "model"))
    return out


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
    ks = [int(v) for v in info.get("inertia_by_k", {})]
    if source == "elbow":
        return (
            f"K = {k} by the elbow rule: the smallest K whose share of the inertia drop from "
            f"K = {min(ks, default='?')} to K = {max(ks, default='?')} reaches "
            f"{s.elbow_fraction:g} ([cluster] elbow_fraction); the "
            f"silhouette score of each K on a sample of up to {s.silhouette_sample} pixels is "
            "shown beside it."
        )
    if source == "manifest":
        return f"K = {k} fixed in the manifest ([cluster] k = {k})."
    if source == "argument":
        return f"K = {k} given for this run (command line or k argument)."
    return f"K = {k} ({source})."


def clustering(ctx: ReportContext) -> dict[str, Any]:
    """K and how it was chosen, inertia and silhouette per K, the cluster tables and maps."""
    info = ctx.clusters
    if not info:
        return {"done": False}
    k = info.get("k")
    sil = (info.get("silhouette_by_k") or {}).get(str(k))
    facts = {
        "K": k,
        "K chosen by": info.get("k_source"),
        "initialisation": info.get("init"),
        "restarts (n_init)": info.get("n_init"),
        "seed of the kept restart": info.get("seed"),
        "feature scaling": info.get("standardize"),
        "inertia (kept restart)": info.get("inertia"),
        "inertia of every restart": info.get("restart_inertias"),
        "silhouette at K": sil,
        "pixels clustered": info.get("pixels"),
        "scans": info.get("particles"),
        "version": info.get("version"),
    }
    out: dict[str, Any] = {
        "done": True,
        "how": _how_chosen(info, ctx.manifest),
        "info": kv(facts),
        "k_table": None,
        "k_figure": ctx.figure("clusters_k.png", "Choosing K: inertia (elbow), silhouette"),
        "clusters": None,
        "maps": [],
    }
    if rows := _k_rows(info):
        out["k_table"] = table(rows, row_class=lambda r: "chosen" if r["K"] == k else "")
    if ctx.clusters_csv:
        out["clusters"] = table(
            ctx.clusters_csv,
            text=("scan",),
            row_class=lambda r: "total" if r.get("scan") == "all" else "",
        )
    for name in ctx.names:
        status = ctx.stage_status(name)["cluster"]
        fig = None
        if status != "not run":
            fig = ctx.figure(f"{name}_clusters.png", f"{name}: cluster map")
        out["maps"].append(
            {"name": name, "id": anchor("clusters", name), "status": status, "figure": fig}
        )
    return out


def decomposition(ctx: ReportContext) -> dict[str, Any]:
    """PCA and NMF of the patterns: the fits' figures of merit, variance curve, components, maps."""
    info = ctx.decomposition
    if not info or not info.get("fingerprint"):
        return {"done": False}
    facts = {
        "patterns fitted on (sample)": info.get("sample"),
        "sample per scan": info.get("sample_scans"),
        "normalisation": info.get("normalisation"),
        "PCA components": info.get("pca_components"),
        "PCA explained variance (sum of ratios)": info.get("pca_explained"),
        "NMF components": info.get("nmf_components"),
        "NMF relative reconstruction error": info.get("nmf_error"),
        "NMF iterations": info.get("nmf_iterations"),
        "clustered features": (ctx.clusters or {}).get("features", "latent"),
        "version": info.get("version"),
    }
    return {
        "done": True,
        "info": kv(facts),
        "figures": [ctx.figure(f, caption) for f, caption in DECOMPOSITION_FIGURES],
    }


def _pm(row: dict[str, str], col: str, se_col: str) -> str | None:
    """``"value ± se"`` of a regions.csv difference (None when the column is missing)."""
    value, se = row.get(col), row.get(se_col)
    if value in (None, ""):
        return None
    try:
        return f"{float(value):.4g} ± {float(se):.2g}"
    except (TypeError, ValueError):
        return value


def _region_rows(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """regions.csv as rows (scan, quantity): domain and boundary mean ± std, difference."""
    d = "diff_domain_minus_boundary_"
    out = []
    for r in rows:
        for q in (q for q in QUANTITIES if column(q, "mean", "domain_") in r):
            out.append(
                {
                    "scan": r.get("scan"),
                    "quantity": label(q),
                    "domain pixels": r.get("domain_pixels"),
                    "boundary pixels": r.get("boundary_pixels"),
                    "rim pixels": r.get("rim_pixels"),
                    "domain mean": r.get(column(q, "mean", "domain_")),
                    "domain std": r.get(column(q, "std", "domain_")),
                    "boundary mean": r.get(column(q, "mean", "boundary_")),
                    "boundary std": r.get(column(q, "std", "boundary_")),
                    "domain − boundary (mean) ± SE": _pm(
                        r, column(q, "mean", d), column(q, "mean_se", d)
                    ),
                    "p (mean)": r.get(f"{d}{q}_mean_p"),
                    "domain − boundary (std) ± SE": _pm(
                        r, column(q, "std", d), column(q, "std_se", d)
                    ),
                    "p (std)": r.get(f"{d}{q}_std_p"),
                }
            )
    return out


def analysis(ctx: ReportContext) -> dict[str, Any]:
    """Cluster rocking curves and mean patterns, domains vs boundaries (regions.csv)."""
    if ctx.analysis is None and ctx.regions_csv is None:
        return {"done": False}
    out: dict[str, Any] = {"done": True, "info": None, "older": False, "regions": None}
    if ctx.analysis:
        out["info"] = kv(
            {
                "K": ctx.analysis.get("k"),
                "boundary width (scan pixels)": ctx.analysis.get("boundary_width"),
                "rim width (scan pixels)": ctx.analysis.get("rim_width"),
                "version": ctx.analysis.get("version"),
            }
        )
        out["older"] = bool(ctx.clusters) and ctx.clusters.get("k") != ctx.analysis.get("k")
    out["figures"] = [ctx.figure(f, caption) for f, caption in ANALYSIS_FIGURES]
    if ctx.regions_csv:
        rows = _region_rows(ctx.regions_csv)
        out["regions"] = table(rows, text=("scan", "quantity")) if rows else table(ctx.regions_csv)
    return out


def other_figures(ctx: ReportContext) -> dict[str, Any]:
    """Figures of ``<output>/figures/`` that no other section shows."""
    return {"figures": [ctx.figure(p.name, p.stem) for p in ctx.other_pngs]}


def run(
    ctx: ReportContext, timings: list[dict[str, Any]] | None, run_info: dict[str, Any] | None
) -> dict[str, Any]:
    """Stage timings with their total, the run's facts and the latest run logs.

    The main table has, per stage, the timing of the last run that did its work
    (``logs/stage-timings.json``), so a re-run that finds everything up to date does not
    replace it; this run's own rows follow when some stage of it did no work.
    """
    out: dict[str, Any] = {"timings": None, "this_run": None}
    info = dict(run_info or {})
    if "dashboard" in info:  # the link of a cluster that is gone once the run ends
        info = {
            (k if k != "dashboard" else "dashboard (live only while that run lasted)"): v
            for k, v in info.items()
        }
    out["info"] = kv(info) if info else None
    worked = read_stage_timings(ctx.manifest.output_dir)
    current = [dict(r) for r in timings or []]
    if worked:
        rows = [{**r, "run finished": w["finished"]} for w in worked.values() for r in w["rows"]]
        out["timings"] = _timing_table(rows)
        if any(str(r.get("status")) in NO_WORK for r in current):
            out["this_run"] = _timing_table(current)
    elif current:
        out["timings"] = _timing_table(current)
    logs = [
        {"file": str(f), "bytes": f.stat().st_size, "modified": iso_time(f.stat().st_mtime)}
        for f in ctx.run_logs()[:10]
    ]
    out["logs"] = table(logs, text=("file", "modified")) if logs else None
    return out


def _timing_table(timings: list[dict[str, Any]]) -> Any:
    """Timing rows as a table with their total."""
    rows = [dict(r) for r in timings]
    for r in rows:
        if isinstance(r.get("scans"), (list, tuple)):
            r["scans"] = ", ".join(map(str, r["scans"]))
    total = sum(x for r in rows if (x := number(r.get("seconds"))) is not None)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rows.append({cols[0]: "total", "seconds": total})
    return table(
        rows,
        cols,
        text=[c for c in cols if c != "seconds"],
        row_class=lambda r: "total" if r.get(cols[0]) == "total" else "",
    )


def _inputs(manifest: Manifest) -> dict[str, Any]:
    rows = input_fingerprints(manifest)
    summary = []
    for owner in dict.fromkeys(r["scan"] for r in rows):
        mine = [r for r in rows if r["scan"] == owner]
        present = [r for r in mine if r["status"] == "present"]
        vs = [r.get("vs_ingest") for r in mine if r.get("vs_ingest") is not None]
        changed = sum(v == "changed" for v in vs)
        summary.append(
            {
                "scan": owner,
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
    base = manifest.base_dir
    shown = []
    for r in rows:
        path = Path(r["path"])
        rel = path.relative_to(base) if path.is_relative_to(base) else path
        shown.append({**r, "path": str(rel)})
    cols = ["scan", "role", "path", "status", "size", "mtime", "edge_sha256", "vs_ingest"]
    return {
        "summary": table(summary, text=("scan", "newest mtime", "vs ingest")),
        "count": len(rows),
        "base": str(base),
        "files": table(shown, cols, text=[c for c in cols if c != "size"]),
    }


def _records(ctx: ReportContext, name: str) -> list[tuple[str, str]]:
    """(title, JSON) of what every stage stored for one scan."""
    recs = {}
    if ctx.raw.get(name):
        recs["ingest (raw.zarr)"] = ctx.raw[name]
    node = ctx.node.get(name) or {}
    if node:
        own = {s.attrs_key for s in _KEYED_STAGES}
        recs["reduce (results.zarr)"] = {k: v for k, v in node.items() if k not in own}
    for s in _KEYED_STAGES:
        if node.get(s.attrs_key):
            recs[s.label] = node[s.attrs_key]
    return [(title, as_json(rec)) for title, rec in recs.items()]


def provenance(ctx: ReportContext) -> dict[str, Any]:
    """Library versions, the manifest (hash and text), input files and every stage's record."""
    m = ctx.manifest
    text, digest, where = manifest_source(m)
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
    return {
        "versions": kv(library_versions()),
        "manifest": kv(info),
        "other_settings": bool(stored) and stored != [m.manifest_hash],
        "manifest_text": text,
        "inputs": _inputs(m),
        "root": as_json(dict(ctx.root)) if ctx.root else None,
        "records": [{"name": n, "records": _records(ctx, n)} for n in ctx.names],
        "analysis": as_json(ctx.analysis) if ctx.analysis else None,
    }
