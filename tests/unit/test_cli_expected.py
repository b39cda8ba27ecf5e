"""The command line people expect: --version, exit codes in every --help, --json, inspect --summary, diff of
the training context with tolerances, merge's message, progress bars only on a terminal, one line on
Ctrl-C, and a --help that imports no torch."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resumable.cli import main
from resumable.save import save
from resumable.tools import progress_bar

USAGE = "a usage or configuration error: the message names the path or key and what to do"
EXIT_STATUS = {
    "": ["  0      success",
         '  1      a "no" (verify found problems, diff found differences), a damaged checkpoint, or a failed run',
         f"  2      {USAGE}",
         "  128+n  stopped by signal n: train (130 Ctrl-C, 143 SIGTERM) after finishing its save in flight; merge, "
         "split and convert (130 Ctrl-C) leaving no partial output"],
    "train": ["  0      success", "  1      the run failed (the message says why, once)", f"  2      {USAGE}",
              "  128+n  stopped by signal n (130 Ctrl-C, 143 SIGTERM) after finishing the save in flight; the last "
              "line names the newest checkpoint and the command to resume"],
    "inspect": ["  0  success", "  1  the checkpoint is damaged (the message names the file)", f"  2  {USAGE}"],
    "verify": ["  0  success", "  1  problems found: one PROBLEM line each, naming the file", f"  2  {USAGE}"],
    "diff": ["  0  success", "  1  the checkpoints differ (a tensor beyond --atol/--rtol, or a context key), or one "
             "of them is damaged", f"  2  {USAGE}"],
    **{writer: ["  0    success", "  1    the source is damaged (the message names the file); nothing is written",
                f"  2    {USAGE}",
                "  130  interrupted (Ctrl-C): no partial output is left; run the command again"]
       for writer in ("merge", "split", "convert")},
}


def _state(step: int = 2, position: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(4, 6, generator=g)},
            "optimizer": {"state": {"w": {"exp_avg": torch.zeros(4, 6)}}, "param_groups": [{"lr": 0.1}]},
            "global_step": step, "lr_schedule": {"last_lr": 0.1}, "data": {"epoch": 0, "position": position}}


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert (done.value.code, capsys.readouterr().out) == (0, f"resumable {importlib.metadata.version('resumable')}\n")


@pytest.mark.parametrize("command", list(EXIT_STATUS))
def test_every_help_ends_with_what_each_exit_status_means(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping
    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.endswith("\n\n" + "\n".join(["exit status:", *EXIT_STATUS[command]]) + "\n")


def test_building_every_parser_imports_no_torch():
    """`resumable --help` answers in well under a second: no torch (over a second alone), numpy or pydantic."""
    code = ("import sys, resumable.cli as cli; parser = cli.build_parser(); "
            "[p.format_help() for p in [parser, *parser._subparsers._group_actions[0].choices.values()]]; "
            "print(sorted(m for m in ('torch', 'numpy', 'pydantic', 'safetensors', 'yaml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")


def test_inspect_summary_is_one_screen_with_counts_and_bytes_by_kind(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save(_state(2), ckpt, 1)
    save(_state(3), ckpt, 2)
    (ckpt / "iteration_00000003").mkdir()  # a save that never finished
    assert main(["inspect", str(ckpt), "--summary"]) == 0
    disk = sum(p.stat().st_size for p in (ckpt / "iteration_00000002").iterdir())
    assert capsys.readouterr().out.splitlines() == [
        f"{ckpt}: v2 checkpoint",
        "iterations (3): 1, 2, 3 (incomplete); latest: 2; tracker: 2",
        f"selected: {ckpt / 'iteration_00000002'}",
        "layout: world size 1, mesh None, 1 pipeline stage(s), 1 writer(s)",
        "context: iteration 2, global_step 3",
        f"tensors: 1 model (96 B), 1 optimizer (96 B); 2 tensors, 192 B; 5 files, {disk / 1024:.1f} KB on disk"]
    assert main(["inspect", str(ckpt), "--summary", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "tensors" not in report and "files" not in report
    assert (report["kinds"], report["disk"], report["latest"]) == (
        {"model": {"tensors": 1, "bytes": 96}, "opt": {"tensors": 1, "bytes": 96}}, {"files": 5, "bytes": disk}, 2)


def test_verify_json_says_ok_or_lists_each_problem(tmp_path, capsys):
    folder = save(_state(), tmp_path / "ckpt", 1)
    what = "sizes, whole-file xxh3-64 and per-block checksums; metadata.json and common.json seals"
    assert main(["verify", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(folder), "ok": True, "files_checked": 2,
                                                   "checked": what, "problems": []}
    shard = folder / "CKP-model-0000000-0000001.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    assert main(["verify", str(folder), "--json", "--no-checksum"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], [p["where"] for p in report["problems"]]) == (False, [str(shard)])
    assert report["problems"][0]["message"].endswith("the file is truncated or was replaced: restore it or load "
                                                     "another iteration")


def test_diff_names_each_context_key_that_differs_and_takes_tolerances(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    save(_state(2, position=8), a, 2)
    moved = _state(3, position=16)
    moved["model"]["w"][1, 2] += 1e-4
    save(moved, b, 2)
    near = _state(2, position=8)
    near["model"]["w"][1, 2] += 1e-4
    save(near, c, 2)
    w, w2 = float(_state()["model"]["w"][1, 2]), float(moved["model"]["w"][1, 2])
    gap = f"max abs diff {w2 - w:.6g} at [1, 2] (A {w:.6g}, B {w2:.6g})"
    assert main(["diff", str(a), str(b)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"different        w  {gap}",
        "context          data.position: A 8, B 16",
        "context          global_step: A 2, B 3",
        f"A={a} B={b}: 1 different, 1 equal; context: 2 of 5 keys differ"]
    assert main(["diff", str(a), str(c), "--atol", "1e-3"]) == 0  # the same context, w within tolerance
    assert capsys.readouterr().out.splitlines() == [
        f"within tolerance w  {gap}",
        f"A={a} B={c}: 1 equal, 1 within tolerance (atol 0.001, rtol 0); context equal (5 keys)"]
    assert main(["diff", str(a), str(c), "--rtol", "1e-9"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"A={a} B={c}: 1 different, 1 equal (atol 0, rtol 1e-09); context equal (5 keys)")
    assert main(["diff", str(a), str(b), "--json", "--atol", "1e-3"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["same"], report["counts"], report["context"]["differences"]) == (
        False, {"equal": 1, "within tolerance": 1}, [
            {"key": "data.position", "status": "different", "a": 8, "b": 16},
            {"key": "global_step", "status": "different", "a": 2, "b": 3}])


def test_diff_against_a_folder_without_training_context_says_so(tmp_path, capsys):
    a, hf = tmp_path / "a", tmp_path / "hf"
    save(_state(), a, 2)
    hf.mkdir()
    save_file({"w": _state()["model"]["w"]}, str(hf / "model.safetensors"))
    assert main(["diff", str(a), str(hf)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "missing in B     optimizer.state.w.exp_avg  (float32 [4, 6])",
        "context          B records no training context (a hf checkpoint); --model-only compares the weights alone",
        f"A={a} B={hf}: 1 equal, 1 missing in B; context: B records none"]
    assert main(["diff", str(a), str(hf), "--model-only"]) == 0
    assert capsys.readouterr().out == f"A={a} B={hf}: 1 equal\n"
    assert main(["diff", str(hf), str(hf)]) == 0
    assert capsys.readouterr().out == f"A={hf} B={hf}: 1 equal; no training context on either side\n"
    with pytest.raises(SystemExit) as done:
        main(["diff", str(a), str(hf), "--atol", "-1"])
    assert done.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument --atol: '-1': expected a number >= 0, such as 1e-6\n")


def test_merge_says_what_it_wrote_and_shows_no_progress_bar_in_a_captured_log(tmp_path, capsys):
    save(_state(), tmp_path / "ckpt", 2)
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "unified")]) == 0  # no --quiet
    assert capsys.readouterr() == (
        f"wrote {tmp_path / 'unified'}: the full training state (1 model tensors, 1 optimizer tensors, the training "
        f"context in common.json); for a HuggingFace model folder run: resumable convert {tmp_path / 'ckpt'} OUT "
        "--to hf\n", "")


def test_on_a_terminal_the_bar_is_shown_and_log_lines_clear_it_first(tmp_path, monkeypatch, capsys):
    save(_state(), tmp_path / "ckpt", 2)
    master, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    with os.fdopen(replica, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "unified")]) == 0
        with progress_bar(10, "writing x", True) as bar:
            bar.update(5)
            logging.getLogger("resumable.sources").info("a note")  # the handler main installed
        terminal.flush()
        os.set_blocking(master, False)
        chunks = []
        while True:
            try:
                chunks.append(os.read(master, 1 << 16))
            except BlockingIOError:
                break
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "writing unified: 100%" in shown
    assert "\ra note\r\n" in shown  # the bar cleared (carriage return), the note on a line of its own
    capsys.readouterr()


def _sparse_safetensors(path: Path, count: int, numel: int) -> None:
    """A safetensors file of ``count`` float32 tensors of zeros, as holes: no disk space, no write time."""
    header = {f"t{i:02d}": {"dtype": "F32", "shape": [numel], "data_offsets": [i * numel * 4, (i + 1) * numel * 4]}
              for i in range(count)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + count * numel * 4)


def test_ctrl_c_in_merge_and_split_prints_one_line_and_leaves_no_partial_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _sparse_safetensors(src / "model.safetensors", 256, 2 << 20)  # 2 GiB to write: seconds
    jobs = {}
    for command, extra in (("merge", []), ("split", ["--layout", "dp=1"])):  # at once: one start-up's time
        out = tmp_path / command
        jobs[command] = out, subprocess.Popen([sys.executable, "-m", "resumable.cli", command, str(src), str(out),
                                               *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for command, (out, proc) in jobs.items():
        temp = tmp_path if command == "merge" else out  # merge's .merge.tmp-*, split's .tmp-iteration_*
        while not [p for p in temp.glob(".*") if p.is_dir()]:  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
    for command, (out, proc) in jobs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert (proc.returncode, stdout, stderr) == (
            130, "", f"resumable {command}: interrupted (Ctrl-C); no partial output left at {out}: run the command "
            "again\n")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_relative_to(src))
    assert left == ["split", "split/.lock"]  # split's folder and its lock file (unlocked), as before it wrote
