"""MindSpore strategy files and MindFormers legacy trees split by them.

Every tree is written by ``tests/fixtures/ms_strategy.py`` in the layouts of
``docs/mindformers.md``. The tensors read back through ``read_mf_legacy(...,
strategy=...)`` are compared, bit for bit, with the original state and with
:func:`reference_merge`, a reimplementation of MindSpore's own merge
(``_reshape_param_data``, and ``_construct_tensor_layout_for_opt_shard`` for optimizer
shards) that does not use ``ParamLayout``.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resumable.cli import main
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet, UnsafeCheckpointError
from resumable.formats.mindformers import read_mf_legacy, read_tensor
from resumable.formats.ms_ckpt import load_ms_ckpt
from resumable.formats.ms_names import our_name, parse_ms_name
from resumable.formats.ms_strategy import ParamLayout, read_ms_strategy, read_ms_strategy_file
from resumable.formats.protowire import length_field, varint_bytes, varint_field
from resumable.geometry import Box
from resumable.sources import open_source
from tests.fixtures.mindformers import mf_state
from tests.fixtures.ms_strategy import (
    build_sharded_legacy,
    encode_strategy,
    generic_state,
    opt_shard_of,
    sharded_layouts,
    slice_index,
    stages_of,
    tensor_strategy,
    write_ms_strategy,
)

DP, MP = 2, 2


# ---------------------------------------------------------------- MindSpore's merge, reimplemented


def _merge_slices(slices: list[torch.Tensor], dev_matrix: list[int], tensor_map: list[int]) -> torch.Tensor:
    """``_reshape_param_data``: slices in device order, put in slice-index order, concatenated dim by dim from the last."""
    layout = {"dev_matrix": dev_matrix, "tensor_map": tensor_map}
    strategy = tensor_strategy(layout)
    ordered: list[torch.Tensor | None] = [None] * math.prod(strategy)
    for device, piece in enumerate(slices):  # replicas land on the same index: the last one stays, as in MindSpore
        ordered[slice_index(layout, device)] = piece
    for axis in reversed(range(len(strategy))):
        n = strategy[axis]
        ordered = [torch.cat(ordered[j * n:(j + 1) * n], dim=axis) for j in range(len(ordered) // n)]
    return ordered[0]


def reference_merge(slices: list[torch.Tensor], layout: dict) -> torch.Tensor:
    """A stage's slices (in device order) merged as MindSpore merges them.

    With an optimizer shard, MindSpore views the tensor as ``[pieces of dim 0, rows of a
    piece, ...]`` with the second dim split over a new device axis of ``opt size`` just
    left of the model-parallel axes (and the remaining replicas left of it).
    """
    step, size = opt_shard_of(layout)
    if not size:
        return _merge_slices(slices, layout["dev_matrix"], layout["tensor_map"])
    strategy = tensor_strategy(layout)
    repeat = math.prod(layout["dev_matrix"]) // (step * size)
    dev = ([repeat] if repeat > 1 else []) + [size] + strategy
    tmap = [-1 if s == 1 else len(strategy) - 1 - i for i, s in enumerate(strategy)]
    tmap.insert(1, len(strategy))
    merged = _merge_slices([s.reshape(1, *s.shape) for s in slices], dev, tmap)
    return merged.reshape(-1, *merged.shape[2:])


def _rank_tensors(root: Path, fmt: str) -> list[dict[str, torch.Tensor]]:
    files = sorted(root.glob(f"rank_*/*.{fmt}"), key=lambda p: int(p.parent.name[5:]))
    return [load_file(p) if fmt == "safetensors" else load_ms_ckpt(p) for p in files]


def _check_tree(root: Path, strategy: Path, state: dict, dp: int, mp: int, pp: int, convention: str, opt: bool,
                fmt: str = "safetensors") -> None:
    """Read through the strategy == the state == MindSpore's merge of the rank files, bit for bit."""
    ckpt = read_mf_legacy(root, fmt=fmt, strategy=strategy)
    assert set(ckpt.tensors) == set(state)
    ranks = _rank_tensors(root, fmt)
    layouts = sharded_layouts(state, dp, mp, pp, convention, opt)
    stage_of = stages_of(state, pp)
    for name, expected in state.items():
        got = read_tensor(ckpt.tensors[name])
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        layout = layouts[stage_of[name]].get(name) if name in stage_of else None
        if layout is not None:
            stage = ranks[stage_of[name] * dp * mp:(stage_of[name] + 1) * dp * mp]
            assert torch.equal(reference_merge([r[name] for r in stage], layout), expected), name


# ---------------------------------------------------------------- trees read through their strategy


@pytest.mark.parametrize("convention", ["cpp", "python"])
@pytest.mark.parametrize("opt", [False, True], ids=["no-opt-shard", "opt-shard"])
@pytest.mark.parametrize("pp", [1, 2])
def test_sharded_generic_tree_equals_the_state_and_mindspores_merge(tmp_path, convention, opt, pp):
    state = generic_state(seed=pp + 2 * opt)
    strategy = build_sharded_legacy(tmp_path, state, DP, MP, pp, convention, opt)
    _check_tree(tmp_path, strategy, state, DP, MP, pp, convention, opt)
    fc1 = read_mf_legacy(tmp_path, strategy=strategy).tensors["fc1.weight"]
    assert len(fc1.chunks) == DP * MP and len({c.box for c in fc1.chunks}) == (DP * MP if opt else MP)


def test_sharded_qwen3_tree_with_moments_and_scalars(tmp_path):
    state = mf_state(seed=11)
    strategy = build_sharded_legacy(tmp_path, state, 2, 2, pp=2, convention="cpp", opt_shard=True, fmt="ckpt")
    _check_tree(tmp_path, strategy, state, 2, 2, 2, "cpp", True, fmt="ckpt")
    ckpt = read_mf_legacy(tmp_path, fmt="ckpt", strategy=strategy)
    assert ckpt.context.global_step == 12
    assert len(ckpt.tensors["global_step"].chunks) == 8  # whole in every rank file


@pytest.mark.parametrize("convention", ["cpp", "python"])
def test_json_strategy_and_a_single_file_of_one_stage(tmp_path, convention):
    state = generic_state(seed=5)
    strategy = build_sharded_legacy(tmp_path, state, 2, 2, convention=convention, opt_shard=True, strategy_ext="json")
    _check_tree(tmp_path, strategy, state, 2, 2, 1, convention, True)
    single = read_ms_strategy(strategy / "ckpt_strategy_rank_3.json")  # no pipeline: one file says it all
    assert single == read_ms_strategy(strategy)
    assert single["fc1.weight"].tensor_shape == (16, 8)


def test_both_conventions_normalise_to_the_same_layouts(tmp_path):
    state = generic_state(seed=1)
    cpp = build_sharded_legacy(tmp_path / "cpp", state, 2, 2, opt_shard=True)
    python = build_sharded_legacy(tmp_path / "py", state, 2, 2, convention="python", opt_shard=True)
    a, b = read_ms_strategy(cpp), read_ms_strategy(python)
    assert a["fc2.weight"] == ParamLayout((2, 2), (-1, 0), opt_shard_step=2, opt_shard_size=2, tensor_shape=None)
    assert b["fc2.weight"] == ParamLayout((2, 2), (-1, 0), opt_shard_step=2, opt_shard_size=2, tensor_shape=(8, 16))
    assert a["norm.gamma"].opt_shard_size == 2 and b["norm.gamma"].opt_shard_size == 4  # -1: every replica
    plain = read_ms_strategy(build_sharded_legacy(tmp_path / "plain", state, 2, 2, convention="python"))
    assert "norm.gamma" not in plain  # MindFormers' writer lists the parameters of its parallel layers only


def test_moments_the_strategy_omits_are_split_like_their_parameter(tmp_path):
    state = generic_state(seed=4)
    strategy = build_sharded_legacy(tmp_path, state, 2, 2, opt_shard=True, moments_in_strategy=False)
    assert not any(n.startswith("adam_") for n in read_ms_strategy(strategy))
    _check_tree(tmp_path, strategy, state, 2, 2, 1, "cpp", True)


@pytest.mark.parametrize("convention", ["cpp", "python"])
def test_remove_redundancy_tree_keeps_one_copy_of_each_slice(tmp_path, convention):
    state = generic_state(seed=6)
    strategy = build_sharded_legacy(tmp_path, state, 2, 2, pp=2, convention=convention, opt_shard=False,
                                    remove_redundancy=True)
    ckpt = read_mf_legacy(tmp_path, strategy=strategy)
    for name, expected in state.items():
        assert torch.equal(read_tensor(ckpt.tensors[name]), expected), name
    assert len(ckpt.tensors["fc1.weight"].chunks) == MP  # one holder per slice
    assert len(ckpt.tensors["learning_rate"].chunks) == 8


def test_protobuf_dims_may_be_packed(tmp_path):
    layouts = {"w": {"dev_matrix": [2, 2], "tensor_map": [1, -1], "field": 0, "opt_weight_shard_step": 0,
                     "opt_weight_shard_size": 0}}
    write_ms_strategy(tmp_path / "packed.ckpt", layouts, packed=True)
    write_ms_strategy(tmp_path / "plain.ckpt", layouts)
    assert read_ms_strategy(tmp_path / "packed.ckpt") == read_ms_strategy(tmp_path / "plain.ckpt") == {
        "w": ParamLayout((2, 2), (1, -1))}


def test_layout_places_slices_as_the_layout_says():
    layout = ParamLayout((2, 2), (1, -1))  # rows over the left axis, replicated over the right
    assert layout.global_shape((4, 8)) == (8, 8)
    assert [layout.rank_box(r, (4, 8)).offsets for r in range(4)] == [(0, 0), (0, 0), (4, 0), (4, 0)]
    assert layout.rank_box(6, (4, 8)) == Box((4, 0), (4, 8))  # rank 6: device 2 of the second stage
    opt = ParamLayout((2, 2), (0, -1), opt_shard_step=2, opt_shard_size=2)
    assert opt.global_shape((2, 3)) == (8, 3)
    # device d: model-parallel piece d % 2 (4 rows), optimizer part d // 2 inside it
    assert [opt.rank_box(d, (2, 3)).offsets[0] for d in range(4)] == [0, 4, 2, 6]


def test_uneven_rows_from_param_split_shape_and_indices_offset(tmp_path):
    w = torch.arange(15.0).reshape(5, 3)
    layout = {"dev_matrix": [2], "tensor_map": [0, -1], "param_split_shape": [3, 2], "indices_offset": [0, 3],
              "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
    for rank, rows in enumerate((w[:3], w[3:])):
        (tmp_path / f"rank_{rank}").mkdir()
        save_file({"w": rows.clone(), "global_step": torch.tensor([3], dtype=torch.int32)},
                  tmp_path / f"rank_{rank}" / f"n_rank_{rank}-1_1.safetensors")
    write_ms_strategy(tmp_path / "s.ckpt", {"w": layout})
    assert torch.equal(read_tensor(read_mf_legacy(tmp_path, strategy=tmp_path / "s.ckpt").tensors["w"]), w)
    swapped = dict(layout, param_split_shape=[2, 3], indices_offset=[0, 2])
    write_ms_strategy(tmp_path / "s.ckpt", {"w": swapped})
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "holds 'w' as [3, 3]: " f"{tmp_path / 's.ckpt'}: parameter 'w': rank 0 holds slice 0 of dim 0, which "
            "param_split_shape gives 2 rows, but its file holds 3")):
        read_mf_legacy(tmp_path, strategy=tmp_path / "s.ckpt")


# ---------------------------------------------------------------- without a strategy


def test_sharded_tree_without_its_strategy_is_refused_with_what_to_pass(tmp_path):
    build_sharded_legacy(tmp_path, generic_state(seed=2), 2, 2)
    with pytest.raises(NotImplementedYet, match=re.escape(
            f"{tmp_path} is split by its job's strategy files ({tmp_path / 'strategy'} splits ") + "'[^']+'" + re.escape(
            ", ...): its rank files hold slices, not copies; pass the source job's strategy files: "
            "src_strategy_path_or_dir (trainer) or --src-strategy (resumable convert)")):
        read_mf_legacy(tmp_path)


def test_slices_of_different_shapes_without_a_strategy_say_what_to_pass(tmp_path):
    state = {"w": torch.zeros(5, 2), "global_step": torch.tensor([1], dtype=torch.int32)}
    for rank, rows in enumerate((3, 2)):
        (tmp_path / f"rank_{rank}").mkdir()
        save_file({"w": state["w"][:rows].clone(), "global_step": state["global_step"]},
                  tmp_path / f"rank_{rank}" / f"n_rank_{rank}-1_1.safetensors")
    with pytest.raises(NotImplementedYet, match=re.escape(
            "sharded legacy checkpoints need the strategy files; pass the source job's strategy files: "
            "src_strategy_path_or_dir (trainer) or --src-strategy (resumable convert)")):
        read_mf_legacy(tmp_path)


# ---------------------------------------------------------------- damaged or foreign strategies


def _raw(**changes) -> dict:
    return {"dev_matrix": [2, 2], "tensor_map": [1, -1], "field": 0, "opt_weight_shard_step": 0,
            "opt_weight_shard_size": 0, **changes}


@pytest.mark.parametrize(("raw", "error", "message"), [
    (_raw(tensor_map=[2, -1]), CorruptCheckpointError,
     "tensor_map [2, -1] refers past dev_matrix [2, 2] (entries count axes from the right, 0 to 1)"),
    (_raw(tensor_map=[0, 0]), CorruptCheckpointError, "tensor_map [0, 0] splits two dims over one device axis"),
    (_raw(dev_matrix=[0, 2]), CorruptCheckpointError, "dev_matrix must be at most 32 integers in [1, 16777216]"),
    (_raw(opt_weight_shard_step=3, opt_weight_shard_size=2), CorruptCheckpointError,
     "opt_weight_shard_step 3 and opt_weight_shard_size 2 do not fit a tensor split [2, 1]"),
    (_raw(tensor_map=[-1, 1], opt_weight_shard_step=2, opt_weight_shard_size=2), NotImplementedYet,
     "optimizer parallelism on tensor_map [-1, 1] over dev_matrix [2, 2], whose split axes are not the rightmost"),
    (_raw(param_split_shape=[16, 8, 1]), CorruptCheckpointError,
     "param_split_shape [16, 8, 1] without indices_offset must be the global shape of the 2-D parameter"),
    (_raw(param_split_shape=[3, 2], indices_offset=[0, 2]), CorruptCheckpointError,
     "indices_offset [0, 2] are not where the slices of param_split_shape [3, 2] start ([0, 3])"),
    (_raw(tensor_map=[1, 0], param_split_shape=[3, 2], indices_offset=[0, 3]), NotImplementedYet,
     "an uneven split (param_split_shape) of a tensor split [2, 2]"),
])
def test_impossible_layouts_are_refused_naming_file_parameter_and_field(tmp_path, raw, error, message):
    write_ms_strategy(tmp_path / "s.ckpt", {"fc1.weight": raw})
    with pytest.raises(error, match=re.escape(f"{tmp_path / 's.ckpt'}: parameter 'fc1.weight': {message}")):
        read_ms_strategy(tmp_path / "s.ckpt")


@pytest.mark.parametrize(("layout", "message"), [
    ({"dev_matrix": "2", "tensor_map": [0]}, "'dev_matrix' must be a list, got '2'"),
    ({"dev_matrix": [True], "tensor_map": [0]}, "dev_matrix must be at most 32 integers in [1, 16777216], got [True]"),
    ({"dev_matrix": [2], "tensor_map": [0], "field": 1.5}, "field must be an integer in [0, "),
    ({"dev_matrix": [2]}, "tensor_map is missing"),
])
def test_json_values_of_the_wrong_type_are_refused(tmp_path, layout, message):
    (tmp_path / "s.json").write_text(json.dumps({"parallel_layout_item": {"w": layout}}))
    with pytest.raises(CorruptCheckpointError, match=re.escape(message)):
        read_ms_strategy(tmp_path / "s.json")


def test_a_python_writer_global_shape_the_slices_do_not_divide(tmp_path):
    write_ms_strategy(tmp_path / "s.ckpt", {"w": _raw(dev_matrix=[2, 1], tensor_map=[1, 0], param_split_shape=[15, 8])})
    layout = read_ms_strategy(tmp_path / "s.ckpt")["w"]
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "parameter 'w': a slice of shape [8, 8] split [2, 1] gives [16, 8], but the strategy records the "
            "global shape [15, 8] (it does not divide evenly")):
        layout.global_shape((8, 8))
    with pytest.raises(CorruptCheckpointError, match=re.escape("the files hold a 1-D slice [8] but the strategy's "
                                                               "tensor_map [0, -1] has 2 dims")):
        layout.rank_box(0, (8,))


def test_wire_damage_and_foreign_files_are_clear_errors(tmp_path):
    data = encode_strategy({"w": _raw()})
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) - 5])
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"corrupt MindSpore strategy file {tmp_path / 'cut.ckpt'}")):
        read_ms_strategy(tmp_path / "cut.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="is empty"):
        read_ms_strategy(tmp_path / "empty.ckpt")
    (tmp_path / "ours.ckpt").write_text('{"format": "resumable-strategy"}')
    with pytest.raises(CorruptCheckpointError, match=re.escape("holds JSON, not a protobuf ParallelStrategyMap")):
        read_ms_strategy(tmp_path / "ours.ckpt")
    for body, problem in [(varint_bytes(2 << 3 | 5) + bytes(4), "field 2 has wire type 5"),
                          (varint_field(5, 1 << 40), "field is out of the int32 range"),
                          (_submessage(1, varint_field(1, 1 << 33)), "dev_matrix value 8589934592 is out of its "
                                                                     "type's range")]:
        item = _submessage(1, b"w") + _submessage(2, body)
        (tmp_path / "type.ckpt").write_bytes(_submessage(3, item))
        with pytest.raises(CorruptCheckpointError, match=re.escape(
                f"corrupt MindSpore strategy file {tmp_path / 'type.ckpt'}: parallel_layout_item #0 (parameter 'w'): "
                f"{problem}")):
            read_ms_strategy(tmp_path / "type.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="holds no ckpt_strategy_rank_N.ckpt"):
        read_ms_strategy(_empty_dir(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        read_ms_strategy(tmp_path / "missing")


def _submessage(field: int, payload: bytes) -> bytes:
    return length_field(field, len(payload)) + payload


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "none").mkdir()
    return tmp_path / "none"


def test_random_damage_never_crashes_the_reader(tmp_path):
    data = encode_strategy({"fc1.weight": _raw(), "adam_m.fc1.weight": _raw(opt_weight_shard_step=2,
                                                                           opt_weight_shard_size=-1)})
    rng = random.Random(16)
    for trial in range(150):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / "s.ckpt"
        path.write_bytes(bytes(damaged[:rng.randint(1, len(damaged))] if trial % 3 == 0 else damaged))
        try:
            for layout in read_ms_strategy_file(path).values():
                layout.rank_box(3, (4,) * len(layout.tensor_map))
        except (CorruptCheckpointError, NotImplementedYet):
            pass


def test_files_that_disagree_on_a_parameter_name_both(tmp_path):
    write_ms_strategy(tmp_path / "ckpt_strategy_rank_0.ckpt", {"w": _raw()})
    write_ms_strategy(tmp_path / "ckpt_strategy_rank_1.ckpt", {"w": _raw(tensor_map=[0, -1])})
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "strategy files disagree on parameter 'w': dev_matrix [2, 2] tensor_map [1, -1] in "
            f"{tmp_path / 'ckpt_strategy_rank_0.ckpt'} but dev_matrix [2, 2] tensor_map [0, -1] in "
            f"{tmp_path / 'ckpt_strategy_rank_1.ckpt'}")):
        read_ms_strategy(tmp_path)


def test_a_stage_prefixed_merged_file_is_read_under_plain_names(tmp_path):
    write_ms_strategy(tmp_path / "merged.ckpt", {"0-emb": _raw(), "1-fc2.weight": _raw(tensor_map=[-1, 0])})
    assert set(read_ms_strategy(tmp_path / "merged.ckpt")) == {"emb", "fc2.weight"}


def test_slices_the_strategy_does_not_tile_name_tensor_and_ranks(tmp_path):
    strategy = build_sharded_legacy(tmp_path, generic_state(seed=9), 2, 2, remove_redundancy=True)
    holders = [r for r, tensors in enumerate(_rank_tensors(tmp_path, "safetensors")) if "fc1.weight" in tensors]
    _drop(tmp_path / f"rank_{holders[0]}" / f"net_rank_{holders[0]}-1_2.safetensors", "fc1.weight")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"tensor 'fc1.weight' [16, 8], held by ranks {holders[1]}: the slices placed by the strategy {strategy} do "
            "not tile it (chunks cover 64 of 128 elements); a rank's file is missing or the strategy is not the one "
            "of the job that wrote the checkpoint")):
        read_mf_legacy(tmp_path, strategy=strategy)


def test_a_tensor_the_strategy_lacks_must_be_whole_everywhere(tmp_path):
    strategy = build_sharded_legacy(tmp_path, generic_state(seed=9), 2, 2, convention="python")
    for rank in range(4):  # fc1.weight left out: its [8, 8] slices would pass for copies, unless shapes differ
        write_ms_strategy(strategy / f"ckpt_strategy_rank_{rank}.ckpt", {})
    _shrink(tmp_path / "rank_1" / "net_rank_1-1_2.safetensors", "fc1.weight")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            f"tensor 'fc1.weight' is torch.float32 [8, 8] in {tmp_path / 'rank_0' / 'net_rank_0-1_2.safetensors'} "
            f"but torch.float32 [7, 8] in {tmp_path / 'rank_1' / 'net_rank_1-1_2.safetensors'}, and the strategy "
            f"{strategy} has no entry for it (only tensors whole in every file may lack one)")):
        read_mf_legacy(tmp_path, strategy=strategy)


def _rewrite(path: Path, change) -> None:
    """Change a rank file's tensors, keeping its metadata."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    path.chmod(0o600)
    save_file(tensors, path, metadata=metadata)


def _shrink(path: Path, name: str) -> None:
    _rewrite(path, lambda tensors: tensors.__setitem__(name, tensors[name][:-1].clone()))


def _drop(path: Path, name: str) -> None:
    _rewrite(path, lambda tensors: tensors.pop(name))


def test_a_symlink_out_of_the_strategy_folder_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    write_ms_strategy(tmp_path / "elsewhere.ckpt", {"w": _raw()})
    (tmp_path / "s" / "ckpt_strategy_rank_0.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="resolves outside"):
        read_ms_strategy(tmp_path / "s")


def test_a_field_split_is_not_implemented_yet(tmp_path):
    write_ms_strategy(tmp_path / "s.ckpt", {"w": _raw(field=39)})
    with pytest.raises(NotImplementedYet, match=re.escape("parameter 'w': a 'field' split (field 39")):
        read_ms_strategy(tmp_path / "s.ckpt")["w"].global_shape((4, 4))


# ---------------------------------------------------------------- the command line


def test_convert_reassembles_a_sharded_tree_given_its_strategy(tmp_path, capsys):
    state = generic_state(seed=8)
    strategy = build_sharded_legacy(tmp_path / "mf", state, 2, 2, pp=2, opt_shard=True)
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "ours"), "--to", "v2", "--quiet"]) != 0
    assert "--src-strategy" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "ours"), "--to", "v2", "--quiet",
                 "--src-strategy", str(strategy)]) == 0
    tensors = open_source(tmp_path / "ours").tensors
    for name, expected in state.items():
        parsed = parse_ms_name(name)
        if parsed.kind != "scalar":
            assert torch.equal(tensors[our_name(parsed)].read(), expected), name
