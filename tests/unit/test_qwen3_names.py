"""MindFormers Qwen3 names ↔ HuggingFace names, and the fused qkv / fc1 transforms in both layouts."""

from __future__ import annotations

import re

import pytest
import torch

from resumable.formats.ms_names import SCALARS
from resumable.models.qwen3 import (
    AttentionShape,
    FusedLayout,
    NameMap,
    fc1_rows,
    fuse_fc1,
    fuse_qkv,
    hf_to_mf,
    map_mf_name,
    mf_to_hf,
    qkv_rows,
    split_fc1,
    split_qkv,
)
from resumable.geometry import runs

HEADS = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=3)
HIDDEN = 5


def _heads_rows(prefix: str, count: int, dim: int) -> list[str]:
    return [f"{prefix}{h}.{r}" for h in range(count) for r in range(dim)]


def test_qkv_layout_is_grouped_per_kv_head():
    # Label every row of q, k, v by (head, row in head); fuse; read the labels back in order.
    q = _heads_rows("q", 4, 3)
    k = _heads_rows("k", 2, 3)
    v = _heads_rows("v", 2, 3)
    q_rows, k_rows, v_rows = qkv_rows(HEADS)
    fused = [""] * 24
    for labels, rows in ((q, q_rows), (k, k_rows), (v, v_rows)):
        for label, row in zip(labels, rows):
            fused[row] = label
    assert fused == (
        _heads_rows("q", 2, 3) + ["k0.0", "k0.1", "k0.2", "v0.0", "v0.1", "v0.2"]
        + [f"q{h}.{r}" for h in (2, 3) for r in range(3)] + ["k1.0", "k1.1", "k1.2", "v1.0", "v1.1", "v1.2"]
    )


def test_qkv_rows_read_as_one_run_per_group():
    q_rows, k_rows, v_rows = qkv_rows(HEADS)
    assert runs(q_rows) == [(0, 6), (12, 6)]
    assert runs(k_rows) == [(6, 3), (18, 3)]
    assert runs(v_rows) == [(9, 3), (21, 3)]


def test_split_qkv_matches_the_layout_on_values():
    fused = torch.arange(24 * HIDDEN).reshape(24, HIDDEN)
    q, k, v = split_qkv(fused, HEADS)
    assert torch.equal(q, torch.cat([fused[0:6], fused[12:18]]))
    assert torch.equal(k, torch.cat([fused[6:9], fused[18:21]]))
    assert torch.equal(v, torch.cat([fused[9:12], fused[21:24]]))


@pytest.mark.parametrize("heads", [AttentionShape(4, 2, 3), AttentionShape(8, 1, 2), AttentionShape(3, 3, 4)])
def test_qkv_split_then_fuse_is_identity(heads):
    rows = (heads.num_heads + 2 * heads.num_kv_heads) * heads.head_dim
    fused = torch.randn(rows, HIDDEN, dtype=torch.float64)
    assert torch.equal(fuse_qkv(*split_qkv(fused, heads), heads), fused)
    q = torch.randn(heads.num_heads * heads.head_dim, HIDDEN)
    k = torch.randn(heads.num_kv_heads * heads.head_dim, HIDDEN)
    v = torch.randn(heads.num_kv_heads * heads.head_dim, HIDDEN)
    for got, want in zip(split_qkv(fuse_qkv(q, k, v, heads), heads), (q, k, v)):
        assert torch.equal(got, want)


def test_fc1_is_interleaved_row_by_row():
    gate = torch.tensor([[1.0], [2.0], [3.0]])
    up = torch.tensor([[10.0], [20.0], [30.0]])
    assert fuse_fc1(gate, up).flatten().tolist() == [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]
    assert fc1_rows(6) == ([0, 2, 4], [1, 3, 5])


def test_fc1_split_then_fuse_is_identity():
    fused = torch.randn(14, HIDDEN).bfloat16()
    assert torch.equal(fuse_fc1(*split_fc1(fused)), fused)


def test_wrong_shapes_are_refused_with_the_expected_row_count():
    with pytest.raises(ValueError, match=re.escape("linear_qkv must have 24 rows, got shape [23, 5]")):
        split_qkv(torch.zeros(23, 5), HEADS)
    with pytest.raises(ValueError, match=re.escape("k_proj must have 6 rows, got shape [3, 5]")):
        fuse_qkv(torch.zeros(12, 5), torch.zeros(3, 5), torch.zeros(6, 5), HEADS)
    with pytest.raises(ValueError, match=re.escape("linear_fc1 must have an even number of rows, got 7")):
        split_fc1(torch.zeros(7, 5))
    with pytest.raises(ValueError, match=re.escape("gate_proj [3, 5] and up_proj [2, 5] differ in shape")):
        fuse_fc1(torch.zeros(3, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=re.escape("num_heads (5) must be a multiple of num_kv_heads (2)")):
        AttentionShape(5, 2, 3)


@pytest.mark.parametrize(("mf", "hf"), [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight"),
    ("decoder.layers.11.self_attention.linear_proj.weight", "model.layers.11.self_attn.o_proj.weight"),
    ("decoder.layers.2.self_attention.q_layernorm.weight", "model.layers.2.self_attn.q_norm.weight"),
    ("decoder.layers.2.self_attention.k_layernorm.weight", "model.layers.2.self_attn.k_norm.weight"),
    ("decoder.layers.3.pre_mlp_layernorm.weight", "model.layers.3.post_attention_layernorm.weight"),
    ("decoder.layers.3.mlp.linear_fc2.weight", "model.layers.3.mlp.down_proj.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
])
def test_renamed_parameters_and_their_optimizer_states(mf, hf):
    assert map_mf_name(mf) == NameMap(mf, "rename", (hf,))
    for prefix, state in (("adam_m.", "exp_avg"), ("moment1.", "exp_avg"),
                          ("adam_v.", "exp_avg_sq"), ("moment2.", "exp_avg_sq")):
        assert map_mf_name(prefix + mf).hf_names == (f"optimizer.state.{hf}.{state}",)


def test_fused_parameters_map_to_their_parts_in_order():
    assert map_mf_name("decoder.layers.7.self_attention.linear_qkv.weight") == NameMap(
        "decoder.layers.7.self_attention.linear_qkv.weight", "qkv",
        ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
         "model.layers.7.self_attn.v_proj.weight"))
    assert map_mf_name("adam_v.decoder.layers.0.mlp.linear_fc1.weight") == NameMap(
        "adam_v.decoder.layers.0.mlp.linear_fc1.weight", "fc1",
        ("optimizer.state.model.layers.0.mlp.gate_proj.weight.exp_avg_sq",
         "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg_sq"))


@pytest.mark.parametrize("name", sorted(SCALARS))
def test_scalars_are_dropped_with_a_reason(name):
    mapped = map_mf_name(name)
    assert mapped.transform == "drop" and mapped.hf_names == () and mapped.reason == SCALARS[name]
    assert mf_to_hf(name, torch.zeros(1), HEADS) == {}


@pytest.mark.parametrize("name", [
    "decoder.layers.x.input_layernorm.weight",
    "decoder.layers.0.input_layernorm.weight.extra",
    "prefix.decoder.final_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.bias",
    "adam_m.",
])
def test_names_matching_no_table_entry_exactly_are_errors(name):
    with pytest.raises(ValueError, match=re.escape(f"unknown MindFormers Qwen3 tensor name {name!r}: it matches no entry")):
        map_mf_name(name)


def test_hf_to_mf_refuses_unknown_names_and_incomplete_fusions():
    with pytest.raises(ValueError, match=re.escape("no MindFormers name for 'optimizer.state.model.norm.weight.step'")):
        hf_to_mf({"optimizer.state.model.norm.weight.step": torch.zeros(())}, HEADS)
    with pytest.raises(ValueError, match=re.escape(
            "cannot build 'decoder.layers.0.mlp.linear_fc1.weight': missing ['model.layers.0.mlp.up_proj.weight']")):
        hf_to_mf({"model.layers.0.mlp.gate_proj.weight": torch.zeros(2, 2)}, HEADS)


def test_whole_state_round_trips_through_both_directions():
    mf = {
        "embedding.word_embeddings.weight": torch.randn(11, HIDDEN),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(24, HIDDEN),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, HIDDEN),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(HIDDEN, 4),
        "adam_m.decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(24, HIDDEN),
        "adam_v.decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, HIDDEN),
        "adam_v.output_layer.weight": torch.randn(11, HIDDEN),
    }
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in mf.items():
        hf.update(mf_to_hf(name, tensor, HEADS))
    assert len(hf) == 1 + 3 + 2 + 1 + 3 + 2 + 1
    assert hf["optimizer.state.model.layers.0.self_attn.k_proj.weight.exp_avg"].shape == (6, HIDDEN)
    back = hf_to_mf(hf, HEADS)
    assert back.keys() == mf.keys()
    assert all(torch.equal(back[n], mf[n]) for n in mf)


def test_contiguous_qkv_and_concatenated_fc1_rows():
    contiguous = FusedLayout(use_contiguous_weight_layout_attention=True, use_interleaved_weight_layout_mlp=False)
    q, k, v = qkv_rows(HEADS, contiguous)
    assert (runs(q), runs(k), runs(v)) == ([(0, 12)], [(12, 6)], [(18, 6)])
    assert fc1_rows(6, contiguous) == ([0, 1, 2], [3, 4, 5])
    fused = torch.randn(24, HIDDEN)
    assert torch.equal(fuse_qkv(*split_qkv(fused, HEADS, contiguous), HEADS, contiguous), fused)
    assert torch.equal(split_qkv(fused, HEADS, contiguous)[1], fused[12:18])
    fc1 = torch.randn(8, HIDDEN)
    gate, up = split_fc1(fc1, contiguous)
    assert torch.equal(gate, fc1[:4]) and torch.equal(up, fc1[4:])
    assert torch.equal(fuse_fc1(gate, up, contiguous), fc1)
