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
    return AdamW(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) as torch.optim.AdamW computes it
    one tensor at a time. Ours because every torch.optim optimizer imports torch._dynamo when it
    is built: 2.5 s of each dipo.py start on 2 CPU cores. `state` maps a parameter's name to
    torch's slots (step, exp_avg, exp_avg_sq), each a DTensor shard of its parameter under FSDP2;
    `lr` may be set between steps (sft.py's schedule, dipo.py's warmup)."""

    def __init__(self, model, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
        self.params = dict(model.named_parameters())  # a tied weight once, under its first name
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.state = {}

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        for name, param in self.params.items():
            if param.grad is None:
                continue
            if name not in self.state:
                zeros = torch.zeros_like(param)
                self.state[name] = {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
            slots = self.state[name]
            slots["step"] += 1
            step = slots["step"].item()
            param.mul_(1 - self.lr * self.weight_decay)
            slots["exp_avg"].lerp_(param.grad, 1 - beta1)
            slots["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (slots["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.addcdiv_(slots["exp_avg"], denom, value=-self.lr / (1 - beta1**step))

    def zero_grad(self):
        for param in self.params.values():
            param.grad = None

    def full_state_dict(self):
        """{"state": {name: slots}, "param_groups": [...]}, torch's form keyed by name (as
        torch.distributed.checkpoint writes it), every tensor whole and on the CPU. A collective
        under FSDP2 (DTensor.full_tensor), so every process calls it."""

        def whole(value):  # a DTensor shard gathered from every process
            return (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()

        state = {name: {slot: whole(v) for slot, v in slots.items()} for name, slots in self.state.items()}
        hyper = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}
        return {"state": state, "param_groups": [{**hyper, "params": list(self.params)}]}

    def load_full_state_dict(self, optim_sd):
        """The inverse of full_state_dict (every process passes the whole state, checked by
        check_optimizer_state): each process keeps its shard. The hyperparameters are this run's."""
        for name, slots in optim_sd["state"].items():
            param = self.params[name]
            self.state[name] = {"step": torch.tensor(float(slots["step"]))}
            for slot in ("exp_avg", "exp_avg_sq"):
                value = slots[slot].to(param.device, param.dtype, copy=True)  # never the caller's tensor
                if hasattr(param, "placements"):  # a DTensor (FSDP2): this process's shard, no messages
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                self.state[name][slot] = value


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
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP2, so every
    process calls it. In one process, the plain state dict (torch.distributed.checkpoint's
    import alone takes 1-2 s of a 2-core machine)."""
    optim_sd = optimizer.full_state_dict() if optimizer is not None else None
    if not torch.distributed.is_initialized():
        return {name: tensor.cpu() for name, tensor in model.state_dict().items()}, optim_sd
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model_sd, optim_sd


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
