"""Save and load planning at thousands of ranks, simulated: resumable's real planners beside DCP's.

Run (``make bench-scale`` runs the README's table)::

    python -m bench.scale --world 8 64 512 1024 4096 8192 --model 8b --layout fsdp
    python -m bench.scale --world 8 1024 --model 70b --layout tp8_fsdp --no-dcp

Each (model, layout, W) runs in a fresh process (so ``peak_rss_mib`` is that case's) and
prints one JSON line; ``--out`` also writes them as a JSON list, ``--table`` prints the
markdown table of the README. Nothing is mocked but the network: every rank's holdings
come from :mod:`bench.scale_state`, and the functions timed are the ones
``resumable.save`` / ``resumable.load`` run on that rank (:mod:`resumable.saveplan`,
``save.bind_plan``, ``v2.Metadata`` serialisation and parsing, ``load.plan_chunk_reads``).
Bytes are what each rank's messages would be: ``8 + len(pickle)`` per point-to-point
message, the all-reduce's tensor, as :mod:`resumable.dist` sends them
(``tests/distributed/test_traffic.py`` checks the same counts on real gloo jobs).

Per W, for rank 0 (the coordinator) and rank 1 (any other rank):

* ``save_first_*_s``: a first save's planning (describe + digest; rank 0 also groups the
  W digests, merges the distinct specs and builds the metadata); ``save_repeat_*_s``:
  a repeated save of the same structure (digest, cache hit, this save's file metadata);
* ``*_sent`` / ``*_received``: bytes through ``torch.distributed`` for those saves;
* ``metadata_bytes`` / ``files_bytes``: ``metadata.json`` and ``files.json``;
  ``listed_bytes_per_chunk`` (W <= 1024): metadata.json per chunk were every chunk listed,
  as for an irregular layout;
  ``commit_serialise_s``: rank 0 writing both out as text (not planning: the commit);
* ``load_same_s`` / ``load_reshard_s`` / ``load_tp_change_s``: one loading rank's
  metadata parse + validation + read planning for its targets (same layout; W -> W/2;
  tp8 -> tp4).

Times are medians of 3 calls (1 where a call takes over a second).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import pickle
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.scale_state import LAYOUTS, MODELS, Holding, group_of, rank_holdings, reshard_target

PROBE = 1  # the non-coordinator rank measured


def _median(fn: Callable[[], Any], reps: int = 3) -> tuple[float, Any]:
    """Median seconds of ``fn`` with the cyclic GC paused, as ``save`` and ``load`` pause it."""
    from resumable.gc_pause import gc_paused

    times, out = [], None
    for _ in range(reps):
        gc.collect()
        with gc_paused():
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        if times[-1] > 1.0:
            break
    return statistics.median(times), out


def _msg(obj: Any) -> int:
    """Bytes of one point-to-point object message of resumable.dist: a length, then the pickle."""
    return 8 + len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _broadcast(obj: Any) -> int:
    """Bytes torch's broadcast_object_list moves to each receiver: a size, then the pickle."""
    return 8 + len(pickle.dumps(obj))


def spec_of(holdings: Sequence[Holding]) -> Any:
    """A rank's :class:`resumable.saveplan.RankSpec`, from its holdings (what ``describe`` reads off DTensors)."""
    from resumable.grid import Mesh, encode_placement
    from resumable.saveplan import RankSpec, TensorSpec

    meshes: dict[Mesh, int] = {}
    tensors = []
    for h in sorted(holdings, key=lambda h: h.name):
        mesh = meshes.setdefault(Mesh(h.mesh_shape, h.mesh_ranks), len(meshes))
        tensors.append(TensorSpec(h.name, h.kind, h.dtype, h.shape, mesh,
                                  tuple(encode_placement(p) for p in h.placements)))
    return RankSpec(tuple(tensors), tuple(meshes))


class _Views(dict):
    """Stands in for the live tensors: planning never reads them."""

    def __missing__(self, key: Any) -> Any:
        return key


def _groups(model: str, layout: str, world: int) -> tuple[list[str], list[tuple[Any, list[int]]]]:
    """Every rank's digest and the distinct specs with their ranks.

    Ranks of one scale_state group (everyone, or a pipeline stage) hold equal specs; one
    spec per group is built, and the first, second and last rank of each are checked to
    give the same digest (building W specs would cost the simulation W ranks' work).
    """
    by_group: dict[int, list[int]] = {}
    for r in range(world):
        by_group.setdefault(group_of(layout, world, r), []).append(r)
    digests = [""] * world
    groups = []
    for ranks in by_group.values():
        spec = spec_of(rank_holdings(model, layout, world, ranks[0]))
        for r in {ranks[0], ranks[min(1, len(ranks) - 1)], ranks[-1]}:
            assert spec_of(rank_holdings(model, layout, world, r)).digest == spec.digest
        for r in ranks:
            digests[r] = spec.digest
        groups.append((spec, ranks))
    return digests, groups


def _written(files: dict, sizes: int = 10**9) -> dict[str, tuple[int, str]]:
    return {name: (sizes, "0123456789abcdef") for name in files}


def measure_resumable(model: str, layout: str, world: int, remove_redundancy: bool = False) -> dict[str, Any]:
    """resumable's planning costs for ``model`` under ``layout`` on ``world`` simulated ranks."""
    from resumable import saveplan
    from resumable.formats import v2
    from resumable.load import plan_chunk_reads
    from resumable.save import PlanStructure, bind_plan

    out: dict[str, Any] = {"world": world, "model": model, "layout": layout, "remove_redundancy": remove_redundancy}
    layout_meta = v2.LayoutMeta(world_size=world, mesh=None, pipeline_stages=1, writers=world)
    options = dict(prefix="CKP", save_optimizer=True, remove_redundancy=remove_redundancy)
    holdings = rank_holdings(model, layout, world, PROBE)
    digests, groups = _groups(model, layout, world)

    def describe(rank_holdings_: Sequence[Holding]) -> Any:
        spec = spec_of(rank_holdings_)
        spec.digest  # noqa: B018 - computed on every save
        return spec

    # ---- rank 1, first save: describe, then (after the replies) its files and this save's plan
    def probe_first() -> Any:
        spec = describe(holdings)
        files = saveplan.rank_files(spec, PROBE, world, replies.get(PROBE), **options)
        structure = PlanStructure(spec.digest, 1, files, {t.name: list(t.shape) for t in spec.tensors}, None)
        return bind_plan(structure, _Views(), {}, None, Path("ckpt"), 1, None, PROBE, layout_meta, True)

    # ---- rank 0, first save: its own describe, group the digests, merge, its plan
    def coordinator_first() -> Any:
        own = describe(rank_holdings(model, layout, world, 0))
        ranks: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            ranks.setdefault(d, []).append(r)
        specs = {spec.digest: spec for spec, _ in groups}
        meta, per_rank = saveplan.merge([(specs[d], rs) for d, rs in ranks.items()], world=world, iteration=1,
                                        layout=layout_meta, **options)
        files = saveplan.rank_files(own, 0, world, per_rank.get(0), **options)
        structure = PlanStructure(own.digest, 1, files, {t.name: list(t.shape) for t in own.tensors}, meta)
        plan = bind_plan(structure, _Views(), {}, None, Path("ckpt"), 1, None, 0, layout_meta, True)
        return plan, structure, per_rank

    out["save_first_coordinator_s"], (plan0, structure0, replies) = _median(coordinator_first)
    out["save_first_other_s"], plan1 = _median(probe_first)
    structure1 = PlanStructure(digests[PROBE], 1, {n: (k, [(it.name, it.key, it.box) for it in items])
                                                   for n, (k, items) in plan1.files.items()},
                               {h.name: list(h.shape) for h in holdings}, None)

    def repeat(rank: int, structure: PlanStructure) -> Any:
        spec = describe(rank_holdings(model, layout, world, rank) if rank != PROBE else holdings)
        assert spec.digest == structure.digest  # the cache hit
        return bind_plan(structure, _Views(), {}, None, Path("ckpt"), 2, None, rank, layout_meta, True)

    out["save_repeat_coordinator_s"], _ = _median(lambda: repeat(0, structure0))
    out["save_repeat_other_s"], _ = _median(lambda: repeat(PROBE, structure1))

    # ---- bytes: the messages of plan_save, prepare_temp and finish_save (resumable.save)
    check = 4 * 8  # the digest/plan-id all-reduce, both ways
    agree = 8  # prepare_temp's failure count
    spec_sent = {spec.digest: _msg(spec) for spec, _ in groups}
    representatives = {rs[0] for _, rs in groups}
    finish1 = _msg((None, _written(plan1.files), None))
    out["save_first_other_sent"] = (check + agree + _msg(digests[PROBE])
                                    + (spec_sent[digests[PROBE]] if PROBE in representatives else _msg(None))
                                    + finish1)
    reply1 = (None, 2**61, replies.get(PROBE))
    out["save_first_other_received"] = check + agree + _msg(False) + _msg(reply1) + _broadcast(None)
    out["save_repeat_other_sent"] = check + agree + finish1
    out["save_repeat_other_received"] = check + agree + _broadcast(None)
    finishes = (world - 1) * finish1  # every rank's files have names and sizes of the same length
    specs_in = sum(spec_sent[digests[r]] if r in representatives else _msg(None) for r in range(1, world))
    out["save_first_coordinator_received"] = (check + agree + sum(_msg(d) for d in digests[1:]) + specs_in
                                              + finishes)
    out["save_first_coordinator_sent"] = (check + agree + (world - 1) * (_msg(True) + _broadcast(None))
                                          + sum(_msg((None, 2**61, replies.get(r))) for r in range(1, world)))
    out["save_repeat_coordinator_received"] = check + agree + finishes

    # ---- the commit's serialisation, and what a loading rank parses
    meta = plan0.metadata
    out["commit_serialise_s"], (text, table) = _median(lambda: (meta.to_json(), meta.files_json()))
    out["metadata_bytes"], out["files_bytes"] = len(text), len(table)
    out["metadata_chunks"] = sum(meta.chunk_count(n) for n in meta.tensors)
    def load(target_layout: str, target_world: int) -> int:
        parsed = v2.Metadata.from_json(text, "metadata.json", table.encode())
        reads = 0
        for h in rank_holdings(model, target_layout, target_world, PROBE):
            t = parsed.tensors[h.name]
            assert t.shape == list(h.shape) and t.dtype == h.dtype  # load.check_state, per target
            reads += len(plan_chunk_reads(parsed, h.name, saveplan._chunks(
                h.shape, tuple(_encode(h.placements)), h.mesh_shape, h.coordinate)))
        return reads

    out["load_same_s"], out["load_same_reads"] = _median(lambda: load(layout, world))
    for key, change in (("load_reshard", "half"), ("load_tp_change", "tp")):
        try:
            target = reshard_target(layout, world, change)  # type: ignore[arg-type]
        except ValueError:
            out[f"{key}_s"] = None
            continue
        out[f"{key}_s"], out[f"{key}_reads"] = _median(lambda: load(target.layout, target.world))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Measured last, after the peak memory: listing every chunk is what a grid avoids.
    if world <= 1024:  # an irregular layout lists every chunk: its bytes per chunk, same tensors
        listed = {n: v2.TensorMeta(t.dtype, t.shape, t.kind, [v2.ChunkMeta(list(b.offsets), list(b.shape), c)
                                                               for b, c in meta.stored(n)])
                  for n, t in meta.tensors.items()}
        as_listed = v2.Metadata(meta.iteration, meta.layout, meta.save_optimizer, listed, meta.files).to_json()
        chunks = sum(len(t.chunks) for t in listed.values())
        out["listed_bytes_per_chunk"] = round(len(as_listed) / chunks, 1)

    return out


def _encode(placements: Sequence[Any]) -> list[tuple]:
    from resumable.grid import encode_placement

    return [encode_placement(p) for p in placements]


def _in_fresh_process(fn: Callable[..., dict], *args: Any) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _sum(*values: Any) -> Any:
    return None if any(v is None for v in values) else sum(values)


def dcp_first_coordinator(d: dict) -> Any:
    """DCP rank 0's first save: its local plan, unpickling W plans, the global plan, pickling W replies."""
    return _sum(d.get("dcp_local_plan_s"), d.get("dcp_gather_unpickle_s"), d.get("dcp_global_plan_first_s"),
                d.get("dcp_scatter_pickle_s"))


def dcp_load(d: dict, key: str = "dcp_load_plan_same_s") -> Any:
    """A DCP loading rank: reading ``.metadata``, then its local load plan."""
    return _sum(d.get("dcp_load_metadata_parse_s"), d.get(key))


def table(rows: list[dict]) -> str:
    """The README's table: resumable beside DCP per (model, layout, W), per-rank planning costs.

    DCP's figures are what the same rank does in DCP: rank 0's first save is its own local
    plan, unpickling the W gathered plans, the global plan and pickling the W replies; a
    repeated save is the cached local-plan comparison (+ the cached global step on rank 0);
    a load is reading ``.metadata`` plus the local load plan.
    """
    def ms(v: Any) -> str:
        return "—" if v is None else f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}"

    def kb(v: Any) -> str:
        return "—" if v is None else f"{v / 1000:.1f}" if v < 10_000 else f"{v / 1000:.0f}"

    head = ("| model | layout | W | first save, rank 0 / other (ms) | DCP (ms) | repeated save, rank 0 / other (ms) | "
            "DCP (ms) | other rank receives, first / repeated (KB) | DCP, first (KB) | metadata.json (KB) | DCP .metadata (KB) | "
            "load, same / W/2 / TP change (ms) | DCP (ms) | peak RSS (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r.get("dcp") or {}
        local, first0, cached = d.get("dcp_local_plan_s"), dcp_first_coordinator(d), d.get("dcp_local_plan_cached_s")
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['world']} | {ms(r['save_first_coordinator_s'])} / "
            f"{ms(r['save_first_other_s'])} | {ms(first0)} / {ms(local)} | {ms(r['save_repeat_coordinator_s'])} / "
            f"{ms(r['save_repeat_other_s'])} | {ms(_sum(cached, d.get('dcp_global_plan_cached_s')))} / {ms(cached)} | "
            f"{kb(r['save_first_other_received'])} / {kb(r['save_repeat_other_received'])} | "
            f"{kb(d.get('dcp_global_plan_part_bytes'))} | "
            f"{kb(r['metadata_bytes'])} | {kb(d.get('dcp_metadata_bytes'))} | {ms(r['load_same_s'])} / "
            f"{ms(r['load_reshard_s'])} / {ms(r['load_tp_change_s'])} | "
            f"{ms(dcp_load(d))} / {ms(dcp_load(d, 'dcp_load_plan_reshard_s'))} / "
            f"{ms(dcp_load(d, 'dcp_load_plan_tp_change_s'))} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Log-log chart per (model, layout): save planning and load planning against W, beside DCP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["layout"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    series = (("save_first_coordinator_s", dcp_first_coordinator, "first save, coordinator"),
              ("load_same_s", dcp_load, "load (metadata + planning), one rank"))
    colors = plt.get_cmap("tab10")
    for ax, (ours, theirs, title) in zip(axes, series):
        for i, (model, layout) in enumerate(cases):
            mine = [r for r in rows if (r["model"], r["layout"]) == (model, layout)]
            ax.plot([r["world"] for r in mine], [r[ours] for r in mine], "o-", color=colors(i),
                    label=f"{model} {layout}: resumable")
            dcp = [(r["world"], theirs(r.get("dcp") or {})) for r in mine]
            dcp = [(w, v) for w, v in dcp if v is not None]
            if dcp:
                ax.plot(*zip(*dcp), "x--", color=colors(i), label=f"{model} {layout}: DCP")
        ax.set(xscale="log", yscale="log", xlabel="simulated ranks W", ylabel="seconds", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[8, 64, 512, 1024, 4096, 8192])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=["8b"])
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=["fsdp"])
    parser.add_argument("--no-dcp", action="store_true", help="resumable only")
    parser.add_argument("--dcp-max-seconds", type=float, default=60.0, help="skip DCP past this (and larger W)")
    parser.add_argument("--remove-redundancy", action="store_true")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    parser.add_argument("--table", action="store_true", help="print the markdown table at the end")
    parser.add_argument("--plot", type=Path, help="write the chart here (PNG)")
    args = parser.parse_args(argv)
    from bench.scale_dcp import measure_dcp

    rows = []
    for model in args.model:
        for layout in args.layout:
            dcp_skip = None
            for world in sorted(args.world):
                row = _in_fresh_process(measure_resumable, model, layout, world, args.remove_redundancy)
                if not args.no_dcp and dcp_skip is None:
                    row["dcp"] = _in_fresh_process(measure_dcp, model, layout, world, args.dcp_max_seconds)
                    dcp_skip = row["dcp"].get("skipped")
                elif not args.no_dcp:
                    row["dcp"] = {"skipped": f"a smaller W was skipped: {dcp_skip}"}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if args.table:
        print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
