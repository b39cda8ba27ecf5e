import math

import pytest
import torch

from resumable.train.config import ModelConfig
from resumable.train.model import build_model, causal_lm_loss

SMALL = ModelConfig(num_hidden_layers=2)


def test_parameter_names_are_huggingface_qwen3_names():
    layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
             "input_layernorm.weight", "post_attention_layernorm.weight"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}" for i in range(2) for name in layer}
    assert set(build_model(SMALL, 0).state_dict()) == expected


def test_shapes_follow_the_config_with_grouped_query_attention():
    sd = build_model(SMALL, 0).state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 64)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 16)
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert sd["lm_head.weight"].shape == (256, 64)


def test_logits_have_shape_batch_sequence_vocabulary():
    logits = build_model(SMALL, 0)(torch.randint(0, 256, (3, 10)))
    assert logits.shape == (3, 10, 256)


def test_a_later_token_never_changes_earlier_logits():
    model = build_model(SMALL, 0)
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_initialisation_depends_only_on_the_seed():
    a, b, c = build_model(SMALL, 5).state_dict(), build_model(SMALL, 5).state_dict(), build_model(SMALL, 6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(a["model.layers.1.self_attn.k_norm.weight"], torch.ones(16))
    assert a["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_tied_embeddings_share_one_parameter():
    model = build_model(ModelConfig(num_hidden_layers=1, tie_word_embeddings=True), 0)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_untrained_loss_is_near_uniform_over_the_vocabulary():
    model = build_model(SMALL, 0)
    x = torch.randint(0, 256, (2, 16))
    loss = causal_lm_loss(model(x), torch.roll(x, -1, dims=1))
    assert loss.item() == pytest.approx(math.log(256), rel=0.02)
