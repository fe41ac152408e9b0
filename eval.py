"""eval.py - grade math answers, and summarise rollout files (avg@k, pass@k, maj@k).

The grader is what rollout.py calls for rewards: `grade(response, ground_truth)` returns
1.0 or 0.0. It finds the response's final answer (the last \\boxed{...} or \\fbox{...};
`#### 42` with --answer-format gsm8k; no answer, no credit) and hands it to Math-Verify, the
checker DiRL, TRL, open-r1 and lighteval use: `parse` extracts and turns LaTeX into sympy,
`verify(gold, prediction)` decides equivalence (numbers, expressions, equations, sets,
intervals, tuples, matrices). The gold is wrapped in $...$, as Math-Verify's README does.

What we add around Math-Verify (docs/design.md, "The grader", says why each is there and
how model text is kept away from Python's eval):
  * a deadline, a memory cap and cheap refusals of costly answers (support/sandbox.py): every
    check runs in a forked child, and a check that misses the deadline counts as not equal;
  * only the text around the last box is parsed (parse_input);
  * a thin layer where Math-Verify is wrong on answers people write (NORMALISE), each rule a
    text substitution before parse with a test that fails without it, and one setting:
    allow_set_relation_comp, so that `x < 3` equals the gold (-\\infty, 3);
  * a hedged box ("or possibly 4", "maybe") gets no credit (HEDGED);
  * a gold of any JSON type: numbers compared as numbers, lists as lists (gold_text);
  * maj@k votes on the string form of the parsed prediction, so 1/2 and \\frac{1}{2} agree;
  * plain integers on both sides (the built-in arithmetic task) are compared without a child.

Reads  rollout JSONL files (the records rollout.py writes: prompt_id, question,
       ground_truth_answer, response_ids, step_map, text, reward, finish, sampler;
       `data_source` if present) and re-grades every `text`.
Writes a table per file and per data source on stdout (several files side by side) and,
       with --json OUT, the same numbers as JSON.

Usage:  python eval.py runs/demo/eval/sft.jsonl runs/demo/eval/final.jsonl [--json OUT] [--workers 2]
                [--run RUN]
        (the learning curves of runs: python benchmarks/curves.py OUT.png RUN...)

How this differs from the paper: DiRL checks the last \\boxed{} with math-verify (30 s
timeout, signal-based) or a sympy LaTeX comparison; we use Math-Verify behind our own
deadline (3 s), memory cap and refusals, with the thin layer above, and re-score old
rollouts when the grader changes.
"""

import json
import math
import multiprocessing
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from support import rundir
from support.data import MAX_DATA_MB, forwards_of, read_records
from support.flags import flag, run_stage
from support.sandbox import MAX_ANSWER_CHARS, Sandbox, too_costly

DEFAULT_TIMEOUT = 3.0  # seconds per check; real answers need well under 1 s
MAX_TAIL_CHARS = 500  # text around the last box that parse sees: the box's line, at most this either side


@dataclass
class Config:
    files: list = flag([], "rollout JSONL files (written by rollout.py)", positional=True)
    json: str = flag("", "also write the numbers as JSON to this file ('' = off)")
    run: str = flag(
        "", 'also append the numbers to RUN/metrics.jsonl as {"stage": "eval"} lines (\'\' = off)'
    )
    workers: int = flag(1, "grading processes", low=1)
    timeout: float = flag(DEFAULT_TIMEOUT, "seconds allowed per check", above=0)
    answer_format: str = flag(
        "boxed", "where the answer is: the last \\boxed{} or '#### x'", choices=("boxed", "gsm8k")
    )
    strict: bool = flag(False, "stop at the first bad line instead of skipping it")


# ----------------------------------------------------------------------------- extraction

_BRACE = re.compile(r"[{}]")


def last_box(text):
    """(start, end, content) of the last \\boxed{...} / \\fbox{...} (nested braces handled, a
    space before the brace allowed), or of `\\boxed 5`; None without a complete box."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    brace = i + len(text[i : i + 8]) - len(text[i : i + 8].lstrip())
    if text[brace : brace + 1] != "{":
        word = re.match(r" ([^\s$]+)", text[i : i + MAX_ANSWER_CHARS + 1])  # \boxed 5
        return (start, i + word.end(), word.group(1)) if word else None
    depth = 0
    for match in _BRACE.finditer(text, brace):  # the regex skips everything but braces, in C
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return start, match.end(), text[brace + 1 : match.start()]
    return None  # unbalanced: no answer


def extract_gsm8k(text):
    match = re.search(r"####\s*([^\n]+)", text)
    return match.group(1).strip() if match else None


def extract_answer(text, answer_format="boxed"):
    """The final answer string, or None."""
    if answer_format == "gsm8k":
        return extract_gsm8k(text)
    box = last_box(text)
    return box[2] if box else None


def as_latex(answer):
    """An answer as Math-Verify's README passes a gold: on one line, in $...$."""
    return "$" + re.sub(r"(?<!\\)\$", "", answer).replace("\n", " ") + "$"


def parse_input(text, answer_format="boxed"):
    """(what Math-Verify's parse sees, the final answer) for a response, or None. For boxed
    answers: the tail from the line of the last box (so that `\\boxed{-2} and \\boxed{1}`
    stays a list), at most MAX_TAIL_CHARS before and after it; for GSM8K: the answer in $...$."""
    if answer_format == "gsm8k":
        answer = extract_gsm8k(text)
        return None if answer is None else (as_latex(answer), answer)
    box = last_box(text)
    if box is None:
        return None
    start = max(text.rfind("\n", 0, box[0]) + 1, box[0] - MAX_TAIL_CHARS)
    return text[start : box[1] + MAX_TAIL_CHARS], box[2]


# ----------------------------------------------------------------------------- the thin layer


def repeating_decimal(integer, digits, period):
    """The exact fraction of integer.digits with the last `period` digits repeating, as LaTeX."""
    prefix, repeat = digits[: len(digits) - period], digits[len(digits) - period :]
    value = int(integer or 0) + Fraction(
        int(prefix + repeat) - int(prefix or 0), 10 ** len(prefix) * (10**period - 1)
    )
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def dotted_decimal(match):
    """0.333\\ldots -> 1/3, 0.1666... -> 1/6: the shortest tail that shows at least twice
    repeats; with no repeat shown the text is left as it is."""
    integer, digits = match.group(1), match.group(2)
    for period in range(1, len(digits) // 2 + 1):
        if digits[-2 * period : -period] == digits[-period:]:
            return repeating_decimal(integer, digits, period)
    return match.group(0)


NORMALISE = [  # (pattern, replacement): where Math-Verify is wrong on answers people write
    (re.compile(r"\\varnothing"), r"\\emptyset"),  # the lexer knows only \emptyset as the empty set
    (re.compile(r"°"), r"^\\circ"),  # the unicode degree sign is not in the grammar
    (re.compile(r"(?<=\d)(?:\\[,;: ]|~| )(?=\d{3}(?!\d))"), ""),  # 1\,000 / 1 000: read as a product
    (  # \text{12 cm} -> 12 \text{cm}: a number inside \text is read as one symbol
        re.compile(r"\\(?:text|textnormal|mbox|mathrm)\{\s*(-?\d+(?:\.\d+)?)\s+([a-zA-Z][a-zA-Z ]*)\}"),
        r"\1 \\text{\2}",
    ),
    (  # \boxed{5.} -> \boxed{5}: sentence punctuation inside the box (not the \, of a thin space)
        re.compile(r"(\\boxed\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*?)(?<![.\\])[.,;]\s*\}"),
        r"\1}",
    ),
    (re.compile(r"∞"), r"\\infty "),  # the unicode infinity is not in the grammar
    (  # \boxed{5 = x} -> \boxed{x = 5}: the value is taken from an equation's right side only
        re.compile(r"(\\boxed\s*\{)([^{}=]*(?:\{[^{}]*\}[^{}=]*)*)=\s*([a-zA-Z])\s*\}"),
        r"\1\3 = \2}",
    ),
    (  # 3.2e5 -> 3.2\times 10^{5}: e-notation is read as 3.2 * e * 5
        re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d{1,3})(?![\w.])"),  # a short exponent only
        r"\1\\times 10^{\2}",
    ),
    (  # 0.1\overline{6} -> \frac{1}{6}: an overline is read as a symbol
        re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}"),
        lambda m: repeating_decimal(m.group(1), m.group(2) + m.group(3), len(m.group(3))),
    ),
    (  # 0.333\ldots -> \frac{1}{3}: the dots are dropped and the decimal read as it stands
        re.compile(r"(\d*)\.(\d+)\s*(?:\\ldots|\\dots|\\cdots|\.\.\.)"),
        dotted_decimal,
    ),
]
HEDGED = re.compile(r"\b(?:possibly|maybe|perhaps|probably)\b|\(\s*or\b", re.IGNORECASE)  # 3 \text{ (or 4)}


def normalise(text):
    for pattern, replacement in NORMALISE:
        text = pattern.sub(replacement, text)
    return text


# ----------------------------------------------------------------------------- the check


def verify_in_child(gold_text, pred_text):
    """(equal, key): Math-Verify's parse and verify with its own timeouts off (the child's
    deadline applies); key is the string form of the parsed prediction, for maj@k."""
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    gold = parse(gold_text, extraction_config=config, parsing_timeout=None)
    pred = parse(pred_text, extraction_config=config, parsing_timeout=None)
    if not gold or not pred:
        return False, None
    equal = verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=None)
    return bool(equal), str(pred[0])[:MAX_ANSWER_CHARS]


CHECKER = Sandbox(verify_in_child)
_INTEGER = re.compile(r"\s*-?\d{1,100}\s*")


def check(gold, response, timeout=DEFAULT_TIMEOUT, answer_format="boxed"):
    """(reward 1.0 or 0.0, key of the extracted answer or None)."""
    found = parse_input(response, answer_format)
    if answer_format == "gsm8k" and "####" in gold:
        gold = extract_gsm8k(gold) or gold
    if found is None or not gold.strip():
        return 0.0, None
    pred_text, answer = found
    if HEDGED.search(answer) and not HEDGED.search(gold):  # a hedged answer commits to none
        return 0.0, None
    if too_costly(answer) or too_costly(gold):
        return float(answer.strip() == gold.strip()), answer.strip()
    single = pred_text.count("\\boxed") + pred_text.count("\\fbox") <= 1 or answer_format == "gsm8k"
    if single and _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):
        return float(int(answer) == int(gold)), str(int(answer))
    equal, key = CHECKER.check(normalise(as_latex(gold)), normalise(pred_text), timeout)
    return float(equal), key


def gold_text(gold):
    """A gold of any JSON type as the text it is compared with, or None (no credit): a string as
    it is; an integer, or a finite float in plain decimals (1e-07 -> 0.0000001, which parses
    as the same number); a list as its elements, comma-separated, the way a boxed list is
    written. None, NaN, infinity, booleans and objects are not answers."""
    if isinstance(gold, str):
        return gold
    if type(gold) is int:
        return str(gold) if gold.bit_length() < 3 * MAX_ANSWER_CHARS else None  # str() caps digits
    if type(gold) is float:
        return format(Decimal(repr(gold)), "f") if math.isfinite(gold) else None
    if isinstance(gold, list) and gold:
        parts = [gold_text(g) for g in gold]
        return None if None in parts else ", ".join(parts)
    return None


def grade(response, ground_truth, timeout=DEFAULT_TIMEOUT, answer_format="boxed"):
    """1.0 if the response's final answer is equivalent to the ground truth, else 0.0. Total:
    any response or gold (gold_text says which are answers) gives 0.0 or 1.0, within the
    deadline, without raising."""
    gold = gold_text(ground_truth)
    if gold is None or not isinstance(response, str):
        return 0.0
    return check(gold, response, timeout, answer_format)[0]


# ----------------------------------------------------------------------------- data adapters


def to_prompt_record(raw):
    """Accept the common benchmark layouts; return {"question", "ground_truth_answer", ...}
    with the gold as text (gold_text: golds become strings here, once). DiRL/TraceRL:
    question/ground_truth_answer. MATH500: problem/answer (or problem/solution with a boxed
    answer). GSM8K: question/answer with '#### 42'. AIME: Problem/Answer."""
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object ({type(raw).__name__})")
    question = raw.get("question", raw.get("problem", raw.get("Problem")))
    answer = raw.get("ground_truth_answer", raw.get("answer", raw.get("Answer")))
    if answer is None and isinstance(raw.get("solution"), str):
        answer = extract_answer(raw["solution"])
    if isinstance(answer, str) and "####" in answer:
        answer = extract_gsm8k(answer)
    if not isinstance(question, str) or answer is None:
        raise ValueError(f"no question/answer keys (have {sorted(raw)})")
    gold = gold_text(answer)
    if gold is None:
        raise ValueError(f"answer {json.dumps(answer)[:40]} is not an answer (a string, a number or a list)")
    names = ("question", "problem", "Problem", "ground_truth_answer", "answer", "Answer")
    rest = {k: v for k, v in raw.items() if k not in names}
    return {**rest, "question": question, "ground_truth_answer": gold}


def load_prompts(path, max_mb=MAX_DATA_MB):
    """[(line, prompt)] of a JSON list or JSONL file of prompts in any accepted layout."""
    out = []
    for n, raw in read_records(path, max_mb=max_mb):
        try:
            out.append((n, to_prompt_record(raw)))
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


# ----------------------------------------------------------------------------- metrics

ROLLOUT_KEYS = ("prompt_id", "ground_truth_answer", "text", "response_ids", "step_map", "finish")


def read_rollouts(path, strict=False):
    """(records, problems): problems are 'file:line: why' for lines skipped."""
    records, problems = [], []
    for n, record in read_records(path, problems):
        missing = [k for k in ROLLOUT_KEYS if k not in record] if isinstance(record, dict) else ROLLOUT_KEYS
        if missing:
            problems.append(f"{path}:{n}: missing keys {list(missing)}")
        else:
            records.append(record)
    if problems and strict:
        raise ValueError("; ".join(problems))
    return records, problems


def pass_at_k(n, c, k):
    """Unbiased estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records, answers):
    """Metrics over records of one file (one data source). answers: the parsed answer's string
    form per record (for maj@k)."""
    groups = defaultdict(list)
    for record, answer in zip(records, answers):
        groups[record["prompt_id"]].append((record["reward"], answer))
    k = min(len(g) for g in groups.values())
    majority_right = []
    for g in groups.values():
        votes = Counter(a for _, a in g if a is not None)
        top = votes.most_common(1)[0][0] if votes else None
        majority_right.append(next((r for r, a in g if a == top), 0.0) if top is not None else 0.0)
    tokens = sum(len(r["response_ids"]) for r in records)
    return {
        "prompts": len(groups),
        "k": k,
        f"avg@{k}": sum(sum(r for r, _ in g) / len(g) for g in groups.values()) / len(groups),
        f"pass@{k}": sum(pass_at_k(len(g), int(sum(r for r, _ in g)), k) for g in groups.values())
        / len(groups),
        f"maj@{k}": sum(majority_right) / len(groups),
        "response_tokens": tokens / len(records),
        "truncated": sum(r["finish"] == "length" for r in records) / len(records),
        "tokens_per_forward": tokens / max(1, sum(forwards_of(r) for r in records)),
    }


def _grade_one(args):
    text, truth, timeout, answer_format = args
    start = time.perf_counter()
    reward, key = check(str(truth), str(text), timeout, answer_format)
    return reward, key, time.perf_counter() - start


def grade_all(records, workers=1, timeout=DEFAULT_TIMEOUT, answer_format="boxed"):
    """[(reward, answer key for maj@k, seconds)] per record, in order."""
    jobs = [(r["text"], r["ground_truth_answer"], timeout, answer_format) for r in records]
    if workers <= 1:
        return [_grade_one(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_grade_one, jobs, chunksize=64))


def evaluate_file(path, workers=1, timeout=DEFAULT_TIMEOUT, answer_format="boxed", strict=False):
    records, problems = read_rollouts(path, strict)
    if not records:
        raise ValueError(f"{path}: no usable rollout records")
    start = time.perf_counter()
    graded = grade_all(records, workers, timeout, answer_format)
    seconds = time.perf_counter() - start
    changed = sum(float(r.get("reward", -1)) != g[0] for r, g in zip(records, graded))
    for record, (reward, _, _) in zip(records, graded):
        record["reward"] = reward
    by_source = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.get("data_source", "all")].append(i)
    latencies = sorted(g[2] for g in graded)
    result = {
        "file": str(path),
        "policy_step": records[0].get("policy_step"),
        "skipped_lines": problems,
        "rewards_changed": changed,
        "grader_seconds": seconds,
        "grader_median_ms": 1000 * latencies[len(latencies) // 2],
        "grader_max_ms": 1000 * latencies[-1],
        "sources": {},
    }
    for source, idx in sorted(by_source.items()):
        result["sources"][source] = summarize([records[i] for i in idx], [graded[i][1] for i in idx])
    return result


def format_table(results):
    """One column per file, one block of rows per data source."""
    rows = [("", [Path(r["file"]).name for r in results])]
    sources = sorted({s for r in results for s in r["sources"]})
    for source in sources:
        metrics = list(dict.fromkeys(m for r in results for m in r["sources"].get(source, {})))
        rows.append((f"[{source}]", [""] * len(results)))
        for m in metrics:
            values = [r["sources"].get(source, {}).get(m) for r in results]
            rows.append(
                (
                    f"  {m}",
                    ["-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values],
                )
            )
    rows.append(("rewards changed", [str(r["rewards_changed"]) for r in results]))
    rows.append(("grader seconds", [f"{r['grader_seconds']:.2f}" for r in results]))
    width = max(len(name) for name, _ in rows)
    col = max(12, *(len(v) for _, vs in rows for v in vs))
    return "\n".join(f"{name:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vs) for name, vs in rows)


def log_to_run(run, result):
    """One {"stage": "eval", "step": policy step, ...} line per data source in run/metrics.jsonl,
    so that held-out accuracy sits beside the training curve."""
    step, file = result["policy_step"], result["file"]
    lines = [
        {"stage": "eval", "step": step, "file": file, "data_source": source, **numbers}
        for source, numbers in result["sources"].items()
    ]
    rundir.append_metrics(run, *lines)


def main(cfg):
    results = []
    for path in cfg.files:
        result = evaluate_file(path, cfg.workers, cfg.timeout, cfg.answer_format, cfg.strict)
        for problem in result["skipped_lines"]:
            print(f"skipped {problem}", file=sys.stderr)
        results.append(result)
        if cfg.run:
            log_to_run(cfg.run, result)
    print(format_table(results))
    if cfg.json:
        rundir.write_atomic(cfg.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    run_stage(main, Config, __doc__)
