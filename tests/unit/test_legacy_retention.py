"""Retention of the legacy layout: the 2.0 policies decided over one rank folder's files (``decide_folder``).

The pure decision for every combination over legacy file lists (two jobs' prefix suffixes, epochs
and steps, files of other prefixes and ranks beside them), then real one-rank ``LegacySaver`` jobs:
the files kept are the ones the decision names, and a SIGKILL in the middle of the deletions
leaves a tree that resumes, whose next save finishes the deletions. Two ranks through
``resumable train``: ``tests/distributed/test_legacy_retention_train.py``.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from resumable import commit
from resumable.errors import ConfigError, CorruptCheckpointError
from resumable.formats import v1
from resumable.legacy import LegacySaver, resolve_legacy
from resumable.legacy.save import decide_folder
from resumable.retention import KeepBest, Policy
from resumable.tools.verify import verify_path


def _n(suffix: int, epoch: int, step: int, rank: int = 0, prefix: str = "CKP") -> str:
    return v1.rank_file_name(prefix, rank, suffix, epoch, step, "safetensors")


# Job 1 (no suffix) saved global steps 1..6 as epoch 1 steps 1..4 and epoch 2 steps 1..2; job 2
# (suffix _1, a later job in the same folder) saved global steps 7 and 8. Retention order is
# suffix, then (epoch, step): _1-1_1 is newer than -2_2 although its epoch is smaller.
FILES = {_n(0, 1, 1): 1, _n(0, 1, 2): 2, _n(0, 1, 3): 3, _n(0, 1, 4): 4, _n(0, 2, 1): 5, _n(0, 2, 2): 6,
         _n(1, 1, 1): 7, _n(1, 1, 2): 8}
LOSS = dict(zip(FILES, [0.9, 0.3, 0.8, 0.2, 0.7, 0.9, 0.6, 0.5]))
NEWEST = _n(1, 1, 2)
# Never counted: another prefix, another rank's name, not a legacy name.
STRAYS = [_n(0, 1, 1, prefix="other"), _n(0, 1, 1, rank=1), "notes.txt"]


def _notes(loss: dict[str, float] = LOSS, unknown: tuple[str, ...] = (), unrecorded: tuple[str, ...] = (),
           no_step: tuple[str, ...] = ()) -> dict[str, v1.FileNote]:
    """meta.json's notes: ``unknown`` files are not listed at all, ``unrecorded`` ones without the metric."""
    return {n: v1.FileNote(None if n in no_step else step, {} if n in unrecorded else {"loss": loss[n]})
            for n, step in FILES.items() if n not in unknown}


def _by_step(kept: dict[str, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    return {FILES[n]: why for n, why in kept.items()}


T = ("newest", "tracker")  # the newest file is the one meta.json names
CASES = [  # (policy, notes, protected, expected: global step → reasons)
    (Policy(1), _notes(), (), {8: T}),
    (Policy(3), _notes(), (), {6: ("newest",), 7: ("newest",), 8: T}),
    (Policy(None), _notes(), (), {s: T if s == 8 else ("newest",) for s in range(1, 9)}),
    (Policy(1, every_n_steps=3), _notes(), (), {3: ("every_n_steps",), 6: ("every_n_steps",), 8: T}),
    (Policy(1, every_n_steps=2), _notes(), (),
     {2: ("every_n_steps",), 4: ("every_n_steps",), 6: ("every_n_steps",), 8: ("newest", "every_n_steps", "tracker")}),
    (Policy(1, best=KeepBest(2)), _notes(), (), {2: ("best",), 4: ("best",), 8: T}),
    # max: steps 1 and 6 tie at 0.9; the newer wins, so 1 is kept only with a count of 2.
    (Policy(1, best=KeepBest(1, mode="max")), _notes(), (), {6: ("best",), 8: T}),
    (Policy(1, best=KeepBest(2, mode="max")), _notes(), (), {1: ("best",), 6: ("best",), 8: T}),
    (Policy(2, every_n_steps=3, best=KeepBest(1)), _notes(), (),
     {3: ("every_n_steps",), 4: ("best",), 6: ("every_n_steps",), 7: ("newest",), 8: T}),
    # The file resumed from is protected whatever the policies say.
    (Policy(1), _notes(), (_n(0, 1, 3),), {3: ("protected",), 8: T}),
    (Policy(1, every_n_steps=3), _notes(), (_n(0, 1, 3),), {3: ("every_n_steps", "protected"),
                                                           6: ("every_n_steps",), 8: T}),
    # Not listed in meta.json (its record lost to damage): its metric is unknown, kept by best only.
    (Policy(1, best=KeepBest(1)), _notes(unknown=(_n(0, 1, 1), _n(0, 1, 3))), (),
     {1: ("metric_unreadable",), 3: ("metric_unreadable",), 4: ("best",), 8: T}),
    (Policy(1), _notes(unknown=(_n(0, 1, 1), _n(0, 1, 3))), (), {8: T}),
    # Not listed means no known step either: every_n_steps cannot keep it.
    (Policy(1, every_n_steps=3), _notes(unknown=(_n(0, 1, 3),)), (), {6: ("every_n_steps",), 8: T}),
    # Listed without the metric (saved without metrics=): not ranked; the next best is kept instead.
    (Policy(1, best=KeepBest(1)), _notes(unrecorded=(_n(0, 1, 4),)), (), {2: ("best",), 8: T}),
    # Listed without a global step (a meta.json written before steps were recorded): every_n skips it.
    (Policy(1, every_n_steps=3), _notes(no_step=(_n(0, 2, 2),)), (), {3: ("every_n_steps",), 8: T}),
    # NaN ranks last in either mode.
    (Policy(1, best=KeepBest(1, mode="max")), _notes({**LOSS, _n(0, 1, 1): math.nan}), (), {6: ("best",), 8: T}),
    (Policy(1, best=KeepBest(8)), _notes({n: math.nan for n in FILES}), (),
     {s: ("newest", "best", "tracker") if s == 8 else ("best",) for s in range(1, 9)}),
]


@pytest.mark.parametrize("policy, notes, protected, expected", CASES)
def test_a_rank_folder_keeps_what_the_policies_keep_in_retention_order(policy, notes, protected, expected):
    order, kept = decide_folder([*STRAYS, *reversed(FILES)], "CKP", 0, policy, notes, latest=NEWEST,
                                protected=protected)
    assert order == list(FILES)  # older jobs first, then (epoch, step); strays never counted
    assert _by_step(kept) == expected


def test_a_folder_without_meta_json_is_decided_by_name_order_and_best_keeps_everything():
    # MindFormers' meta.json (three keys) or none at all: no file is listed, so no step or metric is known.
    order, kept = decide_folder(list(FILES), "CKP", 0, Policy(2, every_n_steps=2), {}, latest=NEWEST)
    assert _by_step(kept) == {7: ("newest",), 8: T}
    _, kept = decide_folder(list(FILES), "CKP", 0, Policy(1, best=KeepBest(1)), {}, latest=NEWEST)
    assert _by_step(kept) == {s: ("newest", "tracker", "metric_unreadable") if s == 8 else ("metric_unreadable",)
                              for s in range(1, 9)}


# ---------------------------------------------------------------------------------- meta.json


def _sealed(doc: dict) -> str:
    return json.dumps({**doc, "seal": v1.seal(doc)})


def test_meta_json_records_step_and_metrics_optionally_and_older_files_still_read(tmp_path):
    folder = tmp_path / "rank_0"
    folder.mkdir()
    name = _n(0, 1, 2)
    digest = "0123456789abcdef"
    (folder / v1.META_JSON).write_bytes(v1.meta_bytes(1, 2, name, {name: (10, digest)},
                                                      {name: v1.FileNote(2, {"loss": math.nan})}))
    meta = v1.read_meta(folder)
    assert meta.files == {name: (10, digest)} and meta.notes[name].global_step == 2
    assert math.isnan(meta.notes[name].metrics["loss"])  # a diverged loss is recorded, and ranks last
    head = {"last_epoch": 1, "last_step": 2, "last_ckpt_file": name}
    # Written before steps and metrics were recorded: the same records, no notes.
    (folder / v1.META_JSON).write_text(_sealed({**head, "files": {name: {"size": 10, "xxh3_64": digest}}}))
    assert v1.read_meta(folder).notes == {name: v1.FileNote()}
    # MindFormers' three keys, unsealed: no records at all.
    (folder / v1.META_JSON).write_text(json.dumps(head))
    meta = v1.read_meta(folder)
    assert (meta.files, meta.notes, meta.sealed) == ({}, {}, False)
    for bad in ({"size": 10, "xxh3_64": digest, "global_step": -1}, {"size": 10, "xxh3_64": digest, "step": 2},
                {"size": 10, "xxh3_64": digest, "metrics": {"loss": "low"}},
                {"size": 10, "xxh3_64": digest, "metrics": [0.5]}):
        (folder / v1.META_JSON).write_text(_sealed({**head, "files": {name: bad}}))
        with pytest.raises(CorruptCheckpointError) as e:
            v1.read_meta(folder)
        assert str(e.value) == (f"{folder / v1.META_JSON}: \"files\" must map file names to {{size, xxh3_64}} (and "
                                "optional global_step, metrics {name: number})")


# ------------------------------------------------------------------------ real saves, one rank


def _saver(tree: Path, **policy) -> LegacySaver:
    return LegacySaver(tree, prefix="CKP", fmt="safetensors", remove_redundancy=False, save_optimizer=True,
                       strategy_dir=tree.parent / "strategy",
                       layout={"world_size": 1, "mesh": None, "pipeline_stages": 1, "sharded_optimizer": False},
                       **{"keep_checkpoint_max": 1, **policy})


LOSSES = [0.9, 0.3, 0.8, 0.2, 0.7, 0.6]  # global steps 1..6


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "global_step": step}


def _steps(folder: Path) -> list[int]:
    """The global steps of the rank files on disk, as meta.json records them."""
    meta = v1.read_meta(folder)
    assert meta is not None
    return sorted(meta.notes[p.name].global_step for p in folder.iterdir() if p.name != v1.META_JSON)


def test_saves_keep_newest_every_third_and_best_and_record_step_and_loss(tmp_path):
    tree = tmp_path / "checkpoint"
    saver = _saver(tree, keep_every_n_steps=3, keep_best=KeepBest(1))
    for step, loss in enumerate(LOSSES, 1):
        saver.save(_state(step), 1, step, metrics={"loss": loss})
    assert _steps(tree / "rank_0") == [3, 4, 6]  # 4 best (0.2), 3 and 6 every third, 6 newest
    meta = v1.read_meta(tree / "rank_0")
    assert meta.notes[_n(0, 1, 4)] == v1.FileNote(4, {"loss": 0.2})
    with pytest.raises(ConfigError) as e:
        saver.save(_state(7), 1, 7)
    assert str(e.value) == ("keep_best ranks checkpoints by 'loss', but save(..., metrics=) gives none: "
                            "pass metrics={'loss': value}")
    assert _steps(tree / "rank_0") == [3, 4, 6]  # nothing was written


def test_a_damaged_meta_json_keeps_every_file_it_vouched_for_in_this_job_and_the_next(tmp_path):
    tree = tmp_path / "checkpoint"
    saver = _saver(tree, keep_best=KeepBest(1))
    for step, loss in enumerate(LOSSES[:3], 1):
        saver.save(_state(step), 1, step, metrics={"loss": loss})
    assert _steps(tree / "rank_0") == [2, 3]  # 2 best, 3 newest
    meta_json = tree / "rank_0" / v1.META_JSON
    meta_json.write_text(meta_json.read_text().replace('"loss": 0.3', '"loss": 0.1'))  # the seal no longer matches
    # A new job: neither file's loss is known any more, so neither is deleted on a guess; its own files are ranked.
    saver = _saver(tree, keep_best=KeepBest(1))
    for step in (4, 5):
        saver.save(_state(step), 1, step, metrics={"loss": LOSSES[step - 1]})
    names = sorted(p.name for p in (tree / "rank_0").iterdir())
    assert names == [_n(0, 1, 2), _n(0, 1, 3), _n(1, 1, 4), _n(1, 1, 5), v1.META_JSON]
    # The job after it still knows nothing of them (meta.json does not list them): still kept.
    _saver(tree, keep_best=KeepBest(1)).save(_state(6), 1, 6, metrics={"loss": LOSSES[5]})
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [
        _n(0, 1, 2), _n(0, 1, 3), _n(1, 1, 4), _n(2, 1, 6), v1.META_JSON]


def test_a_kill_in_the_middle_of_the_deletions_resumes_and_the_next_save_finishes_them(tmp_path):
    tree = tmp_path / "checkpoint"
    saver = _saver(tree, keep_checkpoint_max=None)
    for step, loss in enumerate(LOSSES[:5], 1):
        saver.save(_state(step), 1, step, metrics={"loss": loss})
    # keep 1 newest, every third, best 1: saving 6 deletes 1, 2 and 5 (oldest first); killed before the second.
    pid = os.fork()
    if pid == 0:
        os.environ[commit.FAULT_ENV] = "legacy-retention:2"
        try:
            _saver(tree, keep_every_n_steps=3, keep_best=KeepBest(1)).save(_state(6), 1, 6, metrics={"loss": 0.6})
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    folder = tree / "rank_0"
    assert sorted(p.name for p in folder.iterdir()) == [
        _n(0, 1, 2), _n(0, 1, 3), _n(0, 1, 4), _n(0, 1, 5), _n(1, 1, 6), v1.META_JSON]
    assert resolve_legacy(str(tree), True).position == (1, 6)
    assert verify_path(tree)[0] == []
    # The restarted job resumes from 6 (protected) and saves 7: the victims left are decided again, the same way.
    again = _saver(tree, keep_every_n_steps=3, keep_best=KeepBest(1), protect=(folder / _n(1, 1, 6),))
    again.save(_state(7), 1, 7, metrics={"loss": 0.5})
    assert _steps(folder) == [3, 4, 6, 7]  # 6 stays: resumed from (and a multiple of 3)


def test_background_saves_record_the_metrics_and_apply_the_same_policies(tmp_path):
    from resumable.legacy import BackgroundLegacySaves

    tree = tmp_path / "checkpoint"
    background = BackgroundLegacySaves(_saver(tree, keep_every_n_steps=3, keep_best=KeepBest(1)))
    for step, loss in enumerate(LOSSES, 1):
        background.save(_state(step), 1, step, metrics={"loss": loss})
    with pytest.raises(ConfigError) as e:  # refused in the caller, before the next snapshot
        background.save(_state(7), 1, 7, metrics={"loss": "low"})
    assert str(e.value) == "save(..., metrics=): 'loss' is 'low'; metrics are numbers (e.g. metrics={'loss': 2.31})"
    background.wait()
    assert _steps(tree / "rank_0") == [3, 4, 6]
    assert v1.read_meta(tree / "rank_0").notes[_n(0, 1, 6)] == v1.FileNote(6, {"loss": 0.6})
