import torch
import torch.distributed as dist

from tests.launch import run_distributed


def _sum_ranks(rank: int, world_size: int) -> int:
    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    return int(t.item())


def test_two_gloo_processes_all_reduce_their_ranks():
    assert run_distributed(_sum_ranks, 2) == [3, 3]


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_a_failing_rank_fails_the_run_with_its_traceback():
    import pytest

    with pytest.raises(AssertionError, match="(?s)rank 1 failed.*boom on rank 1"):
        run_distributed(_raise_on_rank_one, 2)
