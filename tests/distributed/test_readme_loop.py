"""The README's "your own loop" example, run as written on two real processes with FSDP2."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import resumable
from resumable.load import apply_training_state, training_state
from tests.launch import run_distributed


def _loop(rank: int, world_size: int, out: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    losses = []

    def train_step(step: int) -> None:
        x = data[(step * 8 + rank * 4) % 64:][:4]
        loss = model(x).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())

    # ---- the README's example, verbatim but for train_step's argument ----
    mgr = resumable.CheckpointManager(f"{out}/checkpoint", keep_checkpoint_max=3, async_save=True)
    state = training_state(model, optim)
    found = resumable.resolve_checkpoint(f"{out}/checkpoint", output_dir=out, fallback=True)
    start = 0
    if not found.fresh:
        result = resumable.load(state, found.path)
        apply_training_state(model, optim, state)
        start = result.common["global_step"]
    mgr.start_from(start)
    for step in range(start + 1, steps + 1):
        train_step(step)
        if mgr.should_save(step, last_step=steps):
            mgr.save({**training_state(model, optim), "global_step": step}, step)
    mgr.close()
    return losses


def test_the_readme_loop_resumes_where_it_stopped(tmp_path):
    whole = run_distributed(_loop, 2, str(tmp_path / "a"), 6)
    first = run_distributed(_loop, 2, str(tmp_path / "b"), 3)   # a job stopped after step 3 ...
    rest = run_distributed(_loop, 2, str(tmp_path / "b"), 6)    # ... and the same code run again
    for rank in range(2):
        assert first[rank] + rest[rank] == whole[rank]  # bitwise: the resumed run repeats the whole one
    assert resumable.latest(tmp_path / "b" / "checkpoint").name == "iteration_00000006"


def test_the_readme_loop_refuses_a_checkpoint_with_one_flipped_byte(tmp_path):
    import pytest

    from resumable.formats.safetensors_io import read_header

    run_distributed(_loop, 2, str(tmp_path / "b"), 3)
    victim = tmp_path / "b" / "checkpoint" / "iteration_00000003" / "CKP-model-0000000-0000002.safetensors"
    key, entry = max(read_header(victim).tensors.items(), key=lambda kv: kv[1].end - kv[1].start)
    data = bytearray(victim.read_bytes())
    data[entry.start + 5] ^= 0x40  # an exponent bit: the loss would go to inf (the report)
    victim.write_bytes(bytes(data))
    with pytest.raises(AssertionError) as failed:  # the run stops on every rank; it never trains on
        run_distributed(_loop, 2, str(tmp_path / "b"), 6)
    assert f"CorruptCheckpointError: {victim}: tensor {key!r}, bytes {entry.start}-{entry.end}: xxh3-64 " \
        in str(failed.value)
