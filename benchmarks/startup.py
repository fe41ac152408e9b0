"""What a stage spends before its first forward: for each stage, in fresh processes, the time
to import it, and the time from the interpreter's start to the end of one forward of the
model it loads. Run it alone on the machine (other work slows Python's imports several times).

    python benchmarks/startup.py [--model tiny|DIR] [--repeats 3]   (from the repository root)

Prints the median of --repeats fresh processes per row, with `import torch` and transformers'
Qwen3 modeling alone for scale.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FORWARD = """
import torch
from support.model import load_model
model, tokenizer = load_model({model!r}, attn="sdpa")
ids = torch.tensor([tokenizer.encode(["1+1="])[0]])
with torch.no_grad():
    model.lm_head(model(ids, torch.arange(ids.shape[1])[None], torch.ones(1, 1, 4, 4, dtype=torch.bool)))
"""


def timed(code):
    """Seconds of one fresh `python -c code` from the repository root, end to end, as the
    parent sees it (the interpreter's own start-up included)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {code!r} failed: {out.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="'tiny' or a checkpoint dir (default: tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (default: 3)")
    args = parser.parse_args()
    rows = {
        "python alone": "pass",
        "import torch": "import torch",
        "import transformers' Qwen3": "from transformers import Qwen3ForCausalLM",
        **{f"import {stage}": f"import {stage}" for stage in ("eval", "sft", "rollout", "dipo")},
        f"import sft + load {args.model} + one forward": "import sft" + FORWARD.format(model=args.model),
        f"import rollout + load {args.model} + one forward": "import rollout"
        + FORWARD.format(model=args.model),
        f"import dipo + load {args.model} + one forward": "import dipo" + FORWARD.format(model=args.model),
    }
    print(f"{'fresh process':<52} {'median s':>9}  (of {args.repeats})")
    for name, code in rows.items():
        seconds = statistics.median(timed(code) for _ in range(args.repeats))
        print(f"{name:<52} {seconds:>9.2f}")


if __name__ == "__main__":
    main()
