"""The README tells the truth: its command blocks run as written, its links stay inside the repository.

Each bash/python block of README.md is marked with what is done with it (``tests/readme.py``):
``run`` blocks run here in README order, in a folder holding a copy of ``configs/`` (the
``resumable`` commands in this process, ``resumable train`` as the subprocess it is); ``check``
blocks, too long to run here, have their Makefile targets, modules, config files and flags
checked; ``run by`` blocks name the test that runs them.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resumable.cli import build_parser, main
from tests.fixtures.mindformers import build_v2, mf_state
from tests.fixtures.ms_strategy import build_sharded_legacy, generic_state
from tests.readme import COMMAND_LANGUAGES, MARKER_PREFIX, README, ROOT, Block, Command, blocks, commands

TRAIN_TIMEOUT_S = 120


def _command_blocks(mode: str) -> list[Block]:
    return [b for b in blocks() if b.language in COMMAND_LANGUAGES and b.mode == mode]


def test_every_command_block_says_what_its_test_does():
    found = blocks()
    unmarked = [f"README.md:{b.line}: a {b.language} block without a marker (line above: {b.marker!r})"
                for b in found if b.language in COMMAND_LANGUAGES and b.mode is None]
    bare = [f"README.md:{b.line}: a fenced block without a language (```text for output or a tree)"
            for b in found if not b.language]
    stray = [f"README.md:{b.line}: a marker above a {b.language} block" for b in found
             if b.language not in COMMAND_LANGUAGES and b.marker.startswith(MARKER_PREFIX)]
    assert unmarked + bare + stray == []
    for b in found:
        if b.mode and b.mode.startswith("run by "):
            runner = ROOT / b.mode.removeprefix("run by ")
            assert runner.is_file(), f"README.md:{b.line}: {runner} does not exist"
            assert "from tests.readme import" in runner.read_text(), f"{runner} does not read the README's blocks"
        if b.language == "python":
            compile(b.text, f"README.md:{b.line}", "exec")


def _mindformers_checkpoints(cwd: Path) -> None:
    """What the MindFormers block converts: a Qwen3 2.0 folder of 4 ranks and a PP2 x DP2 x TP2 legacy run."""
    build_v2(cwd / "mf_ckpt", 12, mf_state(seed=3), dp=2, mp=2)
    strategy = build_sharded_legacy(cwd / "mf_run" / "checkpoint", generic_state(seed=8), 2, 2, pp=2)
    shutil.move(strategy, cwd / "mf_run" / "strategy")  # beside checkpoint/, where MindFormers writes it


def _run(command: Command, cwd: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run one README command line; its stdout."""
    head, *args = command.argv
    assert head == "resumable", f"no way to run {command.argv} here: mark its block check or run by"
    if args[0] == "train":  # a job of its own: processes, signal handlers, a process group
        done = subprocess.run([sys.executable, "-m", "resumable.cli", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=TRAIN_TIMEOUT_S)
        assert done.returncode == 0, f"{' '.join(command.argv)} exited {done.returncode}:\n{done.stderr}"
        return done.stdout
    status = main(args)
    out, err = capsys.readouterr()
    assert status == 0, f"{' '.join(command.argv)} exited {status}:\n{err}"
    return out


def test_the_run_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    _mindformers_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for b in _command_blocks("run"):
        for command in commands(b.text):
            out = _run(command, tmp_path, capsys)
            for said in command.said:
                assert said in out, f"README.md:{b.line}: {' '.join(command.argv)} did not print {said!r}:\n{out}"
            ran += 1
    assert ran >= 10  # the first run, the tools on its checkpoint, the MindFormers conversions


def _makefile_targets() -> dict[str, list[str]]:
    """Target → its recipe lines."""
    targets: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t"):
            current.append(line.strip())
        elif ":" in line and not line.startswith("#"):  # a rule (or a := assignment, which has no recipe)
            current = targets.setdefault(line.split(":", 1)[0], [])
    return targets


def _check_module(name: str, where: str) -> None:
    assert importlib.util.find_spec(name) is not None, f"{where}: module {name} does not exist"


def _check_train_flags(args: list[str], where: str) -> None:
    """``resumable train`` flags parse and the config they name loads with their overrides."""
    from resumable.train.config import load_config

    parsed = build_parser().parse_args(["train", *args])
    assert parsed.config is None or Path(parsed.config).is_file(), f"{where}: {parsed.config} does not exist"
    load_config(parsed.config, parsed.set)


def _check(command: Command, where: str, targets: dict[str, list[str]]) -> None:
    argv = [a for a in command.argv if not re.fullmatch(r"[A-Z_]+=\S*", a)]  # env assignments
    head, *args = argv
    if head == "make":
        for target in args:
            assert target in targets, f"{where}: the Makefile has no target {target!r}"
            for recipe in targets[target]:
                words = recipe.split()
                for flag, value in zip(words, words[1:]):
                    if flag == "-m":
                        _check_module(value, f"{where}: make {target}")
                for path in (w for w in words if w.endswith(".py") or w == "tests"):
                    assert (ROOT / path).exists(), f"{where}: make {target} runs {path}, which does not exist"
    elif head == "resumable":
        assert args[0] == "train", f"{where}: check blocks hold training commands; run the others"
        _check_train_flags(args[1:], where)
    elif head == "torchrun":
        module = args.index("-m")
        _check_module(args[module + 1], where)
        assert args[module + 1] == "resumable.train", f"{where}: torchrun runs {args[module + 1]}"
        _check_train_flags(args[module + 2:], where)
    else:
        raise AssertionError(f"{where}: no check for {head!r}")


def test_the_check_blocks_name_what_exists(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands' relative paths are the clone's
    targets = _makefile_targets()
    checked = 0
    for b in _command_blocks("check"):
        for command in commands(b.text):
            _check(command, f"README.md:{b.line}: {' '.join(command.argv)}", targets)
            checked += 1
    assert checked >= 7
    named = set(re.findall(r"`make ([\w-]+)", README.read_text(encoding="utf-8")))  # in the prose too
    assert named - set(targets) == set(), "README.md names make targets the Makefile does not have"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(page):
    broken = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on this page
        path = (page.parent / target.partition("#")[0]).resolve()
        if not (path.is_relative_to(ROOT) and path.exists()):
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: links to nothing in the repository"


def _repository_files() -> list[Path]:
    """What a clone holds: tracked files and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def test_no_file_cites_a_document_outside_the_repository():
    # The project's design documents beside the repository: what a clone needs of them is in docs/.
    outside = re.compile(r"\.\./shared\b|\b(?:FORMATS|MINDFORMERS|DESIGN|STYLE)\.md\b")
    found = []
    for f in _repository_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (a plot) cites nothing
        for number, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                found.append(f"{f.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "cites what a clone does not have (docs/ holds formats.md, mindformers.md):\n" + "\n".join(found)
