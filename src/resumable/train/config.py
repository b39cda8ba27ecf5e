"""The trainer's YAML configuration, typed and checked once at the boundary.

Keys and defaults follow docs/formats.md (MindSpore Transformers' names).
Every key is parsed and typed. Legacy-only keys set under Checkpoint 2.0 are
reported by ``ignored_keys`` (logged at start, never silently dropped); unknown
keys and wrong types raise ``ConfigError`` naming the dotted key.

Example::

    cfg = load_config("configs/tiny.yaml", overrides=["runner_config.stop_step=20"])
"""

from __future__ import annotations

import copy
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resumable import storage
from resumable.errors import ConfigError, Loc, yaml_problem
from resumable.models.qwen3 import ModelConfig
from resumable.storage import AnyPath

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Section):
    path: str = Field("", description="token file (.bin/.npy, uint16/uint32) or UTF-8 text; empty: embedded corpus")
    seq_length: int = Field(64, gt=1, description="tokens per sample")
    dtype: Literal["uint16", "uint32"] = Field("uint16", description="element type of a raw .bin token file")


class RunnerConfig(_Section):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(4, gt=0, description="micro batch size per data-parallel rank")
    stop_step: int | None = Field(None, gt=0, description="stop after this global step; the LR curve is unchanged")
    log_interval: int = Field(1, gt=0)


class LRScheduleConfig(_Section):
    type: Literal["cosine"] = "cosine"
    learning_rate: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(5, ge=0)
    total_steps: int | None = Field(None, gt=0, description="fixes the LR curve; default epochs x steps per epoch")


class OptimizerConfig(_Section):
    type: Literal["AdamW"] = "AdamW"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)


class ParallelConfig(_Section):
    data_parallel: int = Field(1, gt=0)
    model_parallel: int = Field(1, gt=0, description="tensor parallel size")
    pipeline_stage: int = Field(1, gt=0)
    micro_batch_num: int = Field(1, gt=0, description="micro batches per step (pipeline schedule)")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


class ParallelOptions(_Section):
    enable_parallel_optimizer: bool = False


class CheckpointMonitorConfig(_Section):
    type: Literal["CheckpointMonitor"]
    prefix: str = "CKP"
    directory: str = Field("", description="default <output_dir>/checkpoint")
    save_checkpoint_steps: int = Field(1, gt=0)
    keep_checkpoint_max: int = Field(5, gt=0, description="the newest N checkpoints are kept")
    keep_checkpoint_every_n_steps: int | None = Field(
        None, gt=0, description="also keep, forever, every checkpoint whose step is a multiple of this")
    keep_best_checkpoint_max: int | None = Field(
        None, gt=0, description="also keep the N best checkpoints by best_checkpoint_metric (recorded in each "
                                "checkpoint's common.json; legacy: in each rank folder's meta.json)")
    best_checkpoint_metric: Literal["loss"] = Field("loss", description="the metric keep_best_checkpoint_max "
                                                                        "ranks by: the step's loss")
    best_checkpoint_mode: Literal["min", "max"] = Field("min", description="min: lower is better; max: higher")
    async_save: bool = False
    checkpoint_format: Literal["safetensors", "ckpt"] = "safetensors"
    remove_redundancy: bool = False
    save_optimizer: bool = True
    on_save_error: Literal["raise", "warn"] = Field(
        "raise", description="a failed save (disk full, a rank died): 'raise' stops training with the error; "
                             "'warn' logs it and trains on (nothing was committed; the previous checkpoint stays)")
    discard_newer_checkpoints: bool = Field(
        False, description="a job starting from step k (a resume, a fallback past damage, a fresh start) refuses "
                           "to start while <directory> holds iterations above k, naming them; true deletes them "
                           "first (the tracker is moved back to k)")
    last_save_model_only: bool = Field(
        False, description="true: when training ends, after its last checkpoint is committed, also write the model "
                           "alone as a HuggingFace folder <output_dir>/export/step_<global step, 8 digits> in "
                           "export_dtype (config.json and tokenizer files as resumable convert --to hf writes them); "
                           "unlike torchtitan's key, the last checkpoint itself stays whole, so the run can resume")
    export_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "fp32", description="the dtype of last_save_model_only's floating-point tensors (others are never cast)")

    save_on_preemption: bool = Field(True, description="a preemption signal (preemption_signals) on any rank: every "
                                                       "rank saves the same next step, then the job exits with 75")
    preemption_signals: list[str] = Field(["SIGTERM", "SIGUSR1"], description="what counts as preemption "
                                          "(Slurm: --signal=USR1@120); SIGINT (Ctrl-C) always stops without a save")

    @field_validator("preemption_signals")
    @classmethod
    def _catchable_signals(cls, v: list[str]) -> list[str]:
        from resumable.preemption import signal_numbers
        if "SIGINT" in v or "INT" in v:
            raise ValueError("SIGINT (Ctrl-C) stops a run without a save; list SIGTERM, SIGUSR1, SIGUSR2 or SIGHUP")
        signal_numbers(v)
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"prefix must be a plain file-name prefix, got {v!r}")
        return v


class TrainConfig(_Section):
    output_dir: str = Field("./output", description="a local folder, or s3://bucket/prefix: the checkpoints go there "
                                                   "and the logs to local_output_dir")
    local_output_dir: str = Field("", description="only with an s3:// output_dir: the local folder of the logs "
                                                  "(log/), the exports and the conversions; default ./output")
    load_checkpoint: str = ""
    resume_training: bool | str = False
    use_legacy_format: bool = False
    load_ckpt_format: Literal["safetensors", "ckpt"] = "safetensors"
    auto_trans_ckpt: bool = False
    src_strategy_path_or_dir: str = ""
    transform_process_num: int | None = Field(None, gt=0)
    remove_redundancy: bool = False
    load_ckpt_async: bool = False
    balanced_load: bool = False
    exclude_from_loading: list[str] = Field(
        [], description="parts of load_checkpoint left out (fine-tuning from a pre-training checkpoint, as "
                        "torchtitan): 'optimizer' (fresh optimizer state), 'rng' (this run's seeds), 'data' (the data "
                        "starts at its beginning; the global step and learning-rate schedule still continue from the "
                        "checkpoint's: resume_training: false starts at step 0), and model tensor names or fnmatch "
                        "globs such as 'lm_head.*' (their weights and optimizer state keep this run's "
                        "initialisation); what is left out is logged in one line")
    pretrained_model_dir: str = ""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    train_dataset: DatasetConfig = DatasetConfig()
    runner_config: RunnerConfig = RunnerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    parallel_config: ParallelConfig = ParallelConfig()
    parallel: ParallelOptions = ParallelOptions()
    callbacks: list[CheckpointMonitorConfig] = []

    @property
    def checkpoint(self) -> CheckpointMonitorConfig | None:
        """The CheckpointMonitor callback, or None when the config saves nothing."""
        return self.callbacks[0] if self.callbacks else None

    @property
    def checkpoint_dir(self) -> AnyPath:
        """``callbacks.0.directory``, else ``<output_dir>/checkpoint``: a local folder or an s3:// prefix."""
        ckpt = self.checkpoint
        if ckpt is not None and ckpt.directory:
            return storage.as_path(ckpt.directory)
        return storage.as_path(self.output_dir) / "checkpoint"

    @property
    def local_dir(self) -> Path:
        """Where the logs, exports and conversions go: ``output_dir``, or ``local_output_dir`` when that is s3://."""
        if storage.is_remote_text(self.output_dir):
            return Path(self.local_output_dir or "./output")
        return Path(self.output_dir)

    @model_validator(mode="after")
    def _storage_is_supported(self) -> "TrainConfig":
        for key, value in (("output_dir", self.output_dir), ("load_checkpoint", self.load_checkpoint),
                           ("pretrained_model_dir", self.pretrained_model_dir),
                           ("callbacks.0.directory", self.checkpoint.directory if self.checkpoint else "")):
            if value and storage.is_remote_text(value):
                try:
                    storage.as_path(value)
                except (ValueError, NotImplementedError) as exc:
                    raise ValueError(f"{key}: {exc}") from None
        if self.local_output_dir and not storage.is_remote_text(self.output_dir):
            raise ValueError(f"local_output_dir is for an s3:// output_dir; output_dir {self.output_dir!r} is local "
                             "and holds the logs itself: remove local_output_dir")
        if self.use_legacy_format and storage.is_object(self.checkpoint_dir):
            raise ValueError(f"use_legacy_format: true with checkpoints on {self.checkpoint_dir}: the legacy layout "
                             "on object storage is not implemented yet; Checkpoint 2.0 (use_legacy_format: false) "
                             "works on s3://")
        return self

    @field_validator("exclude_from_loading")
    @classmethod
    def _exclusions_are_names(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not e.strip()]
        if bad:
            raise ValueError("an entry is empty: expected optimizer, rng, data or a tensor name pattern such as "
                             "'lm_head.*'")
        return v

    @field_validator("callbacks")
    @classmethod
    def _one_monitor(cls, v: list[CheckpointMonitorConfig]) -> list[CheckpointMonitorConfig]:
        if len(v) > 1:
            raise ValueError(f"give at most one CheckpointMonitor, got {len(v)}")
        return v


# Checkpoint 1.0 keys: Checkpoint 2.0 reshards online and needs none of them. (src_strategy_path_or_dir is
# not one: Checkpoint 2.0 reads it for a MindFormers legacy tree whose ranks hold slices, train/foreign.py.)
LEGACY_ONLY: dict[str, Any] = {
    "auto_trans_ckpt": False,
    "transform_process_num": None,
    "load_ckpt_format": "safetensors",
}


def check_layout(cfg: TrainConfig, world_size: int, counted_by: str = "WORLD_SIZE") -> None:
    """Raise ConfigError if the layout cannot run on ``world_size`` processes, ``counted_by`` naming where
    that number came from. No collectives: ``resumable train`` runs it before starting the ranks."""
    pc, mc = cfg.parallel_config, cfg.model
    if pc.world_size != world_size:
        raise ConfigError(
            f"parallel_config.data_parallel ({pc.data_parallel}) x parallel_config.model_parallel "
            f"({pc.model_parallel}) x parallel_config.pipeline_stage ({pc.pipeline_stage}) = {pc.world_size}, "
            f"but the job has {world_size} processes ({counted_by}); make the product equal the world size"
        )
    tp = pc.model_parallel
    for key, heads in (("num_attention_heads", mc.num_attention_heads), ("num_key_value_heads", mc.num_key_value_heads)):
        if heads % tp:
            raise ConfigError(
                f"model.{key} ({heads}) must be divisible by parallel_config.model_parallel ({tp}): "
                "tensor parallelism splits attention heads across ranks"
            )
    if pc.pipeline_stage > mc.num_hidden_layers:
        raise ConfigError(
            f"parallel_config.pipeline_stage ({pc.pipeline_stage}) exceeds model.num_hidden_layers "
            f"({mc.num_hidden_layers}): every stage needs at least one layer"
        )
    if pc.pipeline_stage > 1 and mc.tie_word_embeddings:
        raise ConfigError(
            "model.tie_word_embeddings: true cannot be used with parallel_config.pipeline_stage > 1 "
            "(the embedding and lm_head live on different stages)"
        )


def ignored_keys(cfg: TrainConfig) -> list[str]:
    """Sentences naming the keys set to a value the chosen format does not use (to be logged)."""
    if cfg.use_legacy_format:
        return []
    return [f"{key}={getattr(cfg, key)!r} only applies to use_legacy_format: true; Checkpoint 2.0 loads "
            "any layout without conversion (a MindFormers legacy tree too, with src_strategy_path_or_dir), so it "
            "is ignored"
            for key, default in LEGACY_ONLY.items() if getattr(cfg, key) != default]


def apply_override(tree: dict, assignment: str) -> tuple[str, ...]:
    """Set ``a.b.0.c=value`` in a nested dict/list tree; the value is parsed as YAML. Returns the path set."""
    dotted, sep, raw = assignment.partition("=")
    parts = tuple(dotted.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. runner_config.stop_step=20")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); "
                          f"to pass it as text, quote it: --set '{dotted}=\"{raw}\"'") from None
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {dotted}: {part!r} is not an index of the {len(node)}-item list "
                    f"{'.'.join(parts[:depth])}"
                )
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif part not in node and parts[depth + 1].isdigit():  # a list item of a list not given
                here = ".".join(parts[:depth + 1])
                raise ConfigError(f"--set {dotted}: {here} is not set, so it has no item {parts[depth + 1]}; "
                                  f"give the whole list, e.g. --set '{here}=[{{...}}]'")
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])!r} is a value, not a section")
    return parts


Origin = Callable[[Loc], tuple[str, "str | None"]]


def parse_config(tree: dict, source: str = "<dict>", origin: Origin | None = None) -> TrainConfig:
    """Validate a nested dict into a TrainConfig, raising ConfigError that names the key.

    ``origin`` says where the value at a key was set (``ConfigError.from_validation``); default ``source``.
    """
    if not isinstance(tree, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of keys (e.g. seed: 0), "
                          f"got {'a list' if isinstance(tree, list) else 'a single value'}")
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError.from_validation(err, source, schema=TrainConfig, origin=origin) from None


def load_config_tree(path: str | os.PathLike | None) -> tuple[dict, str]:
    """Read a YAML file (or the embedded default) into a plain dict."""
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        text = _read_text(source)
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {source} is not valid YAML: {yaml_problem(err)}") from None
    return tree, str(source)


def _read_text(path: Path) -> str:
    """A YAML file's text (at most 64 MiB, a regular file: a config, not a stream)."""
    return storage.read_bounded(path, "config file", 64 << 20).decode("utf-8")


def _in_file(source: str, loc: Loc) -> tuple[str, str | None]:
    """``<file> line N`` of the key at ``loc`` (or of the deepest part of it the file has) and the
    value's text as written there (None unless it is a scalar)."""
    try:
        node: yaml.Node | None = yaml.compose(_read_text(Path(source)))
    except (OSError, yaml.YAMLError):
        return source, None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            line, node = (pair[0].start_mark.line, pair[1]) if pair else (line, None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            node = None
        if node is None:
            break
    where = source if line is None else f"{source} line {line + 1}"
    return where, node.value if isinstance(node, yaml.ScalarNode) else None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a YAML config (default: the embedded one), apply ``--set`` overrides and validate.

    An invalid key is blamed on the ``--set`` assignments that reach it, else on the file's line.
    """
    tree, source = load_config_tree(path)
    tree = copy.deepcopy(tree)
    assigned: dict[tuple[str, ...], str] = {}
    for assignment in overrides:
        parts = apply_override(tree, assignment)
        assigned.pop(parts, None)  # the last assignment of a key is the one that counts
        assigned[parts] = assignment

    def origin(loc: Loc) -> tuple[str, str | None]:
        key = tuple(map(str, loc))
        setters = [text for parts, text in assigned.items() if parts[:len(key)] == key or key[:len(parts)] == parts]
        if not setters:
            return _in_file(source, loc)
        exact = assigned.get(key)
        return ", ".join(f"--set {text}" for text in setters), exact.partition("=")[2] if exact else None

    return parse_config(tree, source, origin)


def dump_config(cfg: TrainConfig) -> str:
    """Every key's value as YAML (what ``resumable train --print-config`` prints); ``load_config`` reads it back."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def record_config(cfg: TrainConfig, folder: Path, start_step: int) -> Path:
    """Save a run's effective config in ``folder`` (beside its log) as ``config-<UTC start>.yaml``.

    One file per run: a resumed or repeated run writes its own, never over an earlier run's
    (``-1``, ``-2`` ... when two start in the same second). ``--config`` takes it as it is.
    """
    started = datetime.now(timezone.utc)
    text = (f"# the effective config of the resumable train run started {started:%Y-%m-%d %H:%M:%S} UTC "
            f"at global step {start_step}\n" + dump_config(cfg))
    stem = f"config-{started:%Y%m%dT%H%M%SZ}"
    n = 0
    while True:
        path = folder / (f"{stem}-{n}.yaml" if n else f"{stem}.yaml")
        try:
            storage.local.create_text(path, text)
            return path
        except FileExistsError:
            n += 1
