"""``resumable train`` with its checkpoints in a real S3 server (moto on 127.0.0.1): the resume scenarios,
SIGKILL during an upload and at each step of the commit, and a second job on the same prefix.

The common case is tested: logs local (``output_dir``), checkpoints in the bucket
(``callbacks.0.directory=s3://...``); one job splits ``output_dir=s3://...`` with
``local_output_dir``. Each test's AWS environment (from the ``s3`` fixtures) is inherited by the
jobs it starts.
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

from resumable import commit, storage
from resumable.proctree import kill_tree
from tests.e2e.jobs import _env, kill_when, log_records, losses, run_job, train_cmd

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4


def _cmd(out: Path, url: str, *extra: str, nproc: int = 0) -> list[str]:
    return train_cmd(out, f"callbacks.0.directory={url}", "resume_training=true", f"runner_config.stop_step={STEPS}",
                     f"callbacks.0.save_checkpoint_steps={EVERY}", "callbacks.0.keep_checkpoint_max=2", *extra,
                     nproc=nproc)


def _iterations(s3, prefix: str) -> list[str]:
    return sorted({k[len(prefix):].split("/")[0] for k in s3.keys(prefix) if k[len(prefix):].startswith("iteration_")})


def _model_bytes(s3, prefix: str, step: int) -> bytes:
    return s3.get(f"{prefix}iteration_{step:08d}/CKP-model-0000000-0000001.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes | dict[int, float]]:
    """An uninterrupted run: its losses and its final model file (its own bucket, torn down with the module)."""
    from tests.s3server import make_client, start_server
    server = start_server()
    client = make_client(server.endpoint)
    client.create_bucket(Bucket="reference")
    out = tmp_path_factory.mktemp("reference")
    import os
    env = {**os.environ, **server.env}
    run_job(_cmd(out, "s3://reference/ckpt"), env=env)
    body = client.get_object(Bucket="reference",
                             Key=f"ckpt/iteration_{STEPS:08d}/CKP-model-0000000-0000001.safetensors")["Body"].read()
    server.stop()
    return {"losses": losses(out), "model": body}


def test_sigkill_then_the_identical_command_resumes_bit_for_bit_from_the_bucket(tmp_path, s3, reference) -> None:
    out, url = tmp_path / "job", s3.url("ckpt")
    cmd = _cmd(out, url, "callbacks.0.async_save=true")
    kill_when(cmd, lambda: (log_records(out) or [{}])[-1].get("global_step", 0) >= EVERY + 2
               and (commit.read_tracker(url) or 0) >= EVERY)
    resumed_from = commit.read_tracker(url)
    assert resumed_from is not None and resumed_from >= EVERY
    done = run_job(cmd)
    assert f"resumed from {url}/iteration_{resumed_from:08d}" in done.stderr
    got, ref = losses(out), reference["losses"]
    assert [got[s] for s in range(resumed_from + 1, STEPS + 1)] == [ref[s] for s in range(resumed_from + 1, STEPS + 1)]
    assert _model_bytes(s3, "ckpt/", STEPS) == reference["model"]  # the same weights, byte for byte
    # keep_checkpoint_max=2, and the iteration this run resumed from is never deleted by it
    kept = [f"iteration_{n:08d}" for n in sorted({resumed_from, STEPS - EVERY, STEPS})]
    assert _iterations(s3, "ckpt/") == kept


def test_output_dir_on_s3_keeps_the_logs_local_and_resumes_on_another_layout(tmp_path, s3, reference) -> None:
    logs, url = tmp_path / "logs", s3.url("run")
    # output_dir=<url> comes after train_cmd's own output_dir: the later --set wins
    first = train_cmd(logs, f"output_dir={url}", f"local_output_dir={logs}", f"runner_config.stop_step={EVERY}",
                      f"callbacks.0.save_checkpoint_steps={EVERY}")
    run_job(first)
    assert (logs / "log" / "train.jsonl").is_file() and commit.read_tracker(url + "/checkpoint") == EVERY
    assert not any(k.startswith("run/log") for k in s3.keys())  # logs stay local
    # Two processes, TP2, resume from the bucket: the first step's loss is the uninterrupted run's.
    second = train_cmd(logs, f"output_dir={url}", f"local_output_dir={logs}", "resume_training=true",
                       f"runner_config.stop_step={EVERY + 1}", "parallel_config.model_parallel=2", nproc=2)
    done = run_job(second)
    assert f"at global step {EVERY}" in done.stderr
    assert math.isclose(losses(logs)[EVERY + 1], reference["losses"][EVERY + 1], rel_tol=1e-5)


def test_automatic_recovery_and_a_hand_edited_tracker_in_the_bucket(tmp_path, s3) -> None:
    out, url = tmp_path / "job", s3.url("auto")
    assert "fresh start" in run_job(_cmd(out, url)).stderr
    assert commit.read_tracker(url) == STEPS
    commit.write_tracker(url, STEPS - EVERY)  # the user picks an older iteration
    refused = run_job(_cmd(out, url, f"runner_config.stop_step={STEPS + 2}"), expect_ok=False)
    assert f"{url} holds 1 iteration(s) newer than step {STEPS - EVERY}" in refused.stderr
    again = run_job(_cmd(out, url, f"runner_config.stop_step={STEPS + 2}", "callbacks.0.discard_newer_checkpoints=true"))
    assert f"resumed from {url}/iteration_{STEPS - EVERY:08d} at global step {STEPS - EVERY}" in again.stderr
    assert commit.read_tracker(url) == STEPS + 2


def test_a_kill_at_each_commit_step_leaves_the_tracker_on_a_complete_iteration(tmp_path, s3, monkeypatch) -> None:
    # One chain: each run is killed at the next point of a save (":2"/":3": after a first commit of
    # its own), the identical command resumes it, and a last, unharmed run finishes.
    out, url = tmp_path / "job", s3.url("crash")
    cmd = _cmd(out, url, "callbacks.0.save_checkpoint_steps=2")
    for fault in ("one-file-written:3", "before-rename:2", "after-rename:2", "after-tracker:2", "retention-renamed:1"):
        monkeypatch.setenv("RESUMABLE_FAULT", fault)
        killed = run_job(cmd, expect_ok=False)
        assert killed.returncode != 0, f"{fault} never fired"
        target = commit.read_tracker(url)
        assert target is not None and commit.is_committed(f"{url}/iteration_{target:08d}"), fault
    monkeypatch.delenv("RESUMABLE_FAULT")
    run_job(cmd)  # the identical command resumes, and its start cleans the leftovers
    assert commit.read_tracker(url) == STEPS
    assert all(commit.is_committed(f"{url}/{name}") for name in _iterations(s3, "crash/"))
    assert s3.multipart_uploads() == []


def test_a_kill_during_a_multipart_upload_is_cleaned_up_by_the_identical_command(tmp_path, s3_faulty,
                                                                                 monkeypatch) -> None:
    # Parts of 5 MiB and a wide model: the opt file is a multipart upload; part 2 keeps failing
    # (the writer retries) until the job is killed with that upload open.
    monkeypatch.setenv("RESUMABLE_S3_PART_MIB", "5")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1000")
    out, url = tmp_path / "job", s3_faulty.url("upload")
    cmd = _cmd(out, url, "model.hidden_size=256", "model.intermediate_size=1024", "model.vocab_size=4096",
               f"runner_config.stop_step={EVERY}")
    s3_faulty.proxy.fail(method="PUT", path_contains="partNumber=2", status=503)
    kill_when(cmd, lambda: s3_faulty.proxy.count(method="PUT", path_contains="partNumber=2") >= 3)
    assert s3_faulty.multipart_uploads() != []  # killed mid-upload
    assert commit.read_tracker(url) is None
    s3_faulty.proxy.heal()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    done = run_job(cmd)
    assert "aborted the unfinished upload" in done.stderr
    assert s3_faulty.multipart_uploads() == [] and commit.read_tracker(url) == EVERY


def test_a_second_job_on_the_same_prefix_is_refused_while_the_first_runs(tmp_path, s3) -> None:
    url = s3.url("busy")
    first_out = tmp_path / "first"
    long = ("runner_config.epochs=100000", "runner_config.stop_step=10000000", "callbacks.0.save_checkpoint_steps=1000")
    first = subprocess.Popen(_cmd(first_out, url, *long),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not storage.exists(storage.as_path(url) / ".lock"):
            assert first.poll() is None and time.monotonic() < deadline, "the first job never took the lease"
            time.sleep(0.05)
        second = run_job(_cmd(tmp_path / "second", url), expect_ok=False)
        assert second.returncode != 0
        assert f"{url} is in use by another job (host " in second.stderr
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.wait()
