"""--engine lmdeploy: sampling with LMDeploy (CUDA) from rollout.py's flags, its outputs turned
into our records, and the engine-trainer logprob check DiRL never makes. Used by rollout.py,
which calls lmdeploy_results and check_engine_logprobs; lmdeploy (requirements-gpu.txt) is
imported here only.

LMDeploy's response ends at the stop token, so whatever it committed after that token in the
same block is not in the record, and DiPO's replay of that last block lacks it (dipo.py's
mismatch line shows the size of that gap).
"""

import json
import tempfile
from pathlib import Path

import torch

import attention


def lmdeploy_settings(cfg, block_size, eos_id=None):
    """Our sampler flags as LMDeploy's: (PytorchEngineConfig kwargs, GenerationConfig kwargs).
    LMDeploy commits block_size // dllm_denoising_steps tokens per static or sequential step,
    so `sequential` (one per step) is its sequential rule with block_size steps, and a static
    quota that does not divide the block is refused (ours would split the remainder). In a
    partial first block LMDeploy's static quota stays b // steps where ours splits the masked
    count evenly: the rule differs there, DiPO does not care (it replays the recorded
    step_map), --estimator exact refuses engine rollouts."""
    steps = block_size if cfg.strategy == "sequential" else cfg.denoising_steps
    if cfg.strategy == "low_confidence_static" and block_size % steps:
        raise ValueError(
            f"--engine lmdeploy: --denoising-steps {steps} must divide the block size {block_size} "
            "(LMDeploy commits block_size // steps tokens per step)"
        )
    if cfg.dtype != "bfloat16":
        raise ValueError(
            "--engine lmdeploy computes in bfloat16 (or float16), not float32: pass --dtype bfloat16"
        )
    engine = dict(
        dllm_block_length=block_size, dllm_unmasking_strategy=cfg.strategy, dllm_denoising_steps=steps
    )
    engine.update(dllm_confidence_threshold=cfg.threshold, dtype="bfloat16", tp=cfg.tp)
    generation = dict(do_sample=cfg.temperature > 0, temperature=cfg.temperature, top_k=cfg.top_k)
    generation.update(top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, logprobs=1)
    if cfg.min_new_tokens > 0:
        generation["min_new_tokens"] = cfg.min_new_tokens
    if cfg.ban_eos:
        generation["bad_token_ids"] = [eos_id]
    return engine, generation


def record_from_engine(prompt_len, token_ids, step_map, logprobs, finish_reason, block_size):
    """One LMDeploy response as our record's fields: (response_ids, step_map, logprobs, finish).
    The patched engine's step_map is one counter per sequence that grows on every iteration
    that unmasks something, across blocks (DiRL's patched LMDeploy 0.10.1); ours counts from 0
    inside each block. Every step commits at least one token, so a block's counters are
    consecutive and subtracting the block's first one converts them; anything else is
    refused rather than guessed. logprobs: LMDeploy's per-token {token id: logprob} dicts
    (None when the engine gave none: the caller re-scores)."""
    if len(step_map) != len(token_ids) or (logprobs is not None and len(logprobs) != len(token_ids)):
        raise ValueError(
            f"--engine lmdeploy: {len(token_ids)} tokens but {len(step_map)} step_map entries"
            + ("" if logprobs is None else f" and {len(logprobs)} logprobs")
        )
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"--engine lmdeploy: finish_reason {finish_reason!r} (expected stop or length)")
    counters = {}  # block -> the counters of its tokens
    for i, s in enumerate(step_map):
        counters.setdefault((prompt_len + i) // block_size, []).append(s)
    for block, members in counters.items():
        if sorted(set(members)) != list(range(min(members), max(members) + 1)):
            raise ValueError(
                f"--engine lmdeploy: block {block}'s step counters {members} are not consecutive"
            )
    first = {block: min(members) for block, members in counters.items()}
    local = [s - first[(prompt_len + i) // block_size] for i, s in enumerate(step_map)]
    lps = None
    if logprobs is not None:
        lps = []
        for i, (token, scores) in enumerate(zip(token_ids, logprobs)):
            scores = {int(k): float(v) for k, v in scores.items()}
            if token not in scores:
                raise ValueError(
                    f"--engine lmdeploy: token {i} ({token}) has no logprob in the engine output"
                )
            lps.append(scores[token])
    return list(token_ids), local, lps, finish_reason


def require_lmdeploy():
    """The lmdeploy module, if installed and able to return step maps; else a clear refusal."""
    try:
        import lmdeploy  # optional, requirements-gpu.txt
    except ImportError:
        raise ValueError(
            "--engine lmdeploy: lmdeploy is not installed "
            "(pip install -r requirements-gpu.txt on a CUDA machine)"
        ) from None
    from lmdeploy.messages import Response

    if "step_map" not in getattr(Response, "__dataclass_fields__", {}):
        raise ValueError(
            f"--engine lmdeploy: this LMDeploy build ({lmdeploy.__version__}) does not return the step at "
            "which each token was unmasked (Response.step_map); DiPO replays exactly those states, so "
            "rollouts without it cannot be trained on. Use --engine torch, or a build with DiRL's patch "
            '(README, "LMDeploy").'
        )
    return lmdeploy


def lmdeploy_generate(policy, texts, seeds, cfg, block_size, eos_id):
    """Sample with LMDeploy (CUDA): one response per rendered prompt text, the patched build's
    Response.step_map required. Returns the Response objects."""
    lmdeploy = require_lmdeploy()
    engine, generation = lmdeploy_settings(cfg, block_size, eos_id)
    GenerationConfig, PytorchEngineConfig, pipeline = (
        lmdeploy.GenerationConfig,
        lmdeploy.PytorchEngineConfig,
        lmdeploy.pipeline,
    )
    with tempfile.TemporaryDirectory() as view:
        pipe = pipeline(str(engine_view(policy, Path(view))), backend_config=PytorchEngineConfig(**engine))
        try:  # the prompts are rendered already: no chat template on top
            return pipe(
                texts,
                gen_config=[GenerationConfig(**generation, random_seed=s) for s in seeds],
                do_preprocess=False,
            )
        finally:
            pipe.close()


def engine_view(policy, view):
    """Our checkpoints are saved as Qwen3 (model_type "qwen3"); LMDeploy picks its dLLM SDAR
    model by architecture name. The view links every file of the checkpoint and rewrites only
    config.json's architectures to SDARForCausalLM (model_type stays qwen3, which transformers'
    AutoConfig reads without SDAR's custom code). Returns the view's dir."""
    for f in Path(policy).iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((Path(policy) / "config.json").read_text())
    (view / "config.json").write_text(json.dumps({**config, "architectures": ["SDARForCausalLM"]}, indent=2))
    return view


def rescore(model, records, micro_batch_size):
    """Our model's logprob (float32, temperature 1, unfiltered) of every response token in the
    state its step_map implies: the packed rows dipo.py trains with (attention.replay_batch),
    one forward per micro-batch. Returns one list per record."""
    scores = [[0.0] * len(r["response_ids"]) for r in records]
    c = model.config
    for start in range(0, len(records), micro_batch_size):
        chunk = records[start : start + micro_batch_size]
        input_ids, layout, where = attention.replay_batch(
            chunk, c.mask_token_id, c.block_size, c.eos_token_id, 0
        )
        with torch.no_grad():
            at = (where["row"], where["col"])
            logits = attention.forward_layout(model, input_ids.to(model.device), layout, at=at).float()
            logp = torch.log_softmax(logits, -1).gather(-1, where["token"].to(model.device)[:, None])
        for d, t, v in zip(where["record"].tolist(), where["index"].tolist(), logp[:, 0].tolist()):
            scores[start + d][t] = v
    return scores


def lmdeploy_results(policy, texts, prompt_ids, seeds, cfg, block_size, eos_id):
    """Sample every job with LMDeploy; the same dicts as generate() returns (logprobs None
    when the engine gave none)."""
    responses = lmdeploy_generate(policy, texts, seeds, cfg, block_size, eos_id)
    results = []
    for ids, resp in zip(prompt_ids, responses):
        if resp.input_token_len != len(ids):
            raise ValueError(
                f"--engine lmdeploy: the engine read {resp.input_token_len} prompt tokens where our "
                f"tokenizer has {len(ids)}: the checkpoint's tokenizers differ"
            )
        response, step_map, logprobs, finish = record_from_engine(
            len(ids), resp.token_ids, resp.step_map, resp.logprobs, resp.finish_reason, block_size
        )
        results.append(dict(response_ids=response, step_map=step_map, logprobs=logprobs, finish=finish))
    return results


def check_engine_logprobs(model, records, sample_size):
    """The engine-trainer check DiRL never makes: re-score every len/sample_size-th record with
    our model in the states its step_map implies and compare with the engine's logprobs.
    Records without engine logprobs get ours (all of them are re-scored then)."""
    missing = [r for r in records if r["logprobs"] is None]
    for r, scores in zip(missing, rescore(model, missing, 4)):
        r["logprobs"] = scores
    if missing:
        print("the engine returned no logprobs: every record's logprobs are our model's re-score")
        return {"engine_logprobs": False}
    sample = records[:: max(1, len(records) // max(1, sample_size))]
    gaps = [
        abs(a - b)
        for r, scores in zip(sample, rescore(model, sample, 4))
        for a, b in zip(r["logprobs"], scores)
    ]
    check = {
        "engine_logprobs": True,
        "engine_mismatch_mean": sum(gaps) / max(1, len(gaps)),
        "engine_mismatch_max": max(gaps, default=0.0),
        "engine_mismatch_records": len(sample),
    }
    print(
        f"engine-trainer logprob gap over {len(sample)} re-scored records: mean "
        f"{check['engine_mismatch_mean']:.1e} max {check['engine_mismatch_max']:.1e}"
    )
    return check
