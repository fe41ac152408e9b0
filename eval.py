"""eval.py - grade math answers, and summarise rollout files (avg@k, pass@k, maj@k).

The grader is what rollout.py calls for rewards: `grade(response, ground_truth)`
returns 1.0 or 0.0. It extracts the LAST \\boxed{...} (or \\fbox{...}, or
`\\boxed 5`; `#### 42` with --answer-format gsm8k), normalises both sides the way
MATH / GSM8K / AIME / OlympiadBench answers are written, and decides equivalence
in three steps: equal strings, equal numbers (fractions, decimals within 1e-6,
percentages), then sympy (numbers, expressions, equations, tuples and intervals
in order, sets and plain lists in any order, matrices).

Model text never reaches sympy's parser (which runs Python `eval`): a small LaTeX
parser of our own turns a whitelisted token stream into sympy objects, refusing
huge powers and factorials. Every symbolic step runs in a forked child process
with a deadline (--timeout, default 5 s) and a memory cap, so it works from any
thread and from pool workers, and a hang or a blow-up costs at most the deadline
and scores 0.

Reads  rollout JSONL files (DESIGN.md's record: prompt_id, question,
       ground_truth_answer, response_ids, step_map, text, reward, finish, sampler;
       `data_source` if present) and re-grades every `text`.
Writes a table per file and per data source on stdout (several files side by
       side) and, with --json OUT, the same numbers as JSON.

Usage:  python eval.py runs/demo/eval/sft.jsonl runs/demo/eval/final.jsonl [--json OUT] [--workers 2] [--run RUN]
        python eval.py --plot curve.png runs/seed0 runs/seed1     (the learning curves; needs matplotlib)

How this differs from the paper: DiRL checks answers with math-verify (30 s
timeout) or a sympy LaTeX comparison; we use one grader of our own with no extra
dependency, safe on untrusted text, and we re-score old rollouts when it changes.
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import resource
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

MAX_ANSWER_CHARS = 1000  # longer extracted answers are compared as strings only
MAX_DEPTH = 100  # parser nesting limit
MAX_EXPONENT, MAX_FACTORIAL = 1000, 200
CHILD_MEMORY = 2 << 30  # bytes a symbolic check may add to the address space

# ----------------------------------------------------------------------------- extraction


def extract_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces handled), or of `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text[i : i + 1] == " ":  # \boxed 5
        return re.split(r"[\s$]", text[i + 1 :].lstrip(), maxsplit=1)[0] or None
    if text[i : i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: no answer


def extract_gsm8k(text):
    match = re.search(r"####\s*([^\n]+)", text)
    return match.group(1).strip() if match else None


def extract_answer(text, answer_format="boxed"):
    return extract_gsm8k(text) if answer_format == "gsm8k" else extract_boxed(text)


# ----------------------------------------------------------------------------- normalisation


def _unwrap(s, command):
    """\\command{X} -> X for every occurrence (no nesting inside X)."""
    return re.sub(r"\\" + command + r"\s*\{([^{}]*)\}", r"\1", s)


def normalize(answer):
    s = answer.strip()
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    for cmd in ["\\left", "\\right", "\\displaystyle", "\\!"]:
        s = s.replace(cmd, "")
    for space in ["\\,", "\\;", "\\:", "\\qquad", "\\quad", "~"]:
        s = s.replace(space, " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "%")
    s = re.sub(r"\\text\{\s*\(([A-Ea-e])\)\s*\}", r"(\1)", s)  # \text{(C)}
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .]*\}(\^\{?\d\}?)?", "", s)  # 5\text{ cm}^2
    for cmd in ["text", "textbf", "mathrm", "mbox", "mathbf", "boxed"]:
        s = _unwrap(s, cmd)
    s = re.sub(r"\\(frac|sqrt)\s*(\w)\s*(\w)?", lambda m: f"\\{m[1]}{{{m[2]}}}" + (f"{{{m[3]}}}" if m[3] and m[1] == "frac" else (m[3] or "")), s)
    s = re.sub(r"^\s*\(?([A-E])\)?\s*$", r"\1", s)  # multiple choice (C) -> C
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*(?=[^=]+$)", "", s) if not re.search(r"[<>]|\\le|\\ge", s) else s  # x = 3 -> 3
    s = re.sub(r"^(-?\d[\d.,]*)\s+[a-zA-Z][a-zA-Z ]*$", r"\1", s)  # 5 inches -> 5
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s.strip()):
        s = s.replace(",", "")  # thousands separators; "1, 2" and "1,2" stay lists
    s = s.strip().rstrip(".").strip()
    return re.sub(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])", "", s)  # "\sin x" keeps its space, "2 x" does not


# ----------------------------------------------------------------------------- numbers (no sympy)

_NUMBER = re.compile(r"(-?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\}|(\d*\.?\d+))(%?)")


def parse_number(s):
    """Fraction for a plain number, fraction, decimal or percentage; None otherwise.
    Returns (value, inexact, percent)."""
    m = _NUMBER.fullmatch(s)
    if not m or int(m[3] or m[5] or 1) == 0:  # "1/00" is no number, and must not divide by zero
        return None
    sign = -1 if m[1] else 1
    if m[6] is not None:
        value, inexact = Fraction(m[6]), "." in m[6]
    else:
        value, inexact = Fraction(int(m[2] or m[4]), int(m[3] or m[5])), False
    return sign * value, inexact, bool(m[7])


def numbers_equal(x, y):
    (a, a_inexact, a_pct), (b, b_inexact, b_pct) = x, y
    candidates = [(a, b)] + ([(a / 100, b)] if a_pct and not b_pct else []) + ([(a, b / 100)] if b_pct and not a_pct else [])
    for p, q in candidates:
        if p == q or ((a_inexact or b_inexact) and abs(p - q) <= Fraction(1, 10**6) * max(1, abs(q))):
            return True
    return False


# ----------------------------------------------------------------------------- structure


def split_top(s, sep=","):
    """Split at separators outside any bracket."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [s[start:]]


def structure(s):
    """('matrix', rows) | ('set', items) | ('union', parts) | ('seq', open, close, items) | ('list', items) | ('scalar', s)"""
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s)
    if m:
        return "matrix", [row.split("&") for row in m[1].split("\\\\") if row]
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", split_top(s[2:-2])
    union = split_top(s, "\\cup")
    if len(union) > 1:
        return "union", union
    items = split_top(s)
    if len(items) > 1:
        return "list", items
    inner = split_top(s[1:-1])
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and len(inner) > 1:
        return "seq", s[0], s[-1], inner
    return "scalar", s


class NeedsSymbolic(Exception):
    pass


def equal(a, b, symbolic):
    """Equivalence of two normalised answers; raises NeedsSymbolic when symbolic=False and
    only sympy can tell."""
    if a == b:
        return True
    sa, sb = structure(a), structure(b)
    if sa[0] != sb[0]:
        return False
    kind = sa[0]
    if kind == "scalar":
        return _scalar_equal(a, b, symbolic)
    if kind == "seq":
        return sa[1:3] == sb[1:3] and _all_equal(sa[3], sb[3], symbolic)
    if kind == "matrix":
        return len(sa[1]) == len(sb[1]) and all(_all_equal(r, q, symbolic) for r, q in zip(sa[1], sb[1]))
    if kind == "union":
        return _all_equal(sa[1], sb[1], symbolic)
    return _unordered_equal(sa[1], sb[1], symbolic)  # set, list


def _all_equal(xs, ys, symbolic):
    return len(xs) == len(ys) and all(equal(x, y, symbolic) for x, y in zip(xs, ys))


def _unordered_equal(xs, ys, symbolic):
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        match = next((i for i, y in enumerate(left) if equal(x, y, symbolic)), None)
        if match is None:
            return False
        left.pop(match)
    return True


def _scalar_equal(a, b, symbolic):
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return numbers_equal(x, y)
    if not symbolic:
        raise NeedsSymbolic
    if a.count("=") == 1 and b.count("=") == 1:  # equations: same difference of sides, up to sign
        (l1, r1), (l2, r2) = a.split("="), b.split("=")
        d1, d2 = latex_to_sympy(l1) - latex_to_sympy(r1), latex_to_sympy(l2) - latex_to_sympy(r2)
        return _is_zero(d1 - d2) or _is_zero(d1 + d2)
    if "=" in a or "=" in b:
        return False
    return _is_zero(latex_to_sympy(a) - latex_to_sympy(b))


def _is_zero(expr):
    import sympy

    if not expr.free_symbols:
        value = complex(sympy.N(expr, 30))
        if abs(value) < 1e-9:
            return True
    return sympy.simplify(expr) == 0


# ----------------------------------------------------------------------------- LaTeX -> sympy, by hand

_TOKEN = re.compile(r"\s+|\d+\.\d+|\d+|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]!|]")
_FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "log", "ln", "exp", "sinh", "cosh", "tanh"}
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "phi", "lambda", "mu", "sigma", "omega", "tau", "rho", "epsilon"}
_TIMES = {"*", "\\cdot", "\\times"}


class ParseError(ValueError):
    pass


def tokenize(s):
    tokens, pos = [], 0
    for m in _TOKEN.finditer(s):
        if m.start() != pos:
            raise ParseError(f"unexpected {s[pos:m.start()]!r}")
        if not m.group().isspace():
            tokens.append(m.group())
        pos = m.end()
    if pos != len(s):
        raise ParseError(f"unexpected {s[pos:]!r}")
    return tokens


def latex_to_sympy(s):
    """Recursive descent over whitelisted tokens; builds sympy objects directly (no eval)."""
    import sympy

    tokens, i, depth = tokenize(s), 0, 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def take(expected=None):
        nonlocal i
        tok = peek()
        if tok is None or (expected and tok != expected):
            raise ParseError(f"expected {expected or 'more'}, got {tok}")
        i += 1
        return tok

    def nest():
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise ParseError("too deeply nested")

    def expr():
        nest()
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = unary()
        while True:
            tok = peek()
            if tok in _TIMES:
                take()
                value = value * unary()
            elif tok in ("/", "\\div"):
                take()
                value = value / unary()
            elif tok is not None and (tok[0].isalnum() or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi", "\\infty") or tok[1:] in _FUNCTIONS | _GREEK):
                value = value * unary()  # implicit multiplication: 2x, 3\sqrt{2}, x(x+1)
            else:
                return value

    def unary():
        if peek() in ("-", "+"):
            return -unary() if take() == "-" else unary()
        return power()

    def power():
        base = postfix()
        if peek() == "^":
            take()
            exponent = group() if peek() == "{" else unary()
            if exponent.is_Integer and abs(int(exponent)) > MAX_EXPONENT and base.is_number and abs(base) > 1:
                raise ParseError("power too large")
            if exponent.is_number and not exponent.is_Integer and base.is_number and abs(exponent) > MAX_EXPONENT:
                raise ParseError("power too large")
            return sympy.Pow(base, exponent)
        return base

    def postfix():
        value = atom()
        while peek() == "!":
            take()
            if not value.is_Integer or not 0 <= int(value) <= MAX_FACTORIAL:
                raise ParseError("factorial too large")
            value = sympy.factorial(value)
        return value

    def group():
        nest()
        if peek() == "{":
            take("{")
            value = expr()
            take("}")
            return value
        return atom()

    def atom():
        tok = take()
        if tok[0].isdigit() or tok[0] == ".":
            return sympy.Rational(tok)
        if tok.isalpha() and len(tok) == 1:
            return {"e": sympy.E, "i": sympy.I}.get(tok, sympy.Symbol(tok))
        if tok in ("(", "[", "{"):
            value = expr()
            take({"(": ")", "[": "]", "{": "}"}[tok])
            return value
        if tok == "|":
            value = expr()
            take("|")
            return sympy.Abs(value)
        if tok == "\\frac":
            return group() / group()
        if tok == "\\sqrt":
            if peek() == "[":
                take("[")
                n = expr()
                take("]")
                return sympy.root(group(), n)
            return sympy.sqrt(group())
        if tok == "\\pi":
            return sympy.pi
        if tok == "\\infty":
            return sympy.oo
        if tok[1:] in _GREEK:
            return sympy.Symbol(tok[1:])
        if tok[1:] in _FUNCTIONS:
            fn = {"ln": sympy.log, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan}.get(tok[1:]) or getattr(sympy, tok[1:])
            return fn(group() if peek() in ("{", "(") else power())
        raise ParseError(f"unsupported token {tok}")

    value = expr()
    if i != len(tokens):
        raise ParseError(f"trailing {tokens[i:]}")
    return value


# ----------------------------------------------------------------------------- the time limit


def _child(conn, a, b):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + CHILD_MEMORY, hard))
    try:
        conn.send(equal(a, b, symbolic=True))
    except BaseException:  # a parse error, a sympy failure, MemoryError: not equivalent
        conn.send(False)


def with_time_limit(a, b, timeout):
    """equal(a, b, symbolic=True) in a forked child; False if it fails or outlives `timeout`."""
    import sympy  # noqa: F401  imported once in the parent, so children fork with it loaded

    ctx = multiprocessing.get_context("fork")
    for _ in range(2):  # a child that dies without a verdict (a fork of a busy process can crash) gets one retry
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child, args=(send, a, b), daemon=True)
        child.start()
        send.close()
        try:
            verdict = receive.recv() if receive.poll(timeout) else False
        except EOFError:  # the child ended without sending anything
            verdict = None
        child.kill()
        child.join()
        receive.close()
        if verdict is not None:
            return bool(verdict)
    return False


def answers_equal(pred, truth, timeout=5.0):
    a, b = normalize(pred), normalize(truth)
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return a == b
    try:
        return equal(a, b, symbolic=False)
    except NeedsSymbolic:
        return with_time_limit(a, b, timeout)


def grade(response, ground_truth, timeout=5.0, answer_format="boxed"):
    """1.0 if the response's final answer is equivalent to the ground truth, else 0.0."""
    pred = extract_answer(response, answer_format)
    truth = extract_answer(ground_truth, answer_format) if answer_format == "gsm8k" and "####" in ground_truth else ground_truth
    if pred is None or truth is None:
        return 0.0
    return 1.0 if answers_equal(pred, truth, timeout) else 0.0


# ----------------------------------------------------------------------------- data adapters


def to_prompt_record(raw):
    """Accept the common benchmark layouts; return {"question", "ground_truth_answer", ...}.
    DiRL/TraceRL: question/ground_truth_answer. MATH500: problem/answer (or problem/solution
    with a boxed answer). GSM8K: question/answer with '#### 42'. AIME: Problem/Answer."""
    if "question" in raw and "ground_truth_answer" in raw:
        return dict(raw)
    question = raw.get("question", raw.get("problem", raw.get("Problem")))
    answer = raw.get("answer", raw.get("Answer"))
    if answer is None and "solution" in raw:
        answer = extract_boxed(raw["solution"])
    if isinstance(answer, str) and "####" in answer:
        answer = extract_gsm8k(answer)
    if question is None or answer is None:
        raise ValueError(f"no question/answer keys (have {sorted(raw)})")
    rest = {k: v for k, v in raw.items() if k not in ("question", "problem", "Problem", "answer", "Answer")}
    return {**rest, "question": str(question), "ground_truth_answer": str(answer)}


def load_prompts(path):
    """A JSON list or JSONL file of prompts in any accepted layout."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = list(enumerate(json.loads(text), 1))
    else:
        rows = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    out = []
    for n, raw in rows:
        try:
            out.append(to_prompt_record(raw))
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    return out


# ----------------------------------------------------------------------------- metrics

ROLLOUT_KEYS = ("prompt_id", "ground_truth_answer", "text", "response_ids", "step_map", "finish")


def read_rollouts(path, strict=False):
    """(records, problems): problems are 'file:line: why' for lines skipped."""
    records, problems = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            missing = [k for k in ROLLOUT_KEYS if k not in record]
            if missing:
                raise ValueError(f"missing keys {missing}")
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            problems.append(f"{path}:{n}: {e}")
            continue
        records.append(record)
    if problems and strict:
        raise ValueError("; ".join(problems))
    return records, problems


def pass_at_k(n, c, k):
    """Unbiased estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


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


def summarize(records, answers):
    """Metrics over records of one file (one data source). answers: normalised extracted answer
    per record (for maj@k)."""
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
        f"pass@{k}": sum(pass_at_k(len(g), int(sum(r for r, _ in g)), k) for g in groups.values()) / len(groups),
        f"maj@{k}": sum(majority_right) / len(groups),
        "response_tokens": tokens / len(records),
        "truncated": sum(r["finish"] == "length" for r in records) / len(records),
        "tokens_per_forward": tokens / max(1, sum(forwards_of(r) for r in records)),
    }


def _grade_one(args):
    text, truth, timeout, answer_format = args
    start = time.perf_counter()
    reward = grade(text, truth, timeout, answer_format)
    answer = extract_answer(text, answer_format)
    return reward, normalize(answer) if answer is not None else None, time.perf_counter() - start


def grade_all(records, workers=1, timeout=5.0, answer_format="boxed"):
    """[(reward, normalised answer, seconds)] per record, in order."""
    jobs = [(r["text"], r["ground_truth_answer"], timeout, answer_format) for r in records]
    if workers <= 1:
        return [_grade_one(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_grade_one, jobs, chunksize=64))


def evaluate_file(path, workers=1, timeout=5.0, answer_format="boxed", strict=False):
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
    result = {"file": str(path), "skipped_lines": problems, "rewards_changed": changed, "grader_seconds": seconds,
              "grader_median_ms": 1000 * latencies[len(latencies) // 2], "grader_max_ms": 1000 * latencies[-1], "sources": {}}
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
            rows.append((f"  {m}", ["-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]))
    rows.append(("rewards changed", [str(r["rewards_changed"]) for r in results]))
    rows.append(("grader seconds", [f"{r['grader_seconds']:.2f}" for r in results]))
    width = max(len(name) for name, _ in rows)
    col = max(12, *(len(v) for _, vs in rows for v in vs))
    return "\n".join(f"{name:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vs) for name, vs in rows)


def log_to_run(run, result, records_file):
    """Append one {"stage": "eval", "step": policy step, ...} line per data source to
    run/metrics.jsonl, so that held-out accuracy sits beside the training curve."""
    first = json.loads(next(line for line in Path(records_file).read_text().splitlines() if line.strip()))
    with open(Path(run) / "metrics.jsonl", "a") as f:
        for source, numbers in result["sources"].items():
            f.write(json.dumps({"time": round(time.time(), 3), "stage": "eval", "step": first.get("policy_step"),
                                "file": str(records_file), "data_source": source, **numbers}) + "\n")


def loop_minutes(lines):
    """{policy step: loop minutes to produce it} from a run's metrics.jsonl lines: the wall
    time of rollout.py and dipo.py only. Step k runs from the last line written before its
    rollout's start line (so Python's start-up counts) to dipo's line for k; held-out
    evaluations write their lines before that point and are left out. A gap before a rollout
    longer than twice the median one (a loop stopped and started again later) counts as
    twice the median."""
    steps, before, start = [], lines[0]["time"] if lines else 0.0, None
    for r in lines:
        if r.get("stage") == "rollout" and r.get("event") == "start":
            start = (before, r["time"])
        elif r.get("stage") == "dipo" and "step" in r and "event" not in r and start:
            steps.append((r["step"], start[1] - start[0], r["time"] - start[1]))
            start = None
        before = r["time"]
    if not steps:
        return {0: 0.0}
    cap = 2 * sorted(gap for _, gap, _ in steps)[len(steps) // 2]
    minutes, total = {0: 0.0}, 0.0
    for step, gap, work in steps:
        total += min(gap, cap) + work
        minutes[step] = total / 60
    return minutes


def plot_runs(runs, out, max_step=0):
    """Training reward and held-out avg@k against DiPO step and against loop minutes
    (loop_minutes), one line per run, to a PNG. matplotlib is optional: imported here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        lines = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        lines = [r for r in lines if not max_step or r.get("step", 0) <= max_step]
        loop = [r for r in lines if r.get("stage") == "rollout" and "reward" in r]
        if not loop:
            raise ValueError(f"{run}: no rollout lines in metrics.jsonl")
        minutes = loop_minutes(lines)
        held_out = sorted((r for r in lines if r.get("stage") == "eval" and r["step"] in minutes), key=lambda r: r["step"])
        k = next((key for key in held_out[0] if key.startswith("avg@")), None) if held_out else None
        for ax, x in zip(axes, ("step", "minutes")):  # a policy's minute is when dipo wrote it, however late it was evaluated
            at = (lambda step: step) if x == "step" else (lambda step: minutes.get(step, 0.0))
            smooth = [sum(r["reward"] for r in loop[max(0, i - 4):i + 1]) / len(loop[max(0, i - 4):i + 1]) for i in range(len(loop))]
            trained = ax.plot([at(r["step"]) for r in loop], smooth, alpha=0.5,
                              label=f"{Path(run).name}: training reward (mean of 5 steps)")
            if k:
                ax.plot([at(r["step"]) for r in held_out], [r[k] for r in held_out], "o-", color=trained[0].get_color(),
                        label=f"{Path(run).name}: held-out {k}")
            ax.set_xlabel("DiPO step" if x == "step" else "loop minutes (rollout.py + dipo.py; evaluations left out)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{out}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="rollout JSONL files (written by rollout.py); with --plot, run directories")
    parser.add_argument("--json", default="", metavar="OUT", help="also write the numbers as JSON to OUT (default: off)")
    parser.add_argument("--run", default="", help="also append the numbers to RUN/metrics.jsonl as {\"stage\": \"eval\"} lines (default: off)")
    parser.add_argument("--plot", default="", metavar="OUT.png", help="instead: draw training reward and held-out accuracy of the run "
                        "directories given as files, from their metrics.jsonl (needs matplotlib; default: off)")
    parser.add_argument("--plot-steps", type=int, default=0, metavar="N", help="with --plot: only DiPO steps up to N (default: 0 = all)")
    parser.add_argument("--workers", type=int, default=1, help="grading processes (default: 1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per symbolic check (default: 5.0)")
    parser.add_argument("--answer-format", choices=["boxed", "gsm8k"], default="boxed", help="where the answer is: last \\boxed{} or '#### x' (default: boxed)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False, help="stop at the first bad line instead of skipping it (default: off)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            plot_runs(args.files, args.plot, args.plot_steps)
        except ImportError:
            sys.exit("error: --plot needs matplotlib (pip install matplotlib)")
        except (OSError, ValueError, KeyError, StopIteration) as e:
            sys.exit(f"error: --plot: {e!r}")
        print(f"wrote {args.plot}")
        return
    results = []
    for path in args.files:
        try:
            result = evaluate_file(path, args.workers, args.timeout, args.answer_format, args.strict)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        for problem in result["skipped_lines"]:
            print(f"skipped {problem}", file=sys.stderr)
        results.append(result)
        if args.run:
            log_to_run(args.run, result, path)
    print(format_table(results))
    if args.json:
        tmp = f"{args.json}.tmp"
        Path(tmp).write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
