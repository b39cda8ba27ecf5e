"""Fuzzing every parser of checkpoint-side files: success, or a CheckpointError naming the file; bounded.

Each parser gets real valid input written by the project's own writers (a saved
Checkpoint 2.0 iteration in format versions 1, 2 and 3, its common.json, a tracker, a
legacy meta.json, a strategy file, a legacy rank file's safetensors bytes, a HuggingFace
config and index, a MindSpore ``.ckpt`` protobuf, a torch-zip ``.ckpt``, a MindFormers
metadata.json), mutated by
hypothesis: bit flips, truncation, splices of random bytes or of the input itself, deep
nesting, huge or wrongly typed numbers. A sealed JSON file is sealed again after the
mutation (as a forger would), so the damage reaches the parser instead of stopping at the seal.

Every example must end in success or in a ``CheckpointError`` (``ConfigError`` /
``NotImplementedYet`` where a parser documents them) whose message names the file; any
other exception fails. Time is bounded per example; memory by ``RLIMIT_AS`` (the address
space in use plus 2 GiB) while the examples run, so an allocation from a forged number
fails as ``MemoryError`` instead of passing unnoticed. Derandomized: CI runs the same
examples every time; ``make test`` spends well under a minute here.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resumable
from resumable import commit
from resumable.errors import CheckpointError, ConfigError, NotImplementedYet
from resumable.formats import hf, mindformers, ms_ckpt, v1, v2
from resumable.formats.safetensors_io import block_digests, read_header, write_file
from resumable.legacy import strategy as legacy_strategy
from resumable.sources import open_source
from tests.fixtures.mindformers import build_v2
from tests.format1 import downgrade, downgrade_to_2

EXAMPLES = 200
SECONDS_PER_EXAMPLE = 10  # generous: six test runs share two cores; a hang or a quadratic path takes minutes
HEADROOM = 2 << 30
MODEL = "CKP-model-0000000-0000001.safetensors"
_VALUE_START = re.compile(rb"[:,\[]")
_SEAL = re.compile(rb',"seal":"xxh3_64:[0-9a-f]{16}"\}\s*$')


# ------------------------------------------------------------------------------ mutations


def _digits(n: int) -> bytes:
    return b"9" * n


_REPLACEMENTS = [b"[1]", b"1e400", b'"abc"', b"-1", b"true", b"null", b"NaN", b"Infinity", _digits(5000),
                 _digits(19), b"0", b"{}", b"[]", b"1.5", b"-0", b"\x00", b'"\\ud800"']


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one to three mutations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "self", "nest", "number", "delete"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[at:]
        elif kind == "splice":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "self":  # a piece of the input elsewhere: duplicated keys, shifted structure
            length = draw(st.integers(1, 64))
            out[at:at] = out[draw(st.integers(0, max(len(out) - 1, 0))):][:length]
        elif kind == "nest":  # where a value starts (after ``:``, ``,`` or ``[``), so the parser descends into it
            depth = draw(st.sampled_from([70, 1000, 200_000]))
            m = _VALUE_START.search(bytes(out), at)
            at = m.end() if m else at
            out[at:at] = b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
        elif kind == "number":  # replace the run of digits at or after ``at`` by a hostile value
            m = re.compile(rb"-?[0-9]+").search(bytes(out), at)
            if m:
                out[m.start():m.end()] = draw(st.sampled_from(_REPLACEMENTS))
        elif kind == "delete" and out:
            del out[at:at + draw(st.integers(1, 32))]
    return bytes(out)


def resealed(raw: bytes) -> bytes:
    """A metadata.json body sealed again after its mutation (a forger recomputes the seal)."""
    m = _SEAL.search(raw)
    body = raw[:m.start()] if m else raw.rstrip(b"}")
    return body + b',"seal":"xxh3_64:' + xxhash.xxh3_64_hexdigest(body).encode() + b'"}'


# ------------------------------------------------------------------------- valid inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
             "optimizer": {"state": {"w": {"exp_avg": torch.zeros(3, 4)}}}, "global_step": 7,
             "lr_schedule": {"last": 3}, "rank_local": [1, 2]}
    resumable.save(state, root / "ckpt", 7)
    it = root / "ckpt" / "iteration_00000007"
    out = {"metadata v3": (it / v2.METADATA).read_bytes(), "files.json": (it / v2.FILES).read_bytes(),
           "common.json": (it / v2.COMMON).read_bytes(), "safetensors": (it / MODEL).read_bytes(),
           "tracker": (root / "ckpt" / commit.TRACKER).read_bytes()}
    v2_copy = root / "v2"
    shutil.copytree(it, v2_copy)
    downgrade_to_2(v2_copy)
    out["metadata v2"] = (v2_copy / v2.METADATA).read_bytes()
    v1_copy = root / "v1"
    shutil.copytree(it, v1_copy)
    downgrade(v1_copy)
    out["metadata v1"] = (v1_copy / v2.METADATA).read_bytes()
    out["legacy meta.json"] = v1.meta_bytes(1, 2, "q_rank_0-1_2.safetensors",
                                            {"q_rank_0-1_2.safetensors": (456, "0123456789abcdef")})
    out["mindformers meta.json"] = json.dumps({"last_epoch": 1, "last_step": 2,
                                               "last_ckpt_file": "q_rank_0-1_2.safetensors"}).encode()
    strategy = json.loads(v1.strategy_doc(
        rank=1, world_size=4, layout={"mesh": {"dp": 2, "tp": 2}, "pipeline_stages": 1},
        remove_redundancy=False, tensors={"w": {
            "dtype": "float32", "global_shape": [4, 6], "kind": "model",
            "mesh": {"dim_names": ["dp", "tp"], "shape": [2, 2], "coordinate": [0, 1]},
            "placements": [["R"], ["S", 0]],
            "chunks": [{"offsets": [2, 0], "shape": [2, 6], "local": [[0, 2], [0, 6]], "stored": True}]}}))
    strategy.pop("seal")  # unsealed (as before seals): the mutations reach the checks
    out["strategy"] = json.dumps(strategy).encode()
    legacy = root / "legacy.safetensors"
    write_file(legacy, [("w", torch.ones(2, 3)), ("w@2,0", torch.zeros(2, 3))], v1.file_metadata(
        {"w": ("w", [4, 3], [0, 0]), "w@2,0": ("w", [4, 3], [2, 0])}, rank=0,
        layout={"world_size": 1, "mesh": None, "pipeline_stages": 1}, remove_redundancy=False,
        context={"state": {"global_step": 3, "x": float("nan")}, "rank_local": None}))
    out["legacy safetensors"] = legacy.read_bytes()
    hf_dir = root / "hf"
    specs = [("a", torch.float32, (2, 2)), ("b", torch.float32, (3,))]
    tensors = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    hf.write_hf_folder(hf_dir, {"hidden_size": 64, "num_hidden_layers": 2, "rope_theta": 1e6}, specs,
                       tensors.__getitem__, max_shard_size=8)
    out["hf config"] = (hf_dir / hf.CONFIG).read_bytes()
    out["hf index"] = (hf_dir / hf.INDEX).read_bytes()
    out["hf shards"] = b"".join(p.name.encode() + b"\n" for p in sorted(hf_dir.glob("*.safetensors")))
    out["_hf_dir"] = str(hf_dir).encode()
    v1.save_ckpt(root / "rank.ckpt", {"w": torch.ones(2, 3)}, {"format": "pt"})
    out["torch ckpt"] = (root / "rank.ckpt").read_bytes()
    ms_ckpt.write_ms_ckpt(root / "net.ckpt", {"fc.weight": torch.ones(2, 3), "step": torch.tensor([3])})
    out["ms ckpt"] = (root / "net.ckpt").read_bytes()
    torch.save({"model": {"fc": {"weight": torch.ones(2, 3)}}, "epoch": 2, "opt": [{"lr": 0.1, "betas": (0.9, 0.9)}]},
               root / "script.pt")
    out["pytorch file"] = (root / "script.pt").read_bytes()
    mf = build_v2(root / "mf", 5, {"decoder.final_layernorm.weight": torch.ones(4)}, dp=2)
    out["mindformers metadata"] = (mf / "metadata.json").read_bytes()
    out["_v2_dir"] = str(it).encode()
    out["_mf_dir"] = str(mf).encode()
    return out


# ------------------------------------------------------------------------------- parsers


def _folder_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _parse_metadata(folder: Path, raw: bytes, files: bytes | None) -> None:
    (folder / v2.METADATA).write_bytes(raw)
    if files is None:
        (folder / v2.FILES).unlink(missing_ok=True)
    else:
        (folder / v2.FILES).write_bytes(files)
    v2.read_metadata(folder)


def _parse_header(folder: Path, raw: bytes) -> None:
    path = folder / MODEL
    path.write_bytes(raw)
    try:
        header = read_header(path)
        block_digests(header)
        if v1.META_KEY in header.metadata:
            v1.parse_file_metadata(header.metadata, path)
    finally:
        hf.safetensors_header(path)  # the library's own parser, through our checks


def _rebuild(folder: Path, raw: bytes) -> None:
    (folder / MODEL).write_bytes(raw)
    v2.rebuild_metadata(folder)


def _strategy(folder: Path, raw: bytes) -> None:
    path = folder / "ckpt_strategy_rank_1.ckpt"
    path.write_bytes(raw)
    doc = v1.read_strategy(path)
    for rank in range(min(doc["world_size"], 8)):
        legacy_strategy._derived_boxes(doc, rank, str(path))  # what check_strategy computes from the numbers read


def _torch_ckpt(folder: Path, raw: bytes) -> None:
    path = folder / "q_rank_0-1_1.ckpt"
    path.write_bytes(raw)
    tensors, _ = v1.load_ckpt(path)
    for t in tensors.values():
        t.sum()  # the mapped bytes are read


def _ms(folder: Path, raw: bytes) -> None:
    path = folder / "net.ckpt"
    path.write_bytes(raw)
    ms_ckpt.load_ms_ckpt(path)


def _single_file(folder: Path, raw: bytes, name: str) -> None:
    """A file given alone to open_source (its kind detected from its bytes), every tensor read."""
    source = open_source(_write(folder / name, raw))
    for t in source.tensors.values():
        t.read()


def _hf(folder: Path, raw: bytes, name: str, inputs: dict[str, bytes]) -> None:
    hf_dir = _folder_copy(Path(inputs["_hf_dir"].decode()), folder / "hf")
    (hf_dir / name).write_bytes(raw)
    hf.read_hf_config(hf_dir) if name == hf.CONFIG else hf.index_hf_folder(hf_dir)


def _mindformers(folder: Path, raw: bytes, inputs: dict[str, bytes]) -> None:
    mf = _folder_copy(Path(inputs["_mf_dir"].decode()), folder / "iteration_00000005")
    (mf / "metadata.json").write_bytes(raw)
    mindformers.read_mf_checkpoint(mf)


def _common(folder: Path, raw: bytes) -> None:
    (folder / v2.COMMON).write_bytes(raw)
    v2.read_common(folder)  # no metadata.json here: nothing records its checksum, so its values are parsed


def _tracker(folder: Path, raw: bytes) -> None:
    (folder / commit.TRACKER).write_bytes(raw)
    try:
        commit.read_tracker(folder)
    finally:
        mindformers.resolve_mf_iteration(folder)


def _legacy_meta(folder: Path, raw: bytes) -> None:
    (folder / v1.META_JSON).write_bytes(raw)
    try:
        v1.read_meta(folder)
    finally:
        mindformers._meta_position(folder)


# ------------------------------------------------------------------------------ harness


@pytest.fixture
def address_space_capped() -> Iterator[None]:
    """RLIMIT_AS at the address space in use plus HEADROOM while the examples run (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith("VmSize:"))
    cap = vm + HEADROOM if hard == resource.RLIM_INFINITY else min(vm + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


ALLOWED = (CheckpointError, ConfigError, NotImplementedYet)


def _check(run: Callable[[], None], where: Path) -> None:
    start = time.monotonic()
    try:
        run()
    except ALLOWED as exc:
        assert str(where) in str(exc), f"{type(exc).__name__} names no file under {where}: {exc}"
    assert time.monotonic() - start < SECONDS_PER_EXAMPLE


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


CASES = ["metadata v1", "metadata v2", "metadata v3", "common.json", "tracker", "legacy meta.json",
         "mindformers meta.json", "strategy", "safetensors", "legacy safetensors", "rebuild", "hf config",
         "hf index", "ms ckpt", "torch ckpt", "mindformers metadata", "single ms file", "pytorch file"]


@pytest.mark.parametrize("case", CASES)
@FUZZ
@given(data=st.data())
def test_every_parser_succeeds_or_names_the_file(case: str, data: st.DataObject, inputs: dict[str, bytes],
                                                 tmp_path: Path, address_space_capped: None) -> None:
    folder = _folder_copy(Path(inputs["_v2_dir"].decode()), tmp_path / "case")  # the saved iteration's files
    key = {"rebuild": "safetensors", "single ms file": "ms ckpt"}.get(case, case)
    raw = data.draw(mutated(inputs[key]), label="mutated")
    if case == "metadata v3" and data.draw(st.booleans(), label="resealed"):
        raw = resealed(raw)
    runs: dict[str, Callable[[], None]] = {
        "metadata v1": lambda: _parse_metadata(folder, raw, None),
        "metadata v2": lambda: _parse_metadata(folder, raw, inputs["files.json"]),
        "metadata v3": lambda: _parse_metadata(folder, raw, inputs["files.json"]),
        "common.json": lambda: _common(folder, raw),
        "tracker": lambda: _tracker(folder, raw),
        "legacy meta.json": lambda: _legacy_meta(folder, raw),
        "mindformers meta.json": lambda: _legacy_meta(folder, raw),
        "strategy": lambda: _strategy(folder, raw),
        "safetensors": lambda: _parse_header(folder, raw),
        "legacy safetensors": lambda: _parse_header(folder, raw),
        "rebuild": lambda: _rebuild(folder, raw),
        "hf config": lambda: _hf(folder, raw, hf.CONFIG, inputs),
        "hf index": lambda: _hf(folder, raw, hf.INDEX, inputs),
        "ms ckpt": lambda: _ms(folder, raw),
        "torch ckpt": lambda: _torch_ckpt(folder, raw),
        "mindformers metadata": lambda: _mindformers(folder, raw, inputs),
        "single ms file": lambda: _single_file(folder, raw, "net.ckpt"),
        "pytorch file": lambda: _single_file(folder, raw, "script.pt"),
    }
    _check(runs[case], folder)


def test_the_mutations_reach_the_parsers(inputs: dict[str, bytes], tmp_path: Path) -> None:
    """The unmutated inputs parse: the fuzz starts from valid files, so its failures are the mutations'."""
    folder = tmp_path / "ok"
    folder.mkdir()
    (folder / "common.json").write_bytes(inputs["common.json"])
    assert v2.read_common(folder)["global_step"] == 7
    assert v1.read_strategy(_write(folder / "s.ckpt", inputs["strategy"]))["world_size"] == 4
    assert read_header(_write(folder / MODEL, inputs["legacy safetensors"])).metadata[v1.META_KEY]
    assert ms_ckpt.index_ms_ckpt(_write(folder / "n.ckpt", inputs["ms ckpt"]))["fc.weight"].shape == (2, 3)
    assert open_source(_write(folder / "s.pt", inputs["pytorch file"])).tensors["fc.weight"].shape == (2, 3)
    assert resealed(inputs["metadata v3"]) == inputs["metadata v3"]
    assert struct.unpack("<Q", inputs["safetensors"][:8])[0] < len(inputs["safetensors"])


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path
