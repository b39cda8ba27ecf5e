"""Multi-node jobs must checkpoint to storage every node sees.

``SHARED_PATHS`` (colon-separated folders) declares the shared filesystems. A job
spanning several nodes whose checkpoint folder lies outside all of them would write
each node's shards to its own local disk: a checkpoint no node can load. We stop
such a job before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from resumable.errors import ConfigError
from resumable.storage import ObjectPath, is_object


def is_multi_node(env: Mapping[str, str] = os.environ) -> bool:
    """True under torchrun when the job has more processes than this node runs."""
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return world > local


def check_shared_paths(checkpoint_dir: "str | os.PathLike[str] | ObjectPath", env: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError when a multi-node job's ``checkpoint_dir`` is not under ``SHARED_PATHS``.

    Not collective: every rank checks the same environment and raises the same error.
    """
    if not is_multi_node(env) or is_object(checkpoint_dir):  # every node reaches an object store
        return
    target = Path(checkpoint_dir).resolve()
    shared = [Path(p).resolve() for p in env.get("SHARED_PATHS", "").split(":") if p]
    if any(target == s or s in target.parents for s in shared):
        return
    listed = ", ".join(str(s) for s in shared) if shared else "nothing (SHARED_PATHS is not set)"
    raise ConfigError(
        f"this job spans several nodes (WORLD_SIZE={env.get('WORLD_SIZE')}, "
        f"LOCAL_WORLD_SIZE={env.get('LOCAL_WORLD_SIZE')}) but its checkpoint folder {target} is not "
        f"under a shared path; SHARED_PATHS lists {listed}. Put output_dir (or the CheckpointMonitor "
        "directory) on a filesystem every node mounts and list it in SHARED_PATHS, e.g. "
        "SHARED_PATHS=/mnt/shared"
    )
