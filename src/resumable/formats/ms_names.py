"""MindSpore parameter names that mean the same in every model: optimizer moments and scalars.

A MindSpore checkpoint stores a network's parameters under their own names, the
optimizer's moments under a prefix of the parameter's name, and a few training
scalars beside them. None of this depends on the model, so readers apply it to every
checkpoint; a model's own renaming (:mod:`resumable.models`) applies on top, to
parameter names only.

==========================================  ==============================================
MindSpore name                              ours
==========================================  ==============================================
``<p>`` (any other name)                    ``<p>``
``adam_m.<p>`` / ``moment1.<p>``            ``optimizer.state.<p>.exp_avg``
``adam_v.<p>`` / ``moment2.<p>``            ``optimizer.state.<p>.exp_avg_sq``
:data:`SCALARS` (``global_step``, ...)      no tensor: their values go to ``common.json``
==========================================  ==============================================

``adam_m.``/``adam_v.`` are AdamWeightDecay's (MindFormers' default), ``moment1.``/
``moment2.`` Adam's; exports use AdamWeightDecay's.

Example::

    parse_ms_name("adam_v.fc1.weight")       # MsName(kind="moment", param="fc1.weight", slot="exp_avg_sq")
    our_name(parse_ms_name("adam_v.fc1.weight"))   # "optimizer.state.fc1.weight.exp_avg_sq"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["NAMES", "OPT_STATE", "SCALARS", "MsName", "Names", "ms_export_name", "our_name", "parse_ms_name",
           "parse_our_name"]

OPT_STATE = "optimizer.state."

Names = Literal["auto", "keep", "hf"]
NAMES: tuple[str, ...] = ("auto", "keep", "hf")
"""How a MindSpore checkpoint's names are read (:func:`resumable.sources.open_source`'s ``names``; here, free
of torch, for ``resumable --help``)."""

OPTIMIZER_PREFIXES: dict[str, str] = {
    "adam_m.": "exp_avg",
    "adam_v.": "exp_avg_sq",
    "moment1.": "exp_avg",
    "moment2.": "exp_avg_sq",
}
_EXPORT_PREFIXES = {"exp_avg": "adam_m.", "exp_avg_sq": "adam_v."}

SCALARS: dict[str, str] = {
    "global_step": "the training context's global step",
    "epoch_num": "the training context (epochs done)",
    "step_num": "the training context (steps done)",
    "loss_scale": "the training context (loss scale)",
    "global_batch_size": "the training context (samples per step)",
    "learning_rate": "derived from the global step by the LR schedule",
    "beta1_power": "equals beta1 ** step; AdamW's per-parameter step is set from the global step",
    "beta2_power": "equals beta2 ** step; AdamW's per-parameter step is set from the global step",
    "current_iterator_step": "the dataset sink's step counter",
    "last_overflow_iterator_step": "the loss-scale manager's last overflow step",
    "scale_sense": "the loss-scale manager's current loss scale",
}
"""MindSpore training scalars: no tensor of our state, recorded in ``common.json["mindspore"]``."""


@dataclass(frozen=True)
class MsName:
    """A MindSpore tensor name taken apart: ``param`` is the parameter (or the scalar's name)."""

    kind: Literal["param", "moment", "scalar"]
    param: str
    slot: str | None = None


def parse_ms_name(name: str) -> MsName:
    """What a MindSpore tensor name is: a parameter, an optimizer moment of one, or a scalar."""
    if name in SCALARS:
        return MsName("scalar", name)
    for prefix, slot in OPTIMIZER_PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return MsName("moment", name[len(prefix):], slot)
    return MsName("param", name)


def our_name(parsed: MsName) -> str:
    """Our tensor name for a parameter or a moment (``optimizer.state.<p>.<slot>``)."""
    if parsed.kind == "scalar":
        raise ValueError(f"{parsed.param!r} is a MindSpore scalar: it has no tensor in our state")
    return parsed.param if parsed.slot is None else f"{OPT_STATE}{parsed.param}.{parsed.slot}"


def parse_our_name(name: str) -> tuple[str, str | None]:
    """``optimizer.state.<p>.<slot>`` → ``(p, slot)``; any other name → ``(name, None)``."""
    if name.startswith(OPT_STATE):
        param, _, slot = name[len(OPT_STATE):].rpartition(".")
        if param:
            return param, slot
    return name, None


def ms_export_name(param: str, slot: str | None) -> str:
    """The MindSpore name of a parameter or of its ``exp_avg`` / ``exp_avg_sq`` (AdamWeightDecay's prefixes).

    Raises:
        ValueError: a slot MindSpore has no prefix for (``step``).
    """
    if slot is None:
        return param
    if slot not in _EXPORT_PREFIXES:
        raise ValueError(f"optimizer slot {slot!r} of {param!r} has no MindSpore name "
                         f"(only {', '.join(_EXPORT_PREFIXES)} do)")
    return _EXPORT_PREFIXES[slot] + param
