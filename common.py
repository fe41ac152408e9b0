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
import functools
import importlib.metadata
import json
import os
import re
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
    args = vars(parser.parse_args(argv))
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


def data_stream(step, per_step, total, seed):
    """The items of step `step`: positions step*per_step .. (step+1)*per_step - 1 of an endless
    stream that visits items 0..total-1 in a fresh seeded order every pass. Returns (stream
    position, item index) pairs. sft.py walks its documents this way (the position seeds a
    document's noise), rollout.py its prompts."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(i, total)
        out.append((i, _epoch_order(total, seed, epoch)[k]))
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(total, seed, epoch):
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def append_metrics(run, record):
    Path(run).mkdir(parents=True, exist_ok=True)
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        )  # wall time: loop curves, time splits


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
