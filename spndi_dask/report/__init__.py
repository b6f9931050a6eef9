"""Self-contained HTML report of a processed beamtime: ``<output>/report/index.html``.

One file, readable offline: inline CSS, no script, no external resource; every figure of
``<output>/figures/`` embedded as a base64 PNG ``data:`` URI. Sections:

* **summary**: beamtime name, dates, package version, the status of every stage per scan;
* **beamtime overview**: ``beamtime_overview.png`` and the per-particle statistics;
* **one section per scan**: reduction notes, the statistics of ``particles.csv``, the
  maps, rocking curves, strain–tilt density and cluster maps;
* **features**: the autoencoder and its training;
* **clustering**: K, how it was chosen, inertia and silhouette per K, cluster statistics;
* **analysis**: cluster rocking curves and mean patterns, domains vs boundaries;
* **run**: the stage timings and the cluster a pipeline ran on;
* **provenance**: library versions, the manifest (text and SHA-256), input file fingerprints and
  the attrs every stage stored.

The report only reads what the stages wrote (attrs, CSV tables, PNG figures): no array is
computed. A stage that has not run shows as "not run"; a missing figure is skipped with a note.

Layers: :mod:`.context` reads what the stages wrote, :mod:`.sections` turns it into plain data
per section (with :mod:`.format` for cell text and tables), and :mod:`.render` renders the
Jinja2 templates of ``templates/`` (``page.html``, one template per section, ``macros.html``,
``style.css``) and writes the file. Provenance (versions, fingerprints) comes from
:mod:`spndi_dask.provenance`.
"""

from spndi_dask.provenance import (
    LIBRARIES,
    file_fingerprint,
    input_fingerprints,
    library_versions,
)
from spndi_dask.report.render import render_report, write_report

__all__ = [
    "LIBRARIES",
    "file_fingerprint",
    "input_fingerprints",
    "library_versions",
    "render_report",
    "write_report",
]
