"""DiPO scoring: the packed one-forward way of dipo.py vs one forward per round (DiRL/TraceRL
style: each round's state in its own forward, the LM head over every position; the blocks the
round leaves whole are left out, where TraceRL keeps them, so the per-round side is the cheaper
for it), on the same synthetic rollouts: wall time of forward + backward of the loss
over all responses, peak memory (max RSS of a fresh process per variant), and the gap between
the two gradients.

Rollouts: --responses responses of a --prompt-len prompt and --response-len tokens, block size
4, the step inside each block drawn at random (about 3 rounds per block, as a low-threshold
dynamic sampler gives). Two models: the tiny default (vocabulary 100) and the same body with
SDAR's vocabulary (151,936 tokens), where the LM head dominates.

Usage:  python benchmarks/dipo.py [--responses 64] [--threads 1] [--repeats 3]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attention  # noqa: E402
import dipo  # noqa: E402
import support.model  # noqa: E402

SDAR_VOCAB = 151_936


def synthetic_records(n, prompt_len, response_len, vocab, seed=0, block_size=4):
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        step_map = []
        for _ in range(response_len // block_size):
            steps = torch.randint(0, block_size, (block_size,), generator=g)
            step_map += (steps - steps.min()).tolist()
        records.append(
            {
                "prompt_ids": torch.randint(4, vocab, (prompt_len,), generator=g).tolist(),
                "response_ids": torch.randint(4, vocab, (response_len,), generator=g).tolist(),
                "step_map": step_map,
                "advantage": float(torch.randn((), generator=g)),
            }
        )
    return records


def packed_loss(model, records, micro, mask_id):
    """dipo.py's way: all rounds of a response in one forward, LM head at scored tokens only."""
    for start in range(0, len(records), micro):
        part = records[start : start + micro]
        batch = attention.replay_batch(part, mask_id, 4, 0, row_len=dipo.Config.row_len)
        logp = dipo.token_logprobs(model, batch, torch.device("cpu"), torch.float32)
        adv = torch.tensor([part[i]["advantage"] for i in batch[2]["record"].tolist()])
        (-(adv * logp).sum() / len(records)).backward()


def per_round_loss(model, records, micro, mask_id):
    """One forward per round, full logits, as DiRL/TraceRL compute them."""
    for start in range(0, len(records), micro):
        part = records[start : start + micro]
        for s in range(4):
            members = [r for r in part if s in r["step_map"]]
            if not members:
                continue
            ids, layout, where = attention.replay_batch(
                members, mask_id, 4, 0, row_len=dipo.Config.row_len, rounds=[s]
            )
            logits = attention.forward_layout(model, ids, layout)  # [B, N, V]
            logp = torch.log_softmax(logits[where["row"], where["col"]].float(), -1).gather(
                -1, where["token"][:, None]
            )[:, 0]
            adv = torch.tensor([members[i]["advantage"] for i in where["record"].tolist()])
            (-(adv * logp).sum() / len(records)).backward()


def run_variant(args):
    """In this process: time `args.variant` and print JSON (seconds, peak RSS, gradient)."""
    torch.set_num_threads(args.threads)
    model, _ = support.model.load_model("tiny")
    if args.vocab != model.config.vocab_size:
        config = model.config
        config.vocab_size = args.vocab
        torch.manual_seed(0)  # both variants must score with the same weights
        model = type(model)(config)
    records = synthetic_records(args.responses, args.prompt_len, args.response_len, args.vocab)
    fn = packed_loss if args.variant == "packed" else per_round_loss
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        model.zero_grad()
        t = time.perf_counter()
        fn(model, records, args.micro_batch_size, model.config.mask_token_id)
        times.append(time.perf_counter() - t)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save(grad, args.grad_out)
    print(
        json.dumps(
            {
                "seconds": min(times[1:]),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=26)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=dipo.Config.micro_batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["packed", "per_round"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    print(
        f"{args.responses} responses ({args.prompt_len} prompt + {args.response_len} response tokens, block 4), "
        f"micro-batch {args.micro_batch_size}, {args.threads} thread(s); forward + backward, best of {args.repeats}"
    )
    for name, vocab in (("tiny (vocab 100)", 100), (f"tiny body, SDAR vocab {SDAR_VOCAB:,}", SDAR_VOCAB)):
        result = {}
        for variant in ("packed", "per_round"):
            grad_out = f"/tmp/dirl_bench_grad_{variant}.pt"
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--vocab",
                str(vocab),
                "--grad-out",
                grad_out,
                *[
                    str(x)
                    for k in (
                        "responses",
                        "prompt_len",
                        "response_len",
                        "micro_batch_size",
                        "threads",
                        "repeats",
                    )
                    for x in (f"--{k.replace('_', '-')}", getattr(args, k))
                ],
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            result[variant]["grad"] = torch.load(grad_out, weights_only=True)
        p, r = result["packed"], result["per_round"]
        gap = ((p["grad"] - r["grad"]).norm() / r["grad"].norm()).item()
        print(
            f"  {name}: packed {p['seconds']:.2f} s, {p['peak_rss_mb']:.0f} MB | per-round {r['seconds']:.2f} s, "
            f"{r['peak_rss_mb']:.0f} MB | time ratio {r['seconds'] / p['seconds']:.2f}x, "
            f"memory ratio {r['peak_rss_mb'] / p['peak_rss_mb']:.2f}x | gradient relative gap {gap:.1e}"
        )


if __name__ == "__main__":
    main()
