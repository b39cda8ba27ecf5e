"""Turn the raw repetitions into medians, ratios, targets, a Markdown table and a PNG chart.

Conventions of the table:

* ``s``: median seconds (asynchronous saves: until committed; ``blocked``: until training
  may continue). ``GiB/s``: state bytes / median seconds.
* ``RSS``: saves: peak RSS added on top of the built state, over all ranks; loads: peak
  RSS of the loading processes above their post-import baseline (target state included).
  ``RSS/state`` divides it by the state bytes (loads: by the target state's bytes).
* ``vs DCP``: DCP's median time / ours (>1: faster than DCP); for asynchronous saves, of
  the blocked time, against DCP's best (a stager kept across saves). ``vs DCP alt``: sync
  saves against DCP with 2 writer threads, async saves against ``dcp.async_save``'s
  default (a new stager, so fresh buffers, per call). ``vs disk``: our GiB/s / the disk's
  best in the same run (saves: the best durable write of page cache or O_DIRECT with 1, 2
  or 4 writers; cold loads: the best cold read with 1, 2 or 4 readers). ``vs same
  layout``: reshard time / same-layout time.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import CASES, Case
from bench.state import GIB


def merge_ranks(ranks: list[dict[str, Any]]) -> dict[str, float]:
    """One repetition: times of the slowest rank, RSS summed over ranks."""
    out = {k: max(r[k] for r in ranks) for k in ("seconds", "blocked", "committed") if k in ranks[0]}
    out["rss_added"] = sum(r["rss_peak"] - r["rss_state"] for r in ranks)
    out["rss_peak"] = sum(r["rss_peak"] - r["rss_import"] for r in ranks)
    out["cache_method"] = ranks[0].get("cache_method", "")
    return out


def median(reps: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in reps if key in r]
    return statistics.median(values) if values else None


@dataclass
class Row:
    """The summary of one case."""

    case: Case
    seconds: float
    blocked: float | None
    gibs: float
    rss: float
    rss_ratio: float
    vs_dcp: float | None = None
    vs_dcp2: float | None = None
    vs_disk: float | None = None
    vs_same: float | None = None


def disk_limits(disk: dict[str, list[dict[str, Any]]], size: int) -> dict[str, float]:
    """GiB/s of the disk: median per writer/reader count, and the best of them."""
    out: dict[str, float] = {}
    for n, reps in disk.items():
        out[f"write_{n}"] = size / GIB / statistics.median(r["write_seconds"] for r in reps)
        out[f"directwrite_{n}"] = size / GIB / statistics.median(r["direct_write_seconds"] for r in reps)
        out[f"read_{n}"] = statistics.median(r["bytes"] for r in reps) / GIB / statistics.median(
            r["read_seconds"] for r in reps)
    out["write_best"] = max(v for k, v in out.items() if k.startswith(("write_", "directwrite_")))
    out["read_best"] = max(v for k, v in out.items() if k.startswith("read_"))
    return out


def summarise(cases: dict[str, list[dict[str, Any]]], disk: dict[str, float], size: int) -> dict[str, Row]:
    """A :class:`Row` per measured case, with every ratio whose reference was measured too."""
    rows: dict[str, Row] = {}
    for case in CASES:
        reps = cases.get(case.name)
        if not reps:
            continue
        seconds = median(reps, "seconds")
        assert seconds is not None
        is_load = case.group == "load"
        target = size * (case.world if case.replicated else 1)
        rss = median(reps, "rss_peak" if is_load else "rss_added") or 0.0
        rows[case.name] = Row(case, seconds, median(reps, "blocked"), size / GIB / seconds, rss / GIB,
                              rss / target)
    for row in rows.values():
        c = row.case
        for attr, ref in (("vs_dcp", c.dcp), ("vs_dcp2", c.dcp2)):
            if ref in rows:
                mine, theirs = (row.blocked, rows[ref].blocked) if c.group == "async" else (
                    row.seconds, rows[ref].seconds)
                setattr(row, attr, theirs / mine if mine and theirs else None)
        if c.same_layout in rows:
            row.vs_same = row.seconds / rows[c.same_layout].seconds
        if c.group == "save" and disk:
            row.vs_disk = row.gibs / disk["write_best"]
        elif c.group == "async" and disk:
            row.vs_disk = row.gibs / disk["write_best"]
        elif c.cache == "cold" and disk:
            row.vs_disk = row.gibs / disk["read_best"]
    return rows


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def table(rows: dict[str, Row], disk: dict[str, float]) -> str:
    """The Markdown table (disk rows first)."""
    lines = ["| case | s | GiB/s | blocked s | RSS GiB | RSS/state | vs DCP | vs DCP alt | vs disk | "
             "vs same layout |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(k for k in disk if not k.endswith("_best")):
        kind, n = key.split("_")
        label = {"write": f"disk durable write (page cache + fsync), {n} writer(s)",
                 "directwrite": f"disk durable write (O_DIRECT + fsync), {n} writer(s)",
                 "read": f"disk cold read, {n} reader(s)"}[kind]
        lines.append(f"| {label} | | {disk[key]:.2f} | | | | | | | |")
    for r in rows.values():
        lines.append(f"| {r.case.name} | {r.seconds:.2f} | {r.gibs:.2f} | {_f(r.blocked)} | {r.rss:.2f} | "
                     f"{r.rss_ratio:.2f} | {_f(r.vs_dcp, '{:.2f}x')} | {_f(r.vs_dcp2, '{:.2f}x')} | "
                     f"{_f(r.vs_disk, '{:.0%}')} | {_f(r.vs_same, '{:.2f}x')} |")
    return "\n".join(lines)


def targets(rows: dict[str, Row], training: dict[str, Any] | None) -> list[tuple[str, str, bool | None]]:
    """Every target of issue 7: (what, measured, met?) — None when not measured."""
    out: list[tuple[str, str, bool | None]] = []

    def add(what: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}") -> None:
        out.append((what, "n/a" if value is None else fmt.format(value), None if value is None else ok))

    for w in (1, 2):
        r = rows.get(f"resumable save w{w}")
        add(f"sync save w{w} >= 1.3x DCP default", r and r.vs_dcp, bool(r and r.vs_dcp and r.vs_dcp >= 1.3))
        add(f"sync save w{w} >= 1.0x DCP 2 threads", r and r.vs_dcp2, bool(r and r.vs_dcp2 and r.vs_dcp2 >= 1.0))
        add(f"sync save w{w} >= 90% of disk write", r and r.vs_disk, bool(r and r.vs_disk and r.vs_disk >= 0.9),
            "{:.0%}")
        a = rows.get(f"resumable async_save w{w}")
        inv = 1 / a.vs_dcp if a and a.vs_dcp else None
        add(f"async blocked w{w} <= 0.5x DCP async_save (stager kept)", inv, bool(inv is not None and inv <= 0.5))
        inv2 = 1 / a.vs_dcp2 if a and a.vs_dcp2 else None
        if w == 1:
            add(f"async blocked w{w} <= 0.5x DCP async_save (default)", inv2, bool(inv2 is not None and inv2 <= 0.5))
        c = rows.get(f"resumable load cold w{w}")
        add(f"cold load w{w} >= 1.5x DCP", c and c.vs_dcp, bool(c and c.vs_dcp and c.vs_dcp >= 1.5))
        add(f"cold load w{w} >= 90% of disk cold read", c and c.vs_disk, bool(c and c.vs_disk and c.vs_disk >= 0.9),
            "{:.0%}")
        h = rows.get(f"resumable load warm w{w}")
        add(f"warm load w{w} >= 1.5x DCP", h and h.vs_dcp, bool(h and h.vs_dcp and h.vs_dcp >= 1.5))
        s = rows.get(f"resumable save w{w}")
        add(f"sync save w{w} adds <= 10% of the state to RSS", s and s.rss_ratio,
            bool(s and s.rss_ratio <= 0.10), "{:.1%}")
        add(f"load w{w} peak RSS <= 1.15x target state", c and c.rss_ratio, bool(c and c.rss_ratio <= 1.15))
        z = rows.get(f"resumable load cold w{w} sizes only")
        cost = 1 / z.vs_same if z and z.vs_same else None
        add(f"cold load w{w} with per-block checksums <= 1.05x sizes only", cost,
            bool(cost is not None and cost <= 1.05), "{:.3f}x")
    for name in ("resumable load reshard 2->1", "resumable load reshard 1->2"):
        r = rows.get(name)
        add(f"{name.removeprefix('resumable load ')} <= 1.15x same layout", r and r.vs_same,
            bool(r and r.vs_same and r.vs_same <= 1.15))
    if training:
        add("async save every 10 steps costs <= 3% tokens/s", training.get("overhead"),
            training.get("overhead", 1) <= 0.03, "{:.1%}")
    return out


def chart(rows: dict[str, Row], disk: dict[str, float], path: Path) -> None:
    """Bar chart: GiB/s per case (disk limits as lines) and blocked seconds of asynchronous saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 4 + 0.28 * len(names)),
                                  gridspec_kw={"height_ratios": [len(names), 4]})
    colors = ["tab:blue" if n.startswith("resumable") else "tab:gray" for n in names]
    ax.barh(names, [rows[n].gibs for n in names], color=colors)
    for key, style in (("write_best", "--"), ("read_best", ":")):
        if key in disk:
            ax.axvline(disk[key], linestyle=style, color="tab:red", label=f"disk {key.split('_')[0]} {disk[key]:.2f}")
    ax.invert_yaxis()
    ax.set_xlabel("GiB/s (state bytes / median seconds)")
    if disk:
        ax.legend(loc="lower right")
    asyncs = [n for n in names if rows[n].blocked is not None]
    ax2.barh(asyncs, [rows[n].blocked for n in asyncs],
             color=["tab:blue" if n.startswith("resumable") else "tab:gray" for n in asyncs])
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds training is blocked by an asynchronous save")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str))


__all__ = ["Row", "chart", "disk_limits", "merge_ranks", "summarise", "performance_section", "table", "targets", "write_json"]


def performance_section(doc: dict[str, Any], rows_table: str, goals: list[tuple[str, str, bool | None]]) -> str:
    """The README's "Performance" section for one run: machine, command, table, targets, training."""
    m, t = doc["machine"], doc.get("training")
    lines = [
        "## Performance",
        "",
        f"One run of `make bench` ({doc['command']}), {doc['seconds'] / 60:.1f} minutes, on {m['nproc']} cores "
        f"({m['cpu']}), {m['ram_gib']} GiB RAM, disk {m['disk']}, torch {m['torch']}, "
        f"Python {m['python']}, Linux {m['kernel']}. State: {doc['size_bytes'] / GIB:.2f} GiB "
        "(fp32 decoder weights + AdamW exp_avg/exp_avg_sq, random contents), on 1 process and on 2 "
        "(DTensor Shard(0) over gloo). Every number is the median of "
        f"{doc['reps']} runs ({doc.get('cold_reps', doc['reps'])} for resumable's cold Shard(0) loads and the disk), each in "
        "fresh processes; every save is durable (fsync).",
        "",
        rows_table,
        "",
    ]
    if t:
        runs = len(t["runs"]["none"])
        lines += [f"Training overhead (reference trainer, 1 process, steps 12-{t['steps']} timed, so the first "
                  f"save, which allocates the reused staging buffers, comes before the window; median of "
                  f"{runs} run(s) each): {t['tokens_per_s_no_save']:.0f} tokens/s without saves, "
                  f"{t['tokens_per_s_async']:.0f} with async saves every 10 steps: overhead {t['overhead']:.1%}.", ""]
    lines += ["Targets:", ""]
    lines += [f"- {'met' if ok else 'not measured' if ok is None else '**missed**'}: {what} (measured {value})"
              for what, value, ok in goals]
    return "\n".join(lines) + "\n"
