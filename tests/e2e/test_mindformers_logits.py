"""MindFormers Qwen3 checkpoints → ``resumable convert --to hf`` → ``transformers`` gives the original logits.

The reference is a random ``transformers.Qwen3ForCausalLM``; its state dict is written
under MindFormers names by tests/fixtures/qwen3_mf.py, which fuses ``linear_qkv`` and
``linear_fc1`` itself (not with ``resumable.models.qwen3``, whose splits are what is
checked), in each of MindFormers' layouts and for head shapes (heads, KV heads, head_dim)
with one, two, three and four KV groups. Containers are spread over the cases: 2.0 on TP2
with metadata.json, 2.0 on one rank, a legacy rank tree, a single ``.ckpt`` file.

The converted folder must hold exactly the reference's tensors (float32 in, float32 out:
``torch.equal``), so ``transformers`` computes bit-identical logits. The wrong layout flag
on a multi-KV-head checkpoint must give different logits: the check can fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from resumable.cli import main
from resumable.formats.ms_ckpt import write_ms_ckpt
from tests.fixtures.mindformers import build_legacy, build_v2
from tests.fixtures.qwen3_mf import VOCAB, Heads, legacy_scalars, mf_state, reference_model, write_hf_config

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


@dataclass(frozen=True)
class Case:
    heads: Heads
    contiguous_qkv: bool
    interleaved_fc1: bool
    container: str
    hf_config: bool  # pass --hf-config; otherwise the converter infers config.json from the shapes

    @property
    def id(self) -> str:
        h = self.heads
        return (f"{h.heads}h-{h.kv_heads}kv-{h.head_dim}d-{'contiguous' if self.contiguous_qkv else 'grouped'}-"
                f"{'interleaved' if self.interleaved_fc1 else 'concatenated'}-{self.container}"
                f"{'-hf-config' if self.hf_config else ''}")


# Each fused layout twice, each head shape twice, each container twice (not the full product: speed).
CASES = [
    Case(Heads(4, 2, 16), False, True, "2.0-tp2", False),
    Case(Heads(4, 2, 16), True, False, "legacy", True),
    Case(Heads(8, 1, 8), True, True, "ckpt", False),
    Case(Heads(8, 1, 8), False, False, "2.0-one-rank", True),
    Case(Heads(6, 3, 8), False, False, "ckpt", True),
    Case(Heads(6, 3, 8), True, True, "2.0-one-rank", False),
    Case(Heads(16, 4, 4), True, True, "2.0-tp2", True),
    Case(Heads(16, 4, 4), False, False, "legacy", False),
]


def _write(container: str, root: Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as a MindFormers checkpoint of kind ``container``; the path to convert."""
    if container == "2.0-tp2":
        build_v2(root, 10, state, dp=1, mp=2, prefix="qwen3")  # with metadata.json
    elif container == "2.0-one-rank":
        build_v2(root, 10, state)  # no metadata.json
    elif container == "legacy":  # two ranks, each holding a share of the full tensors
        build_legacy(root, saves=[[(1, 2, 0)], [(1, 2, 0)]], metas=[(1, 2), (1, 2)], remove_redundancy=True,
                     states=lambda epoch, step, _: {**state, **legacy_scalars(epoch, step)})
    else:
        root.mkdir()
        write_ms_ckpt(root / "qwen3.ckpt", state)
        return root / "qwen3.ckpt"
    return root


def _flags(contiguous_qkv: bool, interleaved_fc1: bool) -> list[str]:
    """The layout flags a user passes: only those that differ from MindFormers' defaults."""
    return ([] if not contiguous_qkv else ["--use-contiguous-weight-layout-attention", "true"]) + \
        ([] if interleaved_fc1 else ["--use-interleaved-weight-layout-mlp", "false"])


def _convert(src: Path, out: Path, flags: list[str]) -> torch.nn.Module:
    assert main(["convert", str(src), str(out), "--to", "hf", "--quiet", *flags]) == 0
    return transformers.Qwen3ForCausalLM.from_pretrained(out).eval()


def _exported(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_converted_mindformers_checkpoint_gives_transformers_the_reference_logits(tmp_path, case):
    reference = reference_model(case.heads, seed=0)
    expected = reference.state_dict()
    state = mf_state(expected, case.heads, contiguous_qkv=case.contiguous_qkv,
                     interleaved_fc1=case.interleaved_fc1, optimizer=case.container in ("2.0-tp2", "ckpt"))
    for name, t in state.items():
        if name.endswith(("linear_qkv.weight", "linear_fc1.weight")):  # a wrong row order must be visible
            assert torch.unique(t, dim=0).shape[0] == t.shape[0], f"{name}: fixture rows not distinct"
    src = _write(case.container, tmp_path / "mf", state)
    flags = _flags(case.contiguous_qkv, case.interleaved_fc1)
    if case.hf_config:
        flags += ["--hf-config", str(write_hf_config(reference, tmp_path / "config.json"))]
    converted = _convert(src, tmp_path / "hf", flags)

    exported = _exported(tmp_path / "hf")
    assert sorted(exported) == sorted(expected), "the export holds the model's tensors, no optimizer state"
    wrong = [n for n, t in expected.items() if exported[n].dtype != t.dtype or not torch.equal(exported[n], t)]
    assert wrong == []
    assert torch.equal(_logits(converted), _logits(reference))


@pytest.mark.parametrize("wrong_flags", [
    [],  # the qkv written [q; k; v] read as grouped (the default)
    ["--use-contiguous-weight-layout-attention", "true", "--use-interleaved-weight-layout-mlp", "false"],
], ids=["qkv-read-grouped", "fc1-read-concatenated"])
def test_the_wrong_layout_flag_gives_other_logits(tmp_path, wrong_flags):
    heads = Heads(4, 2, 16)
    reference = reference_model(heads, seed=2)
    state = mf_state(reference.state_dict(), heads, contiguous_qkv=True, interleaved_fc1=True)
    src = _write("2.0-one-rank", tmp_path / "mf", state)
    right = _convert(src, tmp_path / "right", ["--use-contiguous-weight-layout-attention", "true",
                                               "--use-interleaved-weight-layout-mlp", "true"])  # both said
    assert torch.equal(_logits(right), _logits(reference))
    wrong = _convert(src, tmp_path / "wrong", wrong_flags)
    assert not torch.allclose(_logits(wrong), _logits(reference), atol=1e-2, rtol=0)
