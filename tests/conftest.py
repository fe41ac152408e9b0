import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Two torch threads on two shared cores were measured 6x slower under outside load than one.
torch.set_num_threads(int(os.environ.get("DIRL_TEST_THREADS", "1")))


def assert_same_records(got, want, atol=1e-5):
    """Two lists of rollout records are the same sample: every token, step, text and reward
    exactly, logprobs to `atol`. Float sums can be reduced in another order when the batch
    shape changes (another process count, batch size or engine), and which kernel runs
    depends on the CPU, so logprobs are equal only up to rounding there (4.8e-7 seen on an
    Intel Xeon); the tokens are drawn from the same uniforms and do not move."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert {k: v for k, v in g.items() if k != "logprobs"} == {
            k: v for k, v in w.items() if k != "logprobs"
        }
        if w["logprobs"] is None:
            assert g["logprobs"] is None
        else:
            assert len(g["logprobs"]) == len(w["logprobs"])
            assert max((abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])), default=0.0) <= atol


def run_here(stage, argv):
    """A stage's command line, run in this process, with what subprocess.run would give:
    returncode, stdout, stderr. A fresh process spends most of its seconds importing torch;
    the tests of the command line itself (tests/test_scripts.py,
    tests/test_hostile.py) start one."""
    import contextlib
    import io
    import types

    from support.flags import run_stage

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_stage(stage.main, stage.Config, stage.__doc__, [str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):  # run_stage's one error line
        err.write(code + "\n")
        code = 1
    return types.SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())


def refusal(stage, argv):
    """The one `error:` line that a refused command line of `stage` ends with (run_here)."""
    out = run_here(stage, [*argv, "--threads", 1])
    assert out.returncode == 1, out.stderr
    return out.stderr.strip().splitlines()[-1]
