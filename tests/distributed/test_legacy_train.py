"""Checkpoint 1.0 through the real trainer on gloo processes: save, resume, convert.

Each spawned job runs several short trainings one after another in the same process
group (a new Trainer and mesh each time), so that a resume is compared with an
uninterrupted run of the same job. Losses of an unchanged layout must be bitwise equal
(same kernels, same reduction order, same RNG, same data position); across a layout
change they are compared with a tolerance (see the comment there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors import safe_open

from resumable.errors import CheckpointNotFoundError, ConfigError, NewerCheckpointsError
from resumable.train.checkpointing import checkpoint_callbacks
from resumable.train.config import load_config
from resumable.train.loop import Callback, Trainer, run
from tests.launch import run_distributed

BASE = ["train_dataset.seq_length=32", "lr_schedule.warmup_steps=2", "lr_schedule.total_steps=20",
        "parallel_config.data_parallel=1", "parallel_config.model_parallel=1", "use_legacy_format=true",
        "runner_config.log_interval=100"]
DP2 = ["parallel_config.data_parallel=2", "runner_config.batch_size=2"]
TP2 = ["parallel_config.model_parallel=2", "runner_config.batch_size=4"]


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer: Trainer) -> None:
        self.losses.append(trainer.last_loss)


def _train(out: Path, *overrides: str) -> list[float]:
    """One training job of the legacy trainer in this process group; its per-step losses."""
    cfg = load_config(None, [*BASE, f"output_dir={out}", *overrides])
    record = _Losses()
    run(cfg, [*checkpoint_callbacks(cfg), record])
    dist.barrier()
    return record.losses


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------ DP2, safetensors, remove_redundancy


def _dp2_redundancy(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    ref = _train(tmp_path / "ref", *DP2, "runner_config.stop_step=6", "callbacks.0.save_checkpoint_steps=100")
    out = tmp_path / "out"
    opts = [*DP2, "callbacks.0.save_checkpoint_steps=2", "callbacks.0.remove_redundancy=true",
            "callbacks.0.keep_checkpoint_max=2"]
    first = _train(out, *opts, "runner_config.stop_step=3")
    resumed = _train(out, *opts, "runner_config.stop_step=6", f"load_checkpoint={out / 'checkpoint'}",
                     "resume_training=true", "remove_redundancy=true")
    folder = out / "checkpoint" / f"rank_{rank}"
    newest = folder / json.loads((folder / "meta.json").read_text())["last_ckpt_file"]
    with safe_open(newest, framework="pt") as f:
        keys, flag = sorted(f.keys()), f.metadata()["remove_redundancy"]
    return {"ref": ref, "first": first, "resumed": resumed, "files": _names(folder), "keys": keys, "flag": flag,
            "strategy": _names(out / "strategy")}


def test_dp2_remove_redundancy_resume_is_bitwise_with_prefix_increment_and_keep_max(tmp_path):
    r0, r1 = run_distributed(_dp2_redundancy, 2, str(tmp_path))
    # Steps 4..6 after resuming from step 3 equal the uninterrupted run bit for bit.
    assert r0["first"] == r0["ref"][:3]
    assert r0["resumed"] == r0["ref"][3:]
    # Job 1 saved 1_2 and 1_3 (its last step); job 2 writes with prefix suffix _1 and keeps the newest 2
    # files, and, as Checkpoint 2.0 does, the file it resumed from (1_3) beside them: only 1_2 went.
    assert r0["files"] == ["CKP_rank_0-1_3.safetensors", "CKP_rank_0_1-1_4.safetensors",
                           "CKP_rank_0_1-1_6.safetensors", "meta.json"]
    assert r1["files"] == ["CKP_rank_1-1_3.safetensors", "CKP_rank_1_1-1_4.safetensors",
                           "CKP_rank_1_1-1_6.safetensors", "meta.json"]
    assert r0["strategy"] == r1["strategy"] == ["ckpt_strategy_rank_0.ckpt", "ckpt_strategy_rank_1.ckpt"]
    # Every tensor is replicated over DP2: each chunk stored once, split between the ranks.
    scalars = {"consumed_samples", "epoch_num", "global_batch_size", "global_step", "step_num"}
    t0, t1 = set(r0["keys"]) - scalars, set(r1["keys"]) - scalars
    assert t0 and t1 and not t0 & t1
    assert "model.norm.weight" in t0 | t1 and "optimizer.state.model.norm.weight.exp_avg" in t0 | t1
    assert r0["flag"] == r1["flag"] == "True"


# --------------------------------------------------------------------- TP2, .ckpt, named step


def _tp2_ckpt(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    out = tmp_path / "ckpt"
    opts = [*TP2, "callbacks.0.checkpoint_format=ckpt", "callbacks.0.save_checkpoint_steps=2"]
    ref = _train(out, *opts, "runner_config.stop_step=4")
    named_opts = [f"load_checkpoint={out / 'checkpoint'}", "resume_training=CKP_rank_0-1_2.ckpt",
                  "load_ckpt_format=ckpt", "load_ckpt_async=true"]
    errors = {}
    try:  # resuming from 1_2 in the folder holding 1_4 would bury 1_4
        _train(out, *opts, "runner_config.stop_step=4", *named_opts)
    except NewerCheckpointsError as exc:
        errors["newer"] = str(exc)
    named = _train(out, *opts, "runner_config.stop_step=4", *named_opts, "callbacks.0.discard_newer_checkpoints=true")
    if rank == 1:  # rank 1 lost its file of step 1_4 written by the second job
        (out / "checkpoint" / "rank_1" / "CKP_rank_1_1-1_4.ckpt").unlink()
    dist.barrier()
    for key, extra in {
        "missing": [*TP2, "resume_training=CKP_rank_0_1-1_4.ckpt"],
        "layout": [*DP2, "resume_training=true"],
        "workers": [*DP2, "resume_training=true", "auto_trans_ckpt=true", "transform_process_num=3",
                    f"src_strategy_path_or_dir={out / 'strategy'}"],
        "several": [*DP2, "resume_training=true", "auto_trans_ckpt=true", "transform_process_num=2",
                    f"src_strategy_path_or_dir={out / 'strategy'}"],
    }.items():
        try:
            _train(tmp_path / f"err_{key}", "callbacks.0.checkpoint_format=ckpt", "runner_config.stop_step=5",
                   f"load_checkpoint={out / 'checkpoint'}", "load_ckpt_format=ckpt", *extra)
        except (CheckpointNotFoundError, ConfigError) as exc:
            errors[key] = (type(exc).__name__, str(exc))
    # A one-file-per-rank .ckpt source for the conversion: TP2 → DP2 with 2 converting ranks.
    src = tmp_path / "src"
    src_losses = _train(src, *opts, "runner_config.stop_step=2", "callbacks.0.keep_checkpoint_max=1")
    converted = _train(tmp_path / "dp2", *DP2, "runner_config.stop_step=4", "callbacks.0.checkpoint_format=ckpt",
                       f"load_checkpoint={src / 'checkpoint'}", "resume_training=true", "load_ckpt_format=ckpt",
                       "auto_trans_ckpt=true", "transform_process_num=2", f"src_strategy_path_or_dir={src / 'strategy'}")
    transformed = _names(tmp_path / "dp2" / "transformed_checkpoint" / f"rank_{rank}")
    # The transformed checkpoint is reused as is, with no conversion.
    again = _train(tmp_path / "dp2b", *DP2, "runner_config.stop_step=3", "callbacks.0.checkpoint_format=ckpt",
                   f"load_checkpoint={tmp_path / 'dp2' / 'transformed_checkpoint'}", "resume_training=true",
                   "load_ckpt_format=ckpt")
    return {"ref": ref, "named": named, "errors": errors, "src": src_losses, "converted": converted,
            "transformed": transformed, "again": again, "files": _names(out / "checkpoint" / f"rank_{rank}")}


def test_tp2_ckpt_named_step_resume_errors_and_transform_to_dp2(tmp_path):
    r0, r1 = run_distributed(_tp2_ckpt, 2, str(tmp_path))
    # resume_training "CKP_rank_0-1_2.ckpt": rank 1 loads CKP_rank_1-1_2.ckpt; steps 3, 4 are bitwise equal.
    assert r0["named"] == r0["ref"][2:] and r1["named"] == r1["ref"][2:]
    ckpt = tmp_path / "ckpt" / "checkpoint"
    assert r0["errors"]["newer"] == r1["errors"]["newer"] == (
        f"{ckpt} holds 1 step(s) newer than epoch 1 step 2 this job starts from: epoch 1 step 4 "
        "(rank_0/CKP_rank_0-1_4.ckpt, ...). Training on would bury them (every rank's meta.json would name this "
        "job's saves, and keep_checkpoint_max deletes older jobs' files first). To keep them, resume from them "
        "(repair or restore what is damaged) or save elsewhere; to discard them, set "
        "callbacks.0.discard_newer_checkpoints: true")
    # With discard_newer_checkpoints the first job's 1_4 went; the resumed job saved its own 1_4 (suffix _1).
    assert r0["files"] == ["CKP_rank_0-1_2.ckpt", "CKP_rank_0_1-1_4.ckpt", "meta.json"]
    assert r1["files"] == ["CKP_rank_1-1_2.ckpt", "meta.json"]
    missing = f"resume_training 'CKP_rank_0_1-1_4.ckpt': rank 1 has no {ckpt}/rank_1/CKP_rank_1_1-1_4.ckpt"
    assert r0["errors"]["missing"] == ("CheckpointNotFoundError", f"rank 1 failed: {missing}")
    assert r1["errors"]["missing"] == ("CheckpointNotFoundError", missing)
    for r in (r0, r1):
        kind, message = r["errors"]["layout"]
        assert kind == "ConfigError"
        assert message.startswith(f"{ckpt}/rank_0/CKP_rank_0-1_2.ckpt was saved with layout ")
        assert message.endswith("the legacy format converts between layouts only with auto_trans_ckpt: true and "
                                "src_strategy_path_or_dir: <the source job's output_dir>/strategy")
        assert r["errors"]["workers"] == ("ConfigError", "transform_process_num (3) must divide the world size (2): "
                                          "each converting process takes the same number of target ranks")
        assert r["errors"]["several"] == ("ConfigError", (
            f"auto_trans_ckpt: {ckpt}/rank_0 holds 2 .ckpt files (CKP_rank_0-1_2.ckpt, CKP_rank_0_1-1_4.ckpt); "
            "converting .ckpt checkpoints takes one file per rank folder: keep only the step to convert"))
    assert r0["transformed"] == ["CKP_rank_0-1_2.ckpt", "meta.json"]
    assert r1["transformed"] == ["CKP_rank_1-1_2.ckpt", "meta.json"]
    # DP2 continues TP2's training: the same global batches; fp32 sums in another order
    # (partial matmuls over TP vs half-batch means over DP) differ by ~1e-7 relative per
    # step, so 1e-5 over two steps still catches a wrongly placed shard (>1e-2).
    assert r0["src"] == r0["ref"][:2]
    assert r0["converted"] == pytest.approx(r0["ref"][2:4], rel=1e-5)
    assert r0["again"] == r0["converted"][:1]


# --------------------------------------------------- TP2 safetensors → one process via unified


def _tp2_source(rank: int, world: int, tmp: str) -> list[float]:
    return _train(Path(tmp) / "src", *TP2, "runner_config.stop_step=4", "callbacks.0.save_checkpoint_steps=2")


def _one_process_unified(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    src = tmp_path / "src"
    one = ["runner_config.batch_size=4", "runner_config.stop_step=4"]
    # A single strategy file suffices: the source had no pipeline split.
    converted = _train(tmp_path / "one", *one, f"load_checkpoint={src / 'checkpoint'}",
                       "resume_training=CKP_rank_0-1_2.safetensors",
                       "auto_trans_ckpt=true", f"src_strategy_path_or_dir={src / 'strategy' / 'ckpt_strategy_rank_0.ckpt'}")
    unified = tmp_path / "one" / "unified_checkpoint" / "CKP-1_2.safetensors"
    # An already unified checkpoint loads directly.
    direct = _train(tmp_path / "direct", *one, f"load_checkpoint={unified}", "resume_training=true",
                    "runner_config.stop_step=3")
    with safe_open(unified, framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"converted": converted, "direct": direct, "shapes": shapes,
            "unified": _names(tmp_path / "one" / "unified_checkpoint")}


def test_tp2_safetensors_merge_into_unified_then_load_on_one_process(tmp_path):
    source = run_distributed(_tp2_source, 2, str(tmp_path))[0]
    (result,) = run_distributed(_one_process_unified, 1, str(tmp_path))
    assert result["unified"] == ["CKP-1_2.safetensors"]
    # Full tensors: q_proj (64 x 64) was split by rows over TP2, o_proj by columns.
    assert result["shapes"]["model.layers.0.self_attn.q_proj.weight"] == [64, 64]
    assert result["shapes"]["model.layers.0.self_attn.o_proj.weight"] == [64, 64]
    assert result["shapes"]["optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg"] == [64, 64]
    # TP2 and one process sum partial products in another order (~1e-7 relative per step).
    assert result["converted"] == pytest.approx(source[2:4], rel=1e-5)
    assert result["direct"] == result["converted"][:1]
