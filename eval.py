"""eval.py - grade math answers, and summarise rollout files (avg@k, pass@k, maj@k).

The grader is what rollout.py calls for rewards: `grade(response, ground_truth)` returns
1.0 or 0.0. It finds the response's final answer (the last \\boxed{...} or \\fbox{...};
`#### 42` with --answer-format gsm8k; no answer, no credit) and hands it to Math-Verify, the
checker DiRL, TRL, open-r1 and lighteval use: `parse` extracts and turns LaTeX into sympy,
`verify(gold, prediction)` decides equivalence (numbers, expressions, equations, sets,
intervals, tuples, matrices). The gold is wrapped in $...$, as Math-Verify's README does.

What we add around Math-Verify:
  * A deadline and a memory cap. Every check runs in a forked child (one kept alive and
    reused; a new one after a kill) with --timeout seconds (default 3: the slowest real
    answer in tests/test_eval.py's tables takes well under 1 s) and CHILD_MEMORY bytes.
    Math-Verify's own timeouts use signal.alarm, which works only in a main thread, so they
    are off; ours work from any thread and from pool workers. A check that misses the
    deadline, dies or runs out of memory counts as not equal.
  * Cheap refusals before parsing (`too_costly`): an answer over MAX_ANSWER_CHARS, nested
    deeper than MAX_NESTING brackets, a power whose exponent holds another power of a
    number (10^{10^{10}}, 9^9^9), an integer exponent over MAX_EXPONENT, or a factorial of a
    factorial. Such an answer is only compared as a string, so an exponent tower or a
    brace flood costs microseconds, not the deadline.
  * Only the text around the last box is parsed (from the line of the box, at most
    MAX_TAIL_CHARS either side), so a 50 MB response costs one reverse search.
  * A thin layer where Math-Verify is wrong on answers people write (`normalise`), each
    rule a text substitution before parse, each with a test that fails without it:
      \\varnothing      -> \\emptyset   (the lexer knows only \\emptyset as the empty set)
      30°              -> 30^\\circ    (the unicode degree sign is not in the grammar)
      1\\,000 / 1 000  -> 1000         (space thousands separators parse as a product)
      \\text{12 cm}     -> 12 \\text{cm} (a number inside \\text is read as one symbol)
      \\boxed{5.}       -> \\boxed{5}   (sentence punctuation inside the box)
    and one setting: allow_set_relation_comp, so that `x < 3` equals the gold (-\\infty, 3).
  * maj@k votes on the string form of the parsed prediction, so 1/2 and \\frac{1}{2} agree.
  * Plain integers on both sides (the built-in arithmetic task) are compared in the parent
    without a child: the same verdict, no fork.

Model text never reaches Python `eval`. Math-Verify reaches sympy's parse_expr (which
calls eval) on two paths, and neither admits a name, a quote or an attribute:
  * ExprExtractionConfig (plain-text expressions): its regex `expr` admits only digits,
    '.', whitespace and the characters + - * × / ^ ( ) ÷; numbers go to sympy.Number as
    digit strings. We do not use this path: every text we parse is $...$-wrapped LaTeX.
  * LatexExtractionConfig: latex2sympy builds sympy objects from an ANTLR parse tree; the
    only strings it converts with sympify are the NUMBER, E_NOTATION and PERCENT_NUMBER
    tokens, whose lexer rules admit only digits, '.', 'e'/'E', a sign, a space and '%'.
tests/test_eval.py sends __import__ payloads through every extraction route and checks
that no file appears.

Reads  rollout JSONL files (the records rollout.py writes: prompt_id, question,
       ground_truth_answer, response_ids, step_map, text, reward, finish, sampler;
       `data_source` if present) and re-grades every `text`.
Writes a table per file and per data source on stdout (several files side by side) and,
       with --json OUT, the same numbers as JSON.

Usage:  python eval.py runs/demo/eval/sft.jsonl runs/demo/eval/final.jsonl [--json OUT] [--workers 2]
                [--run RUN]
        python eval.py --plot curve.png runs/seed0 runs/seed1     (the learning curves; needs matplotlib)

How this differs from the paper: DiRL checks the last \\boxed{} with math-verify (30 s
timeout, signal-based) or a sympy LaTeX comparison; we use Math-Verify behind our own
deadline (3 s), memory cap and refusals, with the thin layer above, and re-score old
rollouts when the grader changes.
"""

import argparse
import json
import logging
import math
import multiprocessing
import os
import re
import resource
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_TIMEOUT = 3.0  # seconds per check; real answers need well under 1 s
MAX_ANSWER_CHARS = 1000  # longer answers are compared as strings only
MAX_TAIL_CHARS = 500  # text around the last box that parse sees: the box's line, at most this either side
MAX_NESTING = 8  # bracket depth (ANTLR slows down about 1.6x per level of bare braces)
MAX_EXPONENT, MAX_FACTORIAL = 3000, 1000  # largest integer exponent and factorial argument parsed
CHILD_MEMORY = 2 << 30  # bytes a check may add to the address space

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


# ----------------------------------------------------------------------------- thin layer, refusals

NORMALISE = [
    (re.compile(r"\\varnothing"), r"\\emptyset"),
    (re.compile(r"°"), r"^\\circ"),
    (re.compile(r"(?<=\d)(?:\\[,;: ]|~| )(?=\d{3}(?!\d))"), ""),
    (
        re.compile(r"\\(?:text|textnormal|mbox|mathrm)\{\s*(-?\d+(?:\.\d+)?)\s+([a-zA-Z][a-zA-Z ]*)\}"),
        r"\1 \\text{\2}",
    ),
    (re.compile(r"(\\boxed\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*?)(?<!\.)[.,;]\s*\}"), r"\1}"),
]


def normalise(text):
    for pattern, replacement in NORMALISE:
        text = pattern.sub(replacement, text)
    return text


_TOWER = re.compile(r"(?:\d|\})\s*(?:\^|\*\*)\s*(?:\{[^{}]*(?:\^|\*\*)|\(?[\d.]+\)?\s*(?:\^|\*\*))")
_FACTORIAL_OF_FACTORIAL = re.compile(r"!\s*[)}\]]*\s*!")


def too_costly(answer):
    """Why an answer is not worth parsing (compared as a string only), or None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "long"
    depth = deepest = 0
    for ch in answer:
        depth += (ch in "{([") - (ch in "})]")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return "nested"
    if _TOWER.search(answer):
        return "power tower"
    if _FACTORIAL_OF_FACTORIAL.search(answer):
        return "factorial of a factorial"
    if any(len(n) > 6 or int(n) > MAX_EXPONENT for n in re.findall(r"(?:\^|\*\*)\s*\{?\s*(\d+)", answer)):
        return "huge exponent"
    if any(len(n) > 6 or int(n) > MAX_FACTORIAL for n in re.findall(r"(\d+)\s*!", answer)):
        return "huge factorial"
    return None


# ----------------------------------------------------------------------------- the check, in a child


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


def _serve(conn):
    """The child's loop: one (gold, prediction) pair in, one (equal, key) out."""
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + CHILD_MEMORY, resource.getrlimit(resource.RLIMIT_AS)[1]))
    while True:
        try:
            gold_text, pred_text = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            result = verify_in_child(gold_text, pred_text)
        except BaseException:  # a parse failure, RecursionError, MemoryError: not equal
            result = (False, None)
        conn.send(result)


class Checker:
    """A forked child that serves checks, with a deadline per check. A child that misses the
    deadline is killed, and one that dies without a verdict (a crash, the memory cap) is
    replaced and the check tried once more; both count as not equal in the end. A process
    forked from ours (a pool worker) starts a child of its own."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self.lock, self.pid, self.conn = threading.Lock(), None, None

    def _start(self):
        import math_verify  # noqa: F401  loaded once in this process, so that every child forks with it

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": ours applies
        parent_end, child_end = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            _serve(child_end)
        child_end.close()
        self.pid, self.conn = pid, parent_end

    def _kill(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.conn.close()
        self.pid, self.conn = None, None

    def check(self, gold_text, pred_text, timeout):
        with self.lock:
            for _ in range(2):
                if self.pid is None:
                    self._start()
                try:
                    self.conn.send((gold_text, pred_text))
                    if not self.conn.poll(timeout):
                        self._kill()
                        return False, None
                    return self.conn.recv()
                except (EOFError, OSError):  # the child died (a crash, the memory cap): retry in a new one
                    self._kill()
            return False, None


CHECKER = Checker()
_INTEGER = re.compile(r"\s*-?\d{1,100}\s*")


def check(gold, response, timeout=DEFAULT_TIMEOUT, answer_format="boxed"):
    """(reward 1.0 or 0.0, key of the extracted answer or None)."""
    found = parse_input(response, answer_format)
    if answer_format == "gsm8k" and "####" in gold:
        gold = extract_gsm8k(gold) or gold
    if found is None or not gold.strip():
        return 0.0, None
    pred_text, answer = found
    if too_costly(answer) or too_costly(gold):
        return float(answer.strip() == gold.strip()), answer.strip()
    single = pred_text.count("\\boxed") + pred_text.count("\\fbox") <= 1 or answer_format == "gsm8k"
    if single and _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):
        return float(int(answer) == int(gold)), str(int(answer))
    equal, key = CHECKER.check(normalise(as_latex(gold)), normalise(pred_text), timeout)
    return float(equal), key


def grade(response, ground_truth, timeout=DEFAULT_TIMEOUT, answer_format="boxed"):
    """1.0 if the response's final answer is equivalent to the ground truth, else 0.0."""
    return check(str(ground_truth), str(response), timeout, answer_format)[0]


# ----------------------------------------------------------------------------- data adapters


def to_prompt_record(raw):
    """Accept the common benchmark layouts; return {"question", "ground_truth_answer", ...}.
    DiRL/TraceRL: question/ground_truth_answer. MATH500: problem/answer (or problem/solution
    with a boxed answer). GSM8K: question/answer with '#### 42'. AIME: Problem/Answer."""
    if "question" in raw and "ground_truth_answer" in raw:  # golds become strings here, once
        return {
            **raw,
            "question": str(raw["question"]),
            "ground_truth_answer": str(raw["ground_truth_answer"]),
        }
    question = raw.get("question", raw.get("problem", raw.get("Problem")))
    answer = raw.get("answer", raw.get("Answer"))
    if answer is None and "solution" in raw:
        answer = extract_answer(raw["solution"])
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


def log_to_run(run, result, records_file):
    """Append one {"stage": "eval", "step": policy step, ...} line per data source to
    run/metrics.jsonl, so that held-out accuracy sits beside the training curve."""
    first = json.loads(next(line for line in Path(records_file).read_text().splitlines() if line.strip()))
    # strict JSON (a non-finite number becomes null) and never through a symlink, as common.append_metrics
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    with os.fdopen(os.open(Path(run) / "metrics.jsonl", flags, 0o644), "a") as f:
        for source, numbers in result["sources"].items():
            numbers = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in numbers.items()
            }
            line = {
                "time": round(time.time(), 3),
                "stage": "eval",
                "step": first.get("policy_step"),
                "file": str(records_file),
                "data_source": source,
                **numbers,
            }
            f.write(json.dumps(line, allow_nan=False) + "\n")


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
        lines = [
            json.loads(line)
            for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        lines = [r for r in lines if not max_step or r.get("step", 0) <= max_step]
        loop = [r for r in lines if r.get("stage") == "rollout" and "reward" in r]
        if not loop:
            raise ValueError(f"{run}: no rollout lines in metrics.jsonl")
        minutes = loop_minutes(lines)
        held_out = sorted(
            (r for r in lines if r.get("stage") == "eval" and r["step"] in minutes), key=lambda r: r["step"]
        )
        k = next((key for key in held_out[0] if key.startswith("avg@")), None) if held_out else None
        for ax, x in zip(
            axes, ("step", "minutes")
        ):  # a policy's minute is when dipo wrote it, however late it was evaluated
            at = (lambda step: step) if x == "step" else (lambda step: minutes.get(step, 0.0))
            smooth = [
                sum(r["reward"] for r in loop[max(0, i - 4) : i + 1]) / len(loop[max(0, i - 4) : i + 1])
                for i in range(len(loop))
            ]
            trained = ax.plot(
                [at(r["step"]) for r in loop],
                smooth,
                alpha=0.5,
                label=f"{Path(run).name}: training reward (mean of 5 steps)",
            )
            if k:
                ax.plot(
                    [at(r["step"]) for r in held_out],
                    [r[k] for r in held_out],
                    "o-",
                    color=trained[0].get_color(),
                    label=f"{Path(run).name}: held-out {k}",
                )
            ax.set_xlabel(
                "DiPO step" if x == "step" else "loop minutes (rollout.py + dipo.py; evaluations left out)"
            )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{out}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "files", nargs="+", help="rollout JSONL files (written by rollout.py); with --plot, run directories"
    )
    parser.add_argument(
        "--json", default="", metavar="OUT", help="also write the numbers as JSON to OUT (default: off)"
    )
    parser.add_argument(
        "--run",
        default="",
        help='also append the numbers to RUN/metrics.jsonl as {"stage": "eval"} lines (default: off)',
    )
    parser.add_argument(
        "--plot",
        default="",
        metavar="OUT.png",
        help="instead: draw training reward and held-out accuracy of the run "
        "directories given as files, from their metrics.jsonl (needs matplotlib; default: off)",
    )
    parser.add_argument(
        "--plot-steps",
        type=int,
        default=0,
        metavar="N",
        help="with --plot: only DiPO steps up to N (default: 0 = all)",
    )
    parser.add_argument("--workers", type=int, default=1, help="grading processes (default: 1)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds allowed per check (default: {DEFAULT_TIMEOUT})",
    )
    parser.add_argument(
        "--answer-format",
        choices=["boxed", "gsm8k"],
        default="boxed",
        help="where the answer is: last \\boxed{} or '#### x' (default: boxed)",
    )
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop at the first bad line instead of skipping it (default: off)",
    )
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
