"""open_source on single files and on MindSpore names: what is read, what is refused and why, what is noted."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from resumable.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v1
from resumable.formats.ms_ckpt import write_ms_ckpt
from resumable.formats.safetensors_io import write_file
from resumable.models.qwen3 import AttentionShape, FusedLayout, fuse_qkv
from resumable.sources import open_source
from tests.fixtures.mindformers import build_legacy, build_v2, mf_state, net_legacy_state, net_state

SEED = 4


def _open_in_time(path, seconds: float = 10.0):
    """open_source in a thread: a FIFO must be refused, never block."""
    out: dict = {}

    def run() -> None:
        try:
            out["source"] = open_source(path)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"open_source({path}) blocked"
    return out


def test_a_fifo_among_a_folders_files_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "net.ckpt")
    error = _open_in_time(tmp_path)["error"]
    assert isinstance(error, UnsafeCheckpointError)
    assert "net.ckpt is a FIFO (named pipe), not a regular file" in str(error)
    assert isinstance(_open_in_time(tmp_path / "net.ckpt")["error"], CheckpointNotFoundError)


def test_garbage_single_files_are_corrupt_naming_the_file(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError, match="a.ckpt"):
        open_source(tmp_path / "a.ckpt")
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CorruptCheckpointError, match=r"t.pt: holds a Tensor, not a dict of tensors"):
        open_source(tmp_path / "t.pt")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match=r"x.txt: not a checkpoint file"):
        open_source(tmp_path / "x.txt")


def test_a_pytorch_file_nested_too_deep_is_refused(tmp_path):
    doc: dict = {"w": torch.zeros(1)}
    for _ in range(40):
        doc = {"d": doc}
    torch.save(doc, tmp_path / "deep.pt")
    with pytest.raises(UnsafeCheckpointError, match="nests deeper than 32 levels"):
        open_source(tmp_path / "deep.pt")


def test_one_file_of_a_2_0_iteration_or_a_rank_share_is_refused_naming_the_folder(tmp_path):
    folder = build_v2(tmp_path / "v2", 3, net_state(SEED, global_step=3), dp=2)
    file = folder / "model-0000000-0000002.safetensors"
    with pytest.raises(CheckpointNotFoundError, match=rf"pass its folder {folder}$"):
        open_source(file)
    build_legacy(tmp_path / "tree", saves=[[(1, 2, 0)], [(1, 2, 0)]], metas=[None, None], remove_redundancy=True,
                 states=lambda e, s, x: net_legacy_state(e, s, x))
    with pytest.raises(CheckpointNotFoundError, match=rf"holds only rank_1's share of the tensors; pass the tree "
                                                      rf"{tmp_path / 'tree'} instead"):
        open_source(tmp_path / "tree" / "rank_1" / "tiny_rank_1-1_2.safetensors")


def test_two_optimizers_moments_of_one_parameter_are_corrupt(tmp_path):
    state = {"w": torch.zeros(2), "adam_m.w": torch.ones(2), "moment1.w": torch.ones(2)}
    save_file(state, tmp_path / "net.safetensors", metadata={"format": "ms"})
    with pytest.raises(CorruptCheckpointError, match=r"'adam_m.w' and 'moment1.w' are both "
                                                     r"'optimizer.state.w.exp_avg'"):
        open_source(tmp_path / "net.safetensors")


def test_a_scalar_name_of_many_elements_stays_a_tensor_with_a_note(tmp_path):
    write_ms_ckpt(tmp_path / "net.ckpt", {"w": torch.zeros(2), "learning_rate": torch.arange(3.0),
                                          "global_step": torch.tensor([5], dtype=torch.int32)})
    source = open_source(tmp_path / "net.ckpt")
    assert torch.equal(source.tensors["learning_rate"].read(), torch.arange(3.0))
    assert source.common["mindspore"] == {"global_step": 5}
    assert "learning_rate: kept as a tensor of shape [3] (MindSpore's scalar of that name has one element)" \
        in source.notes


def test_names_must_be_auto_keep_or_hf(tmp_path):
    with pytest.raises(ConfigError, match="names 'HF': choose one of auto, keep, hf"):
        open_source(tmp_path, names="HF")  # type: ignore[arg-type]


def test_qwen3_notes_say_which_names_heads_and_layout(tmp_path):
    build_v2(tmp_path, 9, mf_state(SEED))
    notes = open_source(tmp_path).notes
    params = sum(1 for n in mf_state(SEED) if n.startswith(("embedding.", "decoder.", "output_layer.")))
    assert notes == [
        f"names: mapped MindFormers names to HuggingFace (all {params} parameters are MindFormers names of "
        "resumable.models.qwen3)",
        "fused layout: linear_qkv grouped per KV head (use_contiguous_weight_layout_attention=false, MindFormers' "
        "default), linear_fc1 interleaved gate/up rows (use_interleaved_weight_layout_mlp=true, MindFormers' "
        "default)",
        "heads: 4 attention heads, 2 KV heads, head_dim 8 (inferred from the shapes; checked against the shapes)",
        'scalars: global_step, learning_rate recorded in common.json ("mindspore")']


def test_with_one_kv_head_both_qkv_layouts_read_the_same_and_say_so(tmp_path):
    heads = AttentionShape(num_heads=2, num_kv_heads=1, head_dim=4)
    g = torch.Generator().manual_seed(SEED)
    q, k, v = torch.randn(8, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    p = "decoder.layers.0.self_attention."
    save_file({p + "linear_qkv.weight": fuse_qkv(q, k, v, heads), p + "linear_proj.weight": torch.randn(8, 8),
               p + "q_layernorm.weight": torch.ones(4), p + "k_layernorm.weight": torch.ones(4)},
              tmp_path / "attn.safetensors")
    for contiguous in (False, True):
        source = open_source(tmp_path / "attn.safetensors", fused=FusedLayout(contiguous, True))
        assert torch.equal(source.tensors["model.layers.0.self_attn.q_proj.weight"].read(), q)
        assert torch.equal(source.tensors["model.layers.0.self_attn.v_proj.weight"].read(), v)
        assert "fused layout: with 1 KV head the grouped and contiguous linear_qkv layouts are the same rows" \
            in source.notes


def test_heads_that_do_not_fit_the_shapes_are_refused(tmp_path):
    build_v2(tmp_path, 9, mf_state(SEED))
    with pytest.raises(ConfigError, match=r"decoder.layers.0.self_attention.linear_qkv.weight has shape \[64, 16\], "
                                          r"but 2 heads, 2 KV heads of dim 8 \(given \(--heads\)\) need 48 along dim 0"):
        open_source(tmp_path, heads=AttentionShape(2, 2, 8))


def _our_rank_file(path, world: int, chunks: dict, tensors: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, tensors, v1.file_metadata(chunks, rank=1, layout={"world_size": world, "mesh": None,
                                                                       "pipeline_stages": 1},
                                               remove_redundancy=False, context={"state": {"global_step": 3},
                                                                                 "rank_local": None}))


def test_our_rank_file_alone_is_read_when_full_and_refused_when_a_part(tmp_path):
    full = tmp_path / "a" / "rank_1" / "q_rank_1-1_3.safetensors"
    _our_rank_file(full, 2, {"w": ("w", [2, 3], [0, 0])}, [("w", torch.ones(2, 3))])  # data parallel: full
    source = open_source(full)
    assert (source.path, source.format, source.common["global_step"]) == (full, "legacy", 3)
    assert torch.equal(source.tensors["w"].read(), torch.ones(2, 3))
    part = tmp_path / "b" / "rank_1" / "q_rank_1-1_3.safetensors"
    _our_rank_file(part, 2, {"w": ("w", [4, 3], [2, 0])}, [("w", torch.ones(2, 3))])  # tensor parallel: rows 2-3
    with pytest.raises(CheckpointNotFoundError, match=rf"{part} holds rank 1's part of a 2-rank Checkpoint 1.0 step, "
                                                      rf"not full tensors: pass the tree holding every rank_\* folder "
                                                      rf"\({tmp_path / 'b'}\) instead"):
        open_source(part)


def test_an_iteration_folder_under_another_name_is_still_read(tmp_path):
    folder = build_v2(tmp_path / "mf", 7, net_state(SEED, global_step=7), dp=2)
    shutil.copytree(folder, tmp_path / "copy")
    source = open_source(tmp_path / "copy")
    assert (source.format, source.iteration, source.common["global_step"]) == ("mindformers", 7, 7)
    assert "optimizer.state.fc1.weight.exp_avg" in source.tensors


def test_two_optimizers_moments_of_one_qwen3_parameter_are_corrupt_too(tmp_path):
    state = mf_state(SEED)
    name = "decoder.final_layernorm.weight"
    state["moment1." + name] = state["adam_m." + name]
    build_v2(tmp_path, 9, state)
    with pytest.raises(CorruptCheckpointError, match=rf"'adam_m.{name}' and 'moment1.{name}' are both "
                                                     r"'optimizer.state.model.norm.weight.exp_avg'"):
        open_source(tmp_path)


def test_optimizer_state_alone_splits_by_its_moments_shapes(tmp_path):
    state = {n: t for n, t in mf_state(SEED).items() if n.startswith("adam_")}  # an opt file without its model file
    build_v2(tmp_path, 9, state)
    source = open_source(tmp_path)
    assert "heads: 4 attention heads, 2 KV heads, head_dim 8 (inferred from the shapes; checked against the shapes)" \
        in source.notes
    assert "optimizer.state.model.layers.1.self_attn.v_proj.weight.exp_avg" in source.tensors
    state["adam_v.decoder.final_layernorm.weight"] = torch.ones(3)
    build_v2(tmp_path / "bad", 9, state)
    with pytest.raises(CorruptCheckpointError, match=r"'adam_v.decoder.final_layernorm.weight' has shape \[3\] but "
                                                     r"parameter 'decoder.final_layernorm.weight'"):
        open_source(tmp_path / "bad")
