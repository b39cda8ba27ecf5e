"""Checkpoint 1.0 (legacy) engine: save per-rank files, resolve which step to load, load, convert layouts.

On disk see :mod:`resumable.formats.v1`. Every rank writes its own file into
``<directory>/rank_{r}/`` and its own ``meta.json``; nothing is shared but the agreement
that every rank wrote. Loading reads a step's files (the newest complete on every rank,
a named step, or one full/unified file) and fills the state in place with the same read
planner as Checkpoint 2.0 (:mod:`resumable.planning`): each rank reads only the slices
it needs.

Modules: :mod:`~resumable.legacy.save` (:class:`LegacySaver`),
:mod:`~resumable.legacy.resolve` (:func:`resolve_legacy`), :mod:`~resumable.legacy.files`
(the index of our rank files), :mod:`~resumable.legacy.strategy` (strategy files),
:mod:`~resumable.legacy.transform` (``auto_trans_ckpt`` conversions),
:mod:`~resumable.legacy.load` (:func:`load_legacy`), :mod:`~resumable.legacy.background`
(``async_save``: snapshot, then save in a thread).

Order of calls across ranks (every rank calls each public function together)::

    LegacySaver()        all_gather     every rank: its folder's prefix suffixes; all use the max
    LegacySaver.save     all_gather     (remove_redundancy) holdings → the same writer plan
                         no             write temp file, fsync, rename; strategy file
                         agree          every rank wrote, else SaveError everywhere
                         no             meta.json (atomic)
                         agree          every rank recorded it; then retention (decide_folder, per folder)
    resolve_legacy       broadcast /    rank 0 picks the step (or each rank checks its own
                         all_gather     substituted name); every rank learns every failure
    load_legacy          all_gather     agreement before and after reading (dist.agree_on);
                                        conversions add one agreement each
"""

from resumable.legacy.background import BackgroundLegacySaves
from resumable.legacy.files import RankFiles
from resumable.legacy.load import LegacyLoadOptions, LegacyLoadResult, check_transform_process_num, load_legacy
from resumable.legacy.resolve import LegacySource, resolve_here, resolve_legacy
from resumable.legacy.save import LegacySaver

__all__ = [
    "BackgroundLegacySaves",
    "LegacyLoadOptions",
    "LegacyLoadResult",
    "LegacySaver",
    "LegacySource",
    "RankFiles",
    "check_transform_process_num",
    "load_legacy",
    "resolve_here",
    "resolve_legacy",
]
