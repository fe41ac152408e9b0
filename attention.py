"""attention.py - the block-diffusion attention rule, and loading/saving models.

Every stage imports this file; it is the one place where the attention rule of a
blockwise diffusion LM (SDAR) is written down.

A training row holds, per document, one clean copy x0 and R >= 1 noisy copies,
all sharing position ids (docs/design.md, "The mask"). With block(i) = pos(i) // b,
query i may attend key j of the same document when
  1. both are clean and block(j) <= block(i)            (block-causal),
  2. both are in the same noisy copy and block(j) == block(i)  (bidirectional in a block),
  3. i is noisy, j is clean and block(j) < block(i)     (a noisy block sees the clean past).
R = 1 is SFT ([x_t ; x0]); R = number of denoising rounds is DiPO. Several
documents can be packed into one row: tokens of different documents never meet.
A noisy copy may start at any block boundary (`noisy_from`): blocks made only of
prompt tokens are never masked, so they need no noisy copy.

Backends, chosen per model (`--attn`): "flex" (FlexAttention with a cached
BlockMask; the default on CUDA), "sdpa" (a dense boolean [B, 1, N, N] mask built
from the same `mask_mod`; the default elsewhere, since FlexAttention has no CPU
backward) and "eager" (an additive float mask; for checking). The mask reaches
transformers' attention function untouched because we pass it as a dict keyed by
layer type, which Qwen3Model forwards as-is. Both masks run through functions registered
with transformers' AttentionInterface: "dirl_flex" (FlexAttention) and "dirl_sdpa" (torch's
SDPA told that the model uses grouped key/value heads, so they are not copied per head).

Models: `load_model("tiny")` builds the small Qwen3 + character tokenizer used on
CPU; `load_model(dir)` opens a checkpoint this project wrote or an SDAR
checkpoint (model_type "sdar", Qwen3 weights) as a plain Qwen3ForCausalLM,
without trust_remote_code. The block size and the mask token id live in the
model's config.json (`block_size`, `mask_token_id`) and nowhere else.

Usage:  python attention.py --model PATH_OR_tiny [--save DIR]
        (prints what was loaded; --save writes it as a checkpoint of this project)

How this differs from the paper's code: the mask is built once per layout and
cached instead of on every forward; packed documents and noisy copies that skip
prompt-only blocks are part of the rule; one block size, read from the checkpoint.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from common import flag, parse_config

EOS_TOKEN = "<|endoftext|>"  # also the padding token, as in SDAR
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MASK_TOKEN_NAMES = ("<|MASK|>", "<MASK>")  # SDAR's name; one file of its release uses the second
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, MASK_TOKEN_NAMES[0]]
DEFAULT_BLOCK_SIZE = 4
DIRL_INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."
TINY_INSTRUCTION = ""  # every character is a token for the tiny tokenizer, and the task always boxes
BACKENDS = {"sdpa": "dirl_sdpa", "eager": "eager", "flex": "dirl_flex"}  # our name -> transformers' name


# ----------------------------------------------------------------------------- the mask


@dataclass
class Layout:
    """Where every token of a batch sits. Token order inside a row: for each document,
    its clean copy, then its noisy copies 1..R; padding (doc = -1) at the end of the row."""

    doc: torch.Tensor  # [B, N] document id inside the row; -1 = padding
    copy: torch.Tensor  # [B, N] 0 = clean copy x0, r >= 1 = noisy copy r
    pos: torch.Tensor  # [B, N] position inside the document: the RoPE position and the block index source
    block_size: int

    def cache_key(self):
        rows = torch.stack([self.doc, self.copy, self.pos]).cpu().numpy().tobytes()
        return (tuple(self.doc.shape), self.block_size, hashlib.sha1(rows).hexdigest())


def make_layout(rows, block_size):
    """rows: one list per batch row of documents (length, num_noisy, noisy_from); the document's
    clean copy covers positions 0..length-1 and each noisy copy positions noisy_from..length-1.
    Rows are padded to the longest one."""
    cols = []
    for row in rows:
        doc, copy, pos = [], [], []
        for d, (length, num_noisy, noisy_from) in enumerate(row):
            if noisy_from % block_size or not 0 <= noisy_from <= length:
                raise ValueError(f"noisy_from={noisy_from} must be a block boundary inside 0..{length}")
            noisy = length - noisy_from
            doc += [d] * (length + num_noisy * noisy)
            copy += [0] * length + [r for r in range(1, num_noisy + 1) for _ in range(noisy)]
            pos += list(range(length)) + list(range(noisy_from, length)) * num_noisy
        cols.append((doc, copy, pos))
    width = max(len(doc) for doc, _, _ in cols)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    as_tensor = lambda i, v: torch.tensor([pad(c[i], v) for c in cols], dtype=torch.long)  # noqa: E731
    # Padding is one extra document per row (doc -1, clean, position 0): it attends only to itself,
    # so no softmax row is empty and no real token ever sees it.
    return Layout(doc=as_tensor(0, -1), copy=as_tensor(1, 0), pos=as_tensor(2, 0), block_size=block_size)


def block_diffusion_mask_mod(layout):
    """The three rules of docs/design.md as a FlexAttention mask_mod over flat row indices.
    Written with tensor ops only, so it also runs broadcast over index grids (dense mask)."""
    doc, copy, blk = layout.doc, layout.copy, layout.pos // layout.block_size

    def mask_mod(b, h, q, kv):
        same_doc = doc[b, q] == doc[b, kv]
        cq, ck, bq, bk = copy[b, q], copy[b, kv], blk[b, q], blk[b, kv]
        clean_block_causal = (cq == 0) & (ck == 0) & (bk <= bq)
        same_noisy_block = (cq > 0) & (ck == cq) & (bk == bq)
        noisy_sees_clean_past = (cq > 0) & (ck == 0) & (bk < bq)
        return same_doc & (clean_block_causal | same_noisy_block | noisy_sees_clean_past)

    return mask_mod


def dense_mask(layout):
    """[B, 1, N, N] bool, True = may attend: the mask_mod evaluated on the full index grid."""
    B, N = layout.doc.shape
    b = torch.arange(B, device=layout.doc.device)[:, None, None]
    q = torch.arange(N, device=layout.doc.device)[None, :, None]
    kv = torch.arange(N, device=layout.doc.device)[None, None, :]
    return block_diffusion_mask_mod(layout)(b, None, q, kv)[:, None]


_MASK_CACHE = OrderedDict()  # (backend, device, dtype, layout key) -> mask, least recently used first
_MASK_CACHE_SIZE = 32


def attention_mask_for(layout, backend, device, dtype=torch.float32):
    """The mask in the form `backend` wants, built once per layout and cached: a BlockMask
    (flex), a bool tensor (sdpa) or an additive float tensor (eager; bool is wrong there)."""
    key = (backend, str(device), dtype, layout.cache_key())
    if key in _MASK_CACHE:
        _MASK_CACHE.move_to_end(key)
        return _MASK_CACHE[key]
    on_device = Layout(
        layout.doc.to(device), layout.copy.to(device), layout.pos.to(device), layout.block_size
    )
    if backend == "flex":
        B, N = layout.doc.shape
        mask = create_block_mask(block_diffusion_mask_mod(on_device), B, None, N, N, device=device)
    elif backend == "sdpa":
        mask = dense_mask(on_device)
    elif backend == "eager":
        allowed = dense_mask(on_device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {sorted(BACKENDS)}")
    _MASK_CACHE[key] = mask
    if len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return mask


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for "dirl_flex": query [B, H, Q, D], key/value [B, Hkv, K, D],
    attention_mask a BlockMask. Compiled on CUDA (once per shape); the eager reference elsewhere."""
    attend = _compiled_flex_attention() if query.is_cuda else flex_attention
    out = attend(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None  # [B, Q, H, D], no attention weights


def _sdpa_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_rows=None, **kwargs
):
    """transformers attention function for "dirl_sdpa": torch's SDPA with the boolean mask and
    enable_gqa, so that every query head reads its key/value head in place. (transformers'
    own "sdpa" copies each key/value head once per query head whenever a mask is given: a
    third of a sampling forward on the tiny model. The outputs are the same to the bit.)
    Called without a mask of ours, transformers builds its causal one with `sdpa_mask`, or
    passes None where plain causal attention is meant.

    packed_rows = (rows, slots, width), three things rollout.RowCache passes: the query is
    then [1, H, T, D], chunks of several rows packed into one sequence so that the linear
    layers see no padding; token t is query `slots[t]` of row `rows[t]`. The queries are
    unpacked to [R, H, width, D] to meet the keys of their rows [R, Hkv, K, D], and packed
    back."""
    if packed_rows is not None:
        rows, slots, width = packed_rows
        unpacked = query.new_zeros(key.shape[0], query.shape[1], width, query.shape[3])
        unpacked[rows, :, slots] = query[0].transpose(0, 1)  # [T, H, D] into [R, H, width, D]
        query = unpacked
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=attention_mask is None and query.shape[2] > 1,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    if packed_rows is not None:
        return out[rows, :, slots][None], None  # [1, T, H, D]
    return out.transpose(1, 2).contiguous(), None  # [B, Q, H, D], no attention weights


AttentionInterface.register(BACKENDS["flex"], _flex_attention_forward)
AttentionInterface.register(BACKENDS["sdpa"], _sdpa_attention_forward)
AttentionMaskInterface.register(BACKENDS["sdpa"], sdpa_mask)
transformers.utils.logging.disable_progress_bar()  # a bar per load or save would bury the stages' own bars


def backend_of(model):
    ours = {v: k for k, v in BACKENDS.items()}
    return {**ours, "sdpa": "sdpa"}[model.config._attn_implementation]  # transformers' sdpa: our dense mask


def forward_layout(model, input_ids, layout, at=None):
    """Run a Qwen3ForCausalLM over a block-diffusion layout. input_ids [B, N] in layout order.
    at: None = logits at every position [B, N, V]; or (rows, cols), two [M] index tensors =
    logits at those positions only [M, V]: the LM head, with a real vocabulary the biggest
    matmul, then runs on exactly those hidden states."""
    device = input_ids.device
    mask = attention_mask_for(layout, backend_of(model), device, model.dtype)
    out = model(
        input_ids=input_ids,
        attention_mask={
            layer_type: mask for layer_type in set(model.config.layer_types)
        },  # passed on untouched
        position_ids=layout.pos.to(device),
        logits_to_keep=0
        if at is None
        else 1,  # with `at`, the model's own LM head runs on one position per row
        output_hidden_states=at is not None,
        use_cache=False,
    )
    if at is None:
        return out.logits
    rows, cols = at
    return model.lm_head(
        out.hidden_states[-1][rows.to(device), cols.to(device)]
    )  # hidden_states[-1]: after the final norm


def sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """log of the distribution the sampler draws from [..., V]: logits / temperature, then the
    top-k tokens, then the smallest set holding top_p of the mass, renormalised; -inf outside.
    Shared by rollout.py (which draws from it) and dipo.py --estimator exact (which scores
    with it), so the two cannot drift apart. Differentiable in the logits: the kept sets are
    piecewise constant. temperature 0 (greedy) is treated as 1 here; greedy has no gradient."""
    scores = logits if logits.dtype == torch.float64 else logits.float()
    scores = scores / temperature if temperature > 0 else scores
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    logq = torch.log_softmax(scores, -1)
    if top_p < 1.0:
        sorted_q, order = logq.exp().sort(-1, descending=True)
        drop = sorted_q.cumsum(-1) - sorted_q >= top_p  # tokens after the mass is reached
        logq = torch.log_softmax(
            logq.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf")), -1
        )
    return logq


def pack_rows(sizes, row_len):
    """First-fit decreasing: lists of indices whose sizes sum to at most row_len (a larger
    item gets a row of its own)."""
    rows, room = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, free in enumerate(room):
            if sizes[i] <= free:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(row_len - sizes[i])
    return rows


# ------------------------------------------------------------------------ packed rows [clean ; noisy copies]


def replay_copies(prompt_ids, response_ids, step_map, mask_id, block_size, rounds=None):
    """The noisy copies that replay a sampled response: one per denoising round s that commits
    a token (or only `rounds`), round s masking every response token committed at step >= s,
    which is the state the sampler was in at step s of every block. Each copy covers
    positions noisy_from.. (noisy_from: the first block that holds a response token).
    Returns (noisy_from, rounds, copies)."""
    clean = list(prompt_ids) + list(response_ids)
    prompt_len = len(prompt_ids)
    noisy_from = prompt_len // block_size * block_size
    rounds = sorted(set(step_map)) if rounds is None else rounds
    copies = [
        [
            mask_id if pos >= prompt_len and step_map[pos - prompt_len] >= s else clean[pos]
            for pos in range(noisy_from, len(clean))
        ]
        for s in rounds
    ]
    return noisy_from, rounds, copies


def pack_copies(documents, block_size, pad_id, row_len):
    """The one builder of training rows, for SFT (one noisy copy x_t per document) and DiPO
    (one copy per denoising round). documents: (clean ids, noisy_from, copies), each copy the
    tokens of positions noisy_from.. . A document's columns are [clean ; copy 0 ; copy 1 ...]
    inside one row (pack_rows). Returns input_ids [B, N], the Layout, the rows (document
    indices per row, in column order) and each document's first column; position p of copy
    k is at copy_column(first, len(clean), noisy_from, k, p)."""
    sizes = [len(clean) + len(copies) * (len(clean) - noisy_from) for clean, noisy_from, copies in documents]
    rows = pack_rows(sizes, row_len)
    ids, spec, first = [], [], [0] * len(documents)
    for row in rows:
        row_ids, row_spec = [], []
        for d in row:
            clean, noisy_from, copies = documents[d]
            first[d] = len(row_ids)
            row_ids += list(clean) + [t for copy in copies for t in copy]
            row_spec.append((len(clean), len(copies), noisy_from))
        ids.append(row_ids)
        spec.append(row_spec)
    width = max(len(r) for r in ids)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in ids])  # [B, N]
    return input_ids, make_layout(spec, block_size), rows, first


def copy_column(first, length, noisy_from, k, pos):
    """Column of position `pos` of noisy copy k of a document that starts at column `first`."""
    return first + length + k * (length - noisy_from) + pos - noisy_from


def replay_positions(record, noisy_from, rounds, first, block_size, all_masked=False):
    """Where a packed replay (replay_copies, pack_copies) scores a record: (column, token id,
    index in the response, round, block) for every token each round commits, or with
    all_masked every position it masks (the exact estimator's selection factor needs the
    distribution at the ones not kept too). first: the record's first column in its row."""
    clean = list(record["prompt_ids"]) + list(record["response_ids"])
    prompt_len, step_map = len(record["prompt_ids"]), record["step_map"]
    out = []
    for k, s in enumerate(rounds):
        for pos in range(max(noisy_from, prompt_len), len(clean)):
            step = step_map[pos - prompt_len]
            if step >= s and (all_masked or step == s):
                col = copy_column(first, len(clean), noisy_from, k, pos)
                out.append((col, clean[pos], pos - prompt_len, s, pos // block_size))
    return out


# ----------------------------------------------------------------------------- the text format


def render_chat(messages, add_generation_prompt=False):
    """DiRL's one text format (ChatML without system prompt or think tags)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def render_prompt(question, instruction):
    """A question as the user turn, the instruction sentence appended, ready for the answer."""
    content = f"{question}\n{instruction}" if instruction else question
    return render_chat([{"role": "user", "content": content}], add_generation_prompt=True)


CHAT_TEMPLATE = (  # the same format as render_chat, for tools that call apply_chat_template
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- models


@dataclass
class TinyConfig:
    """The built-in model: Qwen3-shaped, about 1M parameters, sized for 2 CPU cores."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0


def build_char_tokenizer():
    """Character-level tokenizer: the 4 special tokens, then every printable ASCII character and
    newline. Any other character becomes <|endoftext|>; the built-in task uses none."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(seed=0, tiny=None):
    tokenizer = build_char_tokenizer()
    tiny = tiny or TinyConfig()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,  # as SDAR
        block_size=DEFAULT_BLOCK_SIZE,
        instruction=TINY_INSTRUCTION,
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN_NAMES[0]),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dataclasses.asdict(tiny),
    )
    with torch.random.fork_rng():  # the init must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model, tokenizer


def mask_token_id_of(tokenizer):
    for name in MASK_TOKEN_NAMES:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    return None


def qwen3_config_from_sdar(raw):
    """SDAR's config.json is Qwen3's plus custom-code keys; drop those and build a Qwen3Config."""
    keep = {
        k: v
        for k, v in raw.items()
        if k not in ("model_type", "architectures", "auto_map", "transformers_version")
    }
    return Qwen3Config(**keep)


def load_model(name_or_dir, dtype=torch.float32, device="cpu", attn="auto", seed=0):
    """Load (model, tokenizer) from "tiny", a checkpoint of this project, or an SDAR dir.
    The model's config always carries `block_size`, `mask_token_id` and `instruction`
    (the sentence appended to questions, DiRL's unless the checkpoint says otherwise) afterwards."""
    if attn == "auto":
        attn = "flex" if torch.device(device).type == "cuda" else "sdpa"
    if attn not in BACKENDS:
        raise ValueError(f"unknown attention backend {attn!r}; choose from {sorted(BACKENDS)} or 'auto'")
    if name_or_dir == "tiny":
        model, tokenizer = build_tiny(seed)
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a model directory (no config.json); pass a checkpoint dir or 'tiny'"
            )
        raw = json.loads((path / "config.json").read_text())
        if raw.get("model_type") == "sdar":
            config = qwen3_config_from_sdar(raw)
        elif raw.get("model_type") == "qwen3":
            config = Qwen3Config.from_pretrained(path)
        else:
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is neither 'sdar' nor 'qwen3'")
        if getattr(config, "use_sliding_window", False):
            raise ValueError(f"{path}: sliding-window attention is not part of the block-diffusion rule")
        tokenizer = AutoTokenizer.from_pretrained(path)
        mask_id = mask_token_id_of(tokenizer)
        if mask_id is None:
            raise ValueError(
                f"{path}: the tokenizer has no mask token (looked for {', '.join(MASK_TOKEN_NAMES)})"
            )
        if getattr(config, "mask_token_id", None) not in (None, mask_id):
            raise ValueError(
                f"{path}: config mask_token_id {config.mask_token_id} differs from the tokenizer's "
                f"mask token id {mask_id}"
            )
        config.mask_token_id = mask_id
        config.block_size = (
            getattr(config, "block_size", None) or DEFAULT_BLOCK_SIZE
        )  # some SDAR copies omit it
        config.instruction = getattr(config, "instruction", DIRL_INSTRUCTION)
        embedding = (config.vocab_size, config.hidden_size)
        if (path / "model.safetensors").is_file():  # one file (ours): check its embedding's shape first
            with safe_open(path / "model.safetensors", "pt") as weights:
                if "model.embed_tokens.weight" in weights.keys():
                    shape = tuple(weights.get_slice("model.embed_tokens.weight").get_shape())
                    if shape != embedding:
                        raise ValueError(
                            f"{path}: config.json says embeddings {embedding}, the weights {shape}"
                        )
        try:
            model = Qwen3ForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        except (OSError, RuntimeError, ValueError) as e:  # missing or mis-shaped weights
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: the weights do not load with its config.json ({first})") from None
    model.set_attn_implementation(BACKENDS[attn])
    return model.to(device=device, dtype=dtype), tokenizer


def save_checkpoint(model, tokenizer, out_dir, state_dict=None, trainer_state=None):
    """Write an HF model dir (config.json, model.safetensors, tokenizer files) atomically:
    into a temporary sibling first, then os.replace, so `out_dir` is always whole or absent.
    state_dict: the full weights when the model is sharded; trainer_state: saved beside them
    as trainer_state.pt, so weights and optimizer state can never come from different steps."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # a plain from_pretrained must not need our registry
    try:  # save_pretrained empties the dict it is given, hence the copy
        model.save_pretrained(tmp, state_dict=dict(state_dict) if state_dict is not None else None)
    finally:
        model.config._attn_implementation = attn
    tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- command line


@dataclass
class Config:
    model: str = flag("tiny", "'tiny' or a model dir (a checkpoint of this project or an SDAR checkpoint)")
    save: str = flag("", "if set, write the loaded model here as a checkpoint of this project")
    attn: str = flag("auto", "attention backend: auto (flex on CUDA, else sdpa), flex, sdpa or eager")
    seed: int = flag(0, "initialisation seed of the tiny model")


def main(cfg):
    model, tokenizer = load_model(cfg.model, attn=cfg.attn, seed=cfg.seed)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.model}: Qwen3 {params / 1e6:.2f}M params, hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, vocab {c.vocab_size}, block_size {c.block_size}, "
        f"mask_token_id {c.mask_token_id}, attn {backend_of(model)}"
    )
    if cfg.save:
        save_checkpoint(model, tokenizer, cfg.save)
        print(f"saved to {cfg.save}")


if __name__ == "__main__":
    try:
        main(parse_config(Config, description=__doc__))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
