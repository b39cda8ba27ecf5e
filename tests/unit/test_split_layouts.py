"""``split --layout``: which model a checkpoint is, and layouts refused before anything is written.

Sources are real HuggingFace-style folders (one ``model.safetensors``) holding a tiny
Qwen3 (4 heads, 2 KV heads, head_dim 4, 2 layers) or a generic network; the command runs
in-process through ``resumable.cli.main``, exit code 2 being a ``ConfigError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resumable.cli import main
from resumable.formats import v2
from resumable.models import identify
from resumable.tools.rules import parse_layout

HIDDEN, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 8, 4, 2, 4, 12, 16, 2


def qwen3_tensors(heads: int = HEADS, kv: int = KV, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                   f"{p}.self_attn.q_proj.weight": (heads * HEAD_DIM, HIDDEN),
                   f"{p}.self_attn.k_proj.weight": (kv * HEAD_DIM, HIDDEN),
                   f"{p}.self_attn.v_proj.weight": (kv * HEAD_DIM, HIDDEN),
                   f"{p}.self_attn.o_proj.weight": (HIDDEN, heads * HEAD_DIM),
                   f"{p}.self_attn.q_norm.weight": (HEAD_DIM,), f"{p}.self_attn.k_norm.weight": (HEAD_DIM,),
                   f"{p}.mlp.gate_proj.weight": (FFN, HIDDEN), f"{p}.mlp.up_proj.weight": (FFN, HIDDEN),
                   f"{p}.mlp.down_proj.weight": (HIDDEN, FFN)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def folder(root: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    root.mkdir()
    save_file(tensors, str(root / "model.safetensors"))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def split(src: Path, out: Path, layout: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["split", str(src), str(out), "--layout", layout, "--quiet"])
    return code, capsys.readouterr().err


def test_identify_names_qwen3_when_every_parameter_is_a_qwen3_name_optimizer_states_included() -> None:
    names = [*qwen3_tensors(), "optimizer.state.model.norm.weight.exp_avg", "optimizer.state.lm_head.weight.step"]
    found = identify(names)
    assert (found.model, found.reason) == ("qwen3", "all 25 parameters are HuggingFace names of resumable.models.qwen3")
    mixed = identify([*names, "fc1.weight", "optimizer.state.fc2.weight.exp_avg"])
    assert (mixed.model, mixed.unknown) == (None, ("fc1.weight", "fc2.weight"))
    assert mixed.reason == "2 of 27 parameters are no known model's HuggingFace names (fc1.weight, fc2.weight)"
    # MindFormers names are not HuggingFace names: a mapping must apply first.
    assert identify(["decoder.final_layernorm.weight"]).model is None
    assert identify([]).reason == "no tensors"


def test_a_repeated_layout_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^--layout 'tp=2,tp=4': tp is given twice \(tp=2 and tp=4\); give each "
                                         r"of pp, dp, tp at most once$"):
        parse_layout("tp=2,tp=4")


def test_tp_1000_on_a_small_checkpoint_is_refused_at_once_and_writes_nothing(tmp_path, capsys) -> None:
    src = folder(tmp_path / "src", qwen3_tensors())
    code, err = split(src, tmp_path / "out", "tp=1000", capsys)
    assert code == 2
    assert err.startswith(f"resumable split: error: cannot split {src} for layout pp=1,dp=1,tp=1000: its 4 attention "
                          "heads do not divide by tp=1000: tensor parallelism gives each rank whole heads; its 2 KV "
                          "heads do not divide by tp=1000")
    assert "tp=1000 is larger than the dim it would split of 16 tensor(s) (lm_head.weight: 16, " in err
    assert not (tmp_path / "out").exists()


def test_heads_come_from_config_json_when_the_source_has_one(tmp_path, capsys) -> None:
    # The shapes hold 4 KV heads, config.json says 2: tp=4 is refused for the config's.
    src = folder(tmp_path / "src", qwen3_tensors(kv=4), {"num_attention_heads": HEADS, "num_key_value_heads": 2})
    code, err = split(src, tmp_path / "out", "tp=4", capsys)
    assert code == 2 and "its 2 KV heads do not divide by tp=4" in err and "attention heads" not in err
    assert not (tmp_path / "out").exists()


def test_tp_larger_than_a_split_dim_is_refused_even_when_the_heads_divide(tmp_path, capsys) -> None:
    src = folder(tmp_path / "src", qwen3_tensors(heads=4, kv=4, vocab=3))
    code, err = split(src, tmp_path / "out", "tp=4", capsys)
    assert code == 2
    assert err == (f"resumable split: error: cannot split {src} for layout pp=1,dp=1,tp=4: tp=4 is larger than the "
                   "dim it would split of 2 tensor(s) (lm_head.weight: 3, model.embed_tokens.weight: 3)\n")


def test_more_stages_than_layers_is_refused(tmp_path, capsys) -> None:
    src = folder(tmp_path / "src", qwen3_tensors())
    code, err = split(src, tmp_path / "out", "pp=3", capsys)
    assert (code, err) == (2, f"resumable split: error: cannot split {src} for layout pp=3,dp=1,tp=1: pp=3 exceeds "
                              "its 2 layers: every stage needs at least one layer\n")


def test_tensor_parallelism_of_an_unknown_model_is_refused_naming_its_tensors(tmp_path, capsys) -> None:
    tensors = {f"encoder.block{i}.weight": torch.ones(4, 4) for i in range(5)} | {"model.norm.weight": torch.ones(4)}
    src = folder(tmp_path / "src", tensors)
    code, err = split(src, tmp_path / "out", "dp=2,tp=2", capsys)
    assert (code, err) == (2, (
        f"resumable split: error: cannot split {src} for layout pp=1,dp=2,tp=2: tensor parallelism needs the plan "
        "of a known model, and this is none: 5 of 6 parameters are no known model's HuggingFace names "
        "(encoder.block0.weight, encoder.block1.weight, encoder.block2.weight, ...); split it with tp=1 "
        "(dp and pp only)\n"))
    assert not (tmp_path / "out").exists()
    code, err = split(src, tmp_path / "out", "pp=2", capsys)
    assert code == 2 and "pipeline stages need numbered layers (model.layers.{i}.*) and no tensor has one" in err
    # Data parallelism replicates every tensor, whatever the model: that is what any trainer holds.
    assert split(src, tmp_path / "out", "dp=2", capsys)[0] == 0


def test_an_unknown_model_with_numbered_layers_splits_over_stages(tmp_path, capsys) -> None:
    tensors = {f"model.layers.{i}.mixer.weight": torch.full((2,), float(i)) for i in range(3)}
    src = folder(tmp_path / "src", tensors | {"model.embed_tokens.weight": torch.ones(5, 2)})
    assert split(src, tmp_path / "out", "pp=2", capsys) == (0, "")
    meta = v2.read_metadata(tmp_path / "out" / "iteration_00000000")
    holders = {name: sorted({meta.files[s.file].rank for _, copies in meta.stored(name) for s in copies})
               for name in meta.tensors}
    # Stage 0 owns layers 0 and 1 and the embedding (HuggingFace's decoder convention), stage 1 layer 2.
    assert holders == {"model.embed_tokens.weight": [0], "model.layers.0.mixer.weight": [0],
                       "model.layers.1.mixer.weight": [0], "model.layers.2.mixer.weight": [1]}
