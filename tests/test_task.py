"""The built-in task (data/arithmetic.py) and the character tokenizer that reads it."""

import json
import re
import subprocess
import sys
from fractions import Fraction

import support.model
from conftest import ROOT

sys.path.insert(0, str(ROOT / "data"))
import arithmetic  # noqa: E402

SPLITS = ["sft", "rl", "test"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluate(question):
    """An independent evaluator: precedence by splitting, Fractions throughout."""

    def product(term):
        parts = re.split(r"([*/])", term)
        value = Fraction(parts[0])
        for op, x in zip(parts[1::2], parts[2::2]):
            value = value * Fraction(x) if op == "*" else value / Fraction(x)
        return value

    parts = re.split(r"([+-])", "0" + question)  # "0": intermediate steps may start with a minus
    value = product(parts[0])
    for op, term in zip(parts[1::2], parts[2::2]):
        value = value + product(term) if op == "+" else value - product(term)
    return value


def test_committed_files_are_what_the_generator_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "arithmetic.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in SPLITS:
        assert (tmp_path / f"arith_{split}.jsonl").read_text() == (
            ROOT / "data" / f"arith_{split}.jsonl"
        ).read_text(), split


def test_splits_are_disjoint_and_sized():
    questions = {}
    for split in SPLITS:
        rows = read(ROOT / "data" / f"arith_{split}.jsonl")
        key = "prompt" if split == "sft" else "question"
        questions[split] = [r[key] for r in rows]
        assert len(set(questions[split])) == len(rows)
        assert all(arithmetic.split_of(q) == split for q in questions[split])
    assert not set(questions["sft"]) & set(questions["rl"])
    assert not set(questions["sft"]) & set(questions["test"])
    assert not set(questions["rl"]) & set(questions["test"])
    assert len(questions["test"]) >= 200


VARIANTS = {  # the task variants' files (only an SFT file each): the generator's flags
    "arith_scarce_sft.jsonl": ["--scarce", "1256"],
    "arith_scarce_teacher_sft.jsonl": ["--scarce", "1256", "--teacher-error", "0.5"],
}


def test_variant_files_are_what_the_generator_writes_and_hold_the_default_problems(tmp_path):
    """Each variant writes its SFT file only; its problems are the default SFT file's first ones,
    and share none with the RL and test files that its loop and evaluation use."""
    default = [row["prompt"] for row in read(ROOT / "data" / "arith_sft.jsonl")]
    answer_only = {
        row["question"] for split in ("rl", "test") for row in read(ROOT / "data" / f"arith_{split}.jsonl")
    }
    for name, flags in VARIANTS.items():
        out = tmp_path / name
        subprocess.run(
            [sys.executable, str(ROOT / "data" / "arithmetic.py"), "--out", str(out), *flags],
            check=True,
            capture_output=True,
        )
        assert [p.name for p in out.iterdir()] == [name]
        assert (out / name).read_text() == (ROOT / "data" / name).read_text(), name
        rows = read(ROOT / "data" / name)
        assert [row["prompt"] for row in rows] == default[: len(rows)] and len(rows) == 1256
        assert not {row["prompt"] for row in rows} & answer_only
        assert all(row["ground_truth_answer"] == str(evaluate(row["prompt"])) for row in rows)


def test_the_imperfect_teacher_slips_once_and_computes_on_from_there():
    """Every step of a worked solution evaluates to the same value, except in a slipped one,
    where the value changes once (the slipped operation) and the box holds the value reached.
    About half the boxes are wrong (--teacher-error 0.5); the clean variant has none."""
    wrong = 0
    for row in read(ROOT / "data" / "arith_scarce_teacher_sft.jsonl"):
        steps, boxed = row["response"].split("\n")
        values = [evaluate(step) for step in steps.split("=")]
        assert sum(a != b for a, b in zip(values, values[1:])) <= 1
        assert boxed == f"\\boxed{{{values[-1]}}}"
        wrong += str(values[-1]) != row["ground_truth_answer"]
    assert 0.44 < wrong / 1256 < 0.56
    clean = read(ROOT / "data" / "arith_scarce_sft.jsonl")
    assert all(row["response"].endswith(f"\\boxed{{{row['ground_truth_answer']}}}") for row in clean)


def test_answers_and_worked_solutions_are_right():
    for row in read(ROOT / "data" / "arith_sft.jsonl")[:2000]:
        value = evaluate(row["prompt"])
        assert row["ground_truth_answer"] == str(value)
        steps, boxed = row["response"].split("\n")
        assert boxed == f"\\boxed{{{value}}}"
        assert [evaluate(s) for s in steps.split("=")] == [value] * len(steps.split("="))


def test_fractions_option_gives_reduced_fractions():
    splits = arithmetic.generate(1, {"sft": 300, "rl": 0, "test": 0}, fractions=True)
    for question, response, answer in splits["sft"]:
        value = evaluate(question)
        assert answer == arithmetic.render_answer(value)
        assert response.endswith(f"\\boxed{{{answer}}}")
    assert any("frac" in answer for _, _, answer in splits["sft"])


def test_too_small_problem_space_is_an_error():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "arithmetic.py"),
            "--max-ops",
            "1",
            "--num-sft",
            "1000",
            "--num-rl",
            "10",
            "--num-test",
            "10",
            "--out",
            "/nonexistent-never-written",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "too small" in result.stderr


def test_tokenizer_roundtrips_every_string_of_the_task():
    tokenizer = support.model.build_char_tokenizer()
    unknown = tokenizer.token_id(support.model.EOS_TOKEN)
    texts = []
    for split in SPLITS:
        for row in read(ROOT / "data" / f"arith_{split}.jsonl"):
            question = row.get("prompt", row.get("question"))
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": row.get("response", row["ground_truth_answer"])},
            ]
            texts.append(support.model.render_chat(messages))
    for text, ids in zip(texts, tokenizer.encode(texts)):
        assert tokenizer.decode(ids) == text
        assert unknown not in ids  # no character fell back to the unknown token
    special = [tokenizer.token_id(t) for t in support.model.SPECIAL_TOKENS]
    assert tokenizer.encode(["<|im_start|>user\n<|MASK|><|im_end|>"])[0][0] == special[1]
    assert len(set(special)) == 4 and tokenizer.eos_token_id == special[0]
