"""sft.py: the loss on hand-computed numbers, the noise, packing, accumulation invariance,
and the script as a subprocess (a run, a killed-and-resumed run, 2 processes, bad input)."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import sft
import support.flags
import support.model
import support.policy
from conftest import ROOT, refusal, run_here

MASK, PAD = 3, 0


def test_loss_matches_a_hand_computed_example():
    # Two masked tokens of a document with 4 response tokens and p = 0.5, batch of 1 document:
    # weight = 1 / (0.5 * 4) = 0.5; CE = ln 2 for uniform logits, -ln(3/4) for logits (ln 3, 0).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([0, 0])
    weights = torch.full((2,), 1 / (0.5 * 4 * 1))
    loss = sft.diffusion_loss(logits, targets, weights)
    assert loss.item() == pytest.approx(0.5 * (math.log(2) + math.log(4 / 3)), rel=1e-6)


def test_micro_batch_targets_weights_and_noisy_copy():
    prompt, response = [10, 11, 12, 13, 14], [20, 21, 22]  # 8 tokens = 2 blocks of 4
    masked = torch.tensor([False] * 5 + [True, False, True])
    ids, layout, rows, cols, targets, weights = sft.build_micro_batch(
        [(prompt, response)],
        [(0.25, masked)],
        block_size=4,
        mask_id=MASK,
        pad_id=PAD,
        row_len=64,
        docs_in_batch=2,
    )
    clean = prompt + response
    # noisy copy starts at the block holding the first response token (position 4)
    assert ids[0].tolist() == clean + [14, MASK, 21, MASK]
    assert layout.pos[0].tolist() == list(range(8)) + [4, 5, 6, 7]
    assert layout.copy[0].tolist() == [0] * 8 + [1] * 4
    assert cols.tolist() == [9, 11] and targets.tolist() == [20, 22] and rows.tolist() == [0, 0]
    assert torch.allclose(weights, torch.full((2,), 1 / (0.25 * 3 * 2)))


def test_prompt_never_masked_and_mask_rate_matches_p():
    g = torch.Generator().manual_seed(0)
    expected = observed = 0.0
    for _ in range(2000):
        p, masked = sft.noise_document(prompt_len=7, length=40, eps=1e-3, generator=g)
        assert 1e-3 <= p <= 1 and not masked[:7].any() and masked.any()
        expected += p * 33 + (1 - p) ** 33  # binomial mean, plus the forced token when none was drawn
        observed += masked.sum().item()
    sd = math.sqrt(2000 * 33 * 0.25)  # a loose bound on the binomial spread
    assert abs(observed - expected) < 4 * sd


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [sft.lr_factor(s, 10, 100, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(0.1)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_is_the_same_for_one_batch_or_micro_batches_of_one():
    model, tok = support.model.load_model("tiny")
    cfg = sft.Config(row_len=128)
    docs, _ = sft.load_documents(ROOT / "data/arith_sft.jsonl", tok, "", 4, 256, "skip")
    docs, positions = docs[:6], list(range(6))
    loss, *_ = sft.run_micro_batch(model, docs, positions, cfg, 6, torch.device("cpu"), torch.float32)
    loss.backward()
    whole = grads(model)
    model.zero_grad()
    for d in range(6):
        loss, *_ = sft.run_micro_batch(
            model, docs[d : d + 1], positions[d : d + 1], cfg, 6, torch.device("cpu"), torch.float32
        )
        loss.backward()
    assert torch.allclose(whole, grads(model), atol=1e-6, rtol=1e-4)


def test_documents_are_padded_to_blocks_and_overlong_ones_counted(tmp_path):
    _, tok = support.model.load_model("tiny")
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"prompt": "1+1", "response": "2"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4" * 300}]}
        )
        + "\n"
    )
    docs, overlong = sft.load_documents(data, tok, "", 4, 64, "skip")
    assert overlong == 1 and len(docs) == 1
    prompt, response = docs[0]
    assert (len(prompt) + len(response)) % 4 == 0
    assert tok.decode(prompt + response).startswith(
        "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    )
    assert response[-1] == tok.eos_token_id
    docs, overlong = sft.load_documents(data, tok, "", 4, 64, "truncate")
    assert overlong == 1 and len(docs) == 2 and len(docs[1][0]) + len(docs[1][1]) == 64


# ----------------------------------------------------------------------------- the script


def small_data(tmp_path, n=48):
    lines = (ROOT / "data/arith_sft.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_sft(args):
    return run_here(sft, ["--threads", 1, *args])


def sft_args(tmp_path, run, steps=30):
    return [
        "--data",
        small_data(tmp_path),
        "--run",
        tmp_path / run,
        "--steps",
        steps,
        "--batch-size",
        4,
        "--eval-docs",
        8,
        "--warmup-steps",
        3,
        "--row-len",
        256,
    ]


def metrics(run):
    """The logged steps (each invocation's "start" line, with its config, left out)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[0]["config"]["run"] == str(run)
    return [m for m in lines if "event" not in m]


def test_a_short_run_writes_a_checkpoint_that_loads(tmp_path):
    out = run_sft(sft_args(tmp_path, "a") + ["--log-every", 10])
    assert out.returncode == 0, out.stderr
    run = tmp_path / "a"
    step, policy = support.policy.latest_policy(run)
    assert step == 0 and policy == run / "policy" / "step_000000"
    model, _ = support.model.load_model(str(policy))
    assert model.config.block_size == 4 and model.config.instruction == ""
    lines = metrics(run)
    assert [m["step"] for m in lines if "loss" in m] == [10, 20, 30] and all(
        m["stage"] == "sft" for m in lines
    )
    assert "held_out_loss" in lines[-1]
    assert json.loads((run / "config" / "sft.json").read_text())["steps"] == 30
    again = run_sft(sft_args(tmp_path, "a"))  # an existing run is not overwritten
    assert again.returncode != 0 and "--resume" in again.stderr


def test_held_out_curve_leaves_training_alone_and_minutes_end_the_run(tmp_path):
    """--eval-every logs the held-out loss along the run without changing a weight; --minutes
    ends the run after the step that spends the budget and publishes its policy as the end of
    --steps does (demo.sh's control arm)."""
    assert run_sft(sft_args(tmp_path, "plain", steps=12)).returncode == 0
    out = run_sft(sft_args(tmp_path, "curve", steps=12) + ["--eval-every", 4])
    assert out.returncode == 0, out.stderr
    assert [m["step"] for m in metrics(tmp_path / "curve") if "held_out_acc" in m] == [4, 8, 12]
    weights = [
        load_file(tmp_path / r / "policy" / "step_000000" / "model.safetensors") for r in ("plain", "curve")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    out = run_sft(sft_args(tmp_path, "timed", steps=10**6) + ["--minutes", 1e-5, "--log-every", 1])
    assert out.returncode == 0, out.stderr
    run = tmp_path / "timed"
    assert support.policy.latest_policy(run)[0] == 0
    state = torch.load(run / "sft" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and state["seconds"] > 0
    assert [m["step"] for m in metrics(run)] == [1, 1]  # the step's line, then the held-out one


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = sft_args(tmp_path, "k", steps=40) + ["--save-every", 10]
    assert run_sft(args[:3] + [tmp_path / "ref"] + args[4:]).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sft.py"), "--threads", "1", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "k" / "sft" / "trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run never saved"
    saved = torch.load(state, weights_only=True)["step"]
    assert 10 <= saved < 40
    out = run_sft(args + ["--resume"])
    assert out.returncode == 0, out.stderr
    assert f"steps {saved} -> 40" in out.stdout
    ref = load_file(tmp_path / "ref" / "policy" / "step_000000" / "model.safetensors")
    resumed = load_file(tmp_path / "k" / "policy" / "step_000000" / "model.safetensors")
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], atol=1e-5, rtol=1e-4)
    changed = run_sft(args + ["--resume", "--lr", "0.1"])
    assert changed.returncode != 0 and "other settings" in changed.stderr


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_two_processes_give_the_same_losses_and_gradient_norms(tmp_path, dtype, rel):
    """bfloat16: autocast in one process against FSDP2's mixed precision (bf16 gathered
    weights, fp32 shards and gradient reduction) in two; equal to bf16 rounding."""
    args = sft_args(tmp_path, "one", steps=3) + ["--log-every", 1, "--eval-docs", 0, "--dtype", dtype]
    assert run_sft(args).returncode == 0
    two = args[:3] + [tmp_path / "two"] + args[4:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        torchrun + ["--", str(ROOT / "sft.py"), "--threads", "1", *map(str, two)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(one[:3], two[:3]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)
    w1 = load_file(tmp_path / "one" / "policy" / "step_000000" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "policy" / "step_000000" / "model.safetensors")
    for name in w1:
        assert w2[name].dtype == torch.float32  # the master weights stay float32
        # AdamW moves a weight by about lr per step whatever the gradient's size, so where bf16
        # rounding flips a tiny gradient the two runs can move apart by twice the summed lr
        # (2 x 4e-3 here); the losses and gradient norms above are the tight check
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5 if dtype == "float32" else 8e-3, rtol=rel)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such data file"),
        ('{"prompt": "1+1", "response": "2"}\nnot json\n', "sft.jsonl:2: not JSON"),
        (
            '{"prompt": "1+1", "response": "2"}\n{"question": "1+1"}\n',
            "sft.jsonl:2: need 'messages' or 'prompt' + 'response'",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            "sft.jsonl:1: the last message must be an assistant turn",
        ),
    ],
)
def test_bad_input_exits_non_zero_naming_file_and_line(tmp_path, content, message):
    data = tmp_path / "sft.jsonl"
    if content is not None:
        data.write_text(content)
    assert message in refusal(sft, ["--data", data, "--run", tmp_path / "r", "--steps", 1])
    assert not (tmp_path / "r" / "policy").exists()


def test_all_overlong_data_is_refused(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "response": "2" * 100}) + "\n")
    message = refusal(
        sft, ["--data", data, "--run", tmp_path / "r", "--steps", 1, "--max-len", 64, "--eval-docs", 0]
    )
    assert "no training documents left" in message and "1 overlong" in message
