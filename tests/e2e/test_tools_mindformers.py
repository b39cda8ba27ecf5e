"""MindFormers checkpoints of every kind → ``resumable convert --to v2`` → our loader reads the same tensors.

The fixtures (tests/fixtures/mindformers.py) write a tiny Qwen3 under MindFormers names
as MindFormers 2.0 (with metadata.json on DP×MP layouts, without it on one rank) and as
legacy ``rank_*`` trees (.safetensors and .ckpt, with and without remove_redundancy).
After conversion, :func:`resumable.load` fills plain tensors under our names with exactly
the HuggingFace-side values the fixture started from, AdamW's ``step`` is the global step,
and the context lands in common.json. ``ensure_loadable`` converts once and reuses (redoing it
for another fused layout). Real 1- and 2-process trainers resume from a MindFormers 2.0 folder,
a TP2 legacy tree split by strategy files (both modes) and a single MindSpore ``.ckpt``: the
weights are the MindFormers ones and the data position continues from the saved counters.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from resumable.cli import main
from resumable.formats import v2
from resumable.load import load
from resumable.models.qwen3 import FusedLayout, hf_to_mf
from resumable.sources import open_source
from resumable.formats.ms_ckpt import write_ms_ckpt
from resumable.train.checkpointing import checkpoint_callbacks
from resumable.train.foreign import CONVERTED, ForeignOptions, ensure_loadable, needs_conversion_legacy
from resumable.train.config import load_config
from resumable.train.loop import Trainer
from resumable.train.parallel import build_layout
from tests.fixtures.mindformers import (FFN, HEADS, HIDDEN, LAYERS, VOCAB, build_legacy, build_v2, hf_state,
                                        legacy_state, mf_state)
from tests.fixtures.ms_strategy import build_sharded_legacy
from tests.launch import run_distributed

SEED = 3
KINDS = {
    "2.0-dp2-mp2": lambda root: build_v2(root, 100, mf_state(SEED), dp=2, mp=2, prefix="qwen3"),
    "2.0-redundancy-removed-tensor-map": lambda root: build_v2(
        root, 100, mf_state(SEED), dp=2, mp=2, remove_redundancy=True, fragmentations=False, rank_group=False),
    "2.0-one-rank-no-metadata": lambda root: build_v2(root, 100, mf_state(SEED)),
    "2.0-adam-moments": lambda root: build_v2(root, 100, mf_state(SEED, optimizer="adam"), dp=1, mp=2),
}


def _target(expected: dict[str, torch.Tensor]) -> dict:
    """A state of zero tensors under our names, shaped as the expected tensors."""
    model, optim = {}, {}
    for name, t in expected.items():
        if name.startswith("optimizer.state."):
            fqn, _, slot = name[len("optimizer.state."):].rpartition(".")
            optim.setdefault(fqn, {})[slot] = torch.zeros_like(t)
            optim[fqn]["step"] = torch.zeros((), dtype=torch.float32)
        else:
            model[name] = torch.zeros_like(t)
    return {"model": model, "optimizer": {"state": optim}}


def _assert_loads(folder, expected: dict[str, torch.Tensor], global_step: int) -> None:
    state = _target(expected)
    result = load(state, folder)
    for name, t in state["model"].items():
        assert torch.equal(t, expected[name]), name
    for fqn, slots in state["optimizer"]["state"].items():
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(slots[slot], expected[f"optimizer.state.{fqn}.{slot}"]), (fqn, slot)
        assert slots["step"].item() == global_step
    assert result.common["global_step"] == global_step


@pytest.mark.parametrize("kind", KINDS)
def test_mindformers_2_0_converts_to_our_names_and_values(tmp_path, kind):
    KINDS[kind](tmp_path / "mf")
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "ours"), "--to", "v2", "--quiet"]) == 0
    _assert_loads(tmp_path / "ours", hf_state(SEED), 100)
    common = v2.read_common(tmp_path / "ours" / "iteration_00000100")
    assert {k: common[k] for k in ("iteration", "global_step", "epoch_num", "step_num", "consumed_samples",
                                    "global_batch_size", "loss_scale")} == {
        "iteration": 100, "global_step": 100, "epoch_num": 1, "step_num": 100, "consumed_samples": 800,
        "global_batch_size": 8, "loss_scale": None}


@pytest.mark.parametrize("fmt,remove_redundancy", [("safetensors", False), ("safetensors", True), ("ckpt", True)])
def test_mindformers_legacy_converts_its_last_complete_step(tmp_path, fmt, remove_redundancy):
    build_legacy(tmp_path / "mf", saves=[[(1, 2, 0), (1, 4, 0)], [(1, 2, 0)]], metas=[(1, 4), (1, 2)], fmt=fmt,
                 remove_redundancy=remove_redundancy)
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "ours"), "--to", "v2", "--quiet"]) == 0
    seed = 100 * 1 + 2  # legacy_state(1, 2): the newest step present on every rank
    assert legacy_state(1, 2)["global_step"].item() == 12
    _assert_loads(tmp_path / "ours", hf_state(seed), 12)


def test_convert_to_our_legacy_and_back_keeps_every_tensor(tmp_path, capsys):
    KINDS["2.0-dp2-mp2"](tmp_path / "mf")
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "legacy"), "--to", "legacy", "--quiet"]) == 0
    file = tmp_path / "legacy" / "rank_0" / "CKP_rank_0-2_100.safetensors"  # epoch_num 1 done, step_num 100
    assert capsys.readouterr().out == f"wrote {file}\n"
    assert main(["convert", str(tmp_path / "legacy"), str(tmp_path / "ours"), "--to", "v2", "--quiet"]) == 0
    _assert_loads(tmp_path / "ours", hf_state(SEED), 100)


def test_ensure_loadable_converts_once_and_leaves_our_checkpoints_alone(tmp_path):
    KINDS["2.0-dp2-mp2"](tmp_path / "mf")
    out = tmp_path / "output"
    first = ensure_loadable(tmp_path / "mf", out, ForeignOptions(dtype=torch.float32))
    assert first == out / CONVERTED
    files = {p: p.stat().st_mtime_ns for p in first.rglob("*.safetensors")}
    assert ensure_loadable(tmp_path / "mf", out, ForeignOptions(dtype=torch.float32)) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.safetensors")} == files  # reused, not rewritten
    assert ensure_loadable(first, out) == first
    assert ensure_loadable(tmp_path / "empty", out) == tmp_path / "empty"
    expected = {n: t.float() for n, t in hf_state(SEED).items()}
    _assert_loads(first, expected, 100)


def test_the_trainers_fused_layout_reaches_the_conversion_and_a_conversion_with_another_is_not_reused(tmp_path):
    contiguous = FusedLayout(use_contiguous_weight_layout_attention=True, use_interleaved_weight_layout_mlp=False)
    state = hf_to_mf(hf_state(SEED), HEADS, contiguous)
    state["global_step"] = torch.tensor([100], dtype=torch.int32)
    build_v2(tmp_path / "mf", 100, state)
    out, qkv = tmp_path / "output", "model.layers.0.self_attn.k_proj.weight"
    expected = hf_state(SEED)[qkv]
    default = ensure_loadable(tmp_path / "mf", out)  # read as MindFormers' default layout: other rows
    assert not torch.equal(open_source(default).tensors[qkv].read(), expected)
    cfg = load_config(None, ["model.use_contiguous_weight_layout_attention=true",
                             "model.use_interleaved_weight_layout_mlp=false"])
    options = ForeignOptions.from_config(cfg)
    assert options.fused == contiguous and ForeignOptions.from_config(load_config(None)).fused is None
    assert ensure_loadable(tmp_path / "mf", out, options) == default  # converted again, not reused
    converted = open_source(default)
    assert torch.equal(converted.tensors[qkv].read(), expected)
    assert torch.equal(converted.tensors["model.layers.1.mlp.up_proj.weight"].read(),
                       hf_state(SEED)["model.layers.1.mlp.up_proj.weight"])
    origin = v2.read_common(default / "iteration_00000100")["converted_from"]
    assert origin["fused"] == {"use_contiguous_weight_layout_attention": True,
                               "use_interleaved_weight_layout_mlp": False}
    assert (origin["names"], origin["src_strategy"], origin["dtype"]) == ("auto", None, "torch.float32")


@pytest.mark.parametrize("name", ["net.safetensors", "net.ckpt"])
def test_a_single_mindspore_file_converts_for_the_trainer(tmp_path, name):
    if name.endswith(".ckpt"):
        write_ms_ckpt(tmp_path / name, mf_state(SEED, global_step=100))
    else:
        save_file(mf_state(SEED, global_step=100), tmp_path / name, metadata={"format": "ms"})
    folder = ensure_loadable(tmp_path / name, tmp_path / "output", ForeignOptions(dtype=torch.float32))
    assert folder == tmp_path / "output" / CONVERTED
    _assert_loads(folder, {n: t.float() for n, t in hf_state(SEED).items()}, 100)


def test_legacy_mode_converts_only_what_the_legacy_loader_cannot_read(tmp_path):
    KINDS["2.0-dp2-mp2"](tmp_path / "mf2")
    build_legacy(tmp_path / "mf1", saves=[[(1, 2, 0)], [(1, 2, 0)]], metas=[(1, 2), (1, 2)])
    assert main(["convert", str(tmp_path / "mf2"), str(tmp_path / "ours1"), "--to", "legacy", "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "mf2"), str(tmp_path / "ours2"), "--to", "v2", "--quiet"]) == 0
    write_ms_ckpt(tmp_path / "net.ckpt", mf_state(SEED))
    ours_file = next((tmp_path / "ours1" / "rank_0").glob("*.safetensors"))
    foreign = {p: needs_conversion_legacy(tmp_path / p) for p in
               ("mf2", "mf1", "net.ckpt", "ours1", ours_file.relative_to(tmp_path), "ours2", "missing")}
    assert foreign == {"mf2": True, "mf1": True, "net.ckpt": True, "ours1": False,
                       ours_file.relative_to(tmp_path): False, "ours2": False, "missing": False}


def _resume(rank: int, world_size: int, tmp: str, load: str, expected_seed: int, *overrides: str,
            ) -> tuple[tuple[int, ...], bool, list[str]]:
    """Build the trainer with the callbacks its config asks for, resume, train one step.

    Returns (global step, consumed samples, epoch, sample and step in epoch after the resume, global step and
    sample in epoch after the step), whether the weights equal hf_state(expected_seed), and the log lines.
    """
    cfg = load_config(None, [
        f"model.vocab_size={VOCAB}", f"model.hidden_size={HIDDEN}", f"model.intermediate_size={FFN}",
        f"model.num_hidden_layers={LAYERS}", f"model.num_attention_heads={HEADS.num_heads}",
        f"model.num_key_value_heads={HEADS.num_kv_heads}", f"model.head_dim={HEADS.head_dim}",
        f"parallel_config.data_parallel=1", f"parallel_config.model_parallel={world_size}",
        "runner_config.batch_size=2", f"train_dataset.path={tmp}/tokens.npy", "train_dataset.seq_length=8",
        f"output_dir={tmp}/output", f"load_checkpoint={load}", "resume_training=true", *overrides])
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    for name in ("resumable.train.checkpointing", "resumable.train.legacy_callbacks", "resumable.sources"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    callbacks = checkpoint_callbacks(cfg)
    trainer = Trainer(cfg, build_layout(cfg), callbacks)
    callbacks[0].on_train_begin(trainer)  # the resume; the monitor (callbacks[1]) is not needed
    expected = hf_state(expected_seed)
    same = all(torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t, expected[n].float())
               for n, t in trainer.model.state_dict().items())
    ctx = trainer.ctx
    start = (ctx.global_step, ctx.consumed_samples, ctx.epoch, ctx.sample_in_epoch, ctx.step_in_epoch)
    trainer.train_step()
    dist.barrier()
    return start + (ctx.global_step, ctx.sample_in_epoch), same, lines


def _tokens(tmp_path) -> None:
    """49 samples of 8+1 tokens."""
    np.save(tmp_path / "tokens.npy", (np.arange(400) * 7 % VOCAB).astype(np.uint16))


def test_trainer_resumes_from_a_mindformers_checkpoint_on_tp2(tmp_path):
    KINDS["2.0-dp2-mp2"](tmp_path / "mf")
    _tokens(tmp_path)
    counts, same, lines = run_distributed(_resume, 2, str(tmp_path), str(tmp_path / "mf"), SEED)[0]
    assert same, "the weights after resuming must be the MindFormers weights"
    # common.json: global_step 100, global_batch_size 8, no consumed_samples: 800 samples. This data has
    # 49 samples; in batches of 8 an epoch takes 48: epoch 16, sample 32; this job's batch is 2.
    assert counts == (100, 800, 16, 32, 16, 101, 34)
    converted = tmp_path / "output" / CONVERTED / "iteration_00000100"
    assert (f"{converted}: the checkpoint records no data position: continuing after 800 samples (consumed_samples "
            "800 = global_step 100 x global_batch_size 8), at epoch 16, sample 32 of 49 of this data") in lines


@pytest.mark.parametrize("mode", ["checkpoint-2.0", "legacy"])
def test_a_tp2_mindformers_legacy_tree_with_strategy_files_loads_onto_two_processes(tmp_path, mode):
    # legacy_state(1, 2): global_step 12, step_num 12, epoch_num 1, global_batch_size 8 (mf seed 102).
    strategy = build_sharded_legacy(tmp_path / "mf", legacy_state(1, 2), dp=1, mp=2, prefix="tiny")
    _tokens(tmp_path)
    keys = ["auto_trans_ckpt=true", f"src_strategy_path_or_dir={strategy}",
            f"use_legacy_format={'true' if mode == 'legacy' else 'false'}"]
    counts, same, lines = run_distributed(_resume, 2, str(tmp_path), str(tmp_path / "mf"), 102, *keys)[0]
    assert same, "the weights after resuming must be the MindFormers weights, reassembled from their slices"
    assert counts == (12, 96, 2, 0, 0, 13, 2)  # 12 x 8 = 96 samples = 2 epochs of 48
    assert f"{tmp_path / 'mf'}: slices placed by the strategy files {strategy}" in lines


def test_a_single_mindspore_ckpt_file_is_a_load_checkpoint_in_legacy_mode(tmp_path):
    # Checkpoint 2.0 mode reads it through the same ensure_loadable (test_a_single_mindspore_file_converts...).
    write_ms_ckpt(tmp_path / "net.ckpt", mf_state(SEED, global_step=5))  # MindSpore's save_checkpoint output
    _tokens(tmp_path)
    counts, same, lines = run_distributed(_resume, 1, str(tmp_path), str(tmp_path / "net.ckpt"), SEED,
                                          "use_legacy_format=true")[0]
    assert same
    # Only global_step is recorded: 5 steps of this job's batch of 2.
    assert counts == (5, 10, 0, 10, 5, 6, 12)
    assert any("continuing after 10 samples (global_step 5 x this job's global batch size 2 (no "
               "global_batch_size recorded))" in line for line in lines)
