"""Hostile input is refused in linear time and bounded memory, naming the file and key; it never hangs.

Every case damages one real file the way a broken disk, a tool or a forger would (metadata.json
sealed again after the edit, so that the damage reaches the parser): JSON nested a few hundred
thousand levels deep, layout integers of the wrong type, counts a checkpoint names but does not
hold, a 2 MB metadata.json of chunks built to be slow, files that are not regular files. The
commands a user runs on a shard that is a FIFO or ``/dev/zero`` are in
``tests/e2e/test_hostile_files.py``.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import resumable
from resumable import commit
from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import hf, mindformers, v1, v2
from resumable.formats.jsonfile import MAX_DEPTH, load_json, nesting_depth, parse_json
from resumable.formats.safetensors_io import read_header, write_file
from resumable.legacy.resolve import resolve_here

MODEL = "CKP-model-0000000-0000001.safetensors"
DEEP = b"[" * 300_000 + b"]" * 300_000  # json's recursive parser: RecursionError past ~1000 levels


@pytest.fixture
def it1(tmp_path: Path) -> Path:
    resumable.save({"model": {"w": torch.arange(8.0)}, "global_step": 1}, tmp_path / "ckpt", 1)
    return tmp_path / "ckpt" / "iteration_00000001"


def _edit(path: Path, edit, literal: tuple[str, str] = ("", "")) -> None:
    """Edit metadata.json and seal it again, as a forger would (the seal alone would catch the edit);
    ``literal`` replaces a text in the JSON (``1e400`` cannot be written by json.dumps)."""
    doc = json.loads(path.read_text())
    doc.pop("seal", None)
    edit(doc)
    path.write_text(v2.seal(json.dumps(doc, separators=(",", ":")).replace(*literal)))


# ------------------------------------------------------------------------------ the reader


def test_nesting_is_counted_outside_strings_and_with_unclosed_brackets():
    assert nesting_depth(b'{"a": [1, {"b": []}], "c": "[[[[{{"}') == 4
    assert nesting_depth(rb'["\"[[", "\\"]') == 1  # escaped quotes do not end a string
    assert nesting_depth(b"[" * 70) == 70  # truncated: still deep
    assert nesting_depth(b'"' + b"[" * 10_000) == 0  # an unterminated string swallows the rest


def test_a_string_of_quotes_and_backslashes_is_scanned_in_linear_time():
    start = time.monotonic()
    nesting_depth(b'"\\' * 1_000_000)  # a failed string match retried from every quote would be quadratic
    assert time.monotonic() - start < 5


def test_nan_and_huge_integers_are_refused_naming_the_file():
    with pytest.raises(CorruptCheckpointError, match=r"^x\.json: not valid JSON or not parsable \(NaN where"):
        parse_json("[NaN]", "x.json")
    assert parse_json("[NaN]", "x.json", allow_nan=True)[0] != 0
    with pytest.raises(CorruptCheckpointError, match=r"^x\.json: .*Exceeds the limit \(4300 digits\)"):
        parse_json("1" * 5000, "x.json")


@pytest.mark.parametrize("make", ["fifo", "dev_zero", "folder"])
def test_only_regular_files_are_read(tmp_path: Path, make: str):
    path = tmp_path / "config.json"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    kind = {"fifo": "a FIFO (named pipe)", "dev_zero": "a character device", "folder": "a folder"}[make]
    with pytest.raises(UnsafeCheckpointError) as err:
        load_json(path, "HuggingFace config")
    assert str(err.value) == (f"HuggingFace config {path} is {kind}, not a regular file; refusing to read it "
                              "(reading it could block forever or never end): replace it with the real file or "
                              "remove it")


# ----------------------------------------------------------------- every JSON the project reads


def _deep_metadata(folder: Path) -> None:
    (folder / "metadata.json").write_bytes(DEEP)


def _deep_common(folder: Path) -> None:
    (folder / "common.json").write_bytes(b'{"state": ' + DEEP + b"}")
    (folder / "metadata.json").unlink()  # a unified folder's common.json: no recorded checksum refuses it first


def _deep_header(folder: Path) -> None:
    header = b'{"a": ' + DEEP + b"}"
    (folder / MODEL).write_bytes(len(header).to_bytes(8, "little") + header)


READERS = {
    "metadata.json": (_deep_metadata, lambda f: v2.read_metadata(f), "metadata.json"),
    "common.json": (_deep_common, lambda f: v2.read_common(f), "common.json"),
    "safetensors header": (_deep_header, lambda f: read_header(f / MODEL), MODEL),
}


@pytest.mark.parametrize("case", sorted(READERS))
def test_json_nested_hundreds_of_thousands_deep_is_refused_not_a_recursion_error(it1: Path, case: str):
    damage, read, name = READERS[case]
    damage(it1)
    with pytest.raises(UnsafeCheckpointError) as err:
        read(it1)
    assert str(it1 / name) in str(err.value)
    assert f" levels deep, more than the {MAX_DEPTH} we parse" in str(err.value)


@pytest.mark.parametrize("name", [hf.CONFIG, hf.INDEX])
def test_a_deep_huggingface_config_or_index_is_refused(tmp_path: Path, name: str):
    (tmp_path / name).write_bytes(DEEP)
    with pytest.raises(UnsafeCheckpointError, match="JSON nested 300000 levels deep") as err:
        hf.read_hf_config(tmp_path) if name == hf.CONFIG else hf.index_hf_folder(tmp_path)
    assert str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize(("value", "shown"), [([1], "[1]"), ("1e400", "inf"), ("abc", "'abc'"), (-1, "-1"),
                                              (True, "True"), (1.5, "1.5")])
def test_layout_integers_of_the_wrong_type_name_the_key_and_value(it1: Path, value: object, shown: str):
    literal = ('"pipeline_stages":"1e400"', '"pipeline_stages":1e400') if value == "1e400" else ("", "")
    _edit(it1 / "metadata.json", lambda d: d["layout"].__setitem__("pipeline_stages", value), literal)
    with pytest.raises(CorruptCheckpointError) as err:
        v2.read_metadata(it1)
    assert str(err.value).startswith(f"{it1 / 'metadata.json'}: 'layout.pipeline_stages' must be an integer in "
                                     f"[1, {v2.MAX_RANKS}], got {shown}; the checkpoint metadata is damaged")


def test_an_absurd_world_size_is_refused_before_any_list_is_built(it1: Path):
    def edit(d: dict) -> None:
        d["layout"]["world_size"] = 10**12
        d["meshes"] = [{"shape": [10**12], "ranks_range": [0, 10**12, 1]}]
    _edit(it1 / "metadata.json", edit)
    with pytest.raises(CorruptCheckpointError, match=r"'layout.world_size' must be an integer in \[1, 1048576\], "
                                                     r"got 1000000000000"):
        v2.read_metadata(it1)


def test_many_meshes_over_the_whole_world_allocate_nothing(it1: Path):
    def edit(d: dict) -> None:  # 1 file listed, yet 20000 meshes of 4096 positions each (80 M ranks)
        d["layout"]["world_size"] = 4096
        d["meshes"] = [{"shape": [4096], "ranks_range": [0, 4096, 1]}] * 20_000
    _edit(it1 / "metadata.json", edit)
    tracemalloc.start()
    with pytest.raises(CorruptCheckpointError, match="the meshes hold over 4096 positions for 2 files listed"):
        v2.read_metadata(it1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("global_step", "abc", "an integer >= 0"), ("global_step", -1, "an integer >= 0"),
    ("global_step", 2.0, "an integer >= 0"), ("consumed_samples", True, "an integer >= 0"),
    ("epoch_num", 1e400, "an integer >= 0"), ("loss_scale", "NaN", "a finite number"),
    ("loss_scale", "Infinity", "a finite number"), ("state", [], "a JSON object"),
    ("rank_local", {}, "a JSON array or null"), ("lr_schedule", 3, "a JSON object or null"),
])
def test_common_json_context_values_are_type_checked_naming_file_and_key(it1: Path, key: str, value: object,
                                                                       rule: str):
    doc = json.loads((it1 / "common.json").read_text())
    doc[key] = value
    raw = json.dumps(doc)
    if value in ("NaN", "Infinity"):
        raw = raw.replace(f'"{value}"', value)  # the JSON constant, not the string
        value = float(value.lower().replace("infinity", "inf"))
    # Checked as read_common checks it once the file's recorded size and checksum match (they would not here).
    with pytest.raises(CorruptCheckpointError) as err:
        v2.check_common(parse_json(raw, "common.json", allow_nan=True), str(it1 / "common.json"))
    assert str(err.value) == (f"{it1 / 'common.json'}: {key!r} must be {rule}, got {value!r}; the file is damaged: "
                              "restore it from a copy or use another checkpoint")


@pytest.mark.parametrize("digits", [19, 4000, 5000])
def test_a_tracker_of_thousands_of_digits_is_an_error_naming_the_tracker(tmp_path: Path, digits: int):
    tracker = tmp_path / commit.TRACKER
    tracker.write_text("9" * digits)
    expected = (f"tracker {tracker} is 5000 bytes, more than the 4096 we parse" if digits > 4096 else
                f"{tracker}: expected one iteration number, found '{'9' * min(digits, 40)}"
                + ("'" if digits <= 40 else f"... ({digits} characters)'"))
    for read in (commit.read_tracker, mindformers.resolve_mf_iteration):
        with pytest.raises(CorruptCheckpointError) as err:
            read(tmp_path)
        assert str(err.value).startswith(expected)


def test_a_tracker_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path):
    os.mkfifo(tmp_path / commit.TRACKER)
    with pytest.raises(UnsafeCheckpointError, match="is a FIFO"):
        commit.read_tracker(tmp_path)


def test_a_strategy_with_a_zero_mesh_size_is_refused_before_boxes_are_derived(tmp_path: Path):
    doc = v1.strategy_doc(rank=0, world_size=2, layout={"mesh": {"tp": 0}}, remove_redundancy=False, tensors={})
    (tmp_path / "ckpt_strategy_rank_0.ckpt").write_bytes(doc)
    with pytest.raises(CorruptCheckpointError, match=r"'layout.mesh.tp' must be an integer in \[1, 1048576\], got 0"):
        v1.read_strategy(tmp_path / "ckpt_strategy_rank_0.ckpt")


def test_hf_config_sizes_must_be_positive_integers(tmp_path: Path):
    (tmp_path / hf.CONFIG).write_text(json.dumps({"hidden_size": "64", "num_hidden_layers": 2}))
    with pytest.raises(CorruptCheckpointError, match=r"config.json: 'hidden_size' must be an integer in \[1, "):
        hf.read_hf_config(tmp_path)


# --------------------------------------------------------- never allocate from a number on disk


def test_an_empty_rank_999999999_folder_beside_rank_0_allocates_nothing(tmp_path: Path):
    root = tmp_path / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    write_file(root / "rank_0" / "q_rank_0-1_1.safetensors", [("w", torch.zeros(2))], {})
    (root / "rank_999999999").mkdir()
    tracemalloc.start()
    with pytest.raises(CorruptCheckpointError) as err:
        mindformers.select_legacy_files(root, "safetensors")
    with pytest.raises(CorruptCheckpointError):
        resolve_here(str(root), True, "safetensors", None, 0)  # our legacy resume takes the same rule
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value).startswith(f"{root} has 2 rank folders but the highest is rank_999999999: rank_1 is "
                                     "missing")
    assert peak < 16 << 20


def test_a_2mb_hostile_metadata_json_is_refused_in_seconds_not_minutes(it1: Path):
    """20000 listed chunks of one tensor, all but the last tiling it, the last overlapping the first:
    the pairwise check compared 2 * 10**8 pairs; sort and sweep takes well under a second."""
    n = 20_000
    chunks = [{"offsets": [i], "shape": [1], "stored": [{"file": MODEL, "key": f"w@{i}"}]} for i in range(n - 1)]
    chunks.append({"offsets": [0], "shape": [1], "stored": [{"file": MODEL, "key": "w@0"}]})
    files = {MODEL: {"size": 1, "xxh3_64": "0" * 16, "kind": "model", "rank": 0}}
    text = json.dumps({"format": v2.FORMAT, "format_version": 1, "iteration": 1, "layout": {"world_size": 1},
                       "files": files, "tensors": {"w": {"dtype": "float32", "shape": [n - 1], "kind": "model",
                                                         "chunks": chunks}}})
    assert len(text) > 2 << 20
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="tensor 'w' of shape"):
        v2.Metadata.from_json(text, it1 / "metadata.json")
    assert time.monotonic() - start < 5  # generous: a loaded 2-core machine; quadratic code takes minutes


def test_a_lock_file_of_deep_json_still_gives_a_locked_error(tmp_path: Path):
    from resumable.errors import LockedError
    from resumable.lock import LOCK_FILE, DirectoryLock

    with DirectoryLock(tmp_path):
        (tmp_path / LOCK_FILE).write_bytes(b"[" * 4096)  # json.loads of this raised RecursionError
        with pytest.raises(LockedError, match=r"is in use by another job \(holder unknown\)"):
            DirectoryLock(tmp_path).acquire()


@pytest.mark.parametrize("make", ["fifo", "deep"])
def test_discovery_skips_an_iteration_whose_metadata_is_a_fifo_or_nested_deep(it1: Path, make: str):
    (it1 / "metadata.json").unlink()
    if make == "fifo":
        os.mkfifo(it1 / "metadata.json")  # open() for reading would wait for a writer forever
    else:
        (it1 / "metadata.json").write_bytes(DEEP)
    assert not commit.is_committed(it1)
    assert commit.committed_iterations(it1.parent) == []


def test_a_legacy_global_shape_forged_to_ten_billion_is_refused_before_allocating(tmp_path: Path):
    from resumable.geometry import Box
    from resumable.legacy.files import RankFiles, fill

    (tmp_path / "rank_0").mkdir()
    write_file(tmp_path / "rank_0" / "q_rank_0-1_1.safetensors", [("w", torch.ones(2))], v1.file_metadata(
        {"w": ("w", [10**10], [0])}, rank=0, layout={"world_size": 1}, remove_redundancy=False,
        context={"state": {}, "rank_local": None}))
    files = RankFiles(tmp_path)
    meta = files.index(["rank_0/q_rank_0-1_1.safetensors"])
    with pytest.raises(CorruptCheckpointError, match="covers 2 of the 10000000000 elements"):
        fill(files, meta, "w", Box.full((10**10,)))  # 40 GB: never allocated


def test_a_forged_split_factor_is_refused_before_its_runs_are_enumerated(it1: Path):
    def edit(d: dict) -> None:  # 32 ranks, dim 0 cut 32 * 2**20 ways: minutes and GBs to enumerate
        d["layout"]["world_size"] = 32
        d["meshes"] = [{"shape": [32], "ranks_range": [0, 32, 1]}]
        d["tensors"]["w"].update(shape=[2**40], mesh=0, placements=[["SS", 0, 1 << 20]])
    _edit(it1 / "metadata.json", edit)
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="tensor 'w': its placements cut dim 0 into up to 33554432 runs, "
                                                     "more than 1024 per position of its mesh of 32"):
        v2.read_metadata(it1)
    assert time.monotonic() - start < 5


def test_a_tool_reading_a_forged_legacy_global_shape_allocates_nothing(tmp_path: Path):
    from resumable.sources import open_source

    root = tmp_path / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    write_file(root / "rank_0" / "q_rank_0-1_1.safetensors", [("w", torch.ones(2))], v1.file_metadata(
        {"w": ("w", [10**10], [0])}, rank=0, layout={"world_size": 1}, remove_redundancy=False,
        context={"state": {}, "rank_local": None}))
    source = open_source(root)
    with pytest.raises(CorruptCheckpointError, match="the chunks cover 2 of 10000000000 elements"):
        source.tensors["w"].read()  # merge and convert read whole tensors: 40 GB, never allocated


@pytest.mark.parametrize("make", ["fifo", "dev_zero"])
def test_the_legacy_prefetch_neither_blocks_on_a_fifo_nor_reads_dev_zero_forever(tmp_path: Path, make: str):
    from resumable.prefetch import Prefetch

    path = tmp_path / "q_rank_0-1_1.safetensors"
    os.mkfifo(path) if make == "fifo" else path.symlink_to("/dev/zero")
    prefetch = Prefetch(lambda: [path])
    prefetch._thread.join(timeout=30)
    assert not prefetch._thread.is_alive() and prefetch.bytes == 0
