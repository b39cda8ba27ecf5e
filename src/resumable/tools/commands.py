"""Argument parsing and output of the checkpoint commands of ``resumable`` (inspect ... convert).

Each ``_add_*`` registers one subcommand; each handler returns the exit status
(0 success, 1 a negative answer: problems or differences found). Errors propagate to
``resumable.cli.main``, which prints them and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError

from resumable.errors import ConfigError
from resumable.models.qwen3 import AttentionShape, ModelConfig

_PROGRESS = "--quiet"


def _heads(text: str) -> AttentionShape:
    try:
        h, kv, d = (int(x) for x in text.split(","))
        return AttentionShape(h, kv, d)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--heads {text!r}: expected HEADS,KV_HEADS,HEAD_DIM such as 16,8,128 "
                                         f"({exc})") from None


def _dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"--dtype {text!r}: expected a floating dtype: float32, bfloat16, float16")
    return dtype


def _size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit) and text[:-len(unit)].strip().isdigit():
            return int(text[:-len(unit)]) * factor
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected bytes such as 5GB, 500MB or 1000000")


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() == "true"


_LAYOUT_FLAGS = ("use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")


def _source_args(p: argparse.ArgumentParser) -> None:
    """How a source is read (:func:`resumable.sources.open_source`'s arguments)."""
    from resumable.sources import NAMES

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
    """Writes to the sys.stderr of the moment (a test's captured one too)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


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
                   help="cast floating-point tensors to this dtype (e.g. float32 for the reference trainer)")
    _source_args(p)
    if shards:
        p.add_argument("--max-shard-size", type=_size, default="5GB",
                       help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument(_PROGRESS, action="store_true", help="no progress bar")


def _v2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharded-optimizer", action="store_true",
                   help="parameters and optimizer state also split over dp (parallel.enable_parallel_optimizer)")
    p.add_argument("--prefix", default="CKP", help="file name prefix (default CKP)")
    p.add_argument("--remove-redundancy", action="store_true", help="store each replicated chunk once")


def _layout(args: argparse.Namespace) -> Any:
    from resumable.tools.rules import parse_layout

    return parse_layout(args.layout or "", args.sharded_optimizer)


# ------------------------------------------------------------------------------ handlers


def _inspect(args: argparse.Namespace) -> int:
    from resumable.tools.inspect import inspect_path, render

    report = inspect_path(args.path, **_source_options(args))
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from resumable.tools.verify import verify_path

    problems, checked, what = verify_path(args.path, checksum=not args.no_checksum, **_source_options(args))
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) found ({checked} files checked: {what})")
        return 1
    print(f"{args.path}: OK ({checked} files checked: {what})")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.diff import diff_sources

    options = _source_options(args)
    a, b = open_source(args.a, **options), open_source(args.b, **options)
    counts: dict[str, int] = {}
    for row in diff_sources(a, b, model_only=args.model_only):
        counts[row.status] = counts.get(row.status, 0) + 1
        if row.status != "equal" or args.all:
            diff = "" if row.max_abs_diff is None else f"  max abs diff {row.max_abs_diff:.6g}"
            detail = f"  ({row.detail})" if row.detail else ""
            print(f"{row.status:<15} {row.name}{diff}{detail}")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"A={args.a} B={args.b}: {summary or 'no tensors'}")
    return 0 if set(counts) <= {"equal"} else 1


def _merge(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.merge import merge

    out = merge(open_source(args.src, **_source_options(args)), args.out, max_shard_size=args.max_shard_size,
                dtype=args.dtype, progress=not args.quiet)
    print(f"wrote unified checkpoint {out}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from resumable.sources import open_source
    from resumable.tools.split import write_v2

    folder = write_v2(open_source(args.src, **_source_options(args)), args.out, _layout(args), prefix=args.prefix,
                      remove_redundancy=args.remove_redundancy, dtype=args.dtype, iteration=args.iteration,
                      progress=not args.quiet)
    print(f"wrote {folder}")
    return 0


def _model_section(path: Path) -> ModelConfig:
    """The ``model:`` section of a training YAML, validated (the rest of the file is the trainer's)."""
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from None
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
        model = _model_section(Path(args.config))
    if args.hf_config:
        from resumable.formats.hf import load_json_object

        hf_config = load_json_object(Path(args.hf_config), "--hf-config")
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
          ".ckpt or .safetensors, a legacy rank file, a PyTorch .ckpt/.pt/.pth/.bin; or a folder holding only it)")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's iterations, layout, context and tensors",
                       description="Show which iterations a checkpoint folder holds, which is the latest and "
                       "whether each is complete (committed), the layout that wrote it, the training context "
                       "and every tensor (dtype, global shape, chunks, size).")
    p.add_argument("path", help=_PATHS)
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of tables")
    _source_args(p)
    p.set_defaults(func=_inspect)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check completeness, sizes and checksums; exit 1 on any problem",
                       description="Check one checkpoint, or every iteration of a checkpoint folder: committed, "
                       "every file present with its recorded size and xxh3-64 checksum, headers readable. "
                       "Prints one line per problem, naming the file; exit status 1 when any is found.")
    p.add_argument("path", help=_PATHS)
    p.add_argument("--no-checksum", action="store_true", help="check sizes only (fast: reads no data)")
    _source_args(p)
    p.set_defaults(func=_verify)


def _add_diff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor; exit 0 when equal, 1 otherwise",
                       description="Compare two checkpoints of any formats and layouts, tensor by tensor: equal, "
                       "different (with the max abs difference), shape mismatch, dtype mismatch, missing in A, "
                       "missing in B. Exit status 0 when every tensor is equal, 1 otherwise.")
    p.add_argument("a", help="checkpoint A: " + _PATHS)
    p.add_argument("b", help="checkpoint B (any format)")
    p.add_argument("--model-only", action="store_true", help="ignore optimizer state (e.g. against a HF export)")
    p.add_argument("--all", action="store_true", help="also list the equal tensors")
    _source_args(p)
    p.set_defaults(func=_diff)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a sharded checkpoint into full tensors (unified safetensors)",
                       description="Write every tensor of a sharded checkpoint (Checkpoint 2.0, legacy, "
                       "MindFormers) in full as HuggingFace-style safetensors shards + index, plus common.json. "
                       "One tensor is assembled at a time: memory is bounded by the largest tensor.")
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="new (or empty) output folder")
    _common_write_args(p, shards=True)
    p.set_defaults(func=_merge)


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="write a checkpoint as Checkpoint 2.0 for a parallel layout",
                       description="Write a full (unified/HuggingFace) or any other checkpoint as Checkpoint 2.0 "
                       "for a parallel layout, offline, exactly as the trainer saves on that layout (tensor "
                       "parallel: column-wise dim 0, row-wise dim 1; pipeline stages own contiguous layers).")
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="checkpoint folder to write iteration_* and the tracker into")
    p.add_argument("--layout", required=True, metavar="dp=N,tp=N[,pp=N]", help="the target layout")
    p.add_argument("--iteration", type=int, default=None, help="iteration number (default: the source's)")
    _v2_args(p)
    _common_write_args(p, shards=False)
    p.set_defaults(func=_split)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from resumable.tools.convert import TARGETS

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
                       "no config.json gets one inferred from its shapes (logged).")
    p.add_argument("src", help=_PATHS)
    p.add_argument("out", help="output folder (for v2: the checkpoint folder)")
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
    _add_inspect, _add_verify, _add_diff, _add_merge, _add_split, _add_convert]
"""Subcommand registrars, in ``--help`` order."""
