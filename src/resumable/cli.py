"""The ``resumable`` command line.

    resumable train [--config C.yaml] [--nproc N] [--set KEY=VALUE ...] [--stop-timeout S] [--print-config]
    resumable inspect PATH [--json]
    resumable verify PATH [--no-checksum]
    resumable diff A B [--model-only]
    resumable merge SRC OUT
    resumable split SRC OUT --layout dp=2,tp=2[,pp=N] [--sharded-optimizer]
    resumable convert SRC OUT --to {v2,unified,hf,legacy}

Exit status (``--help`` says it too): 0 success; 1 the answer is "no" (verify found problems, diff
found differences), a damaged checkpoint, or a failed run; 2 a usage or configuration error (the
message names the path or key and what to do); 128 + n: ``train`` stopped by signal n (130 Ctrl-C,
143 SIGTERM) after finishing its save in flight; 130: a tool interrupted by Ctrl-C (no partial output left).
The checkpoint commands live in :mod:`resumable.tools.commands`. Every checkpoint path they take, read or
written, may be ``s3://bucket/prefix`` (through :mod:`resumable.storage`), except legacy ``rank_*`` trees
(``convert --to legacy`` onto s3:// is refused: not implemented yet, exit status 2).

``train`` launches ``torchrun`` itself (single node) with ``--nproc`` processes, or, without
``--nproc``, with as many as the config's layout needs (data x model x pipeline parallel);
under the user's own ``torchrun`` (``WORLD_SIZE`` set) it trains as one rank of that job
(``torchrun --nproc-per-node 4 -m resumable.train --config C.yaml``). The torchrun it launches
gets every stop signal the command gets, and the job's processes die with the command
(:mod:`resumable.proctree`). A layout that cannot run on the processes is refused before any
starts; an error inside the ranks is printed once (:mod:`resumable.train.launch`); a stopped
job ends with one line naming its newest checkpoint and the command that resumes from it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from resumable import __version__
from resumable.errors import CheckpointError, ConfigError, CorruptCheckpointError, describe_os_error
from resumable.tools.commands import HelpFormatter, exit_status

STOP_TIMEOUT = 60.0  # seconds, `train --stop-timeout`


def _train(args: argparse.Namespace) -> int:
    if args.print_config:  # the effective config, as a run records it beside its log; nothing is launched
        from resumable.train.config import dump_config, load_config

        print(dump_config(load_config(args.config, args.set)), end="")
        return 0
    train_argv = (["--config", args.config] if args.config else []) + [
        x for kv in args.set for x in ("--set", kv)
    ]
    if "WORLD_SIZE" in os.environ:  # one rank of the user's own torchrun job
        from resumable.train.__main__ import main as train_main

        return train_main(train_argv)
    # Launching torchrun needs no torch here (seconds on a small machine): it is imported for one process only.
    from resumable.preemption import PREEMPTED_EXIT
    from resumable.proctree import STOP_SIGNALS
    from resumable.train.config import check_layout, load_config
    from resumable.train.launch import command, stopped
    from resumable.train.saving import TrainCommand

    cfg = load_config(args.config, args.set)
    nproc = args.nproc or cfg.parallel_config.world_size  # as many processes as the layout needs
    check_layout(cfg, nproc, f"--nproc {nproc}")  # what every rank would report, once and before starting them
    this = TrainCommand(args.config, tuple(args.set), (*(["--nproc", str(args.nproc)] if args.nproc else []), *(
        ["--stop-timeout", f"{args.stop_timeout:g}"] if args.stop_timeout != STOP_TIMEOUT else []),
        *(["--max-restarts", str(args.max_restarts)] if args.max_restarts else [])))
    if nproc > 1 or args.max_restarts:  # a restart needs torchrun, also for one process
        print(f"resumable train: launching torchrun with {nproc} process{'es' if nproc > 1 else ''}"
              + (f", up to {args.max_restarts} restart(s)" if args.max_restarts else ""), file=sys.stderr)
        status = _launch(command(nproc, train_argv, args.max_restarts), args.stop_timeout, cfg)
    else:
        try:  # seconds of importing torch, before any signal handling of ours: no traceback for a Ctrl-C
            from resumable.train.__main__ import train
            from resumable.train.loop import Interrupted
        except KeyboardInterrupt:
            print("resumable train: training stopped by SIGINT before it started", file=sys.stderr)
            return 130
        try:
            train(cfg, this)
            status = 0
        except Interrupted as stop:  # the save in flight was finished on the way out
            status = stop.exit_status
    resume = this.with_sets(f"load_checkpoint={cfg.checkpoint_dir}", "resume_training=true")
    if status - 128 in set(STOP_SIGNALS):
        print(f"resumable train: {stopped(cfg, status - 128, this.with_sets(), resume)}", file=sys.stderr)
    elif status == PREEMPTED_EXIT:
        print(f"resumable train: {stopped(cfg, None, this.with_sets(), resume)}", file=sys.stderr)
    return status


def _restarts(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _launch(cmd: list[str], stop_timeout: float, cfg: Any) -> int:
    """Run the job's torchrun (``resumable.train.launch.command``), forwarding stop signals to it
    (preemption signals straight to the workers, which save and exit with 75 together)."""
    from resumable.preemption import PREEMPTED_EXIT, signal_numbers
    from resumable.proctree import STOP_SIGNALS, run_forwarding_signals

    signals = ",".join(sig.name for sig in STOP_SIGNALS)
    env = {**os.environ,
           # torchrun forwards these to every worker (its default leaves out SIGUSR1/2; older
           # torchruns, without --signals-to-handle, read the second name) and SIGKILLs the
           # workers still alive after the timeout.
           "PET_SIGNALS_TO_HANDLE": signals, "TORCHELASTIC_SIGNALS_TO_HANDLE": signals,
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(1, int(stop_timeout)))}
    mon = cfg.checkpoint
    preempt = signal_numbers(mon.preemption_signals) if mon is not None and mon.save_on_preemption else frozenset()
    # A few seconds beyond torchrun's own timeout, so that torchrun reports before we kill it.
    return run_forwarding_signals(cmd, env, stop_timeout + 5, preempt, PREEMPTED_EXIT)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the reference Qwen3 model",
        description="Train the reference Qwen3 model with a MindFormers-style YAML config "
        "(the embedded default when --config is not given).",
        epilog=exit_status("the run failed (the message says why, once)", ("128+n", "stopped by signal n (130 "
                           "Ctrl-C, 143 SIGTERM) after finishing the save in flight; the last line names the "
                           "newest checkpoint and the command to resume")),
    )
    p.add_argument("--config", help="YAML config file (default: the embedded default config)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config (the file or the embedded default, with the --set overrides, "
                        "validated) as YAML and exit without training; each run saves it beside its log, "
                        "<output_dir>/log/config-<start time>.yaml")
    p.add_argument("--nproc", type=int, default=0,
                   help="launch this many processes on this node with torchrun (default: as many as "
                        "the layout needs, parallel_config data x model x pipeline)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. runner_config.stop_step=20 "
                        "or callbacks.0.keep_checkpoint_max=2 (repeatable)")
    p.add_argument("--stop-timeout", type=_positive_seconds, default=STOP_TIMEOUT, metavar="SECONDS",
                   help="on SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 or SIGUSR2 every process of the job "
                        "stops (finishing the save in flight); when torchrun runs the job, processes still "
                        "running this long after the signal are killed (default 60). A second signal "
                        "stops at once. Exit status: 128 + the signal's number (130 for Ctrl-C, 143 for "
                        "SIGTERM with save_on_preemption: false; 75 after a preemption's save)")
    p.add_argument("--max-restarts", type=_restarts, default=0, metavar="N",
                   help="when a process of the job dies, restart the job (torchrun --max-restarts) up to N "
                        "times; each restart resumes from the newest complete checkpoint (default 0)")
    p.set_defaults(func=_train)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from resumable.tools.commands import COMMANDS as TOOLS

    return [_add_train, *TOOLS]


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser; imports no torch (``resumable --help`` answers in well under a second)."""
    parser = argparse.ArgumentParser(
        prog="resumable",
        description="Checkpointing and resume-training for distributed PyTorch training.",
        epilog=exit_status('a "no" (verify found problems, diff found differences), a damaged checkpoint, or a '
                           "failed run", ("128+n", "stopped by signal n: train (130 Ctrl-C, 143 SIGTERM) after "
                           "finishing its save in flight; merge, split and convert (130 Ctrl-C) leaving no partial "
                           "output")),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"resumable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _commands():
        add(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, NotImplementedError, OSError, ValueError) as err:
        # An OSError of the system ("[Errno 13] Permission denied: 'x'") gets words; ours have them.
        text = describe_os_error(err) if isinstance(err, OSError) else err
        print(f"resumable {args.command}: error: {text}", file=sys.stderr)
        return 1 if isinstance(err, CorruptCheckpointError) else 2
    except KeyboardInterrupt:  # Ctrl-C in a tool: its temporary output is gone (each writer removes its own)
        out = getattr(args, "out", None)
        print(f"resumable {args.command}: interrupted (Ctrl-C)" + (f"; no partial output left at {out}: run the "
              "command again" if out else ""), file=sys.stderr)
        return 130


def script() -> NoReturn:
    """The ``resumable`` command: :func:`main`, then exit without the interpreter's final garbage
    collection over every object alive (``gc.freeze``): after torch was imported it costs a second
    or more of a 2-core machine, and the process ends anyway."""
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    script()
