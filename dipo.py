"""dipo.py - one DiPO update: the unbiased GRPO of DiRL for blockwise diffusion LMs.

Reads  runs/<run>/policy/latest (step k) and its checkpoint
       runs/<run>/rollouts/step_<k>.jsonl   rollout.py's records (docs/design.md, "The rollout record")
       runs/<run>/dipo_state.pt             optimizer state and step of the previous update, if any
Writes runs/<run>/policy/step_<k+1>/, a {"stage": "dipo", ...} line in metrics.jsonl, then
       dipo_state.pt, then policy/latest: each atomic and in that order, so a killed update is
       redone or completed by the next call (a kill just before dipo_state.pt repeats the line)
Exit   0 = updated; 3 = no group had a learning signal (the policy is carried over to step k+1,
       so the loop goes on); 1 = error
Usage  python rollout.py --run runs/arith && python dipo.py --run runs/arith    (the loop's body)

The objective (docs/design.md, "DiPO"). The G responses to a prompt get the advantages
A_i = (r_i - mean r) / (std r + 1e-6). The sampler committed each token at a step s of its
block (step_map); round s is the state in which every token with step_map >= s is masked, and
each token is scored in the round it was committed in, the state it was drawn from:
    ratio_t = exp(log pi_theta(x_t | round s) - log pi_old(x_t | round s))
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A) + beta k3(pi_ref, pi_theta)
log pi_old is recomputed at step k's weights; its gap to the recorded logprobs is the
train-inference mismatch, logged. A minibatch's loss is a weighted sum of loss_t (token_weights)
with global counts, so micro-batches and processes do not change the gradient. All rounds of a
response are scored in one forward over [clean ; one noisy copy per round] (attention.py).

How this differs from the paper's code:
  - one forward for all rounds, where DiRL/TraceRL run one per round (the same logprobs and
    gradient: tests/test_dipo.py);
  - DiRL makes one on-policy step per batch, so its ratio is 1 and the clip never acts
    (--minibatches 1); ours takes 8 optimizer steps on 8 minibatches, and drops the groups
    without a learning signal first: on the built-in task that learned faster per minute
    (docs/results.md);
  - the learning rate warms up over --warmup-steps updates (the first one already at lr/N,
    where Hugging Face's constant_with_warmup, which DiRL uses, starts at 0), then stays
    constant; the default 1e-4 suits the tiny model, the paper's 1e-6 is in
    configs/dipo_sdar8b.json;
  - --estimator exact (beyond the paper; the last section of this file) also takes the ratio
    of the probability that the commit rule kept exactly the tokens it kept.
"""

import dataclasses
import io
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import attention
import common
from common import flag

NOTHING_TO_LEARN = 3


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory (layout: docs/design.md)")
    lr: float = flag(1e-4, "AdamW learning rate (constant after --warmup-steps)")
    warmup_steps: int = flag(
        0, "linear lr warmup over the first N updates, by policy step, then constant (DiRL's RL config: 10)"
    )
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)")
    clip_low: float = flag(0.2, "PPO clip: ratio >= 1 - clip_low")
    clip_high: float = flag(0.28, "PPO clip: ratio <= 1 + clip_high (DAPO's clip-higher)")
    beta: float = flag(0.0, "weight of the k3 KL penalty to the reference policy")
    ref: str = flag("", "reference policy dir for --beta > 0 (default: runs/<run>/policy/step_000000)")
    loss_norm: str = flag(
        "token", "'token': sum / tokens in the minibatch; 'sequence': mean over responses of their token mean"
    )
    dapo_filter: bool = flag(
        True,
        "drop groups whose rewards are all equal: zero advantage, so no gradient with --beta 0, "
        "only compute (--no-dapo-filter keeps them in the token count)",
    )
    ppo_epochs: int = flag(1, "passes over the rollouts")
    minibatches: int = flag(8, "optimizer steps per pass (1 = DiRL's single on-policy step)")
    micro_batch_size: int = flag(16, "responses per forward")
    max_len: int = flag(
        0, "longest prompt + response accepted; longer records are refused (0 = max_position_embeddings)"
    )
    row_len: int = flag(
        256, "tokens per packed row (a response with all its rounds larger than this gets a row of its own)"
    )
    dtype: str = flag("float32", "compute dtype: float32, or bfloat16 (autocast)")
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass to save memory")
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    attn: str = flag("auto", "attention backend: auto (flex on CUDA, else sdpa), flex, sdpa, eager")
    estimator: str = flag(
        "dipo",
        "'dipo' (the paper's: committed tokens' logprobs) or 'exact' (adds the commit rule's "
        "selection factor and scores under the sampling distribution; the last section of dipo.py)",
    )
    diagnostics: bool = flag(
        False,
        "with --estimator exact, before the update: the selection term's share of the gradient, "
        "its cosine with DiPO's and each estimator's gradient noise (one process; a forward and "
        "two backwards more per micro-batch)",
    )
    seed: int = flag(0, "seed of the minibatch shuffle")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")


# ----------------------------------------------------------------------------- the math


def group_advantages(rewards, groups):
    """A_i = (r_i - mean) / (std + 1e-6) within each group (population std); 0 for all-equal groups."""
    by_group = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    adv = [0.0] * len(rewards)
    for members in by_group.values():
        r = torch.tensor([float(rewards[i]) for i in members], dtype=torch.float64)
        if r.max() > r.min():
            a = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
            for i, v in zip(members, a.tolist()):
                adv[i] = v
    return adv


def k3(logp_ref, logp):
    """The k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - new) - (ref - new) - 1."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


def dipo_token_loss(logp, logp_old, adv, clip_low, clip_high, logp_ref=None, beta=0.0, logp_policy=None):
    """loss_t of the module docstring: the clipped surrogate of ratio = exp(logp - logp_old), plus
    beta * k3 KL of the policy to the reference. logp_policy: log pi_theta where the KL is taken
    (default logp; the exact estimator's ratios are of the sampling distribution, its KL still of
    pi_theta). Returns (loss [M], clipped [M])."""
    ratio = torch.exp(logp - logp_old)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    loss = -surrogate
    if beta:
        loss = loss + beta * k3(logp_ref, logp if logp_policy is None else logp_policy)
    return loss, (ratio * adv) != surrogate


def token_weights(response_lengths, total_tokens, total_responses, loss_norm):
    """Weight of each scored token (response_lengths [M]: the length of its response) in the
    minibatch loss: 'token' = 1 / tokens in the minibatch, 'sequence' = 1 / (responses in the
    minibatch x its response's length). The totals are the minibatch's, not the micro-batch's."""
    if loss_norm == "token":
        return torch.full(response_lengths.shape, 1.0 / total_tokens)
    if loss_norm == "sequence":
        return 1.0 / (total_responses * response_lengths.double())
    raise ValueError(f"--loss-norm {loss_norm!r}: choose token or sequence")


def build_batch(records, mask_id, block_size, pad_id, row_len, rounds=None, all_masked=False):
    """Pack responses into rows of [clean ; one noisy copy per round] (attention.pack_copies).
    Returns input_ids [B, N], the Layout, and per scored position (a dict of [N] tensors): row,
    col, token, record (index in `records`), index (in the response), committed (in that round)
    and sampler_step (a number per (record, round, block): the positions of one sampler step).
    all_masked scores every masked position of a round, not only the committed ones."""
    replays = [
        attention.replay_copies(
            r["prompt_ids"], r["response_ids"], r["step_map"], mask_id, block_size, rounds
        )
        for r in records
    ]
    documents = [
        (list(r["prompt_ids"]) + list(r["response_ids"]), noisy_from, copies)
        for r, (noisy_from, _, copies) in zip(records, replays)
    ]
    input_ids, layout, rows, first = attention.pack_copies(documents, block_size, pad_id, row_len)
    where, sampler_steps = defaultdict(list), {}
    for row_index, row in enumerate(rows):
        for i in row:
            noisy_from, record_rounds, _ = replays[i]
            for col, token, t, s, block in attention.replay_positions(
                records[i], noisy_from, record_rounds, first[i], block_size, all_masked
            ):
                where["row"].append(row_index)
                where["col"].append(col)
                where["token"].append(token)
                where["record"].append(i)
                where["index"].append(t)
                where["committed"].append(records[i]["step_map"][t] == s)
                where["sampler_step"].append(sampler_steps.setdefault((i, s, block), len(sampler_steps)))
    return input_ids, layout, {k: torch.tensor(v) for k, v in where.items()}


def forward_scores(model, batch, device, dtype, sampler=None):
    """One packed forward. Returns log pi (temperature 1, unfiltered: what the sampler records)
    of every committed token [K], pi's entropy there [K], and, given the sampler's settings, the
    sampling distribution (attention.sampling_logprobs) at every scored position [N, V]."""
    input_ids, layout, where = batch
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = attention.forward_layout(
            model, input_ids.to(device), layout, at=(where["row"], where["col"])
        )  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    committed = where["committed"].to(device)
    all_committed = bool(committed.all())  # DiPO's batches score only committed tokens: no [N, V] copy
    logp_all = torch.log_softmax(logits if all_committed else logits[committed], -1)
    token_logp = logp_all.gather(-1, where["token"].to(device)[committed][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if sampler is None:
        return token_logp, entropy, None
    logq = attention.sampling_logprobs(logits, sampler["temperature"], sampler["top_k"], sampler["top_p"])
    return token_logp, entropy, logq


def token_logprobs(model, batch, device, dtype):
    """log pi(token | its round's state) for every committed token [K]."""
    return forward_scores(model, batch, device, dtype)[0]


def old_terms(logp, logq, where, sampler):
    """The old side of every ratio, detached: the committed tokens' log pi (the mismatch is
    taken of these) and the log-probabilities the loss takes ratios of (the same for DiPO;
    exact_old_terms for --estimator exact)."""
    if sampler is None:
        return {"logp": logp.detach(), "token_logp": logp.detach(), "selection": None, "below": None}
    return exact_old_terms(logp, logq, where, sampler)


def dipo_loss(model, micro, old, ref_logp, cfg, sampler, device, dtype):
    """The objective on one micro-batch (plan_micro_batches' dict: the packed batch and, per
    scored token, its advantage and weight): the sum over its tokens of weight x loss_t.

    `old` is None until the first optimizer step: the weights are then step k's, so this
    forward's own values, detached, are the old ones (exactly; a forward saved). Returns
    (loss, the selection terms' part of it or None, this micro-batch's sums for the log, old)."""
    batch = micro["batch"]
    logp, entropy, logq = forward_scores(model, batch, device, dtype, sampler)  # [K], [K], [N, V] or None
    if old is None:
        old = old_terms(logp, logq, batch[2], sampler)
    # what the ratios are taken of: log pi at the committed tokens (DiPO), or for --estimator
    # exact log q there plus one selection log-factor per sampler step
    if sampler is None:
        token_logp, selection = logp, None
    else:
        token_logp, selection = exact_terms(logq, batch[2], old["below"])
    adv, weight = micro["adv"].to(device), micro["weight"].to(device)  # [K], [K]
    loss_t, clipped = dipo_token_loss(
        token_logp, old["token_logp"], adv, cfg.clip_low, cfg.clip_high, ref_logp, cfg.beta, logp_policy=logp
    )
    loss = (loss_t * weight).sum()
    selection_loss = None
    if selection is not None:  # one term per sampler step, weighted as one token of its response
        loss_s, clipped_s = dipo_token_loss(
            selection, old["selection"], micro["step_adv"].to(device), cfg.clip_low, cfg.clip_high
        )
        selection_loss = (loss_s * micro["step_weight"].to(device)).sum()
        loss = loss + selection_loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"dipo: loss is {loss.item()}; nothing written")
    with torch.no_grad():
        log_ratio = token_logp - old["token_logp"]
        sums = {
            "loss": loss.item(),
            "tokens": len(token_logp),
            "clipped": clipped.sum().item(),
            "approx_kl": (torch.exp(log_ratio) - 1 - log_ratio).sum().item(),
            "entropy": entropy.sum().item(),
        }
        if selection is not None:
            sums.update(
                steps=len(selection),
                clipped_steps=clipped_s.sum().item(),
                selection_abs=selection.abs().sum().item(),
                tokens_abs=token_logp.abs().sum().item(),
            )
    return loss, selection_loss, sums, old


def split_minibatches(num_records, num_minibatches, seed, policy_step):
    """Record indices of each minibatch: a shuffle seeded by (seed, policy step), dealt into at
    most num_minibatches (never an empty one). The same split serves every epoch."""
    shuffle = torch.Generator().manual_seed(seed * 100_003 + policy_step)
    order = torch.randperm(num_records, generator=shuffle).tolist()
    count = min(num_minibatches, num_records)
    return [order[m::count] for m in range(count)]


def plan_micro_batches(records, adv, minibatches, cfg, model_config, rank, world, all_masked):
    """This process's micro-batches of every minibatch: dicts with the packed batch and, per
    scored token [K], its advantage, its loss weight and its recorded logprob (and for
    --estimator exact, all_masked, the advantage and weight of every sampler step [U]). Every
    process runs as many micro-batches; one with no records of its own repeats a record with
    weight 0, so that the collectives stay in step."""
    lengths = torch.tensor([len(r["response_ids"]) for r in records])
    plan = []
    for minibatch in minibatches:
        totals = (int(lengths[minibatch].sum()), len(minibatch), cfg.loss_norm)  # the minibatch's
        count = max(1, math.ceil(len(minibatch) / (cfg.micro_batch_size * world)))
        micro_batches = []
        for chunk in [minibatch[j :: count * world] for j in range(count * world)][rank::world]:
            real, chunk = bool(chunk), chunk or minibatch[:1]
            batch = build_batch(
                [records[i] for i in chunk],
                model_config.mask_token_id,
                model_config.block_size,
                model_config.eos_token_id,
                cfg.row_len,
                all_masked=all_masked,
            )
            where = batch[2]
            owner = torch.tensor(chunk)[where["record"][where["committed"]]]  # [K] record of each token
            index = where["index"][where["committed"]]  # [K] its place in the response
            micro = {
                "batch": batch,
                "real": real,
                "adv": adv[owner],
                "weight": token_weights(lengths[owner], *totals).float() * float(real),
                "recorded": torch.tensor(
                    [records[i]["logprobs"][t] for i, t in zip(owner.tolist(), index.tolist())]
                ),
            }
            if all_masked:
                step_owner = torch.tensor(chunk)[step_records(where)]  # [U] record of each sampler step
                step_weight = token_weights(lengths[step_owner], *totals).float() * float(real)
                micro.update(step_adv=adv[step_owner], step_weight=step_weight)
            micro_batches.append(micro)
        plan.append(micro_batches)
    return plan


def old_logprobs(model, ref, plan, sampler, device, dtype):
    """Before any optimizer step, at step k's weights: the old terms of every minibatch but the
    first (which takes its own forward's: dipo_loss), and with a reference model its logprobs
    of the committed tokens, keyed by (minibatch, micro-batch)."""
    old, ref_logp = {}, {}
    with torch.no_grad():
        for m, micro_batches in enumerate(plan):
            for j, micro in enumerate(micro_batches):
                if m > 0:
                    logp, _, logq = forward_scores(model, micro["batch"], device, dtype, sampler)
                    old[m, j] = old_terms(logp, logq, micro["batch"][2], sampler)
                if ref is not None:
                    ref_logp[m, j] = token_logprobs(ref, micro["batch"], device, dtype)
    return old, ref_logp


# ----------------------------------------------------------------------------- I/O


def read_rollouts(path, policy_step, model_config, max_len):
    """Records of rollouts/step_<k>.jsonl, each checked against the policy that will be trained
    (common.check_rollout_record): sequences longer than max_len (0 = the model's
    max_position_embeddings) are refused, not trained."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no rollouts for policy step {policy_step} (run rollout.py first)")
    c = model_config
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{n}: not JSON ({e.msg}); a partial file? rerun rollout.py --force"
            ) from None
        limit = max_len or c.max_position_embeddings
        common.check_rollout_record(
            r, f"{path}:{n}", policy_step, c.block_size, c.mask_token_id, c.vocab_size, limit
        )
        records.append(r)
    if not records:
        raise ValueError(f"{path}: empty")
    return records


def read_state(path):
    """dipo_state.pt, if any: the step of the last update and its optimizer state."""
    if not path.is_file():
        return None
    state = common.read_torch_state(path, {"step": int})
    if not isinstance(state.get("optimizer", {}), dict):
        raise ValueError(f"{path}: optimizer: not a state dict; delete the file to start over")
    return state


def save_torch_atomic(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    common.write_atomic(path, buffer.getvalue())


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
    """The update's fields, over all processes: token means, the mismatch (step k's recomputed
    logprobs vs the sampler's records), and grad_norm, the mean over the optimizer steps."""
    mismatch = [
        (old[m, j]["logp"].cpu() - micro["recorded"]).abs()
        for m, micro_batches in enumerate(plan)
        for j, micro in enumerate(micro_batches)
        if micro["real"]
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


def finish_interrupted(run, policy_step, state, rank):
    """True if a previous call saved step k+1 and was killed before moving policy/latest: that
    update is complete, so only latest moves."""
    if not (state and state["step"] == policy_step + 1):
        return False
    if not (common.policy_dir(run, policy_step + 1) / "config.json").is_file():
        return False
    if rank == 0:
        common.publish_policy(run, policy_step + 1)
        print(f"dipo: step {policy_step + 1} was already written; policy/latest now names it")
    return True


def carry_over(run, policy_step, model, tokenizer, log, state, state_path):
    """Nothing to learn from: step k+1 is step k's weights, so the loop goes on."""
    attention.save_checkpoint(model, tokenizer, common.policy_dir(run, policy_step + 1))
    common.append_metrics(run, {**log, "updated": False})
    save_torch_atomic({**(state or {}), "step": policy_step + 1}, state_path)
    common.publish_policy(run, policy_step + 1)
    print(
        f"dipo step {policy_step + 1}: no group has a learning signal (all rewards equal within every "
        "group); policy carried over unchanged"
    )


def warmup_lr(lr, warmup_steps, new_step):
    """The learning rate of the update that writes policy step new_step (1, 2, ...): linear
    warmup over the first warmup_steps updates, then lr. The policy step gives the position,
    so a resumed loop and a fresh process continue the same schedule."""
    return lr * min(1.0, new_step / warmup_steps) if warmup_steps > 0 else lr


def prepare_training(model, cfg, lr, run, state, world, dtype, device):
    """Train mode, FSDP2 under torchrun, AdamW at `lr` with the previous update's state, and with
    --beta > 0 the frozen reference policy. Returns (optimizer, reference or None)."""
    model.train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    if world > 1:
        common.shard_model(model, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if state and "optimizer" in state:
        common.load_optimizer_state(model, optimizer, state["optimizer"])
        for group in optimizer.param_groups:  # the saved state holds the last update's lr: this one's
            group["lr"] = lr
    if not cfg.beta:
        return optimizer, None
    ref, _ = attention.load_model(str(cfg.ref or common.policy_dir(run, 0)), device=device, attn=cfg.attn)
    return optimizer, ref.eval()


@common.releases_run_lock
def main(cfg):
    if cfg.estimator not in ("dipo", "exact"):
        raise ValueError(f"--estimator {cfg.estimator!r}: choose dipo or exact")
    rank, world, device = common.init_distributed(cfg.device, cfg.threads)
    dtype = common.DTYPES[cfg.dtype]
    run, t_start = Path(cfg.run), time.time()
    policy_step, policy = common.latest_policy(run)
    new_step = policy_step + 1
    if rank == 0:
        common.lock_run(run, "dipo")
    state_path = run / "dipo_state.pt"
    state = read_state(state_path)
    if finish_interrupted(run, policy_step, state, rank):
        return 0

    # the rollouts of step k, and the policy that sampled them (checked before anything is written)
    model, tokenizer = attention.load_model(str(policy), dtype=torch.float32, device=device, attn=cfg.attn)
    c = model.config
    records = read_rollouts(run / "rollouts" / f"step_{policy_step:06d}.jsonl", policy_step, c, cfg.max_len)
    sampler = exact_sampler(records) if cfg.estimator == "exact" else None
    if rank == 0:
        common.record_invocation(run, "dipo", cfg)

    # group-relative advantages; a group whose rewards are all equal has none
    adv = group_advantages([r["reward"] for r in records], [r["prompt_id"] for r in records])
    log = batch_metrics(records, adv, cfg.dapo_filter, new_step)
    log["lr"] = warmup_lr(cfg.lr, cfg.warmup_steps, new_step)
    trainable = [i for i, a in enumerate(adv) if a != 0.0] if cfg.dapo_filter else list(range(len(records)))
    if not any(adv[i] for i in trainable):
        if rank == 0:
            carry_over(run, policy_step, model, tokenizer, log, state, state_path)
        return NOTHING_TO_LEARN
    records, adv = [records[i] for i in trainable], torch.tensor([adv[i] for i in trainable])

    # the policy to train, its optimizer (whose state carries over from the last update), the reference
    optimizer, ref = prepare_training(model, cfg, log["lr"], run, state, world, dtype, device)

    # minibatches of the records, then this process's micro-batches of each
    minibatches = split_minibatches(len(records), cfg.minibatches, cfg.seed, policy_step)
    plan = plan_micro_batches(records, adv, minibatches, cfg, c, rank, world, all_masked=sampler is not None)

    # the old log-probabilities at step k's weights
    t_old = time.time()
    old, ref_logp = old_logprobs(model, ref, plan, sampler, device, dtype)
    if cfg.diagnostics and sampler and sampler["strategy"] != "sequential" and world == 1:
        log.update(gradient_probe(model, plan, ref_logp, cfg, sampler, device, dtype))

    # PPO epochs: per minibatch, loss and backward per micro-batch, then clip and one optimizer step
    t_update = time.time()
    sums, grad_norms = defaultdict(float), []
    bar = tqdm(total=cfg.ppo_epochs * len(plan), desc=f"dipo step {new_step}", disable=rank != 0)
    for _ in range(cfg.ppo_epochs):
        for m, micro_batches in enumerate(plan):
            for j, micro in enumerate(micro_batches):
                loss, _, micro_sums, old[m, j] = dipo_loss(
                    model, micro, old.get((m, j)), ref_logp.get((m, j)), cfg, sampler, device, dtype
                )
                loss.backward()
                if micro["real"]:
                    for key, value in micro_sums.items():
                        sums[key] += value
            grad_norms.append(common.clip_gradients(model, cfg.grad_clip, f"dipo step {new_step}"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
    bar.close()
    log.update(update_metrics(sums, plan, old, grad_norms, world, device))

    t_write = time.time()
    log.update(
        tokens_per_s=sums["tokens"] / max(1e-9, t_write - t_update),
        time_prepare=t_old - t_start,
        time_old=t_update - t_old,
        time_update=t_write - t_update,
    )

    # write step k+1: the weights, the metrics line, the state file (the commit point), then latest
    model_sd, optim_sd = common.full_state(model, optimizer)
    if rank == 0:
        attention.save_checkpoint(model, tokenizer, common.policy_dir(run, new_step), state_dict=model_sd)
        log.update(time_write=time.time() - t_write, seconds=time.time() - t_start)
        common.append_metrics(run, log)  # before the commit point: a kill can repeat it, never lose it
        state = {"step": new_step, "optimizer": optim_sd, "config": dataclasses.asdict(cfg)}
        save_torch_atomic(state, state_path)
        common.publish_policy(run, new_step)
        print(summary_line(log))
    common.finish_distributed(world)
    return 0


# ------------------------------------------------------------ beyond the paper: the exact estimator
# --estimator exact (docs/design.md, "What unbiased means"). DiPO's loss scores what the sampler
# kept. But a low_confidence step draws a token at every masked position, and the commit rule then
# picks which draws to keep, so the probability of a trajectory also holds, per sampler step, the
# probability that the rule kept exactly that set. exact_terms says what that factor is; the loss
# takes its ratio like a token's (dipo_loss). tests/test_exact.py enumerates every trajectory of a
# toy and finds this gradient equal to the true one to 1e-10 (plain DiPO's is off).


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


def exact_old_terms(logp, logq, where, sampler):
    """old_terms for --estimator exact: also the selection sets, taken at the sampling weights
    (they are piecewise constant in the weights, so they carry no gradient)."""
    below = None
    if sampler["strategy"] != "sequential":
        below = selection_sets(
            logq.detach(),
            where["token"].to(logq.device),
            where["committed"].to(logq.device),
            where["sampler_step"].to(logq.device),
            int(where["sampler_step"].max()) + 1,
            sampler["strategy"],
            sampler["threshold"],
        )
    token_logq, selection = exact_terms(logq.detach(), where, below)
    return {"logp": logp.detach(), "token_logp": token_logq, "selection": selection, "below": below}


def step_records(where):
    """The record (index in the batch) of every sampler step [U]."""
    num_steps = int(where["sampler_step"].max()) + 1
    return torch.zeros(num_steps, dtype=torch.long).scatter(0, where["sampler_step"], where["record"])


def selection_sets(logq_old, token, committed, sampler_step, num_steps, strategy, threshold):
    """At every masked position j of a sampler step, the tokens u whose draw would have left j
    uncommitted, given what the step kept [N, V] bool. logq_old [N, V] is the sampling
    distribution at the sampling weights; token/committed/sampler_step [N] as build_batch gives
    them. The cutoff c of a step:
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


def gradient_probe(model, plan, ref_logp, cfg, sampler, device, dtype):
    """--diagnostics: how much the selection factor moves the gradient, at step k's weights
    (ratio 1), per minibatch and then averaged over the minibatches. The token terms' gradient
    is DiPO's (at temperature 1, unfiltered); the whole is the exact estimator's. Logs the
    norm of the selection terms' gradient over the token terms', the cosine of the two
    estimators' gradients, and each one's noise-to-signal over the micro-batches."""
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(value):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

    sums = defaultdict(float)
    for m, micro_batches in enumerate(plan):
        whole, selection, squares = 0.0, 0.0, {"dipo": 0.0, "exact": 0.0}
        for j, micro in enumerate(micro_batches):
            loss, selection_loss, _, _ = dipo_loss(
                model, micro, None, ref_logp.get((m, j)), cfg, sampler, device, dtype
            )
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


if __name__ == "__main__":
    common.run_stage(main, Config, __doc__)
