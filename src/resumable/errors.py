"""Error types of resumable.

Each subclasses a built-in so callers can catch what they already know
(``FileNotFoundError``, ``ValueError``, ``NotImplementedError``). Messages say
what went wrong, where (path, rank, key) and what to do about it.
"""

from __future__ import annotations

from typing import Any


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path, iteration or file a checkpoint needs does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint exists but is incomplete, inconsistent or fails its checksum."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint asks for something we refuse to do (path escape, huge header, pickle)."""


class StateMismatchError(CheckpointError, ValueError):
    """The state to load into does not match the checkpoint (names, shapes or dtypes)."""


class SaveError(CheckpointError):
    """A save failed on some rank; nothing was committed."""


class NewerCheckpointsError(CheckpointError, FileExistsError):
    """A job would write over (or let retention delete) iterations newer than the one it starts from."""


class LockedError(CheckpointError):
    """Another live job holds the checkpoint folder."""


class ConfigError(ValueError):
    """A configuration key has a wrong type, an impossible value or is unknown."""

    @classmethod
    def from_validation(cls, err: Any, source: str, prefix: str = "") -> "ConfigError":
        """One line per invalid key of a pydantic ``ValidationError``, each named by its YAML path.

        Example::

            ConfigError.from_validation(err, "c.yaml", prefix="model.")
            # invalid config c.yaml:
            #   model.hidden_sise: unknown key (check the spelling against the README's config table)
        """
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            # pydantic puts union member names and tagged types in loc; keep the YAML path only.
            key = ".".join(p for p in key.split(".") if p not in {"bool", "str", "int", "float", "none"})
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against the README's config table)"
            got = e.get("input")
            shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{prefix + key if key else prefix.rstrip('.') or '<top level>'}: {msg}{shown}")
        return cls(f"invalid config {source}:\n  " + "\n  ".join(dict.fromkeys(lines)))


class NotImplementedYet(NotImplementedError):
    """A documented key or feature whose behaviour is not built yet."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not implemented yet: {what}")
