"""The pipeline as a user runs it: demo.sh (sft -> (rollout -> dipo) x 2 -> held-out rollouts ->
eval) on a minimal configuration, every file it leaves checked; then the same command killed
with SIGKILL at several moments and run again, which must end exactly where the uninterrupted
run ended; and the README's commands are the ones CI and these tests run."""

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

import support.data
from conftest import ROOT

MINIMAL = {
    "STEPS": "2",
    "EVAL_EVERY": "1",
    "THREADS": "1",
    "SEED": "3",
    "SFT_ARGS": "--steps 6 --batch-size 4 --eval-docs 4 --save-every 2 --log-every 1",
    "ROLLOUT_ARGS": "--num-prompts 3 --group-size 3 --max-new-tokens 8",
    "EVAL_ARGS": "--group-size 2 --max-new-tokens 8",
}
RECORD_KEYS = set(support.data.RECORD_KEYS) | {"question", "ground_truth_answer", "text", "finish"}


def demo(run, test_file, task="arith", **popen):
    env = {**os.environ, **MINIMAL, "RUN": str(run), "TEST": str(test_file), "TASK": task}
    return subprocess.Popen(
        ["bash", str(ROOT / "demo.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    path.write_text("\n".join((ROOT / "data/arith_test.jsonl").read_text().splitlines()[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, test_file):
    run = tmp_path_factory.mktemp("reference") / "run"
    process = demo(run, test_file)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return run, out


def lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_demo_runs_the_whole_pipeline_and_leaves_well_formed_files(reference):
    run, out = reference
    assert re.search(
        r"step_000000\.jsonl\s+step_000002\.jsonl", out
    )  # eval.py prints before and after side by side
    assert (run / "policy" / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in (run / "policy").iterdir() if p.is_dir()) == [
        "step_000000",
        "step_000001",
        "step_000002",
    ]
    assert torch.load(run / "dipo_state.pt", weights_only=True)["step"] == 2
    for k in (0, 1):
        records = [
            json.loads(line) for line in (run / "rollouts" / f"step_{k:06d}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 9 and {r["policy_step"] for r in records} == {k}
        assert all(
            RECORD_KEYS <= set(r) and len(r["step_map"]) == len(r["response_ids"]) == len(r["logprobs"])
            for r in records
        )
    for k in (0, 1, 2):
        records = [
            json.loads(line) for line in (run / "eval" / f"step_{k:06d}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 12 and {r["policy_step"] for r in records} == {k}  # 6 test problems x 2
    metrics = lines(run)
    assert all("time" in m for m in metrics)
    starts = [m for m in metrics if m.get("event") == "start"]
    assert [m["stage"] for m in starts] == [
        "sft",
        "rollout",
        "dipo",
        "rollout",
        "dipo",
    ]  # held-out rollouts are not the run's
    assert all(
        m["packages"]["torch"] and "git_commit" in m and m["config"]["run"] == str(run) for m in starts
    )
    assert [m["step"] for m in metrics if m["stage"] == "rollout" and "event" not in m] == [0, 1]
    assert [m["step"] for m in metrics if m["stage"] == "dipo" and "event" not in m] == [1, 2]
    assert [m["step"] for m in metrics if m["stage"] == "eval"] == [0, 1, 2]
    assert all(m["prompts"] == 6 and "avg@2" in m for m in metrics if m["stage"] == "eval")
    assert {p.name for p in (run / "config").iterdir()} == {"sft.json", "rollout.json", "dipo.json"}


def test_demo_teacher_task_runs_the_loop_against_the_same_minutes_of_more_sft(test_file, tmp_path):
    """TASK=teacher: SFT on the imperfect teacher's solutions, the loop, then the control (SFT
    from the same policy for the loop's own seconds) and the three held-out files side by side."""
    run = tmp_path / "teacher"
    process = demo(run, test_file, task="teacher")
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    assert re.search(r"step_000000\.jsonl\s+step_000002\.jsonl\s+more_sft\.jsonl", out)
    assert lines(run)[0]["config"]["data"] == "data/arith_scarce_teacher_sft.jsonl"
    seconds = int((run / "loop_seconds").read_text())
    assert seconds > 0
    control = tmp_path / "teacher_control"
    start = lines(control)[0]
    assert start["config"]["model"] == str(run / "policy" / "step_000000")
    assert start["config"]["minutes"] == pytest.approx(max(0.01, seconds / 60), rel=1e-4)
    assert start["config"]["data"] == "data/arith_scarce_teacher_sft.jsonl"
    held_out = (control / "eval" / "more_sft.jsonl").read_text().splitlines()
    assert len(held_out) == 12 and [m["stage"] for m in lines(control)][-1] == "eval"


def comparable(run):
    """What an interrupted run must reproduce: every record, every weight, every number."""
    files = {str(p.relative_to(run)): p.read_text() for p in sorted(run.glob("*/*.jsonl"))}
    weights = {k: load_file(run / "policy" / k / "model.safetensors") for k in ("step_000000", "step_000002")}
    skip = {"time", "seconds", "tokens_per_s", "file"}
    last = {}  # a kill just before a commit point repeats that step's line: the last one counts
    for m in lines(run):
        if "event" not in m and m["stage"] != "sft":  # sft logs its steps again after a resume
            last[m["stage"], m["step"]] = {
                k: v for k, v in m.items() if k not in skip and not k.startswith("time_")
            }
    return files, weights, last


def kill_when(process, ready, timeout=300):
    start = time.time()
    while not ready():
        assert process.poll() is None, "the pipeline finished before the kill point"
        assert time.time() - start < timeout
        time.sleep(0.02)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the random moment fell after the end
        pass
    process.wait()


def test_killed_anywhere_the_same_command_finishes_the_same_run(reference, test_file, tmp_path):
    run = tmp_path / "run"

    def holding(stage, latest="step_000000"):  # the stage holds the run's lock at that policy step
        lock, named = run / ".lock", run / "policy" / "latest"
        return (
            lock.is_file()
            and f"({stage})" in lock.read_text()
            and named.is_file()
            and named.read_text().strip() == latest
        )

    kill_points = [
        ("during sft, after a save", lambda: (run / "sft").is_dir()),
        ("during the first rollout", lambda: holding("rollout")),
        ("during the first update", lambda: holding("dipo")),
        (
            "during the second update, a random moment",
            lambda: holding("dipo", "step_000001") and time.sleep(random.uniform(0, 3)) is None,
        ),
    ]
    for name, ready in kill_points:
        kill_when(demo(run, test_file), ready)
    process = demo(run, test_file)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    got, want = comparable(run), comparable(reference[0])
    assert got[0] == want[0]  # rollouts and held-out records, byte for byte
    for step in want[1]:
        assert got[1][step].keys() == want[1][step].keys()
        assert all(torch.equal(got[1][step][k], want[1][step][k]) for k in want[1][step]), step
    assert got[2] == want[2]


def test_readme_commands_are_the_ones_ci_and_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/run" in readme and "bash demo.sh" in readme
    test_command = re.search(r"^python -m pytest.*$", ci, re.M).group(0)
    assert test_command in readme  # the README names the command CI runs
    assert "demo.sh" in (ROOT / "tests" / "test_pipeline.py").read_text()
