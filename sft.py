"""sft.py - blockwise masked-diffusion SFT of a blockwise diffusion LM (SDAR), the first DiRL stage.

Reads  --model   'tiny' (built from a config) or a model dir (an SDAR checkpoint or one of ours)
       --data    SFT data, JSON list or JSONL: {"messages": [{"role", "content"}, ...]} (the
                 last assistant turn is trained on, earlier turns are its prompt) or
                 {"prompt", "response"} (the prompt gets the checkpoint's instruction sentence)
Writes runs/<run>/config/sft.json         the resolved config
       runs/<run>/sft/                    the last save: HF model dir + trainer_state.pt
                                          (optimizer state, step), written atomically
       runs/<run>/policy/step_000000/     the final model, and policy/latest naming it
       runs/<run>/metrics.jsonl           one {"stage": "sft", ...} line per logged step

Usage: python sft.py [--model tiny] [--data data/arith_sft.jsonl] [--run runs/arith] [--steps 2000]
       torchrun --nproc-per-node N -- sft.py ...  (FSDP2; gloo on CPU, nccl on CUDA; the "--" stops
                                                   torchrun from reading --run as its own --run-path)

The loss (docs/design.md, "The SFT loss"). A document is prompt +
response + "<|im_end|>\\n", padded with eos to a multiple of the block size b (the padding is
trained on: it is how the model learns to stop). Per document draw t ~ U(0, 1),
p = (1 - eps) t + eps, and mask each response token with probability p (never a prompt
token). The model sees [x0 ; x_t] with attention.py's block-diffusion mask and predicts x0 at
the masked positions of x_t (labels not shifted; at least one token is masked, as in DiRL):
    loss(doc) = sum_{masked i} CE(x0_i | x_t) / p  /  (number of response tokens)
and the step's loss is the mean over the documents of the global batch, however they are split
into micro-batches and processes (each process divides by the global count, and FSDP sums).

How this differs from the paper's code:
  - documents are packed into rows with a document-aware mask, not padded to a fixed length;
    the noisy copy starts at the block holding the first response token (prompt-only blocks
    have nothing to predict), with exact positions;
  - the noise of a document is a function of (seed, its place in the data stream), so a
    resumed run and a run on any number of processes see exactly the same masks;
  - only the final assistant turn of a `messages` record is trained on.
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attention
from support import distributed, policy, rundir
from support.data import MAX_DATA_MB, data_stream, read_records
from support.flags import flag, run_stage
from support.model import load_model, save_checkpoint, sft_record_texts

# settings a resumed run may change: they do not change what is learned
RUN_FIELDS = {
    "resume",
    "max_data_mb",
    "save_every",
    "log_every",
    "threads",
    "grad_checkpointing",
    "row_len",
    "grad_accum",
    "eval_every",
}
RUN_FIELDS |= {"attn", "device"}


OVERLONG, DTYPE_NAMES = ("skip", "truncate"), tuple(distributed.DTYPES)


@dataclass
class Config:
    model: str = flag("tiny", "'tiny' or a model dir (SDAR checkpoint or one of ours)")
    data: str = flag(
        "data/arith_sft.jsonl", "SFT data: JSON list or JSONL of {messages} or {prompt, response}"
    )
    max_data_mb: float = flag(MAX_DATA_MB, "refuse a --data file larger than this many megabytes", above=0)
    run: str = flag("runs/arith", "run directory (created); its layout: docs/design.md")
    steps: int = flag(2000, "optimizer steps", low=1, when=lambda c: c.epochs == 0)
    epochs: float = flag(0.0, "if > 0, train this many passes over the data instead of --steps", low=0)
    minutes: float = flag(
        0.0,
        "if > 0, end the run after the step that passes this many minutes of training (resumes count "
        "the time before their last save): demo.sh's control arm, as many minutes as the loop took",
        low=0,
    )
    batch_size: int = flag(32, "documents per optimizer step, summed over processes and micro-batches", low=1)
    grad_accum: int = flag(1, "micro-batches per optimizer step in each process", low=1)
    row_len: int = flag(256, "tokens per packed row (a document counts its clean and its noisy copy)", low=1)
    lr: float = flag(2e-3, "peak learning rate (AdamW)", above=0)
    warmup_steps: int = flag(30, "linear warmup steps, then cosine decay", low=0)
    min_lr_ratio: float = flag(0.1, "the cosine decays to lr * this", low=0, high=1)
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)", low=0)
    block_size: int = flag(0, "block size; 0 = the checkpoint's (4 for 'tiny' and SDAR)", low=0)
    max_len: int = flag(
        256, "longest document in tokens after block padding (a multiple of the block size)", low=1
    )
    overlong: str = flag(
        "skip", "documents over --max-len: skipped, or their response truncated", choices=OVERLONG
    )
    eps: float = flag(1e-3, "smallest mask rate: p = (1 - eps) t + eps", above=0, high=1)
    instruction: str = flag("auto", "sentence appended to {prompt} records; 'auto' = the checkpoint's")
    dtype: str = flag("float32", "compute dtype (bfloat16: autocast, float32 weights)", choices=DTYPE_NAMES)
    device: str = flag("auto", "auto (cuda if present), cpu or cuda")
    attn: str = flag(
        "auto", "attention backend (auto: flex on CUDA, else sdpa)", choices=("auto", *attention.BACKENDS)
    )
    seed: int = flag(0, "seed of the model init (tiny), the data order, the held-out split and the masks")
    eval_docs: int = flag(256, "documents held out of training for the held-out loss", low=0)
    eval_every: int = flag(
        0,
        "held-out loss and masked-token accuracy every this many steps too: the curve (0 = at the end)",
        low=0,
    )
    save_every: int = flag(100, "save the run (weights + optimizer) every this many steps", low=1)
    log_every: int = flag(25, "one log line and one metrics.jsonl line every this many steps", low=1)
    resume: bool = flag(
        False, "continue from runs/<run>/sft/ (same settings) instead of refusing an existing run"
    )
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass to save memory")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)", low=0)


# ----------------------------------------------------------------------------- the math


def noise_document(prompt_len, length, eps, generator):
    """One document's noise: p = (1 - eps) t + eps with t ~ U(0, 1), and which positions are
    masked ([length] bool); prompt positions never are, and at least one response position is
    (as DiRL does: a document without a masked token would add nothing)."""
    t = torch.rand((), generator=generator).item()
    p = (1 - eps) * t + eps
    masked = torch.zeros(length, dtype=torch.bool)
    masked[prompt_len:] = torch.rand(length - prompt_len, generator=generator) < p
    if not masked.any():
        masked[prompt_len + torch.randint(length - prompt_len, (), generator=generator)] = True
    return p, masked


def diffusion_loss(logits, targets, weights):
    """sum_i weights_i * CE(logits_i, targets_i); logits [M, V], targets [M], weights [M] with
    weight = 1 / (p * response tokens of the document) / documents in the global batch."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()


def build_micro_batch(docs, noises, block_size, mask_id, pad_id, row_len, docs_in_batch):
    """docs: (prompt_ids, response_ids) with len(prompt + response) a multiple of block_size;
    noises: (p, masked) per doc. Rows of [clean copy ; noisy copy] per document
    (attention.pack_copies, one noisy version of each block), the noisy copy starting at the
    block that holds the first response token. Returns input_ids [B, N], the Layout, and per
    loss token (masked response token): row, column, target, weight."""
    documents = []
    for (prompt, response), (_, masked) in zip(docs, noises):
        clean, noisy_from = prompt + response, len(prompt) // block_size * block_size
        noisy = [mask_id if masked[i] else clean[i] for i in range(noisy_from, len(clean))]
        blocks = [[noisy[i : i + block_size]] for i in range(0, len(noisy), block_size)]
        documents.append((clean, noisy_from, blocks))
    input_ids, layout, rows, columns = attention.pack_copies(documents, block_size, pad_id, row_len)
    loss_rows, loss_cols, targets, weights = [], [], [], []
    for r, row in enumerate(rows):
        for d in row:
            clean = documents[d][0]
            p, masked = noises[d]
            weight = 1.0 / (p * len(docs[d][1]) * docs_in_batch)
            for i in masked.nonzero().flatten().tolist():
                loss_rows.append(r)
                loss_cols.append(columns[d][0, i])  # masked position i of the one noisy copy
                targets.append(clean[i])
                weights.append(weight)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return input_ids, layout, as_long(loss_rows), as_long(loss_cols), as_long(targets), torch.tensor(weights)


def lr_factor(step, warmup_steps, total_steps, min_lr_ratio):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def noise_seed(seed, position):
    return (seed << 40) + position


# ----------------------------------------------------------------------------- data


def load_documents(path, tokenizer, instruction, block_size, max_len, overlong, max_mb=MAX_DATA_MB):
    """Token documents (prompt_ids, response_ids padded with eos to a block multiple) and
    the number of overlong records skipped or truncated."""
    texts = []
    for n, record in read_records(path, max_mb=max_mb):
        try:
            texts.append(sft_record_texts(record, instruction))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    prompts = tokenizer.encode(p for p, _ in texts)
    responses = tokenizer.encode(r for _, r in texts)
    docs, overlong_count = [], 0
    for prompt, response in zip(prompts, responses):
        response = response + [tokenizer.eos_token_id] * (-(len(prompt) + len(response)) % block_size)
        if len(prompt) + len(response) > max_len:
            overlong_count += 1
            if overlong == "skip" or len(prompt) >= max_len:
                continue
            response = response[: max_len - len(prompt)]
        docs.append((prompt, response))
    return docs, overlong_count


# ----------------------------------------------------------------------------- training


def run_micro_batch(model, docs, positions, cfg, docs_in_batch, device, dtype):
    """Forward one micro-batch; returns (loss tensor, masked-token hits, masked tokens, row tokens)."""
    noises = []
    for (prompt, response), position in zip(docs, positions):
        g = torch.Generator().manual_seed(noise_seed(cfg.seed, position))
        noises.append(noise_document(len(prompt), len(prompt) + len(response), cfg.eps, g))
    c = model.config
    input_ids, layout, rows, cols, targets, weights = build_micro_batch(
        docs, noises, c.block_size, c.mask_token_id, c.eos_token_id, cfg.row_len, docs_in_batch
    )
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = attention.forward_layout(model, input_ids.to(device), layout, at=(rows, cols))  # [M, V]
    targets, weights = targets.to(device), weights.to(device)
    loss = diffusion_loss(logits, targets, weights)
    hits = (logits.argmax(-1) == targets).sum().item()
    return loss, hits, len(targets), int((layout.doc >= 0).sum())


def held_out_loss(model, docs, cfg, device, dtype):
    """Mean diffusion loss and masked-token accuracy over held-out documents, fixed noise."""
    model.eval()
    totals = torch.zeros(3)
    with torch.no_grad():
        for start in range(0, len(docs), cfg.batch_size):
            chunk = docs[start : start + cfg.batch_size]
            positions = [-(start + j + 1) for j in range(len(chunk))]  # negative: never a training position
            loss, hits, masked, _ = run_micro_batch(model, chunk, positions, cfg, len(docs), device, dtype)
            totals += torch.tensor([loss.item(), hits, masked])
    model.train()
    return totals[0].item(), totals[1].item() / max(1, totals[2].item())


def prepare_documents(cfg, model, tokenizer):
    """Set the block size and the instruction on the model's config (they are saved with it),
    tokenize the data, and split off --eval-docs held-out documents by a seeded shuffle.
    Returns (train, held_out, how many documents were overlong)."""
    block_size = cfg.block_size or model.config.block_size
    if cfg.max_len % block_size:
        raise ValueError(f"--max-len {cfg.max_len} is not a multiple of the block size {block_size}")
    model.config.block_size = block_size
    if cfg.instruction != "auto":
        model.config.instruction = cfg.instruction
    docs, overlong = load_documents(
        cfg.data, tokenizer, model.config.instruction, block_size, cfg.max_len, cfg.overlong, cfg.max_data_mb
    )
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held_out = [docs[i] for i in order[: cfg.eval_docs]]
    train = [docs[i] for i in order[cfg.eval_docs :]]
    if not train:
        raise ValueError(
            f"{cfg.data}: no training documents left ({len(docs)} usable, {cfg.eval_docs} held out, "
            f"{overlong} overlong)"
        )
    return train, held_out, overlong


def read_trainer_state(cfg, run, save_dir):
    """With --resume, the last save's trainer state (None if there is none yet), refused if it
    was saved with other settings; without, a refusal to overwrite an existing SFT run."""
    if cfg.resume and (save_dir / "trainer_state.pt").is_file():
        trainer_state = distributed.read_torch_state(
            save_dir / "trainer_state.pt", {"step": int, "config": dict, "optimizer": dict}
        )
        changed = {
            k: (v, getattr(cfg, k))
            for k, v in trainer_state["config"].items()
            if k not in RUN_FIELDS and v != getattr(cfg, k)
        }
        if changed:
            raise ValueError(
                f"{save_dir}: saved with other settings {changed} (saved, now); resume with the same ones"
            )
        return trainer_state
    if not cfg.resume and (save_dir.exists() or (run / "policy").exists()):
        raise ValueError(
            f"{run} already holds an SFT run; pass --resume to continue it or choose another --run"
        )
    return None


def prepare_training(model, cfg, trainer_state, world, dtype, device):
    """The model on its device (FSDP2 under torchrun) and AdamW, restored from the trainer
    state if resuming. Returns (optimizer, first step)."""
    optimizer = distributed.make_optimizer(
        model.to(device), cfg.lr, cfg.weight_decay, cfg.grad_checkpointing, world, dtype
    )
    if not trainer_state:
        return optimizer, 0
    distributed.check_optimizer_state(
        trainer_state["optimizer"], model, Path(cfg.run) / "sft" / "trainer_state.pt"
    )
    optimizer.load_full_state_dict(trainer_state["optimizer"])
    return optimizer, trainer_state["step"]


def check_flags(cfg, world):
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"--batch-size {cfg.batch_size} must divide into {world} processes x "
            f"{cfg.grad_accum} micro-batches"
        )


def out_of_time(t_begin, minutes, world, device):
    """Whether the --minutes budget is spent; rank 0's clock decides for every process."""
    over = torch.tensor([float(time.time() - t_begin >= 60 * minutes)], device=device)
    if world > 1:
        torch.distributed.broadcast(over, 0)
    return bool(over.item())


def train_step(model, optimizer, batch, cfg, device, dtype, where):
    """One optimizer step at optimizer.lr on this process's share of a batch, [(position in the
    seeded stream, doc)], in --grad-accum micro-batches. Returns this process's [loss, hits,
    masked tokens, row tokens] and the gradient norm; `where` names the step in errors."""
    per_micro = len(batch) // cfg.grad_accum
    stats = torch.zeros(4)
    for m in range(cfg.grad_accum):
        part = batch[m * per_micro : (m + 1) * per_micro]
        loss, hits, masked, tokens = run_micro_batch(
            model, [doc for _, doc in part], [i for i, _ in part], cfg, cfg.batch_size, device, dtype
        )
        loss.backward()
        stats += torch.tensor([loss.item(), hits, masked, tokens])
    grad_norm = distributed.clip_gradients(model, cfg.grad_clip, where)
    optimizer.step()
    optimizer.zero_grad()
    return stats, grad_norm


def log_step(run, bar, done, total_steps, stats, lr, grad_norm, tokens_per_s):
    """One metrics.jsonl line and one log line for the step that just ended."""
    loss, acc = stats[0].item(), stats[1].item() / max(1, stats[2].item())
    record = {"stage": "sft", "step": done, "loss": loss, "acc": acc, "lr": lr, "grad_norm": grad_norm}
    rundir.append_metrics(run, {**record, "tokens_per_s": tokens_per_s})
    bar.write(
        f"step {done:>5}/{total_steps} | loss {loss:.4f} | acc {acc:.3f} | lr {lr:.2e} | "
        f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s"
    )


def log_held_out(model, held_out, cfg, device, dtype, step, rank, write):
    """The held-out loss and masked-token accuracy at `step`: a metrics.jsonl line and a log line."""
    loss, acc = held_out_loss(model, held_out, cfg, device, dtype)
    if rank == 0:
        rundir.append_metrics(
            Path(cfg.run), {"stage": "sft", "step": step, "held_out_loss": loss, "held_out_acc": acc}
        )
        write(
            f"step {step:>5} held-out ({len(held_out)} docs): diffusion loss {loss:.4f}, "
            f"masked-token accuracy {acc:.3f}"
        )


def save_run(model, tokenizer, optimizer, cfg, step, seconds, rank):
    """The resumable save, runs/<run>/sft/: weights and trainer state (with the seconds of
    training so far) in one atomic directory. A collective under FSDP (every process calls
    it); returns the full weights."""
    model_sd, optim_sd = distributed.full_state(model, optimizer)
    if rank == 0:
        state = {"step": step, "optimizer": optim_sd, "config": dataclasses.asdict(cfg), "seconds": seconds}
        save_checkpoint(model, tokenizer, Path(cfg.run) / "sft", state_dict=model_sd, trainer_state=state)
    return model_sd


@rundir.releases_run_lock
def main(cfg):
    rank, world, device = distributed.init_distributed(cfg.device, cfg.threads)
    dtype = distributed.DTYPES[cfg.dtype]
    run = Path(cfg.run)
    save_dir = run / "sft"
    check_flags(cfg, world)
    if rank == 0:
        rundir.lock_run(run, "sft")
    trainer_state = read_trainer_state(cfg, run, save_dir)

    model, tokenizer = load_model(str(save_dir) if trainer_state else cfg.model, attn=cfg.attn, seed=cfg.seed)
    train, held_out, overlong = prepare_documents(cfg, model, tokenizer)
    block_size = model.config.block_size
    total_steps = math.ceil(cfg.epochs * len(train) / cfg.batch_size) if cfg.epochs > 0 else cfg.steps

    optimizer, start = prepare_training(model, cfg, trainer_state, world, dtype, device)
    if rank == 0:
        rundir.record_invocation(run, "sft", cfg)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"sft: {cfg.model} ({params / 1e6:.2f}M params, block {block_size}) on {world} x {device}; "
            f"{len(train)} train / {len(held_out)} held-out docs from {cfg.data}; "
            f"{overlong} longer than {cfg.max_len} tokens "
            f"{'skipped' if cfg.overlong == 'skip' else 'truncated'}; "
            f"steps {start} -> {total_steps}"
        )

    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft", disable=rank != 0)
    t0, tokens_since = time.time(), 0
    t_begin = t0 - (trainer_state or {}).get("seconds", 0.0)  # training time, across resumes
    for step in bar:
        mine = data_stream(step, cfg.batch_size, len(train), cfg.seed)[rank::world]
        batch = [(i, train[d]) for i, d in mine]  # (position in the stream: seeds the noise, doc)
        where = f"step {step} (saved up to step {start})"
        # the warmup-cosine schedule: the step alone gives the lr, so a resumed run continues it
        optimizer.lr = lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        stats, grad_norm = train_step(model, optimizer, batch, cfg, device, dtype, where)
        if world > 1:
            torch.distributed.all_reduce(stats)
        tokens_since += stats[3].item()
        done = step + 1
        if cfg.minutes and out_of_time(t_begin, cfg.minutes, world, device):
            total_steps = done  # the time budget ends the run at this step
        if done % cfg.log_every == 0 or done == total_steps:
            elapsed, t0 = time.time() - t0, time.time()
            if rank == 0:
                log_step(run, bar, done, total_steps, stats, lr, grad_norm, tokens_since / elapsed)
            tokens_since = 0
        if held_out and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            log_held_out(model, held_out, cfg, device, dtype, done, rank, bar.write)
        if done % cfg.save_every == 0 and done < total_steps:
            save_run(model, tokenizer, optimizer, cfg, done, time.time() - t_begin, rank)
        if done == total_steps:
            break
    bar.close()

    model_sd = save_run(model, tokenizer, optimizer, cfg, total_steps, time.time() - t_begin, rank)
    if held_out:
        log_held_out(model, held_out, cfg, device, dtype, total_steps, rank, print)
    if rank == 0:
        save_checkpoint(model, tokenizer, policy.policy_dir(run, 0), state_dict=model_sd)
        policy.publish_policy(run, 0)
        print(
            f"wrote {policy.policy_dir(run, 0)}; exact-match accuracy on the test split:\n"
            f"  python rollout.py --policy {policy.policy_dir(run, 0)} --data data/arith_test.jsonl "
            f"--num-prompts 0 --group-size 1 --out {run}/eval/sft.jsonl && "
            f"python eval.py {run}/eval/sft.jsonl"
        )
    distributed.finish_distributed(world)


if __name__ == "__main__":
    run_stage(main, Config, __doc__)
