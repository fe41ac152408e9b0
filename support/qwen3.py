"""Qwen3, the network inside every SDAR checkpoint, written out: token embeddings, RMSNorm,
rotary positions, grouped-query attention with Qwen3's q/k norm, the SwiGLU MLP and the LM
head (tied or untied). Used by every stage through support/model.py (load_model, checkpoints)
and by the sampler's row cache (support/row_cache.py).

The forward takes the block-diffusion layout directly: token ids and position ids [B, N] and
a mask from attention.attention_mask_for, whose type picks the backend (attention.attend). It
returns the hidden states after the final norm; the caller runs `lm_head` on the positions it
scores. Tensor names and config.json keys are Hugging Face's, so checkpoints go both ways;
tests/test_qwen3.py checks logits and gradients against transformers' Qwen3ForCausalLM.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import attention


@dataclass
class Qwen3Config:
    """config.json's keys that the network and the stages read; the rest ride along in `extra`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    block_size: int | None = None  # the diffusion block: SDAR's key, and ours
    mask_token_id: int | None = None
    instruction: str | None = None  # the sentence appended to every question (support/model.py)
    extra: dict = field(default_factory=dict)  # keys not read here, written back as they came


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SIZES += ("num_key_value_heads", "head_dim", "max_position_embeddings")
HF_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "rope_parameters"}
HF_KEYS |= {"rope_scaling", "hidden_act", "dtype", "torch_dtype", "layer_types", "use_sliding_window"}
HF_KEYS |= {"sliding_window", "max_window_layers"}  # written by us, or refused below when they matter


def config_from_dict(raw):
    """A Qwen3Config from config.json's dict (Qwen3's or SDAR's keys). ValueError names the key
    of what this network does not compute: another activation, RoPE scaling, sliding windows."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope {rope!r}: only plain RoPE (rope_type 'default') is implemented")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r}: Qwen3's MLP is SwiGLU ('silu')")
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
        raise ValueError(
            "use_sliding_window: sliding-window attention is not part of the block-diffusion rule"
        )
    known = {f.name for f in dataclasses.fields(Qwen3Config)} - {"extra"}
    values = {k: raw[k] for k in known if raw.get(k) is not None}
    values["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
    if (
        raw.get("head_dim") is None
        and isinstance(raw.get("hidden_size"), int)
        and raw.get("num_attention_heads")
    ):
        values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    for key in SIZES:
        if type(values.get(key)) is not int or values[key] <= 0:
            raise ValueError(f"{key} {values.get(key)!r} is not a positive integer")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
    extra = {k: v for k, v in raw.items() if k not in known and k not in HF_KEYS}
    return Qwen3Config(**values, extra=extra)


def config_to_dict(config, dtype):
    """config.json of a Qwen3 checkpoint that transformers' AutoModelForCausalLM opens as is."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
    return {
        **config.extra,
        **values,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "dtype": str(dtype).removeprefix("torch."),
    }


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # in float32 at least, as transformers does; float64 (the exact checks) stays
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary(position_ids, config, dtype):
    """cos, sin [B, N, head_dim] of every token's position, computed in float32 each call (a
    bfloat16 buffer of frequencies would shift the angles of late positions)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, N, D/2]
    angles = torch.cat([angles, angles], -1)  # [B, N, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    """RoPE on [B, heads, N, D]: each pair (x_i, x_{i+D/2}) turned by its position's angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + turned * sin[:, None]


class Attention(nn.Module):
    def __init__(self, c, index):
        super().__init__()
        self.index, self.head_dim = index, c.head_dim  # index: this layer's slot in a row cache
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # Qwen3: every head's query and key normalised
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, N, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, N, -1, self.head_dim)).transpose(1, 2)  # [B, H, N, D]
        k = self.k_norm(self.k_proj(x).view(B, N, -1, self.head_dim)).transpose(1, 2)  # [B, Hkv, N, D]
        v = self.v_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, N, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            out = attention.attend(q, k, v, mask)  # [B, H, N, D]
        else:  # the sampler: keys and values go into the row cache, the queries meet their rows there
            out = cache.attend(self.index, q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c, index):
        super().__init__()
        self.self_attn = Attention(c, index)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn = "sdpa"  # the attention backend of attention_mask_for (support/model.load_model sets it)
        # recompute each block in the backward (support/distributed.make_optimizer sets it)
        self.checkpointing = False
        self.model = nn.Module()
        on_meta = torch.empty(0).is_meta  # load_model builds on the meta device, then takes a checkpoint's
        weight = (
            torch.empty(config.vocab_size, config.hidden_size) if on_meta else None
        )  # (a meta normal_: 3 s)
        self.model.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, _weight=weight
        )
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        init_normal(self.model, config)  # transformers' order: the body, then the head
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_normal(self.lm_head, config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, input_ids, position_ids, mask, cache=None):
        """input_ids, position_ids [B, N] -> hidden states after the final norm [B, N, hidden]."""
        x = self.model.embed_tokens(input_ids)  # [B, N, hidden]
        cos, sin = rotary(position_ids, self.config, x.dtype)
        for layer in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.model.norm(x)


@torch.no_grad()
def init_normal(module, config):
    """transformers' initialisation in its order, so that a seed gives the same model there and
    here: every Linear and Embedding weight ~ N(0, initializer_range), biases 0, the padding
    token's embedding 0 (norms start at 1)."""
    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)) or m.weight.is_meta:
            continue  # norms start at 1; on the meta device (to take a checkpoint's tensors) nothing is drawn
        m.weight.normal_(0.0, config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
