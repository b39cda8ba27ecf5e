"""safetensors_io's O_DIRECT writer: the same bytes and checksum as the page-cache writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from resumable.formats import safetensors_io
from resumable.storage import local as storage_local


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 1001, generator=g)
    return [
        ("a", torch.randn(3, 5, generator=g)),            # smaller than a page
        ("big", big),                                     # spans several blocks
        ("strided", big[:, 7:400]),                       # copied when its turn comes
        ("bf16", torch.randn(77, 3, generator=g).to(torch.bfloat16)),
        ("scalar", torch.tensor(3, dtype=torch.int64)),
        ("empty", torch.empty(0, 4)),
        ("tail", torch.randn(1001, generator=g)),         # the file ends mid-page
    ]


@pytest.mark.parametrize("block", [64 << 10, 1 << 20])
def test_direct_writer_matches_the_page_cache_writer_byte_for_byte(tmp_path: Path, block: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_local, "BLOCK_BYTES", block)
    monkeypatch.setattr(storage_local, "DIRECT_MIN_BYTES", 0)
    meta = {"k": "v"}
    direct = safetensors_io.write_file(tmp_path / "d.safetensors", _tensors(), meta)
    monkeypatch.setattr(storage_local, "DIRECT_MIN_BYTES", 1 << 62)
    cached = safetensors_io.write_file(tmp_path / "c.safetensors", _tensors(), meta)
    data = (tmp_path / "d.safetensors").read_bytes()
    assert data == (tmp_path / "c.safetensors").read_bytes()
    assert direct == cached == (len(data), xxhash.xxh3_64(data).hexdigest())
    loaded = load_file(str(tmp_path / "d.safetensors"))
    for key, t in _tensors():
        assert torch.equal(loaded[key], t), key


def test_direct_writer_refuses_a_wrong_tensor_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_local, "DIRECT_MIN_BYTES", 0)
    with pytest.raises(ValueError, match="was announced as"):
        safetensors_io.write_file_streaming(tmp_path / "x.safetensors", [("w", torch.float32, (2, 3))],
                                            lambda k: torch.ones(3, 2))
