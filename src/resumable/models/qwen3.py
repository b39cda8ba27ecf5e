"""Everything the project knows about Qwen3: names, fused layouts, head counts, the parallel plan, config.json.

The trainer, the tools and the format readers share this one module, so that adding a
model (Llama, Qwen2) is one new file beside it (:mod:`resumable.models`); the format
readers know no model.

MindFormers names ↔ HuggingFace names: every name is matched exactly against a literal
table (``{i}`` stands for a layer number); there is no substring dispatch, so an unknown
name is an error, never a silent guess.

Two MindFormers tensors are fusions of several HuggingFace tensors (rows of the fused
tensor, ``[out, in]`` weights), each in one of two layouts (:class:`FusedLayout`, named
after MindFormers' model-config keys; its defaults are MindFormers')::

    linear_qkv  use_contiguous_weight_layout_attention: false (default)
                  for each KV group g: its query heads, then key head g, then value head g
                  (head_dim rows each)
                use_contiguous_weight_layout_attention: true
                  [Q; K; V]                             → q_proj, k_proj, v_proj
    linear_fc1  use_interleaved_weight_layout_mlp: true (default)
                  row 2r is gate row r, row 2r+1 is up row r
                use_interleaved_weight_layout_mlp: false
                  [gate; up]                            → gate_proj, up_proj

A checkpoint does not record which layout wrote it, and its shapes cannot tell (with one
KV head the two qkv layouts coincide). The optimizer moments of a fused tensor have its
rows in the same order, so they split the same way; moments and scalars are named as
every MindSpore checkpoint names them (:mod:`resumable.formats.ms_names`).

Example::

    heads = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8)
    hf = mf_to_hf("decoder.layers.0.self_attention.linear_qkv.weight", qkv, heads)
    # {"model.layers.0.self_attn.q_proj.weight": ..., "...k_proj.weight": ..., "...v_proj.weight": ...}
    assert torch.equal(hf_to_mf(hf, heads)["decoder.layers.0.self_attention.linear_qkv.weight"], qkv)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from resumable.errors import ConfigError, CorruptCheckpointError
from resumable.formats.ms_names import SCALARS, ms_export_name, our_name, parse_ms_name, parse_our_name

if TYPE_CHECKING:  # tensors are only indexed here: `resumable train` reads a config and starts torchrun without torch
    import torch

__all__ = [
    "ARCHITECTURE",
    "DEFAULT_LAYOUT",
    "FIRST_STAGE",
    "FUSED",
    "FUSED_LAYOUT_KEYS",
    "LAST_STAGE",
    "RENAMES",
    "TP_LAYER_PLAN",
    "TP_PARTIAL_GRADS",
    "TP_TOP_PLAN",
    "AttentionShape",
    "FusedLayout",
    "HF_DEFAULTS",
    "ModelConfig",
    "NameMap",
    "Part",
    "TPRule",
    "config_mismatches",
    "config_shape_problems",
    "fc1_rows",
    "fuse_fc1",
    "fuse_qkv",
    "hf_config",
    "hf_head_counts",
    "hf_to_mf",
    "infer_heads",
    "infer_hf_config",
    "is_hf_config",
    "is_hf_param",
    "is_mf_param",
    "layer_of",
    "map_mf_name",
    "mf_import_plan",
    "mf_to_hf",
    "model_keys_from_hf",
    "on_stage",
    "qkv_rows",
    "split_fc1",
    "split_qkv",
    "stage_layers",
    "tp_dim",
]

RENAMES: dict[str, str] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.self_attention.q_layernorm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "decoder.layers.{i}.self_attention.k_layernorm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
"""MindFormers parameter → HuggingFace parameter, one to one."""

FUSED: dict[str, tuple[Literal["qkv", "fc1"], tuple[str, ...]]] = {
    "decoder.layers.{i}.self_attention.linear_qkv.weight": ("qkv", (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    )),
    "decoder.layers.{i}.mlp.linear_fc1.weight": ("fc1", (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    )),
}
"""MindFormers fused parameter → (transform, HuggingFace parameters in fusion order)."""

@dataclass(frozen=True)
class AttentionShape:
    """Head counts needed to split ``linear_qkv``.

    Example::

        AttentionShape(num_heads=16, num_kv_heads=8, head_dim=128)
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"head counts and head_dim must be positive, got {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


@dataclass(frozen=True)
class FusedLayout:
    """Row order of the fused MindFormers tensors; the fields are MindFormers' model-config keys.

    Example::

        FusedLayout(use_contiguous_weight_layout_attention=True)    # linear_qkv is [Q; K; V]
    """

    use_contiguous_weight_layout_attention: bool = False
    use_interleaved_weight_layout_mlp: bool = True


DEFAULT_LAYOUT = FusedLayout()


class ModelConfig(BaseModel):
    """The ``model:`` section of the trainer's YAML: Qwen3 sizes, named as in HuggingFace's ``Qwen3Config``,
    and the row order of MindFormers' fused tensors when a MindFormers checkpoint is read (MindFormers'
    own model-config keys and defaults, :class:`FusedLayout`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = Field(256, gt=0, description="vocabulary size")
    hidden_size: int = Field(64, gt=0, description="width of the residual stream")
    intermediate_size: int = Field(128, gt=0, description="SwiGLU inner width")
    num_hidden_layers: int = Field(4, gt=0, description="decoder layers")
    num_attention_heads: int = Field(4, gt=0, description="query heads")
    num_key_value_heads: int = Field(2, gt=0, description="key/value heads (GQA)")
    head_dim: int = Field(16, gt=0, description="width of one attention head")
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0)
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the attention weights while "
                                     "training (HF's attention_dropout); > 0 draws from the RNG every step")

    use_contiguous_weight_layout_attention: bool = Field(
        False, description="a MindFormers load_checkpoint stores linear_qkv as [Q; K; V] (true) or grouped per "
                           "KV head (false, MindFormers' default)")
    use_interleaved_weight_layout_mlp: bool = Field(
        True, description="a MindFormers load_checkpoint stores linear_fc1 with gate and up rows interleaved "
                          "(true, MindFormers' default) or as [gate; up] (false)")

    @property
    def fused_layout(self) -> FusedLayout:
        return FusedLayout(self.use_contiguous_weight_layout_attention, self.use_interleaved_weight_layout_mlp)

    @model_validator(mode="after")
    def _heads_group(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})"
            )
        return self



@dataclass(frozen=True)
class NameMap:
    """How one MindFormers tensor becomes HuggingFace-side tensors of our state.

    ``transform`` is ``"rename"`` (one name), ``"qkv"`` (q, k, v), ``"fc1"``
    (gate, up) or ``"drop"`` (a MindSpore scalar: no tensor; ``reason`` says where the value goes).
    """

    mf_name: str
    transform: Literal["rename", "qkv", "fc1", "drop"]
    hf_names: tuple[str, ...]
    reason: str = ""


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + r"(\d+)".join(re.escape(part) for part in template.split("{i}")) + "$")


_MF_PATTERNS = [(_template_regex(t), t) for t in [*RENAMES, *FUSED]]
_HF_TO_MF: dict[str, tuple[str, int]] = {  # HF template → (MF template, position in the fusion)
    **{hf: (mf, 0) for mf, hf in RENAMES.items()},
    **{hf: (mf, k) for mf, (_, hfs) in FUSED.items() for k, hf in enumerate(hfs)},
}
_HF_PATTERNS = [(_template_regex(t), t) for t in _HF_TO_MF]


def _match(patterns: list[tuple[re.Pattern[str], str]], name: str) -> tuple[str, str] | None:
    """``(template, layer)`` of the one template ``name`` matches exactly, else None."""
    for regex, template in patterns:
        m = regex.match(name)
        if m:
            return template, m.group(1) if m.groups() else ""
    return None


def is_mf_param(param: str) -> bool:
    """Whether ``param`` (a parameter name, no optimizer prefix) is a MindFormers Qwen3 parameter."""
    return _match(_MF_PATTERNS, param) is not None


def is_hf_param(param: str) -> bool:
    """Whether ``param`` (a parameter name, no optimizer prefix) is a HuggingFace Qwen3 parameter."""
    return _match(_HF_PATTERNS, param) is not None


def map_mf_name(name: str) -> NameMap:
    """Where a MindFormers Qwen3 tensor (parameter, optimizer moment or scalar) goes.

    Raises:
        ValueError: the parameter is in none of the tables.

    Example::

        map_mf_name("adam_m.decoder.final_layernorm.weight").hf_names
        # ("optimizer.state.model.norm.weight.exp_avg",)
    """
    parsed = parse_ms_name(name)
    if parsed.kind == "scalar":
        return NameMap(name, "drop", (), SCALARS[name])
    found = _match(_MF_PATTERNS, parsed.param)
    if found is None:
        raise ValueError(
            f"unknown MindFormers Qwen3 tensor name {name!r}: it matches no entry of "
            "resumable.models.qwen3 (RENAMES, FUSED; optimizer prefixes adam_m./adam_v./moment1./moment2.)"
        )
    template, layer = found
    transform, hf_templates = ("rename", (RENAMES[template],)) if template in RENAMES else FUSED[template]
    hf_names = tuple(our_name(replace(parsed, param=t.replace("{i}", layer))) for t in hf_templates)
    return NameMap(name, transform, hf_names)


def qkv_rows(heads: AttentionShape, layout: FusedLayout = DEFAULT_LAYOUT) -> tuple[list[int], list[int], list[int]]:
    """Rows of the fused ``linear_qkv`` weight that hold q_proj, k_proj and v_proj, in order.

    Use :func:`resumable.geometry.runs` on a list to read it as contiguous slices.

    Example::

        qkv_rows(AttentionShape(num_heads=2, num_kv_heads=1, head_dim=1))   # ([0, 1], [2], [3])
    """
    q_size = heads.num_heads * heads.head_dim
    kv_size = heads.num_kv_heads * heads.head_dim
    if layout.use_contiguous_weight_layout_attention:
        return (list(range(q_size)), list(range(q_size, q_size + kv_size)),
                list(range(q_size + kv_size, q_size + 2 * kv_size)))
    group = heads.num_heads // heads.num_kv_heads
    block = (group + 2) * heads.head_dim  # one KV group: its queries, its key, its value
    q, k, v = [], [], []
    for g in range(heads.num_kv_heads):
        base = g * block
        q.extend(range(base, base + group * heads.head_dim))
        k.extend(range(base + group * heads.head_dim, base + (group + 1) * heads.head_dim))
        v.extend(range(base + (group + 1) * heads.head_dim, base + block))
    return q, k, v


def fc1_rows(fused_rows: int, layout: FusedLayout = DEFAULT_LAYOUT) -> tuple[list[int], list[int]]:
    """Rows of the fused ``linear_fc1`` weight that hold gate_proj and up_proj.

    Example::

        fc1_rows(4)     # ([0, 2], [1, 3])
    """
    if fused_rows % 2:
        raise ValueError(f"linear_fc1 must have an even number of rows, got {fused_rows}")
    if not layout.use_interleaved_weight_layout_mlp:
        half = fused_rows // 2
        return list(range(half)), list(range(half, fused_rows))
    return list(range(0, fused_rows, 2)), list(range(1, fused_rows, 2))


def _check_rows(what: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.dim() < 1 or tensor.shape[0] != rows:
        raise ValueError(f"{what} must have {rows} rows, got shape {list(tensor.shape)}")


def _take(fused: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return fused[rows]


def _fuse(parts: Sequence[torch.Tensor], rows: Sequence[list[int]]) -> torch.Tensor:
    """One tensor whose ``rows[i]`` are ``parts[i]`` (the rows of all parts cover it exactly once)."""
    out = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    for part, where in zip(parts, rows):
        out[where] = part
    return out


def split_qkv(fused: torch.Tensor, heads: AttentionShape,
              layout: FusedLayout = DEFAULT_LAYOUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``linear_qkv`` ([(H + 2·KV)·D, hidden]) into q [H·D, hidden], k and v [KV·D, hidden].

    Example::

        q, k, v = split_qkv(qkv, AttentionShape(16, 8, 128))
    """
    _check_rows("linear_qkv", fused, (heads.num_heads + 2 * heads.num_kv_heads) * heads.head_dim)
    q, k, v = (_take(fused, rows) for rows in qkv_rows(heads, layout))
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: AttentionShape,
             layout: FusedLayout = DEFAULT_LAYOUT) -> torch.Tensor:
    """Inverse of :func:`split_qkv`.

    Example::

        qkv = fuse_qkv(q, k, v, AttentionShape(16, 8, 128))
    """
    _check_rows("q_proj", q, heads.num_heads * heads.head_dim)
    _check_rows("k_proj", k, heads.num_kv_heads * heads.head_dim)
    _check_rows("v_proj", v, heads.num_kv_heads * heads.head_dim)
    return _fuse((q, k, v), qkv_rows(heads, layout))


def split_fc1(fused: torch.Tensor, layout: FusedLayout = DEFAULT_LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``linear_fc1`` ([2·ffn, hidden]) into gate and up ([ffn, hidden]).

    Example::

        gate, up = split_fc1(fc1)
    """
    gate, up = fc1_rows(fused.shape[0], layout)
    return _take(fused, gate), _take(fused, up)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor, layout: FusedLayout = DEFAULT_LAYOUT) -> torch.Tensor:
    """Inverse of :func:`split_fc1`.

    Example::

        fc1 = fuse_fc1(gate, up)
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {list(gate.shape)} and up_proj {list(up.shape)} differ in shape")
    return _fuse((gate, up), fc1_rows(2 * gate.shape[0], layout))


def mf_to_hf(name: str, tensor: torch.Tensor, heads: AttentionShape,
             layout: FusedLayout = DEFAULT_LAYOUT) -> dict[str, torch.Tensor]:
    """Turn one full MindFormers tensor into the HuggingFace-side tensors it holds.

    Returns an empty dict for MindSpore's scalars (:data:`resumable.formats.ms_names.SCALARS`).

    Example::

        mf_to_hf("decoder.layers.0.mlp.linear_fc1.weight", fc1, heads)
        # {"model.layers.0.mlp.gate_proj.weight": ..., "model.layers.0.mlp.up_proj.weight": ...}
    """
    mapped = map_mf_name(name)
    if mapped.transform == "drop":
        return {}
    if mapped.transform == "rename":
        parts: tuple[torch.Tensor, ...] = (tensor,)
    elif mapped.transform == "qkv":
        parts = split_qkv(tensor, heads, layout)
    else:
        parts = split_fc1(tensor, layout)
    return dict(zip(mapped.hf_names, parts))


def _hf_to_mf_name(name: str) -> tuple[str, int]:
    """MindFormers name and position in the fusion of one HF-side tensor name."""
    param, slot = parse_our_name(name)
    found = _match(_HF_PATTERNS, param)
    try:
        if found is None:
            raise ValueError("it matches no HuggingFace Qwen3 entry of resumable.models.qwen3")
        template, layer = found
        mf_template, position = _HF_TO_MF[template]
        return ms_export_name(mf_template.replace("{i}", layer), slot), position
    except ValueError as e:
        raise ValueError(f"no MindFormers name for {name!r}: {e} (optimizer tensors must be "
                         "optimizer.state.<fqn>.exp_avg or .exp_avg_sq)") from None


def hf_to_mf(tensors: Mapping[str, torch.Tensor], heads: AttentionShape,
             layout: FusedLayout = DEFAULT_LAYOUT) -> dict[str, torch.Tensor]:
    """Turn HuggingFace-side tensors (parameters and AdamW ``exp_avg``/``exp_avg_sq``) into MindFormers ones.

    Optimizer states are exported under AdamWeightDecay's ``adam_m.``/``adam_v.``.

    Raises:
        ValueError: a name is unknown, or a fused tensor misses one of its parts.

    Example::

        hf_to_mf({"model.norm.weight": w}, heads)     # {"decoder.final_layernorm.weight": w}
    """
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        mf_name, position = _hf_to_mf_name(name)
        groups.setdefault(mf_name, {})[position] = tensor
    out = {}
    for mf_name, parts in groups.items():
        mapped = map_mf_name(mf_name)
        if len(parts) != len(mapped.hf_names):
            missing = [n for k, n in enumerate(mapped.hf_names) if k not in parts]
            raise ValueError(f"cannot build {mf_name!r}: missing {missing}")
        ordered = [parts[k] for k in range(len(parts))]
        if mapped.transform == "qkv":
            out[mf_name] = fuse_qkv(*ordered, heads, layout)
        elif mapped.transform == "fc1":
            out[mf_name] = fuse_fc1(*ordered, layout)
        else:
            out[mf_name] = ordered[0]
    return out


def infer_heads(shapes: Mapping[str, tuple[int, ...]]) -> AttentionShape:
    """Head counts of a MindFormers Qwen3 checkpoint, from its shapes (name → shape).

    ``q_layernorm`` has ``head_dim`` elements, ``linear_proj`` has ``heads × head_dim``
    columns and ``linear_qkv`` ``(heads + 2 × kv_heads) × head_dim`` rows.

    Raises:
        ValueError: the tensors needed are missing or inconsistent (pass the heads explicitly).
    """
    def shape(suffix: str) -> tuple[int, ...]:
        name = f"decoder.layers.0.{suffix}"
        if name not in shapes:
            raise ValueError(f"cannot infer the attention head counts: {name!r} is not in the "
                             "checkpoint; pass the heads explicitly (--heads H,KV,D)")
        return tuple(shapes[name])
    head_dim = shape("self_attention.q_layernorm.weight")[0]
    heads = shape("self_attention.linear_proj.weight")[1] // head_dim if head_dim else 0
    kv2 = shape("self_attention.linear_qkv.weight")[0] // head_dim - heads if head_dim else 0
    if heads <= 0 or kv2 <= 0 or kv2 % 2 or heads % (kv2 // 2):
        raise ValueError(f"linear_qkv rows do not fit {heads} heads of {head_dim}; pass --heads H,KV,D")
    return AttentionShape(heads, kv2 // 2, head_dim)


# ------------------------------------------------------------------------------ parallel plan
#
# The one tensor- and pipeline-parallel plan of Qwen3. The trainer builds its
# parallelize_module plans, its partial-gradient reduction and its pipeline stages from it
# (resumable.train.parallel); `resumable split` computes from it, by tensor name, the
# boxes every rank holds (resumable.tools.rules). tests/distributed/test_train_layouts.py
# compares the two on every layout the trainer runs.


@dataclass(frozen=True)
class TPRule:
    """How tensor parallelism ("tp") splits one module: torch's parallel style and the weight dim it shards.

    ``nn.Linear`` weights are ``[out, in]``: column-wise shards dim 0 (output features),
    row-wise dim 1 (input features). ``nn.Embedding`` weights are ``[vocab, hidden]``:
    row-wise shards dim 0 (the vocabulary). Everything not in the plan is replicated.

    Example::

        TP_LAYER_PLAN["self_attn.o_proj"]      # TPRule(style="rowwise", dim=1)
    """

    style: Literal["colwise", "rowwise"]
    dim: int


TP_LAYER_PLAN: dict[str, TPRule] = {
    "self_attn.q_proj": TPRule("colwise", 0),   # each rank computes its own heads
    "self_attn.k_proj": TPRule("colwise", 0),
    "self_attn.v_proj": TPRule("colwise", 0),
    "self_attn.o_proj": TPRule("rowwise", 1),   # partial sums all-reduced back to the full width
    "mlp.gate_proj": TPRule("colwise", 0),      # each rank its slice of the FFN
    "mlp.up_proj": TPRule("colwise", 0),
    "mlp.down_proj": TPRule("rowwise", 1),
}
"""Module under ``model.layers.{i}`` → how "tp" splits it."""

TP_TOP_PLAN: dict[str, TPRule] = {
    "model.embed_tokens": TPRule("rowwise", 0),     # vocabulary-sharded lookup, summed over ranks
    "lm_head": TPRule("colwise", 0),                # vocabulary-sharded logits
}
"""Module outside the layers → how "tp" splits it."""

TP_PARTIAL_GRADS: tuple[str, ...] = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
"""Replicated weights under ``model.layers.{i}`` that see only this rank's heads: under "tp" their
gradient is a partial sum, to be summed over the "tp" ranks."""

FIRST_STAGE: tuple[str, ...] = ("model.embed_tokens",)
"""Modules only the first pipeline stage holds."""
LAST_STAGE: tuple[str, ...] = ("model.norm", "lm_head")
"""Modules only the last pipeline stage holds."""

_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_of(param: str) -> int | None:
    """The decoder layer a parameter (or module) name belongs to, None outside ``model.layers.{i}``."""
    m = _LAYER_PARAM.match(param)
    return int(m.group(1)) if m else None


def tp_dim(param: str) -> int | None:
    """The dim of HuggingFace parameter ``param`` that tensor parallelism shards; None: replicated.

    Example::

        tp_dim("model.layers.3.mlp.down_proj.weight")     # 1
        tp_dim("model.norm.weight")                       # None
    """
    module, _, leaf = param.rpartition(".")
    if leaf != "weight":  # Qwen3 has no biases: only weights are in the plan
        return None
    m = _LAYER_PARAM.match(module)
    rule = TP_LAYER_PLAN.get(m.group(2)) if m else TP_TOP_PLAN.get(module)
    return rule.dim if rule else None


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Layer indices of pipeline ``stage``: contiguous, the first ``num_layers % stages`` stages get one more.

    Example::

        [list(stage_layers(5, 2, s)) for s in range(2)]     # [[0, 1, 2], [3, 4]]
    """
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def on_stage(param: str, stage: int, stages: int, num_layers: int) -> bool:
    """Whether pipeline ``stage`` (of ``stages``) holds parameter ``param``.

    A layer's parameters are on the stage that owns the layer (:func:`stage_layers`),
    :data:`FIRST_STAGE` modules on the first stage, :data:`LAST_STAGE` ones on the last,
    anything else on every stage.

    Example::

        on_stage("lm_head.weight", 0, 2, 4)     # False
    """
    layer = layer_of(param)
    if layer is not None:
        return layer in stage_layers(num_layers, stages, stage)
    if param.startswith(tuple(f"{m}." for m in FIRST_STAGE)):
        return stage == 0
    if param.startswith(tuple(f"{m}." for m in LAST_STAGE)):
        return stage == stages - 1
    return True


def hf_head_counts(shapes: Mapping[str, tuple[int, ...]],
                   config: Mapping[str, object] | None = None) -> tuple[int, int] | None:
    """(attention heads, KV heads) of a HuggingFace Qwen3 state: from ``config`` (a ``config.json`` dict)
    when it has them, else from the shapes of layer 0's q_norm, q_proj and k_proj; None when neither tells.

    Example::

        hf_head_counts({}, {"num_attention_heads": 16, "num_key_value_heads": 8})    # (16, 8)
    """
    if config is not None:
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if isinstance(heads, int) and isinstance(kv, int):
            return heads, kv
    layer = "model.layers.0.self_attn"
    try:
        (head_dim,) = shapes[f"{layer}.q_norm.weight"]
        q_rows, k_rows = shapes[f"{layer}.q_proj.weight"][0], shapes[f"{layer}.k_proj.weight"][0]
    except (KeyError, ValueError, IndexError):
        return None
    return (q_rows // head_dim, k_rows // head_dim) if head_dim > 0 else None


# ------------------------------------------------------------------------------ config.json
#
# HuggingFace's config.json ↔ our ModelConfig (the trainer's `model:` keys are named as in
# transformers' Qwen3Config), the tensor shapes a config.json implies, and a config.json
# inferred from the shapes of a checkpoint that records none (a MindFormers one).

ARCHITECTURE = "Qwen3ForCausalLM"
"""``architectures[0]`` of a Qwen3 ``config.json``."""

HF_DEFAULTS: dict[str, float | int] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768}
"""``transformers.Qwen3Config``'s defaults of the keys tensor shapes cannot tell."""

_SAME = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta")
"""Keys that must agree between a config.json and ``model:``: they change the shapes or the function computed."""

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
"""Keys a config.json must give for its tensor shapes to follow (the others have defaults)."""


def _model(model_keys: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    return model_keys if isinstance(model_keys, ModelConfig) else ModelConfig(**model_keys)


def is_hf_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a Qwen3 model (``model_type`` or ``architectures``)."""
    archs = config.get("architectures")
    return config.get("model_type") == "qwen3" or (isinstance(archs, list) and ARCHITECTURE in archs)


def hf_config(model_keys: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """A ``transformers`` Qwen3 ``config.json`` (float32 weights) for our ``model:`` keys.

    Raises:
        ValueError: ``model_keys`` is not a valid ``model:`` section (pydantic names the key).

    Example::

        hf_config(ModelConfig())["model_type"]              # "qwen3"
        hf_config({"num_hidden_layers": 2})["num_hidden_layers"]
    """
    model = _model(model_keys)
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": model.attention_dropout, "use_sliding_window": False,
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size, "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads, "num_key_value_heads": model.num_key_value_heads,
        "head_dim": model.head_dim, "rms_norm_eps": model.rms_norm_eps, "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "max_position_embeddings": model.max_position_embeddings, "initializer_range": model.initializer_range,
        "tie_word_embeddings": model.tie_word_embeddings, "dtype": "float32",
    }


def _rope_theta(config: Mapping[str, Any]) -> float | None:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)
    return None if theta is None else float(theta)


def model_keys_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` keys of our YAML that a HuggingFace Qwen3 ``config.json`` fixes.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads``, ``num_key_value_heads``
    to ``num_attention_heads`` and ``tie_word_embeddings`` to false, as ``transformers.Qwen3Config``
    does; keys the config lacks (and that have no such default) are left out.

    Example::

        model_keys_from_hf({"hidden_size": 64, "num_attention_heads": 4})["head_dim"]     # 16
    """
    out = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "rms_norm_eps", "max_position_embeddings",
                                  "initializer_range") if k in config}
    out["num_key_value_heads"] = config.get("num_key_value_heads", config.get("num_attention_heads"))
    if "hidden_size" in config and "num_attention_heads" in config:
        out["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    theta = _rope_theta(config)
    if theta is not None:
        out["rope_theta"] = theta
    return out


def config_mismatches(model_keys: Mapping[str, Any] | ModelConfig, config: Mapping[str, Any]) -> list[str]:
    """Every architecture key on which ``config.json`` and ``model:`` disagree, as readable lines.

    Example::

        config_mismatches(ModelConfig(), {**hf_config(ModelConfig()), "hidden_size": 32})
        # ["model.hidden_size: 64 in the YAML, 32 in config.json"]
    """
    model = _model(model_keys)
    found = model_keys_from_hf(config)
    lines = []
    if config.get("model_type", "qwen3") != "qwen3":
        lines.append(f"model_type: {config.get('model_type')!r} in config.json, only 'qwen3' is supported")
    for key in _SAME:
        ours = getattr(model, key)
        theirs = found.get(key)
        differs = abs(ours - theirs) > 1e-12 * abs(ours) if isinstance(ours, float) and theirs is not None \
            else ours != theirs
        if theirs is None or differs:
            lines.append(f"model.{key}: {ours!r} in the YAML, {theirs!r} in config.json")
    return lines


def _expected_shapes(keys: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF parameter template → (shape, the config keys it follows from), ``{i}`` for a layer."""
    v, h, f = keys["vocab_size"], keys["hidden_size"], keys["intermediate_size"]
    n, kv, d = keys["num_attention_heads"], keys["num_key_value_heads"], keys["head_dim"]
    q = f"num_attention_heads {n} × head_dim {d}"
    k = f"num_key_value_heads {kv} × head_dim {d}"
    layer = {
        "self_attn.q_proj.weight": ((n * d, h), f"{q}, hidden_size {h}"),
        "self_attn.k_proj.weight": ((kv * d, h), f"{k}, hidden_size {h}"),
        "self_attn.v_proj.weight": ((kv * d, h), f"{k}, hidden_size {h}"),
        "self_attn.o_proj.weight": ((h, n * d), f"hidden_size {h}, {q}"),
        "self_attn.q_norm.weight": ((d,), f"head_dim {d}"),
        "self_attn.k_norm.weight": ((d,), f"head_dim {d}"),
        "mlp.gate_proj.weight": ((f, h), f"intermediate_size {f}, hidden_size {h}"),
        "mlp.up_proj.weight": ((f, h), f"intermediate_size {f}, hidden_size {h}"),
        "mlp.down_proj.weight": ((h, f), f"hidden_size {h}, intermediate_size {f}"),
        "input_layernorm.weight": ((h,), f"hidden_size {h}"),
        "post_attention_layernorm.weight": ((h,), f"hidden_size {h}"),
    }
    out = {"model.embed_tokens.weight": ((v, h), f"vocab_size {v}, hidden_size {h}"),
           **{f"model.layers.{{i}}.{name}": spec for name, spec in layer.items()},
           "model.norm.weight": ((h,), f"hidden_size {h}")}
    if not keys["tie_word_embeddings"]:
        out["lm_head.weight"] = ((v, h), f"vocab_size {v}, hidden_size {h}")
    return out


def _layers(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"layers 0-2, 5"``."""
    spans: list[list[int]] = []
    for i in sorted(layers):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"layer{'s' if len(layers) > 1 else ''} {text}"


def config_shape_problems(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every way the model parameters ``shapes`` (HF name → shape) differ from what a Qwen3 ``config.json``
    implies: each tensor's shape (one line per tensor and the layers it concerns), missing tensors,
    layers missing or beyond ``num_hidden_layers``, ``lm_head.weight`` missing though untied.

    Tensors that are no Qwen3 parameter are not judged (``transformers`` ignores them).

    Example::

        config_shape_problems({**hf_config(ModelConfig()), "num_key_value_heads": 4}, shapes)
        # ["model.layers.{i}.self_attn.k_proj.weight (layers 0-3): [32, 64] in the checkpoint, "
        #  "config.json implies [64, 64] (num_key_value_heads 4 × head_dim 16, hidden_size 64)", ...]
    """
    keys = model_keys_from_hf(config)
    keys["head_dim"] = keys.get("head_dim")
    bad = [f"config.json: {k} is {keys.get(k)!r}, expected a positive integer"
           for k in (*_SIZES, "num_key_value_heads", "head_dim")
           if type(keys.get(k)) is not int or keys[k] <= 0]
    if bad:
        return bad
    problems = []
    if keys["num_attention_heads"] % keys["num_key_value_heads"]:
        problems.append(f"config.json: num_attention_heads {keys['num_attention_heads']} is not a multiple of "
                        f"num_key_value_heads {keys['num_key_value_heads']}")
    count = keys["num_hidden_layers"]
    present = sorted({i for name in shapes if (i := layer_of(name)) is not None})
    if [i for i in present if i >= count]:
        problems.append(f"the checkpoint has {_layers([i for i in present if i >= count])} beyond "
                        f"num_hidden_layers {count}")
    absent = [i for i in range(count) if i not in present]
    if absent:
        problems.append(f"num_hidden_layers is {count}, the checkpoint has no {_layers(absent)}")
    expected = _expected_shapes(keys)
    wrong: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    missing: dict[str, list[int]] = {}
    for template, (shape, _) in expected.items():
        for i in ([i for i in range(count) if i in present] if "{i}" in template else [-1]):
            name = template.replace("{i}", str(i))
            if name not in shapes:
                missing.setdefault(template, []).append(i)
            elif tuple(shapes[name]) != shape:
                wrong.setdefault((template, tuple(shapes[name])), []).append(i)
    for (template, found), layers in wrong.items():
        shape, why = expected[template]
        where = f"{template} ({_layers(layers)})" if "{i}" in template else template
        problems.append(f"{where}: {list(found)} in the checkpoint, config.json implies {list(shape)} ({why})")
    for template, layers in missing.items():
        why = " (tie_word_embeddings is false)" if template == "lm_head.weight" else ""
        where = f"{template} ({_layers(layers)})" if "{i}" in template else template
        problems.append(f"{where}: missing from the checkpoint{why}")
    return problems


def infer_hf_config(shapes: Mapping[str, tuple[int, ...]],
                    recorded: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A Qwen3 ``config.json`` for model parameters ``shapes`` (HF names), and notes saying what it rests on.

    Shapes give the sizes (vocabulary and hidden from ``embed_tokens``, the FFN from
    ``gate_proj``, head_dim from ``q_norm``, the head counts from ``q_proj`` / ``k_proj``,
    the layer count, tied embeddings from a missing ``lm_head``); ``rms_norm_eps``,
    ``rope_theta`` and ``max_position_embeddings`` come from ``recorded`` (a model config the
    checkpoint records, e.g. MindFormers' keys of those names), else :data:`HF_DEFAULTS`.

    Raises:
        ValueError: the parameters are not a whole Qwen3 model (the problems listed).

    Example::

        config, notes = infer_hf_config({n: t.shape for n, t in state.items()})
    """
    unknown = sorted(n for n in shapes if not is_hf_param(n))
    if unknown or not shapes:
        raise ValueError(f"its tensors are not Qwen3's HuggingFace names ({', '.join(unknown[:3]) or 'no tensors'}"
                         f"{', ...' if len(unknown) > 3 else ''})")
    try:
        vocab, hidden = shapes["model.embed_tokens.weight"]
        (head_dim,) = shapes["model.layers.0.self_attn.q_norm.weight"]
        ffn = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"the sizes cannot be read from its shapes ({exc!r} missing or malformed)") from None
    heads = hf_head_counts(shapes)
    if heads is None:
        raise ValueError("the head counts cannot be read from layer 0's q_norm, q_proj and k_proj")
    layers = max(i for name in shapes if (i := layer_of(name)) is not None) + 1
    keys = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=head_dim,
                tie_word_embeddings="lm_head.weight" not in shapes)
    notes = [f"config.json inferred from the tensor shapes: {', '.join(f'{k} {v}' for k, v in keys.items())}"]
    recorded = recorded or {}
    for key, default in HF_DEFAULTS.items():
        value = recorded.get(key)
        keys[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else default
        notes.append(f"{key} {keys[key]} from the checkpoint's recorded config" if keys[key] is value
                     else f"{key} {default}: transformers' Qwen3 default (shapes cannot tell it)")
    try:
        config = hf_config(keys)
    except ValueError as exc:
        raise ValueError(f"its shapes give no valid Qwen3 config: {exc}") from None
    problems = config_shape_problems(config, shapes)
    if problems:
        raise ValueError("its shapes do not fit one Qwen3 config: " + "; ".join(problems))
    return config, notes


# ------------------------------------------------------------------------------ reading MindFormers checkpoints
#
# Which of our parameters each stored MindFormers parameter holds. resumable.sources does what is the same for
# every MindSpore checkpoint (moments follow their parameter, scalars go to common.json, chunks are read lazily)
# and asks this section only about parameters.

FUSED_LAYOUT_KEYS: tuple[str, ...] = ("use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")


@dataclass(frozen=True)
class Part:
    """One of our parameters held by a stored MindFormers parameter: all of it (``rows`` None) or those rows."""

    param: str
    rows: list[int] | None = None


def _mf_layers(shapes: Mapping[str, tuple[int, ...]], suffix: str) -> dict[str, tuple[int, ...]]:
    """Parameters named ``decoder.layers.{i}.<suffix>``, with their shapes."""
    return {n: s for n, s in shapes.items() if n.startswith("decoder.layers.") and n.endswith("." + suffix)}


def _recorded_count(config: Mapping[str, Any], where: str, *keys: str) -> int | None:
    """The first of ``keys`` the recorded config sets (not null), checked to be a positive integer."""
    found = next(((k, config[k]) for k in keys if config.get(k) is not None), None)
    if found is None:
        return None
    if not isinstance(found[1], int) or isinstance(found[1], bool) or found[1] <= 0:
        raise CorruptCheckpointError(f"{where}: {found[0]} must be a positive integer, got {found[1]!r}")
    return found[1]


def _mf_heads(where: str, shapes: Mapping[str, tuple[int, ...]], given: AttentionShape | None,
              config: Mapping[str, Any] | None, config_path: str, notes: list[str]) -> AttentionShape:
    """The head counts that split ``linear_qkv``: given, else the recorded config's, else from the shapes;
    checked against every layer's qkv, proj and q/k norm shapes."""
    known = {} if config is None else {
        "num_heads": _recorded_count(config, config_path, "num_attention_heads"),
        "num_kv_heads": _recorded_count(config, config_path, "num_key_value_heads", "n_kv_heads"),
        "head_dim": _recorded_count(config, config_path, "head_dim", "kv_channels")}
    error: type[Exception] = CorruptCheckpointError
    if given is not None:
        heads, origin, error = given, "given (--heads)", ConfigError
    elif known and None not in known.values():
        try:
            heads = AttentionShape(**known)  # type: ignore[arg-type]  # no None among them
        except ValueError as e:
            raise CorruptCheckpointError(f"{config_path}: {e}") from None
        origin = f"from {config_path}"
    else:
        try:
            heads = infer_heads(shapes)
        except ValueError as e:
            raise CorruptCheckpointError(f"{where}: {e}") from None
        origin = "inferred from the shapes"
        wrong = [f"{k} {v} but the shapes give {getattr(heads, k)}" for k, v in known.items()
                 if v is not None and v != getattr(heads, k)]
        if wrong:
            raise CorruptCheckpointError(f"{where}: {config_path} says {'; '.join(wrong)}: "
                                         "fix the config or pass --heads H,KV,D")
    h, kv, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
    need = {"self_attention.linear_qkv.weight": (0, (h + 2 * kv) * d), "self_attention.linear_proj.weight": (1, h * d),
            "self_attention.q_layernorm.weight": (0, d), "self_attention.k_layernorm.weight": (0, d)}
    for suffix, (axis, size) in need.items():
        for name, shape in sorted(_mf_layers(shapes, suffix).items()):
            if len(shape) <= axis or shape[axis] != size:
                raise error(f"{where}: {name} has shape {list(shape)}, but {h} heads, {kv} KV heads of dim {d} "
                            f"({origin}) need {size} along dim {axis}: pass the right --heads H,KV,D")
    notes.append(f"heads: {h} attention heads, {kv} KV heads, head_dim {d} ({origin}; checked against the shapes)")
    if kv == 1:
        notes.append("fused layout: with 1 KV head the grouped and contiguous linear_qkv layouts are the same rows")
    return heads


def _layout_key(key: str, given: FusedLayout | Mapping[str, bool] | None, config: Mapping[str, Any] | None,
                config_path: str) -> tuple[bool, str]:
    """One fused-layout key's value and where it came from: given, recorded, or MindFormers' default."""
    if isinstance(given, FusedLayout):
        return getattr(given, key), "given"
    if given is not None and key in given:
        if not isinstance(given[key], bool):
            raise ConfigError(f"fused layout {key}: expected true or false, got {given[key]!r}")
        return given[key], "given"
    recorded = None if config is None else config.get(key)
    if recorded is not None:
        if not isinstance(recorded, bool):
            raise CorruptCheckpointError(f"{config_path}: {key} must be true or false, got {recorded!r}")
        return recorded, f"from {config_path}"
    return getattr(DEFAULT_LAYOUT, key), "MindFormers' default"


def _mf_layout(where: str, shapes: Mapping[str, tuple[int, ...]], given: FusedLayout | Mapping[str, bool] | None,
               config: Mapping[str, Any] | None, config_path: str, notes: list[str]) -> FusedLayout:
    """The fused layout, key by key (:func:`_layout_key`); linear_fc1's rows checked against linear_fc2."""
    unknown = [] if given is None or isinstance(given, FusedLayout) else sorted(set(given) - set(FUSED_LAYOUT_KEYS))
    if unknown:
        raise ConfigError(f"fused layout: unknown keys {unknown}; the keys are {', '.join(FUSED_LAYOUT_KEYS)}")
    (attn, attn_from), (mlp, mlp_from) = (_layout_key(k, given, config, config_path) for k in FUSED_LAYOUT_KEYS)
    ffn = None if config is None else _recorded_count(config, config_path, "intermediate_size", "ffn_hidden_size")
    fc2 = _mf_layers(shapes, "mlp.linear_fc2.weight")
    for name, shape in sorted(_mf_layers(shapes, "mlp.linear_fc1.weight").items()):
        width = fc2.get(name.replace("linear_fc1", "linear_fc2"), (0, shape[0] // 2))[1:2]
        if shape[0] % 2 or (ffn is not None and shape[0] != 2 * ffn) or width != (shape[0] // 2,):
            known = f", {config_path} gives intermediate_size {ffn}" if ffn is not None else ""
            raise CorruptCheckpointError(f"{where}: {name} has {shape[0]} rows; it fuses gate and up rows, so it "
                                         f"needs an even number, twice linear_fc2's columns{known}")
    notes.append(f"fused layout: linear_qkv {'[Q; K; V]' if attn else 'grouped per KV head'} "
                 f"(use_contiguous_weight_layout_attention={str(attn).lower()}, {attn_from}), linear_fc1 "
                 f"{'interleaved gate/up rows' if mlp else '[gate; up]'} "
                 f"(use_interleaved_weight_layout_mlp={str(mlp).lower()}, {mlp_from})")
    return FusedLayout(attn, mlp)


def mf_import_plan(shapes: Mapping[str, tuple[int, ...]], *, where: str, notes: list[str],
                   heads: AttentionShape | None = None, fused: FusedLayout | Mapping[str, bool] | None = None,
                   config: Mapping[str, Any] | None = None, config_path: str = "") -> dict[str, list[Part]]:
    """Our parameters held by each MindFormers Qwen3 parameter (``shapes``: parameter → shape, every name
    :func:`is_mf_param`).

    A renamed parameter holds one whole parameter; ``linear_qkv`` holds q/k/v_proj and
    ``linear_fc1`` gate/up_proj as row sets in the fused layout: per key of
    :data:`FUSED_LAYOUT_KEYS`, ``fused``'s value, else the recorded ``config``'s
    (a ``config.json`` found beside the checkpoint, at ``config_path``), else MindFormers'
    default. Head counts: ``heads``, else the recorded config's, else the shapes'; checked
    against every layer. What was decided and why is appended to ``notes``.

    Raises:
        ConfigError: ``heads`` or ``fused`` as given do not fit (or name unknown keys).
        CorruptCheckpointError: the shapes, or the recorded config, are inconsistent.

    Example::

        plan = mf_import_plan({"decoder.final_layernorm.weight": (16,)}, where="ckpt", notes=[])
        plan["decoder.final_layernorm.weight"]     # [Part("model.norm.weight")]
    """
    qkv = _mf_layers(shapes, "self_attention.linear_qkv.weight")
    fc1 = _mf_layers(shapes, "mlp.linear_fc1.weight")
    layout = _mf_layout(where, shapes, fused, config, config_path, notes) if qkv or fc1 else DEFAULT_LAYOUT
    attn = _mf_heads(where, shapes, heads, config, config_path, notes) if qkv else None
    plan: dict[str, list[Part]] = {}
    for param, shape in shapes.items():
        mapped = map_mf_name(param)
        if mapped.transform == "qkv":
            assert attn is not None, "a linear_qkv parameter sets the heads above"
            rows: tuple[list[int], ...] = qkv_rows(attn, layout)
        elif mapped.transform == "fc1":
            rows = fc1_rows(shape[0], layout)
        else:
            plan[param] = [Part(mapped.hf_names[0])]
            continue
        plan[param] = [Part(name, r) for name, r in zip(mapped.hf_names, rows)]
    return plan
