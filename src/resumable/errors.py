"""Error types of resumable.

Each subclasses a built-in so callers can catch what they already know
(``FileNotFoundError``, ``ValueError``, ``NotImplementedError``). Messages say
what went wrong, where (path, rank, key) and what to do about it.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
from datetime import date
from types import UnionType
from typing import Any, Callable, Iterator, Literal, Union, get_args, get_origin


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


Loc = tuple[str | int, ...]

# pydantic's loc names a union's member ('resume_training', 'str') or a validator; none is a key.
_UNION_TAGS = {"bool", "str", "int", "float", "none"}
# Errors that mean "not a value of the key's type": said as what the key accepts (``_accepts``).
_TYPE_ERRORS = {"missing", "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
                "bool_parsing", "string_type", "literal_error", "model_type", "model_attributes_type", "dict_type",
                "list_type", "tuple_type", "too_short", "too_long", "none_required", "date_type", "date_parsing"}
_LIMITS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
           "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}


class ConfigError(ValueError):
    """A configuration key has a wrong type, an impossible value or is unknown."""

    @classmethod
    def from_validation(cls, err: Any, source: str, prefix: str = "", schema: Any = None,
                        origin: Callable[[Loc], tuple[str, str | None]] | None = None) -> "ConfigError":
        """One line per invalid key of a pydantic ``ValidationError``, in our words: where it was set,
        the key, the value and what the key accepts.

        ``schema`` (the pydantic model validated) gives what a key accepts and, for a misspelt key,
        the closest valid one. ``origin(loc)`` says where the value at ``loc`` was set (a file and
        line, a ``--set`` assignment) and its text as written, when known (for the hint to quote a
        value YAML read as a number, boolean or null); default: ``source``, text unknown.

        Example::

            ConfigError.from_validation(err, "c.yaml", prefix="model.", schema=ModelConfig)
            # invalid config:
            #   c.yaml: model.hidden_sise: unknown key; did you mean model.hidden_size?
        """
        by_loc: dict[Loc, list[dict]] = {}
        for e in err.errors():
            loc = tuple(p for p in e["loc"]
                        if not (isinstance(p, str) and (p in _UNION_TAGS or p.startswith("function-"))))
            if e["type"] == "missing" and loc and isinstance(loc[-1], int):  # the tuple is too short
                loc, e = loc[:-1], {**e, "type": "too_short"}
            by_loc.setdefault(loc, []).append(e)
        lines = []
        for loc, errors in by_loc.items():
            where, raw = origin(loc) if origin else (source, None)
            key = prefix + ".".join(map(str, loc)) if loc else prefix.rstrip(".")
            what = _explain(errors, loc, key, schema, prefix, raw, where.startswith("--set "))
            said = not key or where.startswith(f"--set {key}=") or what.startswith((f"{key}.", f"{key} "))
            lines.append(f"{where}: {what}" if said else f"{where}: {key}: {what}")
        return cls("invalid config:\n  " + "\n  ".join(dict.fromkeys(lines)))


def _explain(errors: list[dict], loc: Loc, key: str, schema: Any, prefix: str, raw: str | None,
             from_set: bool) -> str:
    """What is wrong with the value at ``loc`` (all of pydantic's errors there), in our words."""
    kinds = {e["type"] for e in errors}
    value = errors[0].get("input")
    if "extra_forbidden" in kinds:
        return "unknown key" + _suggestion(schema, loc, prefix)
    custom = [str(e["ctx"]["error"]) for e in errors if e["type"] in ("value_error", "assertion_error")]
    if custom:  # our validators' own words
        return "; ".join(custom)
    for e in errors:
        if e["type"] in _LIMITS:
            bound, words = _LIMITS[e["type"]]
            return f"must be {words} {e['ctx'][bound]:g}, got {_shown(value)}"
    other = [e["msg"] for e in errors if e["type"] not in _TYPE_ERRORS]
    if other:  # a constraint this module has no words for: pydantic's, with the value
        return "; ".join(other) + f", got {_shown(value)}"
    field = _field(schema, loc) if schema is not None else None
    accepted = (_accepts(field) if field is not None else
                ", or ".join(e["msg"].removeprefix("Input should be ") for e in errors))
    if kinds == {"missing"}:
        return f"required, not given: it takes {accepted}"
    got, hint = _shown(value), ""
    if field is not None and str in _alternatives(field) and _scalar(value):
        # YAML turned the text into a number, boolean or null: quoting it keeps it text.
        written = raw if raw else "an empty value"
        got = f"{written}, which YAML reads as {_typed(value)}" if raw is not None else _typed(value)
        text = raw if raw is not None else "..."
        hint = (f"; quote it to pass it as text: --set '{key}=\"{text}\"'" if from_set else
                f"; quote it to pass it as text: {loc[-1]}: \"{text}\"")
    elif from_set and _is_model(field):
        hint = f"; set one of its keys instead: --set {key}.KEY=VALUE"
    elif get_origin(field) is list and isinstance(value, dict):
        hint = (f"; make it a list of one: --set '{key}=[{raw}]'" if from_set and raw else
                "; make it a list of one (put \"- \" before its first key)")
    return f"expected {accepted}, got {got}{hint}"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, date))


def _typed(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"the date {value}"


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, default=str)
    kind = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, (list, tuple)) else "the value"
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _alternatives(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def _field(schema: Any, loc: Loc) -> Any:
    """The annotation of the key at ``loc`` under a pydantic model, or None when ``loc`` is no key."""
    tp = schema
    for part in loc:
        for alt in _alternatives(tp):
            origin, args = get_origin(alt), get_args(alt)
            if isinstance(part, str) and _is_model(alt) and part in alt.model_fields:
                tp = alt.model_fields[part].annotation
                break
            if isinstance(part, int) and (origin is list or (origin is tuple and part < len(args))):
                tp = args[0] if origin is list else args[part]
                break
        else:
            return None
    return tp


def _accepts(tp: Any) -> str:
    """What a value of annotation ``tp`` may be, in a YAML user's words."""
    alternatives = _alternatives(tp)
    if len(alternatives) > 1:
        return ", or ".join(_accepts(t) for t in alternatives)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in words:
        return words[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " or ".join(map(repr, args)) if len(args) <= 2 else "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {len(args)} values, each {_accepts(args[0])}" if len(set(args)) == 1 else \
            f"a list of {len(args)} values ({', '.join(map(_accepts, args))})"
    if origin is list:
        item = args[0]
        return f"a list of mappings, each with the keys {_keys(item)}" if _is_model(item) else \
            f"a list, each item {_accepts(item)}"
    if _is_model(tp):
        return f"a section (a mapping of the keys {_keys(tp)})"
    return getattr(tp, "__name__", str(tp))


def _keys(model: Any) -> str:
    names = [f"{name} (required)" if f.is_required() else name for name, f in model.model_fields.items()]
    return _listing(names)


def _listing(names: list[str], most: int = 8) -> str:
    if len(names) > most:
        return f"{', '.join(names[:most - 2])} and {len(names) - most + 2} more"
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _paths(tp: Any, at: str) -> Iterator[str]:
    """Every key's dotted path under a pydantic model (a list of sections: its first item's)."""
    for name, f in tp.model_fields.items():
        ann = f.annotation
        yield at + name
        if _is_model(ann):
            yield from _paths(ann, f"{at}{name}.")
        elif get_origin(ann) is list and _is_model(get_args(ann)[0]):
            yield from _paths(get_args(ann)[0], f"{at}{name}.0.")


def _suggestion(schema: Any, loc: Loc, prefix: str) -> str:
    """'; did you mean X?' for the closest valid key (in its own section, else anywhere), or the keys."""
    parent = _field(schema, loc[:-1]) if schema is not None and loc else None
    if not _is_model(parent):
        return ""
    name, at = str(loc[-1]), prefix + "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(name, list(parent.model_fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {at}{close[0]}?"
    leaves: dict[str, str] = {}
    for path in _paths(schema, prefix):  # the right key in another section: `stop_step` at the top level
        leaves.setdefault(path.rsplit(".", 1)[-1], path)
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
    if close:
        return f"; did you mean {leaves[close[0]]}?"
    section = f"the keys of {at.rstrip('.')}" if at else "the top-level keys"
    return f"; {section} are {_listing(list(parent.model_fields))}"


# What failed and what to do, per errno: the words a bare "[Errno 13] Permission denied: 'x'" lacks.
_GRANT = ("give the user running this access to it"
          " (its or its folder's permissions or owner), or use another path")
_OS_WORDS: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", _GRANT),
    errno.EPERM: ("permission denied (operation not permitted)", _GRANT),
    errno.ENOSPC: ("no space left on the device", "free space on that file system (or write to another one) and "
                                                  "run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or write elsewhere) and run again"),
    errno.EROFS: ("the file system is read-only", "use a path on a writable file system"),
    errno.ENOTDIR: ("not a folder (it, or a folder above it, is a file)", "move that file away or use another path"),
    errno.EISDIR: ("is a folder where a file was expected", "give the path of a file"),
    errno.ENAMETOOLONG: ("a name in this path is too long for the file system (most allow 255 bytes a name)",
                         "use shorter names"),
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EEXIST: ("already exists", "remove it or use another path"),
    errno.ENOTEMPTY: ("is a folder that is not empty", "remove what it holds or use another path"),
    errno.EIO: ("input/output error: the disk or network file system failed", "check the device (dmesg) and run "
                                                                             "again"),
    errno.ELOOP: ("too many levels of symbolic links (a link loop?)", "fix the links along this path"),
    errno.EXDEV: ("source and destination are on different file systems", "keep both on one file system"),
    errno.EMFILE: ("too many open files in this process", "raise the limit (ulimit -n) and run again"),
    errno.ENFILE: ("too many open files on this machine", "close other programs' files and run again"),
    errno.ENOMEM: ("out of memory", "free memory and run again"),
}


def yaml_problem(err: Exception) -> str:
    """PyYAML's error on one line, with the line and column (its own text names a ``<unicode string>``).

    Example::

        yaml_problem(exc)    # "line 2, column 5: expected ',' or ']', but got ':'"
    """
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(err, "problem", None) or err)


def describe_os_error(err: OSError) -> str:
    """An OSError as a message: the path, what failed and what to do (never a bare ``[Errno N] ...``);
    ours (a ``CheckpointError``, one raised without an errno) as they are.

    Example::

        describe_os_error(PermissionError(13, "Permission denied", "/data/out"))
        # "/data/out: permission denied: give the user running this access to it (its or its
        #  folder's permissions or owner), or use another path"
    """
    if err.errno is None or isinstance(err, CheckpointError):  # raised with our own words
        return str(err)
    default = ((err.strerror or os.strerror(err.errno)).lower(), "check it and run again")
    what, todo = _OS_WORDS.get(err.errno, default)
    if err.filename is None:  # our own strerror (a rename's two paths) says where
        path = err.strerror if err.strerror and err.strerror != os.strerror(err.errno) else "a file operation"
    else:
        path = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    return f"{path}{' ' if what.startswith(('is ', 'does ', 'already ')) else ': '}{what}: {todo}"


class NotImplementedYet(NotImplementedError):
    """A documented key or feature whose behaviour is not built yet."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not implemented yet: {what}")
