"""attention.py - the block-diffusion attention rule, and the packed rows it runs over.

Every stage imports this file; it is the one place where the attention rule of a
blockwise diffusion LM (SDAR) is written down.

A training row holds, per document, one clean copy x0 and noisy versions of its
blocks, all sharing position ids (docs/design.md, "The mask"). With block(i) = pos(i) // b,
query i may attend key j of the same document when
  1. both are clean and block(j) <= block(i)            (block-causal),
  2. both are in the same noisy copy and block(j) == block(i)  (bidirectional in a block),
  3. i is noisy, j is clean and block(j) < block(i)     (a noisy block sees the clean past).
SFT has one noisy copy x_t ([x0 ; x_t], every block once); DiPO replays each block in
every denoising round that still masks one of its tokens, each version a copy of its own
(no token sees a noisy block but the block itself, so a block already whole is left out).
Several documents can be packed into one row: tokens of different documents never meet.
The noisy blocks start at a block boundary (`noisy_from`): blocks made only of prompt
tokens are never masked, so they need no noisy version.

Backends, chosen per model (`--attn`): "flex" (FlexAttention with a cached BlockMask; the
default on CUDA), "sdpa" (a dense boolean [B, 1, N, N] mask from the same `mask_mod`; the
default elsewhere, since FlexAttention has no CPU backward) and "eager" (an additive float
mask and the softmax written out; for checking). The model (support/qwen3.py) hands the mask
to `attend`, whose kernel follows the mask's form.

Usage:  python attention.py --model PATH_OR_tiny [--save DIR]
        (prints what was loaded; --save writes it as a checkpoint of this project: support/model.py)

How this differs from the paper's code: the mask is built once per layout and
cached instead of on every forward; packed documents and noisy versions of only the
blocks a round still masks (no prompt-only or finished blocks) are part of the rule; one
block size, read from the checkpoint.
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
    """Where every token of a batch sits. Token order inside a row: for each document, its
    clean copy, then its noisy blocks (each block's noisy versions side by side); padding
    (doc = -1) at the end of the row."""

    doc: torch.Tensor  # [B, N] document id inside the row; -1 = padding
    copy: torch.Tensor  # [B, N] 0 = clean copy x0, r >= 1 = the document's r-th noisy block version
    pos: torch.Tensor  # [B, N] position inside the document: the RoPE position and the block index source
    block_size: int

    def cache_key(self):
        rows = torch.stack([self.doc, self.copy, self.pos]).cpu().numpy().tobytes()
        return (tuple(self.doc.shape), self.block_size, hashlib.sha1(rows).hexdigest())


def noisy_spans(length, noisy_from, block_size):
    """(start, end) of each block of positions noisy_from..length-1 (the last may be short)."""
    return [(start, min(start + block_size, length)) for start in range(noisy_from, length, block_size)]


def make_layout(rows, block_size):
    """rows: one list per batch row of documents (length, noisy, noisy_from). The clean copy
    covers positions 0..length-1; then each block of noisy_from..length-1 comes in `noisy`
    noisy versions (an int: as many of every block; a list: one count per block), block after
    block. Each version is a copy of its own, so it sees only itself and the clean past. Rows
    are padded to the longest one."""
    cols = []
    for row in rows:
        doc, copy, pos = [], [], []
        for d, (length, noisy, noisy_from) in enumerate(row):
            if noisy_from % block_size or not 0 <= noisy_from <= length:
                raise ValueError(f"noisy_from={noisy_from} must be a block boundary inside 0..{length}")
            spans = noisy_spans(length, noisy_from, block_size)
            counts = [noisy] * len(spans) if isinstance(noisy, int) else list(noisy)
            if len(counts) != len(spans):
                raise ValueError(
                    f"{len(counts)} noisy counts for the {len(spans)} blocks of {noisy_from}..{length}"
                )
            doc += [d] * length
            copy += [0] * length
            pos += list(range(length))
            versions = 0
            for (start, end), count in zip(spans, counts):
                for _ in range(count):
                    versions += 1
                    doc += [d] * (end - start)
                    copy += [versions] * (end - start)
                    pos += list(range(start, end))
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


# ------------------------------------------------------------------------ packed rows [clean ; noisy blocks]


def replay_copies(prompt_ids, response_ids, step_map, mask_id, block_size, rounds=None):
    """The noisy versions that replay a sampled response. Round s masks every response token
    committed at step >= s, the state the sampler was in at step s of every block; the rounds
    are those that commit a token (or only `rounds`). A block is replayed in round s only if
    it still masks a token then: a block already whole has nothing to score, and no other
    token sees a noisy block. Blocks start at noisy_from, the first that holds a response token.
    Returns (noisy_from, block_rounds, versions): per block, its rounds and its tokens in each."""
    clean = list(prompt_ids) + list(response_ids)
    prompt_len = len(prompt_ids)
    noisy_from = prompt_len // block_size * block_size
    rounds = sorted(set(step_map)) if rounds is None else rounds
    block_rounds, versions = [], []
    for start, end in noisy_spans(len(clean), noisy_from, block_size):
        steps = [step_map[p - prompt_len] if p >= prompt_len else -1 for p in range(start, end)]  # -1: prompt
        last = max(steps)  # the block's last step: whole from round last + 1 on
        block_rounds.append([s for s in rounds if s <= last])
        versions.append(
            [
                [mask_id if step >= s else clean[start + i] for i, step in enumerate(steps)]
                for s in block_rounds[-1]
            ]
        )
    return noisy_from, block_rounds, versions


def pack_copies(documents, block_size, pad_id, row_len):
    """The one builder of training rows, for SFT (one noisy version of each block: x_t) and DiPO
    (one per round that replays the block). documents: (clean ids, noisy_from, versions), with
    versions[i] the noisy versions (token lists) of block i of noisy_from.. . A document's columns
    are [clean ; block 0's versions ; block 1's ...] inside one row (pack_rows). Returns input_ids
    [B, N], the Layout, the rows (document indices per row, in column order) and per document
    its noisy columns, {(version, position): column}."""
    sizes = [
        len(clean) + sum(len(t) for block in versions for t in block) for clean, _, versions in documents
    ]
    rows = pack_rows(sizes, row_len)
    ids, spec, columns = [], [], [None] * len(documents)
    for row in rows:
        row_ids, row_spec = [], []
        for d in row:
            clean, noisy_from, versions = documents[d]
            row_ids += clean
            columns[d] = {}
            for (start, _), block in zip(noisy_spans(len(clean), noisy_from, block_size), versions):
                for k, tokens in enumerate(block):
                    columns[d].update({(k, start + i): len(row_ids) + i for i in range(len(tokens))})
                    row_ids += tokens
            row_spec.append((len(clean), [len(block) for block in versions], noisy_from))
        ids.append(row_ids)
        spec.append(row_spec)
    width = max(len(r) for r in ids)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in ids])  # [B, N]
    return input_ids, make_layout(spec, block_size), rows, columns


def replay_positions(record, noisy_from, block_rounds, columns, block_size, all_masked=False):
    """Where a packed replay (replay_copies, pack_copies) scores a record: (column, token id,
    index in the response, round, block) for every token each round commits, or with
    all_masked every position it masks (the exact estimator's selection factor needs the
    distribution at the ones not kept too). columns: the record's, from pack_copies."""
    clean = list(record["prompt_ids"]) + list(record["response_ids"])
    prompt_len, step_map = len(record["prompt_ids"]), record["step_map"]
    out = []
    for (start, end), rounds in zip(noisy_spans(len(clean), noisy_from, block_size), block_rounds):
        for k, s in enumerate(rounds):
            for pos in range(max(start, prompt_len), end):
                step = step_map[pos - prompt_len]
                if step >= s and (all_masked or step == s):
                    out.append((columns[k, pos], clean[pos], pos - prompt_len, s, pos // block_size))
    return out


def replay_batch(records, mask_id, block_size, pad_id, row_len, rounds=None, all_masked=False):
    """The one builder of replay batches (dipo.py trains on them, the LMDeploy check re-scores
    with them): rollout records packed into rows of [clean ; each block's noisy versions, one
    per round that replays it] (replay_copies). Returns
    input_ids [B, N], the Layout, and per scored position (a dict of [N] tensors): row, col,
    token, record (index in `records`), index (in the response), committed (in that round) and
    sampler_step (a number per (record, round, block): the positions of one sampler step)."""
    replays = [
        replay_copies(r["prompt_ids"], r["response_ids"], r["step_map"], mask_id, block_size, rounds)
        for r in records
    ]
    documents = [
        (list(r["prompt_ids"]) + list(r["response_ids"]), noisy_from, versions)
        for r, (noisy_from, _, versions) in zip(records, replays)
    ]
    input_ids, layout, rows, columns = pack_copies(documents, block_size, pad_id, row_len)
    where, sampler_steps = defaultdict(list), {}
    for row_index, row in enumerate(rows):
        for i in row:
            noisy_from, block_rounds, _ = replays[i]
            for col, token, t, s, block in replay_positions(
                records[i], noisy_from, block_rounds, columns[i], block_size, all_masked
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
