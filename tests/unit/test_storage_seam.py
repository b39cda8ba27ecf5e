"""All file and object I/O goes through the storage layer (``resumable.storage``): checked with ``ast``.

Outside ``resumable/storage/`` no module may open, read, write, list, rename or delete a file
by path itself (``open``, ``os.open``, ``Path.read_bytes``, ``shutil``, ``safe_open``,
``torch.load`` on a path, ...), so that every checkpoint path works the same on a local disk
and in an object store. The few exceptions are named here with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "src" / "resumable"

#: ``name(...)`` calls that touch files (``open`` is the builtin; ``os.x`` / ``shutil.x`` by attribute).
_CALLS = {"open", "safe_open"}
_OS = {"open", "fdopen", "rename", "replace", "remove", "unlink", "listdir", "scandir", "walk", "makedirs", "mkdir",
       "rmdir", "truncate", "pread", "preadv", "pwrite"}
#: ``<path>.x(...)`` methods of pathlib that touch files.
_PATH_METHODS = {"read_bytes", "read_text", "write_bytes", "write_text", "iterdir", "unlink", "mkdir", "rmdir",
                 "rename", "glob", "rglob", "touch", "open"}  # not "replace": str.replace

#: module → the calls it may make, and why.
ALLOWED: dict[str, set[str]] = {
    # The local commit protocol's renames (a folder renamed into place is the commit point).
    "commit.py": {"os.rename", "os.replace"},
    # flock needs a descriptor of the lock file itself, which also holds the holder's name.
    "lock.py": {"os.open", "os.pread", "os.pwrite"},
    # torch.load of a local file with mmap=True (weights only); an object is read through the layer first.
    "formats/torch_file.py": {"torch.load"},
    # The process tree, from /proc: not files of a checkpoint.
    "proctree.py": {".glob()", ".read_text()"},
}


def _violations(code: str, rel: str) -> list[str]:
    tree = ast.parse(code, rel)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = None
        if isinstance(fn, ast.Name) and fn.id in _CALLS:
            name = fn.id
        elif isinstance(fn, ast.Attribute):
            owner = fn.value.id if isinstance(fn.value, ast.Name) else None
            dotted = ast.unparse(fn.value)
            if dotted.startswith(("storage", "self.")):  # the storage layer itself; an object's own method
                continue
            if owner == "os" and fn.attr in _OS or owner == "shutil":
                name = f"{owner}.{fn.attr}"
            elif owner == "torch" and fn.attr == "load":
                name = "torch.load"
            elif fn.attr in _PATH_METHODS and owner not in ("re", "fnmatch", "glob", "self", "str", "files",
                                                            "storage", "zipfile", "ZipFile"):
                name = f".{fn.attr}()"
        if name is not None and name not in ALLOWED.get(rel, set()):
            found.append(f"{rel}:{node.lineno}: {name}")
    return found


def test_no_module_outside_the_storage_layer_does_file_io_itself() -> None:
    modules = [p for p in sorted(LIBRARY.rglob("*.py")) if "storage" not in p.relative_to(LIBRARY).parts]
    found = [v for p in modules for v in _violations(p.read_text(), p.relative_to(LIBRARY).as_posix())]
    assert found == [], "file I/O outside resumable/storage (route it through the storage layer):\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_violation() -> None:
    code = ("import os, shutil, torch\nfrom pathlib import Path\n\ndef f(p: Path):\n    p.read_bytes()\n"
            "    open(p)\n    os.rename(p, p)\n    shutil.rmtree(p)\n    torch.load(p)\n    os.rename(p, p)\n")
    assert [v.split(": ", 1)[1] for v in _violations(code, "x.py")] == [
        ".read_bytes()", "open", "os.rename", "shutil.rmtree", "torch.load", "os.rename"]
    assert [v.split(": ", 1)[1] for v in _violations(code, "commit.py")] == [".read_bytes()", "open", "shutil.rmtree",
                                                                            "torch.load"]
