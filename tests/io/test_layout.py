"""io.layout: the output contract's paths and the atomic replacement of files and trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from spndi_dask.io import layout as L
from spndi_dask.io.layout import OutputLayout, atomic_path, replace_tree, write_text_atomic


def test_paths_are_the_output_contract(tmp_path):
    out = OutputLayout(tmp_path)
    rel = {
        name: getattr(out, name).relative_to(tmp_path).as_posix()
        for name in (
            "raw", "results", "analysis", "particles_csv", "clusters_csv", "regions_csv",
            "figures", "report", "ply", "checkpoint", "logs", "last_run", "lock", "tmp",
        )
    }  # fmt: skip
    assert rel == {
        "raw": "raw.zarr",
        "results": "results.zarr",
        "analysis": "analysis.zarr",
        "particles_csv": "particles.csv",
        "clusters_csv": "clusters.csv",
        "regions_csv": "regions.csv",
        "figures": "figures",
        "report": "report/index.html",
        "ply": "ply",
        "checkpoint": "features/model.safetensors",
        "logs": "logs",
        "last_run": "logs/last-run.json",
        "lock": ".spndi.lock",
        "tmp": ".tmp",
    }
    assert out.node("p1") == tmp_path / "results.zarr" / "p1"
    assert out.raw_node("p1") == tmp_path / "raw.zarr" / "p1"
    assert out == OutputLayout(str(tmp_path)) and len({out, OutputLayout(tmp_path)}) == 1
    assert not any(tmp_path.iterdir())  # nothing is created


def test_atomic_path_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    write_text_atomic(target, "old\n")
    assert target.read_text() == "old\n"
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not tmp.exists()
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # readers see the old file until the move
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_replace_tree_swaps_whole_directories(tmp_path):
    dest = tmp_path / "analysis.zarr"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "old").write_text("1")
    tmp = tmp_path / ".tmp" / "analysis.zarr"
    (tmp / "b").mkdir(parents=True)
    (tmp / "b" / "new").write_text("2")
    replace_tree(tmp, dest)
    assert [p.relative_to(dest).as_posix() for p in sorted(dest.rglob("*"))] == ["b", "b/new"]
    assert not tmp.exists() and not tmp.with_name(tmp.name + ".old").exists()
    assert not (tmp_path / ".tmp").exists()  # no empty .tmp/ left behind
    other = _tree(tmp_path / ".tmp" / "other")  # another store still being written
    replace_tree(_tree(tmp_path / ".tmp" / "first"), tmp_path / "fresh")  # nothing to replace
    assert (tmp_path / "fresh" / "x").read_text() == "x"
    assert other.exists()  # a .tmp/ that is not empty stays


def _tree(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "x").write_text("x")
    return path


def test_replace_tree_puts_the_old_tree_back_when_the_move_fails(tmp_path, monkeypatch):
    dest = _tree(tmp_path / "results.zarr" / "p1")
    tmp = _tree(tmp_path / ".tmp" / "reduce-p1.zarr")
    (tmp / "x").write_text("new")
    real = Path.replace

    def failing(self, target):
        if self == tmp:
            raise OSError("cross-device link")
        return real(self, target)

    monkeypatch.setattr(L.Path, "replace", failing)
    with pytest.raises(OSError, match="cross-device"):
        replace_tree(tmp, dest)
    assert (dest / "x").read_text() == "x"
    assert (tmp / "x").read_text() == "new"


# -- an output spndi did not write -----------------------------------------------------------------
def _group(path: Path, attrs: dict | None = None) -> Path:
    import json

    path.mkdir(parents=True, exist_ok=True)
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}
    (path / "zarr.json").write_text(json.dumps(meta))
    return path


def test_spndi_outputs_pass_the_check(tmp_path):
    L.check_output(tmp_path / "not-yet")  # nothing there yet
    out = OutputLayout(tmp_path)
    out.raw.mkdir()  # an empty folder holds nothing to lose
    L.check_output(tmp_path)
    _group(out.raw)  # raw.zarr's root is not labelled; its particle groups are
    _group(out.raw_node("p1"), {"spndi_dask": {"kind": "raw", "complete": True}})
    # a particle group whose creation was interrupted: no attributes yet, only ingest's arrays
    _group(out.raw_node("p2"))
    _group(out.raw_node("p2") / "frames")
    _group(out.results, {"spndi_dask": {"kind": "results"}})
    _group(out.node("p1"), {"spndi_dask": {"kind": "reduce"}})
    _group(out.analysis, {"spndi_dask": {"kind": "analysis"}})
    L.check_output(tmp_path)
    _group(out.analysis, {"fingerprint": "f", "boundary_width": 1.0})  # before it was labelled
    L.check_output(tmp_path)


@pytest.mark.parametrize(
    "what", ["file", "folder", "zarr", "zarr array", "analysis", "output file"]
)
def test_an_output_spndi_did_not_write_is_refused_naming_the_path_and_fix(tmp_path, what):
    out = OutputLayout(tmp_path / "results")
    out.root.mkdir()
    if what == "file":
        out.raw.write_text("someone's notes")
        culprit = out.raw
    elif what == "folder":
        (out.results / "2023").mkdir(parents=True)
        (out.results / "2023" / "scan.h5").write_bytes(b"data")
        culprit = out.results
    elif what == "zarr":  # another program's Zarr group (no spndi_dask attributes)
        _group(out.raw, {"creator": "other"})
        _group(out.raw / "detector")
        (out.raw / "detector" / "frames").mkdir()
        culprit = out.raw
    elif what == "zarr array":  # a group without attributes holding an array spndi never makes
        _group(out.results)
        (out.results / "intensity").mkdir()
        (out.results / "intensity" / "zarr.json").write_text('{"node_type": "array"}')
        culprit = out.results
    elif what == "analysis":  # another program's analysis.zarr: analyze would replace it
        _group(out.analysis, {"creator": "other"})
        culprit = out.analysis
    else:
        out.root.rmdir()
        out.root.write_text("")
        culprit = out.root
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(L.ForeignOutputError) as info:
        L.check_output(out.root)
    msg = str(info.value)
    assert str(culprit) in msg and "`output`" in msg
    assert "move it" in msg or "a folder" in msg
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
