"""Qwen3's config.json mapping (resumable.models.qwen3): our model: keys ↔ config.json, the shapes it implies."""

from __future__ import annotations

import pytest

from resumable.models.qwen3 import (ModelConfig, config_mismatches, config_shape_problems, hf_config,
                                    infer_hf_config, model_keys_from_hf)

CFG = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)


def _shapes(cfg: ModelConfig = CFG) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of transformers' Qwen3ForCausalLM for ``cfg``, written out independently."""
    v, h, f, d = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    return out


def test_our_config_json_maps_back_to_the_same_model_keys():
    assert config_mismatches(CFG, hf_config(CFG)) == []
    assert config_mismatches(CFG.model_dump(), hf_config(CFG.model_dump())) == []
    keys = model_keys_from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_theta": 5.0}})
    assert (keys["head_dim"], keys["num_key_value_heads"], keys["rope_theta"], keys["tie_word_embeddings"]) == \
        (16, 4, 5.0, False)


def test_a_config_that_fits_the_shapes_has_no_problems():
    assert config_shape_problems(hf_config(CFG), _shapes()) == []
    tied = CFG.model_copy(update={"tie_word_embeddings": True})
    assert config_shape_problems(hf_config(tied), {k: v for k, v in _shapes().items() if k != "lm_head.weight"}) == []


def test_layers_missing_beyond_the_count_and_an_untied_lm_head_missing_are_all_listed():
    shapes = {k: v for k, v in _shapes().items() if k != "lm_head.weight"}
    assert config_shape_problems({**hf_config(CFG), "num_hidden_layers": 4}, shapes) == [
        "num_hidden_layers is 4, the checkpoint has no layers 2-3",
        "lm_head.weight: missing from the checkpoint (tie_word_embeddings is false)"]
    assert config_shape_problems({**hf_config(CFG), "num_hidden_layers": 1}, _shapes()) == [
        "the checkpoint has layer 1 beyond num_hidden_layers 1"]
    del shapes["model.layers.1.mlp.up_proj.weight"]
    assert "model.layers.{i}.mlp.up_proj.weight (layer 1): missing from the checkpoint" in \
        config_shape_problems(hf_config(CFG), shapes)


def test_a_config_without_sizes_or_with_heads_that_do_not_group_is_refused():
    assert config_shape_problems({"model_type": "qwen3", "hidden_size": 16}, _shapes())[:2] == [
        "config.json: vocab_size is None, expected a positive integer",
        "config.json: intermediate_size is None, expected a positive integer"]
    assert config_shape_problems({**hf_config(CFG), "num_key_value_heads": 3}, _shapes())[0] == \
        "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"


@pytest.mark.parametrize("tie", [False, True])
def test_a_config_inferred_from_the_shapes_is_the_model_s_own(tie):
    cfg = CFG.model_copy(update={"tie_word_embeddings": tie, "max_position_embeddings": 32768})
    shapes = {k: v for k, v in _shapes().items() if not (tie and k == "lm_head.weight")}
    config, notes = infer_hf_config(shapes, {"rope_theta": 1e6})
    assert config_mismatches(cfg.model_copy(update={"rope_theta": 1e6}), config) == []
    assert config["max_position_embeddings"] == 32768
    assert notes[1:] == ["rms_norm_eps 1e-06: transformers' Qwen3 default (shapes cannot tell it)",
                         "rope_theta 1000000.0 from the checkpoint's recorded config",
                         "max_position_embeddings 32768: transformers' Qwen3 default (shapes cannot tell it)"]


def test_no_config_is_inferred_for_other_names_or_inconsistent_shapes():
    with pytest.raises(ValueError, match=r"not Qwen3's HuggingFace names \(fc1.weight\)"):
        infer_hf_config({"fc1.weight": (3, 4)})
    shapes = {**_shapes(), "model.layers.1.self_attn.k_proj.weight": (8, 16)}  # layer 1 has one KV head
    with pytest.raises(ValueError, match=r"do not fit one Qwen3 config: model.layers.\{i\}.self_attn.k_proj.weight "
                                         r"\(layer 1\): \[8, 16\] in the checkpoint, config.json implies \[16, 16\]"):
        infer_hf_config(shapes)
