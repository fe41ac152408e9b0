"""The policy steps of a run: policy/step_<k>/, policy/latest, dipo.py's state file, and the
one commit sequence that writes a new step. Used by sft.py (step 0), rollout.py (the latest
step) and dipo.py (step k+1).

A policy step is committed in an order that makes a kill at any point safe: the checkpoint,
the metrics line (a kill after it repeats the line, never loses it), dipo_state.pt (the
commit point: a later call finds the step written and only moves latest), then policy/latest.
"""

import re
import time
from pathlib import Path

from support.distributed import check_optimizer_state, read_torch_state, save_torch_atomic
from support.model import save_checkpoint
from support.rundir import append_metrics, write_atomic


def policy_dir(run, step):
    return Path(run) / "policy" / f"step_{step:06d}"


def latest_policy(run):
    """(step, dir) of the checkpoint that runs/<run>/policy/latest names."""
    latest = Path(run) / "policy" / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest}: no policy yet (run `python sft.py --run {run}` first)")
    with open(latest, "rb") as f:  # a name, not a file to read whole
        name = f.read(64).decode(errors="replace").strip()
    if not re.fullmatch(r"step_\d{6}", name) or not (latest.parent / name / "config.json").is_file():
        raise ValueError(f"{latest}: names {name!r}, which is not a checkpoint in {latest.parent}")
    return int(name[len("step_") :]), latest.parent / name


def publish_policy(run, step):
    """Point policy/latest at step `step` (its checkpoint must already be written)."""
    write_atomic(Path(run) / "policy" / "latest", f"step_{step:06d}\n")


def read_state(path):
    """dipo_state.pt, if any: the step of the last update and its optimizer state."""
    if not path.is_file():
        return None
    return read_torch_state(path, {"step": int})


def check_state(state, policy_step, model, path):
    """dipo_state.pt belongs to the latest policy: its step is the policy's (a state of another
    step is one the policy was rolled back under, or a copy from another run) and its optimizer
    state fits the model. The one other step, k+1 with that checkpoint written, is the
    interrupted commit that finish_interrupted completes before this check."""
    if state is None:
        return
    if state["step"] != policy_step:
        raise ValueError(
            f"{path}: step {state['step']}, but policy/latest is step {policy_step}; "
            f"delete the file to start the optimizer over"
        )
    if "optimizer" in state:
        check_optimizer_state(state["optimizer"], model, path)


def finish_interrupted(run, policy_step, state, rank):
    """True if a previous call saved step k+1 and was killed before moving policy/latest: that
    update is complete, so only latest moves."""
    if not (state and state["step"] == policy_step + 1):
        return False
    if not (policy_dir(run, policy_step + 1) / "config.json").is_file():
        return False
    if rank == 0:
        publish_policy(run, policy_step + 1)
        print(f"dipo: step {policy_step + 1} was already written; policy/latest now names it")
    return True


def commit_policy_step(run, step, model, tokenizer, state_dict, log, state, times=None):
    """Write policy step `step` (the module docstring's order): the weights (state_dict: the full
    weights of a sharded model, or None), the metrics line `log`, the state file `state`, then
    latest. times = (start, write start) adds the write's and the whole call's seconds to log."""
    save_checkpoint(model, tokenizer, policy_dir(run, step), state_dict=state_dict)
    if times is not None:
        log.update(time_write=time.time() - times[1], seconds=time.time() - times[0])
    append_metrics(run, log)
    save_torch_atomic(state, Path(run) / "dipo_state.pt")
    publish_policy(run, step)
