"""Every way a script ends keeps its last asynchronous save: returning from main, ``sys.exit``,
an uncaught exception. Each case is a real Python process that starts an async save and
exits at once; the checkpoint must be committed and verify (or, when the save truly
fails, the process must exit non-zero and say why)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from resumable import commit
from resumable.resolve import verify_files
from tests.e2e.test_disk_full import small_disk  # noqa: F401  (fixture: a 2 MiB tmpfs)

# The save is several MB, so the writer is still busy when the script ends.
SCRIPT = """
import sys, torch, resumable
from resumable import CheckpointManager

def main(directory, how, api):
    state = {{"model": {{"w": torch.randn({numel})}}, "global_step": 1}}
    if api == "manager":  # a local manager, dropped when main returns
        CheckpointManager(directory, async_save=True).save(state, 1)
    else:
        resumable.async_save(state, directory, 1)
    if how == "exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("the script failed after starting a save")

main(*sys.argv[1:])
"""


def _run_script(directory: Path, how: str, api: str, numel: int = 2_000_000) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(numel=numel), str(directory), how, api],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("api", ["async_save", "manager"])
@pytest.mark.parametrize("how, status", [("return", 0), ("exit", 0), ("raise", 1)])
def test_a_script_that_ends_during_an_async_save_commits_it(tmp_path: Path, how: str, status: int, api: str) -> None:
    directory = tmp_path / "ckpt"
    done = _run_script(directory, how, api)
    assert done.returncode == status, done.stderr
    assert "SaveError" not in done.stderr and "cannot schedule new futures" not in done.stderr
    assert commit.read_tracker(directory) == 1
    verify_files(directory / "iteration_00000001", checksum=True)


def test_an_async_save_that_fails_at_exit_makes_the_process_exit_1_and_says_why(
        small_disk: Path) -> None:  # noqa: F811
    directory = small_disk / "ckpt"
    done = _run_script(directory, "return", "async_save", numel=1_000_000)  # 4 MB on a 2 MiB disk
    assert done.returncode == 1, done.stderr
    temp_file = directory / ".tmp-iteration_00000001" / "CKP-model-0000000-0000001.safetensors"
    assert ("an asynchronous checkpoint save still running at exit failed (the process exits with status 1): "
            f"saving {directory / 'iteration_00000001'} failed on 1 rank(s), nothing was committed: rank 0: "
            f"{temp_file}: no space left on the device: free space on that file system (or write to another one) and run again") in done.stderr
    assert commit.read_tracker(directory) is None
    assert not (directory / "iteration_00000001").exists()
