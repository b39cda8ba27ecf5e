"""Argument parsing and output of the checkpoint commands of ``resumable`` (inspect ... convert).

Each ``_add_*`` registers one subcommand; each handler returns the exit status
(0 success, 1 a negative answer: problems or differences found). Errors propagate to
``resumable.cli.main``, which prints them in one line and exits with 1 (a damaged checkpoint) or 2.
Nothing here imports torch, pydantic or the models at module level: ``resumable --help`` builds
every parser without them; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import textwrap
from typing import TYPE_CHECKING, Any, Callable

from resumable import storage
from resumable.errors import CheckpointError, CheckpointNotFoundError, ConfigError, describe_os_error, yaml_problem
from resumable.formats.ms_names import NAMES
from resumable.tools import TARGETS

if TYPE_CHECKING:
    import torch

    from resumable.models.qwen3 import AttentionShape, ModelConfig
    from resumable.storage import AnyPath
    from resumable.tools.diff import DiffRow

_PROGRESS = "--quiet"
_MAX_CONFIG_BYTES = 1 << 20  # --config: a training YAML is a few kB


def _heads(text: str) -> AttentionShape:
    from resumable.models.qwen3 import AttentionShape

    try:
        h, kv, d = (int(x) for x in text.split(","))
        return AttentionShape(h, kv, d)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--heads {text!r}: expected HEADS,KV_HEADS,HEAD_DIM such as 16,8,128 "
                                         f"({exc})") from None


def _dtype(text: str) -> torch.dtype:
    import torch

    from resumable.tools.merge import DTYPE_ALIASES

    dtype = getattr(torch, DTYPE_ALIASES.get(text, text), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"--dtype {text!r}: expected a floating dtype: bf16, fp16, fp32 (or "
                                         "bfloat16, float16, float32)")
    return dtype


def _size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit) and text[:-len(unit)].strip().isdigit():
            return int(text[:-len(unit)]) * factor
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected bytes such as 5GB, 500MB or 1000000")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0, such as 1e-6")
    return value


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() == "true"


_LAYOUT_FLAGS = ("use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")


def _source_args(p: argparse.ArgumentParser) -> None:
    """How a source is read (:func:`resumable.sources.open_source`'s arguments)."""
    p.add_argument("--names", choices=NAMES, default="auto",
                   help="MindSpore/MindFormers names: auto (default) maps MindFormers Qwen3 names to HuggingFace "
                        "names when every parameter is one, else keeps them; hf always maps (an error when a name "
                        "does not fit); keep never does")
    p.add_argument("--heads", type=_heads, default=None, metavar="H,KV,D",
                   help="attention heads, KV heads and head dim for splitting MindFormers linear_qkv "
                        "(default: the recorded config.json's, else inferred from the tensor shapes)")
    p.add_argument("--use-contiguous-weight-layout-attention", type=_flag, default=None, metavar="{true,false}",
                   help="MindFormers linear_qkv is [Q; K; V] (true) or grouped per KV head (false) (default: the "
                        "checkpoint's recorded config.json, else false, MindFormers' default)")
    p.add_argument("--use-interleaved-weight-layout-mlp", type=_flag, default=None, metavar="{true,false}",
                   help="MindFormers linear_fc1 has gate and up rows interleaved (true) or is [gate; up] (false) "
                        "(default: the checkpoint's recorded config.json, else true, MindFormers' default)")
    p.add_argument("--src-strategy", default=None, metavar="PATH",
                   help="a MindFormers legacy tree's strategy file or folder (src_strategy_path_or_dir), for "
                        "trees whose ranks hold slices")


class _Stderr(logging.Handler):
    """Writes to the sys.stderr of the moment (a test's captured one too) through ``tqdm.write``: a
    progress bar shown meanwhile is cleared first and redrawn after, so that no line is drawn over."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    """open_source's keyword arguments from the flags; the decisions it logs (and the exports' config.json
    decisions, resumable.tools.merge) go to stderr."""
    for name in ("resumable.sources", "resumable.tools.merge"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Stderr) for h in logger.handlers):
            logger.addHandler(_Stderr())
            logger.setLevel(logging.INFO)
    fused = {k: getattr(args, k) for k in _LAYOUT_FLAGS if getattr(args, k) is not None}
    return {"heads": args.heads, "fused": fused or None, "names": args.names, "src_strategy": args.src_strategy}


def _common_write_args(p: argparse.ArgumentParser, *, shards: bool) -> None:
    p.add_argument("--dtype", type=_dtype, default=None,
                   help="cast floating-point tensors to bf16, fp16 or fp32 while writing (integer tensors are never "
                        "cast; an exported config.json records it), e.g. fp32 for the reference trainer")
    _source_args(p)
    if shards:
        p.add_argument("--max-shard-size", type=_size, default="5GB",
                       help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument(_PROGRESS, action="store_true", help="no progress bar (one is shown only when stderr is a terminal)")


def _v2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharded-optimizer", action="store_true",
                   help="parameters and optimizer state also split over dp (parallel.enable_parallel_optimizer)")
    p.add_argument("--prefix", default="CKP", help="file name prefix (default CKP)")
    p.add_argument("--remove-redundancy", action="store_true", help="store each replicated chunk once")


def _layout(args: argparse.Namespace) -> Any:
    from resumable.tools.rules import parse_layout

    return parse_layout(args.layout or "", args.sharded_optimizer)


# ------------------------------------------------------------------------------ help


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, except that each line of a description or epilog is wrapped on its own: an indented
    line (``  1  what 1 means``) continues under its text."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            label = re.match(r"\s+\S+\s+", line)
            lead = label.group() if label else ""
            lines.append(textwrap.fill(" ".join(line[len(lead):].split()), width, initial_indent=indent + lead,
                                       subsequent_indent=indent + " " * len(lead)))
        return "\n".join(lines)


def exit_status(one: str, *more: tuple[str, str]) -> str:
    """The ``--help`` epilog of a command: what each exit status means; ``one``: what 1 means for it; ``more``:
    further ``(status, meaning)`` rows."""
    rows = [("0", "success"), ("1", one),
            ("2", "a usage or configuration error: the message names the path or key and what to do"), *more]
    width = max(len(code) for code, _ in rows)
    return "\n".join(["exit status:", *(f"  {code:<{width}}  {meaning}" for code, meaning in rows)])


_INTERRUPTED = ("130", "interrupted (Ctrl-C): no partial output is left; run the command again")
_DAMAGED = "the source is damaged (the message names the file); nothing is written"


# ------------------------------------------------------------------------------ handlers


def _inspect(args: argparse.Namespace) -> int:
    from resumable.tools.inspect import inspect_path, render, render_summary, summary

    report = inspect_path(args.path, **_source_options(args))
    if args.json:
        print(json.dumps(summary(report) if args.summary else report, indent=1))
    else:
        print(render_summary(report) if args.summary else render(report))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from resumable.tools.verify import verify_path

    problems, checked, what = verify_path(args.path, checksum=not args.no_checksum, **_source_options(args))
    if args.json:
        print(json.dumps({"path": args.path, "ok": not problems, "files_checked": checked, "checked": what,
                          "problems": [{"where": p.where, "message": p.message} for p in problems]}, indent=1))
        return 1 if problems else 0
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) found ({checked} files checked: {what})")
        return 1
    print(f"{args.path}: OK ({checked} files checked: {what})")
    return 0


def _diff_line(row: DiffRow) -> str:
    """One tensor's line: status, name, the largest difference (where, and both values there), detail."""
    diff = ""
    if row.max_abs_diff is not None and row.status != "equal":
        diff = f"  max abs diff {row.max_abs_diff:.6g}"
        if row.values is not None:
            diff += f"{f' at {list(row.at)}' if row.at else ''} (A {row.values[0]:.6g}, B {row.values[1]:.6g})"
    return f"{row.status:<16} {row.name}{diff}{f'  ({row.detail})' if row.detail else ''}"


def _value(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _diff(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.diff import SAME, diff_context, diff_sources

    options = _source_options(args)
    a, b = open_source(args.a, **options), open_source(args.b, **options)
    rows = diff_sources(a, b, model_only=args.model_only, atol=args.atol, rtol=args.rtol)
    counts: dict[str, int] = {}
    listed = []
    for row in rows:  # printed as they come: a large checkpoint's answers appear one by one
        counts[row.status] = counts.get(row.status, 0) + 1
        if args.json:
            listed.append(vars(row))
        elif row.status != "equal" or args.all:
            print(_diff_line(row))
    context = None if args.model_only else diff_context(a, b)
    same = set(counts) <= set(SAME) and (context is None or context.same)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "same": same, "atol": args.atol, "rtol": args.rtol,
                          "counts": counts, "tensors": listed, "context": None if context is None else {
                              "keys": context.keys, "missing": context.missing,
                              "differences": [vars(r) for r in context.rows]}}, indent=1))
        return 0 if same else 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no tensors"
    if args.atol or args.rtol:
        summary += f" (atol {args.atol:g}, rtol {args.rtol:g})"
    if context is not None:
        if context.missing:
            side = a if context.missing == "A" else b
            print(f"{'context':<16} {context.missing} records no training context (a {side.format} checkpoint); "
                  "--model-only compares the weights alone")
            summary += f"; context: {context.missing} records none"
        else:
            for r in context.rows:
                values = "A " + ("missing" if r.status == "missing in A" else _value(r.a)) + ", B " + (
                    "missing" if r.status == "missing in B" else _value(r.b))
                print(f"{'context':<16} {r.key}: {values}")
            keys = f"{context.keys} key{'s' if context.keys != 1 else ''}"
            summary += (f"; context: {len(context.rows)} of {keys} differ" if context.rows else
                        f"; context equal ({keys})" if context.keys else "; no training context on either side")
    print(f"A={args.a} B={args.b}: {summary}")
    return 0 if same else 1


def _merge(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.merge import merge

    source = open_source(args.src, **_source_options(args))
    out = merge(source, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype, progress=not args.quiet)
    kinds = [t.kind for t in source.tensors.values()]
    print(f"wrote {out}: the full training state ({kinds.count('model')} model tensors, {kinds.count('opt')} "
          "optimizer tensors, the training context in common.json); for a HuggingFace model folder run: "
          f"resumable convert {shlex.quote(args.src)} OUT --to hf")
    return 0


def _split(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.split import write_v2

    folder = write_v2(open_source(args.src, **_source_options(args)), args.out, _layout(args), prefix=args.prefix,
                      remove_redundancy=args.remove_redundancy, dtype=args.dtype, iteration=args.iteration,
                      progress=not args.quiet)
    print(f"wrote {folder}")
    return 0


def _model_section(path: AnyPath) -> ModelConfig:
    """The ``model:`` section of a training YAML, validated (the rest of the file is the trainer's)."""
    import yaml
    from pydantic import ValidationError

    from resumable.models.qwen3 import ModelConfig

    try:
        tree = yaml.safe_load(storage.read_bounded(path, "--config", _MAX_CONFIG_BYTES).decode("utf-8"))
    except CheckpointNotFoundError:  # an OSError too: first
        raise ConfigError(f"--config: {path} does not exist: check the path") from None
    except OSError as exc:
        raise ConfigError(f"--config: {describe_os_error(exc)}") from None
    except (CheckpointError, UnicodeDecodeError) as exc:  # not a regular file, too large, the store failing
        raise ConfigError(f"--config: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {yaml_problem(exc)}") from None
    section = tree.get("model") if isinstance(tree, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path}: no model: section (a mapping of the model's sizes) to write "
                          "config.json from")
    try:
        return ModelConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, str(path), prefix="model.", schema=ModelConfig) from None


def _convert(args: argparse.Namespace) -> int:
    from resumable.tools.convert import convert

    model = hf_config = None
    if args.config:
        model = _model_section(storage.as_path(args.config))
    if args.hf_config:
        from resumable.formats.hf import load_json_object

        hf_config = load_json_object(storage.as_path(args.hf_config), "--hf-config")
    if args.to != "v2" and (args.layout or args.sharded_optimizer):
        raise ConfigError(f"--layout and --sharded-optimizer apply to --to v2 only, not --to {args.to}")
    out = convert(args.src, args.out, args.to, layout=_layout(args), prefix=args.prefix,
                  remove_redundancy=args.remove_redundancy, dtype=args.dtype, **_source_options(args),
                  hf_config=hf_config, model=model, max_shard_size=args.max_shard_size, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------- parsers


_PATHS = ("a checkpoint folder (follows latest_checkpointed_iteration.txt), an iteration_* folder, a rank_* "
          "tree (legacy), a MindFormers 2.0 folder, a HuggingFace/unified folder, or a single file (MindSpore "
          ".ckpt or .safetensors, a legacy rank file, a PyTorch .ckpt/.pt/.pth/.bin; or a folder holding only it); "
          "local or s3://bucket/prefix")


def _list(args: argparse.Namespace) -> int:
    from resumable.retention import KeepBest, Policy
    from resumable.tools.list import as_json, list_iterations, render

    policy = None
    if args.keep_max is not None or args.keep_every is not None or args.keep_best is not None:
        best = KeepBest(args.keep_best, args.metric, args.mode) if args.keep_best is not None else None
        policy = Policy(args.keep_max, args.keep_every, best)
    rows, tracker_problem = list_iterations(args.path, verify=args.verify, policy=policy)
    if args.json:
        print(json.dumps(as_json(args.path, rows, tracker_problem, args.verify), indent=1))
    else:
        print(render(args.path, rows, tracker_problem, args.verify))
    return 1 if tracker_problem or any(r.valid is False for r in rows) else 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="one row per iteration: committed, valid, size, age, the tracker's mark",
                       description="List the iterations of a Checkpoint 2.0 checkpoint folder, oldest first: step, "
                       "committed or not (a save that never finished), valid (every file present with its recorded "
                       "size, metadata.json and common.json sealed; checksums too with --verify), size on disk, "
                       "age, and which one the tracker (latest_checkpointed_iteration.txt) names. On a legacy "
                       "(rank_*) tree: one row per step's file, complete when every rank folder holds it, valid "
                       "against each rank's meta.json records, and the latest mark when every meta.json names it.",
                       epilog=exit_status("a committed iteration (legacy: complete step) is invalid or the tracker "
                                          "(legacy: a meta.json) is damaged: one PROBLEM line each"))
    p.add_argument("path", help="a checkpoint folder (<output_dir>/checkpoint) or a legacy rank_* tree, local or "
                   "s3://bucket/prefix")
    p.add_argument("--verify", action="store_true",
                   help="also check every file's xxh3-64 and block checksums (reads every byte)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object (for scripts): {"path", "checked", "tracker_problem", "iterations": '
                        '[{"iteration", "folder", "committed", "valid", "problem", "bytes", "age_s", "tracked", '
                        '"kept_by", and for a legacy tree "file", "epoch_step", "ranks", "world_size", '
                        '"latest_on"}]}')
    policy = p.add_argument_group("retention", "the job's retention policy (the folder does not record it): "
                                  "a \"kept by\" column names what keeps each committed iteration (legacy: "
                                  "each step's file, decided per rank folder)")
    policy.add_argument("--keep-max", type=int, default=None, metavar="N",
                        help="keep_checkpoint_max: the newest N (without it, with another policy: keep all)")
    policy.add_argument("--keep-every", type=int, default=None, metavar="K",
                        help="keep_checkpoint_every_n_steps: every iteration divisible by K")
    policy.add_argument("--keep-best", type=int, default=None, metavar="N",
                        help="keep_best_checkpoint_max: the N best by --metric")
    policy.add_argument("--metric", default="loss", help="best_checkpoint_metric (default loss)")
    policy.add_argument("--mode", choices=("min", "max"), default="min",
                        help="best_checkpoint_mode: min (lower is better, default) or max")
    p.set_defaults(func=_list)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's iterations, layout, context and tensors",
                       description="Show which iterations a checkpoint folder holds, which is the latest and "
                       "whether each is complete (committed), the layout that wrote it, the training context "
                       "and every tensor (dtype, global shape, chunks, size).",
                       epilog=exit_status("the checkpoint is damaged (the message names the file)"))
    p.add_argument("path", help=_PATHS)
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of tables")
    p.add_argument("--summary", action="store_true",
                   help="one screen: format, iterations, latest, layout, context, and the count and bytes of the "
                        "tensors of each kind (model, optimizer), without the per-tensor table (with --json: "
                        "\"kinds\" and \"disk\" instead of \"tensors\" and \"files\")")
    _source_args(p)
    p.set_defaults(func=_inspect)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check completeness, sizes and checksums; exit 1 on any problem",
                       description="Check one checkpoint, or every iteration of a checkpoint folder: committed, "
                       "every file present with its recorded size and xxh3-64 checksum, headers readable. "
                       "Prints one line per problem, naming the file; exit status 1 when any is found.",
                       epilog=exit_status("problems found: one PROBLEM line each, naming the file"))
    p.add_argument("path", help=_PATHS)
    p.add_argument("--no-checksum", action="store_true", help="check sizes only (fast: reads no data)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object (for scripts): {"path", "ok", "files_checked", "checked", '
                        '"problems": [{"where", "message"}]}')
    _source_args(p)
    p.set_defaults(func=_verify)


def _add_diff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints: tensors and training context; exit 0 when the same",
                       description="Compare two checkpoints of any formats and layouts, tensor by tensor: equal, "
                       "within tolerance (--atol/--rtol), different (with the largest absolute difference, where, "
                       "and both values there), shape mismatch, dtype mismatch, missing in A, missing in B; then "
                       "the training context common.json records (global_step, epoch and step, consumed samples, "
                       "the data position, the LR schedule, the saved state's plain values), naming each key that "
                       "differs. Exit status 0 when every tensor is equal or within tolerance and the contexts "
                       "agree, 1 otherwise.",
                       epilog=exit_status("the checkpoints differ (a tensor beyond --atol/--rtol, or a context key), "
                                          "or one of them is damaged"))
    p.add_argument("a", help="checkpoint A: " + _PATHS)
    p.add_argument("b", help="checkpoint B (any format)")
    p.add_argument("--model-only", action="store_true",
                   help="compare the model weights only: no optimizer state, no training context (e.g. against a "
                        "HF export)")
    p.add_argument("--atol", type=_tolerance, default=0.0, metavar="X",
                   help="absolute tolerance: a tensor whose every element has |A - B| <= atol + rtol * |B| is "
                        "\"within tolerance\" (default 0: equal only)")
    p.add_argument("--rtol", type=_tolerance, default=0.0, metavar="X", help="relative tolerance (default 0)")
    p.add_argument("--all", action="store_true", help="also list the equal tensors")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object (for scripts): {"a", "b", "same", "atol", "rtol", "counts", '
                        '"tensors": [every tensor], "context": {"keys", "missing", "differences"}}')
    _source_args(p)
    p.set_defaults(func=_diff)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a sharded checkpoint into one unified folder: the full training state "
                       "(model + optimizer + context)",
                       description="Write the full training state of a sharded checkpoint (Checkpoint 2.0, legacy, "
                       "MindFormers): the model weights, the optimizer state and the training context "
                       "(common.json), every tensor in full, as HuggingFace-style safetensors shards + index (a "
                       "unified checkpoint: split writes it back for any layout). For a HuggingFace model folder "
                       "(weights + config.json, for transformers) use: resumable convert SRC OUT --to hf. One tensor "
                       "is assembled at a time: memory is bounded by the largest tensor.",
                       epilog=exit_status(_DAMAGED, _INTERRUPTED))
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="new (or empty) output folder, local or s3://bucket/prefix")
    _common_write_args(p, shards=True)
    p.set_defaults(func=_merge)


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="write a checkpoint as Checkpoint 2.0 for a parallel layout",
                       description="Write a full (unified/HuggingFace) or any other checkpoint as Checkpoint 2.0 "
                       "for a parallel layout, offline, exactly as the trainer saves on that layout (tensor "
                       "parallel: column-wise dim 0, row-wise dim 1; pipeline stages own contiguous layers).",
                       epilog=exit_status(_DAMAGED, _INTERRUPTED))
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="checkpoint folder to write iteration_* and the tracker into, local or "
                   "s3://bucket/prefix")
    p.add_argument("--layout", required=True, metavar="dp=N,tp=N[,pp=N]", help="the target layout")
    p.add_argument("--iteration", type=int, default=None, help="iteration number (default: the source's)")
    _v2_args(p)
    _common_write_args(p, shards=False)
    p.set_defaults(func=_split)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between checkpoint formats (v2, unified, hf, legacy)",
                       description="Convert any checkpoint (ours, MindFormers 2.0 with or without metadata.json, "
                       "legacy rank_* trees in .safetensors or .ckpt, HuggingFace/unified) to: v2 (Checkpoint "
                       "2.0, one rank unless --layout), unified (full tensors + context), hf (model weights + "
                       "config.json, loadable by transformers) or legacy (Checkpoint 1.0, one rank of full "
                       "tensors). MindSpore names "
                       "are kept (adam_m/adam_v -> optimizer.state.<name>.exp_avg/exp_avg_sq, scalars -> "
                       "common.json), and MindFormers Qwen3 names mapped to HuggingFace names (fused qkv/fc1 split) "
                       "when every parameter is one (--names). "
                       "Every target carries the source's config.json and its generation and tokenizer files "
                       "(byte for byte), so HuggingFace -> v2 -> hf needs no flag; a Qwen3 checkpoint that records "
                       "no config.json gets one inferred from its shapes (logged).",
                       epilog=exit_status(_DAMAGED, _INTERRUPTED))
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="output folder (for v2: the checkpoint folder), local or s3://bucket/prefix (not for "
                   "--to legacy)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--layout", default=None, metavar="dp=N,tp=N[,pp=N]", help="v2 only: target layout (default 1 rank)")
    p.add_argument("--config", default=None, help="hf only: training YAML whose model: section gives config.json "
                   "(default: the source's own, else inferred from a Qwen3's shapes)")
    p.add_argument("--hf-config", default=None, help="hf only: a config.json to write (instead of --config); a Qwen3 "
                   "config is checked against the tensors' shapes first")
    _v2_args(p)
    _common_write_args(p, shards=True)
    p.set_defaults(func=_convert)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_inspect, _add_verify, _add_diff, _add_merge, _add_split, _add_convert, _add_list]
"""Subcommand registrars, in ``--help`` order."""
