"""Retention policies: which committed iterations to keep. Pure functions, no I/O.

Each policy maps the committed iterations to the set it keeps; an iteration is kept when ANY
configured policy keeps it, or when it is protected. Everything else is deleted (by
:func:`resumable.commit.apply_retention`, oldest first). The legacy layout decides each rank
folder's files with the same :func:`decide` (:func:`resumable.legacy.save.decide_folder`: the
files numbered in retention order, their global steps given by ``steps=``).

Policies (their name in :func:`decide`'s answer / the YAML key under ``callbacks.0`` / the
:class:`~resumable.manager.CheckpointManager` argument):

- ``newest``: the newest N (``keep_checkpoint_max`` / ``keep_checkpoint_max=``; None keeps all);
- ``every_n_steps``: every iteration divisible by K, forever (``keep_checkpoint_every_n_steps``
  / ``keep_every_n_steps=``);
- ``best``: the N best by a metric recorded with each checkpoint (``keep_best_checkpoint_max``,
  ``best_checkpoint_metric``, ``best_checkpoint_mode`` / ``keep_best=KeepBest(n, metric, mode)``);
  ties go to the newer iteration; NaN ranks last in either mode.

Protections (kept whatever the policies say): ``tracker`` (the tracker's target), ``newer``
(above the tracker: a job that resumed from an older one must not delete what came after),
``protected`` (the iteration resumed from, the one just written) and ``metric_unreadable``
(``best`` is configured but the iteration's metric could not be read: its common.json is
missing or damaged, so deleting it would be a guess). An iteration whose common.json is
intact but records no such metric (saved without ``metrics=``) is not ranked by ``best``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from resumable.errors import ConfigError

#: Every reason :func:`decide` gives, in the order it lists them.
REASONS = ("newest", "every_n_steps", "best", "tracker", "newer", "protected", "metric_unreadable")


class Missing(enum.Enum):
    """Why an iteration has no metric value."""

    NOT_RECORDED = "not recorded"  # common.json intact, the metric absent: not ranked
    UNREADABLE = "unreadable"      # common.json missing or damaged: kept (never deleted on a guess)


Metric = float | Missing


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``count`` best iterations by ``metric`` (``min``: lower is better, ``max``: higher)."""

    count: int
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"keep_best count must be an integer of at least 1, got {self.count!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"keep_best metric must be a metric name such as 'loss', got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"keep_best mode must be 'min' (lower is better) or 'max', got {self.mode!r}")


@dataclass(frozen=True)
class Policy:
    """The configured policies together; None switches one off (``keep_max=None``: keep all)."""

    keep_max: int | None = 5
    every_n_steps: int | None = None
    best: KeepBest | None = None

    def __post_init__(self) -> None:
        if self.keep_max is not None and self.keep_max < 1:
            raise ConfigError(f"keep_checkpoint_max must be at least 1 (the newest checkpoint is always kept), "
                              f"got {self.keep_max}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"keep_every_n_steps must be at least 1, got {self.every_n_steps}")
        if self.best is not None and not isinstance(self.best, KeepBest):
            raise ConfigError(f"keep_best must be a resumable.retention.KeepBest, got {self.best!r}")

    @property
    def deletes(self) -> bool:
        """False when the policies keep everything (``keep_max=None``): nothing to read or decide."""
        return self.keep_max is not None


def keep_newest(iterations: Sequence[int], count: int | None) -> set[int]:
    """The newest ``count`` (at least 1) of ``iterations``; all of them when None."""
    ordered = sorted(iterations)
    return set(ordered if count is None else ordered[-count:])


def keep_every_n_steps(iterations: Iterable[int], k: int | None, steps: Mapping[int, int] | None = None) -> set[int]:
    """The iterations whose step is divisible by ``k`` (none when None).

    ``steps``: iteration → its global step, when the iterations are not steps themselves (legacy
    files, numbered in retention order); one absent from it has no known step and is not kept.
    """
    if k is None:
        return set()
    step = (lambda n: n) if steps is None else steps.get
    return {n for n in iterations if (s := step(n)) is not None and s % k == 0}


def keep_best(metrics: Mapping[int, Metric], best: KeepBest | None) -> tuple[set[int], set[int]]:
    """The ``best.count`` best ranked iterations, and those whose metric is unreadable (both empty when None)."""
    if best is None:
        return set(), set()
    ranked = [(v, n) for n, v in metrics.items() if not isinstance(v, Missing)]
    sign = 1 if best.mode == "min" else -1
    ranked.sort(key=lambda vn: (math.isnan(vn[0]), sign * vn[0] if not math.isnan(vn[0]) else 0.0, -vn[1]))
    unreadable = {n for n, v in metrics.items() if v is Missing.UNREADABLE}
    return {n for _, n in ranked[:best.count]}, unreadable


def decide(metrics: Mapping[int, Metric], policy: Policy, *, tracker: int | None = None,
           protected: Iterable[int] = (), steps: Mapping[int, int] | None = None) -> dict[int, tuple[str, ...]]:
    """Which committed iterations to keep, and why.

    Args:
        metrics: every committed iteration (the keys) → its metric for ``policy.best`` (any
            value when ``best`` is None).
        policy: the configured policies.
        tracker: the tracker's target (None: no tracker).
        protected: iterations never deleted.
        steps: iteration → global step for ``every_n_steps``, when the keys of ``metrics`` are
            not steps but positions, oldest first (a legacy rank folder's files,
            :func:`resumable.legacy.save.decide_folder`); None: the keys are the steps.

    Returns:
        Each kept iteration → its reasons (names of :data:`REASONS`, in that order); the
        committed iterations absent from it are the ones to delete.
    """
    iterations = sorted(metrics)
    protected = set(protected)
    best, unreadable = keep_best(metrics, policy.best)
    by_reason = {
        "newest": keep_newest(iterations, policy.keep_max),
        "every_n_steps": keep_every_n_steps(iterations, policy.every_n_steps, steps),
        "best": best,
        "tracker": {tracker} if tracker is not None else set(),
        "newer": {n for n in iterations if tracker is not None and n > tracker},
        "protected": protected,
        "metric_unreadable": unreadable,
    }
    return {n: why for n in iterations if (why := tuple(r for r in REASONS if n in by_reason[r]))}


def describe(policy: Policy) -> str:
    """The configured policies as their keys, for the log."""
    parts = [f"keep_checkpoint_max={policy.keep_max}"]
    if policy.every_n_steps is not None:
        parts.append(f"keep_every_n_steps={policy.every_n_steps}")
    if policy.best is not None:
        parts.append(f"keep_best={policy.best.count} by {policy.best.mode} {policy.best.metric}")
    return ", ".join(parts)


def check_metrics(metrics: Mapping[str, float] | None, policy: Policy) -> dict[str, float] | None:
    """``metrics`` as floats, refusing what is no number and, with ``keep_best``, a missing metric."""
    if metrics is None and policy.best is None:
        return None
    checked: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_scalar_tensor(value):
            raise ConfigError(f"save(..., metrics=): {name!r} is {value!r}; metrics are numbers "
                              "(e.g. metrics={'loss': 2.31})")
        checked[str(name)] = float(value)
    if policy.best is not None and policy.best.metric not in checked:
        raise ConfigError(f"keep_best ranks checkpoints by {policy.best.metric!r}, but save(..., metrics=) "
                          f"gives {sorted(checked) or 'none'}: pass metrics={{{policy.best.metric!r}: value}}")
    return checked


def _is_scalar_tensor(value: Any) -> bool:
    return hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1
