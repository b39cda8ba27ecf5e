"""What the project knows about model architectures: one module per model.

A model module holds everything about one architecture that more than one part of the
project needs: its HuggingFace and MindFormers names and fused layouts, its parallel plan
(:mod:`resumable.models.qwen3`). The format readers know no model: they keep a
checkpoint's own names, and a model's mapping applies on top of them. :func:`identify`
tells which known model a checkpoint's tensors are.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Iterable

from resumable.formats.ms_names import parse_our_name
from resumable.models import qwen3

__all__ = ["MODELS", "Identified", "identify", "identify_mindformers"]

MODELS: dict[str, ModuleType] = {"qwen3": qwen3}
"""Known models by name. Each module has ``is_hf_param(param) -> bool``, ``is_mf_param(param) -> bool``
and ``mf_import_plan(shapes, ...)`` (which of our parameters each stored MindFormers parameter holds:
:func:`resumable.models.qwen3.mf_import_plan`)."""


@dataclass(frozen=True)
class Identified:
    """Which known model a set of tensor names is (``model`` None: none), and why.

    ``unknown`` lists, sorted, the parameters that keep it from being the closest known model.
    """

    model: str | None
    reason: str
    unknown: tuple[str, ...] = ()


def identify(names: Iterable[str]) -> Identified:
    """The known model whose HuggingFace names are every parameter of ``names``, else None.

    ``names`` are our tensor names: HuggingFace parameter names and optimizer states
    ``optimizer.state.<param>.<slot>`` (which count as their parameter).

    Example::

        identify(["model.norm.weight", "optimizer.state.model.norm.weight.exp_avg"]).model   # "qwen3"
        identify(["fc1.weight"]).reason
        # "1 of 1 parameters are no known model's HuggingFace names (fc1.weight)"
    """
    params = sorted({parse_our_name(n)[0] for n in names})
    if not params:
        return Identified(None, "no tensors")
    return _closest(params, "is_hf_param", "HuggingFace")


def identify_mindformers(params: Iterable[str]) -> Identified:
    """The known model whose MindFormers names are every one of ``params`` (parameter names, moments'
    prefixes stripped: :func:`resumable.formats.ms_names.parse_ms_name`), else None.

    Example::

        identify_mindformers(["decoder.final_layernorm.weight"]).model     # "qwen3"
    """
    return _closest(sorted(set(params)), "is_mf_param", "MindFormers")


def _closest(params: list[str], test: str, kind: str) -> Identified:
    """The first model whose ``test`` holds for every parameter; else None, naming the closest model's misses."""
    if not params:
        return Identified(None, "no parameters")
    misses = {name: [p for p in params if not getattr(module, test)(p)] for name, module in MODELS.items()}
    for name, unknown in misses.items():
        if not unknown:
            return Identified(name, f"all {len(params)} parameters are {kind} names of resumable.models.{name}")
    unknown = min(misses.values(), key=len)
    shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    return Identified(None, f"{len(unknown)} of {len(params)} parameters are no known model's {kind} "
                            f"names ({shown})", tuple(unknown))
