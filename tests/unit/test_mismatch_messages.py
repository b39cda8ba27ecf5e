"""StateMismatchError says what to do: a weights-only checkpoint is named as such, long name lists are summarised.

Real saves (single process) into tmp folders, then loads of states that do not match them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import resumable
from resumable.errors import StateMismatchError


def _state(n: int) -> dict:
    return {"model": {f"layer{i}.weight": torch.ones(2) for i in range(n)}}


def test_a_weights_only_checkpoint_asked_for_the_optimizer_says_so(tmp_path: Path) -> None:
    state = _state(2)
    state["optimizer"] = {"state": {name: {"exp_avg": torch.zeros(2)} for name in state["model"]}}
    folder = resumable.save(state, tmp_path, 3, save_optimizer=False)
    with pytest.raises(StateMismatchError) as info:
        resumable.load(state, folder)
    assert str(info.value) == (
        f"checkpoint {folder} was saved with save_optimizer=False: it holds the model's weights only, and the state "
        "asks for 2 optimizer tensor(s) (optimizer.state.layer0.weight.exp_avg, "
        "optimizer.state.layer1.weight.exp_avg). Load the weights alone (a state of {'model': ...}), or a checkpoint "
        "saved with the optimizer")


def test_long_lists_of_missing_names_and_mismatches_show_the_first_five_the_count_and_where_to_see_all(
        tmp_path: Path) -> None:
    folder = resumable.save(_state(7), tmp_path, 1)
    target = {"model": {**{f"layer{i}.weight": torch.ones(3) for i in range(7)},
                        **{f"extra{i}": torch.ones(1) for i in range(6)}}}
    with pytest.raises(StateMismatchError) as info:
        resumable.load(target, folder)
    assert str(info.value) == "\n".join([
        f"the state does not match checkpoint {folder}:",
        "6 tensor(s) missing from the checkpoint: extra0, extra1, extra2, extra3, extra4, ... (6 in all; the "
        f"checkpoint's tensors: resumable inspect {folder})",
        *[f"layer{i}.weight: shape [3] in the state, [2] in the checkpoint" for i in range(5)],
        f"... 2 more shape or dtype mismatch(es); the checkpoint's shapes: resumable inspect {folder}",
        "build the model with the architecture (and optimizer) the checkpoint was saved with",
    ])
