"""A run directory is untrusted input: hostile rollout files, state files and checkpoints are
refused with one line on stderr and exit 1, before anything in the run is written; one writer
at a time; leftovers of killed writers are cleaned; the grader is total."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_dipo import make_run

import dipo
import eval as grader
import rollout
import sft
import support.distributed
import support.flags
import support.policy
import support.rundir
from conftest import ROOT


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("hostile") / "base")
    support.distributed.save_torch_atomic({"step": 0}, run / "dipo_state.pt")  # an earlier update's state
    return run


def snapshot(run):
    """Every file and link in the run's folder and beside it (where a symlinked folder of the
    run points), the lock file aside."""
    entries = {}
    for path in sorted(run.parent.rglob("*")):
        if path.name == ".lock":
            continue
        entries[path] = (
            os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
        )
    return entries


def rollouts(run):
    return run / "rollouts" / "step_000000.jsonl"


def edit_records(edit):
    """A case that rewrites every record of the rollout file with edit(record) -> record."""

    def apply(run):
        lines = rollouts(run).read_text().splitlines()
        rollouts(run).write_text("".join(json.dumps(edit(json.loads(line))) + "\n" for line in lines))

    return apply


def edit_first(field, value):
    def edit(r):
        if isinstance(value, tuple):  # (index, element): one element of a list field
            r[field][value[0]] = value[1]
        else:
            r[field] = value
        return r

    return edit_records(edit)


def write(name, data):
    def apply(run):
        (run / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return apply


def torch_file(name, obj):
    def apply(run):
        torch.save(obj, run / name)

    return apply


def long_response(run):
    r = json.loads(rollouts(run).read_text().splitlines()[0])
    r["response_ids"] = [5] * (6000 - len(r["prompt_ids"]) % 4)
    r["step_map"], r["logprobs"] = [0] * len(r["response_ids"]), [-1.0] * len(r["response_ids"])
    r["sampler"]["max_new_tokens"] = 10**6
    rollouts(run).write_text(json.dumps(r) + "\n")


def symlinked_metrics(run):
    outside = run.parent / f"{run.name}-outside.jsonl"
    outside.write_text("")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)


def config_vocab(run):
    path = run / "policy" / "step_000000" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 7}))


def to_outside(name):
    """A folder of the run moved outside it and left as a symlink: writes would land there."""

    def apply(run):
        outside = run.parent / f"{run.name}-outside-{name.replace('/', '-')}"
        if (run / name).exists():
            shutil.move(run / name, outside)
        else:
            outside.mkdir()
        (run / name).symlink_to(outside, target_is_directory=True)

    return apply


def edit_weights(edit):
    def apply(run):
        from safetensors.torch import load_file, save_file

        path = run / "policy" / "step_000000" / "model.safetensors"
        weights = load_file(path)
        edit(weights)
        save_file(weights, path, metadata={"format": "pt"})

    return apply


def nan_weight(weights):
    weights["model.norm.weight"][3] = math.nan


def optimizer_state(name, shape):
    slots = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
    return {"step": 0, "optimizer": {"state": {name: slots}, "param_groups": [{"params": [name]}]}}


def duplicate_line(run):
    lines = rollouts(run).read_text().splitlines(keepends=True)
    rollouts(run).write_text("".join(lines + lines[:1]))


def first_prompt_id_as_int(run):
    lines = rollouts(run).read_text().splitlines()
    first = json.loads(lines[0])
    first["prompt_id"] = int(first["prompt_id"])
    rollouts(run).write_text(
        "".join(json.dumps(r) + "\n" for r in [first] + [json.loads(x) for x in lines[1:]])
    )


CASES = {  # name: (how the run is broken, what the error line says)
    "reward is a string": (edit_first("reward", "1"), "reward"),
    "reward is null": (edit_first("reward", None), "reward"),
    "reward is NaN": (
        lambda run: rollouts(run).write_text(
            rollouts(run).read_text().replace('"reward": 0.0', '"reward": NaN')
        ),
        "reward",
    ),
    "reward is infinite": (
        lambda run: rollouts(run).write_text(
            rollouts(run).read_text().replace('"reward": 1.0', '"reward": Infinity')
        ),
        "reward",
    ),
    "a step is a string": (edit_first("step_map", (0, "0")), "step_map"),
    "a step is 1.5": (edit_first("step_map", (0, 1.5)), "step_map"),
    "a step is past the block": (edit_first("step_map", (0, 4)), "step_map"),
    "a step is negative": (edit_first("step_map", (0, -1)), "step_map"),
    "step_map is short": (edit_records(lambda r: {**r, "step_map": r["step_map"][:-1]}), "step_map"),
    "a logprob is a string": (edit_first("logprobs", (0, "-1")), "logprobs"),
    "a logprob is NaN": (edit_first("logprobs", (0, math.nan)), "logprobs"),
    "a logprob is positive": (edit_first("logprobs", (0, 0.5)), "logprobs"),
    "sampler is a list": (edit_first("sampler", [4, 3]), "sampler"),
    "another block size": (
        edit_records(lambda r: {**r, "sampler": {**r["sampler"], "block_size": 8}}),
        "block size 8",
    ),
    "sampled with --min-new-tokens": (
        edit_records(lambda r: {**r, "sampler": {**r["sampler"], "min_new_tokens": 128}}),
        "evaluation-only",
    ),
    "sampled with --ban-eos": (
        edit_records(lambda r: {**r, "sampler": {**r["sampler"], "ban_eos": True}}),
        "evaluation-only",
    ),
    "token id past the vocabulary": (edit_first("response_ids", (0, 10**6)), "response_ids"),
    "negative prompt token id": (edit_first("prompt_ids", (0, -3)), "prompt_ids"),
    "token id is a float": (edit_first("response_ids", (0, 5.0)), "response_ids"),
    "token id is a bool": (edit_first("response_ids", (0, True)), "response_ids"),
    "response past max_new_tokens": (
        edit_records(lambda r: {**r, "sampler": {**r["sampler"], "max_new_tokens": 1}}),
        "max_new_tokens",
    ),
    "6,000-token response": (long_response, "more than 2048"),
    "stale policy step": (edit_first("policy_step", 5), "stale rollouts"),
    "policy step is a string": (edit_first("policy_step", "0"), "policy_step"),
    "prompt_id is a list": (edit_first("prompt_id", [1]), "prompt_id"),
    "a key is missing": (
        edit_records(lambda r: {k: v for k, v in r.items() if k != "logprobs"}),
        "missing keys",
    ),
    "a record is a list": (lambda run: rollouts(run).write_text("[1, 2]\n"), "not a JSON object"),
    "a partial line": (lambda run: rollouts(run).write_text(rollouts(run).read_text()[:-40]), "not JSON"),
    "an empty file": (lambda run: rollouts(run).write_text("\n"), "empty"),
    "no rollouts": (lambda run: rollouts(run).unlink(), "no rollouts"),
    "dipo_state.pt is empty": (write("dipo_state.pt", b""), "dipo_state.pt"),
    "dipo_state.pt is random": (write("dipo_state.pt", os.urandom(256)), "dipo_state.pt"),
    "dipo_state.pt holds a list": (torch_file("dipo_state.pt", [1, 2]), "dipo_state.pt"),
    "dipo_state.pt step is a string": (torch_file("dipo_state.pt", {"step": "1"}), "step"),
    "dipo_state.pt optimizer is a list": (
        torch_file("dipo_state.pt", {"step": 0, "optimizer": []}),
        "optimizer",
    ),
    "config.json vocab_size disagrees": (config_vocab, "is (100, 128), the config says (107, 128)"),
    "latest names no checkpoint": (write("policy/latest", "step_000009\n"), "not a checkpoint"),
    "metrics.jsonl is a symlink": (symlinked_metrics, "symlink"),
    "a record repeated": (duplicate_line, "repeats line 1"),
    "prompt_id mixes 5 and '5'": (first_prompt_id_as_int, "another type"),
    "sample is missing": (edit_records(lambda r: {k: v for k, v in r.items() if k != "sample"}), "sample"),
    "sample is negative": (edit_first("sample", -1), "sample"),
    "reward is 1e308": (edit_first("reward", 1e308), "reward"),
    "rollouts are not UTF-8": (write("rollouts/step_000000.jsonl", b'{"a": "\xff"}\n'), "not UTF-8"),
    "rollouts are a folder": (
        lambda run: (rollouts(run).unlink(), rollouts(run).mkdir()),
        "not a regular file",
    ),
    "dipo_state.pt of a later step": (torch_file("dipo_state.pt", {"step": 3}), "policy/latest is step 0"),
    "dipo_state.pt of other shapes": (
        torch_file("dipo_state.pt", optimizer_state("model.norm.weight", (3, 3))),
        "has shape (3, 3)",
    ),
    "dipo_state.pt of another model": (
        torch_file("dipo_state.pt", optimizer_state("model.layers.9.mlp.up_proj.weight", (3,))),
        "not a parameter",
    ),
    "model.safetensors truncated": (
        lambda run: write(
            "policy/step_000000/model.safetensors",
            (run / "policy/step_000000/model.safetensors").read_bytes()[:5000],
        )(run),
        "not a readable safetensors file",
    ),
    "a NaN weight": (edit_weights(nan_weight), "model.norm.weight holds non-finite values"),
    "config.json is not JSON": (write("policy/step_000000/config.json", "{"), "not a JSON config"),
    "a weight is missing": (
        edit_weights(lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
        "weights missing: model.layers.1.mlp.up_proj.weight",
    ),
    "an unknown weight": (
        edit_weights(lambda w: w.update(extra=torch.zeros(2))),
        "weights unexpected: extra",
    ),
    "block_size is negative": (
        lambda run: (run / "policy/step_000000/config.json").write_text(
            json.dumps({**json.loads((run / "policy/step_000000/config.json").read_text()), "block_size": -4})
        ),
        "block_size -4",
    ),
    "dipo_state.pt is a folder": (
        lambda run: ((run / "dipo_state.pt").unlink(), (run / "dipo_state.pt").mkdir()),
        "not a regular file",
    ),
    "rollouts/ is a symlink": (to_outside("rollouts"), "symlink"),
    "config/ is a symlink": (to_outside("config"), "symlink"),
    "policy/step_000001 is a symlink": (to_outside("policy/step_000001"), "symlink"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_run_is_refused_in_one_line_and_nothing_is_written(case, base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    breaks, says = CASES[case]
    breaks(run)
    before = snapshot(run)
    started = time.time()
    with pytest.raises(SystemExit) as exit:
        support.flags.run_stage(dipo.main, dipo.Config, dipo.__doc__, ["--run", str(run), "--threads", "1"])
    assert time.time() - started < 5  # refused, not trained (the 6,000-token case too)
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message and says in message, message
    assert snapshot(run) == before
    assert "Traceback" not in capsys.readouterr().err


def test_the_long_response_is_refused_in_bounded_memory(base, tmp_path):
    """6,000 response tokens once took dipo.py past 6.8 GB: now refused before any forward."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    long_response(run)
    code = (
        "import re, sys, time; sys.path.insert(0, '.'); import support.flags, dipo; t = time.time()\n"
        f"try: support.flags.run_stage(dipo.main, dipo.Config, '', ['--run', {str(run)!r}, '--threads', '1'])\n"
        "except SystemExit as e:\n"
        "    peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "    print(time.time() - t, peak, e.code)"
    )  # VmHWM: this process's peak; ru_maxrss would count the parent's size at fork
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    seconds, peak_kb, message = out.stdout.split(" ", 2)
    assert float(seconds) < 5 and int(peak_kb) < 1024**2 and "more than 2048" in message, out.stdout


def test_one_writer_at_a_time_and_a_killed_holder_frees_the_run(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import support.rundir, time; support.rundir.lock_run({str(run)!r}, 'dipo'); time.sleep(120)",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 60
        while f"pid {holder.pid}" not in ((run / ".lock").read_text() if (run / ".lock").exists() else ""):
            assert time.time() < deadline and holder.poll() is None
            time.sleep(0.05)
        before = snapshot(run)
        with pytest.raises(SystemExit) as exit:
            support.flags.run_stage(dipo.main, dipo.Config, "", ["--run", str(run), "--threads", "1"])
        assert f"is locked by pid {holder.pid} (dipo)" in str(exit.value.code)
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert dipo.main(dipo.Config(run=str(run), threads=1)) == 0  # the kernel dropped the dead holder's lock
    assert support.policy.latest_policy(run)[0] == 1


def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is not alive
    (run / "policy" / f".step_000001.tmp-{dead.pid}").mkdir()
    (run / "policy" / f".step_000001.tmp-{dead.pid}" / "model.safetensors").write_bytes(b"half")
    (run / f".dipo_state.pt.tmp-{dead.pid}").write_bytes(b"half")
    (run / f".metrics.jsonl.tmp-{os.getpid()}").write_bytes(b"ours, alive")
    assert dipo.main(dipo.Config(run=str(run), threads=1)) == 0
    assert "removed 2 temporary leftovers" in capsys.readouterr().out
    assert sorted(p.name for p in run.rglob("*.tmp-*")) == [f".metrics.jsonl.tmp-{os.getpid()}"]


def test_metrics_never_hold_nan(tmp_path):
    support.rundir.append_metrics(
        tmp_path, {"stage": "x", "a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}}
    )

    def reject(constant):
        raise ValueError(constant)

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=reject)
    assert line["a"] is None and line["b"] == [None, 1.0] and line["c"] == {"d": None}


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{1}", 1),
        (None, "1"),
        (r"\boxed{1}", None),
        ([r"\boxed{1}"], ["1"]),
        (rb"\boxed{1}", b"1"),
        ("x" * 50_000_000 + r"\boxed{1}", "1"),
        (r"\boxed{" * 50_000_000, "1"),
        (r"\boxed{" + "(" * 1000 + "1" + ")" * 1000 + "}", "(" * 1000 + "1" + ")" * 1000),
        (r"\boxed{" + "{" * 1000 + "1" + "}" * 1000 + "}", "1"),
        (r"\boxed{1}", "\\frac{" * 1000 + "1" + "}" * 1000),
    ],
    ids=[
        "int gold",
        "None",
        "None gold",
        "lists",
        "bytes",
        "50 MB",
        "50 MB of open boxes",
        "deep parens",
        "deep braces",
        "deep gold",
    ],
)
def test_the_grader_is_total(response, gold):
    started = time.time()
    assert grader.grade(response, gold) in (0.0, 1.0)
    assert time.time() - started < grader.DEFAULT_TIMEOUT + 1


def test_integer_golds_become_strings_where_prompts_are_loaded(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1 + 1?", "ground_truth_answer": 2}) + "\n")
    assert grader.load_prompts(path) == [(1, {"question": "1 + 1?", "ground_truth_answer": "2"})]


def prompt_file(name, *records, raw=None):
    def apply(run):
        path = run.parent / name
        path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records).encode())
        return ["--data", str(path)]

    return apply


def huge_logits(weights):
    weights["lm_head.weight"].fill_(3e38)  # finite weights whose logits overflow to infinity


def then(edit, argv):
    def apply(run):
        edit(run)
        return argv

    return apply


STAGE_CASES = {  # name: (stage, how the input is broken -> extra flags, what the error line says)
    "rollout: a prompt longer than the model": (
        rollout,
        prompt_file(
            "long.jsonl",
            {"question": "1+1=?", "ground_truth_answer": "2"},
            {"question": "9" * 3000, "ground_truth_answer": "9"},
        ),
        "long.jsonl:2: the prompt is",
    ),
    "rollout: a gold that is null": (
        rollout,
        prompt_file("null.jsonl", {"question": "1+1=?", "ground_truth_answer": None}),
        "null.jsonl:1",
    ),
    "rollout: no prompts": (rollout, prompt_file("empty.jsonl", raw=b"\n"), "no prompts"),
    "rollout: --data is a device": (rollout, lambda run: ["--data", "/dev/zero"], "not a regular file"),
    "rollout: --data past --max-data-mb": (
        rollout,
        lambda run: (
            prompt_file("big.jsonl", *[{"question": "1+1=?", "ground_truth_answer": "2"}] * 5000)(run)
            + ["--max-data-mb", "0.1"]
        ),
        "larger than 0.1 MB",
    ),
    "rollout: --data not UTF-8": (
        rollout,
        prompt_file("latin.jsonl", raw=b'{"question": "\xe9"}\n'),
        "latin.jsonl:1: not UTF-8",
    ),
    "rollout: --config is a device": (rollout, lambda run: ["--config", "/dev/zero"], "--config /dev/zero"),
    "rollout: a NaN weight": (rollout, then(edit_weights(nan_weight), []), "holds non-finite values"),
    "rollout: logits overflow": (rollout, then(edit_weights(huge_logits), []), "non-finite logits"),
    "rollout: rollouts/ is a symlink": (rollout, then(to_outside("rollouts"), []), "symlink"),
    "rollout: config/ is a symlink": (rollout, then(to_outside("config"), []), "symlink"),
    "sft: --data is a device": (
        sft,
        lambda run: ["--data", "/dev/zero", "--run", "NEW"],
        "not a regular file",
    ),
    "sft: --data past --max-data-mb": (
        sft,
        lambda run: [
            "--data",
            str(ROOT / "data" / "arith_sft.jsonl"),
            "--max-data-mb",
            "0.5",
            "--run",
            "NEW",
        ],
        "larger than 0.5 MB",
    ),
    "sft: --model with a NaN weight": (
        sft,
        then(edit_weights(nan_weight), ["--model", "POLICY", "--run", "NEW"]),
        "holds non-finite values",
    ),
    "sft: --resume with a state of other shapes": (sft, "resume", "has shape (3, 3)"),
}


def sft_resume_state(run):
    """An sft/ save whose optimizer state has the wrong shapes, saved with the same settings."""
    shutil.copytree(support.policy.policy_dir(run, 0), run / "sft")
    config = dataclasses.asdict(sft.Config(run=str(run), threads=1, resume=True))
    state = {**optimizer_state("model.norm.weight", (3, 3)), "step": 1, "config": config}
    torch.save(state, run / "sft" / "trainer_state.pt")
    return ["--resume"]


@pytest.mark.parametrize("case", STAGE_CASES)
def test_hostile_stage_inputs_are_refused_in_one_line_and_nothing_is_written(case, base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    stage, breaks, says = STAGE_CASES[case]
    argv = sft_resume_state(run) if breaks == "resume" else breaks(run)
    argv = [str(support.policy.policy_dir(run, 0)) if a == "POLICY" else a for a in argv]
    if "NEW" in argv:  # a fresh run for sft, made before the snapshot
        (tmp_path / "new").mkdir()
        argv = [str(tmp_path / "new") if a == "NEW" else a for a in argv]
    else:
        argv = ["--run", str(run), *argv]
    if stage is rollout:
        argv += ["--force", "--num-prompts", "1", "--group-size", "1", "--max-new-tokens", "8"]
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit:
        support.flags.run_stage(stage.main, stage.Config, "", [*argv, "--threads", "1"])
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message and says in message, message
    assert snapshot(run) == before
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["dipo.py", "rollout.py", "sft.py"])
def test_on_the_command_line_bad_input_is_one_line_on_stderr(stage, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    if stage == "dipo.py":
        edit_first("step_map", (0, 1.5))(run)
        flags = []
    elif stage == "rollout.py":
        flags = ["--data", str(tmp_path / "missing.jsonl"), "--force"]
    else:
        (run / "sft").mkdir()
        (run / "sft" / "trainer_state.pt").write_bytes(b"not a state")
        flags = ["--resume"]

    def files():
        return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}

    before = files()
    out = subprocess.run(
        [sys.executable, stage, "--run", str(run), "--threads", "1", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, (
        out.stderr
    )
    assert files() == before  # no config, no metrics line, no weights


def test_an_append_after_a_half_written_line_starts_a_line_of_its_own(tmp_path, capsys):
    support.rundir.append_metrics(tmp_path, {"stage": "a", "n": 1}, {"stage": "b", "n": 2})
    path = tmp_path / "metrics.jsonl"
    os.truncate(path, path.stat().st_size - 10)  # a writer killed mid-line
    support.rundir.append_metrics(tmp_path, {"stage": "c", "n": 3})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["stage"] == "c"
    assert [r["stage"] for r in support.rundir.read_metrics(tmp_path)] == ["a", "c"]
    assert f"warning: skipped {path}:2:" in capsys.readouterr().err


def test_an_append_past_the_file_size_limit_writes_nothing(tmp_path):
    support.rundir.append_metrics(tmp_path, {"stage": "a"})
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes()
    code = (
        "import resource, sys; sys.path.insert(0, '.'); import support.rundir\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, resource.RLIM_INFINITY))\n"
        f"support.rundir.append_metrics({str(tmp_path)!r}, {{'stage': 'b', 'pad': 'x' * 600}})"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and f"{path}: cannot append" in out.stderr, out.stderr
    assert path.read_bytes() == before  # no half line
    support.rundir.append_metrics(tmp_path, {"stage": "c"})
    assert [r["stage"] for r in support.rundir.read_metrics(tmp_path)] == ["a", "c"]


def test_dipo_under_a_file_size_limit_fails_in_one_line_and_the_next_run_succeeds(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    command = f"ulimit -f 64; exec {sys.executable} dipo.py --run {run} --threads 1"
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
    last = out.stderr.splitlines()[-1]  # after the update's progress bar
    assert out.returncode == 1 and last.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    assert "step_000001: " in last and "File too large" in last
    assert not list(run.rglob("*.tmp-*")) and not support.policy.policy_dir(run, 1).exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # whole lines only (the start line is one)
    assert dipo.main(dipo.Config(run=str(run), threads=1)) == 0
    assert support.policy.latest_policy(run)[0] == 1
