"""The sampler's KV cache (RowCache) and its per-row state (LiveRows), in the same row
order. Used by rollout.py's generate: one `step` per denoising forward of every live row,
`keep` when rows finish, `admit` when new ones join.
"""

from dataclasses import dataclass, fields

import torch

import attention


class RowCache:
    """A KV cache in which every row (sequence) has its own length, so that each row can be at
    a block of its own. Keys and values live in one buffer per layer, [rows, kv heads,
    capacity, head dim]. A forward runs a chunk of tokens per row at that row's `lengths[r]`,
    the chunks of all rows packed into one sequence (no padding in the linear layers; `attend`
    unpacks the queries). Its mask (`chunk_attention_mask`) never shows a column at or past a
    row's length outside the chunk, so a denoising step leaves nothing behind, and a clean
    block is kept by advancing the row's length past it. The live rows are the buffer's first
    `live` rows. The model (support/qwen3.py) calls only `attend`."""

    def __init__(self, model, rows, capacity):
        config, weight = model.config, model.lm_head.weight
        shape = (rows, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            for _ in range(config.num_hidden_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = torch.zeros(0, dtype=torch.long, device=weight.device)  # [R] clean columns of each row
        self.live, self.width = 0, 0  # width: columns the next forward attends over (chunk_attention_mask)
        self.rows = self.slots = self.columns = None  # [T] where the packed tokens of the next forward go
        self.chunk = 0  # the widest row chunk of the next forward

    def attend(self, layer, q, k, v, mask):
        """One layer's attention in a packed forward: the chunk's keys and values k, v [1, Hkv, T, D]
        are written at their rows' columns, the queries q [1, H, T, D] unpacked to [R, H, chunk, D]
        to meet their rows' keys, and the output packed back to [1, H, T, D]."""
        keys, values = self.keys[layer], self.values[layer]
        keys[self.rows, :, self.columns] = k[0].transpose(0, 1)  # [T, Hkv, D]: one per packed token
        values[self.rows, :, self.columns] = v[0].transpose(0, 1)
        unpacked = q.new_zeros(self.live, q.shape[1], self.chunk, q.shape[3])  # [R, H, chunk, D]
        unpacked[self.rows, :, self.slots] = q[0].transpose(0, 1)
        out = attention.attend(
            unpacked, keys[: self.live, :, : self.width], values[: self.live, :, : self.width], mask
        )
        return out[self.rows, :, self.slots].transpose(0, 1)[None]  # [1, H, T, D]

    def forward(self, model, tokens, rows, slots):
        """Run the model on a chunk per live row, packed: token t (tokens, rows, slots [T]) is
        column slots[t] of row rows[t]'s chunk, which is written at the row's length. Returns
        the hidden states [T, hidden] (the caller runs the LM head where it samples)."""
        self.chunk = int(slots.max()) + 1
        mask, self.width = chunk_attention_mask(self.lengths, self.chunk, model.config.block_size)
        self.rows, self.slots, self.columns = rows, slots, self.lengths[rows] + slots
        return model(tokens[None], self.columns[None], mask, cache=self)[0]

    def step(self, model, block, completed, writing):
        """One denoising forward of every live row: its current block [R, b] against its cache.
        A row that completed a block (`writing`, [R]) runs [completed ; block] instead, and the
        clean block `completed` [R, b] is kept in the cache. Returns the logits of every row's
        current block [R, b, V]."""
        b = block.shape[1]
        widths = b + writing.long() * b  # [R] the tokens each row runs
        rows, slots = packing(widths)  # [T]
        chunks = torch.cat([completed, block], 1)  # [R, 2b]
        columns = slots + 2 * b - widths[rows]  # [T] each packed token's column in `chunks`
        hidden = self.forward(model, chunks[rows, columns], rows, slots)  # [T, hidden]
        self.lengths += widths - b  # the written clean blocks are kept
        return model.lm_head(hidden[columns >= b]).view(len(widths), b, -1)  # the head where it samples

    def keep(self, order):
        """Row i becomes the old row order[i], for i < len(order): finished rows leave. Only
        the rows that change are copied."""
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        if moves:
            to, source = (torch.tensor(m, device=self.lengths.device) for m in zip(*moves))
            for buffer in self.keys + self.values:
                buffer[to] = buffer[source]  # the sources are read before any row is written
        self.lengths, self.live = self.lengths[order], len(order)

    def admit(self, model, prompts):
        """New rows join after the live ones, with each prompt's complete blocks prefilled.
        Equal complete blocks (the G samples of one prompt) are run once and copied."""
        b, device = model.config.block_size, self.lengths.device
        complete = [tuple(p[: len(p) // b * b]) for p in prompts]  # what the prefill runs
        clean = torch.tensor([len(c) for c in complete], device=device)  # [N]
        first, count = self.live, len(prompts)
        if int(clean.max()) > 0:
            distinct = {}  # complete blocks -> their row in the prefill
            source = [distinct.setdefault(c, len(distinct)) for c in complete]
            prefill = RowCache(model, len(distinct), capacity=int(clean.max()))
            prefill.live, prefill.lengths = len(distinct), torch.zeros_like(clean[: len(distinct)])
            ids = torch.tensor([t for c in distinct for t in c], device=device)  # [T]
            rows, slots = packing(torch.tensor([len(c) for c in distinct], device=device))
            prefill.forward(model, ids, rows, slots)  # only the cache is wanted
            index = torch.tensor(source, device=device)
            for mine, theirs in zip(self.keys + self.values, prefill.keys + prefill.values):
                mine[first : first + count, :, : prefill.width] = theirs[index]
        self.lengths, self.live = torch.cat([self.lengths, clean]), first + count


def packing(widths):
    """rows, slots [T] of chunks of widths[r] tokens per row, packed in row order."""
    rows = torch.repeat_interleave(torch.arange(len(widths), device=widths.device), widths)
    starts = torch.cumsum(widths, 0) - widths  # [R] where each row's chunk begins
    return rows, torch.arange(len(rows), device=widths.device) - starts[rows]


def compaction_order(live):
    """The rows that stay, as RowCache.keep wants them: the live rows among the first
    `count` stay in place and each dead one there takes a live row from the end."""
    count = sum(live)
    movers = [i for i in range(count, len(live)) if live[i]]
    return [i if live[i] else movers.pop() for i in range(count)]


def chunk_attention_mask(lengths, chunk, block_size):
    """[R, 1, W, K] bool for a chunk of W columns written at each row's length: every clean
    column of the row, and the chunk's own columns up to the end of the query's block
    (block-causal inside the chunk; one block is one bidirectional block). K = the longest
    row plus the chunk."""
    width = int(lengths.max()) + chunk
    col = torch.arange(width, device=lengths.device)[None, None, :]  # [1, 1, K]
    query = lengths[:, None, None] + torch.arange(chunk, device=lengths.device)[None, :, None]  # [R, W, 1]
    in_chunk = (col >= lengths[:, None, None]) & (col // block_size <= query // block_size)
    return ((col < lengths[:, None, None]) | in_chunk)[:, None], width


@dataclass
class LiveRows:
    """The sampler's state of every live row, in the RowCache's row order."""

    prompt: torch.Tensor  # [R] the index of the row's prompt
    block: torch.Tensor  # [R, b] the current block: the prompt's tail, committed tokens and masks
    masked: torch.Tensor  # [R, b] positions still to commit
    new: torch.Tensor  # [R, b] the response's positions in the block
    to_commit: torch.Tensor  # [R] masked positions the block started with (the static quota)
    step: torch.Tensor  # [R] denoising steps taken in the block
    step_map: torch.Tensor  # [R, b] the step each position was committed at (-1: not yet)
    logprobs: torch.Tensor  # [R, b] the committed tokens' logprobs
    writing: torch.Tensor  # [R] the next forward also writes `completed` to the cache
    completed: torch.Tensor  # [R, b] a completed block waiting to be written

    @classmethod
    def starting(cls, indices, prompts, block_size, mask_id, device):
        """Rows for prompts[i], i in indices, at their first block: the prompt's tail, if any,
        then masks."""
        block = torch.full((len(indices), block_size), mask_id, dtype=torch.long)
        for r, i in enumerate(indices):
            tail = prompts[i][len(prompts[i]) // block_size * block_size :]
            block[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        block = block.to(device)
        masked = block == mask_id
        return cls(
            prompt=torch.tensor(indices, dtype=torch.long, device=device),
            block=block,
            masked=masked,
            new=masked.clone(),
            to_commit=masked.sum(-1),
            step=torch.zeros(len(indices), dtype=torch.long, device=device),
            step_map=torch.full_like(block, -1),
            logprobs=torch.zeros(block.shape, device=device),
            writing=torch.zeros(len(indices), dtype=torch.bool, device=device),
            completed=block.clone(),
        )

    def select(self, index):
        return LiveRows(*(getattr(self, f.name)[index] for f in fields(self)))

    def extend(self, other):
        return LiveRows(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))
