"""eval.py: the grader (Math-Verify behind our deadline, refusals and thin layer) on tables of
answer pairs and whole responses, its time limit, code injection, threads and pool workers,
the data adapters, the metrics."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

import eval as ev
import support.data
import support.sandbox
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import curves  # noqa: E402  benchmarks/curves.py

# (boxed answer, ground truth, equivalent?) in the way MATH500 / GSM8K / AIME / OlympiadBench write them.
CASES = [
    # integers, signs, off-by-one (AIME / GSM8K)
    ("42", "42", True),
    ("042", "42", True),
    ("-7", "-7", True),
    ("7", "-7", False),
    ("41", "42", False),
    ("43", "42", False),
    ("0", "0", True),
    ("-0", "0", True),
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1,000,000", "1000000", True),
    ("12,345.5", "12345.5", True),
    ("999", "1000", False),
    ("100", "10", False),
    ("5.", "5", True),
    ("5", "5.0", True),
    ("5.00", "5", True),
    ("5.01", "5", False),
    # fractions and decimals
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("1/2", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("0.33", "\\frac{1}{3}", False),
    ("0.333", "\\frac13", False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("\\frac{1}{2}", "-\\frac{1}{2}", False),
    ("\\frac{3}{2}", "1.5", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("\\frac{10}{3}", "3\\frac{1}{3}", True),
    (".5", "0.5", True),
    ("\\frac{7}{2}", "3.5", True),
    ("\\frac{22}{7}", "\\pi", False),
    ("3.14", "\\pi", False),
    # percentages, money, degrees, units
    ("50\\%", "50", True),
    ("50%", "50\\%", True),
    ("0.5", "50\\%", True),
    ("50", "5\\%", False),
    ("\\$18", "18", True),
    ("18", "\\$18.00", True),
    ("\\$ 1,200", "1200", True),
    ("17", "\\$18", False),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("45", "90^\\circ", False),
    ("30°", "30", True),
    ("5\\text{ cm}", "5", True),
    ("12 \\text{ inches}", "12", True),
    ("5\\text{ cm}^2", "5", True),
    ("10\\mbox{ meters}", "10", True),
    ("6", "5\\text{ cm}", False),
    ("3 \\text{ hours}", "3", True),
    # spacing, \left \right, text wrappers, trailing period
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("1\\,000", "1000", True),
    ("\\!3", "3", True),
    ("3.", "3", True),
    ("\\text{5}", "5", True),
    ("\\textbf{7}", "7", True),
    ("\\displaystyle\\frac{1}{2}", "\\frac{1}{2}", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True),
    ("\\mathrm{7}", "7", True),
    # variable prefixes
    ("x = 3", "3", True),
    ("x=3", "3", True),
    ("a=-2", "-2", True),
    ("k = 5", "6", False),
    ("n=12", "12", True),
    ("y = 2x + 3", "2x+3", True),
    ("y=2x+3", "y = 3 + 2x", True),
    ("y=2x+3", "y=2x-3", False),
    # multiple choice
    ("(C)", "C", True),
    ("C", "(C)", True),
    ("\\text{(C)}", "C", True),
    ("\\textbf{(C)}", "C", True),
    ("(B)", "C", False),
    ("D", "\\text{(D)}", True),
    ("A", "B", False),
    # roots, pi, infinity, expressions
    ("\\sqrt{2}", "\\sqrt2", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("3\\sqrt{2}", "\\sqrt{18}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("2\\pi", "2 \\pi", True),
    ("\\pi", "\\pi", True),
    ("\\frac{\\pi}{2}", "\\frac12\\pi", True),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}", False),
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    ("6\\pi", "18.85", False),
    ("2x+1", "1+2x", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "(x+1)^2", False),
    ("\\frac{x}{2}", "0.5x", True),
    ("2^{10}", "1024", True),
    ("2^{10}", "1000", False),
    ("3^4", "81", True),
    ("x^3", "x^2", False),
    ("\\frac{1}{x}", "x^{-1}", True),
    ("a+b", "b+a", True),
    ("a-b", "b-a", False),
    ("2(x+1)", "2x+2", True),
    ("\\sin x", "\\sin(x)", True),
    ("\\cos x", "\\sin x", False),
    ("\\log 8", "3\\log 2", True),
    ("5!", "120", True),
    ("4!", "25", False),
    ("|{-3}|", "3", True),
    ("10^{-2}", "0.01", True),
    ("1\\times 10^{3}", "1000", True),
    ("6 \\cdot 7", "42", True),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}", True),
    ("\\frac{1-\\sqrt{5}}{2}", "\\frac{1+\\sqrt{5}}{2}", False),
    ("2\\sqrt{2}+1", "1+\\sqrt{8}", True),
    ("\\theta", "\\theta", True),
    ("\\alpha+1", "1+\\alpha", True),
    # equations
    ("x^2+y^2=1", "y^2+x^2=1", True),
    ("x+y=1", "1=x+y", True),
    ("x+y=1", "x+y=2", False),
    ("2x=4", "x=2", False),
    # tuples and points: order matters
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False),
    ("(1,2,3)", "(1,2)", False),
    ("(-1, 2)", "(1, 2)", False),
    ("\\left(\\frac{1}{2}, 3\\right)", "(0.5, 3)", True),
    ("(3, -\\frac{1}{2})", "(3,-0.5)", True),
    ("(0, 0)", "(0,0)", True),
    ("(\\sqrt{2}, 1)", "(\\sqrt2,1)", True),
    ("(2\\sqrt{2}, 1)", "(\\sqrt{8}, 1)", True),
    ("(1,2)", "[1,2]", False),
    # intervals: open vs closed matters
    ("[1, 3]", "[1,3]", True),
    ("(1, 3)", "[1, 3]", False),
    ("[1, 3)", "[1, 3]", False),
    ("(1, 3]", "(1,3]", True),
    ("(-\\infty, 2)", "(-\\infty,2)", True),
    ("(-\\infty, 2]", "(-\\infty, 2)", False),
    ("[0, \\infty)", "[0,\\infty)", True),
    ("(-\\infty, -1) \\cup (1, \\infty)", "(-\\infty,-1)\\cup(1,\\infty)", True),
    ("(-\\infty, -1] \\cup (1, \\infty)", "(-\\infty,-1)\\cup(1,\\infty)", False),
    ("(2, 5)", "(2, 6)", False),
    ("[\\frac{1}{2}, 1]", "[0.5, 1]", True),
    # sets and lists: order does not matter
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1, 2\\}", "\\{1, 2, 2\\}", True),
    ("1, 2", "2, 1", True),
    ("1,2", "1, 2", True),
    ("1, 2", "1, 2, 3", False),
    ("-1, 1", "1, -1", True),
    ("3, 5", "3, 4", False),
    ("\\frac{1}{2}, 2", "2, 0.5", True),
    ("1, 2", "12", False),
    ("x = 1, 2", "1,2", True),
    # matrices
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    ("\\begin{bmatrix} \\frac{1}{2} \\\\ 1 \\end{bmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", True),
    # more near misses
    ("-42", "42", False),
    ("4.2", "42", False),
    ("\\frac{1}{4}", "0.2", False),
    ("25\\%", "0.52", False),
    ("(1, -2)", "(-1, 2)", False),
    ("[0, 1)", "(0, 1]", False),
    ("\\{0\\}", "\\{\\}", False),
    ("2\\sqrt{2}", "\\sqrt{2}", False),
    ("x^2-4", "(x-2)^2", False),
    ("\\frac{x+1}{2}", "\\frac{x}{2}+1", False),
    ("2^{11}", "2048.5", False),
    ("1.4142", "\\sqrt{2}", False),
    ("120", "5!+1", False),
    ("(C)", "(D)", False),
    ("\\pi r^2", "2\\pi r", False),
    ("\\frac{3}{5}", "60", False),
    ("y=x", "y=-x", False),
    # words and junk
    ("\\text{yes}", "\\text{Yes}", True),
    ("\\text{no}", "\\text{no}", True),
    ("", "5", False),
    ("foo", "5", False),
    ("5 + ", "5", False),
    ("\\frac{1}{0}", "1", False),
    ("1/00", "1", False),
    ("\\frac{1}{00}", "1", False),
    ("\\unknown{3}", "3", False),
    ("x", "y", False),
    # everyday notation: unicode, \\over, mixed numbers, separators, units, assignments, \\pm,
    # empty sets, solution lists in any order, relations against intervals, bases, text answers
    ("−3", "-3", True),
    ("−3", "3", False),
    ("2π", "2\\pi", True),
    ("π/2", "\\frac{\\pi}{2}", True),
    ("π", "2\\pi", False),
    ("3−\\sqrt{2}", "3-\\sqrt2", True),
    ("{3 \\over 4}", "\\frac34", True),
    ("{3 \\over 4}", "\\frac43", False),
    ("3\\frac{1}{2}", "\\frac72", True),
    ("3\\frac12", "3.5", True),
    ("2\\frac{1}{3}", "\\frac{2}{3}", False),
    ("11,\\! 111", "11111", True),
    ("32,\\!349", "32349", True),
    ("11,\\!111", "11112", False),
    ("32, 349", "32349", False),
    ("125\\textnormal{ miles}", "125", True),
    ("15\\mbox{ cm}^2", "15", True),
    ("\\text{12 cm}", "12", True),
    ("12 \\text{ cm}", "13", False),
    ("\\text{12 cm}", "13", False),
    ("x=3, y=-1", "(3,-1)", True),
    ("x=3, y=-1", "(-1,3)", False),
    ("(3,-1)", "x=3, y=-1", True),
    ("\\pm 1", "\\{-1,1\\}", True),
    ("\\pm 2", "\\{-1,1\\}", False),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("1 \\pm \\sqrt{19}", "1 + \\sqrt{19}", False),
    ("-1, 1", "\\pm 1", True),
    ("\\varnothing", "\\emptyset", True),
    ("\\varnothing", "\\{0\\}", False),
    ("\\emptyset", "\\varnothing", True),
    ("(3,4),(1,2)", "(1,2),(3,4)", True),
    ("(3,4),(1,3)", "(1,2),(3,4)", False),
    ("(1,2),(3,4)", "\\{(1,2),(3,4)\\}", True),
    ("(2,1),(4,3)", "(1,2),(3,4)", False),
    ("30°", "30", True),
    ("30°", "60", False),
    ("1\\,000", "1000", True),
    ("1\\,000\\,000", "10^6", True),
    ("1\\,001", "1000", False),
    ("x<3", "(-\\infty,3)", True),
    ("x>3", "(-\\infty,3)", False),
    ("2\\le x\\le 5", "[2,5]", True),
    ("2< x\\le 5", "[2,5]", False),
    ("x \\geq 5", "5 \\le x", True),
    ("x > 5", "x < 5", False),
    ("x \\neq 3", "x != 3", True),
    ("204_5", "204_5", True),
    ("1112122_3", "1112112_3", False),
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("\\text{Evelyn}", "\\text{Briana}", False),
    ("\\text{(B)}", "B", True),
    ("\\textbf{(E)}", "\\text{(E)}", True),
    ("\\frac{9}{4}\\pi", "\\frac94\\pi", True),
    ("\\sqrt 2+\\sqrt 5", "\\sqrt{2}+\\sqrt{5}", True),
    ("\\sqrt 2+\\sqrt 6", "\\sqrt{2}+\\sqrt{5}", False),
    ("[-1, -\\tfrac12) \\cup (-\\tfrac12, 0)", "[-1,-\\frac{1}{2})\\cup(-\\frac{1}{2},0)", True),
    ("[-1, -\\tfrac12] \\cup (-\\tfrac12, 0)", "[-1,-\\frac{1}{2})\\cup(-\\frac{1}{2},0)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("\\left( 3, \\frac{\\pi}{3} \\right)", "(3,\\frac{\\pi}{2})", False),
    ("\\frac{\\pi r}{h+r}", "\\frac{\\pi r}{r+h}", True),
    ("\\frac{\\pi r}{h-r}", "\\frac{\\pi r}{h+r}", False),
    ("2 \\sin b \\cos a", "2\\cos a\\sin b", True),
    ("2 \\sin a \\cos b", "2\\cos a\\sin b", False),
    ("\\$16,\\!386.20", "16386.20", True),
    ("\\$16386.17", "16386.20", False),
    ("20\\%", "20", True),
    ("28 \\%", "28\\%", True),
    ("0.0833333333", "\\frac{1}{12}", True),
    ("(1,4.5)", "(1,\\frac{9}{2})", True),
    ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True),
    ("\\sec^2(y)", "\\tan^2(y)+1", True),
    ("-34x-45y+20z-100=0", "34x+45y-20z+100=0", True),
    ("x+1", "x+2n+1", False),
    ("\\frac{1+\\sqrt{5}}{2}", "2", False),
    ("4\\sqrt{2}", "4", False),
    ("\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}0&3\\\\0&-1\\end{pmatrix}", True),
    (
        "\\left[\\begin{array}{cc}1 & 2 \\\\3 & 4\\end{array}\\right]",
        "\\begin{pmatrix}1 & 2 \\\\3 & 4\\end{pmatrix}",
        True,
    ),
    (
        "\\begin{pmatrix}1 & 2 \\\\ 3 & 5\\end{pmatrix}",
        "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}",
        False,
    ),
    ("k=1", "1", True),
    ("x = \\frac{1}{3}", "\\frac13", True),
    ("y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0", True),
    ("f(2) < f(1) < f(4)", "f(2) < f(1) < f(4)", True),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),
    ("-2,1", "1, -2", True),
    ("-2,1", "-2, 2", False),
    ("\\text{C}", "\\text{(C)}", True),
    ("E", "\\text{E}", True),
    ("0.3333", "\\frac{1}{3}", False),
    ("\\frac{14}{3}", "4.67", False),
    ("9", "9.0", True),
    ("0,111", "0.111", True),
    ("1000.99", "1,000.99", True),
    ("7,425,000", "7425000", True),
    ("1 000", "1000", True),
    (".4", "0.4", True),
    ("-\\frac{10}{9}", "-10/9", True),
    ("\\frac{10}{9}", "-10/9", False),
    ("\\cfrac{1}{3}", "1/3", True),
    ("\\frac3{3}", "1", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("\\sqrt[3]{3}", "\\sqrt{3}", False),
    ("1.5\\text{ hours}", "\\frac32", True),
    ("\\dfrac{5\\sqrt{42}}{27}", "\\frac{5\\sqrt{42}}{27}", True),
    ("12\\text{ and }13", "12, 13", True),
]


@pytest.mark.parametrize("pred,truth,expected", CASES)
def test_answer_table(pred, truth, expected):
    assert ev.grade(f"so the answer is \\boxed{{{pred}}}.", truth) == float(expected)


def test_tables_are_large_and_balanced():
    assert len(CASES) >= 200 and len(RESPONSES) >= 60
    for table in (CASES, RESPONSES):
        assert sum(e for *_, e in table) > len(table) / 3 and sum(not e for *_, e in table) > len(table) / 4


# (gold, whole response, equivalent?): the kinds of cases in Math-Verify's public tests
# (tests/test_all.py in huggingface/Math-Verify), written here for this project: a worked
# solution whose last box holds the answer, in the notations those tests exercise.
RESPONSES = [
    ("2-2p", r"Since $x<2$, we get $|x-2|=2-x$. With $2-x=p$ we have $x=2-p$, so $x-p=\boxed{2-2p}$.", True),
    ("2-2p", r"Since $x<2$, we get $|x-2|=2-x$, so $x-p=\boxed{2+2p}$.", False),
    (
        "3\\sqrt{13}",
        r"By the distance formula, \begin{align*} \sqrt{6^2 + 9^2} &= \sqrt{117} = \boxed{3\sqrt{13}}. \end{align*}",
        True,
    ),
    ("3\\sqrt{13}", r"The distance is $\sqrt{117} = \boxed{\sqrt{117}}$.", True),
    ("3\\sqrt{13}", r"The distance is $\boxed{13\sqrt{3}}$.", False),
    ("\\frac{3}{56}", "Then \\[p(8) = \\frac{q(8) + 8}{63} = \\boxed{\\frac{3}{56}}.\\]", True),
    ("\\frac{3}{56}", "Then \\[p(8) = \\boxed{\\frac{56}{3}}.\\]", False),
    ("2", r"Only $4^2=16$ and $6^2=36$ end in $6$, so there are $\boxed{2}$ possible values.", True),
    ("15\\mbox{ cm}^2", r"The area is $$\frac{1}{2}\times 3 \times 10 = \boxed{15\mbox{ cm}^2}.$$", True),
    ("15\\mbox{ cm}^2", r"The area is $$\boxed{30\mbox{ cm}^2}.$$", False),
    ("-2,1", r"Checking the divisors of 14, the integer roots are $\boxed{-2,1}.$", True),
    ("-2,1", r"Checking the divisors of 14, the integer roots are $\boxed{-2,1,7}.$", False),
    ("9", r"Since $3^5 \equiv 1$, we get $129^{34}+96^{38} \equiv \boxed{9} \pmod{11}.$", True),
    (
        "90^\\circ",
        r"\begin{align*} \angle BAC &= 50^\circ+40^\circ \\ &= \boxed{90^\circ}. \end{align*}",
        True,
    ),
    ("90^\\circ", r"The lines are perpendicular, so the angle is $\boxed{90}$ degrees.", True),
    ("90^\\circ", r"\begin{align*} \angle BAC &= \boxed{80^\circ}. \end{align*}", False),
    ("0", r"The polynomials agree at three points, so the degree of $p(x)$ is $\boxed{0}.$", True),
    ("204_5", r"Long division in base 5 gives a quotient of $\boxed{204_5}$.", True),
    ("1112112_3", r"Reading the remainders upwards, \(\boxed{1112122_3}\).", False),
    ("(6,31,-1)", r"Solving the system, we find $(p,q,r) = \boxed{(6,31,-1)}.$", True),
    ("(6,31,-1)", r"Solving the system, we find $(p,q,r) = \boxed{(6,-1,31)}.$", False),
    ("1 \\pm \\sqrt{19}", r"By the quadratic formula, $x = \boxed{1 \pm \sqrt{19}}.$", True),
    ("1 \\pm \\sqrt{19}", r"By the quadratic formula, $x = \boxed{1 + \sqrt{19}}.$", False),
    ("3 \\pm 2 \\sqrt{2}", r"So the roots are $x = \boxed{3 + 2\sqrt2, 3 - 2\sqrt2}.$", True),
    (
        "\\{1\\pm\\sqrt{5},-2\\}",
        r"The roots are $-2$ and $1 \pm \sqrt{5}$, so the answer is $\boxed{\{1\pm\sqrt{5},-2\}}.$",
        True,
    ),
    ("f(2) < f(1) < f(4)", "The axis of symmetry is $x = 2$.\n\nHence, $\\boxed{f(2) < f(1) < f(4)}.$", True),
    (
        "2 \\sin b \\cos a",
        "By sum-to-product,\n\\[\\sin (a + b) - \\sin (a - b) = \\boxed{2 \\sin b \\cos a}.\\]",
        True,
    ),
    ("\\frac{\\pi r}{h+r}", r"We have $s = h+r$, so the ratio is $\boxed{\frac{\pi r}{h+r}}$.", True),
    ("125", r"The distance is $\boxed{125\textnormal{ miles}}.$", True),
    (
        "[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0) \\cup (0, 1) \\cup (1, \\infty)",
        r"The solution set is $\boxed{[-1, -\tfrac12) \cup (-\tfrac12, 0) \cup (0, 1) \cup (1, \infty)}.$",
        True,
    ),
    (
        "[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0) \\cup (0, 1) \\cup (1, \\infty)",
        r"The solution set is $\boxed{[-1, 0) \cup (0, 1) \cup (1, \infty)}.$",
        False,
    ),
    ("\\sqrt{2}+\\sqrt{5}", r"The answer is $\boxed{\sqrt 2+\sqrt 5}$", True),
    ("\\frac{9}{4}\\pi", r"Therefore $\boxed{\frac94\pi}$.", True),
    ("\\{-1\\} \\cup [0,7)", r"Combining the cases, $x \in \boxed{\{-1\} \cup [0,7)}.$", True),
    ("\\{-1\\} \\cup [0,7)", r"Combining the cases, $x \in \boxed{\{-1\} \cup [0,7]}.$", False),
    (
        "\\text{Evelyn}",
        r"Evelyn covered more distance in less time, so $\boxed{\text{Evelyn}}$ is our answer.",
        True,
    ),
    ("\\text{Evelyn}", r"Carla went the farthest, so $\boxed{\text{Carla}}$ is our answer.", False),
    (
        "14{,}916",
        r"Our next possibility, $14{,}916,$ is a multiple of $3$. Therefore, $\boxed{14{,}916}$ is our answer.",
        True,
    ),
    ("14916", r"The smallest possible value of $N$ is $\boxed{14{,}916}$. I hope it is correct.", True),
    ("14916", r"Thus $N$ is $14{,}940$. The smallest possible value of $N$ is $\boxed{14{,}940}$.", False),
    (
        "16386.20",
        r"Paula's investment is worth $\boxed{\$16,\!386.20}$ at the end. The answer is $16,\!386.20$.",
        True,
    ),
    (
        "16386.17",
        r"Rounded to the nearest cent, the investment is worth $\boxed{\$16386.17}$ after 5 years.",
        True,
    ),
    (
        "16386.16",
        r"Rounded to the nearest cent, the investment is worth $\boxed{\$16386.17}$ after 5 years.",
        False,
    ),
    (
        "(3, \\frac{\\pi}{2})",
        r"So the polar coordinates are $\boxed{\left( 3, \frac{\pi}{2} \right)}.$",
        True,
    ),
    ("\\frac{14}{3}", r"$f(-2)+f(-1)+f(0)=2+\frac{5}{3}+1=\boxed{\frac{14}{3}}$", True),
    (
        "20\\%",
        r"Thus the percentage of children is $\frac{1}{5}=\boxed{20 \%}. $ Final Answer: The final answer is $20 \%$.",
        True,
    ),
    ("20", r"Solving for $x$ yields $x=1/5$, or $\boxed{20}$ percent.", True),
    ("x-2y+z-1=0", r"$$-1(x-1)+2(y-1)+1(z-1)=0\Rightarrow\boxed{x-2y+z-1=0}.$$", True),
    ("x-2y+z-1=0", r"$$\boxed{x-2y+z+1=0}.$$", False),
    (
        "[-4,0]",
        "Thus, the values of \\( k \\) for which the quadratic has real roots are: \\[ \\boxed{[-4, 0]} \\]",
        True,
    ),
    ("(-6, 10)", r"Substituting $x = 5$ gives $B = 10$. Therefore, $(A, B) = \boxed{(-6, 10)}.$", True),
    ("C", r"So the answer is $\boxed{\text{(C)}}.$", True),
    ("11111111100", r"The least such number is $\boxed{11,\! 111,\! 111,\! 100}$", True),
    ("32349", r"so the sum is $\boxed{32,\! 349}$", True),
    ("32349", r"so the sum is $\boxed{32, 349}$", False),
    ("(2, 12) \\cup (12, 102)", r"Thus, the answer is $x \in \boxed{(2,12) \cup (12,102)}$", True),
    ("1,2", r"$\boxed{1}\boxed{2}$", True),
    (
        "1,-2",
        "Solving, \\(n^2+n-2=0\\).\n\n**Final Answer**\nThe integers are \\boxed{-2} and \\boxed{1}.",
        True,
    ),
    ("1,-2", "**Final Answer**\nThe integers are \\boxed{-2} and \\boxed{2}.", False),
    (
        "189",
        "So the area is 189.\n\n**Final Answer**\n\\boxed{189}\n</think>\n\nThus, the area of the trapezoid is \\(\\boxed{189}\\) square centimeters.",
        True,
    ),
    (
        "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}",
        "\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.",
        True,
    ),
    (
        "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}",
        "\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 1 & -1 \\end{pmatrix}\n}.",
        False,
    ),
    (
        "[-3,2]",
        r"The expression is positive outside the roots, so the domain is $\boxed{[-3, 2]}$. I apologize, let me correct it: the domain is $\boxed{(-\infty, -3] \cup [2, \infty)}$.",
        False,
    ),
    (
        "(0,1]",
        r"First I thought $\boxed{(0,1)}$, but $x=1$ is allowed, so the domain is $\boxed{(0, 1]}$.",
        True,
    ),
    ("\\frac{1}{3}", r"The answer is $\boxed{\frac{1}{3}.}$", True),
    ("5", r"The answer is $\boxed{5 \text{ cm}.}$", True),
    ("2", r"$\boxed{2^{10}}.$", False),
    ("1, 2, 3", r"$\boxed{1, 2, 3, \ldots}$", False),
    ("\\frac{5\\sqrt{42}}{27}", r"Rationalising, the ratio is $\boxed{\frac{5\sqrt{42}}{27}}$.", True),
    ("x \\in [-2,7]", r"The quadratic is non-positive between its roots, so $\boxed{-2 \le x \le 7}$.", True),
    ("-2 \\le x \\le 7", r"So the solution set is $x \in \boxed{[-2,7]}$.", True),
]


@pytest.mark.parametrize("truth,response,expected", RESPONSES)
def test_whole_responses(truth, response, expected):
    assert ev.grade(response, truth) == float(expected)


@pytest.mark.parametrize(
    "rule,pred,truth",
    [
        (0, "\\varnothing", "\\emptyset"),
        (1, "30°", "30"),
        (2, "1\\,000", "1000"),
        (2, "1 000", "1000"),
        (3, "\\text{12 cm}", "12"),
        (4, "\\frac{1}{3}.", "\\frac13"),
        (4, "5 \\text{ cm}.", "5"),
        (5, "∞", "\\infty"),
        (5, "(-∞, 3)", "(-\\infty, 3)"),
        (6, "5 = x", "5"),
        (6, "\\frac{1}{2} = y", "\\frac12"),
        (7, "3.2e5", "320000"),
        (7, "1e-7", "0.0000001"),
        (8, "0.\\overline{3}", "\\frac{1}{3}"),
        (8, "1.1\\overline{6}", "\\frac{7}{6}"),
        (9, "0.333\\ldots", "\\frac13"),
        (9, "0.1666...", "\\frac{1}{6}"),
        (9, "0.142857142857\\dots", "\\frac{1}{7}"),
    ],
)
def test_each_thin_rule_is_needed(monkeypatch, rule, pred, truth):
    """Every normalisation in eval.NORMALISE fixes a case Math-Verify gets wrong on its own."""
    response = f"The answer is $\\boxed{{{pred}}}$."
    assert ev.grade(response, truth) == 1.0
    monkeypatch.setattr(ev, "NORMALISE", [r for k, r in enumerate(ev.NORMALISE) if k != rule])
    assert ev.grade(response, truth) == 0.0


@pytest.mark.parametrize(
    "pred,truth",
    [
        ("0.333", "\\frac13"),  # a rounded decimal is not the fraction
        ("0.3\\ldots", "\\frac13"),  # no repeat shown: read as it stands
        ("2e", "2"),
        ("e^{2}", "e^2"),
        ("x = 5", "5 = x"),
        ("1, 2, 3, \\ldots", "1, 2, 3"),
    ],
)
def test_the_rules_leave_other_answers_alone(pred, truth):
    response = f"The answer is $\\boxed{{{pred}}}$."
    assert ev.grade(response, truth) == float(pred in ("e^{2}", "x = 5"))


@pytest.mark.parametrize("pred", ["\\,9\\,", "\\;9", "9\\,", "\\, 9 \\,", "\\!9"])
def test_a_padded_box_agrees_with_math_verify_alone(pred):
    from math_verify import LatexExtractionConfig, parse, verify

    response = f"So $\\boxed{{{pred}}}$."
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    alone = verify(parse("$9$", config), parse(response, config))
    assert ev.grade(response, "9") == float(alone) == 1.0


@pytest.mark.parametrize(
    "pred",
    [
        "3 \\text{ (or possibly 4)}",
        "3 \\text{ maybe}",
        "3 \\text{ (or 4)}",
        "3 \\text{ (probably)}",
        "3 \\text{, perhaps 4}",
    ],
)
def test_a_hedged_box_gets_no_credit(monkeypatch, pred):
    response = f"The answer is $\\boxed{{{pred}}}$."
    assert ev.grade(response, "3") == 0.0
    assert ev.grade(response, "3 \\text{ (or 4)}") in (0.0, 1.0)  # a gold that hedges is not refused
    monkeypatch.setattr(ev, "HEDGED", re.compile(r"(?!)"))
    assert ev.grade(response, "3") == 1.0


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("\\boxed{0.0000001}", 1e-7, 1.0),
        ("\\boxed{1e-7}", 1e-7, 1.0),
        ("\\boxed{2.5}", 2.5, 1.0),
        ("\\boxed{12}", 12, 1.0),
        ("\\boxed{13}", 12, 0.0),
        ("\\boxed{1, 2}", [1, 2], 1.0),
        ("\\boxed{1, 3}", [1, 2], 0.0),
        ("\\boxed{None}", None, 0.0),
        ("\\boxed{nan}", math.nan, 0.0),
        ("\\boxed{\\infty}", math.inf, 0.0),
        ("\\boxed{True}", True, 0.0),
        ("\\boxed{1}", True, 0.0),
        ("\\boxed{1}", {"a": 1}, 0.0),
        ("\\boxed{1}", [], 0.0),
        ("\\boxed{1}", [None], 0.0),
        ("\\boxed{1}", 10**5000, 0.0),
    ],
    ids=lambda v: repr(v)[:30] if not isinstance(v, int) or abs(v) < 10**30 else "huge",
)
def test_golds_of_any_type(response, gold, expected):
    assert ev.grade(response, gold) == expected


def test_relations_equal_intervals_only_with_the_setting(monkeypatch):
    assert ev.grade("\\boxed{x < 3}", "(-\\infty, 3)") == 1.0
    gold, pred = ev.as_latex("(-\\infty, 3)"), "\\boxed{x < 3}"
    assert ev.CHECKER.check(gold, pred, 5.0)[0] is True
    from math_verify import LatexExtractionConfig, parse, verify  # the library's default: not equal

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    assert not verify(
        parse(gold, config, parsing_timeout=None),
        parse(pred, config, parsing_timeout=None),
        timeout_seconds=None,
    )


def test_integer_shortcut_gives_math_verifys_verdict():
    pairs = [
        ("42", "42"),
        ("042", "42"),
        ("-0", "0"),
        ("7", "-7"),
        ("1000", "999"),
        ("12345678901234567890", "12345678901234567890"),
    ]
    for pred, truth in pairs:
        assert ev.check(truth, f"\\boxed{{{pred}}}")[0] == float(
            ev.CHECKER.check(ev.as_latex(truth), f"\\boxed{{{pred}}}", 5.0)[0]
        )


def test_maj_key_is_the_parsed_answer():
    assert ev.check("0.5", "\\boxed{\\frac{1}{2}}")[1] == ev.check("0.5", "\\boxed{1/2}")[1] == "1/2"
    assert ev.check("3", "\\boxed{03}")[1] == "3" and ev.check("3", "no box") == (0.0, None)


@pytest.mark.parametrize(
    "text,answer",
    [
        ("a \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
        ("answer: \\fbox{7}", "7"),
        ("so \\boxed 5$.", "5"),
        ("\\boxed { 9 }", " 9 "),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
        ("\\boxed{a} and \\fbox{b}", "b"),
    ],
)
def test_extract_answer(text, answer):
    assert ev.extract_answer(text) == answer


def test_gsm8k_format():
    assert ev.grade("she pays 3*6=18\n#### 18", "18", answer_format="gsm8k") == 1.0
    assert ev.grade("she pays 3*6=18\n#### 18", "#### 18", answer_format="gsm8k") == 1.0
    assert ev.grade("#### 1,800", "1800", answer_format="gsm8k") == 1.0
    assert ev.grade("#### $18.00", "18", answer_format="gsm8k") == 1.0
    assert ev.grade("#### 17", "18", answer_format="gsm8k") == 0.0
    assert ev.grade("\\boxed{18}", "18", answer_format="gsm8k") == 0.0
    assert ev.grade("#### 18", "18") == 0.0  # boxed is the default: no box, no credit
    assert ev.grade("The final answer is 18", "18") == 0.0


ADVERSARIAL = [
    "2^{2^{2^{2^{2^{2}}}}}",
    "10^{10^{10}}",
    "9^{9^{9^{9}}}",
    "9^9^9^9",
    "2**2**2**2**2",
    "((((100!)!)!)!)",
    "1000!",
    "(" * 200 + "1" + ")" * 200,
    "{" * 200 + "1" + "}" * 200,
    "\\frac{" * 200 + "1" + "}{2}" * 200,
    "\\frac{" * 500 + "1" + "}{2}" * 500,
    "x+" * 50_000 + "1",
    "+".join(["1"] * 400),
    "9" * 100_000,
    "9" * 1_000_000,
    "\\sqrt{" * 300 + "2" + "}" * 300,
    "\\sqrt[10^9]{2}",
    "(x+1)^{100000}",
    "(x+1)^{2999}-(x-1)^{2999}",
    "x^{x^{x^{x^{x}}}}-1",
    "{" * 8 + "1" + "}" * 8,
    "x" * 50_000_000,
]
TIMEOUT = 2.0


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=lambda a: a[:40])
def test_adversarial_inputs_return_zero_within_the_limit(answer):
    start = time.perf_counter()
    assert ev.grade(f"\\boxed{{{answer}}}", "7", timeout=TIMEOUT) == 0.0
    assert time.perf_counter() - start < TIMEOUT + 1.0


@pytest.mark.parametrize(
    "response",
    [
        "The final answer is 2**2**2**2**2",
        "The final answer is $9^9^9^9$.",
        "x" * 30_000_000 + " \\boxed{7}",
        "\\boxed{7} " + "{" * 1_000_000,
        "$" * 1_000_000 + "\\boxed{7}",
    ],
    ids=["plain tower", "dollar tower", "30 MB before", "brace flood after", "dollar flood"],
)
def test_adversarial_responses_are_graded_within_the_limit(response):
    start = time.perf_counter()
    assert ev.grade(response, "7", timeout=TIMEOUT) == float("\\boxed{7}" in response)
    assert time.perf_counter() - start < TIMEOUT + 1.0


def test_time_limit_stops_a_slow_check_from_a_thread():
    verdicts = []
    slow = "(x+1)^{2000}-(x-1)^{2000}"  # under the refusal limits, and slow for sympy on purpose
    thread = threading.Thread(
        target=lambda: verdicts.append(ev.grade(f"\\boxed{{{slow}}}", "y", timeout=0.3))
    )
    start = time.perf_counter()
    thread.start()
    thread.join()
    assert verdicts == [0.0] and time.perf_counter() - start < 0.3 + 1.0
    assert ev.grade("\\boxed{x+1}", "1+x") == 1.0  # the next check gets a fresh child


def test_grading_works_from_threads_and_pool_workers():
    jobs = [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{(1,2)}", "(2,1)"),
        ("\\boxed{x^2-1}", "(x-1)(x+1)"),
    ] * 4
    want = [1.0, 0.0, 1.0] * 4
    got = [None] * len(jobs)
    threads = [
        threading.Thread(target=lambda k=k: got.__setitem__(k, ev.grade(*jobs[k]))) for k in range(len(jobs))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        assert list(pool.map(ev.grade, *zip(*jobs))) == want


def test_a_crashed_check_is_retried_then_counts_as_not_equal(tmp_path):
    """Seen once under heavy load: a forked child segfaulted. A child that dies without a
    verdict is replaced and the check tried once more, then it counts as not equal."""
    crashed = tmp_path / "crashed"

    def crash_once(gold, pred):  # runs in the child; os._exit: dies without a word, as a crash does
        if not crashed.exists():
            crashed.touch()
            os._exit(70)
        return True, "1"

    checker = support.sandbox.Sandbox(crash_once)
    assert checker.check("$1$", "\\boxed{1}", 2.0) == (True, "1") and crashed.exists()
    checker._kill()
    checker = support.sandbox.Sandbox(lambda gold, pred: os._exit(70))
    start = time.perf_counter()
    assert checker.check("$1$", "\\boxed{1}", 2.0) == (False, None)
    assert time.perf_counter() - start < 2.0  # a crash is seen at once, not after the time limit
    checker._kill()


@pytest.mark.parametrize(
    "wrap",
    [
        "\\boxed{{{}}}",
        "The final answer is {}",
        "The final answer is ${}$.",
        "#### {}",
        "\\boxed{{1}} and $\\boxed{{{}}}$",
    ],
)
def test_no_code_runs_from_model_text(tmp_path, wrap):
    marker = tmp_path / "pwned"
    for payload in (
        f"__import__('os').system('touch {marker}')",
        f"eval(\"open('{marker}','w')\")",
        f"(lambda: __import__('pathlib').Path('{marker}').touch())()",
    ):
        for fmt in ("boxed", "gsm8k"):
            assert ev.grade(wrap.format(payload), "1", answer_format=fmt) == 0.0
            assert ev.grade("\\boxed{1}", payload, answer_format=fmt) == 0.0  # in the gold too
    assert not marker.exists()


def test_non_string_inputs_are_graded():
    assert ev.grade("\\boxed{1}", 1) == 1.0 and ev.grade("\\boxed{2}", 1) == 0.0
    assert ev.grade("\\boxed{None}", None) == 0.0 and ev.grade(None, "1") == 0.0


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
    got = [prompt for _, prompt in ev.load_prompts(path)]
    assert [(r["question"], r["ground_truth_answer"]) for r in got] == [
        ("q1", "1"),
        ("q2", "\\frac{1}{2}"),
        ("q3", "7"),
        ("q4", "3"),
        ("q5", "204"),
    ]
    assert got[0]["data_source"] == "dirl" and got[4]["Year"] == 2024
    fixture = ROOT / "tests" / "fixtures" / "benchmarks.json"
    assert len(ev.load_prompts(fixture)) >= 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ev.load_prompts(bad)


def rollout(prompt_id, reward, text, source="arith", finish="stop", step_map=(0, 0, 1, 2), prompt_len=4):
    return {
        "policy_step": 1,
        "prompt_id": prompt_id,
        "question": "q",
        "ground_truth_answer": "3",
        "data_source": source,
        "prompt_ids": list(range(prompt_len)),
        "response_ids": list(range(len(step_map))),
        "step_map": list(step_map),
        "logprobs": [0.0] * len(step_map),
        "text": text,
        "reward": reward,
        "finish": finish,
        "sampler": {"block_size": 4},
    }


def test_metrics_on_a_hand_made_file(tmp_path):
    right, wrong = "\\boxed{3}", "\\boxed{4}"
    records = (
        [rollout("a", 1.0, right)] * 3
        + [rollout("a", 0.0, wrong)]  # 3 of 4 right; majority 3 -> right
        + [rollout("b", 1.0, right)]
        + [rollout("b", 0.0, wrong, finish="length")] * 3  # 1 of 4; majority 4 -> wrong
    )
    path = tmp_path / "r.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in records) + "\nnot json\n" + json.dumps({"prompt_id": "c"}) + "\n"
    )
    result = ev.evaluate_file(path)
    m = result["sources"]["arith"]
    assert m["k"] == 4 and m["prompts"] == 2
    assert m["avg@4"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == 0.5
    assert m["truncated"] == pytest.approx(3 / 8)
    assert m["tokens_per_forward"] == pytest.approx(4 / 3)  # one block, steps 0,0,1,2 -> 3 forwards
    assert result["rewards_changed"] == 0
    assert (
        len(result["skipped_lines"]) == 2
        and ":9:" in result["skipped_lines"][0]
        and ":10:" in result["skipped_lines"][1]
    )
    with pytest.raises(ValueError, match="r.jsonl:9"):
        ev.evaluate_file(path, strict=True)


def test_pass_at_k_matches_closed_form():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (16, 5, 8), (5, 1, 5)]:
        expected = 1 - math.prod(
            (n - c - i) / (n - i) for i in range(k)
        )  # probability a k-subset has a right one
        assert ev.pass_at_k(n, c, k) == pytest.approx(expected)
    assert ev.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_tokens_per_forward_respects_absolute_block_positions():
    # prompt of 6 tokens, block 4: the first response block holds 2 tokens (positions 6, 7)
    record = rollout("a", 1.0, "", step_map=(0, 1, 0, 0, 0, 0), prompt_len=6)
    assert support.data.forwards_of(record) == 2 + 1


def test_cli_regrades_side_by_side_and_writes_json(tmp_path):
    before = tmp_path / "sft.jsonl"
    after = tmp_path / "final.jsonl"
    before.write_text(
        "\n".join(json.dumps(rollout(p, 1.0, "\\boxed{4}")) for p in "ab")
    )  # stale rewards: 4 != 3
    after.write_text("\n".join(json.dumps(rollout(p, 1.0, "\\boxed{3}")) for p in "ab"))
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            str(before),
            str(after),
            "--json",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "sft.jsonl" in result.stdout and "final.jsonl" in result.stdout and "avg@1" in result.stdout
    summary = json.loads(out.read_text())
    assert [s["sources"]["arith"]["avg@1"] for s in summary] == [0.0, 1.0]
    assert [s["rewards_changed"] for s in summary] == [2, 0]
    missing = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), str(tmp_path / "nope.jsonl")], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr


def test_run_log_and_plot(tmp_path):
    """--run appends held-out numbers to a run's metrics.jsonl; benchmarks/curves.py draws them beside the
    training reward (or, without matplotlib, says what to install)."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"time": 100.0 + 10 * k, "stage": "rollout", "step": k, "reward": 0.1 * k} for k in range(3)]
    lines += [{"time": 105.0 + 10 * k, "stage": "dipo", "step": k + 1, "reward": 0.1 * k} for k in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    held_out = tmp_path / "step_000002.jsonl"
    held_out.write_text(
        "\n".join(json.dumps({**rollout(p, 0.0, "\\boxed{3}"), "policy_step": 2}) for p in "ab")
    )
    subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), str(held_out), "--run", str(run)],
        check=True,
        capture_output=True,
    )
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (
        logged["stage"] == "eval"
        and logged["step"] == 2
        and logged["avg@1"] == 1.0
        and logged["file"] == str(held_out)
    )
    png = tmp_path / "curve.png"
    plot = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "curves.py"), str(png), str(run)],
        capture_output=True,
        text=True,
    )
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

    lines = [
        line(0, "eval", step=0),
        line(4, "rollout", event="start"),
        line(10, "rollout", step=0),
        line(12, "dipo", event="start"),
        line(20, "dipo", step=1),
        line(24, "rollout", event="start"),
        line(36, "dipo", step=2),
        line(96, "eval", step=2),  # a held-out evaluation of 60 s: left out
        line(100, "rollout", event="start"),
        line(112, "dipo", step=3),
        line(1000, "rollout", event="start"),
        line(1012, "dipo", step=4),
    ]  # stopped and restarted: gap capped at 2 x 4 s
    minutes = curves.loop_minutes(lines)
    assert minutes == pytest.approx({0: 0.0, 1: 20 / 60, 2: 36 / 60, 3: 52 / 60, 4: 72 / 60})


def test_comparison_curves_put_loop_and_control_on_the_minutes_after_the_plateau():
    """curves.comparison_curves: SFT's held-out curve continued by the control's steps, the loop's
    evaluations at their loop minutes, the control from the plateau's avg@k to its own at its minutes."""
    lines = [
        {"time": 0, "stage": "sft", "step": 100, "held_out_acc": 0.5},
        {"time": 1, "stage": "sft", "step": 200, "held_out_acc": 0.7},
        {"time": 2, "stage": "eval", "step": 0, "avg@8": 0.2},
        {"time": 4, "stage": "rollout", "event": "start"},
        {"time": 32, "stage": "dipo", "step": 1},
        {"time": 33, "stage": "eval", "step": 1, "avg@8": 0.25},
        {"time": 33, "stage": "rollout", "event": "start"},
        {"time": 63, "stage": "dipo", "step": 2},
        {"time": 90, "stage": "eval", "step": 2, "avg@8": 0.3},
    ]
    control = [
        {"time": 0, "stage": "sft", "event": "start", "config": {"minutes": 1.05}},
        {"time": 5, "stage": "sft", "step": 100, "held_out_acc": 0.71},
        {"time": 9, "stage": "eval", "step": 0, "avg@8": 0.18},
    ]
    curves_ = curves.comparison_curves(lines, control)
    assert curves_["plateau"] == 200
    assert curves_["sft"] == [(100, 0.5), (200, 0.7), (300, 0.71)]
    # step 1: 2 s before its rollout started and 28 s of work; step 2: 30 s more (the evaluation left out)
    assert [x for point in curves_["loop"] for x in point] == pytest.approx([0.0, 0.2, 0.5, 0.25, 1.0, 0.3])
    assert curves_["control"] == [(0.0, 0.2), (1.05, 0.18)]
    with pytest.raises(ValueError, match="control"):
        curves.comparison_curves(lines, control[:2])
