"""``ensure_loadable`` never deletes what the user pointed at, nor anything it did not write.

A foreign ``load_checkpoint`` (here a real HuggingFace/unified folder written by
``resumable merge``) is converted into ``<output_dir>/converted_checkpoint``, which the
conversion replaces. An input that is, is inside or contains that folder, and a
``converted_checkpoint`` that holds the user's own files, are refused and left intact. A
MindFormers legacy tree on ``s3://`` (moto) converts into the local folder, recorded by its URLs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from resumable import latest
from resumable.errors import ConfigError
from resumable.formats import v2
from resumable.save import save
from resumable.sources import open_source
from resumable.train.foreign import CONVERTED, ForeignOptions, ensure_loadable
from resumable.tools.merge import merge
from tests.fixtures.ms_strategy import build_sharded_legacy, generic_state


def _unified(folder: Path, seed: int = 0) -> Path:
    """A foreign (non-v2) checkpoint: the unified folder ``merge`` writes of a real save."""
    g = torch.Generator().manual_seed(seed)
    scratch = folder.parent / f".scratch-{folder.name}"
    save({"model": {"w": torch.randn(4, 6, generator=g)}, "global_step": 3}, scratch, 3)
    merge(open_source(scratch), folder)
    shutil.rmtree(scratch)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_an_input_that_overlaps_converted_checkpoint_is_refused_and_kept(tmp_path, where):
    out = tmp_path / "output"
    if where == "is":
        src = _unified(out / CONVERTED)
    elif where == "inside":
        src = _unified(out / CONVERTED / "model")
    else:  # output_dir inside the input folder: the conversion would be written into the user's model
        src = _unified(tmp_path / "model")
        out = src / "output"
    before = _snapshot(src)
    how = {"is": "is that folder", "inside": "is inside that folder", "contains": "contains that folder"}[where]
    with pytest.raises(ConfigError) as err:
        ensure_loadable(src, out)
    assert str(err.value) == (
        f"load_checkpoint {src} is not a Checkpoint 2.0 folder, so it is converted into {out / CONVERTED}, which "
        f"the conversion replaces; but load_checkpoint {how}: move the checkpoint out of it, or set output_dir to "
        "a folder outside the checkpoint")
    assert _snapshot(src) == before


def test_a_converted_checkpoint_folder_holding_user_files_is_never_deleted(tmp_path):
    src = _unified(tmp_path / "model")
    out = tmp_path / "output"
    (out / CONVERTED).mkdir(parents=True)
    (out / CONVERTED / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds something that is not an earlier conversion .* never deleted"):
        ensure_loadable(src, out)
    assert (out / CONVERTED / "notes.txt").read_text() == "mine"


def test_an_earlier_conversion_of_another_source_is_replaced_and_the_same_source_reuses_it(tmp_path):
    out = tmp_path / "output"
    a, b = _unified(tmp_path / "a", seed=0), _unified(tmp_path / "b", seed=1)
    target = ensure_loadable(a, out)
    assert target == out / CONVERTED
    first = _snapshot(target)
    assert ensure_loadable(a, out) == target and _snapshot(target) == first  # reused, not rewritten
    assert ensure_loadable(b, out) == target
    assert torch.equal(open_source(target).tensors["w"].read(), open_source(b).tensors["w"].read())
    assert _snapshot(a) and _snapshot(b)  # both inputs intact


def test_a_sharded_mindformers_legacy_tree_on_s3_converts_once_into_the_local_output_dir(s3, tmp_path):
    """The trainer's ``load_checkpoint: s3://...`` (Checkpoint 2.0 mode) with the strategy files on the store."""
    build_sharded_legacy(tmp_path / "tree", generic_state(seed=5), dp=2, mp=2)
    s3.upload(tmp_path / "tree", "tree")
    out, options = tmp_path / "output", ForeignOptions(src_strategy=s3.url("tree", "strategy"))
    target = ensure_loadable(s3.url("tree"), out, options)
    assert target == out / CONVERTED
    origin = v2.read_common(latest(target))["converted_from"]
    assert (origin["path"], origin["src_strategy"]) == (s3.url("tree"), s3.url("tree", "strategy"))  # URLs, not s3:/
    local = open_source(tmp_path / "tree", src_strategy=tmp_path / "tree" / "strategy")
    converted = open_source(target)
    assert all(torch.equal(converted.tensors[n].read(), t.read()) for n, t in local.tensors.items())
    first = _snapshot(target)
    assert ensure_loadable(s3.url("tree"), out, options) == target and _snapshot(target) == first  # reused
