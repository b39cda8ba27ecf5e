"""Damaged checkpoints are detected and named, never loaded silently; a resume falls back past them.

Each case damages a real checkpoint written by ``resumable.save`` (iterations 2 and 4,
the tracker naming 4) and checks three readers: ``resumable.load`` (with checksums, as
the trainer loads), ``resumable verify`` (exit 1, every problem on a line), and
``resolve_checkpoint(..., fallback=True)`` or the trainer's own resume, which must skip
to iteration 2 with a warning saying what was skipped and why. The last tests run real
``resumable train`` jobs: a flipped byte in tensor data and a deleted common.json are
both skipped by an automatic resume, and a legacy tree's damage is named.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import pytest
import torch

import resumable
from resumable.cli import main as cli
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError
from resumable.resolve import resolve_checkpoint
from tests.e2e.jobs import start_bodies

MODEL = "CKP-model-0000000-0000001.safetensors"
TRACKER = "latest_checkpointed_iteration.txt"


def _state(value: float = 0.0) -> dict:
    return {"model": {"w": torch.full((64,), value)}, "optimizer": {"state": {"w": {"m": torch.full((64,), value)}}},
            "global_step": 0}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoint"
    for it in (2, 4):
        state = _state(float(it))
        state["global_step"] = it
        resumable.save(state, directory, it)
    return directory


def _flip_data_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's data: the header still parses, sizes still match
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-10])


# case → (damage, load error type, load message); {it4} is the iteration folder.
CASES: dict[str, tuple[Callable[[Path], None], type, str]] = {
    "flipped byte in tensor data": (
        lambda it4: _flip_data_byte(it4 / MODEL), CorruptCheckpointError,
        "{it4}/" + MODEL + ": xxh3-64 checksum {digest} differs from {recorded} recorded in files.json; "
        "the file is damaged: restore it or load another iteration"),
    "truncated file": (
        lambda it4: _truncate(it4 / MODEL), CorruptCheckpointError,
        "{it4}/" + MODEL + ": 678 bytes on disk, files.json records 688; the file is truncated or was "
        "replaced: restore it or load another iteration"),
    "missing shard": (
        lambda it4: (it4 / MODEL).unlink(), CheckpointNotFoundError,
        "{it4}/" + MODEL + ": missing; files.json lists it with 688 bytes. The checkpoint is incomplete: "
        "restore the file or load another iteration"),
    "missing metadata.json": (
        lambda it4: (it4 / "metadata.json").unlink(), CorruptCheckpointError,
        "{it4} is incomplete (no readable metadata.json): the save that wrote it did not finish. Load another "
        "iteration (committed: [2]) or delete the folder"),
    "garbled metadata.json": (
        lambda it4: (it4 / "metadata.json").write_text('{"format": "resumable-checkpoint", "tensors": [}'),
        CorruptCheckpointError,
        "{it4} is incomplete (no readable metadata.json): the save that wrote it did not finish. Load another "
        "iteration (committed: [2]) or delete the folder"),
    "missing common.json": (
        lambda it4: (it4 / "common.json").unlink(), CheckpointNotFoundError,
        "{it4}/common.json: missing; it holds the training context (step, data position) of the iteration: "
        "restore it or load another iteration"),
    "garbled common.json": (
        lambda it4: (it4 / "common.json").write_text('{"iteration": 4,'), CorruptCheckpointError,
        "{it4}/common.json: 16 bytes with xxh3-64 96985270b5ceeeb5, but metadata.json records {common.size} bytes "
        "with {common.xxh3_64}; the file is damaged or comes from another iteration: restore it or load another "
        "iteration (resume_training: true falls back to the newest valid one)"),
    "garbage tracker": (
        lambda it4: (it4.parent / TRACKER).write_text("\x00\x17garbage"), CorruptCheckpointError,
        "{ckpt}/" + TRACKER + ": expected one iteration number, found '\\x00\\x17garbage'; write the iteration "
        "to load (e.g. 100) or delete the file to use the newest committed folder"),
    "tracker naming a missing iteration": (
        lambda it4: (it4.parent / TRACKER).write_text("6\n"), CheckpointNotFoundError,
        "{ckpt}/" + TRACKER + " names iteration 6 but {ckpt}/iteration_00000006 does not exist; committed "
        "iterations: [2, 4]. Edit the tracker to one of them, or set resume_training: true to fall back to the "
        "newest valid one"),
}


def _verify_output(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["verify", str(path)])
    return code, out.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_each_damage_is_refused_by_load_with_the_file_named(ckpt: Path, case: str) -> None:
    damage, kind, message = CASES[case]
    it4 = ckpt / "iteration_00000004"
    meta = resumable.formats.v2.read_metadata(it4)
    recorded, common = meta.files[MODEL].xxh3_64, meta.common
    damage(it4)
    digest = resumable.formats.v2._xxh3_of(it4 / MODEL) if (it4 / MODEL).exists() else ""
    state = _state()
    with pytest.raises(kind) as info:
        resumable.load(state, ckpt, verify="checksum")
    assert str(info.value) == message.format(it4=it4, ckpt=ckpt, digest=digest, recorded=recorded, common=common)
    if case not in ("missing common.json", "garbled common.json"):  # found before any tensor is touched
        assert torch.equal(state["model"]["w"], torch.zeros(64))


@pytest.mark.parametrize("case", list(CASES))
def test_resumable_verify_reports_each_damage_and_exits_1(ckpt: Path, case: str) -> None:
    damage, _, _ = CASES[case]
    it4 = ckpt / "iteration_00000004"
    damage(it4)
    code, out = _verify_output(ckpt)
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    assert code == 1 and problems, out
    named = {"missing metadata.json": f"{it4}/metadata.json", "garbled metadata.json": str(it4),
             "missing common.json": f"{it4}/common.json", "garbled common.json": f"{it4}/common.json",
             "garbage tracker": f"{ckpt}/{TRACKER}", "tracker naming a missing iteration": f"{ckpt}/{TRACKER}"}
    assert problems[-1].startswith(f"PROBLEM {named.get(case, f'{it4}/{MODEL}')}:"), out
    assert out.splitlines()[-1].startswith(f"{ckpt}: {len(problems)} problem(s) found")


@pytest.mark.parametrize("case", [c for c in CASES if "common.json" not in c and c != "flipped byte in tensor data"])
def test_resolution_with_fallback_skips_to_the_newest_valid_iteration_and_says_why(ckpt: Path, case: str,
                                                                                     caplog) -> None:
    # Resolution checks names, metadata and sizes; checksums and common.json are checked by the
    # load, and the trainer falls back past those too (test_train_resume_skips_* below).
    CASES[case][0](ckpt / "iteration_00000004")
    with caplog.at_level(logging.WARNING, logger="resumable.resolve"):
        r = resolve_checkpoint(ckpt, fallback=True)
    # A damaged tracker damages no iteration: the newest (4) is still whole.
    newest_valid = ckpt / ("iteration_00000004" if "tracker" in case else "iteration_00000002")
    assert r.path == newest_valid
    assert "resume_training: skipped " in caplog.text and f"loading {newest_valid} instead" in caplog.text


def test_nothing_valid_left_is_an_error_listing_every_skipped_iteration(ckpt: Path) -> None:
    _truncate(ckpt / "iteration_00000004" / MODEL)
    (ckpt / "iteration_00000002" / MODEL).unlink()
    with pytest.raises(CorruptCheckpointError) as info:
        resolve_checkpoint(ckpt, fallback=True)
    it2, it4 = ckpt / "iteration_00000002", ckpt / "iteration_00000004"
    assert str(info.value) == (
        f"{ckpt}: no committed and valid iteration to resume from; skipped: iteration_00000004 named by {TRACKER} "
        f"({it4}/{MODEL}: 678 bytes on disk, files.json records 688; the file is truncated or was replaced: "
        f"restore it or load another iteration); iteration_00000002 ({it2}/{MODEL}: missing; files.json lists "
        "it with 688 bytes. The checkpoint is incomplete: restore the file or load another iteration). Restore a "
        "checkpoint or clear load_checkpoint to start fresh")


# ----------------------------------------------------------------------------- real jobs
# The three scenarios below run side by side (start_bodies); each test waits for its own.

TINY = ["model.num_hidden_layers=2", "train_dataset.seq_length=32", "parallel_config.data_parallel=1",
        "parallel_config.model_parallel=1", "callbacks.0.save_checkpoint_steps=2"]


def _train(out: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [x for kv in [*TINY, f"output_dir={out}", f"load_checkpoint={out / 'checkpoint'}", "resume_training=true",
                         *sets] for x in ("--set", kv)]
    return subprocess.run([sys.executable, "-m", "resumable.train", *args], capture_output=True, text=True,
                          timeout=300)


def _train_resume_skips_a_flipped_byte_and_a_missing_common_json_with_a_warning(tmp_path: Path) -> None:
    first = _train(tmp_path, "runner_config.stop_step=6")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "checkpoint"
    it6, it4 = ckpt / "iteration_00000006", ckpt / "iteration_00000004"
    _flip_data_byte(it6 / MODEL)             # only a checksum can see this one
    (it4 / "common.json").unlink()
    # Named explicitly, a damaged iteration is an error, never a silent fallback.
    named = _train(tmp_path, "runner_config.stop_step=8", f"load_checkpoint={it6}")
    assert named.returncode != 0
    assert f"{it6}/{MODEL}: xxh3-64 checksum " in named.stderr and "skipped" not in named.stderr
    # Automatic recovery (the checkpoint folder, resume_training: true) skips both, saying why,
    # then refuses to train on from 2 over the damaged 4 and 6 (the user may repair them).
    refused = _train(tmp_path, "runner_config.stop_step=8")
    assert refused.returncode != 0
    log = refused.stderr
    assert f"resume_training: skipped iteration_00000006 ({it6}/{MODEL}: xxh3-64 checksum " in log
    assert (f"iteration_00000004 ({it4}/common.json: missing; it holds the training context (step, data position) "
            f"of the iteration: restore it or load another iteration); loading {ckpt / 'iteration_00000002'} "
            "instead") in log
    assert (f"error: {ckpt} holds 2 iteration(s) newer than step 2 this job starts from: iteration_00000004, "
            "iteration_00000006. Training on would write over them (and retention could delete them). This resume "
            f"skipped: iteration_00000006 ({it6}/{MODEL}: xxh3-64 checksum ") in log
    assert "to discard them, set callbacks.0.discard_newer_checkpoints: true" in log
    assert _tracked_and_present(ckpt) == (6, [2, 4, 6])  # nothing was written or deleted
    # Told to discard them, the same resume trains on from 2.
    again = _train(tmp_path, "runner_config.stop_step=8", "callbacks.0.discard_newer_checkpoints=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"discard_newer_checkpoints: deleted {it6} (newer than step 2 this job starts from)" in again.stderr
    assert f"resumed from {ckpt / 'iteration_00000002'} at global step 2" in again.stderr
    assert _tracked_and_present(ckpt) == (8, [2, 4, 6, 8])


def _tracked_and_present(ckpt: Path) -> tuple[int | None, list[int]]:
    return resumable.commit.read_tracker(ckpt), resumable.commit.iterations_after(ckpt, -1)


def _a_damaged_legacy_tree_is_named_by_train_and_verify(tmp_path: Path) -> None:
    first = _train(tmp_path, "runner_config.stop_step=4", "use_legacy_format=true")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "checkpoint" / "rank_0" / "CKP_rank_0-1_4.safetensors"
    _truncate(newest)
    # The resume falls back past the torn step (meta.json records its size), then refuses to bury it.
    again = _train(tmp_path, "runner_config.stop_step=6", "use_legacy_format=true")
    assert again.returncode != 0
    assert f"skipping epoch 1 step 4 of {tmp_path / 'checkpoint'}: {newest}: " in again.stderr
    assert "holds 1 step(s) newer than epoch 1 step 2 this job starts from: epoch 1 step 4" in again.stderr
    code, out = _verify_output(tmp_path / "checkpoint")
    assert code == 1 and out.splitlines()[0].startswith(f"PROBLEM {newest}: "), out
    assert "bytes on disk, meta.json records" in out.splitlines()[0]
    shutil.rmtree(tmp_path / "checkpoint")


def _flip_first(path: Path, text: str) -> None:
    """Flip the lowest bit of the first byte of ``text`` in ``path`` (still valid JSON: 'm' -> 'l', 'g' -> 'f')."""
    data = bytearray(path.read_bytes())
    data[data.index(text.encode())] ^= 0x01
    path.write_bytes(bytes(data))


def _train_resume_falls_back_past_a_flipped_bit_in_metadata_json_and_in_common_json(tmp_path: Path) -> None:
    first = _train(tmp_path, "runner_config.stop_step=6")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "checkpoint"
    it6, it4 = ckpt / "iteration_00000006", ckpt / "iteration_00000004"
    _flip_first(it6 / "metadata.json", "model.")        # a tensor name: 'lodel.': damage, not a mismatch
    _flip_first(it4 / "common.json", '"global_step"'[1:])  # 'flobal_step': the step would read as missing
    again = _train(tmp_path, "runner_config.stop_step=8", "callbacks.0.discard_newer_checkpoints=true")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr
    assert f"resume_training: skipped iteration_00000006 named by {TRACKER} ({it6}/metadata.json: its seal " in log
    assert f"iteration_00000004 ({it4}/common.json: " in log and "bytes with xxh3-64 " in log
    assert f"resumed from {ckpt / 'iteration_00000002'} at global step 2" in log
    assert "architecture" not in log and "does not match checkpoint" not in log


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    yield from start_bodies(request, tmp_path_factory)


def test_train_resume_skips_a_flipped_byte_and_a_missing_common_json_with_a_warning(started, request) -> None:
    started[request.node.name].result()


def test_a_damaged_legacy_tree_is_named_by_train_and_verify(started, request) -> None:
    started[request.node.name].result()


def test_train_resume_falls_back_past_a_flipped_bit_in_metadata_json_and_in_common_json(started, request) -> None:
    started[request.node.name].result()
