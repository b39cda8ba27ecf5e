"""MindFormers checkpoints (2.0 and legacy) parsed into chunks that reassemble the original tensors exactly."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet, UnsafeCheckpointError
from resumable.formats.mindformers import (
    TRACKER,
    ForeignChunk,
    LegacyFile,
    TrainingContext,
    parse_legacy_name,
    read_chunk,
    read_mf_checkpoint,
    read_mf_legacy,
    read_tensor,
    resolve_mf_iteration,
)
from resumable.models.qwen3 import mf_to_hf
from resumable.geometry import Box
from tests.fixtures.mindformers import HEADS, build_legacy, build_v2, hf_state, legacy_state, mf_state

SEED = 5


def _assert_reassembles(ckpt, expected: dict[str, torch.Tensor]) -> None:
    assert ckpt.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        got = ckpt.tensors[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tuple(tensor.shape)), name
        assert torch.equal(read_tensor(got), tensor), name
        for chunk in got.chunks:  # every replica holds the same values
            assert torch.equal(read_chunk(chunk), tensor[chunk.box.slices_in(Box.full(tensor.shape))]), name


# ---------------------------------------------------------------- Checkpoint 2.0


@pytest.mark.parametrize(("dp", "mp"), [(1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("remove_redundancy", [False, True])
@pytest.mark.parametrize("prefix", ["", "qwen3"])
def test_v2_with_metadata_reassembles_every_tensor(tmp_path, dp, mp, remove_redundancy, prefix):
    state = mf_state(SEED)
    build_v2(tmp_path, 200, state, dp=dp, mp=mp, prefix=prefix, remove_redundancy=remove_redundancy)
    ckpt = read_mf_checkpoint(resolve_mf_iteration(tmp_path))
    assert (ckpt.path, ckpt.iteration) == (tmp_path / "iteration_00000200", 200)
    assert ckpt.context == TrainingContext(global_step=200, epoch=1, step=200, global_batch_size=8)
    _assert_reassembles(ckpt, state)
    norm = ckpt.tensors["decoder.final_layernorm.weight"]  # replicated on every rank
    assert [c.box for c in norm.chunks] == [Box((0,), (16,))] * (1 if remove_redundancy else dp * mp)


def test_v2_files_are_what_mindformers_writes(tmp_path):
    folder = build_v2(tmp_path, 7, mf_state(SEED), dp=1, mp=2)
    assert (tmp_path / TRACKER).read_bytes() == b"7"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["common.json", "metadata.json", "model-0000000-0000002.safetensors",
                     "model-0000001-0000002.safetensors", "opt-0000000-0000002.safetensors",
                     "opt-0000001-0000002.safetensors"]
    model_file = folder / "model-0000001-0000002.safetensors"
    assert stat.S_IMODE(model_file.stat().st_mode) == 0o400
    with safe_open(model_file, framework="pt") as f:
        assert f.metadata() == {"format": "ms"}


def test_v2_pieces_become_element_offsets_in_row_major_order(tmp_path):
    build_v2(tmp_path, 1, mf_state(SEED), dp=2, mp=2)
    ckpt = read_mf_checkpoint(tmp_path / "iteration_00000001")
    proj = ckpt.tensors["adam_m.decoder.layers.0.self_attention.linear_proj.weight"]  # [16, 32], tensor_map [1, 0]
    assert [(c.box, c.file.name, c.key) for c in proj.chunks] == [
        (Box((0, 0), (8, 16)), "opt-0000000-0000004.safetensors", proj.name),
        (Box((0, 16), (8, 16)), "opt-0000001-0000004.safetensors", proj.name),
        (Box((8, 0), (8, 16)), "opt-0000002-0000004.safetensors", proj.name),
        (Box((8, 16), (8, 16)), "opt-0000003-0000004.safetensors", proj.name),
    ]
    qkv = ckpt.tensors["decoder.layers.1.self_attention.linear_qkv.weight"]  # [64, 16], rows over mp, dp replicas
    assert [(c.box.offsets, c.file.name) for c in qkv.chunks] == [
        ((0, 0), "model-0000000-0000004.safetensors"), ((0, 0), "model-0000002-0000004.safetensors"),
        ((32, 0), "model-0000001-0000004.safetensors"), ((32, 0), "model-0000003-0000004.safetensors"),
    ]


def test_v2_without_axis_fragmentations_uses_the_tensor_map(tmp_path):
    state = mf_state(SEED)
    build_v2(tmp_path, 3, state, dp=2, mp=2, fragmentations=False, rank_group=False)
    _assert_reassembles(read_mf_checkpoint(tmp_path / "iteration_00000003"), state)


def test_v2_single_rank_without_metadata_is_one_full_chunk_per_tensor(tmp_path):
    state = mf_state(SEED)
    folder = build_v2(tmp_path, 4, state, prefix="tiny")
    assert not (folder / "metadata.json").exists()
    ckpt = read_mf_checkpoint(folder)
    _assert_reassembles(ckpt, state)
    assert all(len(t.chunks) == 1 and t.chunks[0].box == Box.full(t.shape) for t in ckpt.tensors.values())
    assert ckpt.tensors["learning_rate"].chunks[0].file.name == "tiny-opt-0000000-0000001.safetensors"


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_v2_tensors_map_onto_huggingface_names_and_values(tmp_path, optimizer):
    build_v2(tmp_path, 9, mf_state(SEED, optimizer=optimizer), dp=2, mp=2)
    ckpt = read_mf_checkpoint(tmp_path / "iteration_00000009")
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.tensors.items():
        hf.update(mf_to_hf(name, read_tensor(tensor), HEADS))
    expected = hf_state(SEED)
    assert hf.keys() == expected.keys()
    assert all(torch.equal(hf[n], expected[n]) for n in expected)


def test_v2_context_keeps_consumed_samples_and_loss_scale(tmp_path):
    common = {"epoch_num": 2, "step_num": 5, "global_step": 30, "loss_scale": 65536.0,
              "global_batch_size": 16, "ckpt_status": 1, "consumed_samples": 480}
    build_v2(tmp_path, 30, mf_state(SEED), common=common)
    assert read_mf_checkpoint(tmp_path / "iteration_00000030").context == TrainingContext(
        global_step=30, epoch=2, step=5, consumed_samples=480, global_batch_size=16, loss_scale=65536.0)


def test_read_chunk_reads_a_region_in_global_coordinates(tmp_path):
    state = mf_state(SEED)
    build_v2(tmp_path, 1, state, dp=1, mp=2)
    fc1 = read_mf_checkpoint(tmp_path / "iteration_00000001").tensors["decoder.layers.0.mlp.linear_fc1.weight"]
    second = next(c for c in fc1.chunks if c.box.offsets == (24, 0))
    assert torch.equal(read_chunk(second, Box((30, 2), (4, 3))), state[fc1.name][30:34, 2:5])
    with pytest.raises(ValueError, match=re.escape("is not inside")):
        read_chunk(second, Box((0, 0), (4, 3)))


@pytest.mark.parametrize(("content", "iteration"), [("100", 100), ("100\n", 100), (" 7 \n", 7)])
def test_tracker_is_a_bare_integer(tmp_path, content, iteration):
    (tmp_path / f"iteration_{iteration:08d}").mkdir()
    (tmp_path / TRACKER).write_text(content)
    assert resolve_mf_iteration(tmp_path) == tmp_path / f"iteration_{iteration:08d}"


def test_tracker_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{tmp_path / TRACKER} does not exist; is {tmp_path} a MindFormers checkpoint folder?")):
        resolve_mf_iteration(tmp_path)
    (tmp_path / TRACKER).write_text("../../etc")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path / TRACKER}: expected one iteration number, found '../../etc'")):
        resolve_mf_iteration(tmp_path)
    (tmp_path / TRACKER).write_text("12")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{tmp_path / TRACKER} names iteration 12 but {tmp_path / 'iteration_00000012'} does not exist")):
        resolve_mf_iteration(tmp_path)


# ---------------------------------------------------------------- 2.0 metadata that must be refused

NAME = "decoder.layers.0.self_attention.linear_qkv.weight"
KEY = repr((NAME, (1,)))


@pytest.fixture
def v2(tmp_path):
    """A world-size-2 checkpoint, and a function that edits its metadata.json and reparses it."""
    folder = build_v2(tmp_path, 1, mf_state(SEED), dp=1, mp=2)
    path = folder / "metadata.json"

    def edit(change) -> None:
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
        read_mf_checkpoint(folder)

    return folder, path, edit


@pytest.mark.parametrize("bad", ["../model-0000000-0000002.safetensors", "/etc/passwd", "a/b.safetensors", "..", ""])
def test_storage_file_names_outside_the_folder_are_refused(v2, bad):
    folder, _, edit = v2

    def change(meta):
        meta["storage_data"][KEY][0]["file_name"] = bad

    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"storage_data file_name {bad!r} in {folder} is not a bare file name inside the checkpoint folder")):
        edit(change)


def test_storage_file_symlinked_outside_the_folder_is_refused(v2, tmp_path):
    folder, _, edit = v2
    save_file({NAME: torch.zeros(32, 16)}, tmp_path / "outside.safetensors")
    (folder / "evil.safetensors").symlink_to(tmp_path / "outside.safetensors")

    def change(meta):
        meta["storage_data"][KEY][0]["file_name"] = "evil.safetensors"

    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"storage_data file_name 'evil.safetensors' in {folder} resolves outside the folder")):
        edit(change)


def test_huge_storage_key_is_refused_before_evaluation(v2):
    _, path, edit = v2
    key = repr((NAME + "x" * 5000, (0,)))
    with pytest.raises(UnsafeCheckpointError, match=re.escape(
            f"{path}: storage_data key of {len(key)} characters exceeds 4096")):
        edit(lambda meta: meta["storage_data"].update({key: []}))


@pytest.mark.parametrize("key", ["__import__('os').system('true')", "('w', 0)", "['w', (0,)]", "('w', (True,))", "(("])
def test_storage_keys_must_be_a_literal_name_and_piece(v2, key):
    _, path, edit = v2
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{path}: storage_data key {key!r} is not of the form \"('name', (k,))\"")):
        edit(lambda meta: meta["storage_data"].update({key: [{"file_name": "x"}]}))


def _chunk(meta, k):
    return next(c for c in meta["state_dict_metadata"][NAME]["chunk"] if c["global_offset"] == [k])


@pytest.mark.parametrize(("change", "detail"), [
    (lambda m: _chunk(m, 1).update(global_offset=[2]), "global_offset [2] is not one piece index below 2 ([2, 1] fragments)"),
    (lambda m: _chunk(m, 1).update(local_shape=[40, 16]), "piece 1 at [40, 0] of shape [40, 16] lies outside [64, 16]"),
    (lambda m: _chunk(m, 1).update(local_shape=[32]), "local_shape [32] does not match global_shape [64, 16]"),
    (lambda m: m["state_dict_metadata"][NAME]["chunk"].pop(), "chunks cover 512 of 1024 elements"),
    (lambda m: m["storage_data"].pop(KEY), "piece 1 has no storage_data entry"),
    (lambda m: m["state_dict_metadata"][NAME]["properties"].update(dtype="Complex64"),
     "unknown dtype 'Complex64'; supported: ['BFloat16', 'Bool', 'Float16', 'Float32', 'Float64', 'Int16', "
     "'Int32', 'Int64', 'Int8', 'UInt16', 'UInt32', 'UInt64', 'UInt8']"),
    (lambda m: m["state_dict_metadata"][NAME].update(axis_fragmentations=[2]), "1 fragmentation entries for a 2-D tensor"),
    (lambda m: m["state_dict_metadata"][NAME].pop("global_shape"), "missing key 'global_shape'"),
])
def test_inconsistent_pieces_are_corrupt_naming_the_tensor(v2, change, detail):
    _, path, edit = v2
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor {NAME!r}: {detail}")):
        edit(change)


def test_overlapping_pieces_are_corrupt(v2):
    _, path, edit = v2

    def change(meta):  # rows 0-40 and 24-48: the same element count as 64 rows, but overlapping
        meta["state_dict_metadata"][NAME]["chunk"] = [
            {"global_offset": [0], "local_shape": [40, 16]}, {"global_offset": [1], "local_shape": [24, 16]}]

    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{path}: tensor {NAME!r}: chunks at [0, 0] and [24, 0] overlap")):
        edit(change)


def test_storage_for_an_undescribed_piece_is_corrupt(v2):
    _, path, edit = v2
    key = repr(("ghost.weight", (0,)))
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{path}: storage_data names piece 0 of 'ghost.weight', which state_dict_metadata lacks")):
        edit(lambda meta: meta["storage_data"].update({key: [{"file_name": "x"}]}))


def test_file_disagreeing_with_the_metadata_is_corrupt_naming_the_file(v2):
    folder, _, edit = v2
    file = folder / "opt-0000000-0000002.safetensors"
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{file}: tensor {NAME!r} piece 0 should be torch.float32 [32, 16], the file holds nothing")):
        edit(lambda meta: meta["storage_data"][repr((NAME, (0,)))][0].update(file_name=file.name))


def test_file_dtype_disagreeing_with_the_metadata_is_corrupt_naming_the_file(v2):
    folder, _, edit = v2
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{folder / 'opt-0000000-0000002.safetensors'}: tensor 'learning_rate' piece 0 should be torch.float16 [], "
            "the file holds torch.float32 []")):
        edit(lambda meta: meta["state_dict_metadata"]["learning_rate"]["properties"].update(dtype="Float16"))


def test_missing_storage_file_is_reported(v2):
    folder, _, edit = v2
    os.remove(folder / "model-0000001-0000002.safetensors")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{folder / 'model-0000001-0000002.safetensors'}, named by {folder / 'metadata.json'}, does not exist")):
        edit(lambda meta: None)


def test_common_json_needs_an_integer_global_step(tmp_path):
    folder = build_v2(tmp_path, 1, {"w": torch.zeros(2)}, common={"global_step": "1"})
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{folder / 'common.json'}: 'global_step' must be an integer >= 0, got '1'")):
        read_mf_checkpoint(folder)


# ---------------------------------------------------------------- legacy (Checkpoint 1.0)


@pytest.mark.parametrize(("saves", "metas", "chosen"), [
    pytest.param([[(1, 1, 0), (1, 2, 0), (2, 1, 0)]] * 2, [(2, 1), (2, 1)], (2, 1), id="all-complete"),
    pytest.param([[(1, 1, 0), (1, 2, 0), (2, 1, 0)], [(1, 1, 0), (1, 2, 0)]], [(2, 1), (1, 2)], (1, 2),
                 id="rank-1-crashed-before-the-last-save"),
    pytest.param([[(1, 1, 0), (1, 2, 0), (2, 1, 0)]] * 2, [(1, 2), (2, 1)], (1, 2),
                 id="file-written-but-meta-not-updated"),
    pytest.param([[(1, 1, 0), (1, 2, 0), (2, 1, 0)], [(1, 1, 0), (2, 1, 0)]], [(2, 1), (1, 2)], (1, 1),
                 id="bound-not-present-on-every-rank"),
    pytest.param([[(1, 1, 0), (1, 2, 0)], [(1, 1, 0), (1, 2, 0), (1, 3, 0)]], [None, None], (1, 2),
                 id="no-meta-newest-common"),
    pytest.param([[(1, 2, 0), (1, 10, 0)]] * 2, [None, (1, 10)], (1, 10), id="numeric-not-lexical-order"),
])
def test_legacy_loads_the_newest_step_complete_on_every_rank(tmp_path, saves, metas, chosen):
    build_legacy(tmp_path, saves, metas)
    ckpt = read_mf_legacy(tmp_path)
    epoch, step = chosen
    assert ckpt.context == TrainingContext(global_step=10 * epoch + step, epoch=epoch, step=10 * epoch + step,
                                           global_batch_size=8, loss_scale=1024.0)
    _assert_reassembles(ckpt, legacy_state(epoch, step))


def test_legacy_prefers_the_latest_prefix_suffix_of_a_step(tmp_path):
    build_legacy(tmp_path, [[(1, 1, 0), (1, 1, 1)], [(1, 1, 2)]], [(1, 1), (1, 1)])
    ckpt = read_mf_legacy(tmp_path)
    assert ckpt.tensors["output_layer.weight"].chunks[0].file == tmp_path / "rank_0" / "tiny_rank_0_1-1_1.safetensors"
    assert torch.equal(read_chunk(ckpt.tensors["output_layer.weight"].chunks[0]),
                       legacy_state(1, 1, suffix=1)["output_layer.weight"])
    assert ckpt.tensors["output_layer.weight"].chunks[1].file == tmp_path / "rank_1" / "tiny_rank_1_2-1_1.safetensors"


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("remove_redundancy", [False, True])
def test_legacy_reassembles_with_and_without_redundancy(tmp_path, fmt, remove_redundancy):
    build_legacy(tmp_path, [[(3, 4, 0)]] * 3, [(3, 4)] * 3, fmt=fmt, remove_redundancy=remove_redundancy)
    ckpt = read_mf_legacy(tmp_path, fmt=fmt)
    _assert_reassembles(ckpt, legacy_state(3, 4))
    copies = len(ckpt.tensors["decoder.layers.1.mlp.linear_fc2.weight"].chunks)
    assert copies == (1 if remove_redundancy else 3)


def test_legacy_ignores_files_of_the_other_format(tmp_path):
    build_legacy(tmp_path, [[(1, 1, 0)]], [(1, 1)], fmt="ckpt")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{tmp_path}: no (epoch, step) with a .safetensors file on every rank at or before (1, 1) (the oldest meta.json)")):
        read_mf_legacy(tmp_path)


def test_legacy_errors_are_actionable(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=re.escape(
            f"{tmp_path} has no rank_N folders; is it a MindFormers legacy checkpoint folder?")):
        read_mf_legacy(tmp_path)
    build_legacy(tmp_path / "gap", [[(1, 1, 0)]] * 3, [None] * 3)
    os.rename(tmp_path / "gap" / "rank_1", tmp_path / "gap" / "old_rank_1")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path / 'gap'} has 2 rank folders but the highest is rank_2: rank_1 is missing")):
        read_mf_legacy(tmp_path / "gap")
    build_legacy(tmp_path / "moved", [[(1, 1, 0)]] * 2, [None] * 2)
    os.rename(tmp_path / "moved" / "rank_1" / "tiny_rank_1-1_1.safetensors",
              tmp_path / "moved" / "rank_1" / "tiny_rank_0-1_1.safetensors")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path / 'moved' / 'rank_1' / 'tiny_rank_0-1_1.safetensors'} names rank 0 but lies in rank_1")):
        read_mf_legacy(tmp_path / "moved")
    with pytest.raises(ValueError, match=re.escape("fmt must be 'safetensors' or 'ckpt', got 'pt'")):
        read_mf_legacy(tmp_path, fmt="pt")


def test_legacy_sharded_by_a_strategy_is_reported_not_guessed(tmp_path):
    for rank in range(2):
        (tmp_path / f"rank_{rank}").mkdir()
        save_file({"w": torch.zeros(2 + rank), "global_step": torch.tensor([1], dtype=torch.int32)},
                  tmp_path / f"rank_{rank}" / f"net_rank_{rank}-1_1.safetensors")
    with pytest.raises(NotImplementedYet, match=re.escape(
            f"tensor 'w' is torch.float32 [2] in {tmp_path / 'rank_0' / 'net_rank_0-1_1.safetensors'} but torch.float32 [3] "
            f"in {tmp_path / 'rank_1' / 'net_rank_1-1_1.safetensors'}: sharded legacy checkpoints need the strategy files")):
        read_mf_legacy(tmp_path)


def test_legacy_files_must_agree_on_remove_redundancy(tmp_path):
    for rank, flag in enumerate(["True", "False"]):
        (tmp_path / f"rank_{rank}").mkdir()
        save_file({"global_step": torch.tensor([1], dtype=torch.int32)},
                  tmp_path / f"rank_{rank}" / f"n_rank_{rank}-1_1.safetensors", metadata={"remove_redundancy": flag})
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path}: files disagree on remove_redundancy: n_rank_0-1_1.safetensors=True, n_rank_1-1_1.safetensors=False")):
        read_mf_legacy(tmp_path)


def test_legacy_needs_a_global_step(tmp_path):
    (tmp_path / "rank_0").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "rank_0" / "n_rank_0-2_5.safetensors")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"{tmp_path}: the files of epoch 2 step 5 hold no integer global_step scalar")):
        read_mf_legacy(tmp_path)


@pytest.mark.parametrize(("name", "parsed"), [
    ("tiny_rank_0-2_3.safetensors", LegacyFile(2, 3, 0, "tiny", 0, "safetensors")),
    ("qwen3_rank_12_4-10_200.ckpt", LegacyFile(10, 200, 4, "qwen3", 12, "ckpt")),
    ("my_rank_model_rank_1-1_1.ckpt", LegacyFile(1, 1, 0, "my_rank_model", 1, "ckpt")),
    ("meta.json", None),
    ("tiny_rank_0-2_3.safetensors.tmp", None),
    ("tiny-2_3.safetensors", None),
])
def test_legacy_file_names(name, parsed):
    assert parse_legacy_name(name) == parsed


def test_foreign_chunk_of_a_ckpt_file_reads_a_region(tmp_path):
    build_legacy(tmp_path, [[(1, 1, 0)]], [(1, 1)], fmt="ckpt")
    file = tmp_path / "rank_0" / "tiny_rank_0-1_1.ckpt"
    chunk = ForeignChunk(Box((0, 0), (32, 16)), file, "embedding.word_embeddings.weight")
    assert torch.equal(read_chunk(chunk, Box((3, 4), (2, 2))), legacy_state(1, 1)[chunk.key][3:5, 4:6])
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{file} holds no tensor 'nope'")):
        read_chunk(ForeignChunk(Box((), ()), file, "nope"))
