"""Training overhead of asynchronous checkpointing: the reference trainer's tokens/s with
``async_save`` every 10 steps against the same run without saves.

    python -m bench.training '{"steps": 51, "save": true, "out": "/tmp/t", "result": "/tmp/r.json"}'

One process (the trainer's own one-thread setting), a model larger than the default so that
a step is not dominated by Python overhead. The clock runs from the end of step
``warmup`` (default ``every + 1``) to the end of the last step, read *before* the
checkpoint callback of that step runs, so the window holds exactly one save per
``every`` steps and includes the training thread's blocked time (staging) and the
background writer's interference. The first save (step ``every``), which allocates the
reused staging buffers once per job, falls before the window: the figure is the
steady-state cost of a long run, as the warm-up steps' are excluded for both modes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

#: The model trained (about 21 M parameters: a 250 MB training state in fp32 with AdamW).
MODEL = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}


def config_tree(out: str, steps: int, save: bool, every: int) -> dict[str, Any]:
    """The trainer config of one run."""
    tree: dict[str, Any] = {
        "output_dir": out, "seed": 0, "model": MODEL,
        "train_dataset": {"path": "", "seq_length": 256},
        "runner_config": {"epochs": 1000, "batch_size": 4, "stop_step": steps, "log_interval": 1000},
        "lr_schedule": {"learning_rate": 3e-4, "min_lr": 3e-5, "warmup_steps": 5, "total_steps": 10_000},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1},
    }
    if save:
        tree["callbacks"] = [{"type": "CheckpointMonitor", "prefix": "CKP", "save_checkpoint_steps": every,
                              "keep_checkpoint_max": 2, "async_save": True}]
    return tree


def main() -> None:
    spec = json.loads(sys.argv[1])
    from resumable.train.checkpointing import checkpoint_callbacks
    from resumable.train.config import parse_config
    from resumable.train.loop import Callback, Trainer, run

    every = spec.get("every", 10)
    steps, warmup = spec["steps"], spec.get("warmup", every + 1)
    cfg = parse_config(config_tree(spec["out"], steps, spec["save"], every))
    marks: dict[int, float] = {}

    class Clock(Callback):
        """First in the callback list: reads the time before the step's save runs."""

        def on_step_end(self, trainer: Trainer) -> None:
            marks[trainer.ctx.global_step] = time.perf_counter()

    trainer = run(cfg, [Clock(), *checkpoint_callbacks(cfg)])
    seconds = marks[steps] - marks[warmup]
    tokens = (steps - warmup) * trainer.ctx.global_batch_size * cfg.train_dataset.seq_length
    Path(spec["result"]).write_text(json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds,
                                                "steps": steps - warmup}))


if __name__ == "__main__":
    main()
