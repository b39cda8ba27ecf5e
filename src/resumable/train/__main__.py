"""Train from a YAML config, single process or under torchrun.

    python -m resumable.train --config configs/tiny.yaml --set runner_config.stop_step=20
    torchrun --nproc-per-node 4 -m resumable.train --config configs/dp2_tp2.yaml

Without ``--config`` the embedded default (DP2 x TP2, 4 processes) is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from resumable.errors import CheckpointError, ConfigError, NotImplementedYet
from resumable.proctree import bind_to_launcher
from resumable.shared_paths import check_shared_paths
from resumable.train.checkpointing import checkpoint_callbacks
from resumable.train.config import ignored_keys, load_config
from resumable.train.loop import Interrupted, run


def main(argv: list[str] | None = None) -> None:
    """Train; exit status 2 for a configuration or checkpoint error, 128 + n after stop signal n."""
    bind_to_launcher()  # under a launcher, die with it (a dead launcher's rendezvous never completes)
    parser = argparse.ArgumentParser(prog="python -m resumable.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. runner_config.stop_step=20 (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for warning in ignored_keys(cfg):
            logging.getLogger("resumable.train").warning(warning)
        check_shared_paths(cfg.checkpoint_dir)
        run(cfg, checkpoint_callbacks(cfg))
    except (ConfigError, NotImplementedYet, CheckpointError) as err:  # the message says what to do
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:  # the save in flight was finished on the way out (loop.run)
        print(f"[rank {os.environ.get('RANK', '0')}] training {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None


if __name__ == "__main__":
    main()
