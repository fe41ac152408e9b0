"""Sampler speed.

1. KV-cached vs recompute-everything: rollout.generate against a loop that runs the whole
   prefix at every step (no cache), on the same --sequences prompts of one length (so the
   recompute loop needs no padding), batched alike, --new-tokens tokens each (no stopping),
   the sequential strategy on the tiny model. Prints tokens/s of each and the ratio, and
   checks they sampled the same tokens.
2. With --policy (a trained checkpoint, e.g. runs/arith/policy/step_000000): the rollout
   setting, --prompts test prompts in batches of --batch-size with --max-new-tokens, for
   low_confidence_dynamic at --threshold, sequential and low_confidence_static with 2 steps:
   tokens/s, batch forwards per block (a batch's block forwards over the response blocks of
   its longest row: what a block costs the batch in forwards) and tokens committed per
   row-forward (a row-forward is one row of one denoising forward; it may also write the
   row's previous block to the cache). Run it alone on the machine: a timing beside other
   work is not a measurement.

Usage:  python benchmarks/sampler.py [--new-tokens 256] [--sequences 16] [--threads 1]
                                     [--policy DIR --prompts 256 --batch-size 64 --max-new-tokens 128]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import attention  # noqa: E402
import eval as grader  # noqa: E402
import rollout  # noqa: E402
import support.model  # noqa: E402


@torch.no_grad()
def recompute_everything(model, prompts, generators, cfg):
    """Sequential sampling of equally long prompts, running the full prefix at every step."""
    b, mask_id = model.config.block_size, model.config.mask_token_id
    seqs = torch.tensor(prompts)  # [B, P]
    start = seqs.shape[1] // b * b
    done, block = (
        seqs[:, :start],
        torch.cat([seqs[:, start:], torch.full((len(prompts), b - seqs.shape[1] + start), mask_id)], 1),
    )
    while done.shape[1] - seqs.shape[1] < cfg.max_new_tokens:  # as generate: whole blocks until the limit
        masked = block == mask_id
        while masked.any():
            full = torch.cat([done, block], 1)
            length = full.shape[1]
            layout = attention.make_layout([[(length, 0, length)]] * len(prompts), b)
            logits = attention.forward_layout(model, full, layout)[:, -b:]
            uniforms = torch.stack([torch.rand(b, generator=g) for g in generators])
            tokens, confidence, _ = rollout.sample_tokens(
                logits, cfg.temperature, cfg.top_k, cfg.top_p, uniforms
            )
            commit = rollout.choose_commits(confidence, masked, "sequential")
            block = torch.where(commit, tokens, block)
            masked &= ~commit
        done, block = torch.cat([done, block], 1), torch.full((len(prompts), b), mask_id)
    return [row[len(prompts[0]) :].tolist() for row in done]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default="")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = support.model.load_model("tiny")
    model.eval()
    cfg = rollout.Config(strategy="sequential", max_new_tokens=args.new_tokens)
    questions = [p["question"] for _, p in grader.load_prompts(ROOT / "data/arith_test.jsonl")]
    encoded = tokenizer.encode(support.model.render_prompt(q, "") for q in questions)
    length = max(set(map(len, encoded)), key=[len(e) for e in encoded].count)  # the most common length
    prompts = [e for e in encoded if len(e) == length][: args.sequences]
    timings, outputs = {}, {}
    for name in ("kv_cache", "recompute"):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        start = time.perf_counter()
        if name == "kv_cache":
            outputs[name] = [r["response_ids"] for r in rollout.generate(model, prompts, gens, cfg, set())]
        else:
            outputs[name] = recompute_everything(model, prompts, gens, cfg)
        timings[name] = time.perf_counter() - start
    tokens = sum(len(r) for r in outputs["kv_cache"])
    same = outputs["kv_cache"] == outputs["recompute"]
    print(
        f"{len(prompts)} prompts of {length} tokens x {args.new_tokens} new tokens, tiny model, sequential, {args.threads} thread(s)"
    )
    print(f"  KV cache:  {tokens / timings['kv_cache']:8.1f} tokens/s")
    print(f"  recompute: {tokens / timings['recompute']:8.1f} tokens/s")
    print(f"  ratio {timings['recompute'] / timings['kv_cache']:.1f}x; same tokens: {same}")

    if args.policy:
        policy_speed(args, questions)


def policy_speed(args, questions):
    model, tokenizer = support.model.load_model(args.policy, attn="sdpa")
    model.eval()
    b = model.config.block_size
    stop_ids = {tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)}
    prompts = tokenizer.encode(
        support.model.render_prompt(q, model.config.instruction) for q in questions[: args.prompts]
    )
    calls = []  # live rows of every denoising forward: the LM head runs on [rows * b] (a prefill runs none)
    model.lm_head.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0] // b))
    print(
        f"{args.policy}: {len(prompts)} test prompts in batches of {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"temperature 1, {args.threads} thread(s)"
    )
    settings = [
        ("low_confidence_dynamic", f"dynamic {args.threshold}", {}),
        ("sequential", "sequential", {}),
        ("low_confidence_static", "static, 2 steps", {"denoising_steps": 2}),
    ]
    speed = {}
    for strategy, name, extra in settings:
        cfg = rollout.Config(
            strategy=strategy, threshold=args.threshold, max_new_tokens=args.max_new_tokens, **extra
        )
        calls.clear()
        tokens = longest = 0
        start = time.perf_counter()
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first : first + args.batch_size]
            gens = [torch.Generator().manual_seed(first + i) for i in range(len(batch))]
            results = rollout.generate(model, batch, gens, cfg, stop_ids)
            tokens += sum(len(r["response_ids"]) for r in results)
            longest += max(
                -(-(len(p) + len(r["response_ids"])) // b) - len(p) // b for p, r in zip(batch, results)
            )
        seconds = time.perf_counter() - start
        speed[name] = tokens / seconds
        per_block = len(calls) / longest
        print(
            f"  {name:<16} {speed[name]:8,.0f} tokens/s | {per_block:5.2f} batch forwards per block | "
            f"{tokens / sum(calls):.2f} tokens per row-forward | {tokens / len(prompts):.1f} tokens per response"
        )
    dynamic = speed[f"dynamic {args.threshold}"]
    print(
        f"  dynamic / sequential {dynamic / speed['sequential']:.2f}x, dynamic / static {dynamic / speed['static, 2 steps']:.2f}x"
    )


if __name__ == "__main__":
    main()
