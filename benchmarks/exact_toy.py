"""Exact DiPO vs DiPO on the enumerable toy of tests/test_exact.py: for each sampler setting,
the expected gradient of each estimator (every trajectory enumerated, weighted by its exact
probability, advantage r - E[r]) against the true gradient of the expected reward.

Usage:  python benchmarks/exact_toy.py
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_exact import CASES, enumerate_trajectories, estimator_log_probs, flat_grad, reward, toy_model  # noqa: E402


def main():
    torch.set_num_threads(1)
    print(
        "| sampler | trajectories | exact: max error | DiPO: cosine with the true gradient | DiPO: relative error |"
    )
    print("|---|---|---|---|---|")
    for case, sampler in CASES.items():
        model = toy_model()
        trajectories = enumerate_trajectories(model, sampler)
        prob = torch.stack(list(trajectories.values()))
        rewards = torch.tensor([reward(tokens) for tokens, _ in trajectories], dtype=torch.float64)
        true = flat_grad((prob * rewards).sum(), model)
        weight = (prob * (rewards - (prob * rewards).sum())).detach()
        grads = {
            name: flat_grad(
                (weight * estimator_log_probs(model, list(trajectories), sampler, name)).sum(), model
            )
            for name in ("exact", "dipo")
        }
        cosine = torch.nn.functional.cosine_similarity(grads["dipo"], true, dim=0).item()
        print(
            f"| {case} | {len(trajectories)} | {(grads['exact'] - true).abs().max().item():.1e} | {cosine:.3f} | "
            f"{((grads['dipo'] - true).norm() / true.norm()).item():.2f} |"
        )


if __name__ == "__main__":
    main()
