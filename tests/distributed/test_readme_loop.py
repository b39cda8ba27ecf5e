"""The README's "your own loop" script, run as README.md runs it: torchrun on two processes, again, then on one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from resumable.formats.safetensors_io import read_header
from tests.readme import Command, block, commands

RUNNER = "run by tests/distributed/test_readme_loop.py"
TIMEOUT_S = 120


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "loop.py").write_text(block("save loop.py").text)
    return path


def _torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "torchrun", argv
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _printed(command: Command, cwd: Path) -> list[str]:
    done = _torchrun(command.argv, cwd)
    assert done.returncode == 0, f"{' '.join(command.argv)} exited {done.returncode}:\n{done.stderr}"
    for said in command.said:
        assert said in done.stdout, f"{' '.join(command.argv)} did not print {said!r}:\n{done.stdout}"
    return done.stdout.splitlines()


def test_the_readme_loop_resumes_bit_for_bit_and_on_another_world_size(tmp_path):
    first, again, alone = commands(block(RUNNER).text)
    whole = _printed(Command(again.argv, said=[]), _folder(tmp_path / "whole"))  # in a new folder: uninterrupted
    parts = _folder(tmp_path / "parts")
    assert _printed(first, parts) == whole[:3]
    assert _printed(again, parts) == ["resumed from step 3 (sample 24)", *whole[3:]]  # same losses, bit for bit
    resharded = _printed(alone, parts)
    assert [line.split(" loss ")[0] for line in resharded] == ["resumed from step 6 (sample 48)", "step 7", "step 8"]

    # One flipped byte in the checkpoint the next start would load: every start stops, naming it.
    victim = parts / "out" / "checkpoint" / "iteration_00000008" / "CKP-model-0000000-0000001.safetensors"
    key, entry = max(read_header(victim).tensors.items(), key=lambda kv: kv[1].end - kv[1].start)
    data = bytearray(victim.read_bytes())
    data[entry.start + 5] ^= 0x40  # an exponent bit: the loss would go to inf
    victim.write_bytes(bytes(data))
    failed = _torchrun([*alone.argv[:-1], "10"], parts)
    assert failed.returncode == 1
    assert f"CorruptCheckpointError: {victim.relative_to(parts)}: tensor {key!r}, bytes {entry.start}-{entry.end}: " \
           "xxh3-64 " in failed.stderr
