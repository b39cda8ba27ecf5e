import pytest
import torch

from resumable.train.config import LRScheduleConfig, OptimizerConfig
from resumable.train.schedule import build_optimizer, lr_at

SCHED = LRScheduleConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=4)


def test_warmup_rises_linearly_to_the_learning_rate():
    assert [lr_at(s, SCHED, 100) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_cosine_reaches_min_lr_exactly_at_the_last_step_and_stays_there():
    assert lr_at(99, SCHED, 100) == pytest.approx(1e-4, abs=1e-15)
    assert lr_at(150, SCHED, 100) == pytest.approx(1e-4, abs=1e-15)


def test_cosine_passes_the_midpoint_halfway_and_only_decreases():
    # 103 steps: decay runs from step 4 to step 102, so step 53 is halfway.
    assert lr_at(53, SCHED, 103) == pytest.approx((1e-3 + 1e-4) / 2)
    curve = [lr_at(s, SCHED, 103) for s in range(4, 103)]
    assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_no_warmup_starts_at_the_learning_rate():
    assert lr_at(0, LRScheduleConfig(learning_rate=2e-3, warmup_steps=0), 10) == 2e-3


def test_up_front_optimizer_state_steps_exactly_like_adamw_lazy_state():
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    ours = torch.nn.Linear(4, 3)
    ours.load_state_dict(ref.state_dict())
    cfg = OptimizerConfig()
    lazy = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)
    eager = build_optimizer(ours, cfg, 1e-2)
    assert len(eager.state) == 2 and not lazy.state
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, opt in ((ref, lazy), (ours, eager)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(ref.weight, ours.weight)
    assert eager.state[ours.weight]["step"].item() == 3
