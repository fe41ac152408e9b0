"""common.py - the run plumbing every stage shares: flags and configs, the run directory,
the data stream, the run manifest and distributed setup. Nothing here is about the model or
the algorithm (attention.py holds the block-diffusion attention and model loading).

The run directory (docs/design.md, "The run directory"):
    runs/<run>/config/<stage>.json     the resolved config of the last invocation of each stage
    runs/<run>/policy/step_<k>/        checkpoints; policy/latest names the newest
    runs/<run>/rollouts/step_<k>.jsonl what rollout.py sampled with policy step k
    runs/<run>/dipo_state.pt           dipo.py's optimizer and step
    runs/<run>/metrics.jsonl           one JSON line per logged step or invocation, every stage
Every file is written to a temporary sibling and moved into place (os.replace), so a killed
process never leaves a half-written file under a real name.
"""

import argparse
import dataclasses
import errno
import fcntl
import functools
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- configs and flags


def flag(default, help):
    """A dataclass field whose help text becomes the --help of its command-line flag."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_config(config_cls, argv=None, description=None):
    """Build an argparse parser from a @dataclass Config: one --kebab-case flag per field,
    booleans as --x/--no-x, plus --config FILE.json. Precedence: defaults < file < flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        metavar="FILE.json",
        help="JSON object with any of the fields below (snake_case); flags given on the command line win",
    )
    for f in dataclasses.fields(config_cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{f.metadata.get('help', '')} (default: {default!r})"
        if f.type is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help
            )
        elif isinstance(default, list):
            parser.add_argument(
                name,
                nargs="*",
                type=type(default[0]) if default else str,
                default=argparse.SUPPRESS,
                help=help,
            )
        else:
            kind = f.type if f.type in (int, float, str) else str
            parser.add_argument(name, type=kind, default=argparse.SUPPRESS, help=help)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback, not one line")
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    values = {}
    if args.get("config"):
        path = Path(args.pop("config"))
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {path}: {e}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if not isinstance(values, dict) or unknown:
            parser.error(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    args.pop("config", None)
    values.update(args)
    return config_cls(**values)


def run_stage(main, config_cls, description, argv=None):
    """A stage's command line: parse the flags, run main(cfg) and exit with what it returns. Bad
    input (a missing or malformed file, a refused flag, a locked run) ends as one line on stderr,
    "error: ...", with exit code 1 and nothing written; --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(config_cls, argv, description)
    try:
        code = main(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        if "--debug" in argv:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        sys.exit(f"error: {message}")
    sys.exit(code or 0)


# ----------------------------------------------------------------------------- the run directory


def write_atomic(path, data):
    """Write str or bytes to `path` through a temporary sibling and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def policy_dir(run, step):
    return Path(run) / "policy" / f"step_{step:06d}"


def latest_policy(run):
    """(step, dir) of the checkpoint that runs/<run>/policy/latest names."""
    latest = Path(run) / "policy" / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest}: no policy yet (run `python sft.py --run {run}` first)")
    name = latest.read_text().strip()
    if not re.fullmatch(r"step_\d{6}", name) or not (latest.parent / name / "config.json").is_file():
        raise ValueError(f"{latest}: names {name!r}, which is not a checkpoint in {latest.parent}")
    return int(name[len("step_") :]), latest.parent / name


def publish_policy(run, step):
    """Point policy/latest at step `step` (its checkpoint must already be written)."""
    write_atomic(Path(run) / "policy" / "latest", f"step_{step:06d}\n")


def data_stream(step, per_step, total, seed, start=None):
    """The items of step `step`: positions step*per_step .. (step+1)*per_step - 1 (or from
    `start`) of an endless stream that visits items 0..total-1 in a fresh seeded order every
    pass. Returns (stream position, item index) pairs. sft.py walks its documents this way
    (the position seeds a document's noise), rollout.py its prompts."""
    start = step * per_step if start is None else start
    out = []
    for i in range(start, start + per_step):
        epoch, k = divmod(i, total)
        out.append((i, _epoch_order(total, seed, epoch)[k]))
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(total, seed, epoch):
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def finite_or_none(value):
    """JSON has no NaN or infinity: such a float becomes null, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def append_metrics(run, record):
    """One line of metrics.jsonl, with the wall time (loop curves, time splits). Strict JSON
    (no NaN), and never through a symlink: O_NOFOLLOW refuses one."""
    Path(run).mkdir(parents=True, exist_ok=True)
    line = json.dumps(finite_or_none({"time": round(time.time(), 3), **record}), allow_nan=False) + "\n"
    path = Path(run) / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "a symlink; the files of a run may not be links" if e.errno == errno.ELOOP else e.strerror
        raise ValueError(f"{path}: cannot append: {why}") from None
    with os.fdopen(fd, "a") as f:
        f.write(line)


def record_invocation(run, stage, cfg):
    """What reproduces this call from the run dir alone: config/<stage>.json (the resolved
    config, usable as --config) and a metrics.jsonl line {"stage", "event": "start", "config",
    "git_commit", "packages"}, so every invocation stays in the history."""
    config = dataclasses.asdict(cfg)
    write_atomic(Path(run) / "config" / f"{stage}.json", json.dumps(config, indent=2))
    here = Path(__file__).resolve().parent
    git = subprocess.run(
        ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=40"],
        capture_output=True,
        text=True,
    )
    packages = {}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "sympy", "tqdm"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    append_metrics(
        run,
        {
            "stage": stage,
            "event": "start",
            "config": config,
            "git_commit": git.stdout.strip() if git.returncode == 0 else None,
            "python": sys.version.split()[0],
            "packages": packages,
        },
    )


# ----------------------------------------------------------------------------- checking what a stage reads
# Run directories are copied, edited and filled by other tools, so every field a stage reads is
# checked before anything is written: one line per failure, "FILE:LINE: field: what is wrong".

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


def is_int(x):
    return type(x) is int  # not bool, not float


def is_number(x):
    return type(x) in (int, float) and math.isfinite(x)


def check_rollout_record(r, where, policy_step, block_size, mask_id, vocab_size, max_len):
    """Every field dipo.py reads from a rollout record (docs/formats.md): types, ranges, finite
    numbers and lengths. Prompt + response may be no longer than the prompt plus the record's
    own max_new_tokens rounded up to a block, nor than max_len. Raises ValueError."""

    def fail(field, what):
        raise ValueError(f"{where}: {field}: {what}")

    if not isinstance(r, dict):
        fail("record", "not a JSON object")
    missing = [k for k in RECORD_KEYS if k not in r]
    if missing:
        fail("record", f"missing keys {missing}")
    if r["policy_step"] != policy_step or not is_int(r["policy_step"]):
        fail("policy_step", f"{r['policy_step']!r}, but the policy is at step {policy_step} (stale rollouts)")
    if type(r["prompt_id"]) not in (str, int):
        fail("prompt_id", "not a string or an integer")
    sampler = r["sampler"]
    if not isinstance(sampler, dict):
        fail("sampler", "not a JSON object")
    if sampler.get("block_size") != block_size or sampler.get("mask_token_id", mask_id) != mask_id:
        fail(
            "sampler",
            f"sampled with block size {sampler.get('block_size')} and mask token {sampler.get('mask_token_id')}, "
            f"the policy has {block_size} and {mask_id}",
        )
    if sampler.get("ban_eos") or (
        is_number(sampler.get("min_new_tokens", 0)) and sampler.get("min_new_tokens", 0) > 0
    ):
        fail(
            "sampler",
            "sampled with the evaluation-only switches --ban-eos / --min-new-tokens, which draw from another "
            "distribution than the policy's; sample training rollouts without them",
        )
    if not is_int(sampler.get("max_new_tokens")) or sampler["max_new_tokens"] < 1:
        fail("sampler.max_new_tokens", "not a positive integer")
    for key in ("prompt_ids", "response_ids"):
        if not isinstance(r[key], list) or not all(is_int(t) and 0 <= t < vocab_size for t in r[key]):
            fail(key, f"not a list of token ids in [0, {vocab_size})")
    n = len(r["response_ids"])
    if not n:
        fail("response_ids", "empty")
    # the sampler stops at the first block boundary at least max_new_tokens past the prompt
    limit = -(-(len(r["prompt_ids"]) + sampler["max_new_tokens"]) // block_size) * block_size
    if len(r["prompt_ids"]) + n > limit:
        fail(
            "response_ids",
            f"{n} tokens, more than the record's max_new_tokens allows ({limit - len(r['prompt_ids'])})",
        )
    if len(r["prompt_ids"]) + n > max_len:
        fail("response_ids", f"prompt + response are {len(r['prompt_ids']) + n} tokens, more than {max_len}")
    if (len(r["prompt_ids"]) + n) % block_size:
        fail("response_ids", f"prompt + response do not end on a block boundary (block size {block_size})")
    if not isinstance(r["step_map"], list) or len(r["step_map"]) != n:
        fail("step_map", f"not a list as long as the response ({n})")
    if not all(is_int(s) and 0 <= s < block_size for s in r["step_map"]):
        fail("step_map", f"steps must be integers in [0, {block_size})")
    if not isinstance(r["logprobs"], list) or len(r["logprobs"]) != n:
        fail("logprobs", f"not a list as long as the response ({n})")
    if not all(is_number(x) and x <= 1e-3 for x in r["logprobs"]):  # an engine may round a little above 0
        fail("logprobs", "not all finite numbers <= 0")
    if not is_number(r["reward"]):
        fail("reward", f"{r['reward']!r} is not a finite number")


def read_torch_state(path, required):
    """A state file we wrote (dipo_state.pt, trainer_state.pt): loaded weights-only, and a dict
    with the `required` keys of the given types, or a ValueError naming what is wrong."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated, random or foreign file: torch raises many kinds
        raise ValueError(
            f"{path}: not a readable state file ({type(e).__name__}); delete it to start over"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict; delete it to start over")
    for key, kind in required.items():
        if key not in state or not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"{path}: {key}: missing or not a {kind.__name__}; delete it to start over")
    return state


# ----------------------------------------------------------------------------- one writer per run

_LOCKS = []  # this process's lock files: closing one would release its lock
TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # write_atomic's and save_checkpoint's temporary names


def lock_run(run, stage):
    """Hold runs/<run>/.lock (an exclusive flock) until the stage's main returns
    (releases_run_lock) or the process ends, so that one process at a time writes the run. A second writer fails at once, naming the holder; the kernel
    drops the lock when the holder dies, kill -9 included. Then the temporary leftovers of
    writers that died mid-write (.NAME.tmp-PID entries whose process is gone) are removed."""
    run = Path(run)
    for name in ("metrics.jsonl", "dipo_state.pt", "policy/latest", ".lock"):
        if (run / name).is_symlink():  # a write through it would land outside the run
            raise ValueError(f"{run / name}: a symlink; the files of a run may not be links")
    run.mkdir(parents=True, exist_ok=True)
    handle = open(run / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"run {run} is locked by {holder}; one writer at a time") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({stage})\n")
    handle.flush()
    _LOCKS.append(handle)
    removed = remove_leftovers(run)
    if removed:
        print(f"{stage}: removed {len(removed)} temporary leftovers of killed writers: {', '.join(removed)}")


def releases_run_lock(main):
    """Decorates a stage's main: the lock lock_run took is released when main returns or raises,
    so that a caller in the same process (a test, a notebook) can run the next stage on the run.
    A process that ends releases it anyway."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            while _LOCKS:
                _LOCKS.pop().close()

    return wrapped


def remove_leftovers(run):
    """Delete .NAME.tmp-PID files and directories under `run` whose process is not alive;
    returns their paths relative to the run."""
    removed = []
    for path in sorted(Path(run).rglob(".*.tmp-*")):
        match = TEMPORARY.fullmatch(path.name)
        if not match or process_alive(int(match.group(1))) or not (path.exists() or path.is_symlink()):
            continue  # a live writer's, or inside a leftover already removed
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(run)))
    return removed


def process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# ----------------------------------------------------------------------------- many processes


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what --dtype may name


def init_distributed(device="auto", threads=0):
    """(rank, world_size, device). Sets torch's CPU threads (0 = torch's default). Under torchrun
    (WORLD_SIZE > 1) joins the process group: nccl on CUDA, gloo on CPU; each process takes the
    GPU of its LOCAL_RANK."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, torch.device(device)
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world, torch.device(device)


def finish_distributed(world):
    """Leave the process group together: rank 0 may still be writing, and a process that leaves
    early aborts the others."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def clip_gradients(model, max_norm, what):
    """Clip the gradient norm to max_norm (0 = no clipping) and return the norm before clipping,
    as a float. Under FSDP the norm is a DTensor: full_tensor() gathers it. A non-finite norm
    raises FloatingPointError naming `what` (the step), before the optimizer can apply it."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        raise FloatingPointError(f"{what}: gradient norm {norm.item()}; nothing written for it")
    return norm.item()


def shard_model(model, compute_dtype=torch.float32):
    """FSDP2: shard every decoder layer, then the rest. Gradients are summed across processes,
    not averaged: each process's loss is already divided by the global count of its units.
    With a bfloat16 compute dtype the weights are gathered and used in bfloat16 while each
    process keeps its float32 shard (and AdamW's state) and gradients are reduced in float32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(
        model.lm_head, mp_policy=policy
    )  # its own unit: forward_layout(at=...) calls it after the model's forward
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def full_state(model, optimizer=None):
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP, so every
    process calls it. Without FSDP it is the plain state dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def load_optimizer_state(model, optimizer, optim_sd):
    """Inverse of full_state for the optimizer: every process passes the full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


if __name__ == "__main__":  # not a stage: --help prints what it holds
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
