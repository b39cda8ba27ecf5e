"""``resumable list`` on a legacy (``rank_*``) tree written by two real gloo ranks.

One row per step's file: complete (a file in every rank folder), valid (sizes against each rank's
meta.json records; ``--verify``: their xxh3-64), size, the "latest" mark of the meta.json files that
name it, and with a policy what keeps it, decided per rank folder as the saver decides. Then a file
removed, one flipped, one truncated and a damaged meta.json, each seen where it should be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from resumable.cli import main as cli
from resumable.retention import KeepBest
from tests.launch import run_distributed

LOSSES = [0.9, 0.3, 0.8, 0.2, 0.7, 0.6]  # global steps 1..6


def _save_six(rank: int, world: int, tree: str) -> None:
    from resumable.legacy import LegacySaver

    saver = LegacySaver(Path(tree), prefix="CKP", fmt="safetensors", keep_checkpoint_max=None,
                        remove_redundancy=False, save_optimizer=True, strategy_dir=Path(tree).parent / "strategy",
                        layout={"world_size": world, "mesh": None, "pipeline_stages": 1, "sharded_optimizer": False},
                        keep_best=KeepBest(1))
    for step, loss in enumerate(LOSSES, 1):
        saver.save({"model": {"w": torch.full((4096,), float(step + rank))}, "global_step": step}, 1, step,
                   metrics={"loss": loss})


def _list(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli(["list", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _name(rank: int, step: int) -> str:
    return f"CKP_rank_{rank}-1_{step}.safetensors"


def test_list_shows_each_legacy_step_complete_valid_latest_and_what_keeps_it(tmp_path, capsys):
    tree = tmp_path / "checkpoint"
    run_distributed(_save_six, 2, str(tree))
    code, report = _list(capsys, str(tree))
    assert (code, report["checked"], report["tracker_problem"]) == (0, "sizes", None)
    rows = report["iterations"]
    assert [(r["iteration"], r["file"], r["epoch_step"], r["committed"], r["valid"], r["ranks"], r["world_size"],
             r["latest_on"], r["tracked"], r["kept_by"]) for r in rows] == [
        (s, f"CKP_rank_{{r}}-1_{s}.safetensors", [1, s], True, True, [0, 1], 2, [0, 1] if s == 6 else [], s == 6, None)
        for s in range(1, 7)]
    sizes = {s: sum((tree / f"rank_{r}" / _name(r, s)).stat().st_size for r in (0, 1)) for s in range(1, 7)}
    assert [r["bytes"] for r in rows] == [sizes[s] for s in range(1, 7)] and all(r["age_s"] >= 0 for r in rows)

    # Damage: rank 1 loses step 2, a byte of rank 0's step 3 flips (same size), rank 1's step 4 is truncated.
    (tree / "rank_1" / _name(1, 2)).unlink()
    flipped = tree / "rank_0" / _name(0, 3)
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF
    flipped.write_bytes(bytes(data))
    torn = tree / "rank_1" / _name(1, 4)
    recorded = torn.stat().st_size
    torn.write_bytes(torn.read_bytes()[:1000])
    code, report = _list(capsys, str(tree))
    rows = {r["iteration"]: r for r in report["iterations"]}
    assert code == 1
    assert (rows[2]["committed"], rows[2]["valid"], rows[2]["ranks"]) == (False, None, [0])
    assert rows[3]["valid"] is True  # sizes only: the flip is not seen
    torn_problem = (f"{torn}: 1000 bytes on disk, meta.json records {recorded}; the file is truncated or was "
                    "replaced: restore it or load another step")
    assert (rows[4]["valid"], rows[4]["problem"]) == (False, torn_problem)
    code, report = _list(capsys, str(tree), "--verify")
    rows = {r["iteration"]: r for r in report["iterations"]}
    assert (code, report["checked"], rows[3]["valid"]) == (1, "checksums", False)
    assert re.fullmatch(rf"{re.escape(str(flipped))}: xxh3-64 [0-9a-f]{{16}}, meta.json records [0-9a-f]{{16}}; the "
                        "file is damaged: restore it or load another step", rows[3]["problem"]), rows[3]["problem"]

    # With the job's policy: newest 1, every third, best 1 by lowest loss (step 4, 0.2), decided per rank
    # folder: step 2 is only in rank 0's, where nothing keeps it.
    code, report = _list(capsys, str(tree), "--keep-max", "1", "--keep-every", "3", "--keep-best", "1")
    assert [(r["iteration"], r["kept_by"]) for r in report["iterations"]] == [
        (1, []), (2, []), (3, ["every_n_steps"]), (4, ["best"]), (5, []),
        (6, ["newest", "every_n_steps", "tracker"])]

    # The table: a file column, "1 of 2" for a step not on every rank, the latest mark, one PROBLEM per bad step.
    capsys.readouterr()
    assert cli(["list", str(tree), "--keep-max", "1", "--keep-every", "3", "--keep-best", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{'step':>10}  {'file':<28}  complete   valid (sizes)            size        age  "
                      "tracker    kept by")
    line = r"{:>10}  {:<28}  {:<9}  {:<17}  +\d+\.\d MB  +\d+ s  {:<9}  {}"
    expected = [(1, "yes", "yes", "", "nothing: the next save deletes it"),
                (2, "1 of 2", "-", "", "nothing: the next save deletes it"),
                (3, "yes", "yes", "", "every_n_steps"), (4, "yes", "NO", "", "best"),
                (5, "yes", "yes", "", "nothing: the next save deletes it"),
                (6, "yes", "yes", "<- latest", "newest, every_n_steps, tracker")]
    for (s, done, valid, mark, kept), text in zip(expected, out[1:7], strict=True):
        assert re.fullmatch(line.format(s, f"CKP_rank_{{r}}-1_{s}.safetensors", done, valid, mark, kept), text), text
    assert out[7:] == [f"PROBLEM step 4 (CKP_rank_{{r}}-1_4.safetensors): {torn_problem}"]

    # A damaged meta.json on rank 1: it vouches for nothing (its files' loss is unknown: kept by best),
    # the latest mark is rank 0's only, and it is the listing's problem.
    meta = tree / "rank_1" / "meta.json"
    meta.write_text(meta.read_text().replace('"loss": 0.9', '"loss": 0.1'))
    code, report = _list(capsys, str(tree), "--keep-max", "1", "--keep-best", "1")
    assert code == 1 and report["tracker_problem"].startswith(f"{meta}: its seal ")
    rows = {r["iteration"]: r for r in report["iterations"]}
    assert (rows[6]["latest_on"], rows[6]["tracked"]) == ([0], False)
    # The global steps come from rank 0's records; with best configured rank 1 keeps every file it has.
    assert [(r["iteration"], r["kept_by"]) for r in report["iterations"]] == [
        (1, ["metric_unreadable"]), (2, []), (3, ["metric_unreadable"]), (4, ["best", "metric_unreadable"]),
        (5, ["metric_unreadable"]), (6, ["newest", "tracker", "metric_unreadable"])]
