"""metadata.json carries a seal of its own bytes and vouches for common.json (format version 3).

A real checkpoint (iterations 2 and 4, the tracker naming 4), one bit flipped in a JSON
file of iteration 4, then what a user runs: ``load``, ``resumable verify``, and the
resume resolution (``fallback=True``), which must skip to iteration 2 saying why.
Checkpoints of format versions 1 and 2 (no seals) still load.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
import xxhash

import resumable
from resumable.cli import main as cli
from resumable.errors import CorruptCheckpointError
from resumable.formats import v2
from resumable.resolve import resolve_checkpoint
from tests.format1 import downgrade, downgrade_to_2


def _state(value: float) -> dict:
    return {"model": {"layers.0.weight": torch.full((4, 4), value)}, "global_step": int(value)}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    for it in (2, 4):
        resumable.save(_state(float(it)), tmp_path / "checkpoint", it)
    return tmp_path / "checkpoint"


def _flip_bit_in(path: Path, text: str) -> None:
    """Flip the lowest bit of the first byte of ``text`` in ``path`` ('l' → 'm', 'g' → 'f': still valid JSON)."""
    data = bytearray(path.read_bytes())
    at = data.index(text.encode())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _verify(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["verify", str(path)])
    return code, out.getvalue()


def test_a_flipped_bit_in_a_tensor_name_is_damage_to_metadata_json_not_an_architecture_mismatch(ckpt: Path,
                                                                                                 caplog) -> None:
    it4 = ckpt / "iteration_00000004"
    _flip_bit_in(it4 / v2.METADATA, "layers.0.weight")  # "layers.0" -> "layers.1": still parses, still tiles
    body = (it4 / v2.METADATA).read_bytes().rsplit(b',"seal"', 1)[0]
    recorded = json.loads((it4 / v2.METADATA).read_bytes())["seal"].removeprefix("xxh3_64:")
    expected = (f"{it4 / v2.METADATA}: its seal records xxh3-64 {recorded} but its bytes hash to "
                f"{xxhash.xxh3_64_hexdigest(body)}; the file is damaged: restore it, rebuild it from the files "
                "(resumable.formats.v2.rebuild_metadata) or load another iteration (resume_training: true falls "
                "back to the newest valid one)")
    _refused_by_load_verify_and_resume(ckpt, expected, caplog)


def test_a_flipped_bit_in_a_common_json_key_is_damage_found_by_load_verify_and_resume(ckpt: Path, caplog) -> None:
    it4 = ckpt / "iteration_00000004"
    recorded = v2.read_metadata(it4).common
    _flip_bit_in(it4 / v2.COMMON, "global_step")  # 'flobal_step': still JSON, the step is gone
    data = (it4 / v2.COMMON).read_bytes()
    assert json.loads(data).get("global_step") is None
    expected = (f"{it4 / v2.COMMON}: {len(data)} bytes with xxh3-64 {xxhash.xxh3_64_hexdigest(data)}, but "
                f"metadata.json records {recorded.size} bytes with {recorded.xxh3_64}; the file is damaged or comes "
                "from another iteration: restore it or load another iteration (resume_training: true falls back to "
                "the newest valid one)")
    with pytest.raises(CorruptCheckpointError) as info:
        v2.read_common(it4)  # without the parsed metadata: the record is read from metadata.json
    assert str(info.value) == expected
    _refused_by_load_verify_and_resume(ckpt, expected, caplog)


def test_a_common_json_from_another_iteration_is_refused(ckpt: Path) -> None:
    it2, it4 = ckpt / "iteration_00000002", ckpt / "iteration_00000004"
    (it4 / v2.COMMON).write_bytes((it2 / v2.COMMON).read_bytes())  # whole and valid, but not this iteration's
    with pytest.raises(CorruptCheckpointError, match="comes from another iteration"):
        v2.read_common(it4, v2.read_metadata(it4))


def test_metadata_json_of_format_version_3_without_its_seal_is_damaged(ckpt: Path) -> None:
    it4 = ckpt / "iteration_00000004"
    doc = json.loads((it4 / v2.METADATA).read_bytes())
    del doc["seal"]
    (it4 / v2.METADATA).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=r"format_version 3 ends with a seal .*, this file does not"):
        v2.read_metadata(it4)


@pytest.mark.parametrize("older", [downgrade, downgrade_to_2], ids=["version 1", "version 2"])
def test_checkpoints_of_format_versions_1_and_2_still_load(ckpt: Path, older) -> None:
    it4 = ckpt / "iteration_00000004"
    assert older(it4)["format_version"] in (1, 2)
    target = {"model": {"layers.0.weight": torch.zeros(4, 4)}, "global_step": 0}
    result = resumable.load(target, it4, verify="checksum")
    assert torch.equal(target["model"]["layers.0.weight"], torch.full((4, 4), 4.0)) and result.common["global_step"] == 4
    assert resolve_checkpoint(ckpt, fallback=True).path == it4


def test_rebuilt_metadata_is_sealed_and_records_common_json(ckpt: Path) -> None:
    it4 = ckpt / "iteration_00000004"
    before = (it4 / v2.METADATA).read_text()
    (it4 / v2.METADATA).unlink()
    (it4 / v2.METADATA).write_text(v2.rebuild_metadata(it4).to_json())
    meta = v2.read_metadata(it4)
    assert meta.format_version == 3 and meta.common == v2.Seal.of((it4 / v2.COMMON).read_bytes())
    assert json.loads(before)["common"] == json.loads((it4 / v2.METADATA).read_text())["common"]
    target = {"model": {"layers.0.weight": torch.zeros(4, 4)}, "global_step": 0}
    assert resumable.load(target, it4).common["global_step"] == 4


def test_an_async_save_writes_sealed_metadata_and_block_checksums(tmp_path: Path) -> None:
    from resumable.formats import safetensors_io as sio
    folder = resumable.async_save(_state(3.0), tmp_path / "checkpoint", 3).wait()
    meta = v2.read_metadata(folder)
    assert meta.format_version == 3 and meta.common == v2.Seal.of((folder / v2.COMMON).read_bytes())
    assert v2.check_seal((folder / v2.METADATA).read_bytes(), "metadata.json")
    for name in meta.files:
        digests = sio.block_digests(sio.read_header(folder / name))
        assert digests is not None and set(digests) == set(sio.read_header(folder / name).tensors)


def _refused_by_load_verify_and_resume(ckpt: Path, expected: str, caplog) -> None:
    """Iteration 4's damage is ``expected`` for load and verify; a resume falls back to iteration 2."""
    with pytest.raises(CorruptCheckpointError) as info:
        resumable.load({"model": {"layers.0.weight": torch.zeros(4, 4)}}, ckpt)
    assert str(info.value) == expected
    code, out = _verify(ckpt)
    assert code == 1 and f"PROBLEM {expected}" in out
    with caplog.at_level(logging.WARNING, logger="resumable.resolve"):
        r = resolve_checkpoint(ckpt, fallback=True)
    assert r.path == ckpt / "iteration_00000002" and expected in caplog.text
