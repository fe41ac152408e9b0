"""What dipo.py logs: the rollouts' rewards and groups, the update's token means summed over
processes, the train-inference mismatch (step k's computed logprobs against the sampler's
records), and the one log line. Used by dipo.py.
"""

import torch


def batch_metrics(records, adv, dapo_filter, new_step):
    """The log line's fields that the rollouts alone decide: rewards and groups."""
    rewards = [r["reward"] for r in records]
    groups = len({r["prompt_id"] for r in records})
    with_signal = len({r["prompt_id"] for r, a in zip(records, adv) if a})
    return {
        "stage": "dipo",
        "step": new_step,
        "reward": sum(rewards) / len(rewards),
        "reward_std": torch.tensor(rewards, dtype=torch.float64).std(unbiased=False).item(),
        "groups": groups,
        "groups_with_signal": with_signal,
        "groups_kept": with_signal if dapo_filter else groups,
    }


SUMMED = ("loss", "tokens", "clipped", "approx_kl", "entropy", "mismatch_sum", "mismatch_count")
SUMMED += ("steps", "clipped_steps", "selection_abs", "tokens_abs")  # --estimator exact's


def update_metrics(sums, plan, old, grad_norms, world, device):
    """The update's fields, over all processes: token means, the mismatch (step k's computed
    logprobs vs the sampler's records, where a forward computed them), and grad_norm, the mean
    over the optimizer steps."""
    mismatch = [
        (old[m, j]["logp"].cpu() - micro["recorded"]).abs()
        for m, micro_batches in enumerate(plan)
        for j, micro in enumerate(micro_batches)
        if micro["real"] and old[m, j]["logp"] is not None
    ]
    mismatch = torch.cat(mismatch) if mismatch else torch.zeros(0)
    sums.update(mismatch_sum=mismatch.sum().item(), mismatch_count=len(mismatch))
    worst = torch.tensor(mismatch.max().item() if len(mismatch) else 0.0, device=device)
    if world > 1:  # each process summed its own share
        totals = torch.tensor([sums[k] for k in SUMMED], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        sums.update(zip(SUMMED, totals.tolist()))
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    tokens = max(1.0, sums["tokens"])
    out = {
        "updated": True,
        "loss": sums["loss"] / len(grad_norms),
        "clip_frac": sums["clipped"] / tokens,
        "approx_kl": sums["approx_kl"] / tokens,
        "entropy": sums["entropy"] / tokens,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "mismatch_mean": sums["mismatch_sum"] / max(1.0, sums["mismatch_count"]),
        "mismatch_max": worst.item(),
    }
    if sums["steps"]:  # --estimator exact with a selection factor: its weight in log-probability
        out.update(
            estimator="exact",
            selection_to_token_logp=sums["selection_abs"] / max(1e-30, sums["tokens_abs"]),
            clip_frac_steps=sums["clipped_steps"] / sums["steps"],
        )
    return out


def summary_line(log):
    line = (
        f"dipo step {log['step']} | reward {log['reward']:.3f} ± {log['reward_std']:.3f} | "
        f"groups kept {log['groups_kept']}/{log['groups']} | lr {log['lr']:.1e} | loss {log['loss']:+.4f} | "
        f"clip {log['clip_frac']:.3f} | kl {log['approx_kl']:.2e} | entropy {log['entropy']:.3f} | "
        f"grad norm {log['grad_norm']:.3f} | mismatch mean {log['mismatch_mean']:.1e} "
        f"max {log['mismatch_max']:.1e} | "
    )
    if "selection_to_token_logp" in log:
        line += f"selection/token logp {log['selection_to_token_logp']:.3f} | "
    if "grad_cosine_dipo_exact" in log:
        line += f"grad cos(dipo, exact) {log['grad_cosine_dipo_exact']:.3f} | "
    return line + (
        f"{log['tokens_per_s']:,.0f} tok/s | {log['seconds']:.1f} s (prepare {log['time_prepare']:.1f}, "
        f"old {log['time_old']:.1f}, update {log['time_update']:.1f}, write {log['time_write']:.1f})"
    )
