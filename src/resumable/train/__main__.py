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
import traceback
from typing import NoReturn

from resumable.errors import CheckpointError, ConfigError, NotImplementedYet, describe_os_error
from resumable.proctree import bind_to_launcher
from resumable.shared_paths import check_shared_paths
from resumable.train.checkpointing import TrainCommand, checkpoint_callbacks
from resumable.train.config import TrainConfig, ignored_keys, load_config
from resumable.train.launch import report
from resumable.train.loop import Interrupted, run


def train(cfg: TrainConfig, command: TrainCommand | None = None) -> None:
    """Train ``cfg`` as this process's share of the job; raises what ends it early
    (:class:`~resumable.train.loop.Interrupted` for a stop signal). ``command``: the one
    that started it, quoted when a fresh start over an earlier run's checkpoints is refused."""
    for warning in ignored_keys(cfg):
        logging.getLogger("resumable.train").warning(warning)
    check_shared_paths(cfg.checkpoint_dir)
    run(cfg, checkpoint_callbacks(cfg, command))


def _end(status: int, reported: str, printed: str) -> NoReturn:
    """Exit with ``status``; under ``resumable train``'s torchrun its launcher prints ``reported`` once for the job."""
    if not report(status, reported):
        print(printed, file=sys.stderr)
    raise SystemExit(status) from None


def main(argv: list[str] | None = None) -> None:
    """Train; exit status 2 for a configuration or checkpoint error, 1 for another, 128 + n after stop signal n."""
    bind_to_launcher()  # under a launcher, die with it (a dead launcher's rendezvous never completes)
    parser = argparse.ArgumentParser(prog="python -m resumable.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. runner_config.stop_step=20 (repeatable)")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), TrainCommand(args.config, tuple(args.overrides)))
    except (ConfigError, NotImplementedYet, CheckpointError) as err:  # the message says what to do
        _end(2, str(err), f"error: {err}")
    except OSError as err:  # the system's (a folder it may not write, a full disk), in words
        _end(2, describe_os_error(err), f"error: {describe_os_error(err)}")
    except Interrupted as stop:  # the save in flight was finished on the way out (loop.run)
        _end(stop.exit_status, str(stop), f"[rank {os.environ.get('RANK', '0')}] training {stop}")
    except Exception:
        if report(1, traceback.format_exc().rstrip()):
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
