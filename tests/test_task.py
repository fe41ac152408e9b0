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
