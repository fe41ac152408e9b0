"""rollout.py - sample a blockwise diffusion LM block by block, recording how every token was committed.

Reads  runs/<run>/policy/latest (step k) and its checkpoint, or --policy DIR
       prompts: --data FILE (JSON list or JSONL, {"question", "ground_truth_answer"} or the
       benchmark layouts eval.load_prompts accepts); default the built-in RL split
Writes runs/<run>/rollouts/step_<k>.jsonl, or --out FILE; one line per sampled response:
       policy_step, prompt_id, question, ground_truth_answer, prompt_ids, response_ids,
       step_map, logprobs, text, reward, finish, sampler (DESIGN.md, "Rollout record")

Usage: python rollout.py --run runs/arith [--num-prompts 64 --group-size 8]
       torchrun --nproc-per-node N -- rollout.py --run runs/arith   (each process samples every N-th
                                                    sequence; process 0 writes the one file)
       python rollout.py --policy DIR --data data/arith_test.jsonl --group-size 1 --out FILE

An existing output file is kept, not overwritten (--force resamples), so rerunning a killed
shell loop resumes it.

The sampler (DESIGN.md, "The sampler"; "Rollout engine" in PAPER.md). Blocks sit at
absolute positions from 0, as in training; prompts are left-padded by whole blocks so that
every prompt's last block ends in the same column, and that block's free positions are the
first to generate.
The prompts are prefilled into a KV cache once. Then, block by block, every denoising step
runs only the current block against the cache, draws a token at every masked position
(temperature, top-k, top-p) and commits some of them:
  low_confidence_dynamic  the most confident token plus every token with confidence >= --threshold
  low_confidence_static   a fixed quota per step, the most confident first (--denoising-steps)
  sequential              the leftmost masked token (one per step)
The complete block is then written to the cache with one more forward. A sequence stops at
the block holding eos or <|im_end|>, or at --max-new-tokens; finished sequences leave the
batch. For every committed token the record keeps its step inside its block (step_map) and
its log-probability at temperature 1 in the state it was committed in (logprobs): DiPO
rebuilds exactly those states, which is what makes it unbiased.

Randomness is per sequence (a generator seeded by seed, policy step, prompt and sample), so
a record does not depend on the batch it was sampled in.

How this differs from the paper's code: the paper samples with a patched LMDeploy that
returns step maps; here the sampler is plain PyTorch (any device), and --engine lmdeploy is
accepted only when the installed LMDeploy can return the per-token step, never invented.
"""

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import attention
import eval as grader
from attention import flag

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory: samples policy/latest into rollouts/step_<k>.jsonl")
    policy: str = flag("", "sample this checkpoint dir instead of the run's latest (needs --out)")
    out: str = flag("", "write here instead of runs/<run>/rollouts/step_<k>.jsonl")
    data: str = flag("data/arith_rl.jsonl", "prompt file (JSON list or JSONL)")
    num_prompts: int = flag(64, "prompts per call, taken in a seeded order that moves on with the policy step; 0 = all")
    group_size: int = flag(8, "responses sampled per prompt (G)")
    batch_size: int = flag(64, "sequences sampled together")
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
    engine: str = flag("torch", "torch (this sampler) or lmdeploy (CUDA, needs a build that returns step maps)")
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    dtype: str = flag("float32", "float32 or bfloat16")
    seed: int = flag(0, "sampling seed")
    force: bool = flag(False, "overwrite an existing output file")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")


# ----------------------------------------------------------------------------- the math


def sample_tokens(logits, temperature, top_k, top_p, uniforms):
    """logits [B, b, V], uniforms [B, b] in [0, 1). Returns the drawn tokens [B, b], their
    confidence (probability under the filtered, tempered distribution that
    attention.sampling_logprobs defines) and their logprob under the model at temperature 1
    before any filtering (the quantity DiPO replays)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    probs = attention.sampling_logprobs(logits, temperature, top_k, top_p).exp()
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:  # inverse CDF: the first token whose cumulative probability exceeds the uniform
        cdf = probs.cumsum(-1)
        tokens = torch.searchsorted(cdf, (uniforms * cdf[..., -1])[..., None].contiguous(), side="right")[..., 0]
        tokens = tokens.clamp(max=logits.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0], logp.gather(-1, tokens[..., None])[..., 0]


def static_quota(num_masked, steps, step):
    """Tokens low_confidence_static commits at `step` when a block starts with `num_masked`
    masked positions: an even split over `steps`, the remainder on the first steps."""
    return num_masked // steps + (1 if step < num_masked % steps else 0)


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


def block_attention_mask(pad, start, width, total):
    """[B, 1, width, total] bool for queries at columns start..start+width-1 over keys
    0..total-1: every earlier column except left padding, and the query's own block."""
    col = torch.arange(total, device=pad.device)
    allowed = (col[None, :] >= pad[:, None]) & (col[None, :] < start + width)  # [B, total]
    return allowed[:, None, None, :].expand(-1, 1, width, -1)


def prefill_attention_mask(pad, width, block_size):
    """[B, 1, width, width] bool: block-causal over columns 0..width-1, padding excluded (a
    padding query sees itself so that no softmax row is empty)."""
    col = torch.arange(width, device=pad.device)
    block = col // block_size  # pad is a multiple of block_size, so column blocks are position blocks
    causal = block[None, :] <= block[:, None]  # [Q, K]
    real = col[None, :] >= pad[:, None]  # [B, K]
    allowed = causal[None] & real[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=pad.device)[None]
    return allowed[:, None]


@torch.no_grad()
def generate(model, prompts, generators, cfg, stop_ids):
    """Sample one response per prompt. prompts: lists of token ids; generators: one per prompt.
    Returns per prompt a dict: response_ids, step_map, logprobs, finish, forwards."""
    b, mask_id, device = model.config.block_size, model.config.mask_token_id, model.device
    ends = [-(-len(p) // b) * b for p in prompts]  # each prompt's last block ends here
    width = max(ends)
    pad = torch.tensor([width - e for e in ends], device=device)  # [B], whole blocks
    ids = torch.full((len(prompts), width), mask_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - ends[i]: width - ends[i] + len(p)] = torch.tensor(p)
    ids = ids.to(device)  # [B, width]: padding, prompt, then masks up to the block boundary
    ids.masked_fill_(torch.arange(width, device=device)[None] < pad[:, None], model.config.eos_token_id)
    layer_types = set(model.config.layer_types)
    rows = torch.arange(len(prompts), device=device)  # the prompts still being sampled

    def forward(tokens, start, mask, cache):
        positions = torch.arange(start, start + tokens.shape[1], device=device)[None] - pad[rows, None]
        out = model(input_ids=tokens, position_ids=positions.clamp(min=0), past_key_values=cache, use_cache=True,
                    attention_mask={t: mask for t in layer_types})
        return out.logits

    results = [dict(response_ids=[], step_map=[], logprobs=[], finish="length", forwards=0) for _ in prompts]
    cache = DynamicCache()
    start = width - b  # first column of the current block
    if start > 0:
        forward(ids[:, :start], 0, prefill_attention_mask(pad, start, b), cache)
    block = ids[:, start:]  # [B, b]
    while len(rows):
        masked = block == mask_id  # [B', b]
        first_masked = masked.clone()
        to_commit = masked.sum(-1)
        step_map = torch.full_like(block, -1)
        logprobs = torch.zeros(block.shape, device=device)
        step = 0
        while masked.any():
            logits = forward(block, start, block_attention_mask(pad[rows], start, b, start + b), cache)  # [B', b, V]
            cache.crop(-b)  # the cache keeps clean blocks only
            uniforms = torch.zeros(block.shape)  # drawn only for sequences still denoising: no batch effects
            for j in masked.any(-1).nonzero().flatten().tolist():
                uniforms[j] = torch.rand(b, generator=generators[rows[j]])
            uniforms = uniforms.to(device)
            tokens, confidence, logp = sample_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, uniforms)
            quota = torch.tensor([static_quota(n, cfg.denoising_steps, step) for n in to_commit.tolist()], device=device)
            commit = choose_commits(confidence, masked, cfg.strategy, cfg.threshold, quota)
            block = torch.where(commit, tokens, block)
            step_map = torch.where(commit, step, step_map)
            logprobs = torch.where(commit, logp, logprobs)
            for r in rows[masked.any(-1)].tolist():
                results[r]["forwards"] += 1
            masked &= ~commit
            step += 1
        forward(block, start, block_attention_mask(pad[rows], start, b, start + b), cache)  # write the clean block
        keep = []
        for j, r in enumerate(rows.tolist()):
            new = first_masked[j]
            result = results[r]
            result["response_ids"] += block[j][new].tolist()
            result["step_map"] += step_map[j][new].tolist()
            result["logprobs"] += logprobs[j][new].tolist()
            if any(t in stop_ids for t in block[j][new].tolist()):
                result["finish"] = "stop"
            elif len(result["response_ids"]) < cfg.max_new_tokens:
                keep.append(j)
        keep = torch.tensor(keep, dtype=torch.long, device=device)
        if len(keep) < len(rows):
            cache.batch_select_indices(keep)
        rows = rows[keep]
        start += b
        block = torch.full((len(rows), b), mask_id, dtype=torch.long, device=device)
    return results


def stop_index(response_ids, stop_ids):
    """Index of the first stop token, or the length if there is none."""
    return next((i for i, t in enumerate(response_ids) if t in stop_ids), len(response_ids))


def select_prompts(num_prompts, total, seed, step):
    """Indices of the prompts for policy step `step`: the next num_prompts of attention's data
    stream, a fresh seeded order every pass through the file (0 = all, in file order)."""
    if num_prompts <= 0:
        return list(range(total))
    return [i for _, i in attention.data_stream(step, num_prompts, total, seed)]


def sequence_seed(seed, step, prompt_id, sample):
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- engines


def lmdeploy_engine(cfg):
    """The optional LMDeploy engine (CUDA). DiPO needs the step at which each token was
    unmasked; stock LMDeploy's dLLM decoding does not return it (DiRL patches it in), and a
    record with an invented step_map would make the DiPO update silently wrong."""
    try:
        import lmdeploy  # noqa: F401  (optional, requirements-gpu.txt)
    except ImportError:
        raise ValueError("--engine lmdeploy: lmdeploy is not installed (pip install -r requirements-gpu.txt on a CUDA machine)") from None
    from lmdeploy.messages import Response

    if "step_map" not in getattr(Response, "__dataclass_fields__", {}):
        raise ValueError(f"--engine lmdeploy: this LMDeploy build ({lmdeploy.__version__}) does not return the step at "
                         "which each token was unmasked (Response.step_map); DiPO replays exactly those states, so "
                         "rollouts without it cannot be trained on. Use --engine torch, or a build with DiRL's patch.")
    raise ValueError("--engine lmdeploy: a step_map-returning build was found, but driving it is not implemented yet (issue 9)")


# ----------------------------------------------------------------------------- main


def output_path(cfg):
    """(policy step, policy dir, output file) for this call."""
    if cfg.policy:
        if not cfg.out:
            raise ValueError("--policy needs --out (the run's rollout files belong to its own latest policy)")
        name = Path(cfg.policy).name
        step = int(name[len("step_"):]) if name.startswith("step_") and name[len("step_"):].isdigit() else 0
        return step, Path(cfg.policy), Path(cfg.out)
    step, policy = attention.latest_policy(cfg.run)
    return step, policy, Path(cfg.out) if cfg.out else Path(cfg.run) / "rollouts" / f"step_{step:06d}.jsonl"


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"--strategy {cfg.strategy!r}: choose from {', '.join(STRATEGIES)}")
    if cfg.engine not in ("torch", "lmdeploy"):
        raise ValueError(f"--engine {cfg.engine!r}: choose torch or lmdeploy")
    if cfg.engine == "lmdeploy":
        lmdeploy_engine(cfg)
    step, policy, out = output_path(cfg)
    if out.exists() and not cfg.force:  # written atomically, so it is whole: a rerun loop moves on
        print(f"rollout: {out} already exists (policy step {step} was sampled); keeping it (--force resamples)")
        return
    rank, world, device = attention.init_distributed(cfg.device)  # under torchrun each process samples a share
    if not cfg.policy and rank == 0:
        attention.record_invocation(cfg.run, "rollout", cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model, tokenizer = attention.load_model(str(policy), dtype=dtype, device=device, attn="sdpa")
    model.eval()
    if cfg.block_size and cfg.block_size != model.config.block_size:
        raise ValueError(f"--block-size {cfg.block_size} differs from the checkpoint's {model.config.block_size} ({policy})")
    instruction = model.config.instruction if cfg.instruction == "auto" else cfg.instruction
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(attention.IM_END)}
    try:
        prompts = grader.load_prompts(cfg.data)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg.data}: {e}") from None
    chosen = select_prompts(cfg.num_prompts, len(prompts), cfg.seed, step)
    sampler = {"block_size": model.config.block_size, "mask_token_id": model.config.mask_token_id, "strategy": cfg.strategy, "threshold": cfg.threshold,
               "denoising_steps": cfg.denoising_steps, "temperature": cfg.temperature, "top_k": cfg.top_k,
               "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "engine": cfg.engine, "seed": cfg.seed}

    jobs = [(i, j) for i in chosen for j in range(cfg.group_size)]  # (prompt index, sample index)
    prompt_ids = {i: tokenizer(attention.render_prompt(prompts[i]["question"], instruction), add_special_tokens=False)["input_ids"]
                  for i in chosen}
    jobs = jobs[rank::world]
    records, t0, new_tokens = [], time.time(), 0
    bar = tqdm(total=len(jobs), desc=f"rollout step {step}", unit="seq", disable=rank != 0)
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        generators = [torch.Generator().manual_seed(sequence_seed(cfg.seed, step, i, j)) for i, j in batch]
        results = generate(model, [prompt_ids[i] for i, _ in batch], generators, cfg, stop_ids)
        for (i, j), res in zip(batch, results):
            response = res["response_ids"]
            text = tokenizer.decode(response[:stop_index(response, stop_ids)])
            prompt = prompts[i]
            records.append({
                "policy_step": step, "prompt_id": str(i), "question": prompt["question"],
                "ground_truth_answer": prompt["ground_truth_answer"], "prompt_ids": prompt_ids[i],
                "response_ids": response, "step_map": res["step_map"], "logprobs": res["logprobs"], "text": text,
                "reward": grader.grade(text, prompt["ground_truth_answer"], answer_format=cfg.answer_format),
                "finish": res["finish"], "sampler": sampler,
                **{k: v for k, v in prompt.items() if k not in ("question", "ground_truth_answer")},
            })
            new_tokens += len(response)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
    bar.close()
    if world > 1:  # every process writes its share; process 0 interleaves them back into job order
        part = out.with_name(f"{out.name}.rank{rank}.part")
        attention.write_atomic(part, "".join(json.dumps(r) + "\n" for r in records))
        torch.distributed.barrier()
        if rank == 0:
            parts = [[json.loads(line) for line in out.with_name(f"{out.name}.rank{r}.part").read_text().splitlines()]
                     for r in range(world)]
            records = [parts[k % world][k // world] for k in range(sum(map(len, parts)))]
        torch.distributed.barrier()  # every part is read before any is removed
        part.unlink()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    seconds = time.time() - t0
    n = max(1, len(records))
    new_tokens = sum(len(r["response_ids"]) for r in records)
    summary = {"stage": "rollout", "step": step, "reward": sum(r["reward"] for r in records) / n,
               "response_tokens": new_tokens / n,
               "tokens_per_forward": new_tokens / max(1, sum(grader.forwards_of(r) for r in records)),
               "truncated": sum(r["finish"] == "length" for r in records) / n, "seconds": seconds,
               "tokens_per_s": new_tokens / seconds}
    if not cfg.policy:  # before the file, the commit point: a kill in between repeats the line, never loses it
        attention.append_metrics(cfg.run, summary)
    attention.write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"rollout step {step}: {len(records)} responses to {len(chosen)} prompts -> {out} | reward {summary['reward']:.3f} | "
          f"{summary['response_tokens']:.1f} tokens/response | {summary['tokens_per_forward']:.2f} tokens/forward | "
          f"truncated {summary['truncated']:.1%} | {seconds:.1f} s")


if __name__ == "__main__":
    try:
        main(attention.parse_config(Config, description=__doc__))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
