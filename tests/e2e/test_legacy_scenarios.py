"""The four resume scenarios of docs/formats.md in the legacy layout, through real ``python -m resumable.train`` runs.

1. interrupted (a crash left a partial newer file) and 4. automatic recovery: the same
   command, pointing ``load_checkpoint`` at the job's own folder, starts fresh and then resumes;
2. layout change: one process → two (torchrun) with ``auto_trans_ckpt``;
3. incremental: new data, the global step and the LR curve (``lr_schedule.total_steps``) continue.

And damage: two ranks fall back together past a torn rank file, a damaged meta.json and a
garbage strategy file, refusing to bury the skipped step until told to discard it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from resumable.cli import main as cli

BASE = ["train_dataset.seq_length=32", "lr_schedule.warmup_steps=2", "lr_schedule.total_steps=20",
        "parallel_config.data_parallel=1", "parallel_config.model_parallel=1", "runner_config.batch_size=4",
        "use_legacy_format=true", "callbacks.0.save_checkpoint_steps=2"]


def _run(out: Path, *overrides: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """Run ``resumable train`` and return it, whatever its exit."""
    sets = [x for kv in [*BASE, f"output_dir={out}", *overrides] for x in ("--set", kv)]
    cmd = [sys.executable, "-m", "resumable.cli", "train", *(["--nproc", str(nproc)] if nproc else []), *sets]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _train(out: Path, *overrides: str, nproc: int = 0) -> list[dict]:
    """Run ``resumable train`` to completion; the step records of ``<out>/log/train.jsonl`` (not its
    ``run_start`` lines)."""
    done = _run(out, *overrides, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log" / "train.jsonl").read_text().splitlines()]
    return [r for r in records if "global_step" in r]


def _losses(records: list[dict], first: int, last: int) -> list[float]:
    return [r["loss"] for r in records if first <= r["global_step"] <= last]


def _verify(tree: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``resumable verify <tree>`` (in this process): its exit code and stdout."""
    capsys.readouterr()
    code = cli(["verify", str(tree)])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[list[dict], Path]:
    """Two one-process jobs, side by side (one core each): eight uninterrupted steps (their records),
    and a job stopped at step 4 saved as .ckpt (its checkpoint folder: the source of the other scenarios)."""
    ref, four = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("four")
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(_train, ref, "runner_config.stop_step=8")
        stopped = pool.submit(_train, four, "runner_config.stop_step=4", "callbacks.0.checkpoint_format=ckpt")
        return reference.result(), (stopped.result(), four / "checkpoint")[1]


@pytest.fixture(scope="module")
def reference(sources) -> list[dict]:
    return sources[0]


@pytest.fixture(scope="module")
def four_steps_ckpt(sources) -> Path:
    return sources[1]


def test_interrupted_job_recovers_automatically_from_its_last_complete_checkpoint(tmp_path, reference):
    out = tmp_path / "job"
    recovery = [f"load_checkpoint={out / 'checkpoint'}", "resume_training=true"]
    _train(out, *recovery, "runner_config.stop_step=4")  # first start: the folder does not exist, fresh
    # A crash in the middle of the next save left a partial file that meta.json does not name.
    partial = out / "checkpoint" / "rank_0" / "CKP_rank_0-1_6.safetensors"
    partial.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"trunc")
    records = _train(out, *recovery, "runner_config.stop_step=8")
    # Steps 5..8 after the restart are bit for bit those of the uninterrupted run.
    assert _losses(records, 5, 8) == _losses(reference, 5, 8)
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    # The restart writes with prefix suffix _1; keep_checkpoint_max 3 keeps the newest three files of the
    # folder (the partial 1_6 among them: name order) and, beside them, the one it resumed from (1_4): 1_2 went.
    names = sorted(p.name for p in (out / "checkpoint" / "rank_0").iterdir())
    assert names == ["CKP_rank_0-1_4.safetensors", partial.name, "CKP_rank_0_1-1_6.safetensors",
                     "CKP_rank_0_1-1_8.safetensors", "meta.json"]
    meta = json.loads((out / "checkpoint" / "rank_0" / "meta.json").read_text())
    assert {k: meta[k] for k in ("last_epoch", "last_step", "last_ckpt_file")} == {
        "last_epoch": 1, "last_step": 8, "last_ckpt_file": "CKP_rank_0_1-1_8.safetensors"}
    # Every file resumable wrote and the folder keeps is recorded with its size and checksum (the deleted
    # 1_2 no longer, the partial file never).
    assert sorted(meta["files"]) == [n for n in names[:-1] if n != partial.name]


def test_async_saves_record_the_same_steps_and_resume_bit_for_bit(tmp_path, reference):
    out = tmp_path / "job"
    recovery = [f"load_checkpoint={out / 'checkpoint'}", "resume_training=true", "callbacks.0.async_save=true"]
    _train(out, *recovery, "runner_config.stop_step=4")
    rank0 = out / "checkpoint" / "rank_0"
    assert sorted(p.name for p in rank0.iterdir()) == ["CKP_rank_0-1_2.safetensors", "CKP_rank_0-1_4.safetensors",
                                                         "meta.json"]
    assert json.loads((rank0 / "meta.json").read_text())["last_ckpt_file"] == "CKP_rank_0-1_4.safetensors"
    records = _train(out, *recovery, "runner_config.stop_step=8")
    assert _losses(records, 5, 8) == _losses(reference, 5, 8)


def test_layout_change_one_process_to_two_with_auto_trans_ckpt(tmp_path, reference, four_steps_ckpt):
    records = _train(tmp_path / "two", "parallel_config.data_parallel=2", "runner_config.batch_size=2",
                     "runner_config.stop_step=6", f"load_checkpoint={four_steps_ckpt}", "resume_training=true",
                     "load_ckpt_format=ckpt", "auto_trans_ckpt=true", nproc=2)
    # Same global batches; DP2 averages two half-batch means (~1e-7 relative per step).
    assert _losses(records, 5, 6) == pytest.approx(_losses(reference, 5, 6), rel=1e-5)


def test_incremental_training_continues_the_global_step_and_lr_curve_on_new_data(tmp_path, reference,
                                                                                  four_steps_ckpt):
    data = tmp_path / "part2.txt"
    data.write_text("new data arrives in parts; the schedule does not restart. " * 60)
    records = _train(tmp_path / "part2", f"train_dataset.path={data}", "runner_config.stop_step=7",
                     f"load_checkpoint={four_steps_ckpt}", "resume_training=true", "load_ckpt_format=ckpt")
    assert [r["global_step"] for r in records] == [5, 6, 7]
    # The new data starts at its beginning (epoch 0); the LR follows the same curve as step 5..7 of one run.
    assert [(r["epoch"], r["step_in_epoch"]) for r in records] == [(0, 1), (0, 2), (0, 3)]
    assert [r["lr"] for r in records] == [r["lr"] for r in reference if 5 <= r["global_step"] <= 7]



def test_two_ranks_fall_back_together_past_a_torn_rank_file_a_damaged_meta_json_and_a_garbage_strategy(tmp_path,
                                                                                                           capsys):
    out = tmp_path / "job"
    dp2 = ["parallel_config.data_parallel=2", "runner_config.batch_size=2", "callbacks.0.keep_checkpoint_max=5"]
    first = _train(out, *dp2, "runner_config.stop_step=6", nproc=2)
    tree = out / "checkpoint"
    code, stdout = _verify(tree, capsys)
    # 3 steps x 2 ranks, 2 meta.json, 2 strategy files: all of them resumable's, all checksummed.
    assert code == 0
    assert stdout.strip() == (f"{tree}: OK (10 files checked: 10 with checksums (whole-file xxh3-64 in "
                                   "meta.json or per-block; seals), 0 sizes only)")
    # Damage: rank 1's newest file torn, rank 0's meta.json garbage, rank 1's strategy file garbage.
    torn = tree / "rank_1" / "CKP_rank_1-1_6.safetensors"
    with open(torn, "r+b") as f:
        f.truncate(torn.stat().st_size - 1000)
    (tree / "rank_0" / "meta.json").write_text('{"last_epoch": 1, "last_step": 6, "last_ckpt_fi')
    strategy = out / "strategy" / "ckpt_strategy_rank_1.ckpt"
    strategy.write_bytes(b"\x00" * 64)
    code, stdout = _verify(tree, capsys)
    assert code == 1
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("PROBLEM")] == [
        f"PROBLEM {tree / 'rank_0' / 'meta.json'}", f"PROBLEM {torn}", f"PROBLEM {strategy}"]
    resume = [f"load_checkpoint={tree}", "resume_training=true", "runner_config.stop_step=8"]
    # Training on from 1_4 would bury 1_6: refused, naming it and why it was skipped.
    refused = _run(out, *dp2, *resume, nproc=2)
    assert refused.returncode != 0
    assert "holds 1 step(s) newer than epoch 1 step 4 this job starts from: epoch 1 step 6" in refused.stderr
    assert f"This resume skipped: epoch 1 step 6: {torn}: " in refused.stderr
    records = _train(out, *dp2, *resume, "callbacks.0.discard_newer_checkpoints=true", nproc=2)
    # Both ranks resumed from 1_4 (the newest step intact on every rank): steps 5, 6 are those of the first run.
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # the log appends per run
    assert _losses(records[6:], 5, 6) == _losses(first, 5, 6)
    assert sorted(p.name for p in (tree / "rank_1").iterdir()) == [
        "CKP_rank_1-1_2.safetensors", "CKP_rank_1-1_4.safetensors", "CKP_rank_1_1-1_6.safetensors",
        "CKP_rank_1_1-1_8.safetensors", "meta.json"]
    # The strategy files are rewritten by the new saves, and the whole tree verifies again.
    assert _verify(tree, capsys)[0] == 0
