"""A shard that is a FIFO or a symlink to ``/dev/zero`` makes every command fail fast, naming it; nothing blocks.

Each command runs as a user runs it (``resumable verify``, ``resumable convert``, a resume
through ``resumable.load``) in a subprocess with a timeout, so that a hang fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resumable

MODEL = "CKP-model-0000000-0000001.safetensors"
ROOT = Path(__file__).parents[2]

_LOAD = """
import sys, torch, resumable
state = {"model": {"w": torch.zeros(8)}}
try:
    resumable.load(state, sys.argv[1], **({} if sys.argv[2] == "default" else {"verify": sys.argv[2]}))
except resumable.errors.CheckpointError as exc:
    print(type(exc).__name__, exc)
    sys.exit(2)
"""


def _commands(folder: Path, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "resumable.cli"]
    return {"verify": cli + ["verify", str(folder)],
            "convert": cli + ["convert", "--to", "unified", "--quiet", str(folder), str(out)],
            "resume": [sys.executable, "-c", _LOAD, str(folder), "checksum"],
            "resume (default verification)": [sys.executable, "-c", _LOAD, str(folder.parent), "default"]}


def _run(command: list[str]) -> tuple[int, str]:
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("make", ["fifo", "dev_zero"])
@pytest.mark.parametrize("command", ["verify", "convert", "resume", "resume (default verification)"])
def test_a_shard_that_is_a_fifo_or_dev_zero_fails_fast_naming_it(tmp_path: Path, make: str, command: str):
    resumable.save({"model": {"w": torch.arange(8.0)}}, tmp_path / "ckpt", 1)
    folder = tmp_path / "ckpt" / "iteration_00000001"
    shard = folder / MODEL
    shard.unlink()
    if make == "fifo":
        os.mkfifo(shard)
    else:
        shard.symlink_to("/dev/zero")
    code, said = _run(_commands(folder, tmp_path / "out")[command])
    assert code != 0, said
    assert MODEL in said, said
    # verify and convert refuse the listing (not a regular file / outside the folder); a load's size check
    # (one stat: a FIFO or /dev/zero has 0 bytes) refuses it before any read.
    assert any(why in said for why in ("is a FIFO (named pipe), not a regular file", "resolves outside the folder",
                                        "0 bytes on disk")), said
    assert "Traceback" not in said, said
    assert not (tmp_path / "out").exists()


def test_a_fifo_named_like_a_legacy_rank_file_fails_verify_fast(tmp_path: Path):
    root = tmp_path / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    os.mkfifo(root / "rank_0" / "q_rank_0-1_1.safetensors")
    code, said = _run([sys.executable, "-m", "resumable.cli", "verify", str(root)])
    assert code != 0
    assert "q_rank_0-1_1.safetensors is a FIFO (named pipe), not a regular file" in said, said


def test_a_fifo_legacy_ckpt_rank_file_fails_convert_fast(tmp_path: Path):
    root = tmp_path / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    os.mkfifo(root / "rank_0" / "q_rank_0-1_1.ckpt")
    code, said = _run([sys.executable, "-m", "resumable.cli", "convert", "--to", "unified", "--quiet", str(root),
                       str(tmp_path / "out")])
    assert code != 0
    assert "q_rank_0-1_1.ckpt is a FIFO (named pipe), not a regular file" in said, said
