"""Processes, sharding and the optimizer: what lets one stage run on one CPU or under
torchrun on many GPUs. Used by sft.py and dipo.py (FSDP2, AdamW, state files), and
rollout.py (processes, the gather of their records).
"""

import io
import os

import torch

from support.rundir import write_atomic

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


def gather_in_job_order(mine, world):
    """Every process's results, dealt back into job order: job k was process k % world's
    (each process took jobs[rank::world]). Every process gets the whole list."""
    if world == 1:
        return mine
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return [parts[k % world][k // world] for k in range(sum(map(len, parts)))]


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
    )  # its own unit: forward_layout(at=...) calls it after the model
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def make_optimizer(model, lr, weight_decay, grad_checkpointing, world, dtype):
    """The model in train mode, its activations recomputed in the backward if asked, sharded
    with FSDP2 under torchrun, and AdamW (betas 0.9, 0.95) over its parameters."""
    model.train()
    if grad_checkpointing:
        model.checkpointing = True  # each block runs under torch.utils.checkpoint (support/qwen3.py)
    if world > 1:
        shard_model(model, dtype)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def clip_gradients(model, max_norm, what):
    """Clip the gradient norm to max_norm (0 = no clipping) and return the norm before clipping,
    as a float. Under FSDP the norm is a DTensor: full_tensor() gathers it. A non-finite norm
    raises FloatingPointError naming `what` (the step), before the optimizer can apply it."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        raise FloatingPointError(f"{what}: gradient norm {norm.item()}; nothing written for it")
    return norm.item()


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


def check_optimizer_state(optim_sd, model, path):
    """An optimizer state (full_state's form: {"state": {name: {tensor: ...}}, "param_groups"})
    for this model: every name one of its parameters, every tensor of its parameter's shape (or
    a scalar, as Adam's step). Checked before any work, since a mismatch would fail mid-update."""
    params = dict(model.named_parameters())
    state = optim_sd.get("state") if isinstance(optim_sd, dict) else None
    if not isinstance(state, dict) or not isinstance(optim_sd.get("param_groups"), list):
        raise ValueError(f"{path}: optimizer: not an optimizer state; delete the file to start over")
    for name, slots in state.items():
        if name not in params or not isinstance(slots, dict):
            raise ValueError(f"{path}: optimizer: {name!r} is not a parameter of the model; delete the file")
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[name].shape:
                raise ValueError(
                    f"{path}: optimizer: {name}.{slot} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[name].shape)}; delete the file to start over"
                )


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


def save_torch_atomic(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())
