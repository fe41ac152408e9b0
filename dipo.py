"""dipo.py - one DiPO update: the unbiased GRPO of DiRL for blockwise diffusion LMs.

Reads  runs/<run>/policy/latest (step k) and its checkpoint
       runs/<run>/rollouts/step_<k>.jsonl   rollout.py's records (docs/design.md, "The rollout record")
       runs/<run>/dipo_state.pt             optimizer state and step of the previous update, if any
Writes runs/<run>/policy/step_<k+1>/, a {"stage": "dipo", ...} line in metrics.jsonl, then
       dipo_state.pt, then policy/latest: each atomic and in that order, so a killed update is
       redone or completed by the next call (support/policy.py)
Exit   0 = updated; 3 = no group had a learning signal (the policy is carried over to step k+1,
       so the loop goes on); 1 = error
Usage  python rollout.py --run runs/arith && python dipo.py --run runs/arith    (the loop's body)

The objective (docs/design.md, "DiPO"). The G responses to a prompt get the advantages
A_i = (r_i - mean r) / (std r + 1e-6). The sampler committed each token at a step s of its
block (step_map); round s is the state in which every token with step_map >= s is masked, and
each token is scored in the round it was committed in, the state it was drawn from:
    ratio_t = exp(log pi_theta(x_t | round s) - log pi_old(x_t | round s))
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A) + beta k3(pi_ref, pi_theta)
log pi_old is log pi at step k's weights: our sampler recorded it, so it is read from the
records (--old-logprobs auto), or recomputed by a forward for LMDeploy's rollouts; the gap
between the recorded logprobs and the update's first forward, at step k's weights, is the
train-inference mismatch, logged. A minibatch's loss is a weighted sum of loss_t (token_weights)
with global counts, so micro-batches and processes do not change the gradient. All rounds of a
response are scored in one forward over [clean ; each block in each round that still masks it]
(attention.replay_batch).

How this differs from the paper's code:
  - one forward for all rounds, where DiRL/TraceRL run one per round (the same logprobs and
    gradient: tests/test_dipo.py);
  - DiRL makes one on-policy step per batch, so its ratio is 1 and the clip never acts
    (--minibatches 1); ours takes 8 optimizer steps on 8 minibatches, and drops the groups
    without a learning signal first (docs/results.md compares the settings);
  - the learning rate warms up over --warmup-steps updates (the first one already at lr/N,
    where Hugging Face's constant_with_warmup, which DiRL uses, starts at 0), then stays
    constant; the default 1e-4 suits the tiny model, the paper's 1e-6 is in
    configs/dipo_sdar8b.json;
  - --estimator exact (beyond the paper; support/exact.py) also takes the ratio of the
    probability that the commit rule kept exactly the tokens it kept.
"""

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import attention
from support import distributed, policy, rundir
from support.data import read_rollouts
from support.dipo_metrics import batch_metrics, summary_line, update_metrics
from support.exact import ExactEstimator, gradient_probe
from support.flags import flag, run_stage
from support.model import load_model

NOTHING_TO_LEARN = 3
NORMS, ESTIMATORS = ("token", "sequence"), ("dipo", "exact")
OLD_LOGPROBS = ("auto", "recorded", "recomputed")


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory (layout: docs/design.md)")
    lr: float = flag(1e-4, "AdamW learning rate (constant after --warmup-steps)", above=0)
    warmup_steps: int = flag(
        0, "linear lr warmup over the first N updates, by policy step (DiRL's RL: 10)", low=0
    )
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)", low=0)
    clip_low: float = flag(0.2, "PPO clip: ratio >= 1 - clip_low", low=0, high=1)
    clip_high: float = flag(0.28, "PPO clip: ratio <= 1 + clip_high (DAPO's clip-higher)", low=0)
    beta: float = flag(0.0, "weight of the k3 KL penalty to the reference policy", low=0)
    ref: str = flag("", "reference policy dir for --beta > 0 (default: runs/<run>/policy/step_000000)")
    loss_norm: str = flag(
        "token", "minibatch loss: sum / tokens, or the mean of each response's mean", choices=NORMS
    )
    dapo_filter: bool = flag(
        True,
        "drop groups whose rewards are all equal: zero advantage, so no gradient with --beta 0, "
        "only compute (--no-dapo-filter keeps them in the token count)",
    )
    ppo_epochs: int = flag(1, "passes over the rollouts", low=1)
    minibatches: int = flag(8, "optimizer steps per pass (1 = DiRL's single on-policy step)", low=1)
    micro_batch_size: int = flag(64, "responses per forward (memory: the SDAR configs use 1)", low=1)
    max_len: int = flag(
        0, "longest prompt + response accepted, longer is refused (0 = max_position_embeddings)", low=0
    )
    row_len: int = flag(
        256, "tokens per packed row (a response whose rounds need more gets a row of its own)", low=1
    )
    dtype: str = flag("float32", "compute dtype (bfloat16: autocast)", choices=tuple(distributed.DTYPES))
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass to save memory")
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    attn: str = flag(
        "auto", "attention backend (auto: flex on CUDA, else sdpa)", choices=("auto", *attention.BACKENDS)
    )
    estimator: str = flag(
        "dipo",
        "the paper's, or exact: also the commit rule's selection factor (support/exact.py)",
        choices=ESTIMATORS,
    )
    diagnostics: bool = flag(
        False,
        "with --estimator exact, before the update: the selection term's share of the gradient, "
        "its cosine with DiPO's and each estimator's gradient noise (one process; a forward and "
        "two backwards more per micro-batch)",
    )
    old_logprobs: str = flag(
        "auto",
        "log pi_old of minibatches 2.. : recorded (the sampler's own), recomputed (a no-grad forward at "
        "step k's weights, needed by --estimator exact and meant for LMDeploy's rollouts, whose kernels "
        "differ), auto (recorded for our torch sampler's rollouts with --estimator dipo, else recomputed)",
        choices=OLD_LOGPROBS,
    )
    seed: int = flag(0, "seed of the minibatch shuffle")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)", low=0)


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


def forward_scores(model, batch, device, dtype):
    """One packed forward (attention.replay_batch's batch). Returns the logits at every scored
    position [N, V] (float32 or wider), log pi (temperature 1, unfiltered: what the sampler
    records) of every committed token [K], and pi's entropy there [K]."""
    input_ids, layout, where = batch
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = attention.forward_layout(
            model, input_ids.to(device), layout, at=(where["row"], where["col"])
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [N, V]
    committed = where["committed"].to(device)
    all_committed = bool(committed.all())  # DiPO's batches score only committed tokens: no [N, V] copy
    logp_all = torch.log_softmax(logits if all_committed else logits[committed], -1)
    token_logp = logp_all.gather(-1, where["token"].to(device)[committed][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logits, token_logp, entropy


def token_logprobs(model, batch, device, dtype):
    """log pi(token | its round's state) for every committed token [K]."""
    return forward_scores(model, batch, device, dtype)[1]


def old_terms(logits, logp, where, exact):
    """The old side of every ratio, detached: the committed tokens' log pi (the mismatch is
    taken of these) and what the loss takes ratios of (the same for DiPO)."""
    if exact is None:
        return {"logp": logp.detach(), "ratio_logp": logp.detach()}
    return exact.terms(logits, logp, where, None)[2]


def dipo_loss(model, micro, old, ref_logp, cfg, device, dtype, exact=None):
    """The objective on one micro-batch (plan_micro_batches' dict: the packed batch and, per
    scored token, its advantage and weight): the sum over its tokens of weight x loss_t.

    `old` is None until the first optimizer step: the weights are then step k's, so this
    forward's own values, detached, are the old ones (exactly; a forward saved). Returns
    (loss, the selection terms' part of it or None, this micro-batch's sums for the log, old)."""
    logits, logp, entropy = forward_scores(model, micro["batch"], device, dtype)  # [N, V], [K], [K]
    if exact is None:  # the paper's DiPO: ratios of the committed tokens' log pi
        old = old or old_terms(logits, logp, micro["batch"][2], None)
        ratio_logp, selection = logp, None
    else:  # --estimator exact: ratios of their log q, and of each sampler step's selection factor
        ratio_logp, selection, old = exact.terms(logits, logp, micro["batch"][2], old)
    adv, weight = micro["adv"].to(device), micro["weight"].to(device)  # [K], [K]
    loss_t, clipped = dipo_token_loss(
        ratio_logp, old["ratio_logp"], adv, cfg.clip_low, cfg.clip_high, ref_logp, cfg.beta, logp_policy=logp
    )
    loss, selection_loss, sums = (loss_t * weight).sum(), None, {}
    if selection is not None:
        selection_loss, sums = exact.selection_loss(selection, old, micro, dipo_token_loss, cfg, ratio_logp)
        loss = loss + selection_loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"dipo: loss is {loss.item()}; nothing written")
    with torch.no_grad():
        log_ratio = ratio_logp - old["ratio_logp"]
        sums.update(
            loss=loss.item(),
            tokens=len(ratio_logp),
            clipped=clipped.sum().item(),
            approx_kl=(torch.exp(log_ratio) - 1 - log_ratio).sum().item(),
            entropy=entropy.sum().item(),
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
    """This process's micro-batches of every minibatch: dicts with the packed batch
    (attention.replay_batch; all_masked for --estimator exact) and, per scored token [K], its
    advantage, its loss weight and its recorded logprob, and per record [C] its advantage and
    weight. Every process runs as many micro-batches; one with no records of its own repeats
    a record with weight 0, so that the collectives stay in step."""
    c, lengths = model_config, torch.tensor([len(r["response_ids"]) for r in records])
    plan = []
    for minibatch in minibatches:
        totals = (int(lengths[minibatch].sum()), len(minibatch), cfg.loss_norm)  # the minibatch's
        count = max(1, math.ceil(len(minibatch) / (cfg.micro_batch_size * world)))
        micro_batches = []
        for chunk in [minibatch[j :: count * world] for j in range(count * world)][rank::world]:
            real, chunk = bool(chunk), chunk or minibatch[:1]
            part = [records[i] for i in chunk]
            batch = attention.replay_batch(
                part, c.mask_token_id, c.block_size, c.eos_token_id, cfg.row_len, all_masked=all_masked
            )
            where, members = batch[2], torch.tensor(chunk)  # [C] the chunk's records
            local = where["record"][where["committed"]]  # [K] each scored token's record in the chunk
            record_weight = token_weights(lengths[members], *totals).float() * float(real)  # [C]
            owner, index = members[local].tolist(), where["index"][where["committed"]].tolist()
            micro_batches.append(
                {
                    "batch": batch,
                    "real": real,
                    "adv": adv[members][local],
                    "weight": record_weight[local],
                    "recorded": torch.tensor([records[i]["logprobs"][t] for i, t in zip(owner, index)]),
                    "record_adv": adv[members],
                    "record_weight": record_weight,
                }
            )
        plan.append(micro_batches)
    return plan


def old_logprobs(model, ref, plan, exact, recorded, device, dtype):
    """Before any optimizer step, at step k's weights: the old terms of every minibatch but the
    first (which takes its own forward's: dipo_loss), either recomputed by a forward or, with
    `recorded`, the sampler's logprobs (no forward; their "logp" is None, so the mismatch is
    taken of the first minibatch alone); with a reference model its logprobs of the committed
    tokens. Keyed by (minibatch, micro-batch)."""
    old, ref_logp = {}, {}
    with torch.no_grad():
        for m, micro_batches in enumerate(plan):
            for j, micro in enumerate(micro_batches):
                if m > 0 and recorded:
                    old[m, j] = {"logp": None, "ratio_logp": micro["recorded"].to(device)}
                elif m > 0:
                    logits, logp, _ = forward_scores(model, micro["batch"], device, dtype)
                    old[m, j] = old_terms(logits, logp, micro["batch"][2], exact)
                if ref is not None:
                    ref_logp[m, j] = token_logprobs(ref, micro["batch"], device, dtype)
    return old, ref_logp


def use_recorded(choice, estimator, engines):
    """Whether log pi_old is the sampler's record (--old-logprobs). Our torch sampler records
    log pi at step k's weights, what a recomputation gives up to float order, so auto saves
    that forward; LMDeploy's kernels and precision differ, and recomputing keeps that gap out of
    the ratio. --estimator exact needs terms a record does not hold."""
    if choice == "recorded" and estimator == "exact":
        raise ValueError("--old-logprobs recorded: --estimator exact needs recomputed old terms")
    if choice == "auto":
        return estimator == "dipo" and engines == {"torch"}
    return choice == "recorded"


def warmup_lr(lr, warmup_steps, new_step):
    """The learning rate of the update that writes policy step new_step (1, 2, ...): linear
    warmup over the first warmup_steps updates, then lr. The policy step gives the position,
    so a resumed loop and a fresh process continue the same schedule."""
    return lr * min(1.0, new_step / warmup_steps) if warmup_steps > 0 else lr


# ----------------------------------------------------------------------------- the update


def prepare_training(model, cfg, lr, state, world, dtype, device):
    """AdamW at `lr` with the previous update's state (FSDP2 under torchrun), and with
    --beta > 0 the frozen reference policy. Returns (optimizer, reference or None)."""
    optimizer = distributed.make_optimizer(model, lr, cfg.weight_decay, cfg.grad_checkpointing, world, dtype)
    if state and "optimizer" in state:
        optimizer.load_full_state_dict(state["optimizer"])  # its moments; the lr is this update's
    if not cfg.beta:
        return optimizer, None
    ref, _ = load_model(str(cfg.ref or policy.policy_dir(cfg.run, 0)), device=device, attn=cfg.attn)
    return optimizer, ref.eval()


def ppo_epochs(model, optimizer, plan, old, ref_logp, cfg, exact, new_step, rank, device, dtype):
    """--ppo-epochs passes over the plan: per minibatch, the loss and its backward per
    micro-batch, then the clipped gradient's one optimizer step. `old` is filled in by the first
    pass (dipo_loss). Returns the log's sums over this process's real micro-batches and the
    gradient norm of every optimizer step."""
    sums, grad_norms = defaultdict(float), []
    bar = tqdm(total=cfg.ppo_epochs * len(plan), desc=f"dipo step {new_step}", disable=rank != 0)
    for _ in range(cfg.ppo_epochs):
        for m, micro_batches in enumerate(plan):
            for j, micro in enumerate(micro_batches):
                loss, _, micro_sums, old[m, j] = dipo_loss(
                    model, micro, old.get((m, j)), ref_logp.get((m, j)), cfg, device, dtype, exact
                )
                loss.backward()
                if micro["real"]:
                    for key, value in micro_sums.items():
                        sums[key] += value
            grad_norms.append(distributed.clip_gradients(model, cfg.grad_clip, f"dipo step {new_step}"))
            optimizer.step()
            optimizer.zero_grad()
            bar.update(1)
    bar.close()
    return sums, grad_norms


@rundir.releases_run_lock
def main(cfg):
    rank, world, device = distributed.init_distributed(cfg.device, cfg.threads)
    dtype = distributed.DTYPES[cfg.dtype]
    run, t_start = Path(cfg.run), time.time()
    policy_step, policy_path = policy.latest_policy(run)
    new_step = policy_step + 1
    if rank == 0:
        rundir.lock_run(run, "dipo")
    state = policy.read_state(run / "dipo_state.pt")
    if policy.finish_interrupted(run, policy_step, state, rank):
        return 0

    # the rollouts of step k, and the policy that sampled them (checked before anything is written)
    model, tokenizer = load_model(str(policy_path), dtype=torch.float32, device=device, attn=cfg.attn)
    policy.check_state(state, policy_step, model, run / "dipo_state.pt")
    rollouts = run / "rollouts" / f"step_{policy_step:06d}.jsonl"
    records = read_rollouts(rollouts, policy_step, model.config, cfg.max_len)
    exact = ExactEstimator(records) if cfg.estimator == "exact" else None

    # group-relative advantages; a group whose rewards are all equal has none
    adv = group_advantages([r["reward"] for r in records], [r["prompt_id"] for r in records])
    log = batch_metrics(records, adv, cfg.dapo_filter, new_step)
    log["lr"] = warmup_lr(cfg.lr, cfg.warmup_steps, new_step)
    trainable = [i for i, a in enumerate(adv) if a != 0.0] if cfg.dapo_filter else list(range(len(records)))
    if not any(adv[i] for i in trainable):  # nothing to learn: step k+1 is step k's weights
        if rank == 0:
            rundir.record_invocation(run, "dipo", cfg)
            log, carried = {**log, "updated": False}, {**(state or {}), "step": new_step}
            policy.commit_policy_step(run, new_step, model, tokenizer, None, log, carried)
            print(f"dipo step {new_step}: no group has a learning signal; policy carried over unchanged")
        return NOTHING_TO_LEARN
    records, adv = [records[i] for i in trainable], torch.tensor([adv[i] for i in trainable])

    # the policy to train, its optimizer (whose state carries over from the last update), the reference
    optimizer, ref = prepare_training(model, cfg, log["lr"], state, world, dtype, device)

    # minibatches of the records, then this process's micro-batches of each
    minibatches = split_minibatches(len(records), cfg.minibatches, cfg.seed, policy_step)
    plan = plan_micro_batches(records, adv, minibatches, cfg, model.config, rank, world, exact is not None)

    # the old log-probabilities at step k's weights: the sampler's records, or a forward
    t_old = time.time()
    recorded = use_recorded(cfg.old_logprobs, cfg.estimator, {r["sampler"].get("engine") for r in records})
    old, ref_logp = old_logprobs(model, ref, plan, exact, recorded, device, dtype)
    if cfg.diagnostics and exact and exact.has_selection and world == 1:

        def probe_loss(m, j, micro):  # the exact loss at step k's weights, and its selection part
            return dipo_loss(model, micro, None, ref_logp.get((m, j)), cfg, device, dtype, exact)[:2]

        log.update(gradient_probe(model, plan, probe_loss))

    # PPO epochs: per minibatch, loss and backward per micro-batch, then clip and one optimizer step
    t_update = time.time()
    sums, grad_norms = ppo_epochs(
        model, optimizer, plan, old, ref_logp, cfg, exact, new_step, rank, device, dtype
    )
    log.update(update_metrics(sums, plan, old, grad_norms, world, device))
    t_write = time.time()
    log.update(tokens_per_s=sums["tokens"] / max(1e-9, t_write - t_update), time_prepare=t_old - t_start)
    log.update(time_old=t_update - t_old, time_update=t_write - t_update)

    # write step k+1: the weights, the metrics line, the state file (the commit point), then latest
    model_sd, optim_sd = distributed.full_state(model, optimizer)
    if rank == 0:  # the first write: an update refused on the way (a non-finite loss) changes nothing
        rundir.record_invocation(run, "dipo", cfg)
        state = {"step": new_step, "optimizer": optim_sd, "config": dataclasses.asdict(cfg)}
        policy.commit_policy_step(run, new_step, model, tokenizer, model_sd, log, state, (t_start, t_write))
        print(summary_line(log))
    distributed.finish_distributed(world)
    return 0


if __name__ == "__main__":
    run_stage(main, Config, __doc__)
