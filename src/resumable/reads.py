"""Executing a rank's planned reads: bytes from safetensors files into target tensors.

:func:`read_direct` is the fast path of every load: a stored slice that is one byte run
of its file goes straight into the memory of a contiguous CPU target (``os.preadv`` on a
local disk, a ranged GET's body read into it from an object store: no mapping, no
intermediate tensor), the work cut into a few sequential streams. What it cannot do that
way (strided slices, targets off the CPU) goes through :func:`execute_reads` (the rows of
the stored chunk the slice spans, then sliced) and a :data:`Sink`. Every byte is read
through a :class:`resumable.storage.Reader`.

Every byte read is checked against the block checksums its file records
(:class:`resumable.formats.safetensors_io.BlockDigests`), from the memory it landed in,
in the thread that read it; a block cut by the edge of a read is completed with the few
bytes missing. Files without block checksums (written before format version 3, or by
another tool) are read with their sizes and headers checked only, logged once per call.

Not collective; reads files only. What to read comes from :mod:`resumable.planning`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

from resumable import storage
from resumable.errors import CorruptCheckpointError
from resumable.formats import v2
from resumable.formats.safetensors_io import (
    BlockDigests,
    Header,
    TensorEntry,
    block_digests,
    dtype_name,
    read_header,
    read_region,
)
from resumable.storage import AnyPath, Reader
from resumable.layout import local_tensor
from resumable.planning import Read

log = logging.getLogger(__name__)

__all__ = ["READ_PIECE", "READ_THREADS", "SMALL_GAP", "SMALL_READ", "SMALL_THREADS", "ReadJob", "Sink",
           "bytes_of",
           "byte_extent", "contiguous_run", "contiguous_shares", "execute_reads", "piece_bounds", "place_into",
           "plan_small_reads", "read_direct"]

Sink = Callable[[Read, torch.Tensor], None]


def execute_reads(folder: AnyPath, reads: Iterable[Read], sink: Sink, *, verify: bool = True,
                  unchecked: set[str] | None = None) -> int:
    """Read every planned slice, file by file (each file opened once), handing each to ``sink``.

    With ``verify`` every block the slice's rows span is checked before the slice is handed
    on (a strided slice, a column split, spans most of its stored chunk's rows).

    Args:
        unchecked: collects the files that carry no block checksums (else logged here).

    Returns:
        The bytes handed on.

    Raises:
        CorruptCheckpointError: a block fails its checksum (file, key and byte range named).
    """
    by_file: dict[str, list[Read]] = defaultdict(list)
    for r in reads:
        by_file[r.file].append(r)
    total = 0
    missing: set[str] = set() if unchecked is None else unchecked
    for file in sorted(by_file):
        path = folder / file
        header = read_header(path)
        digests = _digests(header, missing) if verify else None
        with storage.open_reader(path) as reader:
            for r in by_file[file]:
                entry = _entry(header, r.key)
                data = read_region(reader, entry, r.src, digests[r.key] if digests is not None else None)
                total += data.numel() * data.element_size()
                sink(r, data)
                del data  # one slice in memory at a time
    if unchecked is None:
        _log_unchecked(missing)
    return total


def _entry(header: Header, key: str) -> TensorEntry:
    entry = header.tensors.get(key)
    if entry is None:
        raise CorruptCheckpointError(f"{header.path}: key {key!r} is not in the file; restore the file or "
                                     "rebuild metadata.json from the files")
    return entry


def byte_extent(src: tuple[slice, ...], shape: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of a C-ordered stored chunk of ``shape`` that ``stored[src]`` spans
    (from its first element to its last); ``(0, 0)`` when the slice is empty. Pure.

    Example:
        >>> byte_extent((slice(1, 2), slice(2, 4)), (3, 5), 4)
        (28, 36)
    """
    if any(sl.stop <= sl.start for sl in src):
        return 0, 0
    first = last = 0
    stride = 1
    for sl, n in zip(reversed(src), reversed(shape)):
        first += sl.start * stride
        last += (sl.stop - 1) * stride
        stride *= n
    return first * itemsize, (last + 1) * itemsize


def piece_bounds(offset: int, nbytes: int, base: int, piece: int) -> list[tuple[int, int]]:
    """``[offset, offset + nbytes)`` cut into ``(start, length)`` pieces at the multiples of
    ``piece`` counted from ``base`` (an entry's start): interior cuts then fall on block
    boundaries, so that each checksum block but the two at the edges lies in one piece. Pure.

    Example:
        >>> piece_bounds(110, 30, 100, 16)
        [(110, 6), (116, 16), (132, 8)]
    """
    out = []
    at, end = offset, offset + nbytes
    while at < end:
        stop = min(end, base + ((at - base) // piece + 1) * piece)
        out.append((at, stop - at))
        at = stop
    return out


def check_slice(path: AnyPath, key: str, src: tuple[slice, ...], shape: tuple[int, ...], itemsize: int) -> bool:
    """Verify the blocks of ``key`` that ``stored[src]`` spans (read from the file: for readers that
    read the slice another way). False when the file records no block checksums (logged once per folder).

    Raises:
        CorruptCheckpointError: a block fails its checksum (file, key and byte range named).
    """
    digests = block_digests(read_header(path))
    if digests is None:
        if path.parent not in _LOGGED:
            _LOGGED.add(path.parent)
            _log_unchecked({str(path)})
        return False
    check = digests[key]
    lo, hi = byte_extent(src, shape, itemsize)
    with storage.open_reader(path) as f:
        check.check(check.start + lo, check.start + hi, None, f.read)
    return True


_LOGGED: set[AnyPath] = set()  # folders whose files without block checksums were logged (check_slice)


def _digests(header: Header, unchecked: set[str]) -> dict[str, BlockDigests] | None:
    """The file's block checksums; a file without them is added to ``unchecked``."""
    digests = block_digests(header)
    if digests is None:
        unchecked.add(str(header.path))
    return digests


def _log_unchecked(unchecked: set[str]) -> None:
    if unchecked:
        names = sorted(unchecked)
        log.info("%d file(s) carry no block checksums (written before format version 3 or by another tool): "
                 "only their sizes and headers were checked (%s%s)", len(names), ", ".join(names[:3]),
                 ", ..." if len(names) > 3 else "")


#: Sequential streams reading one rank's slices, one thread each (``os.preadv`` releases
#: the GIL). Each stream reads one contiguous stretch of the files in file order, so the
#: kernel's readahead keeps every stream ahead of its reader and the device sees several
#: deep sequential streams; cutting the same work round-robin into pieces over the
#: threads measured 5-10% slower here. Syscalls are cut at ``READ_PIECE`` bytes. Each
#: stream opens the files itself, advised ``POSIX_FADV_SEQUENTIAL``: the kernel keeps
#: readahead state per open file, and streams sharing one descriptor look random to it
#: (two processes' loads of the bench state: median 1.05 s shared, 0.77 s own, 7 runs each).
READ_THREADS = 4
READ_PIECE = 8 << 20
#: Reads smaller than this (0-d ``step`` counters, norm weights and their moments) stay
#: in a stream only where they touch its bytes (within ``SMALL_GAP``: the stream's
#: readahead has them). Elsewhere (replicated tensors stored once, in another rank's file)
#: each was a synchronous device round trip inside a stream, and one rank's 64 of them
#: measured 0.15-0.25 s of a 0.6 s load; those go first, to ``SMALL_THREADS`` threads of
#: their own, in parallel, neighbours within ``SMALL_GAP`` merged into one read of at
#: most ``SMALL_READ`` bytes (a norm's ``exp_avg``, ``exp_avg_sq`` and ``step`` are
#: stored side by side).
SMALL_READ = 1 << 20
SMALL_GAP = 64 << 10
SMALL_THREADS = 16
#: Threads checking the pieces the streams read, while the streams read on (python-xxhash
#: holds the GIL, but the streams' ``preadv`` calls release it: the device never waits on a
#: hash). Cold loads of the bench state, 10 alternating runs each: 0.68 s with the checks,
#: 0.72 s sizes only (1 process); 0.69 / 0.68 s (2 processes).
HASH_THREADS = 2


def contiguous_shares(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut jobs of ``sizes`` bytes, kept in order, into ``parts`` consecutive runs whose byte
    totals are as close to equal as whole jobs allow (some runs may be empty). Pure.

    Example:
        >>> contiguous_shares([1, 1, 10], 2)
        [range(0, 2), range(2, 3)]
    """
    cum = list(itertools.accumulate(sizes, initial=0))
    cuts = [0]
    for k in range(1, parts):
        goal = cum[-1] * k / parts
        j = bisect.bisect_left(cum, goal)  # the first cut at or past the goal ...
        if j > 0 and (j == len(cum) or goal - cum[j - 1] < cum[j] - goal):
            j -= 1  # ... or the one before it, whichever is nearer
        cuts.append(max(j, cuts[-1]))
    cuts.append(len(sizes))
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


class ReadJob(NamedTuple):
    """``nbytes`` at ``offset`` of file number ``file``, to place into ``dst`` (the target's
    memory, or a non-contiguous target slice, read via a temporary): one ``os.preadv`` of a
    stream, or part of a small group's read. ``check``: the block checksums of its entry,
    verified on the bytes once they landed (None: not verified)."""

    file: int
    offset: int
    nbytes: int
    dst: memoryview | torch.Tensor
    check: BlockDigests | None = None


def plan_small_reads(jobs: Sequence[ReadJob], small: int = SMALL_READ,
                     gap: int = SMALL_GAP) -> tuple[list[ReadJob], list[list[ReadJob]]]:
    """Split one rank's jobs into the streamed ones and groups of small ones read together. Pure.

    Consecutive small jobs (under ``small`` bytes, in file order, each within ``gap``
    bytes of the previous one) form a run. A run within ``gap`` of a big job of the same
    file is streamed with it (its bytes are in that stream's readahead); any other run is
    cut into groups spanning at most ``small`` bytes, each group one read.

    Returns:
        (streamed jobs in file order, small groups).
    """
    order = sorted(jobs, key=lambda j: (j.file, j.offset))
    streamed: list[ReadJob] = []
    groups: list[list[ReadJob]] = []

    def near(a: ReadJob, b: ReadJob) -> bool:  # b starts within ``gap`` after a ends, in the same file
        return a.file == b.file and 0 <= b.offset - (a.offset + a.nbytes) <= gap

    i = 0
    while i < len(order):
        if order[i].nbytes >= small:
            streamed.append(order[i])
            i += 1
            continue
        j = i + 1
        while j < len(order) and order[j].nbytes < small and near(order[j - 1], order[j]):
            j += 1
        run = order[i:j]
        if (i > 0 and near(order[i - 1], run[0])) or (j < len(order) and near(run[-1], order[j])):
            streamed.extend(run)  # only big jobs neighbour a run, so this one touches a stream
        else:
            group: list[ReadJob] = []
            for job in run:
                if group and job.offset + job.nbytes - group[0].offset > small:
                    groups.append(group)
                    group = []
                group.append(job)
            groups.append(group)
        i = j
    return streamed, groups


def contiguous_run(src: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(first element, element count)`` when ``stored[src]`` is one run of the C-ordered
    stored chunk of ``shape`` (leading dims of length 1, then one partial dim, then full
    dims), else None. Pure.

    Example:
        >>> contiguous_run((slice(2, 4), slice(0, 8)), (10, 8))
        (16, 16)
    """
    lengths = [sl.stop - sl.start for sl in src]
    p = next((d for d, n in enumerate(lengths) if n != 1), len(lengths))
    if any(lengths[d] != shape[d] for d in range(p + 1, len(shape))):
        return None
    first, stride = 0, 1
    for sl, n in zip(reversed(src), reversed(shape)):
        first += sl.start * stride
        stride *= n
    count = 1
    for n in lengths:
        count *= n
    return first, count


def bytes_of(t: torch.Tensor) -> memoryview:
    """The writable bytes of contiguous CPU tensor ``t`` (its own memory, not a copy)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def check_headers(folder: AnyPath, meta: v2.Metadata, reads: Iterable[Read]) -> dict[str, Header]:
    """Check, from the file headers alone, that each stored key has the recorded dtype and shape.

    A safetensors slice outside the stored shape is silently clamped by the library, and
    a dtype differing from metadata.json would reinterpret bytes: both are refused here.

    Returns:
        File name → its parsed header (for :func:`resumable.reads.read_direct`).

    Raises:
        CorruptCheckpointError: naming the file and key.
    """
    wanted: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = defaultdict(dict)
    for r in reads:
        wanted[r.file][r.key] = (meta.tensors[r.name].dtype, r.stored_box.shape)
    headers: dict[str, Header] = {}
    for file, keys in sorted(wanted.items()):
        path = v2.member(folder, file)
        header = headers[file] = read_header(path)
        for key, (dtype, shape) in sorted(keys.items()):
            entry = header.tensors.get(key)
            if entry is None:
                raise CorruptCheckpointError(
                    f"{path}: key {key!r} listed in metadata.json is not in the file; restore the "
                    "file or rebuild metadata.json from the files")
            expected = dtype_name(getattr(torch, dtype))
            if entry.dtype != expected or entry.shape != shape:
                raise CorruptCheckpointError(
                    f"{path}: key {key!r} is {entry.dtype} of shape {list(entry.shape)} in the file but "
                    f"metadata.json records {expected} of shape {list(shape)}; the file and the "
                    "metadata disagree: restore the file or rebuild metadata.json")
    return headers


def read_direct(folder: AnyPath, reads: Iterable[Read], targets: Mapping[str, torch.Tensor],
                headers: Mapping[str, Header] | None = None, *, verify: bool = True) -> int:
    """Fill the targets for ``reads`` straight from the files into their memory; not collective.

    A read whose stored slice is one byte run of the file and whose destination is a
    contiguous piece of a CPU local tensor is read into that piece directly (no mapping,
    no intermediate tensor, no copy); in file order, these reads are cut into
    ``READ_THREADS`` (an object store: the backend's ``read_threads``) consecutive shares of near-equal bytes, each read by its own thread
    front to back in ``READ_PIECE`` calls; reads under ``SMALL_READ`` bytes that touch no
    streamed bytes are issued first, side by side, by threads of their own, neighbours
    merged (:func:`plan_small_reads`). A run whose destination is not
    contiguous is read into a temporary tensor of that slice and copied; any other read
    (strided stored slice, a target off the CPU) goes through
    :func:`execute_reads`.
    Peak memory is the target state plus at most one temporary slice (or small group's
    span) per thread.
    ``headers`` (file name → parsed header, as :func:`check_headers`
    returns them) spares reading them again; a file missing there has its header read.
    ``verify``: check every byte read against its file's block checksums, in the thread
    that read it (pieces are cut on block boundaries; a block cut by the edge of a read is
    completed with the bytes missing).

    Returns:
        The bytes read.

    Raises:
        CorruptCheckpointError: a block fails its checksum, or a file ends early (named).
    """
    locals_ = {name: local_tensor(t) for name, t in targets.items()}
    direct: dict[str, list[Read]] = defaultdict(list)
    other: list[Read] = []
    for r in reads:
        if sys.byteorder == "little" and locals_[r.name].device.type == "cpu":
            direct[r.file].append(r)
        else:
            other.append(r)
    paths: list[AnyPath] = []
    jobs: list[ReadJob] = []
    total = 0
    unchecked: set[str] = set()
    for file in sorted(direct):
        path = folder / file
        header = headers[file] if headers and file in headers else read_header(path)
        digests = _digests(header, unchecked) if verify else None
        paths.append(path)
        for r in direct[file]:
            entry = header.tensors[r.key]
            run = contiguous_run(r.src, entry.shape)
            if run is None:
                other.append(r)
                continue
            dst = locals_[r.name][r.dst]
            itemsize = dst.element_size()
            offset, nbytes = entry.start + run[0] * itemsize, run[1] * itemsize
            check = digests[r.key] if digests is not None else None
            total += nbytes
            if not dst.is_contiguous():
                jobs.append(ReadJob(len(paths) - 1, offset, nbytes, dst, check))
                continue
            view = bytes_of(dst) if nbytes else memoryview(b"")
            for start, length in piece_bounds(offset, nbytes, entry.start, READ_PIECE):
                jobs.append(ReadJob(len(paths) - 1, start, length, view[start - offset:start - offset + length],
                                    check))
    streamed, groups = plan_small_reads(jobs, SMALL_READ, SMALL_GAP)
    threads = READ_THREADS if storage.backend(folder).renames else storage.backend(folder).read_threads
    shares = [[streamed[i] for i in share] for share in contiguous_shares([j.nbytes for j in streamed], threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="resumable-read") as pool, \
            ThreadPoolExecutor(SMALL_THREADS, thread_name_prefix="resumable-read-small") as small_pool, \
            ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="resumable-check") as hashers:
        # Small reads first: queued behind the streams' readahead they finished last (one
        # process: median 0.85 s against 0.62 s with them first).
        futures = [small_pool.submit(_run_group, group, paths) for group in groups]
        futures += [pool.submit(_run_stream, share, paths, hashers) for share in shares if share]
        for future in futures:
            future.result()
    if other:
        total += execute_reads(folder, other, place_into(targets), verify=verify, unchecked=unchecked)
    _log_unchecked(unchecked)
    return total


def _spans(jobs: Sequence[ReadJob], gap: int, limit: int) -> list[list[ReadJob]]:
    """Consecutive jobs of one file, each within ``gap`` bytes after the previous one, spanning at
    most ``limit`` bytes: one ranged request each on an object store (a request's latency, not its
    bytes, is what a load of many tensors pays there). Pure.

    Example:
        >>> [len(s) for s in _spans([ReadJob(0, 0, 10, None), ReadJob(0, 12, 10, None), ReadJob(1, 0, 5, None)], 4, 100)]
        [2, 1]
    """
    spans: list[list[ReadJob]] = []
    for job in jobs:
        last = spans[-1][-1] if spans else None
        if (last is not None and last.file == job.file and 0 <= job.offset - (last.offset + last.nbytes) <= gap
                and job.offset + job.nbytes - spans[-1][0].offset <= limit):
            spans[-1].append(job)
        else:
            spans.append([job])
    return spans


#: Object stores: jobs within this many bytes of each other go in one ranged GET of at most
#: ``SPAN_BYTES`` (the gap's bytes are read and dropped: cheaper than another request).
SPAN_GAP = 1 << 20
SPAN_BYTES = 64 << 20


def _run_stream(jobs: Sequence[ReadJob], paths: Sequence[AnyPath], hashers: ThreadPoolExecutor) -> None:
    """Run one stream's ``jobs`` in order on readers of this thread's own, advised sequential
    (the kernel keeps readahead state per open file, and streams sharing one descriptor look
    random to it). A piece read into the target is checked by ``hashers`` while this thread
    reads the next one, so the device never waits on a hash; the bytes completing a block cut
    by the piece's edges are read by this stream, in file order around the piece (a reshard's
    edges: a separate read of them was a random read per edge, 1.18x the sizes-only 1 -> 2
    load). On an object store neighbouring jobs are read by one request (:func:`_spans`).
    The stream returns once all its checks passed."""
    readers: dict[int, Reader] = {}
    checks: list[Future] = []
    spans = [[job] for job in jobs] if not jobs or storage.backend(paths[jobs[0].file]).renames \
        else _spans(jobs, SPAN_GAP, SPAN_BYTES)
    try:
        for span in spans:
            file = span[0].file
            reader = readers.get(file)
            if reader is None:
                reader = readers[file] = storage.open_reader(paths[file])
                reader.sequential()
            path = paths[file]
            prepared = []
            for job in span:
                edges = job.check.edges(job.offset, job.offset + job.nbytes) if job.check is not None else []
                extra = {at: reader.read(at, n) for at, n in edges if at < job.offset}
                tmp = None if isinstance(job.dst, memoryview) else torch.empty(job.dst.shape, dtype=job.dst.dtype)
                prepared.append((job, job.dst if tmp is None else bytes_of(tmp), tmp, edges, extra))
            reader.read_span([(job.offset, view) for job, view, _, _, _ in prepared])
            for job, view, tmp, edges, extra in prepared:
                extra.update({at: reader.read(at, n) for at, n in edges if at >= job.offset})
                if tmp is None:
                    if job.check is not None:
                        checks.append(hashers.submit(_check, job, view, path, extra))
                    continue
                _check(job, view, path, extra)  # before the copy: tmp is this thread's
                with torch.no_grad():
                    job.dst.copy_(tmp)
    finally:
        for reader in readers.values():
            reader.close()
        for check in checks:
            check.result()  # the first failed check raises, once every one has finished


def _check(job: ReadJob, data: memoryview, path: AnyPath, extra: Mapping[int, bytes] | None = None) -> None:
    """Verify the blocks ``job`` read (``data``: its bytes); the edge bytes come from ``extra``
    (offset → bytes, read by the stream) or else are read from ``path``."""
    if job.check is not None:
        def read(offset: int, nbytes: int) -> bytes:
            if extra and offset in extra:
                return extra[offset]
            with storage.open_reader(path) as f:  # a small group's job cut mid-block: at most twice per read
                return f.read(offset, nbytes)
        job.check.check(job.offset, job.offset + job.nbytes, data, read)


def _run_group(group: Sequence[ReadJob], paths: Sequence[AnyPath]) -> None:
    """Read the span of ``group`` (small jobs of one file, in order) at once, verify and place each job's bytes."""
    first, path = group[0], paths[group[0].file]
    buf = bytearray(group[-1].offset + group[-1].nbytes - first.offset)
    view = memoryview(buf)
    with storage.open_reader(path) as reader:
        reader.random()
        reader.readinto(view, first.offset)
    for job in group:  # before any byte is placed; usually the whole entry is in the span
        start = job.offset - first.offset
        _check(job, view[start:start + job.nbytes], path)
    for job in group:
        start = job.offset - first.offset
        if isinstance(job.dst, memoryview):
            job.dst[:] = view[start:start + job.nbytes]
            continue
        data = torch.frombuffer(buf, dtype=torch.uint8, count=job.nbytes, offset=start)
        with torch.no_grad():
            job.dst.copy_(data.view(job.dst.dtype).reshape(job.dst.shape))


def place_into(targets: Mapping[str, torch.Tensor]) -> Sink:
    """A sink copying each read into the rank's local tensor of its target."""
    locals_ = {name: local_tensor(t) for name, t in targets.items()}

    def sink(read: Read, data: torch.Tensor) -> None:
        with torch.no_grad():
            locals_[read.name][read.dst].copy_(data)
    return sink
