"""MindSpore / MindFormers checkpoints of any model, in every layout and as single files, → ``convert --to v2``.

A generic network (``fc1.weight``, ``emb.embedding_table``, ``norm.gamma`` ...: no model
mapping applies) keeps its names, with or without optimizer state; its moments become
``optimizer.state.<name>.exp_avg`` / ``.exp_avg_sq`` with AdamW's ``step`` from the global
step, and every MindSpore scalar is kept in ``common.json["mindspore"]``. The Qwen3 mapping
applies when every parameter is a MindFormers Qwen3 name, or never (``--names keep``);
``--names hf`` on other names is refused. The fused layout comes from a recorded
``config.json`` or the flags. Every fixture is built at test time; checks go through
``resumable.cli.main`` and ``resumable.load``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resumable.cli import main
from resumable.formats import v2
from resumable.formats.ms_ckpt import write_ms_ckpt
from resumable.load import load
from resumable.models.qwen3 import FusedLayout, hf_to_mf
from resumable.sources import open_source
from tests.fixtures.mindformers import (HEADS, build_legacy, build_v2, hf_state, mf_state, net_legacy_state, net_ours,
                                        net_state)

SEED = 11


def _target(expected: dict[str, torch.Tensor], steps: bool) -> dict:
    model, optim = {}, {}
    for name, t in expected.items():
        if name.startswith("optimizer.state."):
            fqn, _, slot = name[len("optimizer.state."):].rpartition(".")
            optim.setdefault(fqn, {})[slot] = torch.zeros_like(t)
            if steps:
                optim[fqn]["step"] = torch.zeros((), dtype=torch.float32)
        else:
            model[name] = torch.zeros_like(t)
    return {"model": model, "optimizer": {"state": optim}} if optim else {"model": model}


def _converts(src: Path, out: Path, expected: dict[str, torch.Tensor], global_step: int, *flags: str) -> dict:
    """``convert src --to v2``, then load into a state of exactly ``expected``'s names: every value equal."""
    assert main(["convert", str(src), str(out), "--to", "v2", "--quiet", *flags]) == 0
    steps = any(n.startswith("optimizer.") for n in expected)
    state = _target(expected, steps)
    result = load(state, out)
    for name, t in state["model"].items():
        assert torch.equal(t, expected[name]), name
    for fqn, slots in state.get("optimizer", {"state": {}})["state"].items():
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(slots[slot], expected[f"optimizer.state.{fqn}.{slot}"]), (fqn, slot)
        assert slots["step"].item() == global_step
    assert "mindspore" not in state  # the scalars' record stays in common.json, out of the loaded state
    return result.common


GENERIC_V2 = {
    "dp2-mp2-metadata": dict(dp=2, mp=2),
    "mp2-tensor-map-no-fragmentations": dict(mp=2, fragmentations=False, rank_group=False),
    "dp2-remove-redundancy": dict(dp=2, remove_redundancy=True),
    "one-rank-no-metadata": dict(),
}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", None])
@pytest.mark.parametrize("layout", GENERIC_V2)
def test_generic_2_0_folder_keeps_its_names_with_or_without_optimizer(tmp_path, capsys, layout, optimizer):
    state = net_state(SEED, optimizer=optimizer, global_step=100)
    build_v2(tmp_path / "mf", 100, state, **GENERIC_V2[layout])
    common = _converts(tmp_path / "mf", tmp_path / "ours", net_ours(state), 100)
    assert {k: common[k] for k in ("iteration", "global_step", "epoch_num", "step_num", "global_batch_size")} == {
        "iteration": 100, "global_step": 100, "epoch_num": 1, "step_num": 100, "global_batch_size": 8}
    recorded = v2.read_common(tmp_path / "ours" / "iteration_00000100").get("mindspore")
    if optimizer is None:
        assert recorded is None
    else:
        assert recorded["global_step"] == 100 and recorded["learning_rate"] == pytest.approx(1e-4)
        assert ("beta1_power" in recorded) == (optimizer == "adam")
    err = capsys.readouterr().err
    assert ("names: kept (6 of 6 parameters are no known model's MindFormers names (emb.embedding_table, fc1.bias, "
            "fc1.weight, ...))") in err


@pytest.mark.parametrize("fmt,remove_redundancy", [("safetensors", False), ("safetensors", True), ("ckpt", False)])
@pytest.mark.parametrize("optimizer", ["adamw", None])
def test_generic_legacy_tree_converts_its_last_complete_step(tmp_path, fmt, remove_redundancy, optimizer):
    build_legacy(tmp_path / "mf", saves=[[(1, 2, 0), (1, 4, 0)], [(1, 2, 0)]], metas=[(1, 4), (1, 2)], fmt=fmt,
                 remove_redundancy=remove_redundancy, states=lambda e, s, x: net_legacy_state(e, s, x, optimizer))
    common = _converts(tmp_path / "mf", tmp_path / "ours", net_ours(net_legacy_state(1, 2, 0, optimizer)), 12)
    assert common["mindspore"] == {"epoch_num": 1, "global_batch_size": 8, "global_step": 12, "loss_scale": 1024.0,
                                   "step_num": 12, **({"learning_rate": pytest.approx(1e-4)} if optimizer else {})}


def _single_files(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ckpt-protobuf": folder / "net.ckpt", "safetensors-ms": folder / "net.safetensors",
             "legacy-rank-file": folder / "rank_0" / "net_rank_0-1_2.safetensors"}
    write_ms_ckpt(files["ckpt-protobuf"], state)
    save_file(state, files["safetensors-ms"], metadata={"format": "ms"})
    files["legacy-rank-file"].parent.mkdir()
    save_file(state, files["legacy-rank-file"], metadata={"format": "ms", "remove_redundancy": "False"})
    return files


@pytest.mark.parametrize("kind", ["ckpt-protobuf", "safetensors-ms", "legacy-rank-file"])
def test_single_mindspore_file_converts_inspects_verifies_and_diffs(tmp_path, capsys, kind):
    state = net_state(SEED, global_step=7)
    file = _single_files(tmp_path / "files", state)[kind]
    common = _converts(file, tmp_path / "ours", net_ours(state), 7)
    assert common["global_step"] == 7 and common["mindspore"]["global_step"] == 7
    capsys.readouterr()
    assert main(["inspect", str(file)]) == 0
    assert "optimizer.state.fc1.weight.exp_avg_sq" in capsys.readouterr().out
    assert main(["inspect", "--json", str(file)]) == 0
    assert json.loads(capsys.readouterr().out)["notes"][0] == (
        "names: kept (6 of 6 parameters are no known model's MindFormers names (emb.embedding_table, fc1.bias, "
        "fc1.weight, ...))")
    assert main(["verify", str(file)]) == 0
    assert capsys.readouterr().out == (f"{file}: OK (1 files checked: sizes and headers only: a MindSpore file "
                                       "carries no checksums)\n")
    assert main(["diff", str(file), str(tmp_path / "ours"), "--model-only"]) == 0


def test_pytorch_ckpt_is_flattened_by_dotted_names_and_its_values_kept(tmp_path):
    params = net_state(SEED, optimizer=None)
    nested = {"emb": {"embedding_table": params["emb.embedding_table"]},
              "fc1": {"weight": params["fc1.weight"], "bias": params["fc1.bias"]},
              "fc2.weight": params["fc2.weight"], "norm": {"gamma": params["norm.gamma"], "beta": params["norm.beta"]}}
    torch.save({"state_dict": nested, "epoch": 3, "global_step": 40, "hparams": {"lr": 0.1, "betas": (0.9, 0.99)}},
               tmp_path / "lightning.ckpt")
    common = _converts(tmp_path / "lightning.ckpt", tmp_path / "ours", params, 40)
    assert common["global_step"] == 40
    assert common["state"] == {"epoch": 3, "global_step": 40, "hparams": {"lr": 0.1, "betas": [0.9, 0.99]}}
    torch.save(params, tmp_path / "plain.pt", _use_new_zipfile_serialization=False)  # the legacy pickle format
    assert open_source(tmp_path / "plain.pt").tensors.keys() == params.keys()


def test_pytorch_file_with_other_pickled_objects_is_refused(tmp_path, capsys):
    torch.save({"w": torch.zeros(2), "opt": torch.optim.SGD}, tmp_path / "bad.pt")
    assert main(["inspect", str(tmp_path / "bad.pt")]) == 1  # unsafe: a damaged checkpoint
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.pt'}: refused by weights-only loading" in err


def test_a_folder_of_one_file_is_that_file_and_of_several_is_refused_naming_them(tmp_path, capsys):
    state = net_state(SEED, global_step=7)
    files = _single_files(tmp_path / "files", state)
    alone = tmp_path / "alone"
    alone.mkdir()
    os.link(files["ckpt-protobuf"], alone / "net.ckpt")
    assert open_source(alone).path == alone / "net.ckpt"
    os.link(files["safetensors-ms"], alone / "net.safetensors")
    capsys.readouterr()
    assert main(["convert", str(alone), str(tmp_path / "ours"), "--to", "v2", "--quiet"]) == 2
    folder = alone
    assert capsys.readouterr().err == (
        f"resumable convert: error: {folder} holds 2 checkpoint files and no checkpoint folder structure (no "
        f"tracker, iteration_* or rank_* folders): pass one of them: {folder / 'net.ckpt'}, "
        f"{folder / 'net.safetensors'}\n")


def test_names_hf_on_a_generic_network_is_one_clear_error(tmp_path, capsys):
    build_v2(tmp_path / "mf", 5, net_state(SEED, global_step=5))
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "ours"), "--to", "v2", "--names", "hf"]) == 2
    assert capsys.readouterr().err.endswith(
        f"resumable convert: error: {tmp_path / 'mf' / 'iteration_00000005'}: --names hf maps MindFormers "
        "names to HuggingFace, but 6 of 6 parameters are no known model's MindFormers names (emb.embedding_table, "
        "fc1.bias, fc1.weight, ...); the names known are those of resumable.models (qwen3): pass --names keep (or "
        "auto) to keep the checkpoint's own names\n")
    assert not (tmp_path / "ours").exists()


def test_names_keep_on_qwen3_keeps_the_mindformers_names(tmp_path, capsys):
    state = mf_state(SEED, global_step=100)
    build_v2(tmp_path / "mf", 100, state, dp=1, mp=2)
    _converts(tmp_path / "mf", tmp_path / "ours", net_ours(state), 100, "--names", "keep")
    assert "names: kept as stored (names='keep' / --names keep)" in capsys.readouterr().err
    # auto: every parameter is a Qwen3 name, so the mapping applies
    assert "model.layers.0.self_attn.q_proj.weight" in open_source(tmp_path / "mf").tensors


LAYOUTS = [FusedLayout(True, True), FusedLayout(False, False), FusedLayout(True, False)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["iteration", "checkpoint-folder-under-model_config"])
def test_fused_layout_is_read_from_the_recorded_config(tmp_path, capsys, layout, where):
    state = hf_to_mf(hf_state(SEED), HEADS, layout)
    state["global_step"] = torch.tensor([100], dtype=torch.int32)
    folder = build_v2(tmp_path / "mf", 100, state, dp=2, mp=2)
    keys = {"use_contiguous_weight_layout_attention": layout.use_contiguous_weight_layout_attention,
            "use_interleaved_weight_layout_mlp": layout.use_interleaved_weight_layout_mlp,
            "num_attention_heads": HEADS.num_heads, "num_key_value_heads": HEADS.num_kv_heads,
            "head_dim": HEADS.head_dim}
    config = folder / "config.json" if where == "iteration" else tmp_path / "mf" / "config.json"
    config.write_text(json.dumps(keys if where == "iteration" else {"model_config": keys}))
    _converts(tmp_path / "mf", tmp_path / "ours", hf_state(SEED), 100)
    assert f"use_contiguous_weight_layout_attention={str(layout.use_contiguous_weight_layout_attention).lower()}, " \
           f"from {config}" in capsys.readouterr().err


def test_fused_layout_flags_override_the_defaults_and_a_wrong_one_differs(tmp_path, capsys):
    layout = FusedLayout(True, False)
    state = hf_to_mf(hf_state(SEED), HEADS, layout)
    state["global_step"] = torch.tensor([100], dtype=torch.int32)
    build_v2(tmp_path / "mf", 100, state)
    _converts(tmp_path / "mf", tmp_path / "ours", hf_state(SEED), 100, "--use-contiguous-weight-layout-attention",
              "true", "--use-interleaved-weight-layout-mlp", "false")
    assert ("fused layout: linear_qkv [Q; K; V] (use_contiguous_weight_layout_attention=true, given), linear_fc1 "
            "[gate; up] (use_interleaved_weight_layout_mlp=false, given)") in capsys.readouterr().err
    wrong = open_source(tmp_path / "mf", fused={"use_interleaved_weight_layout_mlp": False})  # qkv: the default
    assert not torch.equal(wrong.tensors["model.layers.0.self_attn.q_proj.weight"].read(),
                           hf_state(SEED)["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(wrong.tensors["model.layers.0.mlp.up_proj.weight"].read(),
                       hf_state(SEED)["model.layers.0.mlp.up_proj.weight"])


def test_recorded_sizes_that_disagree_with_the_shapes_are_refused(tmp_path):
    folder = build_v2(tmp_path / "mf", 100, mf_state(SEED))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 8, "intermediate_size": 24}))
    with pytest.raises(ValueError, match=r"config.json says num_heads 8 but the shapes give 4"):
        open_source(tmp_path / "mf")
    (folder / "config.json").write_text(json.dumps({"intermediate_size": 20}))
    with pytest.raises(ValueError, match=r"decoder.layers.0.mlp.linear_fc1.weight has 48 rows; .* gives "
                                         r"intermediate_size 20"):
        open_source(tmp_path / "mf")
    (folder / "config.json").write_text(json.dumps({"use_interleaved_weight_layout_mlp": "yes"}))
    with pytest.raises(ValueError, match=r"use_interleaved_weight_layout_mlp must be true or false, got 'yes'"):
        open_source(tmp_path / "mf")


def test_our_own_single_legacy_rank_file_reads_as_the_tree(tmp_path):
    state = net_state(SEED, global_step=100)
    build_v2(tmp_path / "mf", 100, state)
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "legacy"), "--to", "legacy", "--quiet"]) == 0
    (file,) = (tmp_path / "legacy" / "rank_0").glob("*.safetensors")
    alone, tree = open_source(file), open_source(tmp_path / "legacy")
    assert (alone.path, alone.format) == (file, "legacy")
    assert alone.tensors.keys() == tree.tensors.keys()
    assert all(torch.equal(alone.tensors[n].read(), tree.tensors[n].read()) for n in tree.tensors)


def test_verify_of_our_single_rank_file_uses_its_meta_json_record(tmp_path, capsys):
    build_v2(tmp_path / "mf", 100, net_state(SEED, global_step=100))
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "legacy"), "--to", "legacy", "--quiet"]) == 0
    (file,) = (tmp_path / "legacy" / "rank_0").glob("*.safetensors")
    capsys.readouterr()
    assert main(["verify", str(file)]) == 0
    assert capsys.readouterr().out == f"{file}: OK (1 files checked: sizes, whole-file xxh3-64)\n"
    os.chmod(file, 0o600)
    with open(file, "ab") as f:
        f.write(b"x")
    assert main(["verify", str(file)]) == 1
    assert f"PROBLEM {file}: {file.stat().st_size} bytes on disk, meta.json records {file.stat().st_size - 1}" \
        in capsys.readouterr().out
