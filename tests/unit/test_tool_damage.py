"""The checkpoint tools on damaged shards: one clean error naming the file, exit 2, no half-written output.

Every case writes a real checkpoint (ours, a HuggingFace folder, a legacy tree), damages
one shard on disk the way a crash, a bad disk or a broken copy does (truncated, garbage
in the header, a header length past the end, one flipped bit anywhere in the header),
then runs the commands as a user would (``resumable.cli.main``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import pytest
import torch

from resumable.cli import main
from resumable.errors import CheckpointError
from resumable.save import save
from resumable.sources import open_source


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(16, 8, generator=g), "b": torch.arange(3)},
            "optimizer": {"state": {"w": {"exp_avg": torch.randn(16, 8, generator=g), "step": torch.tensor(2.0)}}},
            "global_step": 2}


def _truncate(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _garbage_header(data: bytes) -> bytes:
    return data[:8] + b"\xff" * 32 + data[40:]


def _length_past_end(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncate, "garbage header": _garbage_header, "header length past the end": _length_past_end}


def _checkpoint(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """A checkpoint of ``fmt`` and the model shard to damage in it."""
    save(_state(), tmp_path / "ckpt", 2)
    if fmt == "v2":
        return tmp_path / "ckpt", tmp_path / "ckpt" / "iteration_00000002" / "CKP-model-0000000-0000001.safetensors"
    out = tmp_path / fmt
    to = "unified" if fmt == "hf" else "legacy"
    assert main(["convert", str(tmp_path / "ckpt"), str(out), "--to", to, "--quiet"]) == 0
    shard = next(out.rglob("*.safetensors"))
    return out, shard


def _commands(src: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {"merge": ["merge", str(src), str(tmp_path / "merged"), "--quiet"],
            "convert --to hf": ["convert", str(src), str(tmp_path / "hf-out"), "--to", "hf", "--quiet",
                                "--hf-config", str(tmp_path / "config.json")],
            "convert --to v2": ["convert", str(src), str(tmp_path / "v2-out"), "--to", "v2", "--quiet"],
            "convert --to legacy": ["convert", str(src), str(tmp_path / "legacy-out"), "--to", "legacy", "--quiet"],
            "split": ["split", str(src), str(tmp_path / "split-out"), "--layout", "dp=2", "--quiet"],
            "diff": ["diff", str(src), str(src)]}


@pytest.mark.parametrize("fmt", ["v2", "hf", "legacy"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_every_tool_names_the_damaged_shard_exits_1_and_writes_nothing(tmp_path, capsys, fmt, damage):
    src, shard = _checkpoint(tmp_path, fmt)
    (tmp_path / "config.json").write_text('{"model_type": "custom"}')  # no Qwen3: no shape check before the reads
    shard.write_bytes(DAMAGES[damage](shard.read_bytes()))
    capsys.readouterr()
    before = {p.name for p in tmp_path.iterdir()}
    for what, argv in _commands(src, tmp_path).items():
        assert main(argv) == 1, what
        err = capsys.readouterr().err
        assert err.startswith(f"resumable {argv[0]}: error: {shard}") and err.count("\n") == 1, (what, err)
        assert "safetensors file" in err and "restore it" in err or "not a readable" in err, (what, err)
    # No output folder, and no temp folder beside it: the failed reads happened before anything was published.
    after = {p.name for p in tmp_path.iterdir()}
    assert after - before <= {"v2-out", "legacy-out", "split-out"}, after - before
    for lock_only in after - before:  # the writers that lock their folder leave the (unlocked) lock file only
        assert sorted(p.name for p in (tmp_path / lock_only).rglob("*")) == [".lock"], lock_only


@pytest.mark.parametrize("fmt", ["v2", "hf"])
def test_inspect_of_a_damaged_shard_reports_or_names_it(tmp_path, capsys, fmt):
    """inspect reads what describes the tensors (metadata.json for v2, the headers otherwise): it either
    succeeds from the metadata or names the shard, never a traceback."""
    src, shard = _checkpoint(tmp_path, fmt)
    shard.write_bytes(_garbage_header(shard.read_bytes()))
    capsys.readouterr()
    code = main(["inspect", str(src)])
    err = capsys.readouterr().err
    if fmt == "v2":
        assert (code, err) == (0, "")
    else:
        assert code == 1 and err.startswith(f"resumable inspect: error: {shard}") and err.count("\n") == 1, err


@pytest.mark.parametrize("fmt", ["v2", "hf", "legacy"])
def test_one_flipped_bit_anywhere_in_a_header_is_a_named_error_or_reads_the_same_values(tmp_path, fmt):
    """Every bit position of the model shard's header flipped in turn (bit 0 and bit 5 of every byte):
    reading every tensor as the tools do gives a CheckpointError naming the file or succeeds, never
    another exception. For v2, whose metadata.json names every key, dtype and shape the header must
    hold, success also means the saved values (an HF header is its own index, so a flipped name
    there reads as another tensor: only a checksum over the header could tell)."""
    folder, shard = _checkpoint(tmp_path, fmt)
    good = shard.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    expected = {name: t.read() for name, t in open_source(folder).tensors.items()}
    other: list[tuple[int, int, str]] = []
    wrong: list[tuple[int, int]] = []
    for pos in range(8, 8 + n):
        for bit in (0x01, 0x20):
            data = bytearray(good)
            data[pos] ^= bit
            shard.write_bytes(bytes(data))
            try:
                values = {name: t.read() for name, t in open_source(folder).tensors.items()}
            except CheckpointError as exc:
                if shard.name not in str(exc):
                    other.append((pos, bit, f"names no file: {exc}"))
                continue
            except Exception as exc:  # the class this test is about: any other exception escapes
                other.append((pos, bit, f"{type(exc).__name__}: {exc}"))
                continue
            if values.keys() != expected.keys() or any(not torch.equal(values[k], expected[k]) for k in expected):
                wrong.append((pos, bit))
    assert not other, other[:5]
    if fmt == "v2":
        assert not wrong, wrong[:5]
