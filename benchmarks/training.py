"""Training throughput, SFT beside DiPO: tokens/s of sft.py's training step (forward, backward,
AdamW) and of dipo.py's update (per minibatch: each micro-batch's loss and backward, then clip
and AdamW), counted the same way, in one run: the row tokens each forward and backward runs
(clean copies plus noisy copies or replayed blocks, no padding). Also MFU of the SFT step
against a float32 matmul peak measured in the same run with the same thread count.

The update's rollouts: --rollouts FILE (a rollout.py file), or by default the SFT data's own
prompts and responses with a step inside each block drawn at random (about 3 rounds per block,
as a low-threshold dynamic sampler gives) and advantages of +-1.

FLOPs counted per SFT step: "model" = 6 x (parameters outside the embedding and LM head) x row
tokens + 6 x hidden x vocab per loss token (the LM head runs only there); "as computed" adds
the attention matmuls as SDPA runs them with a dense mask, every pair of a row included:
12 x layers x heads x head_dim x (row length)^2 per row (QK^T and AV forward, twice backward).

Usage:  python benchmarks/training.py [--steps 30] [--threads 1] [--row-len 256] [--batch-size 32]
                                      [--rollouts FILE] [--responses 512]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import attention  # noqa: E402
import dipo  # noqa: E402
import sft  # noqa: E402
import support.data  # noqa: E402
import support.distributed  # noqa: E402
import support.model  # noqa: E402


def matmul_peak(threads, n=1024, repeats=20):
    """Best float32 GFLOP/s of an n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--row-len", type=int, default=sft.Config.row_len)
    parser.add_argument("--batch-size", type=int, default=sft.Config.batch_size)
    parser.add_argument("--rollouts", help="a rollout.py file for the DiPO update (default: synthetic)")
    parser.add_argument("--responses", type=int, default=512, help="responses in the DiPO update")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = sft.Config(row_len=args.row_len, batch_size=args.batch_size)
    model, tokenizer = support.model.load_model("tiny")
    c = model.config
    docs, _ = sft.load_documents(
        ROOT / cfg.data, tokenizer, c.instruction, c.block_size, cfg.max_len, cfg.overlong
    )
    optimizer = support.distributed.AdamW(model, lr=cfg.lr, weight_decay=0.0)
    body = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )
    attn_per_pair = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim

    model_flops = attn_flops = tokens = 0
    elapsed = 0.0
    for step in range(args.steps + 3):  # 3 warm-up steps
        mine = support.data.data_stream(step, cfg.batch_size, len(docs), cfg.seed)
        batch, positions = [docs[d] for _, d in mine], [i for i, _ in mine]
        t = time.perf_counter()
        noises = [
            sft.noise_document(len(p), len(p) + len(r), cfg.eps, torch.Generator().manual_seed(i))
            for (p, r), i in zip(batch, positions)
        ]
        ids, layout, rows, cols, targets, weights = sft.build_micro_batch(
            batch, noises, c.block_size, c.mask_token_id, c.eos_token_id, cfg.row_len, cfg.batch_size
        )
        logits = attention.forward_layout(model, ids, layout, at=(rows, cols))
        sft.diffusion_loss(logits, targets, weights).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 3:
            elapsed += time.perf_counter() - t
            row_tokens = int((layout.doc >= 0).sum())
            tokens += row_tokens
            model_flops += 6 * body * row_tokens + 6 * c.hidden_size * c.vocab_size * len(targets)
            attn_flops += attn_per_pair * ids.shape[0] * ids.shape[1] ** 2
    peak = matmul_peak(args.threads)
    achieved = model_flops / elapsed / 1e9
    computed = (model_flops + attn_flops) / elapsed / 1e9
    print(
        f"sft step, tiny model, batch {cfg.batch_size} docs, rows of {cfg.row_len}, {args.threads} thread(s), {args.steps} steps"
    )
    print(f"  {tokens / elapsed:,.0f} row tokens/s ({elapsed / args.steps * 1000:.0f} ms/step)")
    print(
        f"  matmul peak {peak:.1f} GFLOP/s; model FLOPs {achieved:.1f} GFLOP/s = MFU {achieved / peak:.1%}; "
        f"with dense attention as computed {computed:.1f} GFLOP/s = {computed / peak:.1%}"
    )
    records = (
        [record for _, record in support.data.read_records(args.rollouts)]
        if args.rollouts
        else synthetic_records(docs, args.responses, c.block_size)
    )
    row_tokens, scored, seconds = dipo_update(model, records[: args.responses], c)
    print(
        f"dipo update, {min(len(records), args.responses)} responses, {dipo.Config.minibatches} minibatches, "
        f"micro-batches of {dipo.Config.micro_batch_size}, rows of {dipo.Config.row_len} ({args.rollouts or 'synthetic'})"
    )
    print(
        f"  {row_tokens / seconds:,.0f} row tokens/s = {row_tokens / seconds / (tokens / elapsed):.2f}x sft's "
        f"({scored / seconds:,.0f} scored tokens/s, {seconds:.2f} s)"
    )


def synthetic_records(docs, n, block_size, seed=0):
    """The SFT documents as rollouts: their prompts and responses, a random step inside each
    block (starting at 0), a recorded logprob of 0 and an advantage of +-1."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for prompt, response in docs[:n]:
        step_map = []
        for start in range(0, len(response), block_size):
            steps = torch.randint(0, block_size, (min(block_size, len(response) - start),), generator=g)
            step_map += (steps - steps.min()).tolist()
        records.append(
            {
                "prompt_ids": prompt,
                "response_ids": response,
                "step_map": step_map,
                "logprobs": [0.0] * len(response),
                "advantage": float(torch.randint(0, 2, (), generator=g)) * 2 - 1,
            }
        )
    return records


def dipo_update(model, records, model_config):
    """One pass of dipo.py's update over `records` at its defaults (the first pass: each
    micro-batch's own forward gives its old logprobs). Returns (row tokens, scored tokens, seconds)."""
    cfg = dipo.Config()
    adv = torch.tensor([r.get("advantage", 1.0) for r in records])
    minibatches = dipo.split_minibatches(len(records), cfg.minibatches, cfg.seed, 0)
    plan = dipo.plan_micro_batches(records, adv, minibatches, cfg, model_config, 0, 1, False)
    optimizer = support.distributed.AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t = time.perf_counter()
    dipo.ppo_epochs(model, optimizer, plan, {}, {}, cfg, None, 1, 0, torch.device("cpu"), torch.float32)
    seconds = time.perf_counter() - t
    micro_batches = [micro for micro_batches in plan for micro in micro_batches]
    row_tokens = sum(int((micro["batch"][1].doc >= 0).sum()) for micro in micro_batches)
    scored = sum(len(micro["adv"]) for micro in micro_batches)
    return row_tokens, scored, seconds


if __name__ == "__main__":
    main()
