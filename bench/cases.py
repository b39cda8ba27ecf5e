"""What ``make bench`` measures: one :class:`Case` per row of the table (pure data).

Every case runs in fresh processes (``bench.worker``), ``world`` of them, once per
repetition. Save cases write a new folder each time; the last repetition of a save
case marked ``keep_as`` is kept as the source of the load cases that name it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One measurement.

    Attributes:
        name: the row label (unique).
        group: ``save``, ``async``, ``load`` (what the ratios compare against).
        op: the operation in :mod:`bench.ops`.
        world: processes (1, or 2 ranks of a gloo job).
        source: load cases: the kept checkpoint to read (``keep_as`` of a save case).
        cache: load cases: ``cold`` (page cache dropped first) or ``warm`` (files read first).
        replicated: every rank holds the whole state (data parallel) instead of Shard(0).
        keep_as: save cases: keep the last repetition's output under this source name.
        dcp: the DCP row this one is compared with (None: no ratio).
        dcp2: a second DCP row to compare with (sync: DCP with 2 writer threads; async: DCP's
            default fresh stager per call, where ``dcp`` is its best, a stager kept across saves).
        same_layout: reshard rows: the same-layout row of the same library to compare with.
    """

    name: str
    group: str
    op: str
    world: int
    source: str | None = None
    cache: str = ""
    replicated: bool = False
    keep_as: str | None = None
    dcp: str | None = None
    dcp2: str | None = None
    same_layout: str | None = None

    @property
    def saved_world(self) -> int:
        """World size of the job that wrote ``source`` (from its name ``lib-w<N>``)."""
        return int(self.source.rsplit("-w", 1)[1]) if self.source else self.world


def _saves() -> list[Case]:
    out = []
    for w in (1, 2):
        out += [
            Case(f"dcp save w{w}", "save", "dcp_save", w, keep_as=f"dcp-w{w}"),
            Case(f"dcp save 2 threads w{w}", "save", "dcp_save_t2", w),
            Case(f"resumable save w{w}", "save", "resumable_save", w, keep_as=f"resumable-w{w}",
                 dcp=f"dcp save w{w}", dcp2=f"dcp save 2 threads w{w}"),
            # DCP's default asynchronous setting on one process only (two full saves per run
            # and the slowest case; its ratio says the same on two).
            *([Case(f"dcp async_save default w{w}", "async", "dcp_async_save_default", w)] if w == 1 else []),
            Case(f"dcp async_save cached w{w}", "async", "dcp_async_save", w),
            Case(f"resumable async_save w{w}", "async", "resumable_async_save", w,
                 dcp=f"dcp async_save cached w{w}", dcp2=f"dcp async_save default w{w}" if w == 1 else None),
        ]
    out += [
        Case("safetensors save_file w1", "save", "safetensors_save", 1, keep_as="safetensors-w1",
             dcp="dcp save w1"),
        Case("torch.save w1", "save", "torch_save", 1, keep_as="torchsave-w1", dcp="dcp save w1"),
    ]
    return out


def _loads() -> list[Case]:
    out = []
    for w in (1, 2):
        for cache in ("cold", "warm"):
            out += [
                Case(f"dcp load {cache} w{w}", "load", "dcp_load", w, f"dcp-w{w}", cache),
                Case(f"resumable load {cache} w{w}", "load", "resumable_load", w, f"resumable-w{w}", cache,
                     dcp=f"dcp load {cache} w{w}"),
            ]
        # The same load with sizes checked only: the cost of the default per-block checksums.
        out.append(Case(f"resumable load cold w{w} sizes only", "load", "resumable_load_sizes", w,
                        f"resumable-w{w}", "cold", same_layout=f"resumable load cold w{w}"))
    for src, dst in ((2, 1), (1, 2)):
        out += [
            Case(f"dcp load reshard {src}->{dst}", "load", "dcp_load", dst, f"dcp-w{src}", "cold",
                 same_layout=f"dcp load cold w{dst}"),
            Case(f"resumable load reshard {src}->{dst}", "load", "resumable_load", dst, f"resumable-w{src}", "cold",
                 dcp=f"dcp load reshard {src}->{dst}", same_layout=f"resumable load cold w{dst}"),
        ]
    out += [
        Case("resumable load replicated 1->2", "load", "resumable_load", 2, "resumable-w1", "cold",
             replicated=True),
        Case("resumable balanced_load replicated 1->2", "load", "resumable_balanced_load", 2, "resumable-w1",
             "cold", replicated=True, same_layout="resumable load replicated 1->2"),
        Case("safetensors load_file cold w1", "load", "safetensors_load", 1, "safetensors-w1", "cold",
             dcp="dcp load cold w1"),
        Case("torch.load cold w1", "load", "torch_load", 1, "torchsave-w1", "cold", dcp="dcp load cold w1"),
    ]
    return out


CASES: list[Case] = _saves() + _loads()
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
#: source name → the save case that produces it.
PRODUCERS: dict[str, Case] = {c.keep_as: c for c in CASES if c.keep_as}
