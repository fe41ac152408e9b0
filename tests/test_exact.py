"""dipo.py --estimator exact: on a toy small enough to enumerate every trajectory of the
sampler, the exact estimator's expected gradient is the true gradient of the expected reward
(and plain DiPO's is not, for confidence-based commit rules); and rollout.py's sampler draws
trajectories with exactly the enumerated probabilities."""

import itertools
import json
from collections import Counter, defaultdict

import pytest
import torch

import attention
import dipo
import rollout
import support.exact
from conftest import refusal
from support.qwen3 import Qwen3Config, Qwen3ForCausalLM

MASK, VOCAB, BLOCK = 3, 4, 3
PROMPT = [0, 1, 2]  # one whole block; the response is the next block of 3


def toy_model(dtype=torch.float64, seed=3):
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        block_size=BLOCK,
        mask_token_id=MASK,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)  # context-dependent
        model.lm_head.weight.mul_(5.0)  # and confident enough that steps commit one, two or three tokens
    return model.to(dtype)


def reward(tokens):
    return float(tokens[0] == tokens[1]) + 0.5 * float(tokens[2] == 1)


def enumerate_trajectories(model, sampler):
    """{(response tokens, step_map): probability} over every trajectory of one block, built
    from the sampler's own pieces (attention.sampling_logprobs, rollout.choose_commits,
    rollout.static_quota) by summing over every joint draw of every step. The probabilities
    are differentiable in the model's weights."""
    cache, out = {}, defaultdict(float)

    def sampling_dist(state):  # [BLOCK, V]: what the sampler draws from in this state
        if state not in cache:
            seq = PROMPT + [MASK if t is None else t for t in state]
            layout = attention.make_layout([[(len(seq), 0, len(seq))]], BLOCK)  # block-causal, no noisy copy
            logits = attention.forward_layout(model, torch.tensor([seq]), layout)[0, len(PROMPT) :]
            cache[state] = attention.sampling_logprobs(
                logits, sampler["temperature"], sampler["top_k"], sampler["top_p"]
            )
        return cache[state]

    def expand(state, step_map, step, prob):
        masked = [j for j in range(BLOCK) if state[j] is None]
        if not masked:
            out[tuple(state), tuple(step_map)] = out[tuple(state), tuple(step_map)] + prob
            return
        logq = sampling_dist(tuple(state))
        for draw in itertools.product(range(VOCAB), repeat=len(masked)):
            logq_draw = torch.stack([logq[j, v] for j, v in zip(masked, draw)])
            if torch.isinf(logq_draw).any():  # filtered out by top-k / top-p: never drawn
                continue
            confidence = torch.zeros(1, BLOCK, dtype=torch.float64)
            confidence[0, masked] = logq_draw.detach().exp()
            is_masked = torch.tensor([[t is None for t in state]])
            quota = torch.tensor([rollout.static_quota(BLOCK, sampler["denoising_steps"], step)])
            commit = rollout.choose_commits(
                confidence, is_masked, sampler["strategy"], sampler["threshold"], quota
            )[0]
            new_state, new_map = list(state), list(step_map)
            for j, v in zip(masked, draw):
                if commit[j]:
                    new_state[j], new_map[j] = v, step
            expand(new_state, new_map, step + 1, prob * logq_draw.sum().exp())

    expand([None] * BLOCK, [-1] * BLOCK, 0, torch.tensor(1.0, dtype=torch.float64))
    return dict(out)


def sampler_settings(
    strategy="low_confidence_dynamic", threshold=0.5, temperature=1.0, top_k=0, top_p=1.0, steps=3
):
    return {
        "strategy": strategy,
        "threshold": threshold,
        "denoising_steps": steps,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "engine": "torch",
    }


def estimator_log_probs(model, trajectories, sampler, estimator):
    """Per trajectory, the log-probability whose gradient the estimator follows, computed by
    dipo.py's own code: 'dipo' = the kept tokens' logprobs at temperature 1; 'exact' = the kept
    tokens under the sampling distribution plus every step's selection factor."""
    records = [
        {"prompt_ids": PROMPT, "response_ids": list(tokens), "step_map": list(step_map)}
        for tokens, step_map in trajectories
    ]
    batch = attention.replay_batch(records, MASK, BLOCK, 0, row_len=256, all_masked=estimator == "exact")
    where = batch[2]
    logits, logp, _ = dipo.forward_scores(model, batch, torch.device("cpu"), torch.float32)
    logq = attention.sampling_logprobs(logits, sampler["temperature"], sampler["top_k"], sampler["top_p"])
    kept_record = where["record"][where["committed"]]
    total = torch.zeros(len(records), dtype=torch.float64)
    if estimator == "dipo":
        return total.index_add(0, kept_record, logp)
    below = None
    if sampler["strategy"] != "sequential":
        num_steps = int(where["sampler_step"].max()) + 1
        below = support.exact.selection_sets(
            logq.detach(),
            where["token"],
            where["committed"],
            where["sampler_step"],
            num_steps,
            sampler["strategy"],
            sampler["threshold"],
        )
    tokens, selection = support.exact.exact_terms(logq, where, below)
    total = total.index_add(0, kept_record, tokens)
    if selection is not None:
        total = total.index_add(0, support.exact.step_records(where), selection)
    return total


def flat_grad(value, model):
    return torch.cat(
        [g.flatten() for g in torch.autograd.grad(value, list(model.parameters()), retain_graph=True)]
    )


CASES = {
    "dynamic": sampler_settings(),
    "dynamic, threshold 0.7": sampler_settings(threshold=0.7),
    "dynamic, T = 0.7, top-k 3": sampler_settings(temperature=0.7, top_k=3),
    "dynamic, T = 1.5, top-p 0.9": sampler_settings(temperature=1.5, top_p=0.9),
    "static, 2 steps": sampler_settings("low_confidence_static", steps=2),
    "sequential": sampler_settings("sequential"),
}


@pytest.mark.parametrize("case", CASES)
def test_exact_estimator_is_the_true_gradient_of_the_expected_reward(case):
    sampler = CASES[case]
    model = toy_model()
    trajectories = enumerate_trajectories(model, sampler)
    prob = torch.stack(list(trajectories.values()))  # [T]
    rewards = torch.tensor([reward(tokens) for tokens, _ in trajectories], dtype=torch.float64)
    assert abs(prob.sum().item() - 1) < 1e-12
    if (
        sampler["strategy"] == "low_confidence_dynamic"
    ):  # both kinds of step occur: threshold (several kept) and fallback
        steps = [len(set(step_map)) for _, step_map in trajectories]
        assert sum(p for p, n in zip(prob.tolist(), steps) if n < BLOCK) > 0.01
        assert sum(p for p, n in zip(prob.tolist(), steps) if n == BLOCK) > 0.01
    true_grad = flat_grad((prob * rewards).sum(), model)  # d/dtheta E[r]

    log_p_exact = estimator_log_probs(model, list(trajectories), sampler, "exact")
    torch.testing.assert_close(
        log_p_exact.exp(), prob.detach(), rtol=1e-10, atol=1e-13
    )  # the closed form is the probability
    # E[A * grad log P] summed exactly over trajectories, with A = r - E[r] as GRPO's group mean
    # approximates it (the exact estimator does not need the baseline; plain DiPO is closer with it)
    weight = (prob * (rewards - (prob * rewards).sum())).detach()
    exact = flat_grad((weight * log_p_exact).sum(), model)
    assert (exact - true_grad).abs().max().item() < 1e-10 * max(1.0, true_grad.abs().max().item())

    plain = flat_grad((weight * estimator_log_probs(model, list(trajectories), sampler, "dipo")).sum(), model)
    gap = ((plain - true_grad).norm() / true_grad.norm()).item()
    if case == "sequential":  # a schedule that does not depend on the model: DiPO is exact too
        assert gap < 1e-10
    else:
        assert gap > 0.1, f"{case}: plain DiPO should miss the selection factor (relative gap {gap:.3g})"


def test_the_sampler_draws_trajectories_with_the_enumerated_probabilities():
    """Empirical frequencies of rollout.generate on the toy against the enumeration: a Pearson
    chi-square over cells with at least 5 expected draws (smaller ones pooled), accepted below
    dof + 6 sqrt(2 dof). The same statistic rejects the distribution plain DiPO assumes."""
    sampler = sampler_settings()
    model = toy_model(torch.float32)
    with torch.no_grad():
        trajectories = {k: v.item() for k, v in enumerate_trajectories(model.double(), sampler).items()}
        model.float()
        dipo_weights = estimator_log_probs(model.double(), list(trajectories), sampler, "dipo").exp().tolist()
        model.float()
    n = 20_000
    cfg = rollout.Config(
        strategy=sampler["strategy"], threshold=sampler["threshold"], temperature=1.0, max_new_tokens=BLOCK
    )
    results = rollout.generate(
        model, [PROMPT] * n, [torch.Generator().manual_seed(i) for i in range(n)], cfg, stop_ids=set()
    )
    seen = Counter((tuple(r["response_ids"]), tuple(r["step_map"])) for r in results)
    assert set(seen) <= set(trajectories)  # nothing the enumeration calls impossible

    def chi_square(probabilities):
        big = [k for k, p in probabilities.items() if n * p >= 5]
        observed = [seen[k] for k in big] + [n - sum(seen[k] for k in big)]
        expected = [n * probabilities[k] for k in big] + [n * (1 - sum(probabilities[k] for k in big))]
        stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
        return stat, len(big)

    stat, dof = chi_square(trajectories)
    assert dof > 20 and stat < dof + 6 * (2 * dof) ** 0.5, (
        f"chi-square {stat:.1f} with {dof} degrees of freedom"
    )
    total = sum(dipo_weights)  # the kept tokens' probabilities alone, renormalised
    wrong, _ = chi_square({k: w / total for k, w in zip(trajectories, dipo_weights)})
    assert wrong > 10 * (dof + 6 * (2 * dof) ** 0.5), (
        f"the test should reject the selection-free distribution ({wrong:.1f})"
    )


def test_exact_script_is_invariant_to_micro_batches_and_processes_and_refuses_what_it_cannot_score(tmp_path):
    from test_dipo import metrics, run_dipo, sample, update_copies

    runs = update_copies(
        tmp_path,
        {
            "dipo": [],
            "mb16": ["--estimator", "exact", "--diagnostics"],
            "mb1": ["--estimator", "exact", "--micro-batch-size", 1],
        },
        two_processes=["--estimator", "exact", "--diagnostics"],
    )
    base = tmp_path / "base"
    m = {name: metrics(run)[-1] for name, run in runs.items()}
    for name in ("mb1", "two"):
        assert m[name]["loss"] == pytest.approx(m["mb16"]["loss"], rel=1e-4, abs=1e-7)
        assert m[name]["grad_norm"] == pytest.approx(m["mb16"]["grad_norm"], rel=1e-4)
        assert m[name]["selection_to_token_logp"] == pytest.approx(
            m["mb16"]["selection_to_token_logp"], rel=1e-4
        )
    assert (
        m["mb16"]["selection_to_token_logp"] > 0.01
    )  # these rollouts left positions masked: the factor is there
    assert -1 <= m["mb16"]["grad_cosine_dipo_exact"] < 0.9999 and m["mb16"]["selection_to_token_grad"] > 0
    assert m["mb16"]["grad_norm"] != pytest.approx(m["dipo"]["grad_norm"], rel=1e-3)
    assert "grad_cosine_dipo_exact" not in m["two"]  # one process only
    sample(runs["mb16"], 1)  # more passes: the old terms of the second minibatch come from before any step
    out = run_dipo(runs["mb16"], "--estimator", "exact", "--minibatches", 2, "--ppo-epochs", 2)
    assert out.returncode == 0, out.stderr
    assert metrics(runs["mb16"])[-1]["mismatch_max"] < 1e-4

    path = base / "rollouts" / "step_000000.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for change, message in (
        ({"temperature": 0.0}, "greedy"),
        ({"engine": "lmdeploy"}, "rollout.py's own commit rule"),
        ({"strategy": "random"}, "no selection factor"),
    ):
        path.write_text(
            "".join(json.dumps({**r, "sampler": {**r["sampler"], **change}}) + "\n" for r in records)
        )
        assert message in refusal(dipo, ["--run", base, "--estimator", "exact"])
    assert "choose from dipo, exact" in refusal(dipo, ["--run", base, "--estimator", "unbiased"])
