"""The disk's own limits, measured with plain ``os.write`` / ``os.readv`` in the same run.

* durable sequential write: ``writers`` threads each write ``nbytes / writers`` in 8 MiB
  blocks to its own new file and fsync it; the time runs until the last fsync returns.
  Through the page cache (``dd conv=fsync``), and with ``O_DIRECT`` from an aligned buffer
  (the device's own speed, without the copy into the page cache).
* cold sequential read: the files are evicted from the page cache first
  (:func:`drop_caches`), then ``readers`` threads read them into a reused buffer.

``os.write`` / ``os.readv`` / ``os.fsync`` release the GIL, so threads are real I/O
parallelism, as they are for the checkpoint writers measured against these numbers.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

from bench.state import noise

BLOCK = 8 << 20


def drop_caches(files: list[Path]) -> str:
    """Evict ``files`` (and, where permitted, the whole page cache); returns the method used.

    ``echo 3 > /proc/sys/vm/drop_caches`` when the kernel allows it (root, not refused by a
    container; clean pages only, so no global ``sync``: other jobs' dirty pages are not
    ours to wait for); and always ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file after
    an fsync, which evicts that file's pages.
    """
    method = "posix_fadvise"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        method = "drop_caches"
    except OSError:
        pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return method


def _write_one(path: Path, nbytes: int, block: memoryview, direct: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    aligned = mmap.mmap(-1, BLOCK) if direct else None
    try:
        left, i = nbytes, 0
        while left:
            # Shift by 4 bytes per block, so that no two 4 KiB disk blocks repeat.
            start = (4 * i) % (len(block) - BLOCK)
            size = min(left, BLOCK)
            data = block[start:start + size]
            if aligned is not None:  # O_DIRECT: page-aligned memory, whole 4 KiB pages
                aligned[:size] = data
                size = -(-size // 4096) * 4096
                data = memoryview(aligned)[:size]
            n = os.write(fd, data)
            left, i = max(0, left - n), i + 1
            del data
        os.fsync(fd)
    finally:
        os.close(fd)
        if aligned is not None:
            aligned.close()


def _read_one(path: Path) -> int:
    buf = bytearray(BLOCK)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def _threads(target, args_list: list[tuple]) -> float:
    """Run ``target`` once per argument tuple in parallel threads; seconds until all returned."""
    errors: list[BaseException] = []

    def body(*args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=a) for a in args_list]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def durable_write(folder: Path, nbytes: int, writers: int, direct: bool = False) -> float:
    """Seconds to write ``nbytes`` in all as ``writers`` fsynced files in ``folder`` (``O_DIRECT`` if ``direct``)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Incompressible, as the benchmark's state is (bench.state.noise).
    block = memoryview(noise((BLOCK + 4096) // 4).numpy()).cast("B")
    share = nbytes // writers
    os.sync()
    return _threads(_write_one, [(folder / f"w{i}.bin", share, block, direct) for i in range(writers)])


def cold_read(folder: Path, readers: int) -> tuple[float, int, str]:
    """Seconds to read the ``readers`` files :func:`durable_write` left, from a cold cache.

    Returns:
        (seconds, bytes read, eviction method).
    """
    files = sorted(folder.glob("w*.bin"))[:readers]
    method = drop_caches(files)
    sizes = [f.stat().st_size for f in files]
    return _threads(_read_one, [(f,) for f in files]), sum(sizes), method
