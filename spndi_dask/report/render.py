"""The report's Jinja2 environment, :func:`render_report` and :func:`write_report`.

Each section's data (:mod:`.sections`) is rendered by its template on its own, so a section that
fails (a surprising attrs value, a template error) becomes a note and the rest of the report is
still written; ``page.html`` then lays out the header, the table of contents and the sections.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from spndi_dask.config import Manifest
from spndi_dask.io.layout import atomic_path
from spndi_dask.report import sections
from spndi_dask.report.context import ReportContext
from spndi_dask.report.format import anchor, code_spans

__all__ = ["environment", "render_report", "write_report"]

logger = logging.getLogger(__name__)


def _escape(value: Any) -> Any:
    """Every ``{{ value }}``, escaped as :func:`html.escape` does (``&#x27;``, ``&quot;``).

    Autoescaping would spell quotes ``&#39;``/``&#34;``; the report has always used
    :func:`html.escape`'s entities, so escaped text keeps its spelling. Markup (macro output,
    rendered sections) passes unchanged.
    """
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


def environment() -> Environment:
    """The Jinja2 environment of the report's templates (package data, autoescaped)."""
    env = Environment(
        loader=PackageLoader("spndi_dask.report", "templates"),
        autoescape=True,
        finalize=_escape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["code_spans"] = code_spans
    return env


_ENV = environment()


def _section(sid: str, title: str, template: str, build: Callable[[], dict[str, Any]]) -> dict:
    """A rendered section; an unexpected error becomes a note (the report is written anyway)."""
    try:
        body = _ENV.get_template(template).render(s=build())
    except Exception as exc:
        logger.warning("report section %s failed: %s", title, exc, exc_info=True)
        body = _ENV.get_template("failed.html").render(error=str(exc))
    return {"id": sid, "title": title, "body": Markup(body)}


def _nav(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table of contents: the sections, scans grouped under one entry."""
    out: list[dict[str, Any]] = []
    for sec in items:
        if sec["id"].startswith("particle-"):
            if not out or "group" not in out[-1]:
                out.append({"group": "Scans", "entries": []})
            out[-1]["entries"].append(
                {"id": sec["id"], "label": sec["title"].removeprefix("Scan ")}
            )
        else:
            out.append({"id": sec["id"], "label": sec["title"]})
    return out


def render_report(
    manifest: Manifest,
    *,
    timings: list[dict[str, Any]] | None = None,
    run_info: dict[str, Any] | None = None,
    generated: str | None = None,
) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    ctx = ReportContext(manifest)
    generated = generated or datetime.now(timezone.utc).isoformat(timespec="seconds")
    items = [
        _section("summary", "Summary", "summary.html", lambda: sections.summary(ctx)),
        _section("overview", "Beamtime overview", "overview.html", lambda: sections.overview(ctx)),
    ]
    for name in ctx.names:
        items.append(
            _section(
                anchor("particle", name),
                f"Scan {name}",
                "particle.html",
                lambda n=name: sections.particle(ctx, n),
            )
        )
    items += [
        _section("features", "Features", "features.html", lambda: sections.features(ctx)),
        _section(
            "decomposition",
            "Decomposition: PCA and NMF",
            "decomposition.html",
            lambda: sections.decomposition(ctx),
        ),
        _section("clustering", "Clustering", "clustering.html", lambda: sections.clustering(ctx)),
        _section(
            "analysis",
            "Analysis: domains and boundaries",
            "analysis.html",
            lambda: sections.analysis(ctx),
        ),
    ]
    if ctx.other_pngs:
        items.append(
            _section(
                "other-figures",
                "Other figures",
                "other_figures.html",
                lambda: sections.other_figures(ctx),
            )
        )
    items += [
        _section("run", "Run", "run.html", lambda: sections.run(ctx, timings, run_info)),
        _section("provenance", "Provenance", "provenance.html", lambda: sections.provenance(ctx)),
    ]
    return _ENV.get_template("page.html").render(
        title=f"{manifest.name} – spndi_dask report",
        header=sections.header(ctx, generated),
        nav=_nav(items),
        sections=items,
    )


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
        Stage timings of the run (``stage``, ``scans``, ``status``, ``seconds``, and any
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
    ...     "scans": [{"name": "p1", "frames": "raw/p1/angle_{index:03d}.h5",
    ...                "angles_deg": {"start": -0.5, "stop": 0.5, "num": 3},
    ...                "scan_shape": [4, 5], "scan_step_um": [0.05, 0.05]}]},
    ...     base_dir=tempfile.mkdtemp())
    >>> path = write_report(m, timings=[{"stage": "ingest", "status": "failed", "seconds": 1}])
    >>> path.relative_to(m.output_dir).as_posix()
    'report/index.html'
    >>> "Clustering not run" in path.read_text()
    True
    """
    text = render_report(manifest, timings=timings, run_info=run_info)
    path = manifest.layout.report
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # readable where the report is served, whatever the umask
    logger.info("wrote report %s (%.2f MB)", path, len(text.encode()) / 1e6)
    return path
