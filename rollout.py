"""rollout.py - sample a blockwise diffusion LM block by block, recording how every token was committed.

Reads  runs/<run>/policy/latest (step k) and its checkpoint, or --policy DIR
       prompts: --data FILE (JSON list or JSONL, {"question", "ground_truth_answer"} or the
       benchmark layouts eval.load_prompts accepts); default the built-in RL split
Writes runs/<run>/rollouts/step_<k>.jsonl, or --out FILE; one line per sampled response:
       policy_step, prompt_id, question, ground_truth_answer, prompt_ids, response_ids,
       step_map, logprobs, text, reward, finish, sampler (docs/design.md, "The rollout record");
       with --dynamic-sampling also step_<k>.stream.json beside it: the stream positions its
       rounds used ({start, end, rounds, prompts_sampled, groups_kept}), where step k+1 starts

Usage: python rollout.py --run runs/arith [--num-prompts 128 --group-size 8]
       torchrun --nproc-per-node N -- rollout.py --run runs/arith   (each process samples every N-th
                                                    sequence; process 0 writes the one file)
       python rollout.py --policy DIR --data data/arith_test.jsonl --group-size 1 --out FILE

An existing output file is kept, not overwritten (--force resamples), so rerunning a killed
shell loop resumes it.

The sampler (docs/design.md, "The sampler"). Blocks sit at
absolute positions from 0, as in training; a prompt that ends inside a block generates the
rest of that block first. Each prompt's complete blocks are prefilled into a KV cache once.
Then every denoising step runs only a row's current block against the cache, draws a token
at every masked position (temperature, top-k, top-p) and commits some of them:
  low_confidence_dynamic  the most confident token plus every token with confidence >= --threshold
  low_confidence_static   a fixed quota per step, the most confident first (--denoising-steps)
  sequential              the leftmost masked token (one per step)
Rows advance independently: every batch forward is a denoising step of every live row, and
a row whose block is complete writes that clean block to the cache in the same forward as
the first step of its next block, so no row waits for the slowest one (RowCache keeps a
length per row, and packs the rows' chunks into one sequence, so that no row is padded).
A sequence stops at the block holding eos or <|im_end|>, or at --max-new-tokens, and leaves
the batch at once; waiting sequences take the free rows, at most --batch-size at a time,
and the G samples of a prompt share its prefill (for evaluation only, --ban-eos and
--min-new-tokens follow DiRL's protocol: no <|endoftext|>, no stop token before N new
tokens; dipo.py refuses such files). For every
committed token the record keeps its step inside its block (step_map) and
its log-probability at temperature 1 in the state it was committed in (logprobs): DiPO
rebuilds exactly those states, which is what makes it unbiased.

Randomness is per sequence (a generator seeded by seed, policy step, prompt and sample), so
a record does not depend on the batch it was sampled in.

--engine lmdeploy (CUDA) samples with LMDeploy instead, from the same flags
(lmdeploy_settings), and converts its outputs into the same records (record_from_engine):
its per-sequence step counter becomes the in-block step_map; a build without step maps is
refused, never guessed around. Our model then re-scores --rescore records in the states
their step maps imply and the engine-trainer logprob gap is printed and logged (or, when
the engine gives no logprobs, our scores fill them in).

--dynamic-sampling is DAPO's dynamic sampling as DiRL's RL script runs it: groups whose
rewards are all equal carry no advantage, so rounds of the stream's next --num-prompts
prompts are sampled until --num-prompts groups with 0 < mean reward < 1 are kept (at most
--max-sample-rounds rounds; the metrics line says how many prompts that took, and the
shortfall).

How this differs from the paper's code: the paper samples with a patched LMDeploy 0.10.1
that returns step maps and never checks the engine's logprobs against the trainer's; here
the default sampler is plain PyTorch (any device), LMDeploy is optional, and its gap to
the trainer is measured on every call. LMDeploy's response ends at the stop token, so
whatever it committed after that token in the same block is not in the record, and DiPO's
replay of that last block lacks it (dipo.py's mismatch line shows the size of that gap).
"""

import hashlib
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.cache_utils import Cache

import attention
import common
import eval as grader
from common import flag

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory: samples policy/latest into rollouts/step_<k>.jsonl")
    policy: str = flag("", "sample this checkpoint dir instead of the run's latest (needs --out)")
    out: str = flag("", "write here instead of runs/<run>/rollouts/step_<k>.jsonl")
    data: str = flag("data/arith_rl.jsonl", "prompt file (JSON list or JSONL)")
    num_prompts: int = flag(
        128, "prompts per call, taken in a seeded order that moves on with the policy step; 0 = all"
    )
    group_size: int = flag(8, "responses sampled per prompt (G)")
    batch_size: int = flag(256, "sequences sampled together; a finished one makes room for the next")
    strategy: str = flag("low_confidence_dynamic", f"commit rule: {', '.join(STRATEGIES)}")
    threshold: float = flag(0.9, "low_confidence_dynamic: commit every token at least this confident")
    denoising_steps: int = flag(4, "low_confidence_static: steps per block")
    temperature: float = flag(1.0, "sampling temperature (0 = greedy)")
    top_k: int = flag(0, "keep the k most likely tokens (0 = all)")
    top_p: float = flag(1.0, "keep the smallest set of tokens with this much probability")
    max_new_tokens: int = flag(96, "stop at the first block boundary at or past this many response tokens")
    block_size: int = flag(0, "must equal the checkpoint's block size if given (0 = the checkpoint's)")
    instruction: str = flag("auto", "sentence appended to questions; 'auto' = the checkpoint's")
    answer_format: str = flag("boxed", "how the grader reads answers: boxed or gsm8k")
    ban_eos: bool = flag(
        False,
        "evaluation only (DiRL's protocol): never sample <|endoftext|>, so that a response "
        "stops only at <|im_end|>; dipo.py refuses such files",
    )
    min_new_tokens: int = flag(
        0,
        "evaluation only (DiRL's protocol: 128): no stop token at the first N response "
        "positions; dipo.py refuses such files",
    )
    engine: str = flag(
        "torch", "torch (this sampler) or lmdeploy (CUDA, needs a build that returns step maps)"
    )
    tp: int = flag(1, "--engine lmdeploy: tensor-parallel GPUs for the engine")
    rescore: int = flag(
        64, "--engine lmdeploy: records re-scored by our model to measure the engine-trainer logprob gap"
    )
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    dtype: str = flag("float32", "float32 or bfloat16")
    seed: int = flag(0, "sampling seed")
    dynamic_sampling: bool = flag(
        False,
        "keep only groups whose mean reward is strictly between 0 and 1, sampling the stream's next "
        "--num-prompts prompts in rounds until --num-prompts such groups are kept (DAPO's dynamic "
        "sampling, as train/rollout_dapo_server.py in OpenMOSS/DiRL)",
    )
    max_sample_rounds: int = flag(
        6, "--dynamic-sampling: at most this many rounds, then the file holds what was kept"
    )
    force: bool = flag(False, "overwrite an existing output file")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")


# ----------------------------------------------------------------------------- the math


def sample_tokens(logits, temperature, top_k, top_p, uniforms, banned=None):
    """logits [B, b, V], uniforms [B, b] in [0, 1), banned: None or bool broadcastable to
    [B, b, V] (tokens never drawn there). Returns the drawn tokens [B, b], their confidence
    (probability under the filtered, tempered distribution that attention.sampling_logprobs
    defines, with the banned tokens removed) and their logprob under the model at
    temperature 1 before any filtering (the quantity DiPO replays)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    allowed = logits if banned is None else logits.masked_fill(banned, float("-inf"))
    probs = attention.sampling_logprobs(allowed, temperature, top_k, top_p).exp()
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:  # inverse CDF: the first token whose cumulative probability exceeds the uniform
        cdf = probs.cumsum(-1)
        tokens = torch.searchsorted(cdf, (uniforms * cdf[..., -1])[..., None].contiguous(), side="right")[
            ..., 0
        ]
        tokens = tokens.clamp(max=logits.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0], logp.gather(-1, tokens[..., None])[..., 0]


def static_quota(num_masked, steps, step):
    """Tokens low_confidence_static commits at `step` when a block starts with `num_masked`
    masked positions: an even split over `steps`, the remainder on the first steps. Ints, or
    tensors of one quota per row."""
    return num_masked // steps + (step < num_masked % steps) * 1


def choose_commits(confidence, masked, strategy, threshold=0.9, quota=None):
    """Which masked positions to commit this step: [B, b] bool. quota [B] for the static rule."""
    neg = torch.finfo(confidence.dtype).min
    conf = confidence.masked_fill(~masked, neg)
    if strategy == "sequential":
        first = masked.int().argmax(-1)  # leftmost masked position
        commit = torch.zeros_like(masked).scatter(-1, first[:, None], True)
    elif strategy == "low_confidence_dynamic":
        best = torch.zeros_like(masked).scatter(-1, conf.argmax(-1, keepdim=True), True)
        commit = (conf >= threshold) | best
    elif strategy == "low_confidence_static":
        rank = conf.argsort(-1, descending=True).argsort(-1)  # 0 = most confident
        commit = rank < quota[:, None]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return commit & masked


def banned_tokens(cfg, vocab_size, eos_id, stop_ids, response_index):
    """bool [B, b, V] of tokens the evaluation switches forbid, or None without them.
    response_index [B, b]: each column's position in its response (negative in the prompt)."""
    if not cfg.ban_eos and cfg.min_new_tokens <= 0:
        return None
    banned = torch.zeros(*response_index.shape, vocab_size, dtype=torch.bool, device=response_index.device)
    if cfg.ban_eos:
        banned[..., eos_id] = True
    early = response_index < cfg.min_new_tokens  # [B, b]
    for t in stop_ids:
        banned[..., t] |= early
    return banned


class RowCache(Cache):
    """A KV cache in which every row (sequence) has its own length, so that each row can be at
    a block of its own. Keys and values live in one preallocated buffer per layer,
    [rows, kv heads, capacity, head dim]. A forward runs a chunk of tokens per row, written
    at that row's `lengths[r]`; the chunks of all rows are packed into one sequence, so that
    a short chunk costs no padding in the linear layers (attention.py's "dirl_sdpa" unpacks
    the queries to meet their rows' keys). What a query may see is the 4D mask `forward`
    builds (`chunk_attention_mask`), which never shows a column at or past a row's length
    outside the chunk being written; so a denoising step leaves nothing behind (the next
    chunk overwrites it), and a clean block is kept by advancing the row's length past it.
    The live rows are the buffer's first `live` rows: rows that finish leave with `keep`,
    which moves only the rows that fill their places, and new rows join after them with
    `admit`. Only `update` is used by the model: positions and masks are given explicitly."""

    def __init__(self, model, rows, capacity):
        super().__init__(layers=[])  # the base class's per-layer objects are replaced by the buffers below
        config, weight = model.config, model.lm_head.weight
        shape = (rows, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [
            torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            for _ in range(config.num_hidden_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = torch.zeros(0, dtype=torch.long, device=weight.device)  # [R] clean columns of each row
        self.live, self.width = 0, 0  # width: columns the next forward attends over (chunk_attention_mask)
        self.rows = self.columns = None  # [T] where the packed tokens of the next forward are written

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.columns] = key_states[0].transpose(0, 1)  # [T, H, D]: one per packed token
        values[self.rows, :, self.columns] = value_states[0].transpose(0, 1)
        return keys[: self.live, :, : self.width], values[: self.live, :, : self.width]

    def get_seq_length(self, layer_idx=0):
        return int(self.lengths.max())

    def forward(self, model, tokens, rows, slots, logits_to_keep=0):
        """Run the model on a chunk per live row, packed: token t (tokens, rows, slots [T]) is
        column slots[t] of row rows[t]'s chunk, which is written at the row's length. Returns
        the logits [T, V] (only the last token's with logits_to_keep=1)."""
        width = int(slots.max()) + 1
        mask, self.width = chunk_attention_mask(self.lengths, width, model.config.block_size)
        self.rows, self.columns = rows, self.lengths[rows] + slots
        out = model(
            input_ids=tokens[None],
            position_ids=self.columns[None],
            past_key_values=self,
            use_cache=True,
            attention_mask={t: mask for t in set(model.config.layer_types)},
            logits_to_keep=logits_to_keep,
            packed_rows=(rows, slots, width),
        )
        return out.logits[0]

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
            prefill.forward(model, ids, rows, slots, logits_to_keep=1)  # only the cache is wanted
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


@torch.no_grad()
def generate(model, prompts, generators, cfg, stop_ids, batch_size=0, progress=None):
    """Sample one response per prompt. prompts: lists of token ids; generators: one per prompt.
    Returns per prompt a dict: response_ids, step_map, logprobs, finish, forwards.

    At most batch_size rows (0 = all) are live; a row that finishes leaves at once, and the
    waiting prompts join, prefilled together, once a quarter of the batch is free. Every
    forward is a denoising step of every live row. A row whose block is complete writes that
    clean block to the cache in the same forward as the first step of its next block: its
    chunk is [clean block ; next block], the other rows' is their current block. So no row
    waits for the slowest one. progress(k) is called when k rows finish."""
    if model.config._attn_implementation != attention.BACKENDS["sdpa"]:
        raise ValueError(
            "rollout.generate packs its rows for attention.py's sdpa backend: load with attn='sdpa'"
        )
    b, mask_id, device = model.config.block_size, model.config.mask_token_id, model.device
    eos_id = model.config.eos_token_id
    batch_size = batch_size or len(prompts)
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)  # [N]
    capacity = int(prompt_len.max()) + cfg.max_new_tokens + 3 * b
    cache = RowCache(model, min(batch_size, len(prompts)), capacity)
    live = LiveRows.starting([], prompts, b, mask_id, device)
    waiting = list(range(len(prompts)))  # prompts not started yet, in order
    results = [dict(response_ids=[], step_map=[], logprobs=[], finish="length", forwards=0) for _ in prompts]
    while waiting or cache.live:
        # waiting prompts take the free rows: prefilled together, so only when enough are free
        free = batch_size - cache.live
        if waiting and free >= min(len(waiting), max(1, batch_size // 4)):
            joining, waiting = waiting[:free], waiting[free:]
            cache.admit(model, [prompts[i] for i in joining])
            live = live.extend(LiveRows.starting(joining, prompts, b, mask_id, device))

        # one chunk per row, packed: [clean block ; current block] if it writes, else [current block]
        widths = b + live.writing.long() * b  # [R]
        rows, slots = packing(widths)  # [T]
        chunks = torch.cat([live.completed, live.block], 1)  # [R, 2b]
        columns = slots + 2 * b - widths[rows]  # [T] each packed token's column in `chunks`
        logits = cache.forward(model, chunks[rows, columns], rows, slots)  # [T, V]
        logits = logits[columns >= b].view(len(widths), b, -1)  # [R, b, V] each row's current block
        cache.lengths += widths - b  # the written clean blocks are kept

        # every row draws a token at every position of its block and commits some of them
        sequences = live.prompt.tolist()  # the prompt (and generator) of each live row
        uniforms = torch.stack([torch.rand(b, generator=generators[r]) for r in sequences])  # per sequence
        response_index = (
            cache.lengths[:, None] + torch.arange(b, device=device) - prompt_len[live.prompt, None]
        )
        banned = banned_tokens(cfg, logits.shape[-1], eos_id, stop_ids, response_index)
        tokens, confidence, logp = sample_tokens(
            logits, cfg.temperature, cfg.top_k, cfg.top_p, uniforms.to(device), banned
        )
        quota = static_quota(live.to_commit, cfg.denoising_steps, live.step)  # [R]
        commit = choose_commits(confidence, live.masked, cfg.strategy, cfg.threshold, quota)
        live.block = torch.where(commit, tokens, live.block)
        live.step_map = torch.where(commit, live.step[:, None], live.step_map)
        live.logprobs = torch.where(commit, logp, live.logprobs)
        live.masked &= ~commit
        live.step += 1
        for r in sequences:
            results[r]["forwards"] += 1

        # rows that completed their block record it; they stop, or write it in the next forward
        done = ~live.masked.any(-1)  # [R] the block is complete
        live.writing = done.clone()
        for j in done.nonzero().flatten().tolist():
            result, new = results[sequences[j]], live.new[j]
            committed = live.block[j][new].tolist()
            result["response_ids"] += committed
            result["step_map"] += live.step_map[j][new].tolist()
            result["logprobs"] += live.logprobs[j][new].tolist()
            stopped = any(t in stop_ids for t in committed)
            if stopped or len(result["response_ids"]) >= cfg.max_new_tokens:
                result["finish"] = "stop" if stopped else "length"
                live.writing[j] = False
        live.completed = torch.where(live.writing[:, None], live.block, live.completed)
        w = live.writing  # the rows that go on start their next block, all masked
        live.block[w], live.masked[w], live.new[w], live.to_commit[w] = mask_id, True, True, b
        live.step[w], live.step_map[w], live.logprobs[w] = 0, -1, 0.0
        staying = ~done | live.writing
        if not staying.all():  # finished rows leave the batch
            order = compaction_order(staying.tolist())
            cache.keep(order)
            live = live.select(torch.tensor(order, dtype=torch.long, device=device))
            if progress:
                progress(len(staying) - len(order))
    return results


def stop_index(response_ids, stop_ids):
    """Index of the first stop token, or the length if there is none."""
    return next((i for i, t in enumerate(response_ids) if t in stop_ids), len(response_ids))


def select_prompts(num_prompts, total, seed, step, start=None):
    """Indices of the prompts for policy step `step`: the next num_prompts of common's data
    stream (from position step x num_prompts, or `start`), a fresh seeded order every pass
    through the file (0 = all, in file order)."""
    if num_prompts <= 0:
        return list(range(total))
    return [i for _, i in common.data_stream(step, num_prompts, total, seed, start)]


def dynamic_rounds(sample_round, round_prompts, num_prompts, max_rounds):
    """DAPO's dynamic sampling. Round r samples every group of round_prompts(r) (the stream's
    next prompts) with sample_round(prompts) -> records, and keeps, in stream order, the groups
    whose mean reward is strictly between 0 and 1 (the others have no advantage to learn from),
    until num_prompts groups are kept or max_rounds rounds are done; a prompt is kept once per
    step. If no group was kept, the file holds the last round's groups: none has a learning
    signal, and dipo.py carries the policy over. Returns (records, {rounds, prompts_sampled,
    groups_kept})."""
    kept, kept_prompts, sampled, records = [], set(), 0, []
    for r in range(max_rounds):
        prompts = list(dict.fromkeys(round_prompts(r)))  # a prompt twice in a round would merge groups
        records = sample_round(prompts)
        sampled += len(prompts)
        groups = defaultdict(list)
        for record in records:
            groups[record["prompt_id"]].append(record)
        for i in prompts:
            group = groups[str(i)]
            mean = sum(g["reward"] for g in group) / len(group)
            if 0 < mean < 1 and i not in kept_prompts and len(kept_prompts) < num_prompts:
                kept += group
                kept_prompts.add(i)
        if len(kept_prompts) >= num_prompts:
            break
    return (kept or records), {"rounds": r + 1, "prompts_sampled": sampled, "groups_kept": len(kept_prompts)}


def stream_start(cfg, step, out):
    """Where this step's prompts start in the stream: where the previous step's rounds stopped
    (its step_<k-1>.stream.json beside the rollouts), else at step x num_prompts."""
    previous = out.with_name(f"step_{step - 1:06d}.stream.json")
    if cfg.policy or cfg.out or step == 0 or not previous.is_file():
        return step * cfg.num_prompts
    try:
        end = json.loads(previous.read_text())["end"]
    except (json.JSONDecodeError, KeyError, TypeError):
        end = None
    if not common.is_int(end) or end < 0:
        raise ValueError(
            f"{previous}: end: not a stream position; delete it to restart at step x --num-prompts"
        )
    return end


def sequence_seed(seed, step, prompt_id, sample):
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- engines


def lmdeploy_settings(cfg, block_size, eos_id=None):
    """Our sampler flags as LMDeploy's: (PytorchEngineConfig kwargs, GenerationConfig kwargs).
    LMDeploy commits block_size // dllm_denoising_steps tokens per static or sequential step,
    so `sequential` (one per step) is its sequential rule with block_size steps, and a static
    quota that does not divide the block is refused (ours would split the remainder). In a
    partial first block LMDeploy's static quota stays b // steps where ours splits the masked
    count evenly: the rule differs there, DiPO does not care (it replays the recorded
    step_map), --estimator exact refuses engine rollouts."""
    steps = block_size if cfg.strategy == "sequential" else cfg.denoising_steps
    if cfg.strategy == "low_confidence_static" and block_size % steps:
        raise ValueError(
            f"--engine lmdeploy: --denoising-steps {steps} must divide the block size {block_size} "
            "(LMDeploy commits block_size // steps tokens per step)"
        )
    if cfg.dtype != "bfloat16":
        raise ValueError(
            "--engine lmdeploy computes in bfloat16 (or float16), not float32: pass --dtype bfloat16"
        )
    engine = {
        "dllm_block_length": block_size,
        "dllm_unmasking_strategy": cfg.strategy,
        "dllm_denoising_steps": steps,
        "dllm_confidence_threshold": cfg.threshold,
        "dtype": "bfloat16",
        "tp": cfg.tp,
    }
    generation = {
        "do_sample": cfg.temperature > 0,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "logprobs": 1,
    }
    if cfg.min_new_tokens > 0:
        generation["min_new_tokens"] = cfg.min_new_tokens
    if cfg.ban_eos:
        generation["bad_token_ids"] = [eos_id]
    return engine, generation


def record_from_engine(prompt_len, token_ids, step_map, logprobs, finish_reason, block_size):
    """One LMDeploy response as our record's fields: (response_ids, step_map, logprobs, finish).
    The patched engine's step_map is one counter per sequence that grows on every iteration
    that unmasks something, across blocks (DiRL's patched LMDeploy 0.10.1); ours counts from 0
    inside each block. Every step commits at least one token, so a block's counters are
    consecutive and subtracting the block's first one converts them; anything else is
    refused rather than guessed. logprobs: LMDeploy's per-token {token id: logprob} dicts
    (None when the engine gave none: the caller re-scores)."""
    if len(step_map) != len(token_ids) or (logprobs is not None and len(logprobs) != len(token_ids)):
        raise ValueError(
            f"--engine lmdeploy: {len(token_ids)} tokens but {len(step_map)} step_map entries"
            + ("" if logprobs is None else f" and {len(logprobs)} logprobs")
        )
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"--engine lmdeploy: finish_reason {finish_reason!r} (expected stop or length)")
    counters = {}  # block -> the counters of its tokens
    for i, s in enumerate(step_map):
        counters.setdefault((prompt_len + i) // block_size, []).append(s)
    for block, members in counters.items():
        if sorted(set(members)) != list(range(min(members), max(members) + 1)):
            raise ValueError(
                f"--engine lmdeploy: block {block}'s step counters {members} are not consecutive"
            )
    first = {block: min(members) for block, members in counters.items()}
    local = [s - first[(prompt_len + i) // block_size] for i, s in enumerate(step_map)]
    lps = None
    if logprobs is not None:
        lps = []
        for i, (token, scores) in enumerate(zip(token_ids, logprobs)):
            scores = {int(k): float(v) for k, v in scores.items()}
            if token not in scores:
                raise ValueError(
                    f"--engine lmdeploy: token {i} ({token}) has no logprob in the engine output"
                )
            lps.append(scores[token])
    return list(token_ids), local, lps, finish_reason


def require_lmdeploy():
    """The lmdeploy module, if installed and able to return step maps; else a clear refusal."""
    try:
        import lmdeploy  # optional, requirements-gpu.txt
    except ImportError:
        raise ValueError(
            "--engine lmdeploy: lmdeploy is not installed "
            "(pip install -r requirements-gpu.txt on a CUDA machine)"
        ) from None
    from lmdeploy.messages import Response

    if "step_map" not in getattr(Response, "__dataclass_fields__", {}):
        raise ValueError(
            f"--engine lmdeploy: this LMDeploy build ({lmdeploy.__version__}) does not return the step at "
            "which each token was unmasked (Response.step_map); DiPO replays exactly those states, so "
            "rollouts without it cannot be trained on. Use --engine torch, or a build with DiRL's patch "
            '(README, "LMDeploy").'
        )
    return lmdeploy


def lmdeploy_generate(policy, texts, seeds, cfg, block_size, eos_id):
    """Sample with LMDeploy (CUDA): one response per rendered prompt text, the patched build's
    Response.step_map required. Returns the Response objects."""
    lmdeploy = require_lmdeploy()
    engine, generation = lmdeploy_settings(cfg, block_size, eos_id)
    GenerationConfig, PytorchEngineConfig, pipeline = (
        lmdeploy.GenerationConfig,
        lmdeploy.PytorchEngineConfig,
        lmdeploy.pipeline,
    )
    with tempfile.TemporaryDirectory() as view:
        pipe = pipeline(str(engine_view(policy, Path(view))), backend_config=PytorchEngineConfig(**engine))
        try:  # the prompts are rendered already: no chat template on top
            return pipe(
                texts,
                gen_config=[GenerationConfig(**generation, random_seed=s) for s in seeds],
                do_preprocess=False,
            )
        finally:
            pipe.close()


def engine_view(policy, view):
    """Our checkpoints are saved as Qwen3 (model_type "qwen3"); LMDeploy picks its dLLM SDAR
    model by architecture name. The view links every file of the checkpoint and rewrites only
    config.json's architectures to SDARForCausalLM (model_type stays qwen3, which transformers'
    AutoConfig reads without SDAR's custom code). Returns the view's dir."""
    for f in Path(policy).iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((Path(policy) / "config.json").read_text())
    (view / "config.json").write_text(json.dumps({**config, "architectures": ["SDARForCausalLM"]}, indent=2))
    return view


def rescore(model, records, micro_batch_size):
    """Our model's logprob (float32, temperature 1, unfiltered) of every response token in the
    state its step_map implies: the packed rows dipo.py trains with (attention.replay_copies,
    attention.pack_copies, attention.replay_positions), one forward per micro-batch. Returns
    one list per record."""
    scores = [[0.0] * len(r["response_ids"]) for r in records]
    c = model.config
    for start in range(0, len(records), micro_batch_size):
        chunk = records[start : start + micro_batch_size]
        replays = [
            attention.replay_copies(
                r["prompt_ids"], r["response_ids"], r["step_map"], c.mask_token_id, c.block_size
            )
            for r in chunk
        ]
        documents = [
            (list(r["prompt_ids"]) + list(r["response_ids"]), noisy_from, copies)
            for r, (noisy_from, _, copies) in zip(chunk, replays)
        ]
        input_ids, layout, rows, first = attention.pack_copies(
            documents, c.block_size, c.eos_token_id, row_len=0
        )
        at_rows, at_cols, tokens, owners = [], [], [], []  # owners: (record in chunk, index in its response)
        for row_index, row in enumerate(rows):
            for d in row:
                noisy_from, rounds, _ = replays[d]
                for col, token, t, _, _ in attention.replay_positions(
                    chunk[d], noisy_from, rounds, first[d], c.block_size
                ):
                    at_rows.append(row_index)
                    at_cols.append(col)
                    tokens.append(token)
                    owners.append((d, t))
        with torch.no_grad():
            at = (torch.tensor(at_rows), torch.tensor(at_cols))
            logits = attention.forward_layout(model, input_ids.to(model.device), layout, at=at).float()
            logp = torch.log_softmax(logits, -1).gather(
                -1, torch.tensor(tokens, device=model.device)[:, None]
            )
        for (d, t), v in zip(owners, logp[:, 0].tolist()):
            scores[start + d][t] = v
    return scores


def lmdeploy_results(policy, texts, prompt_ids, seeds, cfg, block_size, eos_id):
    """Sample every job with LMDeploy; the same dicts as generate() returns (logprobs None
    when the engine gave none)."""
    responses = lmdeploy_generate(policy, texts, seeds, cfg, block_size, eos_id)
    results = []
    for ids, resp in zip(prompt_ids, responses):
        if resp.input_token_len != len(ids):
            raise ValueError(
                f"--engine lmdeploy: the engine read {resp.input_token_len} prompt tokens where our "
                f"tokenizer has {len(ids)}: the checkpoint's tokenizers differ"
            )
        response, step_map, logprobs, finish = record_from_engine(
            len(ids), resp.token_ids, resp.step_map, resp.logprobs, resp.finish_reason, block_size
        )
        results.append(dict(response_ids=response, step_map=step_map, logprobs=logprobs, finish=finish))
    return results


def check_engine_logprobs(model, records, sample_size):
    """The engine-trainer check DiRL never makes: re-score every len/sample_size-th record with
    our model in the states its step_map implies and compare with the engine's logprobs.
    Records without engine logprobs get ours (all of them are re-scored then)."""
    missing = [r for r in records if r["logprobs"] is None]
    for r, scores in zip(missing, rescore(model, missing, 4)):
        r["logprobs"] = scores
    if missing:
        print("the engine returned no logprobs: every record's logprobs are our model's re-score")
        return {"engine_logprobs": False}
    sample = records[:: max(1, len(records) // max(1, sample_size))]
    gaps = [
        abs(a - b)
        for r, scores in zip(sample, rescore(model, sample, 4))
        for a, b in zip(r["logprobs"], scores)
    ]
    check = {
        "engine_logprobs": True,
        "engine_mismatch_mean": sum(gaps) / max(1, len(gaps)),
        "engine_mismatch_max": max(gaps, default=0.0),
        "engine_mismatch_records": len(sample),
    }
    print(
        f"engine-trainer logprob gap over {len(sample)} re-scored records: mean "
        f"{check['engine_mismatch_mean']:.1e} max {check['engine_mismatch_max']:.1e}"
    )
    return check


# ----------------------------------------------------------------------------- main


def sampler_settings(cfg, model_config):
    """The `sampler` field of every record: what dipo.py checks the rollouts against, and what
    --estimator exact needs to replay the commit rule."""
    return {
        "block_size": model_config.block_size,
        "mask_token_id": model_config.mask_token_id,
        "strategy": cfg.strategy,
        "threshold": cfg.threshold,
        "denoising_steps": cfg.denoising_steps,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "engine": cfg.engine,
        "seed": cfg.seed,
        "ban_eos": cfg.ban_eos,
        "min_new_tokens": cfg.min_new_tokens,
    }


def make_record(policy_step, prompt_index, prompt, prompt_ids, result, text, reward, sampler):
    """One line of the rollout file (docs/design.md, "The rollout record"); the prompt's own
    extra fields ride along at the end."""
    return {
        "policy_step": policy_step,
        "prompt_id": str(prompt_index),
        "question": prompt["question"],
        "ground_truth_answer": prompt["ground_truth_answer"],
        "prompt_ids": prompt_ids,
        "response_ids": result["response_ids"],
        "step_map": result["step_map"],
        "logprobs": result["logprobs"],
        "text": text,
        "reward": reward,
        "finish": result["finish"],
        "sampler": sampler,
        **{k: v for k, v in prompt.items() if k not in ("question", "ground_truth_answer")},
    }


def batch_summary(records, seconds):
    """The metrics line's numbers for a rollout file."""
    n = max(1, len(records))
    new_tokens = sum(len(r["response_ids"]) for r in records)
    return {
        "reward": sum(r["reward"] for r in records) / n,
        "response_tokens": new_tokens / n,
        "tokens_per_forward": new_tokens / max(1, sum(grader.forwards_of(r) for r in records)),
        "truncated": sum(r["finish"] == "length" for r in records) / n,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
    }


def gather_records(out, records, rank, world):
    """Under torchrun: each process writes its share next to `out`, and process 0 reads them all
    and deals them back into job order (job k was process k % world's). Leaves the group."""
    part = out.with_name(f"{out.name}.rank{rank}.part")
    common.write_atomic(part, "".join(json.dumps(r) + "\n" for r in records))
    torch.distributed.barrier()
    if rank == 0:
        parts = [
            [json.loads(line) for line in out.with_name(f"{out.name}.rank{r}.part").read_text().splitlines()]
            for r in range(world)
        ]
        records = [parts[k % world][k // world] for k in range(sum(map(len, parts)))]
    torch.distributed.barrier()  # every part is read before any is removed
    part.unlink()
    common.finish_distributed(world)
    return records


def output_path(cfg):
    """(policy step, policy dir, output file) for this call."""
    if cfg.policy:
        if not cfg.out:
            raise ValueError("--policy needs --out (the run's rollout files belong to its own latest policy)")
        name = Path(cfg.policy).name
        step = int(name[len("step_") :]) if name.startswith("step_") and name[len("step_") :].isdigit() else 0
        return step, Path(cfg.policy), Path(cfg.out)
    step, policy = common.latest_policy(cfg.run)
    return step, policy, Path(cfg.out) if cfg.out else Path(cfg.run) / "rollouts" / f"step_{step:06d}.jsonl"


def check_flags(cfg):
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"--strategy {cfg.strategy!r}: choose from {', '.join(STRATEGIES)}")
    if cfg.engine not in ("torch", "lmdeploy"):
        raise ValueError(f"--engine {cfg.engine!r}: choose torch or lmdeploy")
    if cfg.dynamic_sampling and (cfg.num_prompts <= 0 or cfg.max_sample_rounds < 1):
        raise ValueError("--dynamic-sampling needs --num-prompts > 0 and --max-sample-rounds >= 1")
    if cfg.engine == "lmdeploy":
        require_lmdeploy()  # refuse before anything is loaded


def load_inputs(cfg, policy, device):
    """The policy (in eval mode; for --engine lmdeploy on the CPU in float32, for the re-score
    after the engine is done), its tokenizer, and the prompts."""
    if cfg.engine == "lmdeploy":
        model, tokenizer = attention.load_model(str(policy), dtype=torch.float32, device="cpu", attn="sdpa")
    else:
        model, tokenizer = attention.load_model(str(policy), common.DTYPES[cfg.dtype], device, attn="sdpa")
    if cfg.block_size and cfg.block_size != model.config.block_size:
        raise ValueError(
            f"--block-size {cfg.block_size} differs from the checkpoint's {model.config.block_size} ({policy})"
        )
    try:
        prompts = grader.load_prompts(cfg.data)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg.data}: {e}") from None
    return model.eval(), tokenizer, prompts


@common.releases_run_lock
def main(cfg):
    check_flags(cfg)
    step, policy, out = output_path(cfg)
    if out.exists() and not cfg.force:  # written atomically, so it is whole: a rerun loop moves on
        print(
            f"rollout: {out} already exists (policy step {step} was sampled); keeping it (--force resamples)"
        )
        return
    # under torchrun each process samples a share of the jobs
    rank, world, device = common.init_distributed(cfg.device, cfg.threads)
    if cfg.engine == "lmdeploy" and world > 1:
        raise ValueError(
            "--engine lmdeploy runs in one process (LMDeploy shards the model itself: --tp); drop torchrun"
        )
    if not cfg.policy and rank == 0:
        common.lock_run(cfg.run, "rollout")
    model, tokenizer, prompts = load_inputs(cfg, policy, device)
    instruction = model.config.instruction if cfg.instruction == "auto" else cfg.instruction
    stop_ids = {tokenizer.convert_tokens_to_ids(attention.IM_END)} | (
        set() if cfg.ban_eos else {tokenizer.eos_token_id}
    )
    start = stream_start(cfg, step, out)
    chosen = select_prompts(cfg.num_prompts, len(prompts), cfg.seed, step, start)
    if not cfg.policy and rank == 0:  # the inputs are read: from here on the run is written
        common.record_invocation(cfg.run, "rollout", cfg)
    sampler = sampler_settings(cfg, model.config)
    texts, prompt_ids, t0, new_tokens = {}, {}, time.time(), 0
    bar = tqdm(total=0, desc=f"rollout step {step}", unit="seq", disable=rank != 0)

    def sample(jobs):  # (prompt index, sample index) pairs -> their records, in order
        nonlocal new_tokens
        for i, _ in jobs:
            if i not in texts:
                texts[i] = attention.render_prompt(prompts[i]["question"], instruction)
                prompt_ids[i] = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        bar.total += len(jobs)
        seeds = [sequence_seed(cfg.seed, step, i, j) for i, j in jobs]
        if cfg.engine == "lmdeploy":
            results = lmdeploy_results(
                policy,
                [texts[i] for i, _ in jobs],
                [prompt_ids[i] for i, _ in jobs],
                seeds,
                cfg,
                model.config.block_size,
                tokenizer.eos_token_id,
            )
            bar.update(len(jobs))
        else:
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            ids = [prompt_ids[i] for i, _ in jobs]
            results = generate(model, ids, generators, cfg, stop_ids, cfg.batch_size, progress=bar.update)
        records = []
        for (i, _), result in zip(jobs, results):
            response = result["response_ids"]
            text = tokenizer.decode(response[: stop_index(response, stop_ids)])
            reward = grader.grade(text, prompts[i]["ground_truth_answer"], answer_format=cfg.answer_format)
            records.append(make_record(step, i, prompts[i], prompt_ids[i], result, text, reward, sampler))
            new_tokens += len(response)
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
        return records

    def sample_round(round_prompts):  # every process samples a share; all of them see every record
        jobs = [(i, j) for i in round_prompts for j in range(cfg.group_size)]
        mine = sample(jobs[rank::world])
        if world == 1:
            return mine
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        return [parts[k % world][k // world] for k in range(len(jobs))]

    stream = None
    if cfg.dynamic_sampling:  # rounds of the stream's next prompts until --num-prompts informative groups
        records, stream = dynamic_rounds(
            sample_round,
            lambda r: select_prompts(
                cfg.num_prompts, len(prompts), cfg.seed, step, start + r * cfg.num_prompts
            ),
            cfg.num_prompts,
            cfg.max_sample_rounds,
        )
        stream.update(start=start, end=start + stream["rounds"] * cfg.num_prompts)
    else:
        records = sample([(i, j) for i in chosen for j in range(cfg.group_size)][rank::world])
    bar.close()
    engine_check = (
        check_engine_logprobs(model.to(device), records, cfg.rescore) if cfg.engine == "lmdeploy" else {}
    )
    if world > 1 and stream is None:  # every process wrote its share; process 0 interleaves them
        records = gather_records(out, records, rank, world)
    elif world > 1:  # the rounds gave every process every record
        common.finish_distributed(world)
    if rank != 0:
        return
    summary = {"stage": "rollout", "step": step, **batch_summary(records, time.time() - t0), **engine_check}
    if stream is not None:  # what the rounds cost, and the shortfall; the next step starts at "end"
        summary.update(stream, shortfall=cfg.num_prompts - stream["groups_kept"])
        common.write_atomic(out.with_name(f"{out.stem}.stream.json"), json.dumps(stream) + "\n")
    if not cfg.policy:  # before the file (the commit point): a kill in between repeats the line
        common.append_metrics(cfg.run, summary)
    common.write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    print(
        f"rollout step {step}: {len(records)} responses to {len({r['prompt_id'] for r in records})} prompts "
        f"-> {out} | "
        f"reward {summary['reward']:.3f} | {summary['response_tokens']:.1f} tokens/response | "
        f"{summary['tokens_per_forward']:.2f} tokens/forward | truncated {summary['truncated']:.1%} | "
        f"{summary['seconds']:.1f} s"
    )


if __name__ == "__main__":
    common.run_stage(main, Config, __doc__)
