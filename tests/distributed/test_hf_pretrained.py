"""``pretrained_model_dir`` on a tensor-parallel layout: each rank reads its slices, the first loss is transformers'.

A tiny random ``transformers.Qwen3ForCausalLM`` is saved with ``save_pretrained``; a TP2
trainer initialised from it (the ``PretrainedInit`` callback) computes on its first step
the loss ``transformers`` computes on the same batch (our next-token cross entropy on
transformers' logits). The first step's loss is computed before the optimizer step, so it
depends on the imported weights alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from resumable.train.config import load_config
from resumable.train.loop import Trainer
from resumable.train.model import causal_lm_loss
from resumable.train.parallel import build_layout
from resumable.train.pretrained import PretrainedInit
from tests.launch import run_distributed

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _first_step(rank: int, world_size: int, folder: str) -> tuple[float, list, list]:
    cfg = load_config(None, [*(f"model.{k}={v}" for k, v in SIZES.items()), f"pretrained_model_dir={folder}",
                             "parallel_config.data_parallel=1", "parallel_config.model_parallel=2",
                             "train_dataset.seq_length=16", "runner_config.batch_size=2"])
    trainer = Trainer(cfg, build_layout(cfg), [PretrainedInit(cfg)])
    trainer.callbacks[0].on_train_begin(trainer)
    x, y = trainer.batches.get(0, 0)
    loss = trainer.train_step()
    dist.barrier()
    return loss, x.tolist(), y.tolist()  # plain lists: tensors do not outlive the worker's queue


def test_tp2_trainer_starts_from_the_transformers_weights(tmp_path):
    torch.manual_seed(2)
    reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SIZES)).eval()
    reference.save_pretrained(tmp_path)
    results = run_distributed(_first_step, 2, str(tmp_path))
    loss, x, y = results[0]
    assert results[1][0] == loss
    with torch.no_grad():
        expected = causal_lm_loss(reference(torch.tensor(x)).logits, torch.tensor(y)).item()
    # Same float32 weights and batch; TP splits the matmuls and sums partial products
    # in another order (~1e-7 relative).
    assert loss == pytest.approx(expected, rel=1e-5)


def test_pretrained_model_dir_on_s3_gives_the_same_first_step(tmp_path, s3):
    torch.manual_seed(2)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SIZES)).save_pretrained(tmp_path)
    for path in tmp_path.iterdir():
        s3.put(f"hf/{path.name}", path.read_bytes())
    local = run_distributed(_first_step, 2, str(tmp_path))
    remote = run_distributed(_first_step, 2, s3.url("hf"))
    assert remote == local  # the same weights, read by ranged GETs: the same loss, bit for bit
