"""``load_ckpt_async``: read checkpoint files in the background while the model is built.

The thread only reads bytes into the page cache — no parsing, no ``torch.distributed`` —
so the load that follows takes exactly the synchronous code path (identical results)
and finds its bytes in memory. Which files to read is decided inside the thread too
(resolving a checkpoint touches the filesystem); a wrong guess costs only the read.
Objects in an object store are skipped: there is no page cache to fill for them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from resumable import storage
from resumable.storage import AnyPath

log = logging.getLogger(__name__)

BLOCK = 8 << 20


class Prefetch:
    """Read the files ``choose()`` names in a daemon thread; ``join()`` before the real load."""

    def __init__(self, choose: Callable[[], Iterable[AnyPath]], name: str = "resumable-prefetch") -> None:
        self.bytes = 0
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(choose,), name=name, daemon=True)
        self._thread.start()

    def _run(self, choose: Callable[[], Iterable[AnyPath]]) -> None:
        start = time.perf_counter()
        try:
            block = memoryview(bytearray(BLOCK))
            for path in choose():
                if storage.is_object(path):
                    continue
                # The reader refuses a FIFO (it would block here, and join() with it) or /dev/zero (never ends).
                with storage.open_reader(path, "checkpoint file") as f:
                    f.sequential()
                    for offset in range(0, f.size, BLOCK):
                        n = min(BLOCK, f.size - offset)
                        f.readinto(block[:n], offset)
                        self.bytes += n
        except Exception as exc:  # the real load reports problems; this is only a head start
            log.debug("load_ckpt_async prefetch stopped: %s", exc)
        self.seconds = time.perf_counter() - start

    def join(self) -> None:
        """Wait for the reads; logs what was read while the model was being built."""
        self._thread.join()
        log.info("load_ckpt_async: read %.1f MB in the background in %.2f s", self.bytes / 1e6, self.seconds)
