"""dipo.py - one DiPO update: the unbiased GRPO of DiRL for blockwise diffusion LMs.

Reads  runs/<run>/policy/latest (step k) and its checkpoint
       runs/<run>/rollouts/step_<k>.jsonl   written by rollout.py from step k (docs/design.md, "The rollout record")
       runs/<run>/dipo_state.pt             optimizer state and step of the previous update, if any
Writes runs/<run>/policy/step_<k+1>/, one {"stage": "dipo", ...} line in metrics.jsonl, then
       dipo_state.pt, then policy/latest (each atomic, in that order, so a killed update is redone
       or completed by the next call; a kill just before dipo_state.pt repeats the metrics line)
Exit   0 = updated; 3 = nothing to learn from (every group had equal rewards): the policy is
       carried over unchanged to step k+1 so the loop goes on; 1 = error (nothing written)

Usage: python dipo.py --run runs/arith
       the loop: python rollout.py --run runs/arith && python dipo.py --run runs/arith

The objective (docs/design.md, "DiPO"). Per prompt group of G
responses, A_i = (r_i - mean(r)) / (std(r) + 1e-6) (population std), 0 when all rewards are
equal. The sampler committed each response token at a denoising step s of its block (step_map);
round s is the state in which every token with step_map >= s is still masked. A token committed
in round s is scored in round s's state, where the sampler drew it:
    ratio_t = exp(log pi_theta(x_t | state_s) - log pi_old(x_t | state_s))
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A) + beta k3(pi_ref, pi_theta)
with k3 = exp(ref - new) - (ref - new) - 1. log pi_old is recomputed at step k's weights (the
sampler's weights; its gap to the recorded logprobs is the train-inference mismatch, logged).
"token" normalisation sums loss_t over the minibatch and divides by its token count;
"sequence" averages each response's tokens, then the responses. Both counts are global
(every process reads the whole file), so micro-batches and processes do not change the
gradient.

--estimator exact (beyond the paper; docs/design.md, section "What unbiased means"). The
loss above scores what the sampler kept, but a low_confidence step draws a token at every
masked position and the rule then picks which to keep, so a trajectory's probability also
holds, per step, the probability that the rule kept exactly that set. With q_j the sampling
distribution at masked position j (temperature, top-k, top-p: attention.sampling_logprobs)
and c the step's cutoff (the threshold; or, when no draw reached it or for the static rule,
the least confidence kept), that factor is
    S = prod over masked j not kept of  sum_{u : q_j(u) < c} q_j(u)
with the token sets taken at the sampling weights (piecewise constant; the sums carry the
gradient). exact scores kept tokens under q instead of pi at temperature 1, and adds one term
per sampler step (round, block): log S with its own ratio exp(log S - log S_old), the same clip
and advantage, weighted as one token of its response. At ratio 1 the gradient is then
A * grad log P(trajectory) per response, the exact score function (tests/test_exact.py: equal
to the true gradient to 1e-10 on a toy whose trajectories are all enumerated; plain DiPO is
off there). `sequential` has S = 1. The forward then runs the LM head at every masked position
of every round, not only the kept ones.

One forward for all rounds: each response becomes [clean copy ; noisy copy of round s_1 ; ... ]
(only rounds that commit something; noisy copies start at the first response block), run
once with attention.py's mask; the LM head runs only at the tokens each round scores.

How this differs from the paper's code: DiRL/TraceRL run one forward per round; here all
rounds share one (tests/test_dipo.py checks the logprobs and gradient are the same). DiRL's
public code makes one on-policy update per rollout batch, so its ratio is always 1 and the
clip never acts (--minibatches 1 here); our default splits the batch into 8 minibatches, one
optimizer step each, where the ratio and the clip act from the second on, and drops the groups
without a learning signal before the forward (--dapo-filter; with beta 0 they add no gradient,
only compute and, under token normalisation, a larger denominator): on the built-in task that
learned faster per minute than one step (README, "Does it learn?"). The learning rate is
constant (no scheduler), as in DiRL's RL recipe; the default 1e-4 suits the tiny model, the
paper's 1e-6 is in configs/dipo_sdar8b.json.
"""

import dataclasses
import io
import json
import math
import sys
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
RECORD_KEYS = (
    "policy_step",
    "prompt_id",
    "prompt_ids",
    "response_ids",
    "step_map",
    "logprobs",
    "reward",
    "sampler",
)


@dataclass
class Config:
    run: str = flag("runs/arith", "run directory (layout: docs/design.md)")
    lr: float = flag(1e-4, "AdamW learning rate (constant)")
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
    row_len: int = flag(
        256, "tokens per packed row (a response with all its rounds larger than this gets a row of its own)"
    )
    dtype: str = flag("float32", "compute dtype: float32, or bfloat16 (autocast)")
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass to save memory")
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    attn: str = flag("auto", "attention backend: auto (flex on CUDA, else sdpa), flex, sdpa, eager")
    estimator: str = flag(
        "dipo",
        "'dipo' (the paper's: kept tokens' logprobs) or 'exact' (adds the commit rule's selection "
        "factor and scores under the sampling distribution; the docstring says why)",
    )
    diagnostics: bool = flag(
        True,
        "with --estimator exact: log the selection term's gradient norm relative to the token "
        "term's, their cosine and each estimator's gradient noise (one more backward through "
        "the selection term; one process only)",
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


def build_batch(records, mask_id, block_size, pad_id, row_len, rounds=None, all_masked=False):
    """Pack responses into rows of [clean ; one noisy copy per round] (attention.pack_copies).
    Returns input_ids [B, N], the Layout, and per scored position: row, column, token id,
    record index, index in the response, kept (committed in that round) and unit (a number per
    (record, round, block): the positions of one sampler step)."""
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
    out, units = defaultdict(list), {}
    for row_index, row in enumerate(rows):
        for i in row:
            noisy_from, record_rounds, _ = replays[i]
            for col, token, t, s, block in attention.replay_positions(
                records[i], noisy_from, record_rounds, first[i], block_size, all_masked
            ):
                values = (
                    row_index,
                    col,
                    token,
                    i,
                    t,
                    records[i]["step_map"][t] == s,
                    units.setdefault((i, s, block), len(units)),
                )
                for key, v in zip(("row", "col", "token", "record", "index", "kept", "unit"), values):
                    out[key].append(v)
    return input_ids, layout, {k: torch.tensor(v) for k, v in out.items()}


def forward_scores(model, batch, device, dtype, sampler=None):
    """One packed forward. Returns log pi (temperature 1, unfiltered: what the sampler records)
    of every kept token [K], pi's entropy there [K], and, given the sampler's settings, the
    sampling distribution (attention.sampling_logprobs) at every scored position [N, V]."""
    input_ids, layout, where = batch
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = attention.forward_layout(
            model, input_ids.to(device), layout, at=(where["row"], where["col"])
        )  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    kept = where["kept"].to(device)
    all_kept = bool(kept.all())  # DiPO's batches score only kept tokens: no [N, V] copy for them
    logp_all = torch.log_softmax(logits if all_kept else logits[kept], -1)
    logp = logp_all.gather(-1, where["token"].to(device)[kept][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if sampler is None:
        return logp, entropy, None
    return (
        logp,
        entropy,
        attention.sampling_logprobs(logits, sampler["temperature"], sampler["top_k"], sampler["top_p"]),
    )


def token_logprobs(model, batch, device, dtype):
    """log pi(token | its round's state) for every kept token [K]."""
    return forward_scores(model, batch, device, dtype)[0]


def flat_grads(params):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])


def noise_to_signal(sum_of_squares, total, n):
    """How noisy a gradient is that sums n independent parts (micro-batches): Var(total) /
    |total|^2, with Var(total) = n s^2 and s^2 the parts' sample variance, from the sum of the
    parts' squared norms. Only an estimate: parts that share a prompt group are not independent."""
    total_sq = total.square().sum().item()
    return n * (sum_of_squares - total_sq / n) / ((n - 1) * max(total_sq, 1e-30))


def step_records(where):
    """The record (index in the batch) of every sampler step [U]."""
    return torch.zeros(int(where["unit"].max()) + 1, dtype=torch.long).scatter(
        0, where["unit"], where["record"]
    )


def exact_terms(logq, where, below):
    """What the exact estimator takes ratios of: log q(token | its round's state) under the
    sampling distribution for every kept token [K], and the selection factor's log for every
    sampler step [U] (None without selection sets: `sequential`'s choice of position does not
    depend on the model)."""
    kept, token = where["kept"].to(logq.device), where["token"].to(logq.device)
    token_logq = logq[kept].gather(-1, token[kept][:, None])[:, 0]
    if below is None:
        return token_logq, None
    return token_logq, selection_log_factor(logq, below, kept, where["unit"], int(where["unit"].max()) + 1)


def k3(logp_ref, logp):
    """The k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - new) - (ref - new) - 1."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


def dipo_token_loss(logp, logp_old, adv, clip_low, clip_high, logp_ref=None, beta=0.0, logp_policy=None):
    """Per-token clipped surrogate of the ratio exp(logp - logp_old), plus beta * k3 KL of the
    policy to the reference. logp_policy: log pi_theta where the KL is taken (default logp; the
    exact estimator's ratios are of the sampling distribution, its KL still of pi_theta).
    Returns (loss [M], clipped [M])."""
    ratio = torch.exp(logp - logp_old)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    loss = -surrogate
    if beta:
        loss = loss + beta * k3(logp_ref, logp if logp_policy is None else logp_policy)
    return loss, (ratio * adv) != surrogate


def selection_sets(logq_old, token, kept, unit, num_units, strategy, threshold):
    """For the exact estimator: at every masked position j of a sampler step, the tokens u whose
    draw would have left j uncommitted, given what the step kept [N, V] bool. logq_old [N, V] is
    the sampling distribution at the sampling weights (the sets are taken there: they are
    piecewise constant in the weights, so they carry no gradient); token/kept/unit [N] as
    build_batch gives them. The cutoff c of a step:
      low_confidence_dynamic, some kept token had confidence >= threshold: c = threshold
      low_confidence_dynamic, none did (the most confident draw was kept alone): c = its confidence
      low_confidence_static (the quota's most confident draws were kept): c = the least kept confidence
    and j stayed masked iff its draw had confidence < c (ties, a measure-zero event, aside)."""
    if strategy not in ("low_confidence_dynamic", "low_confidence_static"):
        raise ValueError(f"no selection factor for strategy {strategy!r}")
    q_old = logq_old.exp()
    kept_conf = q_old.gather(-1, token[:, None])[:, 0][kept]  # [K]
    if strategy == "low_confidence_dynamic":
        best = torch.zeros(num_units, dtype=kept_conf.dtype).scatter_reduce(0, unit[kept], kept_conf, "amax")
        cutoff = torch.where(best >= threshold, torch.full_like(best, threshold), best)  # [U]
    else:
        cutoff = torch.ones(num_units, dtype=kept_conf.dtype).scatter_reduce(0, unit[kept], kept_conf, "amin")
    return (q_old < cutoff[unit][:, None]) & (q_old > 0)  # tokens top-k / top-p filtered out are never drawn


def selection_log_factor(logq, below, kept, unit, num_units):
    """log P(the rule kept exactly this set | the kept draws) per sampler step [U]: the sum over
    the step's masked positions j that were not kept of log sum_{u in below_j} q_j(u) (the issue's
    closed form; 0 for a step that kept every masked position). logq [N, V] carries the gradient."""
    others = ~kept & below.any(
        -1
    )  # an empty set (only a train-inference mismatch at a borderline can empty one) adds nothing
    log_m = torch.logsumexp(logq[others].masked_fill(~below[others], float("-inf")), -1)  # [N']
    return torch.zeros(num_units, dtype=logq.dtype, device=logq.device).index_add(
        0, unit[others].to(logq.device), log_m
    )


def token_weights(response_lengths, total_tokens, total_responses, loss_norm):
    """Weight of each scored token (response_lengths [M]: the length of its response) in the
    minibatch loss: 'token' = 1 / tokens in the minibatch, 'sequence' = 1 / (responses in the
    minibatch x its response's length). The totals are the minibatch's, not the micro-batch's."""
    if loss_norm == "token":
        return torch.full(response_lengths.shape, 1.0 / total_tokens)
    if loss_norm == "sequence":
        return 1.0 / (total_responses * response_lengths.double())
    raise ValueError(f"--loss-norm {loss_norm!r}: choose token or sequence")


# ----------------------------------------------------------------------------- I/O


def read_rollouts(path, step, block_size, mask_id):
    """Records of rollouts/step_<k>.jsonl, checked against the policy that will be trained."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no rollouts for policy step {step} (run rollout.py first)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: not JSON ({e.msg}); a partial file? rerun rollout.py --force"
            ) from None
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        if r["policy_step"] != step:
            raise ValueError(
                f"{where}: sampled by policy step {r['policy_step']}, but the policy is at step {step} (stale rollouts)"
            )
        if (
            r["sampler"].get("block_size") != block_size
            or r["sampler"].get("mask_token_id", mask_id) != mask_id
        ):
            raise ValueError(
                f"{where}: sampled with block size {r['sampler'].get('block_size')} and mask token "
                f"{r['sampler'].get('mask_token_id')}, the policy has {block_size} and {mask_id}"
            )
        if r["sampler"].get("ban_eos") or r["sampler"].get("min_new_tokens", 0) > 0:
            raise ValueError(
                f"{where}: sampled with the evaluation-only switches --ban-eos / --min-new-tokens, which "
                "draw from another distribution than the policy's; sample training rollouts without them"
            )
        n_resp = len(r["response_ids"])
        if (
            len(r["step_map"]) != n_resp
            or len(r["logprobs"]) != n_resp
            or not n_resp
            or (len(r["prompt_ids"]) + n_resp) % block_size
            or not all(0 <= s < block_size for s in r["step_map"])
        ):
            raise ValueError(
                f"{where}: response_ids, step_map and logprobs must be equally long, non-empty, end on a "
                f"block boundary and have steps in [0, {block_size})"
            )
        records.append(r)
    if not records:
        raise ValueError(f"{path}: empty")
    return records


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
            f"--estimator exact: rollouts from engine {sampler['engine']!r}; the selection factor is derived for "
            "rollout.py's own commit rule only"
        )
    if sampler["strategy"] not in ("low_confidence_dynamic", "low_confidence_static", "sequential"):
        raise ValueError(f"--estimator exact: no selection factor for strategy {sampler['strategy']!r}")
    if not sampler["temperature"] or sampler["temperature"] <= 0:
        raise ValueError("--estimator exact: greedy rollouts (temperature 0) have no policy gradient")
    return sampler


def save_torch_atomic(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    common.write_atomic(path, buffer.getvalue())


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.estimator not in ("dipo", "exact"):
        raise ValueError(f"--estimator {cfg.estimator!r}: choose dipo or exact")
    rank, world, device = common.init_distributed(cfg.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    run, timing, t_start = Path(cfg.run), defaultdict(float), time.time()
    step, policy = common.latest_policy(run)
    state_path = run / "dipo_state.pt"
    state = torch.load(state_path, weights_only=True) if state_path.is_file() else None
    if state and state["step"] == step + 1 and (common.policy_dir(run, step + 1) / "config.json").is_file():
        if rank == 0:  # killed after saving the update but before moving latest: finish that
            common.publish_policy(run, step + 1)
            print(f"dipo: step {step + 1} was already written; policy/latest now names it")
        return 0

    if rank == 0:
        common.record_invocation(run, "dipo", cfg)
    t = time.time()
    model, tokenizer = attention.load_model(str(policy), dtype=torch.float32, device=device, attn=cfg.attn)
    c = model.config
    records = read_rollouts(run / "rollouts" / f"step_{step:06d}.jsonl", step, c.block_size, c.mask_token_id)
    sampler = exact_sampler(records) if cfg.estimator == "exact" else None
    timing["io"] += time.time() - t
    rewards = [r["reward"] for r in records]
    adv = group_advantages(rewards, [r["prompt_id"] for r in records])
    kept = [i for i, a in enumerate(adv) if a != 0.0] if cfg.dapo_filter else list(range(len(records)))
    groups = len({r["prompt_id"] for r in records})
    with_signal = len({records[i]["prompt_id"] for i, a in enumerate(adv) if a})
    log = {
        "stage": "dipo",
        "step": step + 1,
        "reward": sum(rewards) / len(rewards),
        "reward_std": torch.tensor(rewards, dtype=torch.float64).std(unbiased=False).item(),
        "groups": groups,
        "groups_with_signal": with_signal,
        "groups_kept": with_signal if cfg.dapo_filter else groups,
    }
    if not any(adv[i] for i in kept):
        if rank == 0:
            attention.save_checkpoint(model, tokenizer, common.policy_dir(run, step + 1))
            common.append_metrics(run, {**log, "updated": False})
            save_torch_atomic({**(state or {}), "step": step + 1}, state_path)
            common.publish_policy(run, step + 1)
            print(
                f"dipo step {step + 1}: no group has a learning signal (all rewards equal within every group); "
                f"policy carried over unchanged"
            )
        return NOTHING_TO_LEARN

    records = [records[i] for i in kept]
    adv = torch.tensor([adv[i] for i in kept])
    model.train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    if world > 1:
        common.shard_model(model, dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    if state and "optimizer" in state:
        common.load_optimizer_state(model, optimizer, state["optimizer"])
    ref = None
    if cfg.beta:
        ref_dir = cfg.ref or common.policy_dir(run, 0)
        ref, _ = attention.load_model(str(ref_dir), dtype=torch.float32, device=device, attn=cfg.attn)
        ref.eval()

    # Minibatches over all records, then this process's micro-batches; the same split every epoch.
    order = torch.randperm(
        len(records), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    ).tolist()
    count = min(cfg.minibatches, len(records))  # never an empty minibatch
    minibatches = [order[m::count] for m in range(count)]
    plan = []  # per minibatch: (record indices, real?, packed batch) per micro-batch
    for mb in minibatches:
        micro_count = max(1, math.ceil(len(mb) / (cfg.micro_batch_size * world)))
        chunks = [mb[j :: micro_count * world] for j in range(micro_count * world)][rank::world]
        chunks = [
            (chunk or mb[:1], bool(chunk)) for chunk in chunks
        ]  # every process runs as many; an empty one with weight 0
        plan.append(
            [
                (
                    chunk,
                    real,
                    build_batch(
                        [records[i] for i in chunk],
                        c.mask_token_id,
                        c.block_size,
                        c.eos_token_id,
                        cfg.row_len,
                        all_masked=sampler is not None,
                    ),
                )
                for chunk, real in chunks
            ]
        )
    selective = sampler is not None and sampler["strategy"] != "sequential"
    diagnose = selective and cfg.diagnostics and world == 1
    params = [p for p in model.parameters() if p.requires_grad]

    def terms(logp, logq, where, below):
        """(the kept tokens' log-probabilities [K], the steps' selection log-factors [U] or None)"""
        return (logp, None) if sampler is None else exact_terms(logq, where, below)

    def old_terms(logp, logq, where):
        """At step k's weights, detached: the kept tokens' logprobs at temperature 1 (for the
        mismatch), then the same as terms(), plus the selection sets taken there."""
        below = None
        if selective:
            below = selection_sets(
                logq.detach(),
                where["token"].to(device),
                where["kept"].to(device),
                where["unit"].to(device),
                int(where["unit"].max()) + 1,
                sampler["strategy"],
                sampler["threshold"],
            )
        tokens, selection = terms(logp.detach(), None if logq is None else logq.detach(), where, below)
        return logp.detach(), tokens, selection, below

    # The "old" terms at step k's weights. Until the first optimizer step the weights are step
    # k's, so the first minibatch takes its own forward's values (detached): exactly equal, one
    # forward saved. Later minibatches (--minibatches > 1) need theirs before any step, and the
    # reference's are computed once.
    t = time.time()
    old, ref_logp, mismatch = {}, {}, []
    with torch.no_grad():
        for m, micro in enumerate(plan):
            for j, (_, _, batch) in enumerate(micro):
                if m > 0:
                    logp, _, logq = forward_scores(model, batch, device, dtype, sampler)
                    old[m, j] = old_terms(logp, logq, batch[2])
                if ref is not None:
                    ref_logp[m, j] = token_logprobs(ref, batch, device, dtype)
    timing["forward"] += time.time() - t

    stats = defaultdict(float)
    bar = tqdm(total=cfg.ppo_epochs * len(plan), desc=f"dipo step {step + 1}", disable=rank != 0)
    for epoch in range(cfg.ppo_epochs):
        for m, micro in enumerate(plan):
            mb_tokens = sum(len(records[i]["response_ids"]) for i in minibatches[m])
            if diagnose:  # per micro-batch gradients, as running sums: the selection term's and the whole
                grad_before, selection_grad, squares = flat_grads(params), 0.0, {"dipo": 0.0, "exact": 0.0}
            for j, (chunk, real, batch) in enumerate(micro):
                where = batch[2]
                scored = {k: v[where["kept"]] for k, v in where.items()}  # the kept tokens
                t = time.time()
                logp, entropy, logq = forward_scores(model, batch, device, dtype, sampler)
                if (m, j) not in old:
                    old[m, j] = old_terms(logp, logq, where)
                logp_old, tokens_old, selection_old, below = old[m, j]
                tokens, selection = terms(logp, logq, where, below)
                if epoch == 0 and real:  # the train-inference mismatch: step k's logprobs vs the sampler's
                    recorded = [
                        records[chunk[k]]["logprobs"][i]
                        for k, i in zip(scored["record"].tolist(), scored["index"].tolist())
                    ]
                    mismatch.append((logp_old.cpu() - torch.tensor(recorded)).abs())
                owner = torch.tensor(chunk)[scored["record"]]  # [K] record index of every scored token
                loss_t, clipped = dipo_token_loss(
                    tokens,
                    tokens_old,
                    adv[owner].to(device),
                    cfg.clip_low,
                    cfg.clip_high,
                    ref_logp[m, j] if cfg.beta else None,
                    cfg.beta,
                    logp_policy=logp,
                )
                lengths = torch.tensor([len(records[i]["response_ids"]) for i in owner.tolist()])
                w = token_weights(lengths, mb_tokens, len(minibatches[m]), cfg.loss_norm).to(
                    device, torch.float32
                )
                w = w if real else torch.zeros_like(w)
                loss = (loss_t * w).sum()
                if selection is not None:  # one term per sampler step, weighted as one token of its response
                    step_owner = torch.tensor(chunk)[step_records(where)]
                    loss_s, clipped_s = dipo_token_loss(
                        selection, selection_old, adv[step_owner].to(device), cfg.clip_low, cfg.clip_high
                    )
                    step_lengths = torch.tensor(
                        [len(records[i]["response_ids"]) for i in step_owner.tolist()]
                    )
                    w_s = token_weights(step_lengths, mb_tokens, len(minibatches[m]), cfg.loss_norm).to(
                        device, torch.float32
                    )
                    loss_selection = (loss_s * (w_s if real else torch.zeros_like(w_s))).sum()
                    loss = loss + loss_selection
                timing["forward"] += time.time() - t
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"dipo step {step + 1}: loss is {loss.item()}; no checkpoint written"
                    )
                if diagnose:
                    t = time.time()
                    grads = torch.autograd.grad(loss_selection, params, retain_graph=True, allow_unused=True)
                    from_selection = torch.cat(
                        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
                    )
                    timing["diagnostics"] += time.time() - t
                t = time.time()
                loss.backward()
                timing["backward"] += time.time() - t
                if diagnose:
                    grad_now = flat_grads(params)
                    exact_part = grad_now - grad_before
                    grad_before, selection_grad = grad_now, selection_grad + from_selection
                    squares["exact"] += exact_part.square().sum().item()
                    squares["dipo"] += (exact_part - from_selection).square().sum().item()
                if real:
                    with torch.no_grad():
                        log_ratio = tokens - tokens_old
                        stats["loss"] += loss.item()
                        stats["tokens"] += len(tokens)
                        stats["clipped"] += clipped.sum().item()
                        stats["approx_kl"] += (torch.exp(log_ratio) - 1 - log_ratio).sum().item()
                        stats["entropy"] += entropy.sum().item()
                        if selection is not None:
                            stats["steps"] += len(selection)
                            stats["clipped_steps"] += clipped_s.sum().item()
                            stats["selection_abs"] += selection.abs().sum().item()
                            stats["tokens_abs"] += tokens.abs().sum().item()
            if (
                diagnose
            ):  # the token term's gradient is DiPO's (at temperature 1, no filtering); summed, then averaged
                from_tokens = grad_before - selection_grad
                stats["grad_ratio"] += (selection_grad.norm() / from_tokens.norm().clamp(min=1e-30)).item()
                stats["grad_cosine"] += torch.nn.functional.cosine_similarity(
                    from_tokens, grad_before, dim=0
                ).item()
                if len(micro) > 1:
                    stats["noise_dipo"] += noise_to_signal(squares["dipo"], from_tokens, len(micro))
                    stats["noise_exact"] += noise_to_signal(squares["exact"], grad_before, len(micro))
                    stats["noise_count"] += 1
            t = time.time()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(
                    f"dipo step {step + 1}: gradient norm {grad_norm.item()}; no checkpoint written"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timing["optimizer"] += time.time() - t
            stats["grad_norm"] += (
                grad_norm.item()
            )  # the logged grad_norm is the mean over the step's optimizer steps
            bar.update(1)
    bar.close()
    mismatch = torch.cat(mismatch)
    stats.update(
        mismatch_sum=mismatch.sum().item(), mismatch_count=len(mismatch), mismatch_max=mismatch.max().item()
    )
    if world > 1:  # each process summed its own share
        summed = (
            "loss",
            "tokens",
            "clipped",
            "approx_kl",
            "entropy",
            "mismatch_sum",
            "mismatch_count",
            "steps",
            "clipped_steps",
            "selection_abs",
            "tokens_abs",
        )
        totals = torch.tensor([stats[k] for k in summed], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        stats.update(zip(summed, totals.tolist()))
        worst = torch.tensor(stats["mismatch_max"], device=device)
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        stats["mismatch_max"] = worst.item()

    t = time.time()
    model_sd, optim_sd = common.full_state(model, optimizer)
    if rank == 0:
        attention.save_checkpoint(model, tokenizer, common.policy_dir(run, step + 1), state_dict=model_sd)
    timing["io"] += time.time() - t
    tokens = max(1.0, stats["tokens"])
    log.update(
        {
            "updated": True,
            "loss": stats["loss"] / (cfg.ppo_epochs * len(minibatches)),
            "clip_frac": stats["clipped"] / tokens,
            "approx_kl": stats["approx_kl"] / tokens,
            "entropy": stats["entropy"] / tokens,
            "grad_norm": stats["grad_norm"] / (cfg.ppo_epochs * len(minibatches)),
            "mismatch_mean": stats["mismatch_sum"] / stats["mismatch_count"],
            "mismatch_max": stats["mismatch_max"],
            "tokens_per_s": tokens / max(1e-9, timing["forward"] + timing["backward"]),
            "seconds": time.time() - t_start,
            **{f"time_{k}": v for k, v in timing.items()},
        }
    )
    if (
        selective
    ):  # how much the selection factor weighs: in log-probability, and (one process) in the gradient
        log.update(
            {
                "estimator": "exact",
                "selection_to_token_logp": stats["selection_abs"] / max(1e-30, stats["tokens_abs"]),
                "clip_frac_steps": stats["clipped_steps"] / max(1.0, stats["steps"]),
            }
        )
        if diagnose:
            updates = cfg.ppo_epochs * len(
                minibatches
            )  # means over the step's optimizer steps, like grad_norm
            log.update(
                selection_to_token_grad=stats["grad_ratio"] / updates,
                grad_cosine_dipo_exact=stats["grad_cosine"] / updates,
                **{
                    f"grad_noise_{k}": stats[f"noise_{k}"] / stats["noise_count"]
                    for k in ("dipo", "exact")
                    if stats["noise_count"]
                },
            )
    if (
        rank == 0
    ):  # the metrics line before the commit point (the state file): a kill can repeat it, never lose it
        common.append_metrics(run, log)
        save_torch_atomic(
            {"step": step + 1, "optimizer": optim_sd, "config": dataclasses.asdict(cfg)}, state_path
        )
        common.publish_policy(run, step + 1)
        print(
            f"dipo step {step + 1} | reward {log['reward']:.3f} ± {log['reward_std']:.3f} | groups kept {log['groups_kept']}/{groups} | "
            f"loss {log['loss']:+.4f} | clip {log['clip_frac']:.3f} | kl {log['approx_kl']:.2e} | entropy {log['entropy']:.3f} | "
            f"grad norm {log['grad_norm']:.3f} | mismatch mean {log['mismatch_mean']:.1e} max {log['mismatch_max']:.1e} | "
            + (f"selection/token logp {log['selection_to_token_logp']:.3f} | " if selective else "")
            + (f"grad cos(dipo, exact) {log['grad_cosine_dipo_exact']:.3f} | " if diagnose else "")
            + f"{log['tokens_per_s']:,.0f} tok/s | {log['seconds']:.1f} s "
            f"(io {timing['io']:.1f}, fwd {timing['forward']:.1f}, bwd {timing['backward']:.1f}, opt {timing['optimizer']:.1f}"
            + (f", diagnostics {timing['diagnostics']:.1f})" if diagnose else ")")
        )
    if world > 1:
        torch.distributed.barrier()  # rank 0 is still writing; leaving early aborts the group
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(common.parse_config(Config, description=__doc__)))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
