"""The checkpoint commands on s3:// paths: ``python -m resumable.cli ...`` against a real S3 server.

Each command runs as its own process (the ``s3`` fixture's AWS environment is inherited), as a
user runs it. Commands that do not depend on each other run at once, so that the file stays
quick. The checkpoint is saved by ``resumable.save`` straight into the bucket; a MindFormers
legacy ``rank_*`` tree is written locally and uploaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load, load_file

import resumable
from resumable.sources import open_source
from tests.e2e.jobs import run_job
from tests.fixtures.mindformers import build_legacy

NAME = "CKP-model-0000000-0000001.safetensors"  # the one file a one-rank save of a model-only state writes


def _state(step: int) -> dict:
    return {"model": {"w": torch.arange(12.0).reshape(3, 4) * step, "b": torch.full((5,), float(step))},
            "step": step}


def _save_two(s3) -> str:
    url = s3.url("run", "ckpt")
    for step in (1, 2):
        resumable.save(_state(step), url, step)
    return url


def _cli(*runs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run each ``resumable`` command line of ``runs`` at once; their results, in order (any exit status)."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda args: run_job([sys.executable, "-m", "resumable.cli", *args], expect_ok=False),
                             runs))


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (f"{done.args[3:]}: exit {done.returncode}\n{done.stdout[-2000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done


def _hf_config(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "tiny", "hidden_size": 4}))  # a model no mapping knows: not checked
    return str(path)


def test_verify_inspect_list_on_s3_and_a_flipped_byte_is_named(s3, tmp_path) -> None:
    url = _save_two(s3)
    verify, inspect, listed, other = _cli(("verify", url, "--json"), ("inspect", url, "--summary", "--json"),
                                          ("list", url, "--json"), ("verify", "gs://x/y"))
    report = json.loads(_ok(verify).stdout)
    assert report["ok"] and report["files_checked"] == 4, report  # 2 iterations x (model file, common.json)
    assert "xxh3-64" in report["checked"]
    summary = json.loads(_ok(inspect).stdout)
    assert [(r["iteration"], r["committed"]) for r in summary["iterations"]] == [(1, True), (2, True)]
    assert summary["latest"] == 2 and summary["selected"] == f"{url}/iteration_00000002"
    rows = json.loads(_ok(listed).stdout)["iterations"]
    assert [(r["folder"], r["valid"], r["tracked"]) for r in rows] == [
        (f"{url}/iteration_00000001", True, False), (f"{url}/iteration_00000002", True, True)]
    assert all(r["bytes"] > 0 for r in rows)
    # Not a local folder named "gs:": refused as a usage error, naming what is supported.
    assert other.returncode == 2 and "gs:// storage is not supported" in other.stderr, other.stderr

    key = f"run/ckpt/iteration_00000001/{NAME}"
    data = bytearray(s3.get(key))
    data[-1] ^= 0x01  # the last tensor byte: same size, so only a checksum can tell
    s3.put(key, bytes(data))
    damaged, sizes_only, listed, export = _cli(
        ("verify", url, "--json"), ("verify", url, "--no-checksum"), ("list", url, "--verify"),
        ("convert", f"{url}/iteration_00000001", s3.url("hf"), "--to", "hf", "--hf-config", _hf_config(tmp_path)))
    assert damaged.returncode == 1, damaged.stderr  # README: 1 is verify's "problems found"
    assert [p["where"] for p in json.loads(damaged.stdout)["problems"]] == [f"s3://{s3.bucket}/{key}"]
    _ok(sizes_only)
    assert listed.returncode == 1 and "PROBLEM step 1:" in listed.stdout, listed.stdout
    # The export failed on the damaged tensor after writing config.json in place: the prefix is emptied again.
    assert export.returncode == 1 and key in export.stderr, export.stderr
    assert s3.keys("hf/") == []


def test_convert_s3_to_local_hf_and_local_to_s3_v2(s3, tmp_path) -> None:
    url = _save_two(s3)
    hf = tmp_path / "hf"
    to_hf, merged, legacy = _cli(("convert", url, str(hf), "--to", "hf", "--hf-config", _hf_config(tmp_path),
                                  "--quiet"),
                                 ("merge", url, s3.url("merged"), "--quiet"),
                                 ("convert", url, s3.url("legacy"), "--to", "legacy"))
    _ok(to_hf)
    weights = load_file(hf / "model.safetensors")
    assert set(weights) == {"w", "b"} and all(torch.equal(weights[n], _state(2)["model"][n]) for n in weights)
    _ok(merged)
    assert legacy.returncode == 2 and "not supported" in legacy.stderr, legacy.stderr
    assert s3.keys("legacy") == []  # refused before anything is written

    to_v2, split = _cli(("convert", str(hf), s3.url("v2"), "--to", "v2", "--quiet"),
                        ("split", s3.url("merged"), s3.url("split"), "--layout", "dp=1,tp=1", "--quiet"))
    _ok(to_v2)
    _ok(split)
    for where, expected in ((s3.url("v2"), _state(2)["model"]), (s3.url("split"), _state(2)["model"])):
        target = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(5)}}
        resumable.load(target, where)
        assert all(torch.equal(target["model"][n], expected[n]) for n in expected), where
    assert not any(".tmp-" in k for k in s3.keys())  # written in place: no temp names on the store


def test_verify_list_and_convert_to_hf_of_a_mindformers_legacy_tree_on_s3(s3, tmp_path) -> None:
    build_legacy(tmp_path / "legacy", [[(1, 2, 0)], [(1, 2, 0)]], [(1, 2), (1, 2)])
    for prefix in ("legacy", "damaged"):
        s3.upload(tmp_path / "legacy", prefix)
    key = "damaged/rank_1/tiny_rank_1-1_2.safetensors"
    s3.put(key, s3.get(key)[:-1])  # truncated: its last tensor runs past the end
    url = s3.url("legacy")
    verify, export, damaged, listed = _cli(
        ("verify", url, "--json"), ("convert", url, s3.url("hf"), "--to", "hf", "--quiet"),
        ("verify", s3.url("damaged"), "--json"), ("list", s3.url("damaged"), "--json"))
    report = json.loads(_ok(verify).stdout)
    assert report["ok"] and report["files_checked"] == 4, report  # each rank's meta.json and file
    assert "0 with checksums" in report["checked"] and "4 sizes only" in report["checked"]  # MindFormers': none
    _ok(export)
    expected = open_source(tmp_path / "legacy")  # the local copy, mapped to HuggingFace names
    weights = load(s3.get("hf/model.safetensors"))
    assert set(weights) == {n for n in expected.tensors if not n.startswith("optimizer.")}
    assert all(torch.equal(weights[n], expected.tensors[n].read()) for n in weights)
    assert json.loads(s3.get("hf/config.json"))["model_type"] == "qwen3"
    assert damaged.returncode == 1, damaged.stderr
    assert [p["where"] for p in json.loads(damaged.stdout)["problems"]] == [f"s3://{s3.bucket}/{key}"]
    rows = json.loads(listed.stdout)["iterations"]  # one step, on both ranks, the damaged file named
    assert [(r["file"], r["committed"], r["valid"], r["latest_on"]) for r in rows] == [
        ("tiny_rank_{r}-1_2.safetensors", True, False, [0, 1])], rows
    assert listed.returncode == 1 and key in rows[0]["problem"], listed.stderr
