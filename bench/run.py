"""``make bench`` / ``python -m bench.run``: resumable against PyTorch DCP, safetensors,
torch.save and the disk itself, in one run on one machine.

    python -m bench.run                          # 1.5 GiB state, 3 repetitions (5 of some), ~14 min
    python -m bench.run --size-gib 0.1 --reps 1 --cold-reps 1  # a quick smoke run
    python -m bench.run --only "save w1" --skip-training
    make bench BENCH_ARGS="--size-gib 0.5"

Order: repetition by repetition, the disk's limits and then every case once (so a slow
phase of the machine touches the disk and all contenders alike; the rounds past
``--reps`` repeat only the disk and :func:`against_disk`), then the training-overhead
runs. Each measurement is a fresh process (two for 2-rank cases).
Results go to ``bench/results/``: ``results.json`` (every repetition), ``table.md``,
``bench.png`` and ``PERFORMANCE.md`` (the README section for this run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.cases import CASES, PRODUCERS, Case
from bench.proc import run_worker
from bench.state import GIB, shapes_for

ROOT = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    model = "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = subprocess.run(["df", "-hT", str(ROOT)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem / GIB, 1),
            "disk": f"{dev[0]} ({dev[1]}, {dev[2]})",
            "torch": torch.__version__, "python": platform.python_version(), "kernel": platform.release()}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure_disk(work: Path, size: int, out: dict[str, list[dict[str, Any]]]) -> None:
    """One round of durable writes (page cache, O_DIRECT) + cold read with 1, 2 and 4 threads
    (resumable reads and writes with 4), in one fresh process; appended to ``out`` under
    "1" / "2" / "4"."""
    folder = work / "disk"
    try:
        results = run_worker({"disk": True, "out": str(folder), "size_bytes": size, "writers": [1, 2, 4]}, 1)[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for n, r in results.items():
        out.setdefault(n, []).append(r)
        _log(f"disk x{n}: write {size / GIB / r['write_seconds']:.2f} GiB/s, "
             f"O_DIRECT write {size / GIB / r['direct_write_seconds']:.2f} GiB/s, "
             f"cold read {r['bytes'] / GIB / r['read_seconds']:.2f} GiB/s ({r['cache_method']})")


def run_case(case: Case, work: Path, size: int, keep: bool) -> dict[str, Any]:
    """One repetition of one case; a save's folder is removed unless ``keep`` (then it is a source)."""
    out = work / "src" / case.keep_as if keep and case.keep_as else work / "scratch" / case.name.replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    spec = {"case": case.name, "size_bytes": size, "out": str(out),
            "source": str(work / "src" / case.source) if case.source else None}
    try:
        rep = report.merge_ranks(run_worker(spec, case.world))
    finally:
        if not (keep and case.keep_as):
            shutil.rmtree(out, ignore_errors=True)
    extra = f", blocked {rep['blocked']:.2f}s" if "blocked" in rep else ""
    _log(f"{case.name}: {rep['seconds']:.2f}s{extra}, {size / GIB / rep['seconds']:.2f} GiB/s, "
         f"RSS +{rep['rss_added'] / GIB:.2f} GiB (peak {rep['rss_peak'] / GIB:.2f}) {rep['cache_method']}")
    return rep


def against_disk(case: Case) -> bool:
    """The cases repeated ``--cold-reps`` times: resumable's cold loads on Shard(0) layouts,
    whose targets compare them with the disk's cold read and with each other. The disk's
    phase swings them most (the same load: 0.5-1.2 s within minutes); the other cases'
    targets have margins far wider than that, and 15 minutes allow no more rounds."""
    return case.op in ("resumable_load", "resumable_load_sizes") and case.cache == "cold" and not case.replicated


def select(only: list[str]) -> list[Case]:
    """The cases whose name contains one of ``only`` (all when empty), plus the saves their loads read."""
    chosen = [c for c in CASES if not only or any(o in c.name for o in only)]
    refs = {r for c in chosen for r in (c.dcp, c.dcp2, c.same_layout) if r} if only else set()
    chosen += [c for c in CASES if c.name in refs and c not in chosen]
    needed = {c.source for c in chosen if c.source}
    chosen += [PRODUCERS[s] for s in needed if PRODUCERS[s] not in chosen]
    return [c for c in CASES if c in chosen]  # table order


def measure_training(work: Path, steps: int, reps: int) -> dict[str, Any]:
    """Tokens/s of the reference trainer without saves and with async saves every 10 steps."""
    runs: dict[str, list[float]] = {"none": [], "async": []}
    for _ in range(reps):
        for mode in ("none", "async"):
            out = work / f"train-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            with tempfile.NamedTemporaryFile(suffix=".json") as res:
                spec = {"steps": steps, "save": mode == "async", "out": str(out), "result": res.name}
                subprocess.run([sys.executable, "-m", "bench.training", json.dumps(spec)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                tps = json.loads(Path(res.name).read_text())["tokens_per_s"]
            shutil.rmtree(out, ignore_errors=True)
            runs[mode].append(tps)
            _log(f"training ({mode} saves): {tps:.0f} tokens/s")
    base, with_saves = statistics.median(runs["none"]), statistics.median(runs["async"])
    return {"runs": runs, "tokens_per_s_no_save": base, "tokens_per_s_async": with_saves,
            "overhead": 1 - with_saves / base, "steps": steps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.5, help="training state size (default 1.5)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per case (median reported)")
    p.add_argument("--cold-reps", type=int, default=5,
                   help="repetitions of resumable's cold loads and the disk, the noisiest (at least --reps; default 5)")
    p.add_argument("--only", action="append", default=[], help="run cases whose name contains this (repeatable)")
    p.add_argument("--skip-disk", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--train-steps", type=int, default=31,
                   help="steps per training run (timed after step 11: the first save, which allocates, is not timed)")
    p.add_argument("--train-reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)

    start = time.perf_counter()
    out: Path = args.out
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shapes = shapes_for(int(args.size_gib * GIB))
    size = shapes.nbytes()
    info = machine()
    _log(f"state {size / GIB:.3f} GiB ({shapes}); machine {info}")
    cold_reps = max(args.reps, args.cold_reps)
    doc: dict[str, Any] = {"machine": info, "size_bytes": size, "shapes": shapes.__dict__, "reps": args.reps,
                           "cold_reps": cold_reps,
                           "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])])}
    disk: dict[str, list[dict[str, Any]]] = {}
    cases = select(args.only)
    raw: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    for rep in range(cold_reps):
        round_cases = cases if rep < args.reps else [c for c in cases if against_disk(c)]
        if not args.skip_disk:  # each round measures the disk too: the ratios then share the machine's phase
            measure_disk(work, size, disk)
        for case in round_cases:
            raw[case.name].append(run_case(case, work, size, keep=rep == 0))
    training = None if args.skip_training else measure_training(work, args.train_steps, args.train_reps)
    shutil.rmtree(work, ignore_errors=True)

    limits = report.disk_limits(disk, size) if disk else {}
    rows = report.summarise(raw, limits, size)
    text = report.table(rows, limits)
    goals = report.targets(rows, training)
    goal_text = "\n".join(f"- {'MET   ' if ok else 'n/a   ' if ok is None else 'MISSED'} {what}: {value}"
                          for what, value, ok in goals)
    train_text = "" if training is None else (
        f"\ntraining: {training['tokens_per_s_no_save']:.0f} tokens/s without saves, "
        f"{training['tokens_per_s_async']:.0f} with async saves every 10 steps "
        f"(overhead {training['overhead']:.1%})\n")
    elapsed = time.perf_counter() - start
    doc.update(disk=disk, disk_limits=limits, cases=raw, training=training, targets=goals, seconds=elapsed)
    report.write_json(out / "results.json", doc)
    (out / "table.md").write_text(text + "\n" + train_text + "\n" + goal_text + "\n")
    report.chart(rows, limits, out / "bench.png")
    (out / "PERFORMANCE.md").write_text(report.performance_section(doc, text, goals))
    print(f"\n{text}\n{train_text}\n{goal_text}\n\nwrote {out}/results.json, table.md, bench.png, PERFORMANCE.md "
          f"in {elapsed / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
