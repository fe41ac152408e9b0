"""eval.py: the grader on a table of answer pairs, its time limit, the data adapters, the metrics."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

import eval as ev
from conftest import ROOT

# (boxed answer, ground truth, equivalent?) in the way MATH500 / GSM8K / AIME / OlympiadBench write them.
CASES = [
    # integers, signs, off-by-one (AIME / GSM8K)
    ("42", "42", True), ("042", "42", True), ("-7", "-7", True), ("7", "-7", False), ("41", "42", False),
    ("43", "42", False), ("0", "0", True), ("-0", "0", True), ("1000", "1,000", True), ("1,000", "1000", True),
    ("1{,}000", "1000", True), ("1,000,000", "1000000", True), ("12,345.5", "12345.5", True), ("999", "1000", False),
    ("100", "10", False), ("5.", "5", True), ("5", "5.0", True), ("5.00", "5", True), ("5.01", "5", False),
    # fractions and decimals
    ("\\frac{1}{2}", "\\frac12", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac{3}{4}", "0.75", True),
    ("1/2", "\\frac{1}{2}", True), ("0.5", "\\frac{1}{2}", True), ("0.33", "\\frac{1}{3}", False),
    ("0.333", "\\frac13", False), ("\\frac{2}{4}", "\\frac{1}{2}", True), ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", True), ("\\frac{1}{2}", "-\\frac{1}{2}", False), ("\\frac{3}{2}", "1.5", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False), ("\\frac{10}{3}", "3\\frac{1}{3}", False), (".5", "0.5", True),
    ("\\frac{7}{2}", "3.5", True), ("\\frac{22}{7}", "\\pi", False), ("3.14", "\\pi", False),
    # percentages, money, degrees, units
    ("50\\%", "50", True), ("50%", "50\\%", True), ("0.5", "50\\%", True), ("50", "5\\%", False),
    ("\\$18", "18", True), ("18", "\\$18.00", True), ("\\$ 1,200", "1200", True), ("17", "\\$18", False),
    ("90^\\circ", "90", True), ("90^{\\circ}", "90", True), ("45", "90^\\circ", False), ("30°", "30", True),
    ("5\\text{ cm}", "5", True), ("12 \\text{ inches}", "12", True), ("5\\text{ cm}^2", "5", True),
    ("10\\mbox{ meters}", "10", True), ("6", "5\\text{ cm}", False), ("3 \\text{ hours}", "3", True),
    # spacing, \left \right, text wrappers, trailing period
    ("\\left( 1, 2 \\right)", "(1,2)", True), ("1\\,000", "1000", True), ("\\!3", "3", True), ("3.", "3", True),
    ("\\text{5}", "5", True), ("\\textbf{7}", "7", True), ("\\displaystyle\\frac{1}{2}", "\\frac{1}{2}", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True), ("\\mathrm{7}", "7", True),
    # variable prefixes
    ("x = 3", "3", True), ("x=3", "3", True), ("a=-2", "-2", True), ("k = 5", "6", False), ("n=12", "12", True),
    ("y = 2x + 3", "2x+3", True), ("y=2x+3", "y = 3 + 2x", True), ("y=2x+3", "y=2x-3", False),
    # multiple choice
    ("(C)", "C", True), ("C", "(C)", True), ("\\text{(C)}", "C", True), ("\\textbf{(C)}", "C", True),
    ("(B)", "C", False), ("D", "\\text{(D)}", True), ("A", "B", False),
    # roots, pi, infinity, expressions
    ("\\sqrt{2}", "\\sqrt2", True), ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("3\\sqrt{2}", "\\sqrt{18}", True), ("\\sqrt[3]{8}", "2", True), ("2\\pi", "2 \\pi", True),
    ("\\pi", "\\pi", True), ("\\frac{\\pi}{2}", "\\frac12\\pi", True), ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}", False),
    ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False), ("6\\pi", "18.85", False),
    ("2x+1", "1+2x", True), ("x^2+2x+1", "(x+1)^2", True), ("x^2-1", "(x-1)(x+1)", True), ("x^2+1", "(x+1)^2", False),
    ("\\frac{x}{2}", "0.5x", True), ("2^{10}", "1024", True), ("2^{10}", "1000", False), ("3^4", "81", True),
    ("x^3", "x^2", False), ("\\frac{1}{x}", "x^{-1}", True), ("a+b", "b+a", True), ("a-b", "b-a", False),
    ("2(x+1)", "2x+2", True), ("\\sin x", "\\sin(x)", True), ("\\cos x", "\\sin x", False),
    ("e^{i\\pi}", "-1", True), ("\\log 8", "3\\log 2", True), ("5!", "120", True), ("4!", "25", False),
    ("|{-3}|", "3", True), ("10^{-2}", "0.01", True), ("1\\times 10^{3}", "1000", True), ("6 \\cdot 7", "42", True),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}", True), ("\\frac{1-\\sqrt{5}}{2}", "\\frac{1+\\sqrt{5}}{2}", False),
    ("2\\sqrt{2}+1", "1+\\sqrt{8}", True), ("\\theta", "\\theta", True), ("\\alpha+1", "1+\\alpha", True),
    # equations
    ("x^2+y^2=1", "y^2+x^2=1", True), ("x+y=1", "1=x+y", True), ("x+y=1", "x+y=2", False), ("2x=4", "x=2", False),
    # tuples and points: order matters
    ("(1, 2)", "(1,2)", True), ("(2, 1)", "(1, 2)", False), ("(1,2,3)", "(1,2)", False), ("(-1, 2)", "(1, 2)", False),
    ("\\left(\\frac{1}{2}, 3\\right)", "(0.5, 3)", True), ("(3, -\\frac{1}{2})", "(3,-0.5)", True), ("(0, 0)", "(0,0)", True),
    ("(\\sqrt{2}, 1)", "(\\sqrt2,1)", True), ("(2\\sqrt{2}, 1)", "(\\sqrt{8}, 1)", True), ("(1,2)", "[1,2]", False),
    # intervals: open vs closed matters
    ("[1, 3]", "[1,3]", True), ("(1, 3)", "[1, 3]", False), ("[1, 3)", "[1, 3]", False), ("(1, 3]", "(1,3]", True),
    ("(-\\infty, 2)", "(-\\infty,2)", True), ("(-\\infty, 2]", "(-\\infty, 2)", False), ("[0, \\infty)", "[0,\\infty)", True),
    ("(-\\infty, -1) \\cup (1, \\infty)", "(-\\infty,-1)\\cup(1,\\infty)", True),
    ("(-\\infty, -1] \\cup (1, \\infty)", "(-\\infty,-1)\\cup(1,\\infty)", False), ("(2, 5)", "(2, 6)", False),
    ("[\\frac{1}{2}, 1]", "[0.5, 1]", True),
    # sets and lists: order does not matter
    ("\\{1, 2\\}", "\\{2, 1\\}", True), ("\\{1, 2\\}", "\\{1, 3\\}", False), ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1, 2\\}", "\\{1, 2, 2\\}", False), ("1, 2", "2, 1", True), ("1,2", "1, 2", True), ("1, 2", "1, 2, 3", False),
    ("-1, 1", "1, -1", True), ("3, 5", "3, 4", False), ("\\frac{1}{2}, 2", "2, 0.5", True), ("1, 2", "12", False),
    ("x = 1, 2", "1,2", True),
    # matrices
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    ("\\begin{bmatrix} \\frac{1}{2} \\\\ 1 \\end{bmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", True),
    # more near misses
    ("-42", "42", False), ("4.2", "42", False), ("\\frac{1}{4}", "0.2", False), ("25\\%", "0.52", False),
    ("(1, -2)", "(-1, 2)", False), ("[0, 1)", "(0, 1]", False), ("\\{0\\}", "\\{\\}", False), ("2\\sqrt{2}", "\\sqrt{2}", False),
    ("x^2-4", "(x-2)^2", False), ("\\frac{x+1}{2}", "\\frac{x}{2}+1", False), ("2^{11}", "2048.5", False),
    ("1.4142", "\\sqrt{2}", False), ("120", "5!+1", False), ("(C)", "(D)", False), ("\\pi r^2", "2\\pi r", False),
    ("\\frac{3}{5}", "60", False), ("1, 1, 2", "1, 2, 2", False), ("y=x", "y=-x", False),
    # words and junk
    ("\\text{yes}", "\\text{Yes}", False), ("\\text{no}", "\\text{no}", True), ("", "5", False), ("foo", "5", False),
    ("5 + ", "5", False), ("\\frac{1}{0}", "1", False), ("1/00", "1", False), ("\\frac{1}{00}", "1", False), ("\\unknown{3}", "3", False), ("x", "y", False),
]


@pytest.mark.parametrize("pred,truth,expected", CASES)
def test_answer_table(pred, truth, expected):
    assert ev.grade(f"so the answer is \\boxed{{{pred}}}.", truth, timeout=10) == float(expected)


def test_table_is_large_and_balanced():
    assert len(CASES) >= 150
    assert sum(e for _, _, e in CASES) > 60 and sum(not e for _, _, e in CASES) > 60


@pytest.mark.parametrize(
    "text,answer",
    [
        ("a \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
        ("answer: \\fbox{7}", "7"),
        ("so \\boxed 5$.", "5"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
        ("\\boxed{a} and \\fbox{b}", "b"),
    ],
)
def test_extract_boxed(text, answer):
    assert ev.extract_boxed(text) == answer


def test_gsm8k_format():
    assert ev.grade("she pays 3*6=18\n#### 18", "18", answer_format="gsm8k") == 1.0
    assert ev.grade("she pays 3*6=18\n#### 18", "#### 18", answer_format="gsm8k") == 1.0
    assert ev.grade("#### 1,800", "1800", answer_format="gsm8k") == 1.0
    assert ev.grade("\\boxed{18}", "18", answer_format="gsm8k") == 0.0
    assert ev.grade("#### 18", "18") == 0.0  # boxed is the default: no box, no credit


ADVERSARIAL = [
    "2^{2^{2^{2^{2^{2}}}}}",
    "10^{10^{10}}",
    "9^{9^{9^{9}}}",
    "((((100!)!)!)!)",
    "1000!",
    "(" * 200 + "1" + ")" * 200,
    "{" * 200 + "1" + "}" * 200,
    "\\frac{" * 200 + "1" + "}{2}" * 200,
    "x+" * 50_000 + "1",
    "9" * 100_000,
    "\\sqrt{" * 300 + "2" + "}" * 300,
    "(x+1)^{100000}",
    "x^{x^{x^{x^{x}}}}-1",
]


@pytest.mark.parametrize("answer", ADVERSARIAL)
def test_adversarial_inputs_return_zero_within_the_limit(answer):
    start = time.perf_counter()
    assert ev.grade(f"\\boxed{{{answer}}}", "7", timeout=2.0) == 0.0
    assert time.perf_counter() - start < 2.0 + 1.0


def test_time_limit_works_from_a_thread_and_stops_a_slow_simplify():
    verdicts = []
    slow = "(x+1)^{200}-(x-1)^{200}"  # expands to hundreds of terms: sympy is slow here on purpose
    thread = threading.Thread(target=lambda: verdicts.append(ev.grade(f"\\boxed{{{slow}}}", "y", timeout=0.3)))
    start = time.perf_counter()
    thread.start()
    thread.join()
    assert verdicts == [0.0] and time.perf_counter() - start < 0.3 + 1.0


def test_a_crashed_check_is_retried_then_counts_as_not_equal(monkeypatch, tmp_path):
    """Seen once under heavy load: the forked child segfaulted and the grader raised EOFError."""
    crashed = tmp_path / "crashed"

    def crash_once(conn, a, b):  # runs in the forked child; os._exit: dies without a word, as a crash does
        if not crashed.exists():
            crashed.touch()
            os._exit(70)
        conn.send(True)

    def crash_always(conn, a, b):
        os._exit(70)

    monkeypatch.setattr(ev, "_child", crash_once)
    assert ev.with_time_limit("x+1", "1+x", timeout=2.0) is True and crashed.exists()
    monkeypatch.setattr(ev, "_child", crash_always)
    start = time.perf_counter()
    assert ev.with_time_limit("x+1", "1+x", timeout=2.0) is False
    assert time.perf_counter() - start < 2.0  # a crash is seen at once, not after the time limit


def test_no_eval_on_model_text():
    for attack in ["__import__('os').system('touch /tmp/pwned_dirl')", "exec('1')", "lambda: 1"]:
        assert ev.grade(f"\\boxed{{{attack}}}", "1", timeout=2) == 0.0
    with pytest.raises(ev.ParseError):
        ev.latex_to_sympy("__import__('os')")


def test_data_adapters(tmp_path):
    raw = [
        {"question": "q1", "ground_truth_answer": "1", "data_source": "dirl"},
        {"problem": "q2", "answer": "\\frac{1}{2}", "solution": "...", "subject": "Algebra"},
        {"problem": "q3", "solution": "so \\boxed{7}."},
        {"question": "q4", "answer": "she has 3 left\n#### 3"},
        {"Problem": "q5", "Answer": 204, "Year": 2024},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw))
    got = ev.load_prompts(path)
    assert [(r["question"], r["ground_truth_answer"]) for r in got] == [("q1", "1"), ("q2", "\\frac{1}{2}"), ("q3", "7"), ("q4", "3"), ("q5", "204")]
    assert got[0]["data_source"] == "dirl" and got[4]["Year"] == 2024
    fixture = ROOT / "tests" / "fixtures" / "benchmarks.json"
    assert len(ev.load_prompts(fixture)) >= 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ev.load_prompts(bad)


def rollout(prompt_id, reward, text, source="arith", finish="stop", step_map=(0, 0, 1, 2), prompt_len=4):
    return {"policy_step": 1, "prompt_id": prompt_id, "question": "q", "ground_truth_answer": "3", "data_source": source,
            "prompt_ids": list(range(prompt_len)), "response_ids": list(range(len(step_map))), "step_map": list(step_map),
            "logprobs": [0.0] * len(step_map), "text": text, "reward": reward, "finish": finish,
            "sampler": {"block_size": 4}}


def test_metrics_on_a_hand_made_file(tmp_path):
    right, wrong = "\\boxed{3}", "\\boxed{4}"
    records = (
        [rollout("a", 1.0, right)] * 3 + [rollout("a", 0.0, wrong)]  # 3 of 4 right; majority 3 -> right
        + [rollout("b", 1.0, right)] + [rollout("b", 0.0, wrong, finish="length")] * 3  # 1 of 4; majority 4 -> wrong
    )
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n" + json.dumps({"prompt_id": "c"}) + "\n")
    result = ev.evaluate_file(path)
    m = result["sources"]["arith"]
    assert m["k"] == 4 and m["prompts"] == 2
    assert m["avg@4"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == 0.5
    assert m["truncated"] == pytest.approx(3 / 8)
    assert m["tokens_per_forward"] == pytest.approx(4 / 3)  # one block, steps 0,0,1,2 -> 3 forwards
    assert result["rewards_changed"] == 0
    assert len(result["skipped_lines"]) == 2 and ":9:" in result["skipped_lines"][0] and ":10:" in result["skipped_lines"][1]
    with pytest.raises(ValueError, match="r.jsonl:9"):
        ev.evaluate_file(path, strict=True)


def test_pass_at_k_matches_closed_form():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (16, 5, 8), (5, 1, 5)]:
        expected = 1 - math.prod((n - c - i) / (n - i) for i in range(k))  # probability a k-subset has a right one
        assert ev.pass_at_k(n, c, k) == pytest.approx(expected)
    assert ev.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_tokens_per_forward_respects_absolute_block_positions():
    # prompt of 6 tokens, block 4: the first response block holds 2 tokens (positions 6, 7)
    record = rollout("a", 1.0, "", step_map=(0, 1, 0, 0, 0, 0), prompt_len=6)
    assert ev.forwards_of(record) == 2 + 1


def test_cli_regrades_side_by_side_and_writes_json(tmp_path):
    before = tmp_path / "sft.jsonl"
    after = tmp_path / "final.jsonl"
    before.write_text("\n".join(json.dumps(rollout(p, 1.0, "\\boxed{4}")) for p in "ab"))  # stale rewards: 4 != 3
    after.write_text("\n".join(json.dumps(rollout(p, 1.0, "\\boxed{3}")) for p in "ab"))
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(before), str(after), "--json", str(out), "--workers", "2"],
                            capture_output=True, text=True, check=True)
    assert "sft.jsonl" in result.stdout and "final.jsonl" in result.stdout and "avg@1" in result.stdout
    summary = json.loads(out.read_text())
    assert [s["sources"]["arith"]["avg@1"] for s in summary] == [0.0, 1.0]
    assert [s["rewards_changed"] for s in summary] == [2, 0]
    missing = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr


def test_run_log_and_plot(tmp_path):
    """--run appends held-out numbers to a run's metrics.jsonl; --plot draws them beside the
    training reward (or, without matplotlib, says what to install)."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"time": 100.0 + 10 * k, "stage": "rollout", "step": k, "reward": 0.1 * k} for k in range(3)]
    lines += [{"time": 105.0 + 10 * k, "stage": "dipo", "step": k + 1, "reward": 0.1 * k} for k in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    held_out = tmp_path / "step_000002.jsonl"
    held_out.write_text("\n".join(json.dumps({**rollout(p, 0.0, "\\boxed{3}"), "policy_step": 2}) for p in "ab"))
    subprocess.run([sys.executable, str(ROOT / "eval.py"), str(held_out), "--run", str(run)], check=True, capture_output=True)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["stage"] == "eval" and logged["step"] == 2 and logged["avg@1"] == 1.0 and logged["file"] == str(held_out)
    png = tmp_path / "curve.png"
    plot = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--plot", str(png), str(run)], capture_output=True, text=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot.returncode != 0 and "pip install matplotlib" in plot.stderr
    else:
        assert plot.returncode == 0, plot.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loop_minutes_count_rollout_and_update_only():
    def line(t, stage, **kw):
        return {"time": t, "stage": stage, **kw}
    lines = [line(0, "eval", step=0),
             line(4, "rollout", event="start"), line(10, "rollout", step=0), line(12, "dipo", event="start"), line(20, "dipo", step=1),
             line(24, "rollout", event="start"), line(36, "dipo", step=2),
             line(96, "eval", step=2),  # a held-out evaluation of 60 s: left out
             line(100, "rollout", event="start"), line(112, "dipo", step=3),
             line(1000, "rollout", event="start"), line(1012, "dipo", step=4)]  # stopped and restarted: gap capped at 2 x 4 s
    minutes = ev.loop_minutes(lines)
    assert minutes == pytest.approx({0: 0.0, 1: 20 / 60, 2: 36 / 60, 3: 52 / 60, 4: 72 / 60})
