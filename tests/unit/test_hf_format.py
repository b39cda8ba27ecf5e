"""HuggingFace folders: our reader against transformers' writer, our writer against transformers' reader."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats.hf import (
    INDEX,
    SINGLE,
    HFTensor,
    index_hf_folder,
    load_json_object,
    read_hf_box,
    read_hf_config,
    safe_member,
    write_hf_folder,
)
from resumable.geometry import Box

transformers = pytest.importorskip("transformers")


def _tiny_qwen3(tie: bool = False):
    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.mark.parametrize("max_shard_size", [None, "5KB"], ids=["single-file", "sharded"])
def test_reader_indexes_a_transformers_folder(tmp_path, max_shard_size):
    model = _tiny_qwen3()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / INDEX).is_file() == bool(max_shard_size)
    state = model.state_dict()
    index = index_hf_folder(tmp_path)
    assert index.keys() == state.keys()
    for name, tensor in state.items():
        entry = index[name]
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(read_hf_box(entry, Box.full(entry.shape)), tensor)
    config = read_hf_config(tmp_path)
    assert (config["model_type"], config["num_key_value_heads"], config["head_dim"]) == ("qwen3", 2, 8)


def test_read_hf_box_reads_a_region(tmp_path):
    model = _tiny_qwen3()
    model.save_pretrained(tmp_path)
    entry = index_hf_folder(tmp_path)["model.layers.1.mlp.up_proj.weight"]
    full = model.state_dict()["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(read_hf_box(entry, Box((5, 3), (7, 4))), full[5:12, 3:7])
    with pytest.raises(ValueError, match=re.escape(
            "Box(offsets=(20, 0), shape=(5, 16)) lies outside 'model.layers.1.mlp.up_proj.weight' of shape [24, 16]")):
        read_hf_box(entry, Box((20, 0), (5, 16)))


def _tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("max_shard_size", [5 << 30, 3000])
def test_writer_output_loads_in_transformers_with_an_identical_state_dict(tmp_path, max_shard_size):
    model = _tiny_qwen3()
    state = model.state_dict()
    fetched: list[str] = []

    def get(name: str) -> torch.Tensor:
        fetched.append(name)
        return state[name]

    files = write_hf_folder(tmp_path / "out", model.config.to_dict(),
                            [(n, t.dtype, t.shape) for n, t in state.items()], get, max_shard_size=max_shard_size)
    assert fetched == list(state)
    shards = [load_file(f) for f in files]
    assert (len(shards) == 1) == (max_shard_size == 5 << 30)
    for shard, following in zip(shards, shards[1:] + [None]):
        assert _tensor_bytes(shard) <= max_shard_size or len(shard) == 1
        if following is not None:  # greedy: the next tensor did not fit
            first = following[next(n for n in fetched if n in following)]
            assert _tensor_bytes(shard) + first.numel() * first.element_size() > max_shard_size
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) and loaded[n].dtype == state[n].dtype for n in state)


def test_writer_output_reads_back_with_tied_embeddings_and_bf16(tmp_path):
    model = _tiny_qwen3(tie=True).to(torch.bfloat16)
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    write_hf_folder(tmp_path / "out", model.config.to_dict(),
                    [(n, t.dtype, t.shape) for n, t in state.items()], state.__getitem__, max_shard_size=2000)
    index = index_hf_folder(tmp_path / "out")
    assert index.keys() == state.keys()
    assert all(torch.equal(read_hf_box(index[n], Box.full(index[n].shape)), state[n]) for n in state)
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(reloaded.lm_head.weight, state["model.embed_tokens.weight"])


def test_writer_refuses_a_tensor_other_than_announced(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "tensor 'w' was announced as torch.float32 [2] but is torch.float32 [3]")):
        write_hf_folder(tmp_path / "o", {}, [("w", torch.float32, (2,))], lambda n: torch.zeros(3))


def test_writer_refuses_a_non_empty_folder_and_duplicate_names(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(FileExistsError, match=re.escape(
            f"{tmp_path} is not empty; write a HuggingFace folder into a new or empty folder")):
        write_hf_folder(tmp_path, {}, [], lambda n: torch.zeros(1))
    with pytest.raises(ValueError, match=re.escape("duplicate tensor names: ['a']")):
        write_hf_folder(tmp_path / "new", {}, [("a", torch.float32, ()), ("a", torch.float32, ())],
                        lambda n: torch.zeros(()))


def test_scalar_tensors_round_trip(tmp_path):
    write_hf_folder(tmp_path / "s", {}, [("s", torch.int64, ())], lambda n: torch.tensor(7))
    entry = index_hf_folder(tmp_path / "s")["s"]
    assert entry == HFTensor("s", tmp_path / "s" / SINGLE, torch.int64, ())
    assert read_hf_box(entry, Box.full(())).item() == 7


def _sharded(tmp_path, weight_map: dict) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("bad", ["../model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", 3])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, bad):
    _sharded(tmp_path, {"a": bad})
    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"weight_map entry {bad!r} in {tmp_path} is not a bare file name inside the checkpoint folder")):
        index_hf_folder(tmp_path)


def test_symlink_leaving_the_folder_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    save_file({"a": torch.zeros(2)}, tmp_path / "outside.safetensors")
    (tmp_path / "inner" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"'link.safetensors' in {tmp_path / 'inner'} resolves outside the folder")):
        safe_member(tmp_path / "inner", "link.safetensors", "shard")


def test_index_errors_name_the_file_and_tensor(tmp_path):
    _sharded(tmp_path, {"b": "model-00001-of-00001.safetensors"})
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path / INDEX} puts tensor 'b' in model-00001-of-00001.safetensors, which does not hold it")):
        index_hf_folder(tmp_path)
    _sharded(tmp_path, {"a": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"shard {tmp_path / 'model-00002-of-00002.safetensors'} named by {tmp_path / INDEX} does not exist")):
        index_hf_folder(tmp_path)
    (tmp_path / INDEX).write_text("[1]")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"HuggingFace index {tmp_path / INDEX}: top level is a JSON list, expected an object")):
        index_hf_folder(tmp_path)


def test_missing_or_broken_files_are_reported(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{tmp_path} holds neither {SINGLE} nor {INDEX}; is it a HuggingFace model folder?")):
        index_hf_folder(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"HuggingFace config {tmp_path / 'config.json'} does not exist")):
        read_hf_config(tmp_path)
    (tmp_path / SINGLE).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{tmp_path / SINGLE} is not a readable safetensors file: ")):
        index_hf_folder(tmp_path)


def test_json_files_are_bounded_and_must_parse(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"HuggingFace config {path} is 8 bytes, more than the 4 we parse")):
        load_json_object(path, "HuggingFace config", limit=4)
    path.write_text("{bad")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"HuggingFace config {path}: not valid JSON or not parsable (Expecting property name enclosed in double quotes")):
        read_hf_config(tmp_path)
