"""What ``resumable train`` prints when a user gets something wrong or presses Ctrl-C: one line, once
for the whole job, and the documented exit status (2 for a configuration mistake, 128 + n for a stop).

The layout mistakes are found before torchrun starts (in-process calls: the CLI's code, no
launch); the others are real ``resumable train`` jobs on two processes."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from resumable import cli
from resumable.commit import read_tracker
from resumable.proctree import kill_tree
from resumable.train.config import load_config
from tests.e2e.jobs import _env, run_job, train_cmd

# Rank 0's log lines (steps, commits) come and go with timing; every other line is asserted.
LOG_LINE = re.compile(r"\[rank 0\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not LOG_LINE.match(line)]


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2"], "parallel_config.data_parallel (2) x parallel_config.model_parallel (2) x "
                       "parallel_config.pipeline_stage (1) = 4, but the job has 2 processes (--nproc 2); make the "
                       "product equal the world size"),
    (["--set", "parallel_config.model_parallel=3", "--set", "parallel_config.data_parallel=1"],
     "model.num_attention_heads (4) must be divisible by parallel_config.model_parallel (3): tensor parallelism "
     "splits attention heads across ranks"),
])
def test_a_layout_mistake_is_one_line_before_any_process_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert cli.main(["train", *argv, "--set", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"resumable train: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_configuration_error_every_rank_finds_is_printed_once_with_exit_2(tmp_path: Path) -> None:
    # Only a rank can tell: the data must be read to see its largest token id.
    done = run_job(train_cmd(tmp_path, "parallel_config.data_parallel=2", "model.vocab_size=64", nproc=2),
                   expect_ok=False)
    assert (done.returncode, done.stderr) == (2, (
        "resumable train: launching torchrun with 2 processes\n"
        "resumable train: error: model.vocab_size (64) is too small for train_dataset.path embedded: it holds "
        "token id 121; set model.vocab_size to at least 122\n")), done.stderr


def test_ctrl_c_prints_one_line_naming_the_newest_checkpoint_and_the_command_that_resumes_from_it(
        tmp_path: Path) -> None:
    out = tmp_path / "job"
    checkpoint = out / "checkpoint"
    cmd = train_cmd(out, "parallel_config.data_parallel=2", "runner_config.epochs=100000",
                    "callbacks.0.save_checkpoint_steps=2", nproc=2)
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while (read_tracker(checkpoint) or 0) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
            job.wait()
    newest = read_tracker(checkpoint)
    assert job.returncode == 130 and newest is not None, stderr
    resume = shlex.join(["resumable", "train", *cmd[4:], "--set", f"load_checkpoint={checkpoint}",
                         "--set", "resume_training=true"])
    assert _messages(stderr) == [
        "resumable train: launching torchrun with 2 processes",
        f"resumable train: training stopped by SIGINT; the newest checkpoint is iteration {newest} "
        f"({checkpoint / f'iteration_{newest:08d}'}); resume with: {resume}"], stderr
    # The command printed is the run's own with the resume keys test_stop_signals resumes with.
    args = cli.build_parser().parse_args(shlex.split(resume)[1:])
    cfg = load_config(args.config, args.set)
    assert (args.nproc, cfg.load_checkpoint, cfg.resume_training) == (2, str(checkpoint), True)
