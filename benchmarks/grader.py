"""Grader throughput: grade a file of --n responses with --workers 1 and 2; print checks/s and
per-check latency (median, worst). The responses mix the answer forms of tests/test_eval.py
(numbers, fractions, expressions, tuples, intervals, sets, matrices; right and wrong) with
arithmetic answers like the built-in task's, so the symbolic path is exercised, not only strings.

Usage:  python benchmarks/grader.py [--n 10000] [--timeout 5]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import eval as ev  # noqa: E402
from test_eval import CASES  # noqa: E402


def make_records(n, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if rng.random() < 0.5:
            pred, truth, _ = rng.choice(CASES)
        else:
            truth = str(rng.randint(-50, 500))
            pred = truth if rng.random() < 0.6 else str(int(truth) + rng.choice([-1, 1]))
        text = f"3+4*2=3+8=11\n\\boxed{{{pred}}}"
        records.append({"prompt_id": str(i // 8), "ground_truth_answer": truth, "text": text, "response_ids": [0] * 20,
                        "step_map": [0] * 20, "finish": "stop", "reward": 0.0, "sampler": {"block_size": 4}})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="responses to grade (default: 10000)")
    parser.add_argument("--timeout", type=float, default=5.0, help="symbolic time limit per check (default: 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in make_records(args.n)))
        for workers in (1, 2):
            start = time.perf_counter()
            result = ev.evaluate_file(path, workers=workers, timeout=args.timeout)
            seconds = time.perf_counter() - start
            print(f"workers {workers}: {args.n} checks in {seconds:.1f} s = {args.n / seconds:.0f} checks/s; "
                  f"per check median {result['grader_median_ms']:.2f} ms, worst {result['grader_max_ms']:.0f} ms")


if __name__ == "__main__":
    main()
