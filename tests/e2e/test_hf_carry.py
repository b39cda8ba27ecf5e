"""What a conversion carries besides the tensors: config.json, generation and tokenizer files.

A HuggingFace folder converted to v2 (and on to legacy) and back to HuggingFace, with no
flag at all, must load in ``transformers`` with bit-identical logits (float32 in, float32
out: the same tensors) and hold the same generation and tokenizer files, byte for byte.
The files a checkpoint records are covered by its checksums: ``verify`` finds a damaged
one and a conversion refuses it. A config.json is checked against the shapes before
anything is written; a MindFormers Qwen3 gets an inferred one, an unknown model none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resumable.cli import main
from resumable.formats import hf_aux
from tests.e2e.test_hf_roundtrip import TOKENS, _hf_model
from tests.fixtures.mindformers import build_v2
from tests.fixtures.qwen3_mf import VOCAB, Heads, mf_state, reference_model

transformers = pytest.importorskip("transformers")

AUX = {  # what a tokenizer's save_pretrained writes, in miniature; tokenizer.model is binary (sentencepiece)
    "tokenizer.json": '{"model": {"type": "BPE", "vocab": {"é": 0, "<|im_end|>": 1}}}\n'.encode(),
    "tokenizer_config.json": b'{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}',
    "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}',
    "vocab.json": b'{"a": 0, "b": 1}', "merges.txt": b"#version: 0.2\na b\n",
    "tokenizer.model": bytes(range(256)) * 3,
}


def _hf_folder(folder: Path, tie: bool = False) -> torch.nn.Module:
    """A tiny transformers Qwen3 saved with save_pretrained (config.json, generation_config.json), plus AUX."""
    model = _hf_model(tie)
    model.save_pretrained(folder)
    for name, data in AUX.items():
        (folder / name).write_bytes(data)
    return model


def _carried(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in hf_aux.NAMES if (folder / name).exists()}


def _convert(src: Path, out: Path, to: str, *flags: str) -> int:
    return main(["convert", str(src), str(out), "--to", to, "--quiet", *flags])


def _logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("route,tie", [(["v2"], False), (["v2", "legacy"], True)], ids=["v2", "v2-legacy-tied"])
def test_a_huggingface_folder_comes_back_identical_through_v2_and_legacy_with_no_flags(tmp_path, route, tie):
    reference = _hf_folder(tmp_path / "src", tie)
    src = tmp_path / "src"
    for to in route:
        assert _convert(src, tmp_path / to, to) == 0
        src = tmp_path / to
    assert main(["verify", str(src)]) == 0
    assert _convert(src, tmp_path / "back", "hf") == 0
    back = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(_logits(back), _logits(reference))
    assert _carried(tmp_path / "back") == _carried(tmp_path / "src")
    assert sorted(_carried(tmp_path / "src")) == sorted([*AUX, "generation_config.json"])
    original = json.loads((tmp_path / "src" / "config.json").read_text())
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == original


@pytest.mark.parametrize("to", ["v2", "legacy"])
def test_a_damaged_recorded_tokenizer_file_is_found_by_verify_and_refused_by_convert(tmp_path, capsys, to):
    _hf_folder(tmp_path / "src")
    assert _convert(tmp_path / "src", tmp_path / to, to) == 0
    (carried,) = (tmp_path / to).rglob("tokenizer.json")
    assert carried.parent.name == hf_aux.FOLDER
    carried.write_bytes(carried.read_bytes().replace(b"BPE", b"BPF"))  # same size, other bytes
    capsys.readouterr()
    assert main(["verify", str(tmp_path / to)]) == 1
    assert f"PROBLEM {carried}: " in capsys.readouterr().out
    assert _convert(tmp_path / to, tmp_path / "hf", "hf") == 1  # damaged
    assert f"resumable convert: error: {carried}: " in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_an_hf_config_that_does_not_fit_the_tensors_is_refused_listing_every_problem(tmp_path, capsys):
    _hf_folder(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**config, "num_key_value_heads": 4, "intermediate_size": 40}))
    capsys.readouterr()
    assert _convert(tmp_path / "src", tmp_path / "hf", "hf", "--hf-config", str(tmp_path / "bad.json")) == 2
    gate = "[48, 32] in the checkpoint, config.json implies [40, 32] (intermediate_size 40, hidden_size 32)"
    kv = ("[16, 32] in the checkpoint, config.json implies [32, 32] (num_key_value_heads 4 × head_dim 8, "
          "hidden_size 32)")
    assert capsys.readouterr().err.splitlines() == [
        f"resumable convert: error: --hf-config does not fit the tensors of {tmp_path / 'src'} (5 problem(s)):",
        f"  model.layers.{{i}}.self_attn.k_proj.weight (layers 0-1): {kv}",
        f"  model.layers.{{i}}.self_attn.v_proj.weight (layers 0-1): {kv}",
        f"  model.layers.{{i}}.mlp.gate_proj.weight (layers 0-1): {gate}",
        f"  model.layers.{{i}}.mlp.up_proj.weight (layers 0-1): {gate}",
        "  model.layers.{i}.mlp.down_proj.weight (layers 0-1): [32, 48] in the checkpoint, config.json implies "
        "[32, 40] (hidden_size 32, intermediate_size 40)",
        "fix the config, or pass the model's own config.json"]
    assert not (tmp_path / "hf").exists()


def test_unified_from_a_mindformers_qwen3_has_a_config_json_transformers_loads(tmp_path):
    heads = Heads(4, 2, 16)
    reference = reference_model(heads, seed=0)
    build_v2(tmp_path / "mf", 10, mf_state(reference.state_dict(), heads, contiguous_qkv=False, interleaved_fc1=True))
    assert _convert(tmp_path / "mf", tmp_path / "unified", "unified") == 0
    config = json.loads((tmp_path / "unified" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"], config["rope_theta"]) == (2, 16, 10000.0)
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "unified").eval()
    assert torch.equal(_logits(loaded, TOKENS % VOCAB), _logits(reference, TOKENS % VOCAB))


def test_what_shapes_cannot_tell_comes_from_a_recorded_mindformers_config(tmp_path, caplog):
    heads = Heads(4, 2, 16)
    build_v2(tmp_path / "mf", 10, mf_state(reference_model(heads, seed=0).state_dict(), heads, contiguous_qkv=False,
                                           interleaved_fc1=True))
    recorded = {"model_config": {"rope_theta": 1e6, "rms_norm_eps": 1e-5}}  # MindFormers' keys, beside the iterations
    (tmp_path / "mf" / "config.json").write_text(json.dumps(recorded))
    with caplog.at_level("INFO", logger="resumable.tools.merge"):
        assert _convert(tmp_path / "mf", tmp_path / "unified", "unified") == 0
    config = json.loads((tmp_path / "unified" / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (1e6, 1e-5, 32768)
    assert "rope_theta 1000000.0 from the checkpoint's recorded config" in caplog.text
    assert "max_position_embeddings 32768: transformers' Qwen3 default (shapes cannot tell it)" in caplog.text


def test_unified_from_an_unknown_network_has_no_config_json_and_hf_is_refused(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    build_v2(tmp_path / "mf", 3, {"fc1.weight": torch.randn(4, 3, generator=g), "norm.gamma": torch.ones(4)})
    assert _convert(tmp_path / "mf", tmp_path / "unified", "unified") == 0
    assert sorted(p.name for p in (tmp_path / "unified").iterdir()) == ["common.json", "model.safetensors"]
    capsys.readouterr()
    assert _convert(tmp_path / "mf", tmp_path / "hf", "hf") == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the notes on how the source was read
    assert error == (f"resumable convert: error: {tmp_path / 'mf' / 'iteration_00000003'}: it records no model "
                     "config, and no known model's config follows from its tensors: its tensors are not Qwen3's "
                     "HuggingFace names (fc1.weight, norm.gamma); pass --hf-config config.json (or --config C.yaml) "
                     "to export it as a HuggingFace folder")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("yaml_text,message", [
    (None, "--config: {path} does not exist: check the path\n"),
    ("model: [1, 2", "--config {path} is not valid YAML: line 1, column 13: expected ',' or ']', but got "
                     "'<stream end>'\n"),
    ("seed: 3\n", "--config {path}: no model: section (a mapping of the model's sizes) to write config.json from"),
    ("model:\n  hidden_sise: 64\n", "invalid config:\n  {path}: model.hidden_sise: unknown key; did you mean "
                                    "model.hidden_size?\n"),
], ids=["missing", "bad-yaml", "no-model-section", "unknown-key"])
def test_convert_config_yaml_errors_name_the_file_and_the_key(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "c.yaml"
    if yaml_text is not None:
        path.write_text(yaml_text)
    assert _convert(tmp_path / "no-such-checkpoint", tmp_path / "hf", "hf", "--config", str(path)) == 2
    assert capsys.readouterr().err.startswith("resumable convert: error: " + message.format(path=path))
