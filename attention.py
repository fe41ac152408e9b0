"""attention.py - the block-diffusion attention rule, and the packed rows it runs over.

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

Backends, chosen per model (`--attn`): "flex" (FlexAttention with a cached BlockMask; the
default on CUDA), "sdpa" (a dense boolean [B, 1, N, N] mask from the same `mask_mod`; the
default elsewhere, since FlexAttention has no CPU backward) and "eager" (an additive float
mask and the softmax written out; for checking). The model (support/qwen3.py) hands the mask
to `attend`, whose kernel follows the mask's form.

Usage:  python attention.py --model PATH_OR_tiny [--save DIR]
        (prints what was loaded; --save writes it as a checkpoint of this project: support/model.py)

How this differs from the paper's code: the mask is built once per layout and
cached instead of on every forward; packed documents and noisy copies that skip
prompt-only blocks are part of the rule; one block size, read from the checkpoint.
"""

import functools
import hashlib
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("sdpa", "flex", "eager")  # the form of the mask, and so the attention kernel (`attend`)


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


def attend(q, k, v, mask):
    """Attention of queries q [B, H, Q, D] over keys and values k, v [B, Hkv, K, D] (grouped-query:
    each key/value head serves H / Hkv query heads, read in place) under `mask`, whose type is
    the backend: a BlockMask (flex; compiled on CUDA, the eager reference elsewhere), a bool
    tensor (sdpa) or an additive float tensor (eager: the softmax written out). -> [B, H, Q, D]"""
    scale, grouped = q.shape[-1] ** -0.5, q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=grouped)
    if mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=grouped)
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    weights = torch.softmax(q @ k.transpose(2, 3) * scale + mask, -1, dtype=torch.float32).to(q.dtype)
    return weights @ v


def forward_layout(model, input_ids, layout, at=None):
    """Run the model (support/qwen3.py) over a block-diffusion layout. input_ids [B, N] in layout
    order. at: None = logits at every position [B, N, V]; or (rows, cols), two [M] index tensors
    = logits at those positions only [M, V]: the LM head, with a real vocabulary the biggest
    matmul, then runs on exactly those hidden states."""
    device = input_ids.device
    mask = attention_mask_for(layout, model.attn, device, model.dtype)
    hidden = model(input_ids, layout.pos.to(device), mask)  # [B, N, hidden], after the final norm
    if at is None:
        return model.lm_head(hidden)
    rows, cols = at
    return model.lm_head(hidden[rows.to(device), cols.to(device)])


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


def replay_batch(records, mask_id, block_size, pad_id, row_len, rounds=None, all_masked=False):
    """The one builder of replay batches (dipo.py trains on them, the LMDeploy check re-scores
    with them): rollout records packed into rows of [clean ; one noisy copy per round]. Returns
    input_ids [B, N], the Layout, and per scored position (a dict of [N] tensors): row, col,
    token, record (index in `records`), index (in the response), committed (in that round) and
    sampler_step (a number per (record, round, block): the positions of one sampler step)."""
    replays = [
        replay_copies(r["prompt_ids"], r["response_ids"], r["step_map"], mask_id, block_size, rounds)
        for r in records
    ]
    documents = [
        (list(r["prompt_ids"]) + list(r["response_ids"]), noisy_from, copies)
        for r, (noisy_from, _, copies) in zip(records, replays)
    ]
    input_ids, layout, rows, first = pack_copies(documents, block_size, pad_id, row_len)
    where, sampler_steps = defaultdict(list), {}
    for row_index, row in enumerate(rows):
        for i in row:
            noisy_from, record_rounds, _ = replays[i]
            for col, token, t, s, block in replay_positions(
                records[i], noisy_from, record_rounds, first[i], block_size, all_masked
            ):
                where["row"].append(row_index)
                where["col"].append(col)
                where["token"].append(token)
                where["record"].append(i)
                where["index"].append(t)
                where["committed"].append(records[i]["step_map"][t] == s)
                where["sampler_step"].append(sampler_steps.setdefault((i, s, block), len(sampler_steps)))
    return input_ids, layout, {k: torch.tensor(v) for k, v in where.items()}


if __name__ == "__main__":  # python attention.py --model DIR [--save OUT]: support/model.py's command line
    from support.model import main

    main()
