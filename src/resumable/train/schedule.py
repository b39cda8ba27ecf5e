"""AdamW and a warmup + cosine learning-rate curve that is a pure function of the global step.

The trainer sets ``param_group["lr"] = lr_at(step, ...)`` before every step, so resuming
needs nothing but the global step (no scheduler object to save).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from resumable.train.config import LRScheduleConfig, OptimizerConfig


def lr_at(step: int, sched: LRScheduleConfig, total_steps: int) -> float:
    """Learning rate of the step with 0-based global index ``step``.

    Linear warmup over ``warmup_steps`` steps (the first step already gets a non-zero
    rate), then cosine decay reaching ``min_lr`` exactly at the last step
    (``total_steps - 1``) and staying there for any later step.
    """
    base, floor, warmup = sched.learning_rate, sched.min_lr, sched.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, with its state created up front.

    AdamW creates its state lazily at the first step; creating exactly that state here
    (step 0, zero moments) changes nothing numerically, and it lets a checkpoint loader see
    and fill the full optimizer state before the first step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, foreach=False)
    for p in params:
        optimizer.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return optimizer
