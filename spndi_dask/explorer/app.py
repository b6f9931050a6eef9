"""The explorer's Bokeh document: maps per scan, a clicked pixel's curve and patterns, selections.

:func:`build_document` fills a :class:`bokeh.document.Document` (a server session's, or a
notebook's) from an :class:`~spndi_dask.explorer.data.ExplorerData`. Every view reads only what
it shows when it is shown (:mod:`spndi_dask.explorer.data`); the browser receives images and
curves as binary arrays through Bokeh's ``ColumnDataSource`` objects, no hand-written
JavaScript. The model names (``name=``) are the interface the browser tests look up:

* ``map_figure:<scan>``, ``map_source:<scan>`` (``image``, ``x``, ``y``, ``dw``, ``dh`` in µm),
  ``pixels_source:<scan>`` (one point per scan pixel: the box/lasso selection target);
* ``map_select`` (the shown map), ``scan_select`` (the shown scans), ``cluster_legend``;
* ``pixel_source`` (``scan``, ``iy``, ``ix``, ``y_um``, ``x_um``), ``rocking_source``
  (``angle``, ``intensity``), ``pattern_source:qx_qy|qx_qz|qy_qz`` and, once ``spndi analyze``
  has run, ``cluster_pattern_source:...`` and ``cluster_rocking_source``;
* ``pixel_info``, ``selection_info``, ``status_info``, ``map_info`` (Divs), ``particles_table``
  (in the ``views_tabs`` tab "particles"), ``color_bar:<scan>`` (titled with the map's unit),
  ``rocking_legend``.

A click on a map (a :class:`bokeh.events.Tap`) shows that pixel; a box or lasso selection on a
map shows the selection's mean rocking curve and pattern and its statistics.
"""

from __future__ import annotations

import html
import logging
from functools import partial
from typing import Any

import numpy as np
from bokeh.events import Tap
from bokeh.layouts import column, row
from bokeh.models import (
    BoxSelectTool,
    CheckboxGroup,
    ColorBar,
    ColumnDataSource,
    DataTable,
    Div,
    InlineStyleSheet,
    LassoSelectTool,
    Legend,
    LegendItem,
    LinearColorMapper,
    MultiChoice,
    NumberFormatter,
    PrintfTickFormatter,
    Range1d,
    Select,
    TableColumn,
    TabPanel,
    Tabs,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from spndi_dask import units
from spndi_dask.explorer.data import CATEGORICAL, PROJECTIONS, ExplorerData, projections

__all__ = ["ExplorerApp", "build_document"]

logger = logging.getLogger(__name__)

_AXIS = {0: "qx", 1: "qy", 2: "qz"}
_GREY = "#d9d9d9"
#: Scans shown side by side when the document opens (the others through ``scan_select``).
SHOWN_SCANS = 4
#: The layout's width (px; a 1280 × 800 screen shows maps and views without scrolling) and the
#: width of the pixel/selection text beside the maps.
PAGE_WIDTH = 1270
INFO_WIDTH = 290
#: A clicked map keeps no dotted focus outline: the focused element (the canvas' events layer)
#: is in the canvas' own shadow root, out of reach of the figure's selectors, but it draws the
#: outline in ``--highlight-color``, a custom property that the canvas inherits.
_NO_FOCUS_OUTLINE = ".bk-Canvas { --highlight-color: transparent; }"
_TABLE_COLUMNS = (
    "scan",
    "label",
    "pixels",
    "area_um2",
    units.column("strain", "mean"),
    units.column("tilt_x", "mean"),
    units.column("tilt_y", "mean"),
    units.column("d_spacing", "mean"),
)


#: Stage attrs of a scan's node -> what the status line calls them.
_STAGE_NAMES = {
    "particles": "particles",
    "features": "features",
    "decompose": "decomposition (PCA/NMF loadings)",
    "cluster": "clusters",
}


def _image_data(img: np.ndarray | None, x0: float, y0: float, dw: float, dh: float) -> dict:
    if img is None:
        return {"image": [], "x": [], "y": [], "dw": [], "dh": []}
    return {"image": [img], "x": [x0], "y": [y0], "dw": [dw], "dh": [dh]}


#: How the pixel and selection views print a quantity (in its shown unit of
#: :mod:`spndi_dask.units`: tilts in mrad, strain a plain number); one format per quantity, so
#: a pixel's value and a selection's mean ± std read alike.
_FORMATS = {"d_spacing": "{:.5f}", "intensity": "{:.4g}", "label": "{:.0f}", "cluster": "{:.0f}"}


def _fmt(name: str, *values: float) -> str:
    """``values`` (stored units) of quantity ``name`` in its shown unit, joined by ±."""
    u = units.unit(name)
    fmt = _FORMATS.get(name, "{:.3g}" if u is not None else "{:.4g}")
    text = " ± ".join(
        "–" if not np.isfinite(v) else fmt.format(units.shown(name, v)) for v in values
    )
    return f"{text} {u.shown}" if u is not None and u.shown else text


class ExplorerApp:
    """One document's views and their callbacks (one per browser session or notebook cell).

    Parameters
    ----------
    data : ExplorerData
        The opened beamtime output.
    doc : bokeh.document.Document
        Filled by :meth:`build`.
    """

    def __init__(self, data: ExplorerData, doc: Any) -> None:
        self.data = data
        self.doc = doc
        self.maps = data.maps()
        self.k = data.k
        self.shown = self.maps[0]
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self.mapper = LinearColorMapper(palette=Viridis256, nan_color=(0, 0, 0, 0))
        self.map_sources: dict[str, ColumnDataSource] = {}
        self.color_bars: dict[str, ColorBar] = {}
        self._map_width = PAGE_WIDTH - INFO_WIDTH  # per shown map, set by build
        self.pixels_sources: dict[str, ColumnDataSource] = {}
        self.marker_sources: dict[str, ColumnDataSource] = {}
        self.figures: dict[str, Any] = {}
        self.pattern_sources: dict[str, ColumnDataSource] = {}
        self.pattern_figures: dict[str, Any] = {}
        self.cluster_pattern_sources: dict[str, ColumnDataSource] = {}
        self.cluster_pattern_figures: dict[str, Any] = {}
        self.cluster_legend: CheckboxGroup | None = None
        self.selection_stats: dict[str, Any] | None = None

    # -- building ------------------------------------------------------------------------------
    def build(self) -> None:
        """Add the layout to the document (reads one map per scan, nothing else)."""
        d = self.data
        self.status_info = Div(name="status_info", text=self._status_text(), width=PAGE_WIDTH)
        self.map_select = Select(
            name="map_select", title="map", value=self.shown, options=self.maps, width=160
        )
        self.map_select.on_change("value", self._guard(self._on_map))
        self.map_info = Div(name="map_info", width=300)
        scans = list(d.scans)
        self.scan_select = MultiChoice(
            name="scan_select",
            title="scans",
            value=scans[:SHOWN_SCANS],
            options=scans,
            width=400,
        )
        self.scan_select.on_change("value", self._guard(self._on_scans))
        controls = [self.map_select, self.scan_select]
        if self.k is not None:
            self.cluster_legend = CheckboxGroup(
                name="cluster_legend",
                labels=[f"cluster {i}" for i in range(self.k)],
                active=list(range(self.k)),
                inline=True,
            )
            self.cluster_legend.on_change("active", self._guard(self._on_clusters))
            controls.append(column(Div(text="<b>clusters shown</b>"), self.cluster_legend))
        self._map_width = (PAGE_WIDTH - INFO_WIDTH) // max(1, len(self.scan_select.value))
        self.maps_row = row(*[self._figure(scan) for scan in self.scan_select.value])
        self._show_map()
        self.pixel_source = ColumnDataSource(
            name="pixel_source",
            data={"scan": [], "iy": [], "ix": [], "y_um": [], "x_um": []},
        )
        self.pixel_info = Div(name="pixel_info", text="<i>click a scan pixel</i>", width=INFO_WIDTH)
        self.selection_info = Div(
            name="selection_info", text="<i>draw a box or lasso on a map</i>", width=INFO_WIDTH
        )
        rows = [row(*self._pattern_figures("pattern_source", "pattern of the pixel"))]
        if self.data.analysis is not None and "cluster_pattern" in self.data.analysis:
            rows.append(row(*self._pattern_figures("cluster_pattern_source", "its cluster's mean")))
        views = row(self._rocking_figure(), column(*rows))
        table = self._particles_table()
        if table is not None:  # the table in a tab: the views fit 1280 × 800 above the fold
            views = Tabs(
                name="views_tabs",
                tabs=[
                    TabPanel(child=views, title="pixel / selection"),
                    TabPanel(child=table, title="particles"),
                ],
            )
        layout = column(
            Div(text=f"<h3 style='margin:0'>{html.escape(self.data.name)}: spndi explorer</h3>"),
            self.status_info,
            row(*controls, self.map_info),
            row(self.maps_row, column(self.pixel_info, self.selection_info)),
            views,
        )
        self.doc.add_root(layout)
        self.doc.add_root(self.pixel_source)  # drawn by no glyph: a root, so the browser has it
        self.doc.title = f"spndi explorer: {self.data.name}"

    def _figure(self, scan: str) -> Any:
        """The map figure of a scan, made when the scan is first shown."""
        if scan not in self.figures:
            self.figures[scan] = self._map_figure(scan)
        return self.figures[scan]

    def _map_figure(self, scan: str) -> Any:
        s = self.data.scans[scan]
        dy, dx = s.step
        x0, y0 = float(s.x[0] - dx / 2), float(s.y[0] - dy / 2)
        w, h = dx * s.shape[1], dy * s.shape[0]
        # frame: 200 px high, narrower where the shown maps need it (axes, bar: ~130 px)
        frame_w = min(200 * w / h, max(120, self._map_width - 130))
        fig = figure(
            name=f"map_figure:{scan}",
            title=scan,
            x_range=Range1d(x0, x0 + w),
            y_range=Range1d(y0 + h, y0),  # rows down, as the scan is shown everywhere
            frame_width=int(frame_w),
            frame_height=max(60, int(frame_w * h / w)),
            toolbar_location="above",
            x_axis_label="x (µm)",
            y_axis_label="y (µm)",
            tools="pan,wheel_zoom,reset,save",
            match_aspect=True,
            stylesheets=[InlineStyleSheet(css=_NO_FOCUS_OUTLINE)],
        )
        src = ColumnDataSource(name=f"map_source:{scan}", data=_image_data(None, x0, y0, w, h))
        fig.image(
            image="image", x="x", y="y", dw="dw", dh="dh", color_mapper=self.mapper, source=src
        )
        yy, xx = np.meshgrid(np.arange(s.shape[0]), np.arange(s.shape[1]), indexing="ij")
        pix = ColumnDataSource(
            name=f"pixels_source:{scan}",
            data={
                "iy": yy.ravel(),
                "ix": xx.ravel(),
                "y": s.y[yy.ravel()],
                "x": s.x[xx.ravel()],
            },
        )
        r = fig.scatter(
            "x",
            "y",
            source=pix,
            marker="square",
            size=max(3.0, frame_w / s.shape[1]),  # a scan pixel's width: selected pixels tile
            fill_alpha=0,
            line_alpha=0,
            selection_fill_color="white",  # a translucent wash: the map's colours show through
            selection_fill_alpha=0.35,
            selection_line_alpha=0,
            nonselection_fill_alpha=0,
            nonselection_line_alpha=0,
        )
        fig.add_tools(BoxSelectTool(renderers=[r]), LassoSelectTool(renderers=[r]))
        pix.selected.on_change("indices", self._guard(partial(self._on_select, scan)))
        marker = ColumnDataSource(data={"x": [], "y": []})
        fig.scatter(
            "x",
            "y",
            source=marker,
            marker="square",
            size=10,
            fill_alpha=0,
            line_color="red",
            line_width=2,
        )
        bar = ColorBar(
            name=f"color_bar:{scan}",
            color_mapper=self.mapper,
            width=8,
            padding=2,
            label_standoff=3,
            major_label_text_font_size="9px",
            formatter=PrintfTickFormatter(format="%.3g"),  # 0.001, not 1.000e-3
        )
        fig.add_layout(bar, "right")
        self.color_bars[scan] = bar
        fig.on_event(Tap, self._guard_event(partial(self._on_tap, scan)))
        self.map_sources[scan] = src
        self.pixels_sources[scan] = pix
        self.marker_sources[scan] = marker
        return fig

    def _rocking_figure(self) -> Any:
        self.rocking_source = ColumnDataSource(
            name="rocking_source", data={"angle": [], "intensity": []}
        )
        fig = figure(
            name="rocking_figure",
            title="rocking curve",
            width=400,
            height=350,
            x_axis_label="angle (deg)",
            y_axis_label="intensity (drift-corrected)",
            tools="pan,wheel_zoom,reset,save",
        )
        shown = [
            fig.line("angle", "intensity", source=self.rocking_source, line_width=2),
            fig.scatter("angle", "intensity", source=self.rocking_source, size=5),
        ]
        items = [LegendItem(label="shown", renderers=shown)]
        self.cluster_rocking_source = None
        if self.data.analysis is not None and "cluster_rocking_curve" in self.data.analysis:
            self.cluster_rocking_source = ColumnDataSource(
                name="cluster_rocking_source", data={"angle": [], "intensity": []}
            )
            mean = fig.line(
                "angle",
                "intensity",
                source=self.cluster_rocking_source,
                line_dash="dashed",
                color="grey",
            )
            items.append(LegendItem(label="cluster mean", renderers=[mean]))
        # above the plot (never over the curve); a click on an entry hides that curve
        legend = Legend(
            name="rocking_legend",
            items=items,
            orientation="horizontal",
            click_policy="hide",
            location="top_right",
            padding=2,
            margin=0,
            border_line_alpha=0,
        )
        fig.add_layout(legend, "above")
        self.rocking_figure = fig
        return fig

    def _pattern_figures(self, prefix: str, what: str) -> list[Any]:
        axes = self.data.q_axes()
        figs = []
        for name, (h, v, _) in PROJECTIONS.items():
            src = ColumnDataSource(name=f"{prefix}:{name}", data=_image_data(None, 0, 0, 0, 0))
            (self.pattern_sources if prefix == "pattern_source" else self.cluster_pattern_sources)[
                name
            ] = src
            extent = [
                (float(axes[i][0]), float(axes[i][-1])) if i in axes else (0.0, 1.0) for i in (h, v)
            ]
            fig = figure(
                name=f"{prefix.replace('source', 'figure')}:{name}",
                title=f"{what}: {_AXIS[h]}–{_AXIS[v]}",
                width=(PAGE_WIDTH - 400) // 3,
                height=175,
                toolbar_location="above",
                x_range=extent[0],
                y_range=extent[1],
                x_axis_label=f"Δ{_AXIS[h]} (1/Å)",
                y_axis_label=f"Δ{_AXIS[v]} (1/Å)",
                tools="pan,wheel_zoom,reset,save",
            )
            fig.image(
                image="image",
                x="x",
                y="y",
                dw="dw",
                dh="dh",
                source=src,
                color_mapper=LinearColorMapper(palette=Viridis256),
            )
            fig.xaxis.ticker.desired_num_ticks = 3
            figs.append(fig)
            figures = self.pattern_figures if prefix == "pattern_source" else None
            (figures if figures is not None else self.cluster_pattern_figures)[name] = fig
        self._q_axes = axes
        return figs

    def _particles_table(self) -> Any:
        rows = self.data.particles_table()
        if not rows:
            return None
        cols = [c for c in _TABLE_COLUMNS if c in rows[0]]
        data: dict[str, list[Any]] = {}
        for c in cols:
            vals = [r[c] for r in rows]
            try:
                data[c] = [float(v) if v != "" else np.nan for v in vals]
            except ValueError:
                data[c] = vals
        self.table_source = ColumnDataSource(data=data)
        self.table_source.selected.on_change("indices", self._guard(self._on_table))

        def column(c: str) -> TableColumn:
            if c == "scan":
                return TableColumn(field=c, title=c)
            fmt = "0.[0000]" if c in ("pixels", "label", "area_um2") else "0.000e+0"
            return TableColumn(field=c, title=c, formatter=NumberFormatter(format=fmt))

        columns = [column(c) for c in cols]
        return DataTable(
            name="particles_table",
            source=self.table_source,
            columns=columns,
            width=PAGE_WIDTH - 20,
            height=min(340, 30 + 26 * len(rows)),
            selectable=True,
            reorderable=False,
        )

    # -- what is shown ----------------------------------------------------------------------------
    def _status_text(self) -> str:
        d = self.data
        stages = {s for sc in d.scans.values() for s in sc.stages}
        patterns = any("pattern" in sc.variables for sc in d.scans.values())
        have = ["maps", "rocking curves", *(["patterns"] if patterns else [])] + [
            _STAGE_NAMES[s] for s in _STAGE_NAMES if s in stages
        ]
        if d.analysis is not None:
            have.append("cluster means (analysis)")
        lines = [f"<b>{html.escape(str(d.output))}</b>: {', '.join(have)}"]
        lines += [html.escape(m) for m in d.missing().values()]
        return "<br>".join(lines)

    def map_image(self, scan: str, name: str, *, masked: bool = True) -> np.ndarray:
        """The map as shown: float64, NaN where a cluster is toggled off in the legend (unless
        ``masked`` is false); each map is read once."""
        key = (scan, name)
        if key not in self._cache:  # in the shown unit (tilts in mrad; spndi_dask.units)
            self._cache[key] = units.shown(name, self.data.map(scan, name))
        img = self._cache[key]
        if (
            masked
            and self.cluster_legend is not None
            and len(self.cluster_legend.active) < (self.k or 0)
        ):
            if (scan, "cluster") not in self._cache:
                self._cache[(scan, "cluster")] = self.data.map(scan, "cluster")
            clusters = self._cache[(scan, "cluster")]
            hide = ~np.isin(clusters, self.cluster_legend.active) & (clusters >= 0)
            img = np.where(hide, np.nan, img)
        return img

    def _show_map(self) -> None:
        name = self.shown
        images = {}
        for scan in self.scan_select.value:
            images[scan] = self.map_image(scan, name)
        finite = [im[np.isfinite(im)] for im in images.values()]
        values = np.concatenate(finite) if finite else np.array([])
        if name in CATEGORICAL:
            lo = float(values.min()) if values.size else 0.0
            palette = [_GREY, *Category10_10] if lo < 0 else list(Category10_10)
            self.mapper.update(palette=palette, low=lo - 0.5, high=lo - 0.5 + len(palette))
        elif values.size:  # one colour scale for every shown scan
            lo, hi = np.percentile(values, [1, 99])
            hi = hi if hi > lo else lo + 1e-12
            self.mapper.update(palette=Viridis256, low=float(lo), high=float(hi))
        stored = self.data.units(name)
        title = units.label(name) if units.unit(name) else f"{name} ({stored})" if stored else name
        about = html.escape(self.data.long_name(name))
        self.map_info.text = f"<b>{html.escape(title)}</b>: {about}"
        for scan, img in images.items():
            src = self.map_sources[scan]
            data = dict(src.data)
            if not data["x"]:
                s = self.data.scans[scan]
                dy, dx = s.step
                data = _image_data(
                    img,
                    float(s.x[0] - dx / 2),
                    float(s.y[0] - dy / 2),
                    dx * s.shape[1],
                    dy * s.shape[0],
                )
            else:
                data["image"] = [img]
            src.data = data
            self.figures[scan].title.text = f"{scan}: {name}"
            self.color_bars[scan].title = title

    # -- callbacks --------------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        logger.exception("explorer callback failed")
        self.status_info.text = (
            f"{self._status_text()}<br><b style='color:#b00'>error: {html.escape(str(exc))}</b>"
        )

    def _guard(self, fn: Any) -> Any:
        """``fn`` as a property callback, any error shown in ``status_info`` (and logged)."""

        def call(attr: str, old: Any, new: Any) -> None:
            try:
                fn(attr, old, new)
            except Exception as exc:
                self._fail(exc)

        return call

    def _guard_event(self, fn: Any) -> Any:
        """``fn`` as an event callback, any error shown in ``status_info`` (and logged)."""

        def call(event: Any) -> None:
            try:
                fn(event)
            except Exception as exc:
                self._fail(exc)

        return call

    def _on_map(self, attr: str, old: Any, new: str) -> None:
        self.shown = new
        self._show_map()

    def _on_scans(self, attr: str, old: Any, new: list[str]) -> None:
        self.maps_row.children = [self._figure(scan) for scan in new]
        self._show_map()

    def _on_clusters(self, attr: str, old: Any, new: list[int]) -> None:
        self._show_map()

    def _on_tap(self, scan: str, event: Tap) -> None:
        pixel = self.data.scans[scan].pixel(event.y, event.x)
        if pixel is not None:
            self.show_pixel(scan, *pixel)

    def _on_select(self, scan: str, attr: str, old: Any, new: list[int]) -> None:
        self.show_selection(scan, new)

    def _on_table(self, attr: str, old: Any, new: list[int]) -> None:
        if not new:
            return
        i = new[0]
        scan = self.table_source.data["scan"][i]
        label = self.table_source.data.get("label", [None] * (i + 1))[i]
        self.scan_select.value = [scan]
        if label is None or not self.data.has(scan, "label"):
            return
        lab = self.data.map(scan, "label")
        iy, ix = np.nonzero(lab == label)
        if iy.size:  # zoom to the particle, a pixel of margin
            s = self.data.scans[scan]
            dy, dx = s.step
            fig = self._figure(scan)
            fig.x_range.update(
                start=float(s.x[ix.min()] - 1.5 * dx), end=float(s.x[ix.max()] + 1.5 * dx)
            )
            fig.y_range.update(
                start=float(s.y[iy.max()] + 1.5 * dy), end=float(s.y[iy.min()] - 1.5 * dy)
            )

    # -- the pixel and selection views (called by the callbacks; public for tests and notebooks) -
    def show_pixel(self, scan: str, iy: int, ix: int) -> None:
        """Show one pixel: its rocking curve, pattern projections, cluster's mean and values."""
        d, s = self.data, self.data.scans[scan]
        y_um, x_um = float(s.y[iy]), float(s.x[ix])
        self.pixel_source.data = {
            "scan": [scan],
            "iy": [int(iy)],
            "ix": [int(ix)],
            "y_um": [y_um],
            "x_um": [x_um],
        }
        for name, m in self.marker_sources.items():
            m.data = {"x": [x_um], "y": [y_um]} if name == scan else {"x": [], "y": []}
        self.rocking_source.data = {"angle": s.angle, "intensity": d.rocking_curve(scan, iy, ix)}
        self._titles(f"{scan} pixel ({iy}, {ix})", "pattern of the pixel")
        self._show_patterns(self.pattern_sources, d.pattern(scan, iy, ix))
        values = d.pixel_values(scan, iy, ix)
        cluster = int(values["cluster"]) if np.isfinite(values.get("cluster", np.nan)) else None
        self._show_cluster(scan, cluster, "its cluster's mean")
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(k, v)}</td></tr>" for k, v in values.items()
        )
        self.pixel_info.text = (
            f"<b>{html.escape(scan)}</b> pixel (iy={iy}, ix={ix}) at y={y_um:.4g} µm, "
            f"x={x_um:.4g} µm<table>{rows}</table>"
        )

    def show_selection(self, scan: str, indices: list[int]) -> None:
        """Show a selection of pixels (flat indices of ``pixels_source:<scan>``)."""
        s = self.data.scans[scan]
        mask = np.zeros(s.shape, dtype=bool)
        idx = np.asarray(indices, dtype=int)
        mask.ravel()[idx] = True
        if not idx.size:
            self.selection_info.text = "<i>draw a box or lasso on a map</i>"
            return
        sel = self.data.selection(scan, mask)
        self.rocking_source.data = {"angle": s.angle, "intensity": sel["rocking_curve"]}
        self._titles(f"mean of {idx.size} pixels of {scan}", "mean of the selection")
        self._show_patterns(self.pattern_sources, sel["pattern"])
        stats = sel["stats"]
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(k, m, sd)}</td><td>({n} valid)</td></tr>"
            for k, (m, sd, n) in ((k, v) for k, v in stats.items() if k != "count")
        )
        self.selection_info.text = (
            f"<b>{html.escape(scan)}</b> selection: {stats['count']} pixels (curve and pattern "
            f"views show their mean)<table>{rows}</table>"
        )
        self.selection_stats = stats
        # the cluster row: the mean of the selection's cluster when it lies in one
        clusters: list[int] = []
        if self.data.has(scan, "cluster"):
            found = self.map_image(scan, "cluster", masked=False)[mask]
            clusters = sorted({int(c) for c in found[np.isfinite(found) & (found >= 0)]})
        cluster = clusters[0] if len(clusters) == 1 else None
        self._show_cluster(
            scan, cluster, f"cluster {cluster}'s mean" if cluster is not None else "cluster mean"
        )
        self.pixel_source.data = {k: [] for k in self.pixel_source.data}
        for m in self.marker_sources.values():
            m.data = {"x": [], "y": []}
        where = f" in clusters {{{', '.join(map(str, clusters))}}}" if clusters else ""
        self.pixel_info.text = (
            f"<i>the views show the selection</i>: {stats['count']} pixels of "
            f"<b>{html.escape(scan)}</b>{where}"
            + ("" if cluster is not None or not clusters else " (no one cluster's mean shown)")
            + "; click a pixel to show it"
        )

    def _show_cluster(self, scan: str, cluster: int | None, title: str) -> None:
        """The cluster row: one cluster's mean pattern and rocking curve, or empty (None or a
        pixel outside the clusters)."""
        d, s = self.data, self.data.scans[scan]
        if cluster is not None and cluster < 0:
            cluster = None
        if self.cluster_pattern_sources:
            pat = d.cluster_pattern(cluster) if cluster is not None else None
            self._show_patterns(self.cluster_pattern_sources, pat)
            for name, fig in self.cluster_pattern_figures.items():
                h, v, _ = PROJECTIONS[name]
                fig.title.text = f"{title}: {_AXIS[h]}–{_AXIS[v]}"
        if self.cluster_rocking_source is not None:
            curve = d.cluster_rocking_curve(scan, cluster) if cluster is not None else None
            self.cluster_rocking_source.data = (
                {"angle": s.angle, "intensity": curve}
                if curve is not None
                else {"angle": [], "intensity": []}
            )

    def _titles(self, curve: str, pattern: str) -> None:
        self.rocking_figure.title.text = f"rocking curve: {curve}"
        for name, fig in self.pattern_figures.items():
            h, v, _ = PROJECTIONS[name]
            fig.title.text = f"{pattern}: {_AXIS[h]}–{_AXIS[v]}"

    def _show_patterns(
        self, sources: dict[str, ColumnDataSource], pattern: np.ndarray | None
    ) -> None:
        if pattern is None:
            for src in sources.values():
                src.data = _image_data(None, 0, 0, 0, 0)
            return
        axes = self._q_axes
        for name, img in projections(pattern).items():
            h, v, _ = PROJECTIONS[name]
            dh_ = float(axes[h][1] - axes[h][0]) if axes else 1.0
            dv_ = float(axes[v][1] - axes[v][0]) if axes else 1.0
            x0 = float(axes[h][0]) - dh_ / 2 if axes else 0.0
            y0 = float(axes[v][0]) - dv_ / 2 if axes else 0.0
            sources[name].data = _image_data(img, x0, y0, dh_ * img.shape[1], dv_ * img.shape[0])


def build_document(doc: Any, explorer: ExplorerData) -> ExplorerApp:
    """Fill a Bokeh document with the explorer of ``explorer``'s beamtime.

    Parameters
    ----------
    doc : bokeh.document.Document
        A server session's document (``Application(FunctionHandler(...))``), a notebook's, or a
        bare ``Document()`` (tests).
    explorer : ExplorerData
        The opened output (:class:`~spndi_dask.explorer.data.ExplorerData`).

    Returns
    -------
    ExplorerApp
        The views, with :meth:`ExplorerApp.show_pixel` and :meth:`ExplorerApp.show_selection`.
    """
    app = ExplorerApp(explorer, doc)
    app.build()
    return app
