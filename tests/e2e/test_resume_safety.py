"""A resume falls back past every kind of damage, never trains over newer iterations, and restores its RNG.

Real ``resumable train`` jobs (tiny model, 1-2 processes) write iterations 2, 4 and 6; a
copy of that tree is damaged by hand in one way per case, and the identical command with
``resume_training: true`` must skip to the newest valid iteration with a warning. Training
on from an older iteration would write over the newer ones, so the job refuses unless
``callbacks.0.discard_newer_checkpoints: true`` (the cases here set it, to see the resume
train on; test_corruption.py checks the refusal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from resumable.commit import iterations_after, read_tracker
from resumable.sources import open_source
from tests.e2e.jobs import losses, run_job, train_cmd

EVERY = ["callbacks.0.save_checkpoint_steps=2"]
MODEL = "CKP-model-0000000-0000001.safetensors"


def _resume(out: Path, *sets: str, nproc: int = 0) -> list[str]:
    return train_cmd(out, f"load_checkpoint={out / 'checkpoint'}", "resume_training=true", *EVERY, *sets, nproc=nproc)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run_job(_resume(out, "runner_config.stop_step=6"))
    return out


def _common_value(folder: Path, key: str, value: object) -> None:
    path = folder / "common.json"
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))


def _flip_header_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[12] ^= 0x20  # inside the JSON header: it no longer parses, or names another key
    file.write_bytes(bytes(data))


# case → (damage of iteration 6 or of the tracker, the iteration the resume must load)
DAMAGE: dict[str, tuple[Callable[[Path], None], int]] = {
    "missing metadata.json": (lambda ckpt: (ckpt / "iteration_00000006" / "metadata.json").unlink(), 4),
    "garbled metadata.json": (lambda ckpt: (ckpt / "iteration_00000006" / "metadata.json").write_text("{garb"), 4),
    "garbage tracker": (lambda ckpt: (ckpt / "latest_checkpointed_iteration.txt").write_bytes(b"\x00zz"), 6),
    "tracker naming a missing iteration": (
        lambda ckpt: (ckpt / "latest_checkpointed_iteration.txt").write_text("10\n"), 6),
    "garbled common.json": (lambda ckpt: (ckpt / "iteration_00000006" / "common.json").write_text('{"iter'), 4),
    "missing common.json": (lambda ckpt: (ckpt / "iteration_00000006" / "common.json").unlink(), 4),
    "truncated shard": (lambda ckpt: (ckpt / "iteration_00000006" / MODEL).write_bytes(
        (ckpt / "iteration_00000006" / MODEL).read_bytes()[:-10]), 4),
    "missing optimizer shard": (
        lambda ckpt: (ckpt / "iteration_00000006" / MODEL.replace("model", "opt")).unlink(), 4),
    "damaged safetensors header": (lambda ckpt: _flip_header_byte(ckpt / "iteration_00000006" / MODEL), 4),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_damage_class_falls_back_to_the_newest_valid_iteration_with_a_warning(trained: Path, tmp_path: Path,
                                                                                     case: str) -> None:
    out = tmp_path / "job"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoint"
    damage, expected = DAMAGE[case]
    damage(ckpt)
    done = run_job(_resume(out, "runner_config.stop_step=8", "callbacks.0.discard_newer_checkpoints=true"))
    assert "resume_training: skipped " in done.stderr
    assert f"resumed from {ckpt / f'iteration_{expected:08d}'} at global step {expected}" in done.stderr
    assert read_tracker(ckpt) == 8


def test_a_damaged_file_only_one_rank_checks_makes_every_rank_fall_back_together(tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    tp2 = ["parallel_config.model_parallel=2"]
    run_job(_resume(out, "runner_config.stop_step=4", *tp2, nproc=2))
    it4 = out / "checkpoint" / "iteration_00000004"
    victim = it4 / "CKP-opt-0000001-0000002.safetensors"  # checksummed by rank 1 alone (file i by rank i mod 2)
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x01
    victim.write_bytes(bytes(data))
    done = run_job(_resume(out, "runner_config.stop_step=6", "callbacks.0.discard_newer_checkpoints=true", *tp2,
                           nproc=2))
    assert f"resume_training: skipped iteration_00000004 (rank 1 failed: {victim}: " in done.stderr
    # Both ranks loaded 2 (a rank that tried another iteration would have hung or failed the job).
    assert f"resumed from {out / 'checkpoint' / 'iteration_00000002'} at global step 2" in done.stderr
    assert read_tracker(out / "checkpoint") == 6


def test_a_changed_architecture_leaving_saved_tensors_unused_stops_the_resume_naming_them(trained: Path,
                                                                                           tmp_path: Path) -> None:
    out = tmp_path / "job"
    shutil.copytree(trained, out)
    done = run_job(_resume(out, "runner_config.stop_step=8", "model.tie_word_embeddings=true"), expect_ok=False)
    assert done.returncode != 0
    assert (f"error: checkpoint {out / 'checkpoint' / 'iteration_00000006'} holds 3 tensor(s) the state has no place "
            "for on any rank: optimizer.state.lm_head.weight.exp_avg, optimizer.state.lm_head.weight.exp_avg_sq, "
            "optimizer.state.lm_head.weight.step; they would be dropped silently.") in done.stderr
    assert "skipped" not in done.stderr  # the job's own configuration: no fallback to an older iteration
    assert read_tracker(out / "checkpoint") == 6


def test_a_symlinked_iteration_folder_is_never_loaded_and_discarding_it_never_deletes_through_it(
        trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    shutil.copytree(trained, out)
    elsewhere = tmp_path / "elsewhere" / "iteration_00000010"
    shutil.copytree(out / "checkpoint" / "iteration_00000006", elsewhere)
    (out / "checkpoint" / "iteration_00000010").symlink_to(elsewhere)
    refused = run_job(_resume(out, "runner_config.stop_step=8"), expect_ok=False)
    assert refused.returncode != 0
    assert "holds 1 iteration(s) newer than step 6 this job starts from: iteration_00000010." in refused.stderr
    done = run_job(_resume(out, "runner_config.stop_step=8", "callbacks.0.discard_newer_checkpoints=true"))
    assert f"resumed from {out / 'checkpoint' / 'iteration_00000006'} at global step 6" in done.stderr
    assert iterations_after(out / "checkpoint", 6) == [8] and read_tracker(out / "checkpoint") == 8  # link gone
    assert (elsewhere / "metadata.json").is_file()  # the link was removed, never what it points at


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t.read() for name, t in open_source(folder).tensors.items()}


def test_a_run_drawing_random_numbers_every_step_resumes_bit_for_bit(tmp_path: Path) -> None:
    # Attention dropout draws from the global RNG at every step: only a restored RNG state
    # makes the resumed steps repeat the uninterrupted run's masks, losses and weights.
    dropout = ["model.attention_dropout=0.2", "runner_config.stop_step=8"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_job(_resume(reference, *dropout))
    run_job(_resume(resumed, *dropout[:1], "runner_config.stop_step=4"))
    done = run_job(_resume(resumed, *dropout))
    assert f"resumed from {resumed / 'checkpoint' / 'iteration_00000004'} at global step 4" in done.stderr
    ref, got = losses(reference), losses(resumed)
    assert [got[s] for s in range(5, 9)] == [ref[s] for s in range(5, 9)]  # bitwise: same floats
    want, have = _weights(reference / "checkpoint" / "iteration_00000008"), _weights(resumed / "checkpoint" /
                                                                                       "iteration_00000008")
    assert want.keys() == have.keys() and all(torch.equal(want[n], have[n]) for n in want)


def test_a_file_where_the_checkpoint_folder_should_be_is_a_clean_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "job"
    out.mkdir()
    (out / "checkpoint").write_text("notes")
    done = run_job(_resume(out, "runner_config.stop_step=2"), expect_ok=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert (f"error: {out / 'checkpoint'}, the folder checkpoints are saved to (callbacks.0.directory, default "
            "<output_dir>/checkpoint), is a file: move it away or set callbacks.0.directory") in done.stderr
    assert (out / "checkpoint").read_text() == "notes"
