"""The run directory: atomic writes, the policy steps, metrics.jsonl, the record of each
invocation and the one-writer lock. Used by sft.py, rollout.py, dipo.py and eval.py (which
appends its metrics lines here, so it imports no torch).

    runs/<run>/config/<stage>.json     the resolved config of the last invocation of each stage
    runs/<run>/policy/step_<k>/        checkpoints; policy/latest names the newest (support/policy.py)
    runs/<run>/rollouts/step_<k>.jsonl what rollout.py sampled with policy step k
    runs/<run>/dipo_state.pt           dipo.py's optimizer and step
    runs/<run>/metrics.jsonl           one JSON line per logged step or invocation, every stage
Every file is written to a temporary sibling and moved into place (os.replace), so a killed
process never leaves a half-written file under a real name (docs/design.md, "The run directory").
"""

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
from pathlib import Path

from support.data import read_records

TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # write_atomic's and save_checkpoint's temporary names
_LOCKS = []  # this process's lock files: closing one would release its lock


def write_atomic(path, data):
    """Write str or bytes to `path` through a temporary sibling and os.replace. A failed write
    (a full disk, a file-size limit) leaves neither the temporary file nor a changed `path`,
    and its OSError names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def finite_or_none(value):
    """JSON has no NaN or infinity: such a float becomes null, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def append_metrics(run, *records):
    """Lines of metrics.jsonl, each with the wall time (loop curves, time splits). Strict JSON
    (no NaN), never through a symlink (O_NOFOLLOW refuses one), and all lines in one write: a
    write cut short (a file-size limit, a full disk) is taken back, and a fragment that a killed
    writer left at the end is first ended with a newline, so no line is ever glued to it."""
    Path(run).mkdir(parents=True, exist_ok=True)
    data = "".join(
        json.dumps(finite_or_none({"time": round(time.time(), 3), **r}), allow_nan=False) + "\n"
        for r in records
    ).encode()
    path = Path(run) / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "a symlink; the files of a run may not be links" if e.errno == errno.ELOOP else e.strerror
        raise ValueError(f"{path}: cannot append: {why}") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written < len(data):
            os.ftruncate(fd, size)
            raise OSError(errno.EFBIG, f"only {written} of {len(data)} bytes could be written")
    except OSError as e:
        raise ValueError(f"{path}: cannot append: {e.strerror}") from None
    finally:
        os.close(fd)


def read_metrics(run):
    """The records of metrics.jsonl. A broken line (a killed writer's fragment) is skipped with
    a warning naming FILE:LINE on stderr: the lines around it are whole."""
    problems = []
    records = [r for _, r in read_records(Path(run) / "metrics.jsonl", problems)]
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    return records


def record_invocation(run, stage, cfg):
    """What reproduces this call from the run dir alone: config/<stage>.json (the resolved
    config, usable as --config) and a metrics.jsonl line {"stage", "event": "start", "config",
    "git_commit", "packages"}, so every invocation stays in the history."""
    config = dataclasses.asdict(cfg)
    write_atomic(Path(run) / "config" / f"{stage}.json", json.dumps(config, indent=2))
    here = Path(__file__).resolve().parent.parent
    git = subprocess.run(
        ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=40"],
        capture_output=True,
        text=True,
    )
    packages = {}
    for name in ("torch", "tokenizers", "safetensors", "numpy", "sympy", "tqdm"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    start = {"stage": stage, "event": "start", "config": config}
    start["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    append_metrics(run, {**start, "python": sys.version.split()[0], "packages": packages})


# ----------------------------------------------------------------------------- one writer per run


def lock_run(run, stage):
    """Hold runs/<run>/.lock (an exclusive flock) until the stage's main returns
    (releases_run_lock) or the process ends, so that one process at a time writes the run. A
    second writer fails at once, naming the holder; the kernel drops the lock when the holder
    dies, kill -9 included. Then the temporary leftovers of writers that died mid-write
    (.NAME.tmp-PID entries whose process is gone) are removed."""
    run = Path(run)
    names = ["metrics.jsonl", "dipo_state.pt", ".lock", "rollouts", "config", "eval", "policy", "sft"]
    names += [f"policy/{p.name}" for p in (run / "policy").glob("*") if not (run / "policy").is_symlink()]
    for name in names:
        if (run / name).is_symlink():  # a write through it would land outside the run
            raise ValueError(f"{run / name}: a symlink; the files and folders of a run may not be links")
    for name in ("metrics.jsonl", "dipo_state.pt", "policy/latest"):
        if (run / name).exists() and not (run / name).is_file():
            raise ValueError(f"{run / name}: not a regular file")
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
