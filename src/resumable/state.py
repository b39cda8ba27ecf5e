"""Flatten a nested training state into named tensors and a JSON tree of plain values.

Conventions (docs/internals.md):

- tensor leaves are named by their dotted path; the top-level key ``model`` is a
  namespace and is dropped, so model tensors keep their plain parameter names;
- tensors under the top-level key ``optimizer`` are optimizer state (``-opt-`` files);
- every other leaf must be JSON-able and goes to ``common.json``;
- the top-level key ``rank_local`` holds per-rank values (RNG), kept apart.

Example::

    flat = flatten_state({"model": {"w": w}, "optimizer": {"state": {"w": {"exp_avg": m}}}, "step": 3})
    sorted(flat.tensors)   # ['optimizer.state.w.exp_avg', 'w']
    flat.objects           # {'model': {}, 'optimizer': {'state': {'w': {}}}, 'step': 3}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

MODEL_NAMESPACE = "model"
OPTIMIZER_NAMESPACE = "optimizer"
RANK_LOCAL = "rank_local"

Path = tuple[Any, ...]
Kind = Literal["model", "opt"]


@dataclass(frozen=True)
class Leaf:
    """A tensor of the state: where it lives in the nested dict and which file kind holds it."""

    path: Path
    value: torch.Tensor
    kind: Kind


@dataclass
class FlatState:
    tensors: dict[str, Leaf] = field(default_factory=dict)
    objects: dict = field(default_factory=dict)
    rank_local: Any = None


def tensor_name(path: Path) -> str:
    """The stored name of the tensor at ``path``."""
    parts = [str(p) for p in path]
    if len(parts) > 1 and parts[0] == MODEL_NAMESPACE:
        parts = parts[1:]
    return ".".join(parts)


def _kind(path: Path) -> Kind:
    return "opt" if path and path[0] == OPTIMIZER_NAMESPACE else "model"


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(
        f"state value at {where!r} has type {type(value).__name__}; checkpoints store tensors "
        "and JSON-able values (None, bool, int, float, str, lists, dicts) only"
    )


def flatten_state(state: Mapping[str, Any]) -> FlatState:
    """Split ``state`` into named tensor leaves and a JSON tree of everything else.

    Raises:
        TypeError: a leaf is neither a tensor nor JSON-able.
        ValueError: two tensors would be stored under the same name.
    """
    flat = FlatState()

    def walk(node: Any, path: Path) -> Any:
        if isinstance(node, torch.Tensor):
            name = tensor_name(path)
            if name in flat.tensors:
                raise ValueError(
                    f"state paths {flat.tensors[name].path} and {path} are both stored as {name!r}; rename one"
                )
            flat.tensors[name] = Leaf(path, node, _kind(path))
            return _SKIP
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"state key {k!r} at {tensor_name(path)!r} must be a str or int")
                kept = walk(v, path + (k,))
                if kept is not _SKIP:
                    out[str(k)] = kept
            return out
        if isinstance(node, (list, tuple)):
            return [None if (kept := walk(v, path + (i,))) is _SKIP else kept for i, v in enumerate(node)]
        return _plain(node, tensor_name(path))

    for key, value in state.items():
        if key == RANK_LOCAL:
            flat.rank_local = _plain(value, RANK_LOCAL)
            continue
        kept = walk(value, (key,))
        if kept is not _SKIP:
            flat.objects[str(key)] = kept
    return flat


class _Skip:
    """Marks a tensor leaf removed from the JSON tree."""


_SKIP = _Skip()


def merge_objects(target: dict, saved: Mapping[str, Any]) -> None:
    """Fill the non-tensor leaves of ``target`` from a saved JSON tree, in place.

    Saved keys missing from ``target`` are added; tensors in ``target`` are left
    alone (the loader fills them); a saved value never replaces a sub-tree that
    holds tensors.
    """
    for key, value in saved.items():
        here = _find_key(target, key)
        if here is None:
            target[key] = value
            continue
        current = target[here]
        if isinstance(current, torch.Tensor):
            continue
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merge_objects(current, value)  # type: ignore[arg-type]
        elif isinstance(current, list) and isinstance(value, list) and _holds_tensors(current):
            for i, (c, v) in enumerate(zip(current, value)):
                if isinstance(c, Mapping) and isinstance(v, Mapping):
                    merge_objects(c, v)  # type: ignore[arg-type]
                elif not isinstance(c, torch.Tensor) and not _holds_tensors(c):
                    current[i] = v
        elif not _holds_tensors(current):
            target[here] = value


def _find_key(target: Mapping, key: str) -> Any:
    """The key of ``target`` whose string form is ``key`` (int keys were stored as text)."""
    if key in target:
        return key
    for k in target:
        if str(k) == key:
            return k
    return None


def _holds_tensors(node: Any) -> bool:
    if isinstance(node, torch.Tensor):
        return True
    if isinstance(node, Mapping):
        return any(_holds_tensors(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_tensors(v) for v in node)
    return False
