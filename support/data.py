"""Reading the files a stage is given, and the data stream. Used by sft.py (documents),
rollout.py (prompts, through eval.load_prompts), dipo.py (rollout records) and eval.py.

Data and run directories are copied, edited and filled by other tools, so a file is read by
one reader that names FILE:LINE in every error, and every field dipo.py reads from a rollout
record is checked before anything is written (check_rollout_record).
"""

import functools
import json
import math
from pathlib import Path

MAX_DATA_MB = 256  # the default bound on a file read whole: a wrong path (/dev/zero) must not fill memory


def read_records(path, problems=None, max_mb=MAX_DATA_MB):
    """[(line number, record)] of a JSON list or a JSONL file (blank lines skipped), read whole
    but at most `max_mb` megabytes. A missing, oversized or non-UTF-8 file, or a line that is
    not JSON, raises ValueError naming FILE:LINE; given a `problems` list, a bad line is added
    to it as "FILE:LINE: why" and skipped instead."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    limit = int(max_mb * 2**20)
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # a bound even where the size on disk says nothing
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {max_mb} MB (the flag --max-data-mb raises the bound)")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not a JSON list ({e.msg})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if problems is None:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            problems.append(f"{path}:{n}: {e}")
    return records


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
    import torch  # here, not at the top: eval.py reads its files with this module and needs no torch

    return torch.randperm(total, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


# ----------------------------------------------------------------------------- the rollout record

RECORD_KEYS = (
    "policy_step",
    "prompt_id",
    "sample",
    "prompt_ids",
    "response_ids",
    "step_map",
    "logprobs",
    "reward",
    "sampler",
)


REWARD_BOUND = 1e6  # |reward| at most this: group statistics of such numbers cannot overflow


def is_int(x):
    return type(x) is int  # not bool, not float


def is_number(x):
    return type(x) in (int, float) and math.isfinite(x)


def check_sampler(sampler, fail, block_size, mask_id):
    """The record's `sampler` field: the policy's block size and mask token, no evaluation-only
    switch, a positive max_new_tokens."""
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


def longest_sequence(prompt_len, max_new_tokens, block_size):
    """The longest prompt + response the sampler writes: it stops at the first block boundary
    at least max_new_tokens past the prompt."""
    return -(-(prompt_len + max_new_tokens) // block_size) * block_size


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
    if not is_int(r["sample"]) or r["sample"] < 0:
        fail("sample", f"{r['sample']!r} is not the index of a sample in its group")
    check_sampler(r["sampler"], fail, block_size, mask_id)
    for key in ("prompt_ids", "response_ids"):
        if not isinstance(r[key], list) or not all(is_int(t) and 0 <= t < vocab_size for t in r[key]):
            fail(key, f"not a list of token ids in [0, {vocab_size})")
    n, prompt_len = len(r["response_ids"]), len(r["prompt_ids"])
    if not n:
        fail("response_ids", "empty")
    limit = longest_sequence(prompt_len, r["sampler"]["max_new_tokens"], block_size)
    if prompt_len + n > limit:
        fail(
            "response_ids", f"{n} tokens, more than the record's max_new_tokens allows ({limit - prompt_len})"
        )
    if prompt_len + n > max_len:
        fail("response_ids", f"prompt + response are {prompt_len + n} tokens, more than {max_len}")
    if (prompt_len + n) % block_size:
        fail("response_ids", f"prompt + response do not end on a block boundary (block size {block_size})")
    if not isinstance(r["step_map"], list) or len(r["step_map"]) != n:
        fail("step_map", f"not a list as long as the response ({n})")
    if not all(is_int(s) and 0 <= s < block_size for s in r["step_map"]):
        fail("step_map", f"steps must be integers in [0, {block_size})")
    if not isinstance(r["logprobs"], list) or len(r["logprobs"]) != n:
        fail("logprobs", f"not a list as long as the response ({n})")
    if not all(is_number(x) and x <= 1e-3 for x in r["logprobs"]):  # an engine may round a little above 0
        fail("logprobs", "not all finite numbers <= 0")
    if not is_number(r["reward"]) or abs(r["reward"]) > REWARD_BOUND:
        fail("reward", f"{r['reward']!r} is not a finite number in [-{REWARD_BOUND:g}, {REWARD_BOUND:g}]")


def forwards_of(record):
    """Denoising forward passes the sampler spent: per block, last step + 1. Blocks sit at
    absolute positions, so the first one starts where the prompt's last block ends."""
    b = record.get("sampler", {}).get("block_size", 4)
    start = len(record.get("prompt_ids", []))
    last_step = {}
    for t, step in enumerate(record["step_map"]):
        block = (start + t) // b
        last_step[block] = max(last_step.get(block, 0), step)
    return sum(s + 1 for s in last_step.values())


def read_rollouts(path, policy_step, model_config, max_len):
    """Records of rollouts/step_<k>.jsonl, each checked against the policy that will be trained
    (check_rollout_record): sequences longer than max_len (0 = the model's
    max_position_embeddings) are refused, not trained. Across records: one type of prompt_id
    (5 and "5" would split a group) and each (prompt_id, sample) once (a repeated line would
    count a response twice)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no rollouts for policy step {policy_step} (run rollout.py first)")
    c, limit = model_config, max_len or model_config.max_position_embeddings
    records, seen = [], {}
    for n, r in read_records(path):
        where = f"{path}:{n}"
        check_rollout_record(r, where, policy_step, c.block_size, c.mask_token_id, c.vocab_size, limit)
        if records and type(r["prompt_id"]) is not type(records[0]["prompt_id"]):
            raise ValueError(
                f"{where}: prompt_id: {r['prompt_id']!r}, but other records' ids have another type"
            )
        key = (r["prompt_id"], r["sample"])
        if key in seen:
            raise ValueError(f"{where}: prompt_id {key[0]!r} sample {key[1]} repeats line {seen[key]}")
        seen[key] = n
        records.append(r)
    if not records:
        raise ValueError(f"{path}: empty")
    return records
