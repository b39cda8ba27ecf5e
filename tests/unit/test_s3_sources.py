"""``open_source`` on ``s3://`` prefixes (moto on 127.0.0.1, real boto3): each format reads as its local copy.

A HuggingFace folder, one of our Checkpoint 2.0 iterations, MindFormers 2.0 iterations, a
MindSpore ``.ckpt`` and PyTorch files are written locally by the usual fixtures and uploaded
object by object (ours is also saved straight to the store); the source opened from the
store must list the same tensors (name, dtype, shape) and read the same values, whole and
by region. Legacy ``rank_*`` trees (MindFormers', also sharded with their strategy files on
the store, and resumable's own) read the same way. Damaged objects are refused naming the
``s3://`` object.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch

import resumable
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet
from resumable.formats import hf, v1
from resumable.formats.ms_ckpt import write_ms_ckpt
from resumable.formats.safetensors_io import read_header
from resumable.geometry import Box
from resumable.legacy import LegacySaver
from resumable.sources import Source, open_source
from resumable.tools.verify import verify_path
from tests.fixtures.mindformers import build_legacy, build_v2, hf_params, mf_state, net_state
from tests.fixtures.ms_strategy import build_sharded_legacy, generic_state

SEED = 7
REGIONS = 4  # regions read per source (every tensor is read whole): each read is a few requests to the server
TOKENIZER = b'{"model": {"type": "BPE", "vocab": {"a": 0}}}\n'


def _assert_same(remote: Source, local: Source) -> None:
    assert (remote.format, remote.iteration) == (local.format, local.iteration)
    assert {n: (t.dtype, t.shape) for n, t in remote.tensors.items()} == \
        {n: (t.dtype, t.shape) for n, t in local.tensors.items()}
    assert remote.tensors, "nothing was read"
    for name, t in local.tensors.items():
        assert torch.equal(remote.tensors[name].read(), t.read()), name
    matrices = [name for name, t in local.tensors.items() if len(t.shape) == 2 and min(t.shape) > 1]
    for name in matrices[:REGIONS]:  # a region: rows and columns, only those rows read
        region = Box((1, 1), (local.tensors[name].shape[0] - 1, local.tensors[name].shape[1] - 1))
        assert torch.equal(remote.tensors[name].read(region), local.tensors[name].read(region)), name
    assert remote.common == local.common
    assert remote.model_config == local.model_config


def _hf_folder(folder: Path) -> None:
    params = hf_params(SEED)
    config = {"model_type": "qwen3", "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
    hf.write_hf_folder(folder, config, [(n, t.dtype, t.shape) for n, t in params.items()], params.__getitem__)
    (folder / "tokenizer.json").write_bytes(TOKENIZER)


def test_a_huggingface_folder_reads_the_same_from_s3(s3, tmp_path: Path) -> None:
    _hf_folder(tmp_path / "hf")
    s3.upload(tmp_path / "hf", "models/qwen")
    remote, local = open_source(s3.url("models", "qwen")), open_source(tmp_path / "hf")
    _assert_same(remote, local)
    assert remote.format == "hf" and str(remote.path) == s3.url("models", "qwen")
    assert remote.hf_files["tokenizer.json"].read() == TOKENIZER


def test_write_hf_folder_on_s3_writes_the_same_objects_as_the_local_files(s3, tmp_path: Path) -> None:
    params = hf_params(SEED)
    specs = [(n, t.dtype, t.shape) for n, t in params.items()]
    files = hf.write_hf_folder(s3.url("out"), {"model_type": "qwen3"}, specs, params.__getitem__, max_shard_size=4096)
    hf.write_hf_folder(tmp_path / "out", {"model_type": "qwen3"}, specs, params.__getitem__, max_shard_size=4096)
    assert len(files) > 1 and all(str(f).startswith(s3.url("out") + "/") for f in files)
    local = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert s3.keys("out/") == [f"out/{name}" for name in local]
    assert all(s3.get(f"out/{name}") == (tmp_path / "out" / name).read_bytes() for name in local)
    with pytest.raises(FileExistsError, match=re.escape(f"{s3.url('out')} is not empty")):
        hf.write_hf_folder(s3.url("out"), None, specs, params.__getitem__)


def test_our_checkpoint_saved_to_s3_reads_as_the_local_one(s3, tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(12, 5, generator=torch.Generator().manual_seed(SEED)),
                       "b": torch.arange(5.0)}, "step": 4}
    resumable.save(state, s3.url("ckpt"), 1)
    resumable.save(state, tmp_path / "ckpt", 1)
    remote, local = open_source(s3.url("ckpt")), open_source(tmp_path / "ckpt")
    assert remote.format == "v2" and str(remote.path) == s3.url("ckpt", "iteration_00000001")
    _assert_same(remote, local)
    _assert_same(open_source(s3.url("ckpt", "iteration_00000001")), local)


@pytest.mark.parametrize("dp,mp", [(1, 1), (2, 2)], ids=["single-rank", "dp2-mp2-metadata"])
def test_a_mindformers_2_0_iteration_reads_the_same_from_s3(s3, tmp_path: Path, dp: int, mp: int) -> None:
    build_v2(tmp_path / "mf", 100, mf_state(SEED), dp=dp, mp=mp)
    s3.upload(tmp_path / "mf", "mf")
    remote, local = open_source(s3.url("mf")), open_source(tmp_path / "mf")
    assert remote.format == "mindformers" and remote.iteration == 100
    assert "model.layers.0.self_attn.q_proj.weight" in remote.tensors  # mapped to HuggingFace names
    _assert_same(remote, local)


def test_a_mindspore_ckpt_reads_the_same_from_s3_alone_or_in_a_folder(s3, tmp_path: Path) -> None:
    write_ms_ckpt(tmp_path / "net.ckpt", net_state(SEED))
    write_ms_ckpt(s3.url("written", "net.ckpt"), net_state(SEED))  # the writer goes through storage too
    assert s3.get("written/net.ckpt") == (tmp_path / "net.ckpt").read_bytes()
    s3.put("ms/net.ckpt", (tmp_path / "net.ckpt").read_bytes())
    local = open_source(tmp_path / "net.ckpt")
    assert local.format == "mindspore" and local.common["mindspore"]["global_step"] == 12
    _assert_same(open_source(s3.url("ms", "net.ckpt")), local)
    _assert_same(open_source(s3.url("ms")), local)  # the one checkpoint file of a prefix


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_a_pytorch_file_reads_the_same_from_s3(s3, tmp_path: Path, zipped: bool) -> None:
    g = torch.Generator().manual_seed(SEED)
    doc = {"state_dict": {"fc.weight": torch.randn(6, 4, generator=g), "fc.bias": torch.randn(6, generator=g)},
           "global_step": 9, "lr": 0.5}
    torch.save(doc, tmp_path / "model.pt", _use_new_zipfile_serialization=zipped)
    s3.put("pt/model.pt", (tmp_path / "model.pt").read_bytes())
    remote, local = open_source(s3.url("pt", "model.pt")), open_source(tmp_path / "model.pt")
    assert remote.format == "torch" and set(remote.tensors) == {"fc.weight", "fc.bias"}
    _assert_same(remote, local)


def test_damaged_objects_are_refused_naming_the_s3_object(s3, tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(SEED))}}
    folder = resumable.save(state, s3.url("ckpt"), 1)
    model = next(k for k in s3.keys("ckpt/") if "-model-" in k)
    data = bytearray(s3.get(model))
    data[-5] ^= 0xFF  # inside w's data: its block checksum no longer matches
    s3.put(model, bytes(data))
    source = open_source(folder)
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"s3://{s3.bucket}/{model}: tensor 'w', bytes ")):
        source.tensors["w"].read()

    write_ms_ckpt(tmp_path / "net.ckpt", net_state(SEED))
    s3.put("ms/net.ckpt", (tmp_path / "net.ckpt").read_bytes()[:-3])  # truncated
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"corrupt MindSpore checkpoint {s3.url('ms', 'net.ckpt')}: ")):
        open_source(s3.url("ms", "net.ckpt"))

    torch.save({"w": torch.ones(64)}, tmp_path / "model.pt")
    s3.put("pt/model.pt", (tmp_path / "model.pt").read_bytes()[:-40])  # truncated: its zip directory cut
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{s3.url('pt', 'model.pt')}: neither a torch.save file")):
        open_source(s3.url("pt", "model.pt"))

    _hf_folder(tmp_path / "hf")
    s3.upload(tmp_path / "hf", "hf")
    s3.put("hf/model.safetensors", s3.get("hf/model.safetensors")[:-1])  # its last tensor runs past the end
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{s3.url('hf', hf.SINGLE)} is not a readable safetensors")):
        open_source(s3.url("hf"))


def _ours(root: Path, fmt: str) -> None:
    """A one-rank legacy tree written by resumable's LegacySaver (rank files that carry their own chunk map)."""
    saver = LegacySaver(root, prefix="CKP", fmt=fmt, keep_checkpoint_max=None, remove_redundancy=False,
                        save_optimizer=True, strategy_dir=root.parent / "strategy", layout={"world_size": 1})
    g = torch.Generator().manual_seed(SEED)
    saver.save({"model": {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)},
                "optimizer": {"state": {"w": {"exp_avg": torch.randn(6, 4, generator=g)}}}, "global_step": 4}, 1, 4)


# name → (writes the tree under the given folder; the src_strategy to read it with, relative to the tree;
# a rank file that holds the whole step, read alone too)
LEGACY_TREES: dict[str, tuple[Callable[[Path], object], str | None, str | None]] = {
    "mindformers-ckpt": (lambda root: build_legacy(root, [[(1, 1, 0)]], [(1, 1)], fmt="ckpt",
                                                   states=lambda *_: net_state(SEED)), None, None),
    "mindformers-2-ranks-remove-redundancy": (lambda root: build_legacy(
        root, [[(1, 2, 0)], [(1, 2, 0)]], [(1, 2), (1, 2)], remove_redundancy=True,
        states=lambda *_: net_state(SEED)), None, None),  # Qwen3's names from a legacy tree on s3: tests/e2e/test_s3_tools.py
    "mindformers-dp2-mp2-strategy": (lambda root: build_sharded_legacy(root, generic_state(SEED), dp=2, mp=2),
                                     "strategy", None),
    "ours-safetensors": (lambda root: _ours(root, "safetensors"), None, "rank_0/CKP_rank_0-1_4.safetensors"),
    "ours-ckpt": (lambda root: _ours(root, "ckpt"), None, "rank_0/CKP_rank_0-1_4.ckpt"),
}


@pytest.mark.parametrize("tree", sorted(LEGACY_TREES))
def test_a_legacy_rank_tree_reads_the_same_from_s3(s3, tmp_path: Path, tree: str) -> None:
    build, strategy, alone = LEGACY_TREES[tree]
    build(tmp_path / "legacy")
    s3.upload(tmp_path / "legacy", "legacy")
    remote = open_source(s3.url("legacy"), src_strategy=strategy and s3.url("legacy", strategy))
    local = open_source(tmp_path / "legacy", src_strategy=strategy and tmp_path / "legacy" / strategy)
    assert remote.format == "legacy" and str(remote.path) == s3.url("legacy")
    _assert_same(remote, local)
    if strategy is not None:  # slices placed by the strategy read from the store; without it refused, naming it
        assert len(remote.tensors["fc1.weight"].chunks) == 2
        with pytest.raises(NotImplementedYet, match=re.escape(f"({s3.url('legacy', 'strategy')} splits ")):
            open_source(s3.url("legacy"))
    if alone is not None:
        _assert_same(open_source(s3.url("legacy", *alone.split("/"))), open_source(tmp_path / "legacy" / alone))


def test_a_damaged_legacy_rank_object_is_named_by_its_url_and_a_missing_prefix_named(s3, tmp_path: Path) -> None:
    _ours(tmp_path / "ours", "safetensors")
    s3.upload(tmp_path / "ours", "ours")
    key = "ours/rank_0/CKP_rank_0-1_4.safetensors"
    data = bytearray(s3.get(key))
    data[read_header(s3.url(*key.split("/"))).tensors["w"].end - 1] ^= 0xFF  # w's block checksum no longer matches
    s3.put(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"s3://{s3.bucket}/{key}: tensor 'w', bytes ")):
        open_source(s3.url("ours")).tensors["w"].read()
    for where in (s3.url("ours"), f"s3://{s3.bucket}/{key}"):  # the tree, and the rank file alone
        problems, _, _ = verify_path(where)
        assert [p.where for p in problems] == [f"s3://{s3.bucket}/{key}"], problems
        assert re.fullmatch(re.escape(f"s3://{s3.bucket}/{key}: xxh3-64 ") + r"[0-9a-f]{16}, meta.json records "
                            r"[0-9a-f]{16}; the file is damaged: restore it or load another step", problems[0].message)

    build_legacy(tmp_path / "mf", [[(1, 1, 0)]], [(1, 1)])
    s3.upload(tmp_path / "mf", "mf")
    key = "mf/rank_0/tiny_rank_0-1_1.safetensors"
    s3.put(key, s3.get(key)[:-1])  # its last tensor runs past the end
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"s3://{s3.bucket}/{key}: not a valid safetensors file: ")):
        open_source(s3.url("mf"))
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{s3.url('nothing')} does not exist")):
        open_source(s3.url("nothing"))


def test_a_legacy_ckpt_file_reads_from_s3_as_locally(s3, tmp_path: Path) -> None:
    tensors = {"w": torch.randn(5, 3, generator=torch.Generator().manual_seed(SEED))}
    v1.save_ckpt(tmp_path / "r.ckpt", tensors, {"k": "v"})
    s3.put("one/r.ckpt", (tmp_path / "r.ckpt").read_bytes())
    got, meta = v1.load_ckpt(s3.url("one", "r.ckpt"))
    assert meta == {"k": "v"} and torch.equal(got["w"], tensors["w"])
