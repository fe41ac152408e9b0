"""rollout.py - sample a blockwise diffusion LM block by block, recording how every token was committed.

Reads  runs/<run>/policy/latest (step k) and its checkpoint, or --policy DIR
       prompts: --data FILE (JSON list or JSONL, {"question", "ground_truth_answer"} or the
       benchmark layouts eval.load_prompts accepts); default the built-in RL split
Writes runs/<run>/rollouts/step_<k>.jsonl, or --out FILE; one line per sampled response:
       policy_step, prompt_id, sample, question, ground_truth_answer, prompt_ids, response_ids,
       step_map, logprobs, text, reward, finish, sampler (docs/design.md, "The rollout record");
       with --dynamic-sampling also step_<k>.stream.json beside it: the stream positions its
       rounds used ({start, end, rounds, prompts_sampled, groups_kept}), where step k+1 starts

Usage: python rollout.py --run runs/arith [--num-prompts 128 --group-size 8]
       torchrun --nproc-per-node N -- rollout.py --run runs/arith   (each process samples every N-th
                                                    sequence; process 0 writes the one file)
       python rollout.py --policy DIR --data data/arith_test.jsonl --group-size 1 --out FILE

An existing output file is kept, not overwritten (--force resamples), so rerunning a killed
shell loop resumes it.

The sampler (docs/design.md, "The sampler"). Blocks sit at absolute positions from 0, as in
training; a prompt that ends inside a block generates the rest of that block first. Each
prompt's complete blocks are prefilled into a KV cache once (the G samples of a prompt share
it). Every denoising step runs each live row's current block against the cache, draws a
token at every masked position (temperature, top-k, top-p) and commits some of them:
  low_confidence_dynamic  the most confident token plus every token with confidence >= --threshold
  low_confidence_static   a fixed quota per step, the most confident first (--denoising-steps)
  sequential              the leftmost masked token (one per step)
Rows advance independently: a row whose block is complete writes it to the cache in the same
forward as the first step of its next block (support/row_cache.py), so no row waits for the
slowest one. A sequence stops at the block holding eos or <|im_end|>, or at
--max-new-tokens, and leaves at once; waiting sequences take the free rows, at most
--batch-size at a time. For every committed token the record keeps its step inside its
block (step_map) and its log-probability at temperature 1 in the state it was committed in
(logprobs): DiPO rebuilds exactly those states, which is what makes it unbiased. Randomness
is per sequence (seeded by seed, policy step, prompt and sample), so a record does not depend
on the batch it was sampled in. --ban-eos and --min-new-tokens (evaluation only) follow
DiRL's protocol: no <|endoftext|>, no stop token before N new tokens; dipo.py refuses such files.

--engine lmdeploy (CUDA; support/engine.py) samples with LMDeploy instead, from the same
flags, into the same records, and our model re-scores --rescore of them to log the
engine-trainer logprob gap. --dynamic-sampling is DAPO's dynamic sampling as DiRL's RL
script runs it: rounds of the stream's next --num-prompts prompts until --num-prompts groups
with 0 < mean reward < 1 are kept (at most --max-sample-rounds; the rest carry no advantage).

How this differs from the paper's code: the paper samples with a patched LMDeploy 0.10.1
that returns step maps and never checks the engine's logprobs against the trainer's; here
the default sampler is plain PyTorch (any device), LMDeploy is optional, and its gap to
the trainer is measured on every call.
"""

import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

import attention
import eval as grader
from support import distributed, engine, rundir
from support.data import MAX_DATA_MB, data_stream
from support.flags import flag, run_stage
from support.model import IM_END, load_model
from support.rollout_files import (
    encode_prompts,
    make_record,
    output_path,
    sampler_settings,
    stream_start,
    write_rollouts,
)
from support.row_cache import LiveRows, RowCache, compaction_order

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory: samples policy/latest into rollouts/step_<k>.jsonl")
    policy: str = flag("", "sample this checkpoint dir instead of the run's latest (needs --out)")
    out: str = flag("", "write here instead of runs/<run>/rollouts/step_<k>.jsonl")
    data: str = flag("data/arith_rl.jsonl", "prompt file (JSON list or JSONL)")
    num_prompts: int = flag(
        128, "prompts per call, in a seeded order that moves on with each step; 0 = all", low=0
    )
    group_size: int = flag(8, "responses sampled per prompt (G)", low=1)
    batch_size: int = flag(
        256, "sequences sampled together (0 = all); a finished one makes room for the next", low=0
    )
    strategy: str = flag("low_confidence_dynamic", "commit rule (the docstring above)", choices=STRATEGIES)
    threshold: float = flag(
        0.9,
        "low_confidence_dynamic: commit every token at least this confident",
        above=0,
        high=1,
        when=lambda c: c.strategy == "low_confidence_dynamic",
    )
    denoising_steps: int = flag(
        4,
        "low_confidence_static: steps per block",
        low=1,
        when=lambda c: c.strategy == "low_confidence_static",
    )
    temperature: float = flag(1.0, "sampling temperature (0 = greedy)", low=0)
    top_k: int = flag(0, "keep the k most likely tokens (0 = all)", low=0)
    top_p: float = flag(1.0, "keep the smallest set of tokens with this much probability", above=0, high=1)
    max_new_tokens: int = flag(
        96, "stop at the first block boundary at or past this many response tokens", low=1
    )
    block_size: int = flag(0, "must equal the checkpoint's block size if given (0 = the checkpoint's)", low=0)
    instruction: str = flag("auto", "sentence appended to questions; 'auto' = the checkpoint's")
    answer_format: str = flag("boxed", "how the grader reads answers", choices=("boxed", "gsm8k"))
    ban_eos: bool = flag(
        False, "evaluation only (DiRL's protocol): never sample <|endoftext|>; dipo.py refuses"
    )
    min_new_tokens: int = flag(
        0, "evaluation only (DiRL's: 128): no stop token in the first N; dipo.py refuses", low=0
    )
    engine: str = flag(
        "torch", "this sampler, or lmdeploy (CUDA, with step maps)", choices=("torch", "lmdeploy")
    )
    tp: int = flag(1, "--engine lmdeploy: tensor-parallel GPUs for the engine", low=1)
    rescore: int = flag(
        64, "--engine lmdeploy: records our model re-scores for the engine-trainer logprob gap", low=0
    )
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    dtype: str = flag("float32", "compute dtype", choices=tuple(distributed.DTYPES))
    seed: int = flag(0, "sampling seed")
    dynamic_sampling: bool = flag(
        False,
        "keep only groups whose mean reward is strictly between 0 and 1, sampling the stream's next "
        "--num-prompts prompts in rounds until --num-prompts such groups are kept (DAPO's dynamic "
        "sampling, as train/rollout_dapo_server.py in OpenMOSS/DiRL)",
    )
    max_sample_rounds: int = flag(
        6,
        "--dynamic-sampling: at most this many rounds, then the file holds what was kept",
        low=1,
        when=lambda c: c.dynamic_sampling,
    )
    max_data_mb: float = flag(MAX_DATA_MB, "refuse a --data file larger than this many megabytes", above=0)
    force: bool = flag(False, "overwrite an existing output file")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)", low=0)


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


def denoise_step(model, cache, live, generators, prompt_len, cfg, stop_ids):
    """One denoising step of every live row (LiveRows, updated in place): one forward of its
    current block against the cache, a token drawn at every position of the block (each row
    from its own generator), and the commit rule's choice of them kept, with the step and the
    logprob of each. prompt_len [N]: the length of every prompt, for the evaluation switches."""
    b, device = model.config.block_size, model.device
    logits = cache.step(model, live.block, live.completed, live.writing)  # [R, b, V]
    uniforms = torch.stack([torch.rand(b, generator=generators[r]) for r in live.prompt.tolist()])  # [R, b]
    response_index = cache.lengths[:, None] + torch.arange(b, device=device) - prompt_len[live.prompt, None]
    banned = banned_tokens(cfg, logits.shape[-1], model.config.eos_token_id, stop_ids, response_index)
    tokens, confidence, logp = sample_tokens(
        logits, cfg.temperature, cfg.top_k, cfg.top_p, uniforms.to(device), banned
    )
    quota = static_quota(live.to_commit, cfg.denoising_steps, live.step)  # [R]
    commit = choose_commits(confidence, live.masked, cfg.strategy, cfg.threshold, quota)  # [R, b]
    live.block = torch.where(commit, tokens, live.block)
    live.step_map = torch.where(commit, live.step[:, None], live.step_map)
    live.logprobs = torch.where(commit, logp, live.logprobs)
    live.masked &= ~commit
    live.step += 1


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
    if model.attn != "sdpa":
        raise ValueError(
            "rollout.generate packs its rows for attention.py's sdpa backend: load with attn='sdpa'"
        )
    b, mask_id, device = model.config.block_size, model.config.mask_token_id, model.device
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

        # one denoising step of every live row
        denoise_step(model, cache, live, generators, prompt_len, cfg, stop_ids)
        sequences = live.prompt.tolist()  # the prompt (and generator) of each live row
        for r in sequences:
            results[r]["forwards"] += 1

        # rows that completed their block record it; they stop, or write it in the next forward
        done = ~live.masked.any(-1)  # [R] the block is complete
        live.writing = done.clone()
        rows = done.nonzero().flatten().tolist()
        fields = [t[done].tolist() for t in (live.new, live.block, live.step_map, live.logprobs)]  # [D, b]
        for j, new, block, steps, logprobs in zip(rows, *fields):  # one tensor read for all rows
            result, kept = results[sequences[j]], [i for i in range(b) if new[i]]
            committed = [block[i] for i in kept]
            result["response_ids"] += committed
            result["step_map"] += [steps[i] for i in kept]
            result["logprobs"] += [logprobs[i] for i in kept]
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
    """Indices of the prompts for policy step `step`: the next num_prompts of the data stream
    (from position step x num_prompts, or `start`), a fresh seeded order every pass through
    the file (0 = all, in file order). A step that spans two passes can meet a prompt twice:
    it is sampled once (a group per prompt; records are keyed by prompt and sample)."""
    if num_prompts <= 0:
        return list(range(total))
    return list(dict.fromkeys(i for _, i in data_stream(step, num_prompts, total, seed, start)))


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
        prompts = round_prompts(r)  # select_prompts: each prompt once in a round
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


def sequence_seed(seed, step, prompt_id, sample):
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- main


def check_flags(cfg):
    if cfg.dynamic_sampling and cfg.num_prompts <= 0:  # --max-sample-rounds is checked where it is declared
        raise ValueError("--dynamic-sampling needs --num-prompts > 0")
    if cfg.engine == "lmdeploy":
        engine.require_lmdeploy()  # refuse before anything is loaded


def load_inputs(cfg, policy, device):
    """The policy (in eval mode; for --engine lmdeploy on the CPU in float32, for the re-score
    after the engine is done), its tokenizer, the prompts and, for each, its rendered text and
    token ids. A prompt too long for the model is refused here, naming its line, before any
    cache is allocated."""
    if cfg.engine == "lmdeploy":
        model, tokenizer = load_model(str(policy), dtype=torch.float32, device="cpu", attn="sdpa")
    else:
        model, tokenizer = load_model(str(policy), distributed.DTYPES[cfg.dtype], device, attn="sdpa")
    c = model.config
    if cfg.block_size and cfg.block_size != c.block_size:
        raise ValueError(
            f"--block-size {cfg.block_size} differs from the checkpoint's {c.block_size} ({policy})"
        )
    numbered = grader.load_prompts(cfg.data, cfg.max_data_mb)
    instruction = c.instruction if cfg.instruction == "auto" else cfg.instruction
    encoded = encode_prompts(numbered, tokenizer, instruction, cfg.max_new_tokens, c, cfg.data)
    return model.eval(), tokenizer, [prompt for _, prompt in numbered], encoded


def sample_jobs(jobs, step, cfg, policy, model, tokenizer, prompts, encoded, bar):
    """(prompt index, sample index) pairs -> their records, in order: one response per job from
    generate (or LMDeploy) to the prompt's text and ids in `encoded`, graded for its reward. A
    non-finite logprob (the model gave non-finite logits) is refused before any record exists."""
    stop_ids = {tokenizer.token_id(IM_END)} | (set() if cfg.ban_eos else {tokenizer.eos_token_id})
    seeds = [sequence_seed(cfg.seed, step, i, j) for i, j in jobs]
    t0, bar.total = time.time(), bar.total + len(jobs)
    if cfg.engine == "lmdeploy":
        texts_ids = zip(*[encoded[i] for i, _ in jobs])
        results = engine.lmdeploy_results(
            policy, *texts_ids, seeds, cfg, model.config.block_size, tokenizer.eos_token_id
        )
        bar.update(len(jobs))
    else:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        ids = [encoded[i][1] for i, _ in jobs]
        results = generate(model, ids, generators, cfg, stop_ids, cfg.batch_size, progress=bar.update)
    sampler, records = sampler_settings(cfg, model.config), []
    for (i, j), result in zip(jobs, results):
        if not all(math.isfinite(x) for x in result["logprobs"] or []):  # None: the engine gave none
            raise FloatingPointError(
                f"{policy}: the model gave non-finite logits (prompt {i}); nothing written"
            )
        response = result["response_ids"]
        text = tokenizer.decode(response[: stop_index(response, stop_ids)])
        reward = grader.grade(text, prompts[i]["ground_truth_answer"], answer_format=cfg.answer_format)
        records.append(make_record(step, i, j, prompts[i], encoded[i][1], result, text, reward, sampler))
    new_tokens = sum(len(r["response_ids"]) for r in records)
    bar.set_postfix(tok_s=f"{new_tokens / max(1e-9, time.time() - t0):.0f}")
    return records


@rundir.releases_run_lock
def main(cfg):
    check_flags(cfg)
    step, policy, out = output_path(cfg)
    if out.exists() and not cfg.force:  # written atomically, so it is whole: a rerun loop moves on
        print(
            f"rollout: {out} already exists (policy step {step} was sampled); keeping it (--force resamples)"
        )
        return
    rank, world, device = distributed.init_distributed(cfg.device, cfg.threads)
    if cfg.engine == "lmdeploy" and world > 1:
        raise ValueError(
            "--engine lmdeploy runs in one process (LMDeploy shards the model itself: --tp); drop torchrun"
        )
    if not cfg.policy and rank == 0:
        rundir.lock_run(cfg.run, "rollout")

    # the policy, its prompts and where this step starts in their stream (checked before any write)
    model, tokenizer, prompts, encoded = load_inputs(cfg, policy, device)
    start = stream_start(cfg, step, out)
    t0 = time.time()
    bar = tqdm(total=0, desc=f"rollout step {step}", unit="seq", disable=rank != 0)

    def sample_round(round_prompts):  # under torchrun each process samples a share; all see every record
        jobs = [(i, j) for i in round_prompts for j in range(cfg.group_size)]
        mine = sample_jobs(jobs[rank::world], step, cfg, policy, model, tokenizer, prompts, encoded, bar)
        return distributed.gather_in_job_order(mine, world)

    # G responses to each of the step's prompts, or rounds of them until enough groups have a signal
    stream = None
    if cfg.dynamic_sampling:
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
        records = sample_round(select_prompts(cfg.num_prompts, len(prompts), cfg.seed, step, start))
    bar.close()
    engine_check = {}
    if cfg.engine == "lmdeploy":
        engine_check = engine.check_engine_logprobs(model.to(device), records, cfg.rescore)
    distributed.finish_distributed(world)
    if rank == 0:  # the first write: a run refused on the way (non-finite logits) changes nothing
        if not cfg.policy:
            rundir.record_invocation(cfg.run, "rollout", cfg)
        write_rollouts(cfg, out, step, records, stream, engine_check, time.time() - t0)


if __name__ == "__main__":
    run_stage(main, Config, __doc__)
