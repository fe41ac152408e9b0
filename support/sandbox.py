"""The grader's sandbox: a forked child that runs each check under a deadline and a memory
cap, and the cheap refusals that keep costly answers away from the parser. Used by eval.py
(and so by rollout.py, which grades with it). docs/design.md, "The grader", says why.
"""

import logging
import multiprocessing
import os
import re
import resource
import threading
from pathlib import Path

MAX_ANSWER_CHARS = 1000  # longer answers are compared as strings only
MAX_NESTING = 8  # bracket depth (ANTLR slows down about 1.6x per level of bare braces)
MAX_EXPONENT, MAX_FACTORIAL = 3000, 1000  # largest integer exponent and factorial argument parsed
CHILD_MEMORY = 2 << 30  # bytes a check may add to the address space

_TOWER = re.compile(r"(?:\d|\})\s*(?:\^|\*\*)\s*(?:\{[^{}]*(?:\^|\*\*)|\(?[\d.]+\)?\s*(?:\^|\*\*))")
_FACTORIAL_OF_FACTORIAL = re.compile(r"!\s*[)}\]]*\s*!")


def too_costly(answer):
    """Why an answer is not worth parsing (compared as a string only), or None: too long, nested
    too deep, a power tower (10^{10^{10}}), a factorial of a factorial, or a huge exponent or
    factorial."""
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


def _serve(conn, check):
    """The child's loop: one (gold, prediction) pair in, one check(gold, prediction) out."""
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + CHILD_MEMORY, resource.getrlimit(resource.RLIMIT_AS)[1]))
    while True:
        try:
            gold_text, pred_text = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            result = check(gold_text, pred_text)
        except BaseException:  # a parse failure, RecursionError, MemoryError: not equal
            result = (False, None)
        conn.send(result)


class Sandbox:
    """A forked child that serves check(gold, prediction) -> (equal, key), with a deadline per
    check. A child that misses the deadline is killed, and one that dies without a verdict (a
    crash, the memory cap) is replaced and the check tried once more; both count as not equal
    in the end. A process forked from ours (a pool worker) starts a child of its own. Works from
    any thread, unlike signal-based timeouts."""

    def __init__(self, check):
        self.check_in_child = check
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
            _serve(child_end, self.check_in_child)
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
