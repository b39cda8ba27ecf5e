"""Durability observed directly: run a command under ``strace`` and check, from its syscalls, that
what it published was fsynced first.

A crash test cannot see a missing fsync (SIGKILL keeps the page cache), so the tests read
the system calls themselves. The command runs under::

    strace -f -y -s 8 -e trace=openat,open,creat,write,pwrite64,pwritev,fsync,fdatasync,
                              rename,renameat,renameat2,mkdir,mkdirat -o TRACE

``-y`` makes strace print the path of every file descriptor argument (``fsync(7</a/b>)``):
fd numbers are per process and ``-f`` interleaves the threads of several processes (two
ranks, the async saver's thread), so strace, which knows each thread's fd table, maps
them. :func:`parse_strace` turns the trace into :class:`Call` records (pure);
:func:`publish_problems` and :func:`creation_problems` state the rules (pure).

Rules for a folder published by a rename ``temp -> final``: every file in it was fsynced
after its last write and before the rename, every folder in it (``temp`` itself included)
was fsynced before the rename, and ``final``'s parent was fsynced after it. A single file
published by a rename (a legacy rank file, the tracker, ``meta.json``): the same, the file
itself fsynced. A folder created for committed data: its parent fsynced after the mkdir.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

STRACE = shutil.which("strace") or "/usr/bin/strace"
TRACED = "openat,open,creat,write,pwrite64,pwritev,fsync,fdatasync,rename,renameat,renameat2,mkdir,mkdirat"

_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")
_FD_PATH = re.compile(r"^-?\d+<(?P<path>.*)>$")
_STRING = re.compile(r'^"(?P<s>(?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    """One successful system call of interest: ``sync`` (fsync/fdatasync), ``write``, ``rename``,
    ``mkdir`` or ``create`` (an open that may create), with the paths it names (absolute when the
    trace names them so)."""

    kind: str
    paths: tuple[str, ...]


def _split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments (strings, ``{...}`` and ``[...]`` kept whole)."""
    out, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(args):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "{[<(":
            depth += 1
        elif ch in "}]>)":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return out


def _string(arg: str) -> str | None:
    m = _STRING.match(arg)
    return None if m is None else m.group("s").encode().decode("unicode_escape")


def _fd_path(arg: str) -> str | None:
    m = _FD_PATH.match(arg)
    return None if m is None else m.group("path")


def _at(dirfd: str, name: str | None) -> str | None:
    """``name`` relative to ``dirfd`` (``AT_FDCWD`` or ``N</dir>``), as the kernel resolves it."""
    if name is None or name.startswith("/") or dirfd == "AT_FDCWD":
        return name
    base = _fd_path(dirfd)
    return None if base is None else os.path.join(base, name)


def _call(name: str, args: list[str]) -> Call | None:
    if name in ("fsync", "fdatasync"):
        path = _fd_path(args[0])
        return None if path is None else Call("sync", (path,))
    if name in ("write", "pwrite64", "pwritev"):
        path = _fd_path(args[0])
        return None if path is None else Call("write", (path,))
    if name == "rename":
        paths = (_string(args[0]), _string(args[1]))
    elif name in ("renameat", "renameat2"):
        paths = (_at(args[0], _string(args[1])), _at(args[2], _string(args[3])))
    elif name == "mkdir":
        paths = (_string(args[0]),)
    elif name == "mkdirat":
        paths = (_at(args[0], _string(args[1])),)
    elif name in ("open", "creat"):
        paths = (_string(args[0]),)
    elif name == "openat":
        paths = (_at(args[0], _string(args[1])),)
    else:
        return None
    if any(p is None for p in paths):
        return None
    kind = {"rename": "rename", "renameat": "rename", "renameat2": "rename", "mkdir": "mkdir",
            "mkdirat": "mkdir"}.get(name, "create")
    return Call(kind, tuple(os.path.normpath(p) for p in paths))  # type: ignore[arg-type]


def parse_strace(text: str) -> list[Call]:
    """The successful calls of an ``strace -f -y`` trace, in the order strace saw them complete.

    A call interrupted by another thread's (``<unfinished ...>`` ... ``<... name resumed>``)
    is joined and placed where it completed. Failed calls (``= -1``) are left out. Pure.
    """
    pending: dict[str, str] = {}
    calls: list[Call] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        tid, rest = m.group("tid"), m.group("rest")
        if rest.endswith("<unfinished ...>"):
            pending[tid] = rest[:-len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"^<\.\.\. \w+ resumed>\s?(?P<tail>.*)$", rest)
        if resumed is not None:
            rest = pending.pop(tid, "") + resumed.group("tail")
        c = _CALL.match(rest)
        if c is None or int(c.group("ret")) < 0:
            continue
        found = _call(c.group("name"), _split_args(c.group("args")))
        if found is not None:
            calls.append(found)
    return calls


def _last(calls: Sequence[Call], kind: str, path: str, before: int) -> int | None:
    for i in range(min(before, len(calls)) - 1, -1, -1):
        if calls[i].kind == kind and calls[i].paths[0] == path:
            return i
    return None


def publish_problems(calls: Sequence[Call], final: str | os.PathLike[str],
                     members: Iterable[str] | None = None) -> list[str]:
    """What was not durable when ``final`` was published by its (last) rename. Pure.

    Args:
        calls: :func:`parse_strace` of the run.
        final: the published path.
        members: None when ``final`` is a file; for a folder, the paths of its files and
            subfolders relative to it, folders ending in ``/`` (from disk, after the run:
            :func:`members`). They were
            under the rename's source while being written.

    Returns:
        One line per problem; empty when every rule holds.
    """
    final = os.path.normpath(final)
    at = next((i for i in range(len(calls) - 1, -1, -1)
               if calls[i].kind == "rename" and calls[i].paths[1] == final), None)
    if at is None:
        return [f"{final}: no rename published it"]
    temp = calls[at].paths[0]
    problems = []
    inside = sorted(members) if members is not None else None
    for rel in ["/", *inside] if inside is not None else [""]:
        path = os.path.normpath(os.path.join(temp, rel.rstrip("/")))
        synced = _last(calls, "sync", path, at)
        if rel.endswith("/"):
            if synced is None:
                problems.append(f"{path}: folder not fsynced before the rename to {final}")
            continue
        written = _last(calls, "write", path, at)
        if synced is None:
            problems.append(f"{path}: not fsynced before the rename to {final}")
        elif written is not None and written > synced:
            problems.append(f"{path}: written again after its fsync, before the rename to {final}")
    parent = os.path.dirname(final)
    if not any(c.kind == "sync" and c.paths[0] == parent for c in calls[at + 1:]):
        problems.append(f"{parent}: not fsynced after the rename that published {final}")
    return problems


def creation_problems(calls: Sequence[Call], folder: str | os.PathLike[str]) -> list[str]:
    """What was not durable about creating ``folder``: its parent fsynced after the mkdir. Pure."""
    folder = os.path.normpath(folder)
    made = next((i for i, c in enumerate(calls) if c.kind == "mkdir" and c.paths[0] == folder), None)
    if made is None:
        return [f"{folder}: no mkdir created it in this run"]
    parent = os.path.dirname(folder)
    if not any(c.kind == "sync" and c.paths[0] == parent for c in calls[made + 1:]):
        return [f"{parent}: not fsynced after {folder} was created in it"]
    return []


def members(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative to it (hidden ones too), folders ending in ``/``."""
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def run_traced(cmd: Sequence[str], trace: Path, *, env: dict[str, str] | None = None,
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[Call]]:
    """Run ``cmd`` under strace (see the module docstring); returns its result and its calls."""
    done = subprocess.run([STRACE, "-f", "-y", "-s", "8", "-e", f"trace={TRACED}", "-o", str(trace), *cmd],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return done, parse_strace(trace.read_text(errors="replace"))


def strace_works() -> bool:
    """True when strace can trace a child here (ptrace may be forbidden in a container)."""
    try:
        return subprocess.run([STRACE, "-f", "-o", os.devnull, "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
