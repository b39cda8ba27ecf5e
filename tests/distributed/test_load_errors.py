"""Load refuses what it cannot load correctly, before touching the model, with messages naming what and where.

Single-process cases run in the test process (``load`` works without a process group);
the last test checks on 2 real gloo ranks that one rank's failure fails every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import resumable
from resumable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v2
from resumable.load import StateMismatchError, load
from tests.format1 import downgrade, sealed
from tests.launch import run_distributed


def _state(**overrides: torch.Tensor) -> dict:
    model = {"embed.weight": torch.arange(12.0).reshape(4, 3), "norm.weight": torch.ones(3),
             "head.weight": torch.full((2, 3), 2.0)}
    model.update(overrides)
    return {"model": model, "optimizer": {"state": {"norm.weight": {"exp_avg": torch.full((3,), 0.5)}}},
            "global_step": 7}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return resumable.save(_state(), tmp_path / "ckpt", 7)


def _zeros_like(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "optimizer": {"state": {"norm.weight": {"exp_avg": torch.zeros(3)}}}, "global_step": 0}


def test_a_plain_load_restores_tensors_and_values(folder: Path) -> None:
    target = _zeros_like(_state())
    result = load(target, folder)
    assert torch.equal(target["model"]["embed.weight"], torch.arange(12.0).reshape(4, 3))
    assert torch.equal(target["optimizer"]["state"]["norm.weight"]["exp_avg"], torch.full((3,), 0.5))
    assert (target["global_step"], result.iteration, result.tensors) == (7, 7, 4)
    assert result.bytes_read == 4 * (12 + 3 + 6 + 3)


def test_every_missing_name_and_every_shape_and_dtype_mismatch_is_reported_at_once(folder: Path) -> None:
    target = _zeros_like(_state())
    target["model"]["extra.a"] = torch.zeros(1)
    target["model"]["extra.b"] = torch.zeros(1)
    target["model"]["embed.weight"] = torch.zeros(5, 3)
    target["model"]["head.weight"] = torch.zeros(2, 3, dtype=torch.bfloat16)
    before = target["model"]["norm.weight"].clone()
    with pytest.raises(StateMismatchError) as info:
        load(target, folder)
    assert str(info.value) == "\n".join([
        f"the state does not match checkpoint {folder}:",
        "2 tensor(s) missing from the checkpoint: extra.a, extra.b",
        "embed.weight: shape [5, 3] in the state, [4, 3] in the checkpoint",
        "head.weight: dtype bfloat16 in the state, float32 in the checkpoint",
        "build the model with the architecture (and optimizer) the checkpoint was saved with",
    ])
    assert torch.equal(target["model"]["norm.weight"], before)  # nothing was touched


def test_a_truncated_file_fails_the_size_check_before_any_tensor_is_touched(folder: Path) -> None:
    victim = folder / "CKP-model-0000000-0000001.safetensors"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:-8])
    target = _zeros_like(_state())
    with pytest.raises(CorruptCheckpointError) as info:
        load(target, folder)
    assert str(info.value) == (
        f"{victim}: {size - 8} bytes on disk, files.json records {size}; the file is truncated or was "
        "replaced: restore it or load another iteration")
    assert not target["model"]["norm.weight"].any()


def test_a_flipped_byte_is_caught_only_with_verify_checksum(folder: Path) -> None:
    victim = folder / "CKP-model-0000000-0000001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    victim.write_bytes(bytes(data))
    load(_zeros_like(_state()), folder, verify="size")  # same size: not seen
    recorded = v2.read_metadata(folder).files[victim.name].xxh3_64
    with pytest.raises(CorruptCheckpointError) as info:
        load(_zeros_like(_state()), folder, verify="checksum")
    import xxhash
    actual = xxhash.xxh3_64(bytes(data)).hexdigest()
    assert str(info.value) == (
        f"{victim}: xxh3-64 checksum {actual} differs from {recorded} recorded in files.json; the file is "
        "damaged: restore it or load another iteration")


def test_a_missing_file_is_named(folder: Path) -> None:
    victim = folder / "CKP-opt-0000000-0000001.safetensors"
    victim.unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"^{victim}: missing; files.json lists it with \d+ bytes"):
        load(_zeros_like(_state()), folder)


def _edit_metadata(folder: Path, edit) -> None:
    path = folder / "metadata.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(sealed(doc))  # resealed: the checks past the seal are what is tested


def test_a_dtype_in_the_file_differing_from_metadata_is_refused(folder: Path) -> None:
    def to_f16(doc: dict) -> None:
        doc["tensors"]["norm.weight"]["dtype"] = "float16"
    _edit_metadata(folder, to_f16)
    target = _zeros_like(_state())
    target["model"]["norm.weight"] = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(CorruptCheckpointError) as info:
        load(target, folder)
    assert str(info.value) == (
        f"{folder / 'CKP-model-0000000-0000001.safetensors'}: key 'norm.weight' is F32 of shape [3] in the file "
        "but metadata.json records F16 of shape [3]; the file and the metadata disagree: restore the file or "
        "rebuild metadata.json")


def test_a_file_name_leaving_the_folder_is_refused(folder: Path) -> None:
    downgrade(folder)  # format version 1 lists file names inline, where a forger edits them

    def escape(doc: dict) -> None:
        doc["files"]["../../etc/passwd"] = doc["files"].pop("CKP-model-0000000-0000001.safetensors")
    _edit_metadata(folder, escape)
    with pytest.raises(UnsafeCheckpointError, match=r"file name '\.\./\.\./etc/passwd' is not a bare file name"):
        load(_zeros_like(_state()), folder)


def _one_rank_lacks_a_name(rank: int, world: int, folder: str) -> str:
    target = _zeros_like(_state())
    if rank == 1:
        target["model"]["only.on.rank1"] = torch.zeros(1)
    try:
        load(target, folder)
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def test_one_rank_failing_fails_every_rank_with_its_message(folder: Path) -> None:
    results = run_distributed(_one_rank_lacks_a_name, 2, str(folder))
    detail = (f"the state does not match checkpoint {folder}:\n1 tensor(s) missing from the checkpoint: "
              "only.on.rank1\nbuild the model with the architecture (and optimizer) the checkpoint was saved with")
    assert results == [f"StateMismatchError: rank 1 failed: {detail}", f"StateMismatchError: {detail}"]



def _balanced_load_of_a_file_cut_after_its_header_check(rank: int, world: int, folder: str) -> str:
    """The model file loses its last bytes after the header checks agreed (another job
    overwriting it, say): only the read itself can notice."""
    import resumable.balanced as balanced

    real, calls = balanced.agree_on, []

    def agree_then_cut(err: BaseException | None, group: object) -> None:
        real(err, group)
        calls.append(err)
        if len(calls) == 1:  # after the header agreement, before any read
            if rank == 0:
                victim = Path(folder) / "CKP-model-0000000-0000001.safetensors"
                victim.write_bytes(victim.read_bytes()[:-8])
            real(None, group)  # every rank waits for the cut (the same extra step on each)
    balanced.agree_on = agree_then_cut
    try:
        load(_zeros_like(_state()), folder, balanced=True, verify="none")
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def test_a_read_failing_in_a_balanced_load_fails_every_rank_before_any_send(folder: Path) -> None:
    results = run_distributed(_balanced_load_of_a_file_cut_after_its_header_check, 2, str(folder))
    victim = folder / "CKP-model-0000000-0000001.safetensors"
    assert len(results) == 2, results
    for r in results:  # its own error or its peer's ("rank N failed: ..."); neither waits on a message
        assert r.startswith("CorruptCheckpointError: ") and f"{victim}: file ends at byte" in r, r


def test_a_saved_tensor_the_state_has_no_place_for_is_an_error_unless_excluded(folder: Path) -> None:
    # E.g. resuming with tie_word_embeddings flipped: the saved head would be dropped silently.
    target = _zeros_like(_state())
    del target["model"]["head.weight"]
    with pytest.raises(StateMismatchError) as info:
        load(target, folder)
    assert str(info.value) == (
        f"checkpoint {folder} holds 1 tensor(s) the state has no place for on any rank: head.weight; they would be "
        "dropped silently. Build the model with the architecture it was saved with (e.g. the same "
        "tie_word_embeddings), or leave them out on purpose with exclude_from_loading")
    assert torch.equal(target["model"]["norm.weight"], torch.zeros(3))  # refused before any tensor is touched
    load(target, folder, exclude_from_loading=["head"])  # a dotted prefix
    assert torch.equal(target["model"]["norm.weight"], torch.ones(3))
    # A weights-only state leaves the optimizer's tensors aside on purpose.
    load({"model": _zeros_like(_state())["model"]}, folder)


def _stages(rank: int, world: int, folder: str, drop_head: bool) -> str:
    """Each rank holds the tensors of its own pipeline stage (norm on both)."""
    model = _zeros_like(_state())["model"]
    if rank == 0 or drop_head:
        del model["head.weight"]
    if rank == 1:
        del model["embed.weight"]
    try:
        load({"model": model}, folder)
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


@pytest.mark.parametrize("drop_head", [False, True])
def test_tensors_split_across_pipeline_stages_count_as_used_by_any_rank(folder: Path, drop_head: bool) -> None:
    results = run_distributed(_stages, 2, str(folder), drop_head)
    if not drop_head:
        assert results == ["loaded", "loaded"]
    else:
        assert results == [f"StateMismatchError: checkpoint {folder} holds 1 tensor(s) the state has no place for "
                           "on any rank: head.weight; they would be dropped silently. Build the model with the "
                           "architecture it was saved with (e.g. the same tie_word_embeddings), or leave them out "
                           "on purpose with exclude_from_loading"] * 2
