"""SFT throughput: tokens/s of sft.py's training step (forward, backward, AdamW) on the default
tiny model and data, and MFU against a float32 matmul peak measured in the same run with the
same thread count.

FLOPs counted per step: "model" = 6 x (parameters outside the embedding and LM head) x row
tokens + 6 x hidden x vocab per loss token (the LM head runs only there); "as computed" adds
the attention matmuls as SDPA runs them with a dense mask, every pair of a row included:
12 x layers x heads x head_dim x (row length)^2 per row (QK^T and AV forward, twice backward).

Usage:  python benchmarks/sft.py [--steps 30] [--threads 1] [--row-len 256] [--batch-size 32]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import attention  # noqa: E402
import sft  # noqa: E402
import support.data  # noqa: E402
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = sft.Config(row_len=args.row_len, batch_size=args.batch_size)
    model, tokenizer = support.model.load_model("tiny")
    c = model.config
    docs, _ = sft.load_documents(
        ROOT / cfg.data, tokenizer, c.instruction, c.block_size, cfg.max_len, cfg.overlong
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
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
    print(f"  {tokens / elapsed:,.0f} tokens/s ({elapsed / args.steps * 1000:.0f} ms/step)")
    print(
        f"  matmul peak {peak:.1f} GFLOP/s; model FLOPs {achieved:.1f} GFLOP/s = MFU {achieved / peak:.1%}; "
        f"with dense attention as computed {computed:.1f} GFLOP/s = {computed / peak:.1%}"
    )


if __name__ == "__main__":
    main()
