"""Numbers for every save and load (``resumable.events``) and ``resumable list``.

Real saves and loads through CheckpointManager in one process (no process group): the
JSON-lines events, the callback, the console line; then ``resumable list`` on the folder,
plain and ``--json``, with a damaged file only ``--verify`` sees, a save that never
committed, and the tracker's mark.
"""

from __future__ import annotations

import json
import logging
import re

import torch

from resumable import CheckpointManager, load
from resumable.cli import main as cli
from resumable.events import summary

STATE_BYTES = 256 * 64 * 4
SAVE_PHASES = {"sync": ["plan", "write", "commit"], "async": ["plan", "stage", "write", "commit"]}
NUMBER = r"\d+\.\d\d"


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((256, 64), float(step))}, "global_step": step}


def _check(event: dict, kind: str, mode: str, iteration: int, phases: list[str]) -> None:
    bytes_key = "bytes" if kind == "save" else "bytes_rank0"
    assert sorted(event) == sorted(["kind", "iteration", "mode", "ranks", bytes_key, "seconds", "total_s",
                                    "blocked_s", "gib_per_s", "path", "time"])
    assert (event["kind"], event["mode"], event["iteration"], event["ranks"]) == (kind, mode, iteration, 1)
    assert list(event["seconds"]) == phases and all(isinstance(v, float) and v >= 0 for v in event["seconds"].values())
    assert sum(event["seconds"].values()) <= event["total_s"] + 1e-5  # rounding to microseconds
    assert 0 < event["blocked_s"] <= event["total_s"] + 1e-6 and event["gib_per_s"] > 0
    # A save's files hold the tensor and their headers; a load reads the tensor's bytes.
    assert (event[bytes_key] > STATE_BYTES) if kind == "save" else (event[bytes_key] == STATE_BYTES)


def test_saves_and_loads_write_events_and_console_lines_and_list_shows_them(tmp_path, caplog, capsys):
    ckpt, events_path, seen = tmp_path / "checkpoint", tmp_path / "log" / "checkpoints.jsonl", []
    caplog.set_level(logging.INFO, logger="resumable.events")
    mgr = CheckpointManager(ckpt, keep_checkpoint_max=None, events_path=events_path, on_event=seen.append)
    for step in (1, 2):
        mgr.save(_state(step), step)
    target = _state(0)
    result = load(target, ckpt)
    mgr.record_load(result)
    mgr.close()
    with CheckpointManager(ckpt, keep_checkpoint_max=None, async_save=True, events_path=events_path) as amgr:
        amgr.save(_state(3), 3)

    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    assert events[:3] == seen
    for event, (kind, mode, n) in zip(events, [("save", "sync", 1), ("save", "sync", 2), ("load", "sync", 2),
                                               ("save", "async", 3)], strict=True):
        _check(event, kind, mode, n, SAVE_PHASES[mode] if kind == "save" else ["plan", "read"])
    assert events[0]["blocked_s"] == events[0]["total_s"] and events[3]["blocked_s"] < events[3]["total_s"]
    assert events[2]["path"] == str(ckpt / "iteration_00000002")

    lines = [r.getMessage() for r in caplog.records if r.name == "resumable.events"]
    phases = {k: ", ".join(f"{p} {NUMBER}" for p in v) for k, v in SAVE_PHASES.items()}
    patterns = [rf"saved iteration 1: 0\.1 MB in {NUMBER} s \({phases['sync']}; {NUMBER} GiB/s\), "
                rf"training blocked {NUMBER} s",
                rf"saved iteration 2: 0\.1 MB in {NUMBER} s \({phases['sync']}; {NUMBER} GiB/s\), "
                rf"training blocked {NUMBER} s",
                rf"loaded iteration 2: 0\.1 MB \(rank 0\) in {NUMBER} s \(plan {NUMBER}, read {NUMBER}; "
                rf"{NUMBER} GiB/s\), training blocked {NUMBER} s",
                rf"saved async iteration 3: 0\.1 MB in {NUMBER} s \({phases['async']}; {NUMBER} GiB/s\), "
                rf"training blocked {NUMBER} s"]
    assert len(lines) == len(patterns) and all(re.fullmatch(p, line) for p, line in zip(patterns, lines)), lines
    assert summary({"kind": "save", "iteration": 20, "mode": "sync", "bytes": 4_600_000,
                    "seconds": {"plan": 0.01, "stage": 0.02, "write": 0.15, "commit": 0.03}, "total_s": 0.21,
                    "blocked_s": 0.05, "gib_per_s": 0.0204}) == (
        "saved iteration 20: 4.6 MB in 0.21 s (plan 0.01, stage 0.02, write 0.15, commit 0.03; 0.02 GiB/s), "
        "training blocked 0.05 s")

    # resumable list: flip one tensor byte of iteration 2 (sizes intact) and leave a save that never committed.
    shard = next((ckpt / "iteration_00000002").glob("*model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpt / ".tmp-iteration_00000004").mkdir()
    row = r"{:>10}  {:<9}  {:<17}  +\d+\.\d MB  +\d+ s{}"
    assert cli(["list", str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{'step':>10}  committed  valid (sizes)            size        age  tracker"
    expected = [(1, "yes", "yes", ""), (2, "yes", "yes", ""), (3, "yes", "yes", "  <- latest"), (4, "no", "-", "")]
    assert len(out) == 5 and all(re.fullmatch(row.format(*e), line) for e, line in zip(expected, out[1:])), out

    assert cli(["list", str(ckpt), "--verify"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(row.format(2, "yes", "NO", ""), out[2]), out
    assert out[5:] == [f"PROBLEM step 2: {shard}: xxh3-64 checksum {out[5].split('checksum ')[1][:16]} differs "
                       f"from {out[5].split('differs from ')[1][:16]} recorded in files.json; the file is damaged: "
                       "restore it or load another iteration"]

    assert cli(["list", str(ckpt), "--json", "--verify"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["path"], report["checked"], report["tracker_problem"]) == (str(ckpt), "checksums", None)
    rows = report["iterations"]
    assert [(r["iteration"], r["committed"], r["valid"], r["tracked"]) for r in rows] == [
        (1, True, True, False), (2, True, False, False), (3, True, True, True), (4, False, None, False)]
    assert rows[1]["problem"] == out[5].removeprefix("PROBLEM step 2: ")
    assert rows[0]["bytes"] > STATE_BYTES and rows[3]["bytes"] == 0 and all(r["age_s"] >= 0 for r in rows)
    assert rows[0]["folder"] == str(ckpt / "iteration_00000001") and rows[0]["kept_by"] is None

    # Given the job's retention policy: what keeps each committed iteration.
    assert cli(["list", str(ckpt), "--json", "--keep-max", "1", "--keep-every", "2"]) == 0
    assert [r["kept_by"] for r in json.loads(capsys.readouterr().out)["iterations"]] == [
        [], ["every_n_steps"], ["newest", "tracker"], None]
    assert cli(["list", str(ckpt), "--keep-max", "1", "--keep-every", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("  tracker    kept by")
    kept = r"{:>10}  yes        yes                +\d+\.\d MB  +\d+ s  {:<9}  {}"
    assert [re.fullmatch(kept.format(*e), line) is not None for e, line in zip(
        [(1, "", "nothing: the next save deletes it"), (2, "", "every_n_steps"),
         (3, "<- latest", "newest, tracker")], out[1:4])] == [True] * 3, out
    assert re.fullmatch(row.format(4, "no", "-", ""), out[4]), out


def test_list_refuses_what_is_not_a_checkpoint_folder(tmp_path, capsys):
    (tmp_path / "iteration_00000005").mkdir()
    (tmp_path / "rank_0").mkdir()
    assert cli(["list", str(tmp_path / "missing")]) == 2
    assert cli(["list", str(tmp_path / "iteration_00000005")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resumable list: error: {tmp_path / 'missing'}: no such folder; give a checkpoint folder "
        "(<output_dir>/checkpoint, holding iteration_* folders)",
        f"resumable list: error: {tmp_path / 'iteration_00000005'} is one iteration; list the checkpoint folder "
        f"holding it: resumable list {tmp_path}"]
    # A folder of rank_* folders is a legacy tree (tests/e2e/test_legacy_list.py); this one holds no file yet.
    assert cli(["list", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{tmp_path}: no checkpoints (iteration_* folders, or rank_*/ files of a legacy tree)"]
