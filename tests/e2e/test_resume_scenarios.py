"""The four resume scenarios of docs/formats.md for Checkpoint 2.0, through real ``resumable train`` jobs.

1. interrupted: SIGKILL mid-run, the identical command resumes bit for bit (sync and async saves);
2. layout change: the first resumed step matches the old layout's loss;
3. incremental: new data, the global step and the LR curve continue;
4. automatic recovery: the first start is fresh, every restart resumes; a hand-edited tracker is obeyed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from resumable.commit import read_tracker, write_tracker
from resumable.sources import open_source
from resumable.train.config import LRScheduleConfig
from resumable.train.schedule import lr_at
from tests.e2e.jobs import losses, log_records, run_job, run_until_step_then_kill, train_cmd

STEPS, EVERY = 16, 4


def _recovery(out: Path, *extra: str, nproc: int = 0) -> list[str]:
    return train_cmd(out, f"load_checkpoint={out / 'checkpoint'}", "resume_training=true",
                     f"runner_config.stop_step={STEPS}", f"callbacks.0.save_checkpoint_steps={EVERY}",
                     "callbacks.0.keep_checkpoint_max=2", *extra, nproc=nproc)


def _weights(iteration_dir: Path) -> dict[str, torch.Tensor]:
    src = open_source(iteration_dir)
    return {name: t.read() for name, t in src.tensors.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of STEPS steps: one process, and TP2 on two."""
    runs = {}
    for label, nproc, extra in (("single", 0, []), ("tp2", 2, ["parallel_config.model_parallel=2"])):
        out = tmp_path_factory.mktemp(label)
        run_job(_recovery(out, *extra, nproc=nproc))
        runs[label] = out
    return runs


@pytest.mark.parametrize("label, nproc, extra", [
    ("single", 0, ["callbacks.0.async_save=true"]),
    ("tp2", 2, []),
], ids=["one-process-async-save", "tp2-sync-save"])
def test_sigkill_then_the_identical_command_resumes_bit_for_bit(tmp_path, reference, label, nproc, extra):
    out = tmp_path / "job"
    cmd = _recovery(out, *extra, *(["parallel_config.model_parallel=2"] if nproc else []), nproc=nproc)
    killed_at = run_until_step_then_kill(cmd, out, EVERY + 2, committed=EVERY)
    resumed_from = read_tracker(out / "checkpoint")
    assert resumed_from is not None and killed_at - resumed_from <= EVERY  # at most one interval lost

    done = run_job(cmd)
    assert f"resumed from {out / 'checkpoint' / f'iteration_{resumed_from:08d}'}" in done.stderr
    ref, got = losses(reference[label]), losses(out)
    tail = range(resumed_from + 1, STEPS + 1)
    assert [got[s] for s in tail] == [ref[s] for s in tail]  # bitwise: same floats
    final = f"iteration_{STEPS:08d}"
    want, have = _weights(reference[label] / "checkpoint" / final), _weights(out / "checkpoint" / final)
    assert want.keys() == have.keys()
    assert all(torch.equal(want[n], have[n]) for n in want)


def test_automatic_recovery_starts_fresh_then_a_hand_edited_tracker_is_obeyed(tmp_path, reference):
    out = tmp_path / "job"
    first = run_job(_recovery(out))
    assert "fresh start" in first.stderr
    ckpt = out / "checkpoint"
    assert read_tracker(ckpt) == STEPS
    write_tracker(ckpt, STEPS - EVERY)  # the user picks an older iteration by hand
    # Training on from it would write over the newer iteration: refused until the user says to discard it.
    refused = run_job(_recovery(out, f"runner_config.stop_step={STEPS + 2}"), expect_ok=False)
    assert refused.returncode != 0
    assert (f"error: {ckpt} holds 1 iteration(s) newer than step {STEPS - EVERY} this job starts from: "
            f"iteration_{STEPS:08d}. Training on would write over them") in refused.stderr
    assert read_tracker(ckpt) == STEPS - EVERY and (ckpt / f"iteration_{STEPS:08d}").is_dir()
    again = run_job(_recovery(out, f"runner_config.stop_step={STEPS + 2}", "callbacks.0.discard_newer_checkpoints=true"))
    assert f"resumed from {ckpt / f'iteration_{STEPS - EVERY:08d}'} at global step {STEPS - EVERY}" in again.stderr
    records = [r for r in log_records(out) if r["global_step"] > STEPS - EVERY]
    # The rerun of steps 13..16 repeats the first run exactly; 17 and 18 are new.
    assert [r["global_step"] for r in records[-6:]] == list(range(STEPS - EVERY + 1, STEPS + 3))
    assert losses(out)[STEPS] == losses(reference["single"])[STEPS]


@pytest.mark.parametrize("source, target, nproc", [
    ("tp2", ["parallel_config.data_parallel=2", "parallel.enable_parallel_optimizer=true",
             "runner_config.batch_size=2"], 2),
    ("single", ["parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",
                "runner_config.batch_size=2"], 2),
    ("tp2", [], 0),
], ids=["tp2-to-fsdp-dp2", "single-to-pp2", "tp2-to-single"])
def test_layout_change_resumes_with_the_old_layouts_loss(tmp_path, reference, source, target, nproc):
    # Same global batch everywhere (4 samples), so step k+1 sees the same data on any layout.
    k = STEPS - EVERY
    out = tmp_path / "new"
    done = run_job(train_cmd(out, f"load_checkpoint={reference[source] / 'checkpoint' / f'iteration_{k:08d}'}",
                             "resume_training=true", f"runner_config.stop_step={k + 1}", *target, nproc=nproc))
    assert f"at global step {k}" in done.stderr
    new, old = losses(out)[k + 1], losses(reference[source])[k + 1]
    # Other reduction orders (TP all-reduce, FSDP reduce-scatter, micro batches) change the
    # last bits of fp32 sums; 1e-5 relative is far below one step's change of the loss.
    assert math.isclose(new, old, rel_tol=1e-5), (new, old)


def test_incremental_training_keeps_the_global_step_and_the_lr_curve(tmp_path):
    total = 30
    part1, part2 = tmp_path / "part1.txt", tmp_path / "part2.txt"
    part1.write_text("the first part of the data arrives today. " * 40)
    part2.write_text("a second part, written later, arrives tomorrow! " * 40)
    out = tmp_path / "job"
    common = [f"load_checkpoint={out / 'checkpoint'}", "resume_training=true", f"lr_schedule.total_steps={total}",
              "callbacks.0.save_checkpoint_steps=100"]
    run_job(train_cmd(out, f"train_dataset.path={part1}", *common))
    first = log_records(out)
    done_steps = first[-1]["global_step"]
    assert first[-1]["epoch"] == 1 and done_steps < total  # the first part is used up
    run_job(train_cmd(out, f"train_dataset.path={part2}", *common))
    second = log_records(out)[len(first):]
    assert second[0]["global_step"] == done_steps + 1 and second[0]["step_in_epoch"] == 1
    schedule = LRScheduleConfig(warmup_steps=2, total_steps=total)
    for r in first + second:  # one LR curve over both parts: a pure function of the global step
        assert r["lr"] == pytest.approx(lr_at(r["global_step"] - 1, schedule, total), rel=1e-12)


def test_load_ckpt_async_reads_in_the_background_and_resumes_bit_for_bit(tmp_path, reference):
    k = STEPS - EVERY
    out = tmp_path / "job"
    done = run_job(train_cmd(out, f"load_checkpoint={reference['single'] / 'checkpoint' / f'iteration_{k:08d}'}",
                             "resume_training=true", "load_ckpt_async=true", f"runner_config.stop_step={k + 2}"))
    assert "load_ckpt_async: read" in done.stderr and f"at global step {k}" in done.stderr
    ref = losses(reference["single"])
    assert [losses(out)[s] for s in (k + 1, k + 2)] == [ref[k + 1], ref[k + 2]]
