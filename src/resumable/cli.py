"""The ``resumable`` command line.

    resumable train [--config C.yaml] [--nproc N] [--set KEY=VALUE ...]
    resumable inspect PATH [--json]
    resumable verify PATH [--no-checksum]
    resumable diff A B [--model-only]
    resumable merge SRC OUT
    resumable split SRC OUT --layout dp=2,tp=2[,pp=N] [--sharded-optimizer]
    resumable convert SRC OUT --to {v2,unified,hf,legacy}

Exit status: 0 success; 1 the answer is "no" (verify found problems, diff found
differences); 2 an error (the message names the path and what to do).
The checkpoint commands live in :mod:`resumable.tools.commands`.

``train`` launches ``torchrun`` itself (single node) with ``--nproc`` processes, or, without
``--nproc``, with as many as the config's layout needs (data x model x pipeline parallel);
under the user's own ``torchrun`` (``WORLD_SIZE`` set) it trains as one rank of that job
(``torchrun --nproc-per-node 4 -m resumable.train --config C.yaml``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Sequence

from resumable.errors import CheckpointError, ConfigError


def _train(args: argparse.Namespace) -> int:
    train_argv = (["--config", args.config] if args.config else []) + [
        x for kv in args.set for x in ("--set", kv)
    ]
    nproc = args.nproc
    if not nproc and "WORLD_SIZE" not in os.environ:
        # Not under a launcher: start as many processes as the config's layout needs.
        from resumable.train.config import load_config

        nproc = load_config(args.config, args.set).parallel_config.world_size
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        print(f"resumable train: launching torchrun with {nproc} processes", file=sys.stderr)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "resumable.train", *train_argv]
        return subprocess.call(cmd)
    from resumable.train.__main__ import main as train_main

    return train_main(train_argv)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the reference Qwen3 model",
        description="Train the reference Qwen3 model with a MindFormers-style YAML config "
        "(the embedded default when --config is not given).",
    )
    p.add_argument("--config", help="YAML config file (default: the embedded default config)")
    p.add_argument("--nproc", type=int, default=0,
                   help="launch this many processes on this node with torchrun (default: as many as "
                        "the layout needs, parallel_config data x model x pipeline)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. runner_config.stop_step=20 "
                        "or callbacks.0.keep_checkpoint_max=2 (repeatable)")
    p.set_defaults(func=_train)


def _commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from resumable.tools.commands import COMMANDS as TOOLS

    return [_add_train, *TOOLS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resumable",
        description="Checkpointing and resume-training for distributed PyTorch training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, NotImplementedError, OSError, ValueError) as err:
        print(f"resumable {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
