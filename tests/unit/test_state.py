import pytest
import torch

from resumable.state import flatten_state, merge_objects


def test_model_namespace_is_dropped_and_optimizer_tensors_are_opt_kind():
    w, m = torch.ones(2), torch.zeros(2)
    flat = flatten_state({
        "model": {"model.norm.weight": w},
        "optimizer": {"state": {"model.norm.weight": {"exp_avg": m, "step": 3}},
                      "param_groups": [{"lr": 0.1, "params": ["model.norm.weight"]}]},
        "global_step": 7,
        "rank_local": {"rng": [1, 2]},
    })
    assert {n: l.kind for n, l in flat.tensors.items()} == {
        "model.norm.weight": "model", "optimizer.state.model.norm.weight.exp_avg": "opt"}
    assert flat.tensors["model.norm.weight"].path == ("model", "model.norm.weight")
    assert flat.objects == {
        "model": {},
        "optimizer": {"state": {"model.norm.weight": {"step": 3}},
                      "param_groups": [{"lr": 0.1, "params": ["model.norm.weight"]}]},
        "global_step": 7,
    }
    assert flat.rank_local == {"rng": [1, 2]}


def test_a_value_that_is_not_json_names_its_path():
    with pytest.raises(TypeError, match=r"state value at 'extra.when' has type dtype"):
        flatten_state({"extra": {"when": torch.float32}})


def test_two_paths_stored_under_one_name_are_refused():
    with pytest.raises(ValueError, match=r"both stored as 'a.b'"):
        flatten_state({"model": {"a.b": torch.ones(1)}, "a": {"b": torch.ones(1)}})


def test_merge_objects_restores_plain_values_and_keeps_tensors():
    t = torch.ones(1)
    target = {"model": {"w": t}, "optimizer": {"state": {0: {"exp_avg": t, "step": 0}}}, "global_step": 0}
    merge_objects(target, {"model": {}, "optimizer": {"state": {"0": {"step": 5}}}, "global_step": 9, "new": 1})
    assert target["optimizer"]["state"][0]["step"] == 5 and target["global_step"] == 9 and target["new"] == 1
    assert target["model"]["w"] is t
