"""Checkpoint 1.0 (legacy) engine: the whole of it sits in :mod:`resumable.legacy.save` until it is split."""

from resumable.legacy.save import (  # noqa: F401  (re-exported: every `from resumable.legacy import X` keeps working)
    LegacyLoadOptions,
    LegacyLoadResult,
    LegacySaver,
    LegacySource,
    _Files,
    check_transform_process_num,
    load_legacy,
    resolve_here,
    resolve_legacy,
)
