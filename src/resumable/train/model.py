"""A Qwen3-architecture decoder whose parameter names are exactly HuggingFace's.

``Qwen3ForCausalLM(cfg).state_dict()`` has the keys of ``transformers``'
``Qwen3ForCausalLM``: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
``...q_norm.weight``, ``model.layers.{i}.mlp.gate_proj.weight``, ``model.norm.weight``,
``lm_head.weight``. Given the same weights it computes the same logits (same RMSNorm in
float32, same rotary embedding, same GQA grouping, causal attention, no biases).

Layers live in an ``nn.ModuleDict`` keyed ``"0" .. "L-1"`` rather than a ``ModuleList`` so a
pipeline stage can delete the layers it does not own and keep the global names
(``model.layers.7`` stays ``model.layers.7`` on the stage that holds it). A stage also drops
``embed_tokens`` (all but the first) and ``norm``/``lm_head`` (all but the last); the
forward passes then take and return hidden states instead of tokens/logits.

Under tensor parallelism the projections return local shards, so the attention reshapes
infer the local head count (``view(b, s, -1, head_dim)``) instead of reading the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resumable.train.config import ModelConfig


class RMSNorm(nn.Module):
    """HF's Qwen3RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim), computed in float32 as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)          # (s, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)           # (s, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # (b, s, heads, hd) -> norm per head -> (b, heads, s, hd); heads are local under TP.
        q = self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # GQA: query head h reads key/value head h // group, as HF's repeat_kv arranges.
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # Dropout draws from the global RNG, which a resume restores (rank_local) for bit-for-bit steps.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)  # (b, heads, s, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (b, s) on the first stage, hidden states (b, s, hidden) on later ones."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos, sin = rotary_cos_sin(h.shape[1], self.cfg.head_dim, self.cfg.rope_theta, h.dtype, h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.norm(h) if self.norm is not None else h


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 decoder with a language-model head; ``forward`` returns logits (b, s, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = Qwen3Model(cfg)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model(x)
        return self.lm_head(h) if self.lm_head is not None else h


def build_model(cfg: ModelConfig, seed: int) -> Qwen3ForCausalLM:
    """The full model on CPU, initialised from ``seed`` alone (same weights on every rank).

    Like HF's ``_init_weights``: normal(0, initializer_range) for linear and embedding
    weights, ones for norms. Parameters are drawn in ``named_parameters`` order from a
    private generator, so the weights depend on nothing but (cfg, seed).
    """
    model = Qwen3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied weight appears once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
    return model


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (b, s, vocab), targets (b, s)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

