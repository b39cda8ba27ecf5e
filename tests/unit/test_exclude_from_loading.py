"""exclude_from_loading (the trainer's key) through the library: what is left out keeps this run's values."""

from __future__ import annotations

import logging

import pytest
import torch

from resumable.errors import ConfigError
from resumable.load import load
from resumable.save import save
from resumable.train.checkpointing import merge_back, without_exclusions, left_out

NAMES = ("model.embed.weight", "lm_head.weight")


def _state(value: float) -> dict:
    return {
        "model": {n: torch.full((2, 3), value) for n in NAMES},
        "optimizer": {"state": {n: {"exp_avg": torch.full((2, 3), value + 1)} for n in NAMES},
                      "param_groups": [{"lr": value, "params": list(NAMES)}]},
        "global_step": int(value), "data": {"epoch": int(value), "sample_in_epoch": int(value)},
        "rank_local": {"rng": [int(value)]},
    }


def test_each_exclusion_keeps_this_runs_values_and_the_rest_loads(tmp_path, caplog):
    save(_state(7.0), tmp_path / "ckpt", 7)
    state = _state(0.0)
    with caplog.at_level(logging.INFO, logger="resumable.train.checkpointing"):
        kept, skipped = without_exclusions(state, ["optimizer", "rng", "data", "lm_*"])
    assert caplog.messages == ["exclude_from_loading: left out the optimizer state; the RNG states; the data "
                               "position; 1 tensor(s) and their optimizer state: lm_head.weight"]
    assert skipped == ["optimizer", "lm_head.weight", "optimizer.state.lm_head.weight"]
    load(kept, tmp_path / "ckpt", exclude_from_loading=skipped)
    merge_back(state, kept, left_out(["optimizer", "rng", "data", "lm_*"], skipped))
    assert torch.equal(state["model"]["model.embed.weight"], torch.full((2, 3), 7.0))
    assert torch.equal(state["model"]["lm_head.weight"], torch.zeros(2, 3))
    assert all(torch.equal(v["exp_avg"], torch.ones(2, 3)) for v in state["optimizer"]["state"].values())
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert (state["global_step"], state["data"], state["rank_local"]) == (7, {"epoch": 0, "sample_in_epoch": 0},
                                                                          {"rng": [0]})


def test_a_pattern_alone_leaves_its_optimizer_state_out_and_loads_the_rest(tmp_path):
    save(_state(7.0), tmp_path / "ckpt", 7)
    state = _state(0.0)
    kept, skipped = without_exclusions(state, ["lm_head.weight"])
    load(kept, tmp_path / "ckpt", exclude_from_loading=skipped)
    merge_back(state, kept, left_out(["lm_head.weight"], skipped))
    exp_avg = {n: float(v["exp_avg"][0, 0]) for n, v in state["optimizer"]["state"].items()}
    assert exp_avg == {"model.embed.weight": 8.0, "lm_head.weight": 1.0}
    assert (state["global_step"], state["data"]["epoch"], state["rank_local"]) == (7, 7, {"rng": [7]})


def test_a_pattern_matching_no_tensor_is_refused():
    with pytest.raises(ConfigError) as err:
        without_exclusions(_state(0.0), ["optimizer", "head.*"])
    assert str(err.value) == ("exclude_from_loading: 'head.*' matches no tensor of the model (expected optimizer, "
                              "rng, data or a pattern over its tensors: lm_head.weight, model.embed.weight)")


def test_legacy_mode_refuses_exclusions_it_cannot_honour(tmp_path):
    from resumable.errors import NotImplementedYet
    from resumable.train.checkpointing import checkpoint_callbacks
    from resumable.train.config import load_config

    cfg = load_config(None, ["use_legacy_format=true", f"load_checkpoint={tmp_path}", "resume_training=true",
                             "exclude_from_loading=[optimizer]"])
    with pytest.raises(NotImplementedYet) as err:
        checkpoint_callbacks(cfg)
    assert str(err.value) == ("not implemented yet: exclude_from_loading ['optimizer'] with use_legacy_format: "
                              "true and a Checkpoint 1.0 load_checkpoint: the legacy loader restores everything; "
                              "convert it with resumable convert --to v2 and load that")
