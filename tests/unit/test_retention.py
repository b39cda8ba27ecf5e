"""Retention policies: the pure decision for every combination, a real manager's folders, a crash mid-deletion."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from resumable import commit
from resumable.errors import ConfigError
from resumable.formats import v1
from resumable.manager import CheckpointManager
from resumable.retention import KeepBest, Missing, Policy, decide

LOSS = {10: 0.5, 20: 0.9, 30: 0.2, 40: 0.7, 50: 0.9, 60: 0.8}
U, R = Missing.UNREADABLE, Missing.NOT_RECORDED
DAMAGED = {10: 0.5, 20: U, 30: R, 40: math.nan, 50: 0.9, 60: 0.8}

CASES = [  # (policy, metrics, tracker, protected, expected kept → reasons)
    (Policy(1), LOSS, 60, (), {60: ("newest", "tracker")}),
    (Policy(2), LOSS, 60, (), {50: ("newest",), 60: ("newest", "tracker")}),
    (Policy(None), LOSS, 60, (), {n: ("newest", "tracker") if n == 60 else ("newest",) for n in LOSS}),
    (Policy(1, every_n_steps=20), LOSS, 60, (),
     {20: ("every_n_steps",), 40: ("every_n_steps",), 60: ("newest", "every_n_steps", "tracker")}),
    (Policy(1, best=KeepBest(2)), LOSS, 60, (), {10: ("best",), 30: ("best",), 60: ("newest", "tracker")}),
    # max: 20 and 50 tie at 0.9; the newer wins a tie, so 60 (0.8) is not among the best 2.
    (Policy(1, best=KeepBest(2, mode="max")), LOSS, 60, (),
     {20: ("best",), 50: ("best",), 60: ("newest", "tracker")}),
    (Policy(1, best=KeepBest(1, mode="max")), LOSS, 60, (), {50: ("best",), 60: ("newest", "tracker")}),
    (Policy(1, every_n_steps=20, best=KeepBest(1)), LOSS, 60, (),
     {20: ("every_n_steps",), 30: ("best",), 40: ("every_n_steps",), 60: ("newest", "every_n_steps", "tracker")}),
    (Policy(2, every_n_steps=30, best=KeepBest(1, mode="max")), LOSS, 60, (),
     {30: ("every_n_steps",), 50: ("newest", "best"), 60: ("newest", "every_n_steps", "tracker")}),
    # The tracker names an older iteration (a user chose it): it and everything newer stay.
    (Policy(1), LOSS, 30, (), {30: ("tracker",), 40: ("newer",), 50: ("newer",), 60: ("newest", "newer")}),
    (Policy(1), LOSS, None, (10,), {10: ("protected",), 60: ("newest",)}),
    (Policy(1, every_n_steps=20), LOSS, 60, (20,),
     {20: ("every_n_steps", "protected"), 40: ("every_n_steps",), 60: ("newest", "every_n_steps", "tracker")}),
    # Unreadable metric: kept (never deleted on a guess); not recorded: not ranked; NaN: ranked last.
    (Policy(1, best=KeepBest(2)), DAMAGED, 60, (),
     {10: ("best",), 20: ("metric_unreadable",), 60: ("newest", "best", "tracker")}),
    (Policy(1, best=KeepBest(2, mode="max")), DAMAGED, 60, (),
     {20: ("metric_unreadable",), 50: ("best",), 60: ("newest", "best", "tracker")}),
    (Policy(1, best=KeepBest(5)), DAMAGED, 60, (),
     {10: ("best",), 20: ("metric_unreadable",), 40: ("best",), 50: ("best",), 60: ("newest", "best", "tracker")}),
    (Policy(1, every_n_steps=30, best=KeepBest(1)), DAMAGED, 60, (20,),
     {10: ("best",), 20: ("protected", "metric_unreadable"), 30: ("every_n_steps",),
      60: ("newest", "every_n_steps", "tracker")}),
    (Policy(3, best=KeepBest(1)), {}, None, (), {}),
]


@pytest.mark.parametrize("policy, metrics, tracker, protected, expected", CASES)
def test_every_combination_of_policies_keeps_the_union_and_says_why(policy, metrics, tracker, protected, expected):
    assert decide(metrics, policy, tracker=tracker, protected=protected) == expected


@pytest.mark.parametrize("make, message", [
    (lambda: Policy(0), "keep_checkpoint_max must be at least 1 (the newest checkpoint is always kept), got 0"),
    (lambda: Policy(1, every_n_steps=0), "keep_every_n_steps must be at least 1, got 0"),
    (lambda: Policy(1, best=3), "keep_best must be a resumable.retention.KeepBest, got 3"),
    (lambda: KeepBest(0), "keep_best count must be an integer of at least 1, got 0"),
    (lambda: KeepBest(1, metric=""), "keep_best metric must be a metric name such as 'loss', got ''"),
    (lambda: KeepBest(1, mode="lowest"), "keep_best mode must be 'min' (lower is better) or 'max', got 'lowest'"),
])
def test_a_policy_out_of_range_is_refused_naming_the_argument(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def _kept(directory: Path) -> list[int]:
    return commit.committed_iterations(directory)


def test_a_manager_keeps_newest_every_third_and_best_and_never_deletes_an_unreadable_metric(tmp_path: Path):
    losses = {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5, 7: 0.95}
    mgr = CheckpointManager(tmp_path, keep_checkpoint_max=1, keep_every_n_steps=3, keep_best=KeepBest(1))
    for step in range(1, 6):
        mgr.save({"model": {"w": torch.full((2,), float(step))}, "global_step": step}, step,
                 metrics={"loss": losses[step]})
    common = json.loads((tmp_path / commit.iteration_dirname(2) / "common.json").read_text())
    assert common["metrics"] == {"loss": 0.3}
    assert _kept(tmp_path) == [2, 3, 5]  # 2 best, 3 a multiple of 3, 5 newest
    # Damage 5's common.json (its seal in metadata.json no longer matches): its loss is unknown, so it stays,
    # and the 0.1 it now shows is not believed (2 stays the best).
    damaged = tmp_path / commit.iteration_dirname(5) / "common.json"
    damaged.write_text(damaged.read_text().replace('"loss": 0.6', '"loss": 0.1'))
    mgr.close()  # the next job reads every metric afresh
    fresh = CheckpointManager(tmp_path, keep_checkpoint_max=1, keep_every_n_steps=3, keep_best=KeepBest(1))
    fresh.save({"model": {"w": torch.zeros(2)}, "global_step": 6}, 6, metrics={"loss": losses[6]})
    assert _kept(tmp_path) == [2, 3, 5, 6]  # 5 would go (not newest, best, nor a multiple of 3) if it were readable
    with pytest.raises(ConfigError) as e:
        fresh.save({"model": {"w": torch.zeros(2)}, "global_step": 7}, 7)
    assert str(e.value) == ("keep_best ranks checkpoints by 'loss', but save(..., metrics=) gives none: "
                            "pass metrics={'loss': value}")
    with pytest.raises(ConfigError) as e:
        fresh.save({"model": {"w": torch.zeros(2)}, "global_step": 7}, 7, metrics={"loss": "low"})
    assert str(e.value) == "save(..., metrics=): 'loss' is 'low'; metrics are numbers (e.g. metrics={'loss': 2.31})"
    assert _kept(tmp_path) == [2, 3, 5, 6]
    fresh.close()


def _fake(directory: Path, n: int) -> None:
    folder = directory / commit.iteration_dirname(n)
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    (folder / "payload.bin").write_bytes(b"x" * 4096)


def test_a_kill_in_the_middle_of_a_deletion_leaves_committed_folders_and_a_leftover_the_next_start_removes(
        tmp_path: Path):
    for n in range(1, 6):
        _fake(tmp_path, n)
    commit.write_tracker(tmp_path, 5)
    policy = Policy(1, every_n_steps=2)  # deletes 1 then 3 (oldest first); keeps 2, 4, 5
    pid = os.fork()
    if pid == 0:  # the child: SIGKILLed after renaming its second victim, before removing it
        os.environ[commit.FAULT_ENV] = "retention-renamed:2"
        try:
            commit.apply_retention(tmp_path, policy)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".del-iteration_00000003", "iteration_00000002", "iteration_00000004", "iteration_00000005", commit.TRACKER]
    assert commit.read_tracker(tmp_path) == 5 and _kept(tmp_path) == [2, 4, 5]
    assert commit.latest_committed(tmp_path) == tmp_path / commit.iteration_dirname(5)
    assert commit.clean_leftovers(tmp_path) == [tmp_path / ".del-iteration_00000003"]
    assert commit.apply_retention(tmp_path, policy) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iteration_00000002", "iteration_00000004", "iteration_00000005", commit.TRACKER]


TRAIN = ["parallel_config.data_parallel=1", "parallel_config.model_parallel=1", "runner_config.stop_step=5",
         "callbacks.0.save_checkpoint_steps=1", "callbacks.0.keep_checkpoint_max=1",
         "callbacks.0.keep_best_checkpoint_max=1", "callbacks.0.best_checkpoint_mode=max",
         "callbacks.0.keep_checkpoint_every_n_steps=3"]


def test_the_trainer_records_each_steps_loss_and_keeps_newest_every_third_and_best(tmp_path: Path, capsys,
                                                                                   monkeypatch):
    from resumable.proctree import PARENT_ENV
    from resumable.train.__main__ import main as train_main

    # In-process runs: main() binds to $RESUMABLE_PARENT_PID and then sets it to its own pid (a second
    # run in this process would SIGKILL itself); monkeypatch restores the variable after each.
    monkeypatch.delenv(PARENT_ENV, raising=False)
    sets = [a for s in [*TRAIN, f"output_dir={tmp_path}"] for a in ("--set", s)]
    train_main(sets)
    checkpoints = tmp_path / "checkpoint"
    # The loss falls: the best by "max" is step 1; 3 is a multiple of 3; 5 the newest.
    assert _kept(checkpoints) == [1, 3, 5]
    logged = [json.loads(line) for line in (tmp_path / "log" / "train.jsonl").read_text().splitlines()]
    losses = {e["global_step"]: e["loss"] for e in logged}
    for n in (1, 3, 5):
        common = json.loads((checkpoints / commit.iteration_dirname(n) / "common.json").read_text())
        assert common["metrics"] == {"loss": losses[n]}
    # The legacy layout keeps the same steps, decided by the same policies from each rank folder's meta.json.
    monkeypatch.delenv(PARENT_ENV)
    legacy = tmp_path / "legacy"
    train_main([*sets, "--set", "use_legacy_format=true", "--set", f"output_dir={legacy}"])
    folder = legacy / "checkpoint" / "rank_0"
    meta = v1.read_meta(folder)
    assert meta is not None
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "meta.json")
    logged = [json.loads(line) for line in (legacy / "log" / "train.jsonl").read_text().splitlines()]
    losses = {e["global_step"]: e["loss"] for e in logged if "global_step" in e}
    assert [(meta.notes[n].global_step, dict(meta.notes[n].metrics)) for n in on_disk] == [
        (n, {"loss": losses[n]}) for n in (1, 3, 5)]
