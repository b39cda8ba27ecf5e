"""HuggingFace interop against real ``transformers``: import into our model, export back out.

A tiny random ``transformers.Qwen3ForCausalLM`` saved with ``save_pretrained`` must give
our model the same logits; our Checkpoint 2.0 exported with ``resumable convert --to hf``
must load into ``transformers`` with the same logits. Tolerance 1e-5: both run the same
float32 operations (SDPA, RMSNorm in float32, the same rotary tables), only kernel
choices differ (~1e-7).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from resumable.cli import main
from resumable.errors import ConfigError
from resumable.models.qwen3 import hf_config
from resumable.save import save
from resumable.train.config import ModelConfig, load_config
from resumable.train.model import build_model
from resumable.train.pretrained import init_from_pretrained, load_pretrained
from tests.e2e.jobs import run_job, train_cmd

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def _hf_model(tie: bool = False):
    torch.manual_seed(11)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SIZES, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie,shard", [(False, None), (False, "20KB"), (True, None)],
                         ids=["single-file", "sharded", "tied"])
def test_transformers_folder_initialises_our_model_with_the_same_logits(tmp_path, tie, shard):
    reference = _hf_model(tie)
    reference.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    cfg = ModelConfig(**SIZES, tie_word_embeddings=tie)
    ours = build_model(cfg, seed=0)
    load_pretrained(ours, tmp_path, cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), reference(TOKENS).logits, atol=1e-5, rtol=0)


def test_config_mismatches_are_listed_at_once(tmp_path):
    _hf_model().save_pretrained(tmp_path)
    cfg = ModelConfig(**{**SIZES, "hidden_size": 64, "num_key_value_heads": 4}, tie_word_embeddings=True)
    with pytest.raises(ConfigError) as err:
        load_pretrained(build_model(cfg, seed=0), tmp_path, cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == f"pretrained_model_dir {tmp_path} does not match the model config:"
    assert lines[1:4] == ["  model.hidden_size: 64 in the YAML, 32 in config.json",
                          "  model.num_key_value_heads: 4 in the YAML, 2 in config.json",
                          "  model.tie_word_embeddings: True in the YAML, False in config.json"]
    assert "  model.embed_tokens.weight: shape [96, 64] in the model, [96, 32] in model.safetensors" in lines
    assert lines[-1] == "set model: to the folder's config.json values"


def test_load_checkpoint_wins_over_pretrained_model_dir(tmp_path, caplog):
    cfg = load_config(None, [f"pretrained_model_dir={tmp_path / 'missing'}", f"load_checkpoint={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="resumable.train.pretrained"):
        init_from_pretrained(None, cfg)  # type: ignore[arg-type]  # returns before touching the trainer
    assert caplog.messages == [f"pretrained_model_dir {tmp_path / 'missing'} ignored: load_checkpoint {tmp_path} "
                               "is set and takes precedence"]


def test_export_to_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    cfg = ModelConfig(**SIZES)
    ours = build_model(cfg, seed=5)
    optim = torch.optim.AdamW(ours.parameters())
    ours(TOKENS).sum().backward()
    optim.step()
    state = {"model": ours.state_dict(), "optimizer": {"state": {
        n: optim.state[p] for n, p in ours.named_parameters()}}, "global_step": 1}
    save(state, tmp_path / "ckpt", 1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": SIZES}))
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf",
                 "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, ours(TOKENS), atol=1e-5, rtol=0)
    # and the export round-trips through our importer
    again = build_model(cfg, seed=0)
    load_pretrained(again, tmp_path / "hf", cfg)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_export_of_an_unknown_model_without_model_config_asks_for_one(tmp_path, capsys):
    save({"model": {"fc1.weight": torch.ones(3, 4)}}, tmp_path / "ckpt", 3)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"resumable convert: error: {tmp_path / 'ckpt' / 'iteration_00000003'}: it records no model config, and no "
        "known model's config follows from its tensors: its tensors are not Qwen3's HuggingFace names (fc1.weight); "
        "pass --hf-config config.json (or --config C.yaml) to export it as a HuggingFace folder\n")
    assert not (tmp_path / "hf").exists()


def test_export_of_a_qwen3_checkpoint_without_model_config_infers_it_from_the_shapes(tmp_path, caplog):
    ours = build_model(ModelConfig(**SIZES), seed=0)  # rms_norm_eps and rope_theta: transformers' defaults
    save({"model": ours.state_dict()}, tmp_path / "ckpt", 3)
    with caplog.at_level(logging.INFO, logger="resumable.tools.merge"):
        assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    assert "rope_theta 10000.0: transformers' Qwen3 default (shapes cannot tell it)" in caplog.text
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, ours(TOKENS), atol=1e-5, rtol=0)


def test_a_trainer_checkpoint_records_its_architecture_and_exports_without_a_config(tmp_path):
    run_job(train_cmd(tmp_path / "run", "runner_config.stop_step=2"))
    ckpt = tmp_path / "run" / "checkpoint"
    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    cfg = load_config(None, ["model.num_hidden_layers=2"]).model  # the job's model: the defaults, 2 layers
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == hf_config(cfg)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = build_model(cfg, seed=0)
    load_pretrained(ours, tmp_path / "hf", cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, ours(tokens), atol=1e-5, rtol=0)


    # Fine-tuning from it: optimizer, RNG, data position and lm_head left out; a bf16 HF export at the end.
    done = run_job(train_cmd(tmp_path / "tune", "runner_config.stop_step=3", f"load_checkpoint={ckpt}",
                             "resume_training=true", "exclude_from_loading=[optimizer, rng, data, 'lm_head.*']",
                             "callbacks.0.last_save_model_only=true", "callbacks.0.export_dtype=bf16"))
    assert ("resumable.train.checkpointing: exclude_from_loading: left out the optimizer state; the RNG states; "
            "the data position; 1 tensor(s) and their optimizer state: lm_head.weight\n") in done.stderr
    assert (f"resumed from {ckpt / 'iteration_00000002'} at global step 2 (epoch 0, step 0 in epoch)\n"
            in done.stderr)
    export = tmp_path / "tune" / "export" / "step_00000003"
    assert json.loads((export / "config.json").read_text()) == {**hf_config(cfg), "dtype": "bfloat16"}
    tuned = transformers.AutoModelForCausalLM.from_pretrained(export, dtype="auto")
    final = tmp_path / "tune" / "checkpoint" / "iteration_00000003"
    from safetensors.torch import load_file
    saved = {k: v for f in final.glob("*-model-*.safetensors") for k, v in load_file(f).items()}
    assert {n: t.dtype for n, t in tuned.state_dict().items()} == {n: torch.bfloat16 for n in saved}
    for name, value in saved.items():
        torch.testing.assert_close(tuned.state_dict()[name], value.to(torch.bfloat16), atol=0, rtol=0)


def test_dtype_bf16_casts_floats_while_streaming_records_it_and_transformers_loads_it(tmp_path, capsys):
    ours = build_model(ModelConfig(**SIZES), seed=0)
    steps = torch.arange(6, dtype=torch.int64)  # not floating: never cast
    save({"model": ours.state_dict(), "optimizer": {"steps": steps}}, tmp_path / "ckpt", 3)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16",
                 "--quiet"]) == 0
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "unified"), "--dtype", "bf16", "--quiet"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "unified" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert exported.dtype == torch.bfloat16
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value.to(torch.bfloat16), atol=0, rtol=0)
    from safetensors.torch import load_file
    unified = load_file(tmp_path / "unified" / "model.safetensors")
    assert unified["optimizer.steps"].dtype == torch.int64 and torch.equal(unified["optimizer.steps"], steps)
    assert torch.equal(unified["model.norm.weight"], ours.state_dict()["model.norm.weight"].to(torch.bfloat16))
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "u2"), "--dtype", "int8"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: argument --dtype: --dtype 'int8': expected a floating dtype: bf16, fp16, fp32 (or bfloat16, float16, "
        "float32)\n")
