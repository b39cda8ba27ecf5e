"""``python -m resumable.train`` as a user runs it: one process, and under torchrun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from resumable.errors import ConfigError
from resumable.train.config import load_config
from resumable.train.config import check_layout

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _train(tmp: Path, config: str, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "resumable.train", "--config", str(CONFIGS / config),
           "--set", f"output_dir={tmp}", "--set", "callbacks=[]", *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _log(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "log" / "train.jsonl").read_text().splitlines()]


def test_a_single_process_run_logs_every_step_and_prints_a_summary(tmp_path):
    done = _train(tmp_path, "tiny.yaml", 1, "runner_config.stop_step=8")
    assert done.returncode == 0, done.stderr
    log = _log(tmp_path)
    assert [r["global_step"] for r in log] == list(range(1, 9))
    assert set(log[0]) == {"global_step", "epoch", "step_in_epoch", "loss", "lr", "tokens_per_s", "seconds"}
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"] - 0.5
    assert "trained 8 steps (global step 8)" in done.stdout and str(tmp_path / "log" / "train.jsonl") in done.stdout


def test_two_torchrun_pipeline_runs_give_bitwise_identical_losses(tmp_path):
    runs = []
    for name in ("a", "b"):
        done = _train(tmp_path / name, "pp2.yaml", 2, "runner_config.stop_step=4", "train_dataset.seq_length=32")
        assert done.returncode == 0, done.stderr
        runs.append([r["loss"] for r in _log(tmp_path / name)])
    assert len(runs[0]) == 4 and runs[0][-1] < runs[0][0]
    assert runs[0] == runs[1]


def test_a_layout_that_does_not_fill_the_world_stops_before_any_work(tmp_path):
    done = _train(tmp_path, "dp2_tp2.yaml", 1)
    assert done.returncode == 2
    assert ("error: parallel_config.data_parallel (2) x parallel_config.model_parallel (2) x "
            "parallel_config.pipeline_stage (1) = 4, but the job has 1 processes (WORLD_SIZE)") in done.stderr
    assert not (tmp_path / "log").exists()


def test_heads_that_do_not_split_over_tensor_parallel_ranks_are_rejected():
    cfg = load_config(None, ["parallel_config.model_parallel=3", "parallel_config.data_parallel=1"])
    with pytest.raises(ConfigError, match=r"model.num_attention_heads \(4\) must be divisible by "
                                          r"parallel_config.model_parallel \(3\)"):
        check_layout(cfg, 3)
    cfg = load_config(None, ["parallel_config.model_parallel=4", "parallel_config.data_parallel=1"])
    with pytest.raises(ConfigError, match=r"model.num_key_value_heads \(2\) must be divisible"):
        check_layout(cfg, 4)


def test_more_pipeline_stages_than_layers_or_tied_embeddings_across_stages_are_rejected():
    base = ["parallel_config.data_parallel=1", "parallel_config.model_parallel=1"]
    with pytest.raises(ConfigError, match=r"pipeline_stage \(8\) exceeds model.num_hidden_layers \(4\)"):
        check_layout(load_config(None, [*base, "parallel_config.pipeline_stage=8"]), 8)
    with pytest.raises(ConfigError, match="tie_word_embeddings: true cannot be used with parallel_config.pipeline_stage"):
        check_layout(load_config(None, [*base, "parallel_config.pipeline_stage=2", "model.tie_word_embeddings=true"]), 2)
