"""rollout.py: the KV-cached sampler equals a recompute-everything reference, every recorded
logprob is the model's in the state its step_map implies, the commit rules, stops, and the
script's files and refusals."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import attention
import rollout
import support.data
import support.engine
import support.flags
import support.model
import support.policy
import support.row_cache
from conftest import ROOT, assert_same_records, refusal, run_here

PROMPT_LENGTHS = [5, 8, 11, 3, 14]  # mixed, including whole blocks (8) and a prompt shorter than a block (3)


@pytest.fixture(scope="module")
def stopping_model():
    """The tiny model with a boosted eos row in its LM head, so that some samples stop early
    and some run to the length limit."""
    model, tokenizer = support.model.load_model("tiny", seed=1)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 12
    return model.eval(), tokenizer


def sampler_cfg(**kw):
    base = dict(
        strategy="low_confidence_dynamic",
        threshold=0.05,
        denoising_steps=4,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=16,
    )
    return rollout.Config(**{**base, **kw})


def prompts_of(lengths):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@torch.no_grad()
def reference_generate(model, prompt, generator, cfg, stop_ids):
    """Recompute everything: every step runs the whole sequence (prompt, committed blocks, the
    current block) under the clean block-causal rule, without a cache, one sequence at a time."""
    b, mask_id = model.config.block_size, model.config.mask_token_id
    start = len(prompt) // b * b  # position of the first block that still has room
    done, block = list(prompt[:start]), list(prompt[start:]) + [mask_id] * (b - len(prompt) + start)
    out = dict(response_ids=[], step_map=[], logprobs=[], finish="length")
    while True:
        masked = torch.tensor([[t == mask_id for t in block]])
        new = masked[0].clone()
        to_commit = masked.sum(-1)
        step_map, logprobs, step = [-1] * b, [0.0] * b, 0
        while masked.any():
            seq = torch.tensor([done + block])
            length = seq.shape[1]
            logits = attention.forward_layout(model, seq, attention.make_layout([[(length, 0, length)]], b))[
                :, -b:
            ]
            uniforms = torch.rand(b, generator=generator)[None]
            tokens, confidence, logp = rollout.sample_tokens(
                logits, cfg.temperature, cfg.top_k, cfg.top_p, uniforms
            )
            quota = torch.tensor([rollout.static_quota(to_commit.item(), cfg.denoising_steps, step)])
            commit = rollout.choose_commits(confidence, masked, cfg.strategy, cfg.threshold, quota)[0]
            for i in commit.nonzero().flatten().tolist():
                block[i], step_map[i], logprobs[i] = tokens[0, i].item(), step, logp[0, i].item()
            masked[0] &= ~commit
            step += 1
        for i in new.nonzero().flatten().tolist():
            out["response_ids"].append(block[i])
            out["step_map"].append(step_map[i])
            out["logprobs"].append(logprobs[i])
        if any(block[i] in stop_ids for i in new.nonzero().flatten().tolist()):
            out["finish"] = "stop"
            return out
        if len(out["response_ids"]) >= cfg.max_new_tokens:
            return out
        done, block = done + block, [mask_id] * b


@pytest.mark.parametrize("strategy", rollout.STRATEGIES)
def test_kv_cached_sampler_equals_recompute_everything(stopping_model, strategy):
    model, tokenizer = stopping_model
    cfg = sampler_cfg(strategy=strategy)
    stop_ids = {tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)}
    prompts = prompts_of(PROMPT_LENGTHS)
    cached = rollout.generate(model, prompts, generators(len(prompts)), cfg, stop_ids)
    for prompt, gen, got in zip(prompts, generators(len(prompts)), cached):
        want = reference_generate(model, prompt, gen, cfg, stop_ids)
        assert got["response_ids"] == want["response_ids"]
        assert got["step_map"] == want["step_map"]
        assert got["finish"] == want["finish"]
        torch.testing.assert_close(
            torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-4, rtol=1e-4
        )
    assert {r["finish"] for r in cached} == {"stop", "length"}  # both endings are exercised


def mixed_prompts(n, seed=1):
    """n prompts of very different lengths (2 to 41 tokens): rows start in different columns
    of their first block and carry different amounts of cache."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 42, (n,), generator=g).tolist()
    return [torch.randint(4, 100, (k,), generator=g).tolist() for k in lengths]


def test_batch_of_64_with_mixed_lengths_equals_recompute_everything(stopping_model):
    model, tokenizer = stopping_model
    cfg = sampler_cfg(max_new_tokens=12)
    stop_ids = {tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)}
    prompts = mixed_prompts(64)
    cached = rollout.generate(model, prompts, generators(64), cfg, stop_ids)
    for prompt, gen, got in zip(prompts, generators(64), cached):
        want = reference_generate(model, prompt, gen, cfg, stop_ids)
        assert (got["response_ids"], got["step_map"], got["finish"]) == (
            want["response_ids"],
            want["step_map"],
            want["finish"],
        )
        torch.testing.assert_close(
            torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-4, rtol=1e-4
        )
    first_block = [-len(p) % 4 or 4 for p in prompts]  # response tokens in each row's first block
    assert any(r["finish"] == "stop" and len(r["response_ids"]) <= k for r, k in zip(cached, first_block))
    assert any(r["finish"] == "length" for r in cached)


def test_batch_of_one_equals_batch_of_64(stopping_model):
    model, tokenizer = stopping_model
    cfg, stop_ids = sampler_cfg(max_new_tokens=12), {tokenizer.eos_token_id}
    prompts = mixed_prompts(64, seed=2)
    together = rollout.generate(model, prompts, generators(64), cfg, stop_ids)
    alone = [rollout.generate(model, [p], [g], cfg, stop_ids)[0] for p, g in zip(prompts, generators(64))]
    for a, b in zip(together, alone):
        assert (a["response_ids"], a["step_map"], a["finish"]) == (
            b["response_ids"],
            b["step_map"],
            b["finish"],
        )
        assert (
            max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-5
        )  # another batch shape: rounding


def test_every_forward_row_has_work(stopping_model):
    """Rows advance independently: every forward is a denoising step of every live row; a row
    whose block is complete writes it in the same forward as the first step of its next block
    (a chunk of two blocks), and a row that stops leaves at once. The chunks are packed, so
    the tokens over all forwards are the prefill's plus, per row, a block per denoising step
    and a block per written block (every block but the last): no padding."""
    model, tokenizer = stopping_model
    cfg, stop_ids = sampler_cfg(max_new_tokens=40), {tokenizer.eos_token_id}
    prompts = prompts_of(PROMPT_LENGTHS)
    calls = []  # (tokens, rows, chunk widths) per forward
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(
            (args[0].shape[1], *torch.unique(kwargs["cache"].rows, return_counts=True))
        ),
        with_kwargs=True,
    )
    try:
        results = rollout.generate(model, prompts, generators(len(prompts)), cfg, stop_ids)
    finally:
        hook.remove()
    b = model.config.block_size
    steps = blocks = 0
    for p, r in zip(prompts, results):
        first = -len(p) % b or b  # response tokens in the first block
        sizes = [first] + [b] * -(-(len(r["response_ids"]) - first) // b)
        cuts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        row_steps = sum(max(r["step_map"][cuts[k] : cuts[k + 1]]) + 1 for k in range(len(sizes)))
        assert row_steps == r["forwards"]
        steps, blocks = steps + row_steps, blocks + len(sizes)
    prefill = sum(len(p) // b * b for p in prompts)
    assert calls[0][0] == prefill and sum(tokens for tokens, _, _ in calls[1:]) == b * (
        steps + blocks - len(prompts)
    )
    assert sum(len(rows) for _, rows, _ in calls[1:]) == steps  # each live row once per forward
    assert {w for _, _, widths in calls[1:] for w in widths.tolist()} == {b, 2 * b}
    assert any(r["finish"] == "stop" and len(r["response_ids"]) < 20 for r in results)
    live = [len(rows) for _, rows, _ in calls[1:]]
    assert max(live) == len(prompts) and live[-1] < len(prompts)  # rows leave as they finish


def test_rows_join_as_others_leave(stopping_model):
    """With batch_size below the number of prompts, waiting prompts take the rows of finished
    ones; the G samples of a prompt share its prefill. Every record is the one the whole
    batch at once gives."""
    model, tokenizer = stopping_model
    cfg, stop_ids = sampler_cfg(max_new_tokens=12), {tokenizer.eos_token_id}
    prompts = mixed_prompts(12, seed=3)
    prompts = [p for p in prompts for _ in range(2)] + prompts[:3]  # repeated prompts, as a group's samples
    at_once = rollout.generate(model, prompts, generators(len(prompts)), cfg, stop_ids)
    live, finished = [], []  # [rows, is a step] per forward; rows finished per call
    hooks = [  # a denoising step runs the LM head after the model, a prefill does not
        model.register_forward_hook(
            lambda m, args, kwargs, out: live.append([kwargs["cache"].rows.unique().numel(), False]),
            with_kwargs=True,
        ),
        model.lm_head.register_forward_hook(lambda m, args, out: live[-1].__setitem__(1, True)),
    ]
    try:
        joined = rollout.generate(
            model, prompts, generators(len(prompts)), cfg, stop_ids, batch_size=8, progress=finished.append
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert_same_records(joined, at_once)
    assert max(rows for rows, step in live if step) == 8
    assert sum(not step for _, step in live) > 2  # prompts joined in several groups
    assert sum(finished) == len(prompts)


def test_evaluation_switches_ban_eos_and_early_stops(stopping_model):
    """DiRL's evaluation protocol: <|endoftext|> never drawn, no stop token in the first
    min_new_tokens positions (the stopping model would otherwise stop early)."""
    model, tokenizer = stopping_model
    eos, im_end = tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)
    prompts = prompts_of(PROMPT_LENGTHS)
    plain = rollout.generate(
        model, prompts, generators(len(prompts)), sampler_cfg(max_new_tokens=24), {eos, im_end}
    )
    assert any(eos in r["response_ids"] for r in plain)
    cfg = sampler_cfg(max_new_tokens=24, ban_eos=True, min_new_tokens=10)
    switched = rollout.generate(model, prompts, generators(len(prompts)), cfg, {im_end})
    for r in switched:
        assert eos not in r["response_ids"] and im_end not in r["response_ids"][:10]
        assert len(r["response_ids"]) >= 10 or r["finish"] == "length"
    banned = rollout.banned_tokens(
        cfg, 6, eos_id=5, stop_ids={4, 5}, response_index=torch.tensor([[-1, 9, 10]])
    )
    assert (
        banned[0, :, 5].all()
        and banned[0, :, 4].tolist() == [True, True, False]
        and not banned[..., :4].any()
    )
    assert rollout.banned_tokens(sampler_cfg(), 6, 5, {4, 5}, torch.tensor([[0]])) is None


def test_compaction_moves_only_the_rows_that_fill_gaps():
    assert support.row_cache.compaction_order([True, False, True, True, False, True]) == [0, 5, 2, 3]
    assert support.row_cache.compaction_order([False, False]) == [] and support.row_cache.compaction_order(
        [True, True]
    ) == [0, 1]


def test_commit_rules():
    conf = torch.tensor([[0.2, 0.95, 0.5, 0.91], [0.3, 0.1, 0.2, 0.05]])
    masked = torch.tensor([[True, True, True, False], [False, True, True, True]])
    dynamic = rollout.choose_commits(conf, masked, "low_confidence_dynamic", threshold=0.9)
    assert dynamic.tolist() == [
        [False, True, False, False],
        [False, False, True, False],
    ]  # above 0.9, or the best
    static = rollout.choose_commits(conf, masked, "low_confidence_static", quota=torch.tensor([2, 1]))
    assert static.tolist() == [[False, True, True, False], [False, False, True, False]]
    sequential = rollout.choose_commits(conf, masked, "sequential")
    assert sequential.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert [rollout.static_quota(7, 4, s) for s in range(4)] == [2, 2, 2, 1]
    assert [rollout.static_quota(2, 4, s) for s in range(4)] == [1, 1, 0, 0]


def test_sample_tokens_filters_and_reports_the_unfiltered_logprob():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    u = torch.tensor([[0.99]])
    tok, conf, logp = rollout.sample_tokens(logits, 1.0, 0, 1.0, u)
    assert (
        tok.item() == 3
        and conf.item() == pytest.approx(0.05)
        and logp.item() == pytest.approx(torch.log(torch.tensor(0.05)).item())
    )
    tok, conf, logp = rollout.sample_tokens(logits, 1.0, 2, 1.0, u)  # top-k 2: renormalised over 0.5, 0.3
    assert (
        tok.item() == 1
        and conf.item() == pytest.approx(0.3 / 0.8)
        and logp.item() == pytest.approx(torch.log(torch.tensor(0.3)).item())
    )
    tok, _, _ = rollout.sample_tokens(logits, 1.0, 0, 0.7, u)  # top-p 0.7 keeps 0.5 and 0.3
    assert tok.item() == 1
    tok, conf, _ = rollout.sample_tokens(logits, 0.0, 0, 1.0, u)  # greedy
    assert tok.item() == 0 and conf.item() == pytest.approx(0.5)
    grid = ((torch.arange(1000) + 0.5) / 1000)[:, None]  # uniforms spread evenly reproduce the distribution
    tok, _, _ = rollout.sample_tokens(logits.expand(1000, 1, 4), 1.0, 0, 1.0, grid)
    assert torch.bincount(tok.flatten(), minlength=4).tolist() == [500, 300, 150, 50]


# ----------------------------------------------------------------------------- records and the script


@pytest.fixture(scope="module")
def run_dir(stopping_model, tmp_path_factory):
    model, tokenizer = stopping_model
    run = tmp_path_factory.mktemp("run")
    support.model.save_checkpoint(model, tokenizer, support.policy.policy_dir(run, 3))
    support.policy.publish_policy(run, 3)
    return run


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_rollout(args):
    return run_here(rollout, ["--threads", 1, *args])


def test_every_recorded_logprob_is_the_models_in_the_state_its_step_map_implies(run_dir, stopping_model):
    model, tokenizer = stopping_model
    cfg = rollout.Config(
        run=str(run_dir), num_prompts=3, group_size=2, threshold=0.05, max_new_tokens=12, threads=1
    )
    rollout.main(cfg)
    records = [
        json.loads(line) for line in (run_dir / "rollouts" / "step_000003.jsonl").read_text().splitlines()
    ]
    assert len(records) == 6 and all(r["policy_step"] == 3 for r in records)
    b, mask_id = model.config.block_size, model.config.mask_token_id
    for r in records:
        prompt, response = r["prompt_ids"], r["response_ids"]
        assert (len(prompt) + len(response)) % b == 0 and all(0 <= s < b for s in r["step_map"])
        full = prompt + response
        for t, (token, step) in enumerate(zip(response, r["step_map"])):
            pos = len(prompt) + t
            block_start = pos // b * b
            # prompt + earlier blocks clean; in this block, tokens of earlier steps revealed
            state = full[:block_start] + [
                full[q] if q < len(prompt) or r["step_map"][q - len(prompt)] < step else mask_id
                for q in range(block_start, block_start + b)
            ]
            length = len(state)
            with torch.no_grad():
                logits = attention.forward_layout(
                    model, torch.tensor([state]), attention.make_layout([[(length, 0, length)]], b)
                )
            logp = torch.log_softmax(logits[0, pos].float(), -1)[token].item()
            assert logp == pytest.approx(r["logprobs"][t], abs=1e-4)
        stop = rollout.stop_index(
            response, {tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)}
        )
        assert r["text"] == tokenizer.decode(response[:stop])
        assert r["finish"] == ("stop" if stop < len(response) else "length")
        if r["finish"] == "stop":  # the record ends with the block that holds the stop token
            assert (len(prompt) + stop) // b == (len(full) - 1) // b
    # the same step again keeps the file; --force with the same seed writes the same records
    path = run_dir / "rollouts" / "step_000003.jsonl"
    path.write_text(path.read_text() + "\n")  # a marker: a rewrite would drop it
    again = run_rollout(
        ["--run", run_dir, "--num-prompts", 3, "--group-size", 2, "--threshold", 0.05, "--max-new-tokens", 12]
    )
    assert again.returncode == 0 and "keeping it" in again.stdout and path.read_text().endswith("\n\n")
    forced = run_rollout(
        [
            "--run",
            run_dir,
            "--num-prompts",
            3,
            "--group-size",
            2,
            "--threshold",
            0.05,
            "--max-new-tokens",
            12,
            "--force",
        ]
    )
    assert forced.returncode == 0, forced.stderr
    assert [
        json.loads(line) for line in (run_dir / "rollouts" / "step_000003.jsonl").read_text().splitlines()
    ] == records


def test_bad_inputs_are_refused(run_dir, tmp_path):
    assert "no policy yet" in refusal(rollout, ["--run", tmp_path / "nothing"])
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"question": "1+1", "ground_truth_answer": "2"}\n{"query": "2+2"}\n')
    wrong_keys = refusal(rollout, ["--run", run_dir, "--data", bad, "--out", tmp_path / "o.jsonl"])
    assert "prompts.jsonl:2: no question/answer keys" in wrong_keys
    mismatch = refusal(rollout, ["--run", run_dir, "--block-size", 8, "--out", tmp_path / "o.jsonl"])
    assert "--block-size 8 differs from the checkpoint's 4" in mismatch
    no_mask = tmp_path / "no_mask"
    model, tokenizer = support.model.load_model("tiny")
    support.model.save_checkpoint(model, tokenizer, no_mask)
    tok_json = (no_mask / "tokenizer.json").read_text().replace("<|MASK|>", "<|FOO|>")
    (no_mask / "tokenizer.json").write_text(tok_json)
    assert "no mask token" in refusal(rollout, ["--policy", no_mask, "--out", tmp_path / "o.jsonl"])
    assert not (tmp_path / "o.jsonl").exists()


def test_lmdeploy_engine_without_step_maps_is_refused(run_dir, tmp_path):
    out = run_rollout(["--run", run_dir, "--engine", "lmdeploy", "--out", tmp_path / "o.jsonl"])
    assert out.returncode != 0 and "--engine lmdeploy" in out.stderr and not (tmp_path / "o.jsonl").exists()


def lmdeploy_installed():
    try:
        import lmdeploy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_equals_recompute_everything(stopping_model):
    model, tokenizer = stopping_model
    cfg, stop_ids = sampler_cfg(), {tokenizer.eos_token_id}
    prompts = prompts_of(PROMPT_LENGTHS)
    on_gpu = rollout.generate(model.to("cuda"), prompts, generators(len(prompts)), cfg, stop_ids)
    model.to("cpu")
    for prompt, gen, got in zip(prompts, generators(len(prompts)), on_gpu):
        want = reference_generate(model, prompt, gen, cfg, stop_ids)
        assert got["response_ids"] == want["response_ids"] and got["step_map"] == want["step_map"]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and lmdeploy_installed()), reason="needs CUDA and lmdeploy"
)
def test_lmdeploy_engine_samples_or_says_why_not(run_dir, tmp_path):
    out = run_rollout(
        ["--run", run_dir, "--engine", "lmdeploy", "--dtype", "bfloat16", "--out", tmp_path / "o.jsonl"]
    )
    if out.returncode != 0:  # a stock build: refused with the reason
        assert "Response.step_map" in out.stderr
        return
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert records and all(
        len(r["step_map"]) == len(r["response_ids"]) == len(r["logprobs"]) for r in records
    )
    assert "engine-trainer logprob gap" in out.stdout or "no logprobs" in out.stdout


def test_lmdeploy_settings_follow_our_flags():
    cfg = rollout.Config(
        strategy="low_confidence_dynamic",
        threshold=0.8,
        temperature=1.0,
        top_k=50,
        top_p=0.9,
        max_new_tokens=64,
        dtype="bfloat16",
        tp=2,
    )
    engine, generation = support.engine.lmdeploy_settings(cfg, block_size=4)
    assert engine == {
        "dllm_block_length": 4,
        "dllm_unmasking_strategy": "low_confidence_dynamic",
        "dllm_denoising_steps": 4,
        "dllm_confidence_threshold": 0.8,
        "dtype": "bfloat16",
        "tp": 2,
    }
    assert generation == {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 0.9,
        "max_new_tokens": 64,
        "logprobs": 1,
    }
    cfg.strategy, cfg.denoising_steps = (
        "sequential",
        2,
    )  # ours commits one token per step: LMDeploy's with b steps
    assert support.engine.lmdeploy_settings(cfg, 4)[0]["dllm_denoising_steps"] == 4
    cfg.strategy, cfg.temperature = "low_confidence_static", 0.0
    engine, generation = support.engine.lmdeploy_settings(cfg, 4)
    assert engine["dllm_denoising_steps"] == 2 and not generation["do_sample"]
    cfg.min_new_tokens, cfg.ban_eos = 128, True  # DiRL's evaluation switches
    assert {
        k: v
        for k, v in support.engine.lmdeploy_settings(cfg, 4, eos_id=7)[1].items()
        if k in ("min_new_tokens", "bad_token_ids")
    } == {"min_new_tokens": 128, "bad_token_ids": [7]}
    cfg.denoising_steps = 3  # LMDeploy's quota is b // steps: a remainder would not be split as ours is
    with pytest.raises(ValueError, match="must divide the block size"):
        support.engine.lmdeploy_settings(cfg, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        support.engine.lmdeploy_settings(rollout.Config(dtype="float32"), 4)


def test_engine_step_counters_become_in_block_step_maps():
    # prompt of 5 tokens, block 4: response positions 5-7 end block 1, 8-11 are block 2; the
    # engine's counter runs on across blocks and starts anywhere
    lps = [{t: -0.1 * t, 99: -5.0} for t in (10, 11, 12, 13, 14, 15, 16)]
    ids, steps, logprobs, finish = support.engine.record_from_engine(
        5, [10, 11, 12, 13, 14, 15, 16], [2, 1, 1, 3, 4, 4, 5], lps, "stop", 4
    )
    assert ids == [10, 11, 12, 13, 14, 15, 16] and steps == [1, 0, 0, 0, 1, 1, 2] and finish == "stop"
    assert logprobs == pytest.approx([-1.0, -1.1, -1.2, -1.3, -1.4, -1.5, -1.6])
    assert support.engine.record_from_engine(5, [10, 11], [7, 7], None, "length", 4)[1:3] == ([0, 0], None)
    for args, message in (
        ((5, [10, 11, 12], [1, 3, 3], None, "stop", 4), "not consecutive"),  # a step that unmasked nothing
        ((5, [10, 11], [1], None, "stop", 4), "step_map entries"),
        ((5, [10], [1], [{11: -1.0}], "stop", 4), "no logprob"),
        ((5, [10], [1], None, "abort", 4), "finish_reason"),
    ):
        with pytest.raises(ValueError, match=message):
            support.engine.record_from_engine(*args)


def test_engine_logprobs_are_checked_against_ours(run_dir, stopping_model, tmp_path):
    model, _ = stopping_model
    rollout.main(
        rollout.Config(
            run=str(run_dir),
            out=str(tmp_path / "r.jsonl"),
            num_prompts=3,
            group_size=2,
            threshold=0.05,
            max_new_tokens=12,
            threads=1,
        )
    )
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    check = support.engine.check_engine_logprobs(model, records, sample_size=100)
    assert check["engine_logprobs"] and check["engine_mismatch_records"] == len(records)
    assert check["engine_mismatch_max"] < 1e-4  # our own sampler's logprobs: the same model, the same states
    records[1]["logprobs"][0] += 0.5
    assert support.engine.check_engine_logprobs(model, records, 100)["engine_mismatch_max"] == pytest.approx(
        0.5, abs=1e-4
    )
    wanted = [r["logprobs"] for r in records[2:]]
    for r in records[2:]:
        r["logprobs"] = None  # an engine that gives none: every record is re-scored by our model
    assert support.engine.check_engine_logprobs(model, records[2:], 100) == {"engine_logprobs": False}
    for want, r in zip(wanted, records[2:]):
        assert r["logprobs"] == pytest.approx(want, abs=1e-4)


def run_with_fake_lmdeploy(args, **env):
    """rollout.py --engine lmdeploy against tests/fake_lmdeploy: our sampler in LMDeploy's output layout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_lmdeploy"), str(ROOT)]),
        **env,
    }
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "rollout.py"),
            "--threads",
            "1",
            "--engine",
            "lmdeploy",
            "--dtype",
            "bfloat16",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


def test_lmdeploy_engine_path_writes_our_records(run_dir, tmp_path, stopping_model):
    _, tokenizer = stopping_model
    stop_ids = {tokenizer.eos_token_id, tokenizer.token_id(support.model.IM_END)}
    args = [
        "--run",
        run_dir,
        "--num-prompts",
        3,
        "--group-size",
        2,
        "--threshold",
        0.05,
        "--max-new-tokens",
        12,
    ]
    ours = run_rollout(args + ["--out", tmp_path / "torch.jsonl"])
    assert ours.returncode == 0, ours.stderr
    engine = run_with_fake_lmdeploy(args + ["--out", tmp_path / "engine.jsonl"])
    assert engine.returncode == 0, engine.stderr
    assert "engine-trainer logprob gap over 6 re-scored records" in engine.stdout
    want = [json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "engine.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == 6
    for w, g in zip(want, got):
        n = (
            rollout.stop_index(w["response_ids"], stop_ids) + 1
            if w["finish"] == "stop"
            else len(w["response_ids"])
        )
        assert g["response_ids"] == w["response_ids"][:n]  # LMDeploy's response ends at the stop token
        # the fake engine samples one sequence at a time, ours the whole batch: logprobs to rounding
        assert g["step_map"] == w["step_map"][:n] and g["logprobs"] == pytest.approx(
            w["logprobs"][:n], abs=1e-5
        )
        assert (g["text"], g["reward"], g["finish"], g["sampler"]["engine"]) == (
            w["text"],
            w["reward"],
            w["finish"],
            "lmdeploy",
        )
    no_logprobs = run_with_fake_lmdeploy(
        args + ["--out", tmp_path / "filled.jsonl"], FAKE_LMDEPLOY_LOGPROBS="0"
    )
    assert no_logprobs.returncode == 0 and "no logprobs" in no_logprobs.stdout
    filled = [json.loads(line) for line in (tmp_path / "filled.jsonl").read_text().splitlines()]
    assert all(len(r["logprobs"]) == len(r["response_ids"]) for r in filled)
    stock = run_with_fake_lmdeploy(args + ["--out", tmp_path / "stock.jsonl"], FAKE_LMDEPLOY_STEP_MAP="0")
    assert (
        stock.returncode != 0
        and "does not return the step" in stock.stderr
        and not (tmp_path / "stock.jsonl").exists()
    )
    fp32 = run_with_fake_lmdeploy(args + ["--out", tmp_path / "x.jsonl", "--dtype", "float32"])
    assert fp32.returncode != 0 and "pass --dtype bfloat16" in fp32.stderr


def test_prompt_selection_moves_on_with_the_policy_step():
    seen = [i for step in range(5) for i in rollout.select_prompts(4, 20, seed=1, step=step)]
    assert sorted(seen) == list(range(20))  # one pass over the file in 5 steps, no repeats
    assert rollout.select_prompts(0, 7, seed=1, step=3) == list(range(7))
    # 7 prompts, 3 a step: some steps span two passes, and a prompt met twice in one step is
    # sampled once (two groups of one prompt would repeat its (prompt_id, sample) keys)
    short = 0
    for step in range(40):
        stream = [i for _, i in support.data.data_stream(step, 3, 7, 1)]
        chosen = rollout.select_prompts(3, 7, seed=1, step=step)
        assert len(set(chosen)) == len(chosen) and set(chosen) == set(stream)
        assert chosen == sorted(chosen, key=stream.index)  # in stream order
        short += len(chosen) < 3
    assert short > 0


def test_a_step_across_two_passes_samples_a_repeated_prompt_once(run_dir, stopping_model, tmp_path):
    """Policy step 3, 3 prompts a step from a file of 10: stream positions 9-11 span two passes.
    With a seed that brings one prompt on both sides, the file holds each (prompt_id, sample)
    once, and dipo.py's reader takes it (it refuses a repeated pair)."""
    seed = next(s for s in range(100) if len({i for _, i in support.data.data_stream(3, 3, 10, s)}) < 3)
    data = tmp_path / "ten.jsonl"
    data.write_text("".join((ROOT / "data" / "arith_test.jsonl").read_text().splitlines(True)[:10]))
    out = tmp_path / "r.jsonl"
    args = ["--policy", run_dir / "policy" / "step_000003", "--data", data, "--out", out, "--seed", seed]
    result = run_rollout(args + ["--num-prompts", 3, "--group-size", 2, "--max-new-tokens", 8])
    assert result.returncode == 0, result.stderr
    records = support.data.read_rollouts(out, 3, stopping_model[0].config, 0)
    assert len(records) == 4 and len({r["prompt_id"] for r in records}) == 2


def torchrun_rollout(args, out):
    """rollout.py under torchrun with 2 gloo processes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--"]
    command = torchrun + [str(ROOT / "rollout.py"), *map(str, args), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic sampling"])
def test_two_processes_write_the_same_file_as_one(run_dir, tmp_path, dynamic):
    args = [
        "--run",
        run_dir,
        "--num-prompts",
        3,
        "--group-size",
        3,
        "--threshold",
        0.5,
        "--max-new-tokens",
        12,
    ]
    args += ["--threads", 1] + (["--dynamic-sampling", "--max-sample-rounds", 2] if dynamic else [])
    one = run_rollout(args + ["--out", tmp_path / "one.jsonl"])
    assert one.returncode == 0, one.stderr
    two = torchrun_rollout(args, tmp_path / "two.jsonl")
    assert two.returncode == 0, two.stderr[-3000:]
    # two processes sample other batch shapes than one: the same records, logprobs to rounding
    assert_same_records(read_records(tmp_path / "two.jsonl"), read_records(tmp_path / "one.jsonl"))
    files = ["one.jsonl", "two.jsonl"] + (["one.stream.json", "two.stream.json"] if dynamic else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no part files left
    if dynamic:  # the processes agreed on the rounds
        assert (tmp_path / "two.stream.json").read_text() == (tmp_path / "one.stream.json").read_text()


# ----------------------------------------------------------------------------- dynamic sampling


def test_dynamic_rounds_keep_informative_groups_in_stream_order():
    """Rewards are a known function of the prompt: i % 3 == 1 gives a mixed group (kept), the
    others all-equal groups (dropped)."""

    def sample_round(prompts):
        return [
            {"prompt_id": str(i), "reward": float(j % 2) if i % 3 == 1 else float(i % 3 == 0)}
            for i in prompts
            for j in range(4)
        ]

    stream = list(range(100))

    def round_prompts(r):
        return stream[r * 5 : (r + 1) * 5]

    records, stats = rollout.dynamic_rounds(sample_round, round_prompts, num_prompts=4, max_rounds=6)
    assert [r["prompt_id"] for r in records[::4]] == [
        "1",
        "4",
        "7",
        "10",
    ]  # rounds 0-2 hold 1, 4 | 7 | 10, 13
    assert stats == {"rounds": 3, "prompts_sampled": 15, "groups_kept": 4}
    records, stats = rollout.dynamic_rounds(sample_round, round_prompts, num_prompts=4, max_rounds=2)
    assert stats["groups_kept"] == 3 and stats["rounds"] == 2  # the shortfall: what two rounds gave
    records, stats = rollout.dynamic_rounds(  # the stream's next pass meets prompt 1 again
        sample_round, lambda r: [[1, 4], [1, 7]][r], num_prompts=4, max_rounds=2
    )
    assert [r["prompt_id"] for r in records[::4]] == ["1", "4", "7"] and stats["prompts_sampled"] == 4
    records, stats = rollout.dynamic_rounds(sample_round, lambda r: [0, 2, 3], num_prompts=2, max_rounds=2)
    assert stats["groups_kept"] == 0 and len(records) == 12  # none kept: the last round, for dipo's exit 3


def test_dynamic_sampling_continues_the_stream_and_resumes_byte_identical(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "rollouts", ignore_errors=True)  # what other tests sampled into the shared run
    monkeypatch.setattr(
        rollout.grader, "grade", lambda text, gold, answer_format="boxed": float(len(text) % 2)
    )
    cfg = dict(
        run=str(run),
        num_prompts=3,
        group_size=3,
        max_new_tokens=8,
        threshold=0.5,
        threads=1,
        dynamic_sampling=True,
    )
    rollout.main(rollout.Config(**cfg))
    first = json.loads((run / "rollouts" / "step_000003.stream.json").read_text())
    records = read_records(run / "rollouts" / "step_000003.jsonl")
    by_prompt = {}
    for r in records:
        assert r["reward"] == float(len(r["text"]) % 2)
        by_prompt.setdefault(r["prompt_id"], []).append(r["reward"])
    assert all(0 < sum(g) / len(g) < 1 for g in by_prompt.values()) and len(by_prompt) == first["groups_kept"]
    assert first["start"] == 9 and first["end"] == 9 + 3 * first["rounds"]  # policy step 3 x 3 prompts
    line = [
        m
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if m["stage"] == "rollout"
    ]
    assert {"prompts_sampled", "groups_kept", "rounds", "shortfall", "seconds"} <= set(line[-1])
    shutil.copytree(
        support.policy.policy_dir(run, 3), support.policy.policy_dir(run, 4)
    )  # the next policy step
    support.policy.publish_policy(run, 4)
    rollout.main(rollout.Config(**cfg))
    second = json.loads((run / "rollouts" / "step_000004.stream.json").read_text())
    assert second["start"] == first["end"]  # the stream goes on after the prompts step 3 consumed
    kept = {p: (run / "rollouts" / p).read_bytes() for p in ("step_000004.jsonl", "step_000004.stream.json")}
    for name in kept:  # killed before or after the stream file: the rerun writes the same bytes
        (run / "rollouts" / name).unlink()
    rollout.main(rollout.Config(**cfg))
    assert {p: (run / "rollouts" / p).read_bytes() for p in kept} == kept
