"""The demo behind ``make demo``: train, crash, recover, change layout, compare.

    python -m resumable.demo [--output output/demo] [--steps 40]

1. a reference run of the embedded default (4 processes, DP2 x TP2), uninterrupted;
2. the same job with automatic recovery (``load_checkpoint`` = its own checkpoint folder,
   ``resume_training: true``), killed with SIGKILL once a checkpoint is committed, then
   started again with the identical command: it resumes from the newest complete checkpoint;
3. a continuation of that job on a different layout (pipeline 2 x data parallel 2 with a
   sharded optimizer) from the same checkpoint folder: online reshard, no conversion step;
4. a summary (resumed losses vs the reference, bit for bit) and ``losses.png``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from resumable import storage
from resumable.commit import read_tracker
from resumable.proctree import kill_tree

KILL_AFTER = 20  # SIGKILL the job once this iteration is committed
SAVE_EVERY = 10


def _train(out: Path, steps: int, extra: list[str]) -> list[str]:
    ckpt = out / "checkpoint"
    sets = [f"output_dir={out}", f"load_checkpoint={ckpt}", "resume_training=true",
            f"runner_config.stop_step={steps}", f"callbacks.0.save_checkpoint_steps={SAVE_EVERY}",
            "callbacks.0.keep_checkpoint_max=3", *extra]
    return [sys.executable, "-m", "resumable.cli", "train", "--nproc", "4", *[a for s in sets for a in ("--set", s)]]


def _run(cmd: list[str], title: str) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _run_and_kill(cmd: list[str], ckpt: Path) -> int:
    """Start the job, SIGKILL its whole process group once KILL_AFTER is committed."""
    print(f"\n=== automatic recovery, first start (killed after iteration {KILL_AFTER} is committed)\n"
          f"$ {' '.join(cmd[2:])}", flush=True)
    job = subprocess.Popen(cmd, start_new_session=True)
    while job.poll() is None:
        if (read_tracker(ckpt) or 0) >= KILL_AFTER:
            kill_tree(job.pid, signal.SIGKILL)  # launcher and workers, like a node dying
            job.wait()
            print(f"--- SIGKILL sent to the job; tracker names iteration {read_tracker(ckpt)}", flush=True)
            return read_tracker(ckpt) or 0
        time.sleep(0.05)
    raise SystemExit(f"the job finished before iteration {KILL_AFTER} was committed (exit {job.returncode})")


def _losses(out: Path) -> dict[int, float]:
    """global step → loss from a run's log (the last record of each step wins)."""
    losses = {}
    for line in storage.read_bounded(out / "log" / "train.jsonl", "train log", 1 << 30).decode().splitlines():
        rec = json.loads(line)
        if "event" not in rec:  # a line between two runs
            losses[rec["global_step"]] = rec["loss"]
    return losses


def _events(out: Path) -> list[dict]:
    """The save and load events a run's monitor logged (``log/checkpoints.jsonl``), in order."""
    path = out / "log" / "checkpoints.jsonl"
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bounded(path, "checkpoint events", 1 << 30).decode().splitlines()]


def _plot(path: Path, curves: dict[str, dict[int, float]], kill_step: int, events: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return False
    fig, (ax, costs) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    styles = {"uninterrupted (DP2 x TP2)": dict(lw=3, alpha=0.4), "killed + resumed": dict(lw=1.2, marker=".", ms=4),
              "new layout (PP2 x DP2)": dict(lw=1.2, ls="--")}
    for label, losses in curves.items():
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], label=label, **styles.get(label, {}))
    ax.axvline(kill_step, color="grey", lw=0.8, ls=":")
    ax.text(kill_step, ax.get_ylim()[1], " resumed from here", va="top", fontsize=8, color="grey")
    ax.set_ylabel("loss")
    ax.set_title("resumable: SIGKILL, automatic recovery, layout change")
    ax.legend()
    # Where each checkpoint was taken (saved) or read (loaded) by the recovered job, and what it cost.
    for kind, color, shift in (("save", "tab:blue", -0.45), ("load", "tab:orange", 0.45)):  # side by side
        done = [e for e in events if e.get("kind") == kind]
        costs.bar([e["iteration"] + shift for e in done], [1000 * e["blocked_s"] for e in done], width=0.9,
                  color=color, label=f"{kind}: training blocked (ms)")
    for e in (e for e in events if e.get("kind") == "save"):
        ax.axvline(e["iteration"], color="tab:blue", lw=0.4, alpha=0.4)
    costs.set_ylabel("ms")
    costs.set_xlabel("global step")
    costs.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resumable.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="output/demo", help="folder for every run of the demo")
    parser.add_argument("--steps", type=int, default=40, help="global steps of the first job")
    args = parser.parse_args(argv)
    root = Path(args.output)
    ref, job = root / "uninterrupted", root / "recovery"
    for previous in (ref, job):  # only the demo's own runs: --output may hold anything else of the user's
        storage.remove_tree(previous)
    started = time.perf_counter()

    more = args.steps + SAVE_EVERY
    _run(_train(ref, more, []), f"uninterrupted reference run, {more} steps, DP2 x TP2")
    cmd = _train(job, args.steps, [])
    killed_at = _run_and_kill(cmd, job / "checkpoint")
    _run(cmd, "automatic recovery: the identical command again")
    after_crash = _losses(job)
    _run(_train(job, more, ["parallel_config.data_parallel=2", "parallel_config.model_parallel=1",
                            "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",
                            "runner_config.batch_size=2",  # same global batch: 2 x DP2 x 2 micro batches
                            "parallel.enable_parallel_optimizer=true"]),
         f"layout change: continue to step {more} on PP2 x DP2 with a sharded optimizer")

    reference, resumed, final = _losses(ref), after_crash, _losses(job)
    tail = range(killed_at + 1, args.steps + 1)
    identical = all(resumed.get(s) == reference.get(s) for s in tail)
    worst = max(abs(resumed[s] - reference[s]) for s in tail)
    new_layout = {s: final[s] for s in range(args.steps + 1, more + 1) if s in final}
    png = root / "losses.png"
    events = _events(job)
    plotted = _plot(png, {"uninterrupted (DP2 x TP2)": reference, "killed + resumed": resumed,
                          "new layout (PP2 x DP2)": new_layout}, killed_at, events)
    saves = sorted(e["blocked_s"] for e in events if e.get("kind") == "save")
    print("\n=== summary")
    print(f"killed after iteration {killed_at} was committed; the rerun resumed from it")
    print(f"steps {tail.start}..{tail.stop - 1} after the resume vs the uninterrupted run: "
          f"{'bitwise identical' if identical else f'max difference {worst:.3e}'}")
    first = args.steps + 1
    rel = abs(new_layout[first] - reference[first]) / abs(reference[first])
    print(f"then resumed on PP2 x DP2 (sharded optimizer): step {first} loss {new_layout[first]:.6f} vs "
          f"{reference[first]:.6f} on DP2 x TP2 (relative difference {rel:.1e}); step {more}: "
          f"{new_layout[more]:.4f} vs {reference[more]:.4f}")
    if saves:
        print(f"checkpoints of the recovered job: {len(saves)} saves, training blocked {1000 * saves[len(saves) // 2]:.0f} "
              f"ms each (median), {sum(e['bytes'] for e in events if e.get('kind') == 'save') / 1e6:.1f} MB in all; "
              f"{sum(e.get('kind') == 'load' for e in events)} load(s) (log/checkpoints.jsonl, plotted)")
    print(f"outputs in {root}/ (logs, checkpoints{', losses.png' if plotted else ''}); "
          f"demo took {time.perf_counter() - started:.0f} s")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
