"""Beyond the paper: --estimator exact, the score-function gradient of the whole sampler
(docs/design.md, "What unbiased means"). Used by dipo.py, which calls ExactEstimator where
DiPO takes its ratios, and gradient_probe for --diagnostics.

DiPO's loss scores what the sampler kept. But a low_confidence step draws a token at every
masked position, and the commit rule then picks which draws to keep, so the probability of a
trajectory also holds, per sampler step, the probability that the rule kept exactly that set.
exact_terms says what that factor is; dipo.py takes its ratio like a token's.
tests/test_exact.py enumerates every trajectory of a toy and finds this gradient equal to the
true one to 1e-10 (plain DiPO's is off).
"""

from collections import defaultdict

import torch

import attention


class ExactEstimator:
    """What dipo.py's loss takes ratios of under --estimator exact, for rollouts sampled with
    one set of sampler settings (exact_sampler)."""

    def __init__(self, records):
        self.sampler = exact_sampler(records)
        self.has_selection = (
            self.sampler["strategy"] != "sequential"
        )  # sequential's choice is not the model's

    def terms(self, logits, logp, where, old):
        """From one forward's logits [N, V] at every scored position: log q (the sampling
        distribution) of every committed token [K] and log S of every sampler step [U] (None
        for `sequential`), and the old terms, taken from this forward when `old` is None (step
        k's weights): the committed tokens' log pi (for the mismatch), log q, log S and the
        selection sets, which are piecewise constant in the weights and carry no gradient."""
        s = self.sampler
        logq = attention.sampling_logprobs(logits, s["temperature"], s["top_k"], s["top_p"])  # [N, V]
        if old is None:
            below = None
            if self.has_selection:
                token, committed = where["token"].to(logq.device), where["committed"].to(logq.device)
                steps, num_steps = where["sampler_step"].to(logq.device), int(where["sampler_step"].max()) + 1
                below = selection_sets(
                    logq.detach(), token, committed, steps, num_steps, s["strategy"], s["threshold"]
                )
            token_logq, selection = exact_terms(logq.detach(), where, below)
            old = {"logp": logp.detach(), "ratio_logp": token_logq, "selection": selection, "below": below}
        token_logq, selection = exact_terms(logq, where, old["below"])
        return token_logq, selection, old

    def selection_loss(self, selection, old, micro, surrogate, cfg, ratio_logp):
        """The selection terms of a micro-batch's loss: one clipped ratio per sampler step
        (surrogate: dipo.dipo_token_loss), with its response's advantage, weighted as one token
        of its response. Returns (loss, sums for the log)."""
        step_owner = step_records(micro["batch"][2])  # [U] the record of each sampler step
        step_adv = micro["record_adv"][step_owner].to(selection.device)
        loss_s, clipped_s = surrogate(selection, old["selection"], step_adv, cfg.clip_low, cfg.clip_high)
        loss = (loss_s * micro["record_weight"][step_owner].to(selection.device)).sum()
        with torch.no_grad():
            sums = {
                "steps": len(selection),
                "clipped_steps": clipped_s.sum().item(),
                "selection_abs": selection.abs().sum().item(),
                "tokens_abs": ratio_logp.abs().sum().item(),
            }
        return loss, sums


def exact_sampler(records):
    """The sampler settings the exact estimator needs (one set for the whole file), or an error
    saying why the selection factor cannot be computed for these rollouts."""
    keys = ("strategy", "threshold", "denoising_steps", "temperature", "top_k", "top_p", "engine")
    settings = {tuple(r["sampler"].get(k) for k in keys) for r in records}
    if len(settings) > 1:
        raise ValueError(f"--estimator exact: the rollouts mix sampler settings {sorted(settings, key=str)}")
    sampler = dict(zip(keys, settings.pop()))
    if sampler["engine"] != "torch":
        raise ValueError(
            f"--estimator exact: rollouts from engine {sampler['engine']!r}; the selection factor is derived "
            "for rollout.py's own commit rule only"
        )
    if sampler["strategy"] not in ("low_confidence_dynamic", "low_confidence_static", "sequential"):
        raise ValueError(f"--estimator exact: no selection factor for strategy {sampler['strategy']!r}")
    if not sampler["temperature"] or sampler["temperature"] <= 0:
        raise ValueError("--estimator exact: greedy rollouts (temperature 0) have no policy gradient")
    return sampler


def exact_terms(logq, where, below):
    """What the exact estimator takes ratios of. With q_j the sampling distribution at masked
    position j (temperature, top-k, top-p: attention.sampling_logprobs) and c a step's cutoff
    (selection_sets), the probability that the rule kept exactly the kept set is
        S = prod over masked j not kept of  sum_{u : q_j(u) < c} q_j(u)
    Kept tokens are scored under q (not pi at temperature 1), and each sampler step adds log S
    with its own ratio, the same clip and advantage, weighted as one token of its response. At
    ratio 1 the gradient is then A * grad log P(trajectory) per response: the exact score
    function. Returns log q of every committed token [K], and log S per sampler step [U] (None
    without selection sets: `sequential`'s choice of position does not depend on the model)."""
    committed, token = where["committed"].to(logq.device), where["token"].to(logq.device)
    token_logq = logq[committed].gather(-1, token[committed][:, None])[:, 0]
    if below is None:
        return token_logq, None
    num_steps = int(where["sampler_step"].max()) + 1
    return token_logq, selection_log_factor(logq, below, committed, where["sampler_step"], num_steps)


def step_records(where):
    """The record (index in the batch) of every sampler step [U]."""
    num_steps = int(where["sampler_step"].max()) + 1
    return torch.zeros(num_steps, dtype=torch.long).scatter(0, where["sampler_step"], where["record"])


def selection_sets(logq_old, token, committed, sampler_step, num_steps, strategy, threshold):
    """At every masked position j of a sampler step, the tokens u whose draw would have left j
    uncommitted, given what the step kept [N, V] bool. logq_old [N, V] is the sampling
    distribution at the sampling weights; token/committed/sampler_step [N] as
    attention.replay_batch gives them. The cutoff c of a step:
      low_confidence_dynamic, some kept token had confidence >= threshold: c = threshold
      low_confidence_dynamic, none did (the most confident draw was kept alone): c = its confidence
      low_confidence_static (the quota's most confident draws were kept): c = the least kept confidence
    and j stayed masked iff its draw had confidence < c (ties, a measure-zero event, aside)."""
    if strategy not in ("low_confidence_dynamic", "low_confidence_static"):
        raise ValueError(f"no selection factor for strategy {strategy!r}")
    q_old = logq_old.exp()
    kept_conf = q_old.gather(-1, token[:, None])[:, 0][committed]  # [K]
    if strategy == "low_confidence_dynamic":
        best = torch.zeros(num_steps, dtype=kept_conf.dtype)
        best = best.scatter_reduce(0, sampler_step[committed], kept_conf, "amax")
        cutoff = torch.where(best >= threshold, torch.full_like(best, threshold), best)  # [U]
    else:
        cutoff = torch.ones(num_steps, dtype=kept_conf.dtype)
        cutoff = cutoff.scatter_reduce(0, sampler_step[committed], kept_conf, "amin")
    return (q_old < cutoff[sampler_step][:, None]) & (q_old > 0)  # top-k/top-p filtered tokens: never drawn


def selection_log_factor(logq, below, committed, sampler_step, num_steps):
    """log S per sampler step [U]: the sum over the step's masked positions j that were not kept
    of log sum_{u in below_j} q_j(u) (0 for a step that kept every masked position). logq [N, V]
    carries the gradient."""
    # an empty set (only a train-inference mismatch at a borderline can empty one) adds nothing
    others = ~committed & below.any(-1)
    log_m = torch.logsumexp(logq[others].masked_fill(~below[others], float("-inf")), -1)  # [N']
    return torch.zeros(num_steps, dtype=logq.dtype, device=logq.device).index_add(
        0, sampler_step[others].to(logq.device), log_m
    )


def gradient_probe(model, plan, loss_of):
    """--diagnostics: how much the selection factor moves the gradient, at step k's weights
    (ratio 1), per minibatch and then averaged over the minibatches. loss_of(m, j, micro) gives
    dipo.dipo_loss's (loss, selection part) of a micro-batch. The token terms' gradient is
    DiPO's (at temperature 1, unfiltered); the whole is the exact estimator's. Logs the norm of
    the selection terms' gradient over the token terms', the cosine of the two estimators'
    gradients, and each one's noise-to-signal over the micro-batches."""
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(value):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

    sums = defaultdict(float)
    for m, micro_batches in enumerate(plan):
        whole, selection, squares = 0.0, 0.0, {"dipo": 0.0, "exact": 0.0}
        for j, micro in enumerate(micro_batches):
            loss, selection_loss = loss_of(m, j, micro)
            part, part_selection = flat_grad(loss), flat_grad(selection_loss)
            whole, selection = whole + part, selection + part_selection
            squares["exact"] += part.square().sum().item()
            squares["dipo"] += (part - part_selection).square().sum().item()
        tokens = whole - selection
        sums["ratio"] += (selection.norm() / tokens.norm().clamp(min=1e-30)).item()
        sums["cosine"] += torch.nn.functional.cosine_similarity(tokens, whole, dim=0).item()
        if len(micro_batches) > 1:
            sums["noise_dipo"] += noise_to_signal(squares["dipo"], tokens, len(micro_batches))
            sums["noise_exact"] += noise_to_signal(squares["exact"], whole, len(micro_batches))
            sums["noise_count"] += 1
    out = {
        "selection_to_token_grad": sums["ratio"] / len(plan),
        "grad_cosine_dipo_exact": sums["cosine"] / len(plan),
    }
    if sums["noise_count"]:
        out.update({f"grad_noise_{k}": sums[f"noise_{k}"] / sums["noise_count"] for k in ("dipo", "exact")})
    return out


def noise_to_signal(sum_of_squares, total, n):
    """How noisy a gradient is that sums n independent parts (micro-batches): Var(total) /
    |total|^2, with Var(total) = n s^2 and s^2 the parts' sample variance, from the sum of the
    parts' squared norms. Only an estimate: parts that share a prompt group are not independent."""
    total_sq = total.square().sum().item()
    return n * (sum_of_squares - total_sq / n) / ((n - 1) * max(total_sq, 1e-30))
