"""The legacy layout (Checkpoint 1.0) on object storage is not built: every entry point given an
``s3://`` path refuses it at once with NotImplementedYet, before anything is read or written.

The danger refused: ``Path("s3://bucket/x")`` is the local folder ``s3:/bucket/x``, so an
unchecked entry point would quietly write a checkpoint under the working directory. Each case
runs in an empty working directory on a real S3 server (moto) and checks that neither the
bucket nor the working directory gained anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from resumable import storage
from resumable.errors import NotImplementedYet
from resumable.legacy import LegacyLoadOptions, LegacySaver, RankFiles, load_legacy, resolve_here, resolve_legacy
from resumable.legacy.strategy import check_strategy
from resumable.legacy.transform import transform, unify

LAYOUT = {"world_size": 1}


def _saver(directory: str | Path, strategy_dir: str | Path) -> LegacySaver:
    return LegacySaver(directory, prefix="CKP", fmt="safetensors", keep_checkpoint_max=None, remove_redundancy=False,
                       save_optimizer=True, strategy_dir=strategy_dir, layout=LAYOUT)


def _state() -> dict[str, Any]:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 4}


@pytest.fixture
def local_step(tmp_path: Path) -> Path:
    """A real local legacy tree with one step (what the load and conversion entry points get)."""
    tree = tmp_path / "local" / "checkpoint"
    _saver(tree, tree.parent / "strategy").save(_state(), 1, 4)
    return tree


# (entry point, the s3:// path it is given, relative to the bucket, and the key the message names)
CASES: dict[str, tuple[Callable[[str, Path], object], str, str]] = {
    "save into s3": (lambda url, tree: _saver(url, tree.parent / "strategy"), "ckpt", "the checkpoint folder"),
    "save, strategy into s3": (lambda url, tree: _saver(tree.parent / "new", url), "strategy", "the strategy folder"),
    "resolve an s3 tree": (lambda url, tree: resolve_legacy(url, True), "ckpt", "load_checkpoint"),
    "resolve a named s3 step": (lambda url, tree: resolve_legacy(url, "CKP_rank_0-1_4.safetensors"), "ckpt",
                                "load_checkpoint"),
    "resolve with an s3 output_dir": (lambda url, tree: resolve_legacy("", True, output_dir=url), "out",
                                      "output_dir"),
    "prefetch an s3 tree": (lambda url, tree: resolve_here(url, True, "safetensors", None, 0), "ckpt",
                            "load_checkpoint"),
    "load, converting into s3": (lambda url, tree: load_legacy(
        _state(), resolve_legacy(str(tree), True), LegacyLoadOptions(layout=LAYOUT, output_dir=url)), "out",
        "output_dir"),
    "load, strategy from s3": (lambda url, tree: load_legacy(
        _state(), resolve_legacy(str(tree), True),
        LegacyLoadOptions(layout={"world_size": 2}, auto_trans_ckpt=True, src_strategy_path_or_dir=url,
                          output_dir=str(tree.parent / "out"))), "strategy", "src_strategy_path_or_dir"),
    "unify into s3": (lambda url, tree: unify(resolve_legacy(str(tree), True), RankFiles(tree),
                                              storage.as_path(url), None), "out/unified_checkpoint", "output_dir"),
    "transform into s3": (lambda url, tree: transform(resolve_legacy(str(tree), True), RankFiles(tree),
                                                      storage.as_path(url), [{}], LAYOUT, 1, None),
                          "out/transformed_checkpoint", "output_dir"),
    "check a strategy on s3": (lambda url, tree: check_strategy(url, RankFiles(tree), ["rank_0/x.safetensors"]),
                               "strategy", "src_strategy_path_or_dir"),
}


def _local_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_s3_path_is_refused_before_anything_is_written(case: str, s3: Any, local_step: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    call, where, key = CASES[case]
    url = s3.url(*where.split("/"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # where Path("s3://...") would land
    before = _local_files(tmp_path)
    with pytest.raises(NotImplementedYet) as err:
        call(url, local_step)
    assert str(err.value) == (
        f"not implemented yet: {key} {url}: the legacy layout (use_legacy_format: true) on object storage; "
        "Checkpoint 2.0 (use_legacy_format: false) saves to and loads from s3:// paths, or copy the legacy "
        "checkpoint to a local folder first (aws s3 sync)")
    assert s3.keys() == []
    assert _local_files(tmp_path) == before  # no s3:/ folder, no new local folder, no conversion output
