"""Executing a rank's planned reads: bytes from safetensors files into target tensors.

:func:`read_direct` is the fast path of every load: a stored slice that is one byte run
of its file goes with ``os.preadv`` straight into the memory of a contiguous CPU target
(no mapping, no intermediate tensor), the work cut into a few sequential streams. What
it cannot do that way (strided slices, targets off the CPU, big-endian hosts) goes
through :func:`execute_reads` (``safe_open(...).get_slice(key)[slices]``) and a
:data:`Sink`. The helpers (:func:`contiguous_run`, :func:`pread_into`,
:func:`bytes_of`) are shared with :mod:`resumable.balanced`.

Not collective; reads files only. What to read comes from :mod:`resumable.planning`.
"""

from __future__ import annotations

import bisect
import itertools
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open

from resumable.errors import CorruptCheckpointError
from resumable.formats.safetensors_io import read_header
from resumable.layout import local_tensor
from resumable.planning import Read

__all__ = ["READ_PIECE", "READ_THREADS", "Sink", "bytes_of", "contiguous_run", "contiguous_shares",
           "execute_reads", "place_into", "pread_into", "read_direct", "read_region"]

Sink = Callable[[Read, torch.Tensor], None]


def read_region(handle: Any, key: str, src: tuple[slice, ...]) -> torch.Tensor:
    """Read ``stored[src]`` of ``key`` from an open ``safe_open`` handle (only those bytes)."""
    if not src:  # 0-d tensors cannot be sliced
        return handle.get_tensor(key)
    return handle.get_slice(key)[src]


def execute_reads(folder: Path, reads: Iterable[Read], sink: Sink) -> int:
    """Read every planned slice, file by file (each file opened once), handing each to ``sink``.

    Returns:
        The bytes read.
    """
    by_file: dict[str, list[Read]] = defaultdict(list)
    for r in reads:
        by_file[r.file].append(r)
    total = 0
    for file in sorted(by_file):
        with safe_open(str(folder / file), framework="pt", device="cpu") as handle:
            for r in by_file[file]:
                data = read_region(handle, r.key, r.src)
                total += data.numel() * data.element_size()
                sink(r, data)
                del data  # one slice in memory at a time
    return total


#: Sequential streams reading one rank's slices, one thread each (``os.preadv`` releases
#: the GIL). Each stream reads one contiguous stretch of the files in file order, so the
#: kernel's readahead keeps every stream ahead of its reader and the device sees several
#: deep sequential streams; cutting the same work round-robin into pieces over the
#: threads measured 5-10% slower here. Syscalls are cut at ``READ_PIECE`` bytes.
READ_THREADS = 4
READ_PIECE = 8 << 20


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


def pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (short reads continue; EOF is corruption)."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise CorruptCheckpointError(f"{path}: file ends at byte {offset}, before the data metadata.json "
                                         "records; the file is truncated: restore it or re-save the checkpoint")
        view, offset = view[n:], offset + n


def bytes_of(t: torch.Tensor) -> memoryview:
    """The writable bytes of contiguous CPU tensor ``t`` (its own memory, not a copy)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def read_direct(folder: Path, reads: Iterable[Read], targets: Mapping[str, torch.Tensor]) -> int:
    """Fill the targets for ``reads`` with ``os.preadv`` straight into their memory; not collective.

    A read whose stored slice is one byte run of the file and whose destination is a
    contiguous piece of a CPU local tensor is read into that piece directly (no mapping,
    no intermediate tensor, no copy); in file order, these reads are cut into
    ``READ_THREADS`` consecutive shares of near-equal bytes, each read by its own thread
    front to back in ``READ_PIECE`` calls. A run whose destination is not contiguous is
    read into a temporary tensor of that slice and copied; any other read (strided stored
    slice, a target off the CPU, a big-endian host) goes through :func:`execute_reads`.
    Peak memory is the target state plus at most one temporary slice per thread.

    Returns:
        The bytes read.
    """
    locals_ = {name: local_tensor(t) for name, t in targets.items()}
    direct: dict[str, list[Read]] = defaultdict(list)
    other: list[Read] = []
    for r in reads:
        if sys.byteorder == "little" and locals_[r.name].device.type == "cpu":
            direct[r.file].append(r)
        else:
            other.append(r)
    jobs: list[tuple[int, int, int, Callable[..., None], tuple]] = []  # (file, offset, bytes, fn, args)
    total, fds = 0, []

    def via_temp(fd: int, offset: int, dst: torch.Tensor, path: Path) -> None:
        tmp = torch.empty(dst.shape, dtype=dst.dtype)
        pread_into(fd, bytes_of(tmp), offset, path)
        with torch.no_grad():
            dst.copy_(tmp)

    try:
        for file in sorted(direct):
            path = folder / file
            header = read_header(path)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fds.append(fd)
            for r in direct[file]:
                entry = header.tensors[r.key]
                run = contiguous_run(r.src, entry.shape)
                if run is None:
                    other.append(r)
                    continue
                dst = locals_[r.name][r.dst]
                itemsize = dst.element_size()
                offset, nbytes = entry.start + run[0] * itemsize, run[1] * itemsize
                total += nbytes
                if not dst.is_contiguous():
                    jobs.append((len(fds), offset, nbytes, via_temp, (fd, offset, dst, path)))
                    continue
                view = bytes_of(dst) if nbytes else memoryview(b"")
                for start in range(0, nbytes, READ_PIECE):
                    piece = view[start:start + READ_PIECE]
                    jobs.append((len(fds), offset + start, len(piece), pread_into, (fd, piece, offset + start, path)))
        jobs.sort(key=lambda j: (j[0], j[1]))

        def read_share(share: range) -> None:
            for i in share:
                jobs[i][3](*jobs[i][4])

        shares = contiguous_shares([j[2] for j in jobs], READ_THREADS)
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="resumable-read") as pool:
            for future in [pool.submit(read_share, share) for share in shares if share]:
                future.result()
    finally:
        for fd in fds:
            os.close(fd)
    if other:
        total += execute_reads(folder, other, place_into(targets))
    return total


def place_into(targets: Mapping[str, torch.Tensor]) -> Sink:
    """A sink copying each read into the rank's local tensor of its target."""
    locals_ = {name: local_tensor(t) for name, t in targets.items()}

    def sink(read: Read, data: torch.Tensor) -> None:
        with torch.no_grad():
            locals_[read.name][read.dst].copy_(data)
    return sink
