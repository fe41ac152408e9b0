"""Grader throughput and latency: grade a file of --n responses with --workers 1 and 2 and
print checks/s and per-check latency (median, worst); then the slowest check among the real
answers of tests/test_eval.py (the number --timeout's default is chosen from), and the time
to grade a 1,024-response file of the built-in task (what rollout.py grades per DiPO step).

The --n responses mix the answer pairs and whole responses of tests/test_eval.py (numbers,
fractions, expressions, tuples, intervals, sets, matrices, relations; right and wrong) with
arithmetic answers like the built-in task's, so Math-Verify's path is exercised, not only the
integer shortcut.

Usage:  python benchmarks/grader.py [--n 4000] [--timeout 3]
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

from test_eval import CASES, RESPONSES  # noqa: E402

import eval as ev  # noqa: E402


def record(i, text, truth):
    return {
        "prompt_id": str(i // 8),
        "ground_truth_answer": truth,
        "text": text,
        "response_ids": [0] * 20,
        "step_map": [0] * 20,
        "finish": "stop",
        "reward": 0.0,
        "sampler": {"block_size": 4},
    }


def arithmetic(rng):
    truth = str(rng.randint(-50, 500))
    pred = truth if rng.random() < 0.6 else str(int(truth) + rng.choice([-1, 1]))
    return f"3+4*2=3+8=11\n\\boxed{{{pred}}}", truth


def make_records(n, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        u = rng.random()
        if u < 0.35:
            pred, truth, _ = rng.choice(CASES)
            text = f"so the answer is \\boxed{{{pred}}}."
        elif u < 0.5:
            truth, text, _ = rng.choice(RESPONSES)
        else:
            text, truth = arithmetic(rng)
        records.append(record(i, text, truth))
    return records


def time_file(records, workers, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        start = time.perf_counter()
        result = ev.evaluate_file(path, workers=workers, timeout=timeout)
        return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000, help="responses to grade (default: 4000)")
    parser.add_argument(
        "--timeout", type=float, default=ev.DEFAULT_TIMEOUT, help="deadline per check (default: eval's)"
    )
    args = parser.parse_args()
    records = make_records(args.n)
    for workers in (1, 2):
        seconds, result = time_file(records, workers, args.timeout)
        print(
            f"workers {workers}: {args.n} checks in {seconds:.1f} s = {args.n / seconds:.0f} checks/s; "
            f"per check median {result['grader_median_ms']:.2f} ms, worst {result['grader_max_ms']:.0f} ms"
        )
    real = [(truth, f"so the answer is \\boxed{{{pred}}}.") for pred, truth, _ in CASES] + [
        (t, r) for t, r, _ in RESPONSES
    ]
    ev.grade("\\boxed{x+1}", "1+x")  # start the child: the first check pays the fork and imports
    slowest = []
    for truth, text in real:
        start = time.perf_counter()
        ev.grade(text, truth, timeout=30.0)
        slowest.append((time.perf_counter() - start, text[-60:]))
    worst, text = max(slowest)
    print(
        f"slowest of the {len(real)} real answers in tests/test_eval.py: {worst * 1000:.0f} ms ({text!r}); "
        f"--timeout default {ev.DEFAULT_TIMEOUT} s"
    )
    rng = random.Random(1)
    task = [record(i, *arithmetic(rng)) for i in range(1024)]
    seconds, _ = time_file(task, 1, args.timeout)
    print(f"a 1,024-response file of the built-in task: graded in {seconds:.2f} s (1 worker)")


if __name__ == "__main__":
    main()
