"""rollout.py's files: its prompts as token ids, the records it writes (docs/design.md, "The
rollout record"), where a policy step's rollouts go, where its prompts start in the stream
(the .stream.json that --dynamic-sampling leaves beside the step before), and the rollout file
itself with its metrics line. Used by rollout.py.
"""

import json
from pathlib import Path

from support import rundir
from support.data import forwards_of, is_int, longest_sequence
from support.model import render_prompt
from support.policy import latest_policy


def encode_prompts(numbered, tokenizer, instruction, max_new_tokens, model_config, data):
    """[(text, token ids)] of eval.load_prompts' [(line, prompt)] from the file `data`, each
    question rendered with `instruction`. A prompt whose sequence would pass the model's
    positions is refused at its FILE:LINE, before any cache is allocated."""
    c = model_config
    texts = [render_prompt(p["question"], instruction) for _, p in numbered]
    prompt_ids = tokenizer.encode(texts)
    for (line, _), ids in zip(numbered, prompt_ids):
        length = longest_sequence(len(ids), max_new_tokens, c.block_size)
        if length > c.max_position_embeddings:
            raise ValueError(
                f"{data}:{line}: the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                f"that is {length}, past the model's {c.max_position_embeddings} positions"
            )
    return list(zip(texts, prompt_ids))


def sampler_settings(cfg, model_config):
    """The `sampler` field of every record: what dipo.py checks the rollouts against, and what
    --estimator exact needs to replay the commit rule."""
    return {
        "block_size": model_config.block_size,
        "mask_token_id": model_config.mask_token_id,
        "strategy": cfg.strategy,
        "threshold": cfg.threshold,
        "denoising_steps": cfg.denoising_steps,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "engine": cfg.engine,
        "seed": cfg.seed,
        "ban_eos": cfg.ban_eos,
        "min_new_tokens": cfg.min_new_tokens,
    }


def make_record(policy_step, prompt_index, sample, prompt, prompt_ids, result, text, reward, sampler):
    """One line of the rollout file (docs/design.md, "The rollout record"); the prompt's own
    extra fields ride along at the end."""
    return {
        "policy_step": policy_step,
        "prompt_id": str(prompt_index),
        "sample": sample,
        "question": prompt["question"],
        "ground_truth_answer": prompt["ground_truth_answer"],
        "prompt_ids": prompt_ids,
        "response_ids": result["response_ids"],
        "step_map": result["step_map"],
        "logprobs": result["logprobs"],
        "text": text,
        "reward": reward,
        "finish": result["finish"],
        "sampler": sampler,
        **{k: v for k, v in prompt.items() if k not in ("question", "ground_truth_answer")},
    }


def output_path(cfg):
    """(policy step, policy dir, output file) for this call."""
    if cfg.policy:
        if not cfg.out:
            raise ValueError("--policy needs --out (the run's rollout files belong to its own latest policy)")
        name = Path(cfg.policy).name
        step = int(name[len("step_") :]) if name.startswith("step_") and name[len("step_") :].isdigit() else 0
        return step, Path(cfg.policy), Path(cfg.out)
    step, policy = latest_policy(cfg.run)
    return step, policy, Path(cfg.out) if cfg.out else Path(cfg.run) / "rollouts" / f"step_{step:06d}.jsonl"


def stream_start(cfg, step, out):
    """Where this step's prompts start in the stream: where the previous step's rounds stopped
    (its step_<k-1>.stream.json beside the rollouts), else at step x num_prompts."""
    previous = out.with_name(f"step_{step - 1:06d}.stream.json")
    if cfg.policy or cfg.out or step == 0 or not previous.is_file():
        return step * cfg.num_prompts
    try:
        end = json.loads(previous.read_text())["end"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        end = None
    if not is_int(end) or end < 0:
        raise ValueError(
            f"{previous}: end: not a stream position; delete it to restart at step x --num-prompts"
        )
    return end


def batch_summary(records, seconds):
    """The metrics line's numbers for a rollout file."""
    n = max(1, len(records))
    new_tokens = sum(len(r["response_ids"]) for r in records)
    return {
        "reward": sum(r["reward"] for r in records) / n,
        "response_tokens": new_tokens / n,
        "tokens_per_forward": new_tokens / max(1, sum(forwards_of(r) for r in records)),
        "truncated": sum(r["finish"] == "length" for r in records) / n,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
    }


def write_rollouts(cfg, out, step, records, stream, engine_check, seconds):
    """The rollout file (the commit point), after its metrics line, and with --dynamic-sampling
    the stream positions the next step starts from."""
    summary = {"stage": "rollout", "step": step, **batch_summary(records, seconds), **engine_check}
    if stream is not None:  # what the rounds cost, and the shortfall; the next step starts at "end"
        summary.update(stream, shortfall=cfg.num_prompts - stream["groups_kept"])
        rundir.write_atomic(out.with_name(f"{out.stem}.stream.json"), json.dumps(stream) + "\n")
    if not cfg.policy:  # before the file (the commit point): a kill in between repeats the line
        rundir.append_metrics(cfg.run, summary)
    rundir.write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    print(
        f"rollout step {step}: {len(records)} responses to {len({r['prompt_id'] for r in records})} prompts "
        f"-> {out} | reward {summary['reward']:.3f} | {summary['response_tokens']:.1f} tokens/response | "
        f"{summary['tokens_per_forward']:.2f} tokens/forward | truncated {summary['truncated']:.1%} | "
        f"{summary['seconds']:.1f} s"
    )
