"""dipo.py: the packed one-forward scoring equals one forward per round, the objective on hand
numbers, invariance to micro-batching and processes, unbiasedness on an enumerable toy, and the
script in the loop (refusals, resume after a kill)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import attention
import dipo
import rollout
import support.model
import support.policy
from conftest import ROOT, run_here
from support.qwen3 import Qwen3Config, Qwen3ForCausalLM

MASK = 3


def per_round_logprobs(model, record, mask_id, block_size):
    """The reference, as DiRL/TraceRL do it: one forward per round over [clean ; that round's
    state], full logits; the logprob of every response token in the round that committed it."""
    prompt, response, step_map = record["prompt_ids"], record["response_ids"], record["step_map"]
    clean = prompt + response
    length, noisy_from = len(clean), len(prompt) // block_size * block_size
    out = torch.zeros(len(response))
    for s in sorted(set(step_map)):
        noisy = [
            mask_id if q >= len(prompt) and step_map[q - len(prompt)] >= s else clean[q]
            for q in range(noisy_from, length)
        ]
        layout = attention.make_layout([[(length, 1, noisy_from)]], block_size)
        logits = attention.forward_layout(model, torch.tensor([clean + noisy]), layout)[0]  # [N, V]
        logp = torch.log_softmax(logits.float(), -1)
        for t, st in enumerate(step_map):
            if st == s:
                col = length + len(prompt) + t - noisy_from
                out = out.index_put((torch.tensor([t]),), logp[col, response[t]][None])
    return out


def random_records(n, seed=0, block_size=4):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        prompt = torch.randint(4, 100, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        first = -len(prompt) % block_size
        length = first + block_size * int(torch.randint(1, 4, (1,), generator=g))
        response = torch.randint(4, 100, (length,), generator=g).tolist()
        step_map = []
        for start in (
            range(0, length, block_size) if first == 0 else [0] + list(range(first, length, block_size))
        ):
            size = first if start == 0 and first else block_size
            steps = torch.randint(0, size, (size,), generator=g)
            steps = steps - steps.min()  # a block's steps start at 0
            step_map += steps.tolist()
        records.append({"prompt_ids": prompt, "response_ids": response, "step_map": step_map[:length]})
    return records


def test_packed_forward_equals_one_forward_per_round():
    model, _ = support.model.load_model("tiny", seed=4)
    records = random_records(6)
    batch = attention.replay_batch(records, MASK, 4, 0, row_len=200)
    assert batch[0].shape[0] > 1  # several rows, several documents per row
    packed = dipo.token_logprobs(model, batch, torch.device("cpu"), torch.float32)
    where = batch[2]
    coef = torch.randn(len(packed), generator=torch.Generator().manual_seed(1))
    (packed * coef).sum().backward()
    grad_packed = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    reference = [per_round_logprobs(model, r, MASK, 4) for r in records]
    mine = torch.stack([reference[r][t] for r, t in zip(where["record"].tolist(), where["index"].tolist())])
    torch.testing.assert_close(packed, mine, atol=1e-5, rtol=1e-5)
    assert sorted(zip(where["record"].tolist(), where["index"].tolist())) == [
        (i, t) for i, r in enumerate(records) for t in range(len(r["response_ids"]))
    ]  # every token scored once
    (mine * coef).sum().backward()
    grad_reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grad_packed, grad_reference, atol=1e-5, rtol=1e-4)


def test_rounds_skip_rounds_that_commit_nothing_prompt_only_blocks_and_whole_blocks():
    record = {
        "prompt_ids": [10, 11, 12, 13, 14],
        "response_ids": [20, 21, 22, 23, 24],
        "step_map": [2, 0, 2, 0, 0],
    }
    noisy_from, block_rounds, versions = attention.replay_copies(
        record["prompt_ids"], record["response_ids"], record["step_map"], MASK, 4
    )
    # rounds 0 and 2 only (round 1 commits nothing); blocks from position 4; the second block is
    # whole after round 0, so round 2 does not replay it
    assert (noisy_from, block_rounds) == (4, [[0, 2], [0]])
    assert versions == [[[14, MASK, MASK, MASK], [14, MASK, 21, MASK]], [[MASK, MASK]]]
    ids, layout, rows, columns = attention.pack_copies(
        [([10, 11, 12, 13, 14, 20, 21, 22, 23, 24], noisy_from, versions)], 4, 0, 100
    )
    noisy = [14, MASK, MASK, MASK] + [14, MASK, 21, MASK] + [MASK, MASK]
    assert ids[0].tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23, 24] + noisy
    assert layout.copy[0].tolist() == [0] * 10 + [1] * 4 + [2] * 4 + [3] * 2
    assert layout.pos[0, 10:].tolist() == [4, 5, 6, 7] * 2 + [8, 9]
    assert rows == [[0]] and columns[0][1, 5] == 15 and columns[0][0, 9] == 19
    scored = attention.replay_positions(record, noisy_from, block_rounds, columns[0], 4)
    assert scored == [
        (12, 21, 1, 0, 1),
        (15, 20, 0, 2, 1),
        (17, 22, 2, 2, 1),
        (18, 23, 3, 0, 2),
        (19, 24, 4, 0, 2),
    ]  # (column, token, index, round, block)
    every = attention.replay_positions(record, noisy_from, block_rounds, columns[0], 4, all_masked=True)
    assert [(col, s) for col, _, _, s, _ in every] == [
        (11, 0),
        (12, 0),
        (13, 0),
        (15, 2),
        (17, 2),
        (18, 0),
        (19, 0),
    ]


def test_group_advantages_and_equal_groups():
    adv = dipo.group_advantages([1, 0, 0, 1, 1, 1, 0, 0], ["a", "a", "a", "a", "b", "b", "c", "c"])
    a = 0.5 / (0.5 + 1e-6)  # (r - mean) = +-0.5, population std 0.5
    assert adv[:4] == pytest.approx([a, -a, -a, a], rel=1e-12)
    assert adv[4:] == [0.0] * 4


def test_clipping_on_each_side_and_k3():
    logp_old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = dipo.dipo_token_loss(logp, logp_old, adv, 0.2, 0.28)
    # A > 0: min(1.5, 1.28) -> clipped high; A < 0: min(-1.5, -1.28) = -1.5 unclipped;
    # A > 0: min(0.5, 0.8) = 0.5 unclipped; A < 0: min(-0.5, -0.8) -> clipped low
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]
    logp_ref = torch.log(torch.tensor([1.0, 3.0, 0.5, 0.25]))
    with_kl, _ = dipo.dipo_token_loss(logp, logp_old, adv, 0.2, 0.28, logp_ref, beta=0.1)
    d = logp_ref - logp
    k3 = torch.exp(d) - d - 1  # e.g. ref/new = 2: 2 - ln 2 - 1
    assert k3[1].item() == pytest.approx(2 - math.log(2) - 1)
    assert (with_kl - loss).tolist() == pytest.approx((0.1 * k3).tolist(), abs=1e-6)


def test_token_weights_sum_to_the_normalised_mean():
    lengths = torch.tensor([2, 2, 3, 3, 3])  # two responses, of 2 and 3 tokens
    assert dipo.token_weights(lengths, 5, 2, "token").sum().item() == pytest.approx(1.0)
    assert dipo.token_weights(lengths, 5, 2, "sequence").tolist() == pytest.approx(
        [0.25, 0.25, 1 / 6, 1 / 6, 1 / 6]
    )


@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
def test_plan_weights_each_minibatch_to_one_over_micro_batches_and_processes(loss_norm):
    """Each minibatch's token weights sum to 1 (token: one per token / tokens; sequence: one per
    response / responses) however its records are dealt into micro-batches and processes; a
    process left without records runs a copy with weight 0; every record is scored exactly once."""
    from types import SimpleNamespace

    records = [{**r, "logprobs": [-0.5] * len(r["response_ids"])} for r in random_records(7)]
    adv = torch.linspace(-1, 1, len(records))
    minibatches = dipo.split_minibatches(len(records), 3, seed=0, policy_step=2)
    assert sorted(i for mb in minibatches for i in mb) == list(range(7)) and len(minibatches) == 3
    assert dipo.split_minibatches(7, 3, 0, 2) == minibatches != dipo.split_minibatches(7, 3, 0, 3)
    assert len(dipo.split_minibatches(2, 8, 0, 0)) == 2  # never an empty minibatch
    config = SimpleNamespace(mask_token_id=MASK, block_size=4, eos_token_id=0)
    cfg = dipo.Config(micro_batch_size=1, loss_norm=loss_norm, row_len=200)
    for world in (1, 2, 4):
        plans = [
            dipo.plan_micro_batches(records, adv, minibatches, cfg, config, rank, world, all_masked=False)
            for rank in range(world)
        ]
        for m, minibatch in enumerate(minibatches):
            parts = [micro for plan in plans for micro in plan[m]]
            assert len({len(plan[m]) for plan in plans}) == 1  # as many micro-batches on every process
            assert sum(micro["weight"].sum().item() for micro in parts) == pytest.approx(1.0)
            real = [micro for micro in parts if micro["real"]]
            assert all(micro["weight"].eq(0).all() for micro in parts if not micro["real"])
            tokens = sum(len(micro["adv"]) for micro in real)
            assert tokens == sum(len(records[i]["response_ids"]) for i in minibatch)
            assert sorted(a for micro in real for a in micro["adv"].unique().tolist()) == pytest.approx(
                sorted(adv[minibatch].tolist())
            )


# ----------------------------------------------------------------------------- unbiasedness on a toy


def toy_model():
    """Vocabulary of 4 (3 = mask), block size 2, one layer: every trajectory is enumerable."""
    config = Qwen3Config(
        vocab_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        block_size=2,
        mask_token_id=MASK,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(7)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)  # a sharply context-dependent toy
    return model


def reward(response):
    return 1.0 if response[0] == response[1] else 0.0


def test_dipo_gradient_is_unbiased_on_an_enumerable_toy_and_one_step_is_not():
    """Sequential sampler (a schedule independent of the model): E[DiPO gradient] is the exact
    gradient of the expected reward; a d1-style estimator (every token scored from the fully
    masked state) is not."""
    model = toy_model()
    params = list(model.parameters())
    prompt = [0, 1]

    def logp_in(seq, position):  # log pi(. | seq) at `position`, clean block-causal rule
        layout = attention.make_layout([[(len(seq), 0, len(seq))]], 2)
        return torch.log_softmax(
            attention.forward_layout(model, torch.tensor([seq]), layout)[0, position].float(), -1
        )

    # exact: J = sum over trajectories (x0 then x1) of p(x0 | M M) p(x1 | x0 M) r(x0, x1)
    first = logp_in(prompt + [MASK, MASK], 2)
    expected = 0.0
    for x0 in range(4):
        second = logp_in(prompt + [x0, MASK], 3)
        for x1 in range(4):
            expected = expected + torch.exp(first[x0] + second[x1]) * reward([x0, x1])
    exact = torch.autograd.grad(expected, params)
    exact = torch.cat([g.flatten() for g in exact])

    n, group, chunks = 4096, 8, 16
    cfg = rollout.Config(strategy="sequential", temperature=1.0, max_new_tokens=2)
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    results = rollout.generate(model, [prompt] * n, gens, cfg, stop_ids=set())
    records = [{"prompt_ids": prompt, **r} for r in results]
    rewards = torch.tensor([reward(r["response_ids"]) for r in records])
    adv = rewards.view(-1, group) - rewards.view(-1, group).mean(
        1, keepdim=True
    )  # group baseline, no std scaling
    adv = adv.flatten() * group / (group - 1)  # E[(r - group mean) score] = (1 - 1/G) grad J

    def estimate(one_step):
        out = []
        for c in range(chunks):
            part = records[c * n // chunks : (c + 1) * n // chunks]
            a = adv[c * n // chunks : (c + 1) * n // chunks]
            if one_step:  # every token from the fully masked block
                logp = torch.stack(
                    [
                        logp_in(prompt + [MASK, MASK], 2)[r["response_ids"][0]]
                        + logp_in(prompt + [MASK, MASK], 3)[r["response_ids"][1]]
                        for r in part
                    ]
                )
                objective = (a * logp).mean()
            else:
                batch = attention.replay_batch(part, MASK, 2, 0, row_len=512)
                logp = dipo.token_logprobs(model, batch, torch.device("cpu"), torch.float32)
                objective = (a[batch[2]["record"]] * logp).sum() / len(
                    part
                )  # = mean of A * log p(trajectory)
            out.append(torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)]))
        out = torch.stack(out)
        return out.mean(0), out.std(0) / math.sqrt(chunks)

    for one_step in (False, True):
        mean, se = estimate(one_step)
        # squared error in units of the estimator's own standard error, averaged over the
        # coordinates it moves at all: about 1 for an unbiased estimator, large for a biased one
        # (measured: DiPO 0.68, cosine 0.9986 with the exact gradient; one-step 2.5e5, cosine 0.85)
        live = se > 1e-9
        z2 = (((mean - exact)[live] / se[live]) ** 2).mean().item()
        cos = torch.nn.functional.cosine_similarity(mean, exact, dim=0).item()
        if one_step:
            assert z2 > 100 and cos < 0.95, (
                f"the one-step estimator should be visibly biased (z2 = {z2:.2f}, cos {cos:.3f})"
            )
        else:
            assert z2 < 2.0 and cos > 0.99, (
                f"DiPO should match the exact gradient within its standard error (z2 = {z2:.2f})"
            )
            assert (
                exact[~live].abs().max() < 1e-6
            )  # what it never moves, the exact gradient does not move either


# ----------------------------------------------------------------------------- the script


def run_dipo(run, *args):
    return run_here(dipo, ["--run", run, "--threads", 1, *args])


def make_run(path, seed=0):
    """A run at policy step 0 (the tiny model) with rollouts whose rewards alternate inside each
    group (a random model never answers right; dipo trusts the reward field)."""
    model, tokenizer = support.model.load_model("tiny", seed=seed)
    support.model.save_checkpoint(model, tokenizer, support.policy.policy_dir(path, 0))
    support.policy.publish_policy(path, 0)
    sample(path, 0)
    return path


def sample(run, step):
    rollout.main(
        rollout.Config(
            run=str(run), num_prompts=4, group_size=4, max_new_tokens=12, threshold=0.05, threads=1
        )
    )
    path = run / "rollouts" / f"step_{step:06d}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(records):
        r["reward"] = float(i % 2)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"dipo"' in line]


def test_update_at_the_sampling_weights_has_no_mismatch_and_ratio_one(tmp_path):
    run = make_run(tmp_path / "r")
    out = run_dipo(run, "--minibatches", 1)
    assert out.returncode == 0, out.stderr
    m = metrics(run)[-1]
    assert m["updated"] and m["step"] == 1
    assert m["mismatch_max"] < 1e-4
    assert m["approx_kl"] == 0.0 and m["clip_frac"] == 0.0  # one on-policy step: every ratio is exactly 1
    assert support.policy.latest_policy(run)[0] == 1
    assert torch.load(run / "dipo_state.pt", weights_only=True)["step"] == 1
    again = run_dipo(run)  # the same k again: its rollouts are gone with the step, so it says so
    assert again.returncode != 0 and "no rollouts for policy step 1" in again.stderr
    sample(run, 1)  # two minibatches: the second one's logp_old comes from a pass before any step
    assert (
        run_dipo(run, "--minibatches", 2, "--ppo-epochs", 2).returncode == 0
        and support.policy.latest_policy(run)[0] == 2
    )
    m = metrics(run)[-1]
    assert m["mismatch_max"] < 1e-4 and m["approx_kl"] > 0.0
    sample(run, 2)  # more minibatches than responses: one response each, none left empty
    out = run_dipo(run, "--minibatches", 40)
    assert out.returncode == 0, out.stderr
    assert support.policy.latest_policy(run)[0] == 3 and metrics(run)[-1]["mismatch_max"] < 1e-4


def update_copies(tmp_path, variants, two_processes=()):
    """One update of the same run per variant (flags), plus one under torchrun with 2 gloo
    processes ("two", micro-batches of 3, the flags two_processes). Returns {name: run dir}."""
    base = make_run(tmp_path / "base")
    runs = {}
    for name, extra in variants.items():
        runs[name] = tmp_path / name
        shutil.copytree(base, runs[name])
        out = run_dipo(runs[name], *extra)
        assert out.returncode == 0, out.stderr
    runs["two"] = tmp_path / "two"
    shutil.copytree(base, runs["two"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--"]
    out = subprocess.run(
        torchrun
        + [
            str(ROOT / "dipo.py"),
            "--run",
            str(runs["two"]),
            "--threads",
            "1",
            "--micro-batch-size",
            "3",
            *map(str, two_processes),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return runs


def test_gradient_is_the_same_for_any_micro_batch_and_two_processes(tmp_path):
    four = [
        "--minibatches",
        4,
    ]  # 4 optimizer steps: the later ones run with ratio != 1, and the weight bar below holds
    runs = update_copies(
        tmp_path,
        {
            "mb16": four + ["--micro-batch-size", 16],
            "mb1": four + ["--micro-batch-size", 1],
            "seq16": four + ["--loss-norm", "sequence"],
            "seq1": four + ["--loss-norm", "sequence", "--micro-batch-size", 1],
            "recompute": four + ["--grad-checkpointing"],
            "old_recomputed": four + ["--old-logprobs", "recomputed"],
        },
        two_processes=four,
    )
    m = {name: metrics(run)[-1] for name, run in runs.items()}
    pairs = (
        ("mb16", "mb1"),
        ("mb16", "two"),
        ("seq16", "seq1"),
        ("mb16", "recompute"),
        ("mb16", "old_recomputed"),
    )
    for a, b in pairs:
        assert m[a]["loss"] == pytest.approx(m[b]["loss"], rel=1e-4, abs=1e-7)
        assert m[a]["grad_norm"] == pytest.approx(m[b]["grad_norm"], rel=1e-4)
    assert m["mb16"]["grad_norm"] != pytest.approx(
        m["seq16"]["grad_norm"], rel=1e-3
    )  # the norms really differ
    w = {name: load_file(run / "policy" / "step_000001" / "model.safetensors") for name, run in runs.items()}
    # Adam moves each weight by about lr * sign(gradient) per step, so a coordinate whose
    # gradient is ~0 can move by up to lr (1e-4) on float noise alone: a tenth of that is the bar
    for name in w["mb16"]:
        torch.testing.assert_close(w["two"][name], w["mb16"][name], atol=1e-5, rtol=0)
        torch.testing.assert_close(w["old_recomputed"][name], w["mb16"][name], atol=1e-5, rtol=0)


def test_old_logprobs_come_from_the_records_of_our_sampler_and_are_recomputed_otherwise(
    tmp_path, monkeypatch
):
    """auto reads log pi_old of our torch sampler's records (a forward per micro-batch of
    minibatches 2.. saved), recomputes it for another engine's and for --estimator exact; the
    mismatch is still taken where a forward ran at step k's weights."""
    assert dipo.use_recorded("auto", "dipo", {"torch"})
    assert not dipo.use_recorded("auto", "dipo", {"lmdeploy"})
    assert not dipo.use_recorded("auto", "dipo", {"torch", "lmdeploy"})
    assert not dipo.use_recorded("auto", "dipo", {None})  # a record that does not say its engine
    assert not dipo.use_recorded("auto", "exact", {"torch"})
    assert dipo.use_recorded("recorded", "dipo", {"lmdeploy"})
    assert not dipo.use_recorded("recomputed", "dipo", {"torch"})
    with pytest.raises(ValueError, match="--estimator exact"):
        dipo.use_recorded("recorded", "exact", {"torch"})
    forwards, forward_scores = [], dipo.forward_scores

    def counting(model, batch, device, dtype):
        forwards.append(torch.is_grad_enabled())
        return forward_scores(model, batch, device, dtype)

    monkeypatch.setattr(dipo, "forward_scores", counting)
    for choice, no_grad_forwards in (("auto", 0), ("recomputed", 2)):
        run, forwards[:] = make_run(tmp_path / choice), []
        assert dipo.main(dipo.Config(run=str(run), minibatches=3, old_logprobs=choice, threads=1)) == 0
        assert forwards.count(False) == no_grad_forwards and forwards.count(True) == 3
        assert 0.0 <= metrics(run)[-1]["mismatch_max"] < 1e-4


def test_kl_goes_through_the_loss_function_and_grad_norm_is_the_mean_over_minibatches(tmp_path, monkeypatch):
    """--beta 0.1 end to end: the KL term reaches dipo_token_loss (the one loss function) with
    the reference policy's logprobs and the policy's; the logged grad_norm is the mean of the
    step's optimizer steps (2 minibatches here), not the last one."""
    run = make_run(tmp_path / "r")
    calls, norms = [], []
    loss_function, clip = dipo.dipo_token_loss, torch.nn.utils.clip_grad_norm_

    def recording_loss(*args, **kwargs):
        calls.append((args, kwargs))
        return loss_function(*args, **kwargs)

    def recording_clip(*args, **kwargs):
        norms.append(clip(*args, **kwargs).item())
        return torch.tensor(norms[-1])

    monkeypatch.setattr(dipo, "dipo_token_loss", recording_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    assert dipo.main(dipo.Config(run=str(run), beta=0.1, minibatches=2, threads=1)) == 0
    assert calls and all(
        args[6] == 0.1 and args[5] is not None and kwargs["logp_policy"] is not None for args, kwargs in calls
    )
    ref, new = calls[0][0][5], calls[0][1]["logp_policy"]
    torch.testing.assert_close(
        ref, new.detach(), atol=1e-5, rtol=0
    )  # the first minibatch runs at the reference weights
    assert len(norms) == 2 and norms[0] != pytest.approx(norms[1], rel=1e-3)
    assert metrics(run)[-1]["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-9)


def test_warmup_follows_the_policy_step_and_overrides_the_saved_lr(tmp_path):
    """--warmup-steps 4 at lr 1e-4: update k runs at k/4 of it. Bit for bit the same weights as
    constant rates of 2.5e-5 then 5e-5, each update in a fresh call: the schedule comes from
    the policy step, and the optimizer state saved by the last update does not bring its lr."""
    assert [dipo.warmup_lr(1e-4, 4, k) for k in (1, 2, 4, 9)] == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4])
    assert dipo.warmup_lr(1e-4, 0, 1) == 1e-4
    warm = make_run(tmp_path / "warm")
    plain = tmp_path / "plain"
    shutil.copytree(warm, plain)
    for step, lr in ((1, 2.5e-5), (2, 5e-5)):
        assert dipo.main(dipo.Config(run=str(warm), warmup_steps=4, threads=1)) == 0
        assert dipo.main(dipo.Config(run=str(plain), lr=lr, threads=1)) == 0
        assert metrics(warm)[-1]["lr"] == pytest.approx(lr) and metrics(plain)[-1]["lr"] == lr
        a = load_file(support.policy.policy_dir(warm, step) / "model.safetensors")
        b = load_file(support.policy.policy_dir(plain, step) / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        if step == 1:
            sample(warm, 1)
            sample(plain, 1)


def test_all_equal_rewards_carry_the_policy_over_with_exit_code_3(tmp_path):
    run = make_run(tmp_path / "r")
    path = run / "rollouts" / "step_000000.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "reward": 1.0}) + "\n" for r in records))
    out = run_dipo(run, "--dapo-filter")
    assert out.returncode == dipo.NOTHING_TO_LEARN and "no group has a learning signal" in out.stdout
    assert support.policy.latest_policy(run)[0] == 1 and metrics(run)[-1]["updated"] is False
    a = load_file(support.policy.policy_dir(run, 0) / "model.safetensors")
    b = load_file(support.policy.policy_dir(run, 1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_update_is_redone_or_completed(tmp_path):
    run = make_run(tmp_path / "r")
    reference = tmp_path / "ref"
    shutil.copytree(run, reference)
    assert run_dipo(reference).returncode == 0
    # kill as soon as the new checkpoint appears, before or after dipo_state.pt is written
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "dipo.py"), "--run", str(run), "--threads", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not support.policy.policy_dir(run, 1).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_dipo(run)
    assert out.returncode == 0, out.stderr
    assert support.policy.latest_policy(run)[0] == 1
    a = load_file(support.policy.policy_dir(run, 1) / "model.safetensors")
    b = load_file(support.policy.policy_dir(reference, 1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a state file that says the update finished but latest not moved: completed, not redone
    (run / "policy" / "latest").write_text("step_000000\n")
    out = run_dipo(run)
    assert (
        out.returncode == 0 and "already written" in out.stdout and support.policy.latest_policy(run)[0] == 1
    )


def adamw_run(optimizer, model, steps, seed):
    """`steps` optimizer steps of a tiny model on seeded random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=gen)  # a DTensor's shape is the whole one
            if hasattr(param, "placements"):  # sharded by FSDP2: this process's part of the same draw
                from torch.distributed.tensor import distribute_tensor

                param.grad = distribute_tensor(
                    param.grad, param.device_mesh, param.placements, src_data_rank=None
                )
        optimizer.step()
        optimizer.zero_grad()


def test_adamw_is_torchs_to_the_bit_and_continues_from_torchs_state():
    """support.distributed.AdamW (ours: torch's optimizers import torch._dynamo when built) takes
    the steps torch.optim.AdamW takes, bit for bit on the CPU, with weight decay and a tied head;
    a state saved from torch's (as torch.distributed.checkpoint names it) continues the same."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from support.distributed import AdamW

    theirs_model, _ = support.model.load_model("tiny", seed=1)
    ours_model, _ = support.model.load_model("tiny", seed=1)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    ours = AdamW(ours_model, lr=3e-3, weight_decay=0.1)
    adamw_run(theirs, theirs_model, 3, seed=0)
    adamw_run(ours, ours_model, 3, seed=0)
    for (name, a), b in zip(theirs_model.named_parameters(), ours_model.parameters()):
        assert torch.equal(a, b), name
    saved = get_optimizer_state_dict(theirs_model, theirs, options=StateDictOptions(full_state_dict=True))
    assert sorted(saved["state"]) == sorted(ours.full_state_dict()["state"])
    resumed = AdamW(ours_model, lr=1e-3, weight_decay=0.1)
    resumed.load_full_state_dict(saved)
    for group in theirs.param_groups:
        group["lr"] = 1e-3  # as dipo.py does: the moments carry over, the lr is the new step's
    adamw_run(theirs, theirs_model, 2, seed=1)
    adamw_run(resumed, ours_model, 2, seed=1)
    for (name, a), b in zip(theirs_model.named_parameters(), ours_model.parameters()):
        assert torch.equal(a, b), name
    assert resumed.full_state_dict()["state"]["lm_head.weight"]["step"] == 5


SHARDED_ADAMW = """
import sys, torch
from support.distributed import full_state, init_distributed, make_optimizer
from support.model import load_model
from test_dipo import adamw_run
rank, world, _ = init_distributed(threads=1)
model, _ = load_model("tiny", seed=1)
optimizer = make_optimizer(model, 3e-3, 0.1, False, world, torch.float32)
optimizer.load_full_state_dict(torch.load(sys.argv[1], weights_only=True))
adamw_run(optimizer, model, 2, seed=1)
weights, state = full_state(model, optimizer)
if rank == 0:
    torch.save({"weights": weights, "state": state}, sys.argv[2])
torch.distributed.destroy_process_group()
"""


def test_adamw_state_shards_under_fsdp2_and_gathers_back_whole(tmp_path):
    """Under torchrun (2 gloo processes, FSDP2) each process keeps its shard of a loaded state,
    and two more steps give the weights and state that one process gets."""
    from support.distributed import AdamW, full_state

    model, _ = support.model.load_model("tiny", seed=1)
    optimizer = AdamW(model, lr=3e-3, weight_decay=0.1)
    adamw_run(optimizer, model, 3, seed=0)
    torch.save(optimizer.full_state_dict(), tmp_path / "state.pt")
    model, _ = support.model.load_model("tiny", seed=1)  # what the sharded run does, in one process
    optimizer = AdamW(model, lr=3e-3, weight_decay=0.1)
    optimizer.load_full_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    adamw_run(optimizer, model, 2, seed=1)
    weights, state = full_state(model, optimizer)
    (tmp_path / "sharded.py").write_text(SHARDED_ADAMW)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*torchrun, str(tmp_path / "sharded.py"), str(tmp_path / "state.pt"), str(tmp_path / "two.pt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, value in weights.items():
        torch.testing.assert_close(two["weights"][name], value, atol=1e-6, rtol=0)
    for name, slots in state["state"].items():
        for slot, value in slots.items():
            torch.testing.assert_close(two["state"]["state"][name][slot], value, atol=1e-6, rtol=0)
