"""Every parallel layout trains the same model on the same global batches as one process.

Each layout runs a few real steps on gloo processes and its per-step losses are compared
with a single-process run of the same global batch (batch_size x data_parallel x
micro_batch_num = 4 samples per step). Layouts of one world size share one job (each
builds its own mesh and Trainer) so the suite pays the process start-up once per size.
Each layout's saved state is also what ``resumable split`` computes for that layout
(``resumable.tools.rules``), tensor by tensor and rank by rank: the trainer and split read
one parallel plan (``resumable.models.qwen3``), and this keeps them from drifting apart.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
import torch

from resumable import dist
from resumable.layout import local_chunks, local_tensor
from resumable.state import flatten_state
from resumable.tools.rules import TargetLayout, num_layers, rank_boxes
from resumable.train.config import load_config
from resumable.train.loop import Trainer
from resumable.train.parallel import build_layout
from tests.launch import run_distributed

STEPS = 6
# Short sequences keep each run to about a second; warmup 2 then cosine.
BASE = ["train_dataset.seq_length=32", "lr_schedule.warmup_steps=2", "lr_schedule.total_steps=20",
        "parallel_config.data_parallel=1", "parallel_config.model_parallel=1"]

# Single-process references: 4 samples per step.
REFERENCES: dict[str, list[str]] = {
    "plain": ["runner_config.batch_size=4"],
    "tied": ["runner_config.batch_size=4", "model.tie_word_embeddings=true"],
    # Neither the vocabulary nor the FFN width divides by 2: DTensor shards them unevenly.
    "uneven": ["runner_config.batch_size=4", "model.vocab_size=251", "model.intermediate_size=100"],
}
DP2 = ["parallel_config.data_parallel=2", "runner_config.batch_size=2"]
TP2 = ["parallel_config.model_parallel=2", "runner_config.batch_size=4"]
FSDP = ["parallel.enable_parallel_optimizer=true"]
# name: (world size, overrides, reference)
LAYOUTS: dict[str, tuple[int, list[str], str]] = {
    "dp2": (2, DP2, "plain"),
    "tp2": (2, TP2, "plain"),
    "dp2_sharded_optimizer": (2, DP2 + FSDP, "plain"),
    "pp2": (2, ["parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",
                "runner_config.batch_size=2"], "plain"),
    "tp2_tied": (2, TP2 + REFERENCES["tied"][1:], "tied"),
    "dp2_sharded_optimizer_tied": (2, DP2 + FSDP + REFERENCES["tied"][1:], "tied"),
    "tp2_uneven": (2, TP2 + REFERENCES["uneven"][1:], "uneven"),
    "dp2_tp2": (4, ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                    "runner_config.batch_size=2"], "plain"),
    "dp2_tp2_sharded_optimizer": (4, ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                                      "runner_config.batch_size=2", *FSDP], "plain"),
    "pp2_dp2": (4, ["parallel_config.pipeline_stage=2", "parallel_config.data_parallel=2",
                    "parallel_config.micro_batch_num=2", "runner_config.batch_size=1"], "plain"),
    "pp2_dp2_sharded_optimizer": (4, ["parallel_config.pipeline_stage=2", "parallel_config.data_parallel=2",
                                      "parallel_config.micro_batch_num=2", "runner_config.batch_size=1", *FSDP],
                                  "plain"),
    "pp2_tp2": (4, ["parallel_config.pipeline_stage=2", "parallel_config.model_parallel=2",
                    "parallel_config.micro_batch_num=2", "runner_config.batch_size=2"], "plain"),
}


def _copy(tree: Any) -> Any:
    """A deep copy of a state dict whose tensors no longer alias the live model."""
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


class Run(NamedTuple):
    """One rank's run of one layout."""

    losses: list[float]
    resumed: list[float]  # the last half again, after restoring a mid-run state_dict
    drift: list[str]      # tensors whose boxes here differ from what `resumable split` computes


def _drift(state: dict[str, Any], layout: TargetLayout) -> list[str]:
    """Where the boxes this rank saves of ``state`` differ from ``rules.rank_boxes`` (collective: every rank).

    Every tensor of the job counts: a rank that holds none of a tensor must get no box from the rules.
    """
    tensors = flatten_state(state).tensors
    got = {}
    for name, leaf in tensors.items():
        boxes = [c.box for c in local_chunks(leaf.value)]
        assert sum(b.numel for b in boxes) == local_tensor(leaf.value).numel(), name
        got[name] = sorted((b.offsets, b.shape) for b in boxes)
    shapes = {n: s for part in dist.all_gather_object({n: tuple(leaf.value.shape) for n, leaf in tensors.items()})
              for n, s in part.items()}
    layers = num_layers(list(shapes))
    drift = []
    for name, shape in sorted(shapes.items()):
        want = sorted((b.offsets, b.shape) for b in rank_boxes(name, shape, layout, dist.rank(), layers))
        if want != got.get(name, []):
            drift.append(f"{name}: trainer {got.get(name)}, rules {want}")
    return drift[:5]  # results travel through a pipe: keep them short


def _train(overrides: list[str]) -> Run:
    cfg = load_config(None, [*BASE, *overrides])
    trainer = Trainer(cfg, build_layout(cfg))
    losses = [trainer.train_step() for _ in range(STEPS // 2)]
    state = _copy(trainer.state_dict())
    losses += [trainer.train_step() for _ in range(STEPS - STEPS // 2)]
    resumed = Trainer(cfg, build_layout(cfg))
    resumed.load_state_dict(state)
    lay = trainer.layout
    drift = _drift(state, TargetLayout(lay.pp, lay.dp, lay.tp, lay.sharded_optimizer))
    return Run(losses, [resumed.train_step() for _ in range(STEPS - STEPS // 2)], drift)


def _train_each(rank: int, world_size: int, layouts: list[list[str]]) -> list[Run]:
    return [_train(overrides) for overrides in layouts]


def _run_job(world_size: int) -> dict[str, list[Run]]:
    """{layout name: per-rank runs} for every layout of this size, in one job."""
    names = [n for n, (ws, _, _) in LAYOUTS.items() if ws == world_size]
    per_rank = run_distributed(_train_each, world_size, [LAYOUTS[n][1] for n in names])
    return {name: [rank_losses[i] for rank_losses in per_rank] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def references() -> dict[str, list[float]]:
    per_config = run_distributed(_train_each, 1, list(REFERENCES.values()))[0]
    return {name: run.losses for name, run in zip(REFERENCES, per_config)}


@pytest.fixture(scope="module")
def jobs() -> dict[int, dict[str, list[Run]]]:
    return {2: _run_job(2), 4: _run_job(4)}


@pytest.mark.parametrize("name", REFERENCES)
def test_single_process_losses_are_finite_and_fall(name, references):
    assert all(math.isfinite(x) for x in references[name])
    assert references[name][-1] < references[name][0] - 0.3


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_gives_the_single_process_losses_on_every_rank(name, references, jobs):
    world_size, _, reference = LAYOUTS[name]
    per_rank = [run.losses for run in jobs[world_size][name]]
    assert all(r == per_rank[0] for r in per_rank), "every rank must report the same loss"
    # fp32 sums in another order (half-batch means averaged over DP, partial matmuls summed
    # over TP, micro-batch gradients accumulated) differ by ~1e-7 relative per step; six
    # AdamW steps amplify that to ~1e-6 at most, so 1e-5 catches any real mismatch (a wrong
    # gradient scale or a missed reduction moves the second loss by >1e-3).
    assert per_rank[0] == pytest.approx(references[reference], rel=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_restoring_a_mid_run_state_dict_continues_bitwise_identically(name, jobs):
    world_size, _, _ = LAYOUTS[name]
    for run in jobs[world_size][name]:
        assert run.resumed == run.losses[STEPS // 2:]


@pytest.mark.parametrize("name", LAYOUTS)
def test_split_rules_give_every_rank_the_boxes_the_trainer_saves(name, jobs):
    assert [run.drift for run in jobs[LAYOUTS[name][0]][name]] == [[]] * LAYOUTS[name][0]
