"""What a checkpoint folder holds (``resumable inspect``): iterations, completeness, layout, tensors.

Completeness is :func:`resumable.commit.is_committed`, the one definition. The report
is a plain dict (``--json`` prints it as is); :func:`render` makes the terminal tables,
:func:`render_summary` one screen without the per-tensor table (``--summary``; :func:`summary`
its JSON).

Example::

    report = inspect_path("output/checkpoint")
    report["latest"], [t["name"] for t in report["tensors"]], report["kinds"]["opt"]["bytes"]
"""

from __future__ import annotations

import os
from typing import Any

from resumable import commit, storage
from resumable.errors import CheckpointError
from resumable.sources import open_source
from resumable.storage import AnyPath
from resumable.tools import walk_files

__all__ = ["inspect_path", "render", "render_summary", "summary"]

#: How the summary names each kind of tensor.
KIND_NAMES = {"model": "model", "opt": "optimizer"}


def _iterations(directory: AnyPath) -> list[dict[str, Any]]:
    rows = []
    for child in storage.list_dir(directory):
        name = child.name
        n = commit.parse_iteration(name)
        if n is None and name.startswith((".tmp-", ".old-", ".del-")):
            n = commit.parse_iteration(name[5:])
        if n is None or not child.is_dir:
            continue
        rows.append({"iteration": n, "folder": name, "committed": commit.is_committed(directory / name)})
    return rows


def inspect_path(path: str | os.PathLike[str], **open_args: Any) -> dict[str, Any]:
    """Describe ``path`` (checkpoint folder, iteration folder, rank_* tree, HF/unified folder or single file).

    Args:
        open_args: how the source is read (:func:`resumable.sources.open_source`'s ``heads``,
            ``fused``, ``names``, ``src_strategy``).

    Returns:
        ``{"path", "format", "tracker", "latest", "iterations": [{"iteration", "folder",
        "committed"}], "selected", "iteration", "layout", "notes" (how it was read), "common", "tensors": [{"name",
        "dtype", "shape", "chunks", "bytes", "kind"}], "kinds": {kind: {"tensors", "bytes"}}, "total_bytes",
        "files": {name: bytes}}``.

    Raises:
        CheckpointNotFoundError / CorruptCheckpointError: naming the path.
    """
    path = storage.as_path(path)
    report: dict[str, Any] = {"path": str(path), "tracker": None, "latest": None, "iterations": []}
    if storage.is_dir(path) and commit.parse_iteration(path.name) is None:
        report["iterations"] = _iterations(path)
        try:
            report["tracker"] = commit.read_tracker(path)
        except CheckpointError as exc:
            report["tracker_error"] = str(exc)
        latest = commit.latest_committed(path) if "tracker_error" not in report else None
        report["latest"] = None if latest is None else commit.parse_iteration(latest.name)
        for row in report["iterations"]:
            row["latest"] = row["iteration"] == report["latest"] and row["committed"]
    source = open_source(path, **open_args)
    report.update(format=source.format, selected=str(source.path), iteration=source.iteration,
                  layout=source.layout, notes=source.notes, common={k: v for k, v in source.common.items() if k != "rank_local"})
    report["tensors"] = [{"name": t.name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                          "chunks": len(t.chunks), "bytes": t.nbytes, "kind": t.kind}
                         for t in source.tensors.values()]
    kinds = sorted({t["kind"] for t in report["tensors"]}, key=lambda k: (k != "model", k))  # model first
    report["kinds"] = {k: {"tensors": sum(t["kind"] == k for t in report["tensors"]),
                           "bytes": sum(t["bytes"] for t in report["tensors"] if t["kind"] == k)} for k in kinds}
    report["total_bytes"] = sum(t["bytes"] for t in report["tensors"])
    selected = storage.as_path(source.path)
    entry = storage.stat(selected)
    if entry is not None and not entry.is_dir:
        report["files"] = {selected.name: entry.size}
    else:
        report["files"] = {name: e.size for name, e in walk_files(selected)
                           if name.endswith((".safetensors", ".ckpt", ".json"))}
    return report


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip(),
            *(fmt.format(*r).rstrip() for r in rows)]


def _tracker(report: dict[str, Any]) -> str:
    return (f"tracker: {report['tracker'] if report['tracker'] is not None else 'none'}"
            + (f" ({report['tracker_error']})" if "tracker_error" in report else ""))


def _totals(report: dict[str, Any]) -> str:
    return (f"{len(report['tensors'])} tensors, {_size(report['total_bytes'])}; {len(report['files'])} files, "
            f"{_size(sum(report['files'].values()))} on disk")


def render(report: dict[str, Any]) -> str:
    """Readable tables of an :func:`inspect_path` report."""
    lines = [f"{report['path']}: {report['format']} checkpoint"]
    if report["iterations"]:
        lines.append(_tracker(report))
        rows = [[str(r["iteration"]), r["folder"], "yes" if r["committed"] else "NO (incomplete)",
                 "<- latest" if r.get("latest") else ""] for r in report["iterations"]]
        lines += ["", *_table(["iteration", "folder", "committed", ""], rows)]
    lines += ["", f"selected: {report['selected']}", *_where(report)]
    rows = [[t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", str(t["chunks"]), _size(t["bytes"])]
            for t in report["tensors"]]
    lines += ["", *_table(["tensor", "dtype", "shape", "chunks", "size"], rows), _totals(report)]
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-tensor and per-file lists: ``"disk": {"files", "bytes"}`` instead of ``"files"``."""
    short = {k: v for k, v in report.items() if k not in ("tensors", "files")}
    short["disk"] = {"files": len(report["files"]), "bytes": sum(report["files"].values())}
    return short


def render_summary(report: dict[str, Any]) -> str:
    """One screen of an :func:`inspect_path` report: format, iterations, latest, layout, context, and the
    count and bytes of the tensors of each kind (``--summary``)."""
    lines = [f"{report['path']}: {report['format']} checkpoint"]
    if report["iterations"]:
        names = [f"{r['iteration']}" + ("" if r["committed"] else " (incomplete)") for r in report["iterations"]]
        if len(names) > 8:
            names = [*names[:3], f"... {len(names) - 6} more ...", *names[-3:]]
        latest = report["latest"] if report["latest"] is not None else "none"
        lines.append(f"iterations ({len(report['iterations'])}): {', '.join(names)}; latest: {latest}; "
                     + _tracker(report))
    lines += [f"selected: {report['selected']}", *_where(report)]
    kinds = ", ".join(f"{k['tensors']} {KIND_NAMES.get(kind, kind)} ({_size(k['bytes'])})"
                      for kind, k in report["kinds"].items())
    lines.append(f"tensors: {kinds or 'none'}; {_totals(report)}")
    return "\n".join(lines)


def _where(report: dict[str, Any]) -> list[str]:
    """The layout and context lines."""
    lines = []
    if report["layout"]:
        lay = report["layout"]
        lines.append(f"layout: world size {lay['world_size']}, mesh {lay.get('mesh')}, "
                     f"{lay.get('pipeline_stages', 1)} pipeline stage(s), {lay.get('writers')} writer(s)")
    common = report["common"]
    context = ", ".join(f"{k} {common[k]}" for k in ("iteration", "global_step", "epoch_num", "step_num",
                                                      "consumed_samples", "global_batch_size") if k in common)
    if context:
        lines.append(f"context: {context}")
    return lines
