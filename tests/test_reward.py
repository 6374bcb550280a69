"""reward.py: the equivalence rule table, extraction, hostile inputs (bounded time in threads and
processes, no evaluation of model text) and the RL reward (its judge: tests/test_judge.py).
The expected verdicts below are written from the rules in the issue, by hand."""
import builtins
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

import pytest
import sympy

import reward
from reward import batch_rewards, compute_reward, extract_answer, is_equiv

T, F = True, False

# rule -> [(gold, pred, expected)]; every rule has equal and unequal pairs
RULES = {
    "integers, thousands separators": [
        ("1000", "1,000", T), ("7425000", "7,425,000", T), ("12345", "12{,}345", T), ("1000", "1 000", T),
        ("16386", "16,\\!386", T), ("1000", "100", F), ("1,000", "1,001", F), ("-5", "5", F)],
    "decimals": [
        ("0.5", ".5", T), ("2.50", "2.5", T), ("3", "3.0", T), ("1000.99", "1,000.99", T),
        ("0.25", "0.26", F), ("1.5", "15", F), ("3", "3.01", F)],
    "fractions": [
        ("\\frac{1}{2}", "\\dfrac{1}{2}", T), ("\\frac{3}{4}", "\\tfrac34", T), ("\\frac12", "0.5", T),
        ("1/2", "\\frac{2}{4}", T), ("1", "\\frac3{3}", T), ("-\\frac{2}{3}", "\\frac{-2}{3}", T),
        ("\\frac{x}{2}", "x/2", T), ("\\frac{10}{9}", "10/9", T), ("\\frac{1}{3}", "\\frac{1}{4}", F),
        ("\\frac{2}{3}", "\\frac{3}{2}", F), ("\\frac{1}{2}", "-\\frac{1}{2}", F)],
    "mixed numbers": [
        ("\\frac{7}{2}", "3\\frac12", T), ("\\frac{11}{4}", "2\\frac{3}{4}", T), ("\\frac{11}{4}", "2 3/4", T),
        ("\\frac{5}{2}", "2\\frac{1}{3}", F), ("\\frac{11}{4}", "2 1/4", F)],
    "radicals": [
        ("2\\sqrt{2}", "\\sqrt{8}", T), ("\\sqrt{3}", "\\sqrt3", T), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", T),
        ("\\sqrt[3]{8}", "2", T), ("\\sqrt{2}+\\sqrt{5}", "\\sqrt 5+\\sqrt 2", T), ("\\sqrt{2}", "\\sqrt{3}", F),
        ("3\\sqrt{2}", "2\\sqrt{3}", F), ("4", "4\\sqrt{2}", F), ("1\\sqrt{19}", "1", F)],
    "pi, e, i": [
        ("\\pi", "pi", T), ("2\\pi", "\\pi \\cdot 2", T), ("\\frac{\\pi}{2}", "\\pi/2", T), ("e^2", "\\exp(2)", T),
        ("-1", "e^{i\\pi}", T), ("3+4i", "4i+3", T), ("-1", "i^2", T), ("2i", "\\sqrt{-4}", T),
        ("\\pi", "3", F), ("3+4i", "3-4i", F), ("e", "e^2", F)],
    "powers": [
        ("1024", "2^{10}", T), ("x^2", "x\\cdot x", T), ("0.5", "2^{-1}", T), ("4", "8^{2/3}", T),
        ("2^{10}", "2^{11}", F), ("x^{3}", "x^{2}", F), ("2", "2^{10}", F)],
    "factorials, binomials": [
        ("120", "5!", T), ("\\binom{5}{2}", "10", T), ("\\dbinom{6}{3}", "20", T), ("{5 \\choose 2}", "10", T),
        ("\\binom{5}{2}", "\\binom{5}{3}", T), ("5!", "24", F), ("\\binom{6}{2}", "20", F), ("3!", "3", F)],
    "logs": [
        ("3", "\\log_2 8", T), ("3", "\\ln(e^3)", T), ("2", "\\log_{3}(9)", T), ("\\ln 4", "2\\ln 2", T),
        ("4", "\\log_2 8", F), ("\\ln 3", "\\ln 2", F)],
    "scientific notation": [
        ("1500", "1.5\\times10^{3}", T), ("0.03", "3\\cdot 10^{-2}", T), ("6.02\\times 10^{23}", "6.02e23", T),
        ("1500", "1.5\\times10^{2}", F), ("2\\times 10^{5}", "2\\times 10^{6}", F)],
    "percentages": [
        ("28\\%", "0.28", T), ("28\\%", "28", T), ("50\\%", "\\frac{1}{2}", T), ("12.5\\%", "0.125", T),
        ("28\\%", "28 percent", T), ("0.28", "28", F), ("28\\%", "27\\%", F), ("28", "\\frac{28}{100}", F)],
    "degrees": [
        ("90^\\circ", "90", T), ("45", "45^{\\circ}", T), ("30°", "30", T), ("60", "60^\\circ", T),
        ("90^\\circ", "45^\\circ", F), ("90", "180^\\circ", F)],
    "units and text wrappers": [
        ("5", "5\\text{ cm}", T), ("15\\mbox{ cm}^2", "15", T), ("12", "12 \\text{ meters}", T), ("10", "10 dollars", T),
        ("5", "\\$5.00", T), ("13", "\\text{13}", T), ("125", "125\\textnormal{ miles}", T),
        ("3", "4 \\text{ inches}", F), ("15", "16\\mbox{ cm}^2", F)],
    "dollar signs": [
        ("\\frac{1}{2}", "$\\frac{1}{2}$", T), ("1000", "\\$1,000", T), ("9", "$$ 9 $$", T), ("3", "$4$", F),
        ("2.5", "\\$2.05", F)],
    "x = 3 vs 3": [
        ("3", "x = 3", T), ("x=3", "3", T), ("k=1", "1", T), ("5", "|AB| = 5", T), ("11", "x \\approx 11", T),
        ("\\frac{1}{3}", "x = \\frac{1}{3} \\approx 0.33", T), ("x = 3", "x = 4", F), ("x=3", "y=3", F),
        ("10", "2x+4 = 10", F), ("0", "a + 3z = 0", F)],
    "equations": [
        ("y = 2x+3", "2x - y + 3 = 0", T), ("x + y = 1", "2x + 2y = 2", T), ("x^2 + y^2 = 4", "y^2 + x^2 = 4", T),
        ("34x+45y-20z+100=0", "-34x-45y+20z-100=0", T), ("x + y = 1", "x - y = 1", F), ("y = 2x+3", "y = 3x+2", F),
        ("x = 2y", "x = 2z", F)],
    "inequalities": [
        ("x > 5", "5 < x", T), ("x \\ge 3", "x \\geq 3", T), ("x < 1", "-x > -1", T), ("x > 5", "(5, \\infty)", T),
        ("-2 \\le x \\le 7", "x \\in [-2, 7]", T), ("[0, \\infty)", "x \\ge 0", T), ("x \\le 2", "x < 2", F),
        ("x > 5", "x < 5", F), ("-2 \\le x \\le 7", "(-2, 7]", F), ("x \\ne 3", "x = 3", F)],
    "intervals": [
        ("[0,1)", "[0, 1)", T), ("(-\\infty, 2)", "(-\\infty,2)", T), ("(\\frac{1}{2}, 3]", "(0.5, 3]", T),
        ("\\left[ 1, 2 \\right)", "[1,2)", T), ("\\mathbb{R}", "(-\\infty, \\infty)", T), ("(0,1)", "[0,1]", F),
        ("[0,1)", "(0,1]", F), ("(-\\infty, 2]", "(-\\infty, 2)", F), ("(0,9)", "[0,9)", F)],
    "unions": [
        ("(-\\infty,2)\\cup(3,\\infty)", "(3,\\infty)\\cup(-\\infty,2)", T),
        ("[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0)", "[-1, -\\tfrac12) \\cup (-\\tfrac12, 0)", T),
        ("\\{-1\\} \\cup [0,7)", "\\{-1\\}\\cup[0, 7)", T), ("(0,1)\\cup(2,3)", "(0,1)\\cup(2,3]", F),
        ("(0,1)\\cup(1,2)", "(0,2)", F), ("[0,1] \\cup [2,3]", "[0,1]", F)],
    "sets and unordered lists": [
        ("\\{1,2,3\\}", "\\{3,2,1\\}", T), ("1,2", "2,1", T), ("-2, 1", "1 and -2", T), ("\\emptyset", "\\{\\}", T),
        ("3, 5", "x = 3 \\text{ or } x = 5", T), ("1, 2, 3", "1, 2", F), ("\\{1,2\\}", "\\{1,3\\}", F),
        ("\\emptyset", "\\{0\\}", F), ("1, 2, 3", "1, 2, 3, \\ldots", F)],
    "ordered tuples and points": [
        ("(1,2)", "(1, 2)", T), ("(3, \\frac{\\pi}{2})", "\\left(3,\\frac{\\pi}{2}\\right)", T), ("(1,-2)", "(1, -2.0)", T),
        ("(1,2)", "(x, y) = (1, 2)", T), ("(6,31,-1)", "(6, 31, -1)", T), ("(1,2)", "(2,1)", F), ("(1,2,3)", "(1,2)", F),
        ("(3,1)", "1, 3", F)],
    "matrices and vectors": [
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1 & 2 \\\\ 3 & 4\\end{bmatrix}", T),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)", T),
        ("\\begin{pmatrix}\\frac12&0\\\\0&1\\end{pmatrix}", "\\begin{pmatrix}0.5&0\\\\0&1\\end{pmatrix}", T),
        ("\\begin{pmatrix}6&8\\\\10&12\\end{pmatrix}",
         "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}+\\begin{pmatrix}5&6\\\\7&8\\end{pmatrix}", T),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", F),
        ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\\\3\\end{pmatrix}", F),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(2,1)", F)],
    "plus-minus": [
        ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", T), ("\\pm 2", "2, -2", T), ("1 \\pm \\sqrt{19}", "x = 1 \\pm \\sqrt{19}", T),
        ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt5, 1-\\sqrt5", T), ("\\pm 2", "2", F), ("2 \\pm \\sqrt{3}", "2 \\pm \\sqrt{5}", F)],
    "infinity": [
        ("\\infty", "\\infty", T), ("\\infty", "infinity", T), ("(0, \\infty)", "(0, inf)", T), ("-\\infty", "\\infty", F),
        ("\\infty", "10^{100}", F)],
    "multiple-choice letters": [
        ("B", "(B)", T), ("B", "B.", T), ("B", "\\text{(B)}", T), ("\\text{(C)}", "C", T), ("E", "\\text{E}", T),
        ("B", "C", F), ("A", "(D)", F), ("\\text{(C)}", "\\textbf{(B)}", F)],
    "plain words": [
        ("Evelyn", "evelyn", T), ("\\text{Evelyn}", "Evelyn.", T), ("\\text{even}", "even", T), ("no solution", "No Solution", T),
        ("yes", "No", F), ("odd", "even", F), ("\\text{east}", "west", F)],
    "numeric tolerance (exact values)": [
        ("1/2^{98}", "1/2^{98}", T), ("e^{\\pi\\sqrt{163}}", "e^{\\sqrt{163}\\pi}", T), ("1/2^{98}", "1/2^{99}", F),
        ("1/2004!", "1/2006!", F), ("0.1", "0.1000000001", F), ("10^{-20}", "10^{-21}", F), ("2", "2.0001", F),
        ("16386.17", "16386.16", F), ("e^{-100}", "0", F), ("640320^3+744", "e^{\\pi\\sqrt{163}}", F)],
    "labelled golds and ratios": [
        ("V_1:V_2=11:21", "11:21", T), ("V_{1}:V_{2}=11:21", "22:42", T), ("S_{MBCN}:S=7:32", "7:32", T),
        ("\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}", "\\frac{1}{\\sqrt{6}}", T), ("A:B=1", "1", T),
        ("V_1:V_2=11:21", "21:11", F), ("\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}", "\\frac{1}{\\sqrt{5}}", F),
        ("12:00", "1:00", F), ("7 = 11a+c", "11a+c", F)],
    "list glue": [
        ("19, 46, and 82", "19, 46, \\text{ and } 82", T), ("(11,7)or(7,11)", "(7,11),\\ (11,7)", T),
        ("x_{1}=2,\\quadx_{2}=3", "2, 3", T), ("p=5,q=2;p=7,q=2", "(5,2),(7,2)", T),
        ("19, 46, and 82", "19, 46", F), ("(11,7)or(7,11)", "(7,11)", F), ("p=5,q=2;p=7,q=2", "(5,2),(2,7)", F)],
    "absolute-value inequalities vs intervals": [
        ("1\\leq|z|\\leq \\frac{3}{2}", "z \\in \\left[-\\frac{3}{2}, -1\\right] \\cup \\left[1, \\frac{3}{2}\\right]", T),
        ("|x| < 2", "(-2, 2)", T), ("|x| > 3", "(-\\infty,-3)\\cup(3,\\infty)", T), ("0<|x|\\le 1", "[-1,0)\\cup(0,1]", T),
        ("1\\leq|z|\\leq 2", "[1, 2]", F), ("|x|<2", "[-2,2]", F), ("|x| > 3", "(3,\\infty)", F)],
    "decimal commas and currency": [
        ("2.74", "2,74 \\$", T), ("2.74", "Soucis : 2,74 $ a..", T), ("1000.99", "1,000.99€", T), ("5", "£5", T),
        ("2.74", "2,75 $", F), ("1000", "1,000.99€", F), ("2", "AZYUK2A", F)],
    "percent": [
        ("12.5\\%", "12.5%", T), ("100\\%", "The error increases by 100%.", T), ("5\\%", "5 \\text{ percent}", T),
        ("50\\%", "0.05", F), ("12.5\\%", "0.0125", F)],
    "MathVision answer-key typos": [
        ("\x0crac{36}{13}", "\\frac{36}{13}", T), ("69{degrees}", "69", T), ("\\frac{3}{4}\\pi{inches}", "0.75\\pi", T),
        ("\\frac{7^3}{2^{12} 13^2}", "\\frac{343}{692224}", T), ("69{degrees}", "96", F), ("\x0crac{36}{13}", "36", F)],
    "Greek letters with subscripts": [
        ("\\theta_1", "\\theta_{1}", T), ("\\omega_L", "\\omega_{L}", T), ("2\\theta_1", "\\theta_1 + \\theta_1", T),
        ("\\alpha_1 + \\beta_2", "\\beta_{2} + \\alpha_{1}", T), ("\\theta_1", "\\theta_2", F), ("\\omega_L", "\\omega", F)],
    "inverse trig": [
        ("\\sin^{-1}(1/2)", "\\frac{\\pi}{6}", T), ("\\arcsin x", "\\sin^{-1} x", T), ("\\tan^{-1} 1", "\\frac{\\pi}{4}", T),
        ("\\cos^{-1}(0)", "\\frac{\\pi}{2}", T), ("\\sin^{-1}(1/2)", "2", F), ("\\frac{1}{\\sin x}", "\\sin^{-1} x", F)],
    "degrees inside trig": [
        ("\\frac{1}{2}", "\\sin 30^\\circ", T), ("\\frac{\\sqrt{3}}{2}", "\\cos(30°)", T), ("1", "\\tan 45^{\\circ}", T),
        ("\\frac{1}{2}", "\\sin 30", F), ("\\frac{1}{2}", "\\cos 30^\\circ", F)],
    "symbolic expressions": [
        ("\\frac{x+2}{7}", "\\frac{x}{7} + \\frac{2}{7}", T), ("\\tan^2 y + 1", "\\sec^2 y", T),
        ("(a+b)^2", "a^2 + 2ab + b^2", T), ("2\\sin x \\cos x", "\\sin 2x", T), ("\\frac{1}{\\sqrt{n}}", "\\sqrt{\\frac{1}{n}}", T),
        ("p - q", "-q + p", T), ("(a+b)^2", "a^2 + b^2", F), ("x + 1", "y + 1", F), ("x+2n+1", "x+1", F),
        ("(a+5)(b+2)", "(+5)(b+2)", F)],
}
CASES = [(rule, *case) for rule, cases in RULES.items() for case in cases]


def test_table_size_and_coverage():
    assert len(CASES) >= 150
    for rule, cases in RULES.items():
        assert {c[2] for c in cases} == {T, F}, f"{rule}: needs both equal and unequal pairs"


@pytest.mark.parametrize("rule,gold,pred,expected", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_equivalence_table(rule, gold, pred, expected):
    assert is_equiv(pred, gold) is expected


@pytest.mark.parametrize("rule,gold,pred,expected", CASES[::4], ids=[f"{c[0]}:{c[2]}" for c in CASES[::4]])
def test_equivalence_is_symmetric(rule, gold, pred, expected):
    assert is_equiv(gold, pred) is expected


def test_multiple_choice_with_option_texts():
    choices = ["3", "\\frac{1}{2}", "7", "0", "2\\sqrt{2}"]
    assert is_equiv("0.5", "B", choices)          # the option's value
    assert is_equiv("\\sqrt{8}", "E", choices)
    assert is_equiv("(B) 1/2", "B", choices)       # letter with its text
    assert is_equiv("b", "B", choices)
    assert not is_equiv("7", "B", choices)
    assert not is_equiv("(C)", "B", choices)
    assert is_equiv("C", "7", choices)             # gold given as text, pred as letter


# The decimal rule (reward.py's docstring), not symmetric: (gold, pred, expected), both directions.
DECIMALS = [
    # an exact gold with a finite decimal expansion: only that exact value
    ("3", "3.0", T), ("3", "3.00", T), ("\\frac38", "0.375", T), ("1500", "1.5\\times10^{3}", T),
    ("3", "2.99", F), ("100", "99.9", F), ("10", "9.99", F), ("4", "3.99", F), ("9", "8.99", F), ("70", "69.9", F),
    ("200", "199.9", F), ("3", "3.01", F), ("\\frac38", "0.38", F), ("2024", "2.02\\times10^3", F),
    # an exact gold with no finite decimal: correctly rounded, at least 4 significant digits
    ("\\sqrt{2}", "1.414", T), ("\\sqrt{2}", "1.4142", T), ("\\pi", "3.142", T), ("\\pi", "3.14159", T),
    ("\\frac{1}{3}", "0.3333", T), ("\\frac{2}{3}", "0.6667", T), ("\\frac{1}{12}", "0.0833333333333333", T),
    ("2024\\pi", "6358.6", T), ("e^{-10}", "0.00004540", T), ("\\sqrt{2}", "1.41", F), ("\\pi", "3.14", F),
    ("\\pi", "3.141", F), ("\\frac{1}{3}", "0.333", F), ("\\frac{2}{3}", "0.6666", F), ("\\frac{2}{3}", "0.67", F),
    ("e^{-10}", "0.0000454", F), ("2024\\pi", "6359", F),  # an integer is an exact claim
    # a decimal gold sets the precision asked for: an exact prediction that rounds to it (2+ digits)
    ("0.33", "\\frac13", T), ("3.14", "\\pi", T), ("1.41", "\\sqrt{2}", T), ("4.4", "\\sqrt{19}", T),
    ("2.5", "\\frac52", T), ("3.14", "\\frac{22}{7}", T),  # a 3-digit gold cannot tell 22/7 from pi
    ("0.34", "\\frac13", F), ("3.15", "\\pi", F), ("0.3", "\\frac13", F),
    ("2.5", "\\frac{51}{20}", F), ("0.5", "\\frac{51}{100}", F),
    # decimal against decimal: equal values only
    ("2.5", "2.50", T), ("0.125", ".125", T), ("2.5", "2.54", F), ("0.33", "0.333", F), ("0.333", "0.33", F),
    # matrices and intervals, cell by cell
    ("\\begin{pmatrix}\\frac13\\\\\\frac15\\end{pmatrix}", "\\begin{pmatrix}0.3333\\\\0.2\\end{pmatrix}", T),
    ("\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}", "\\begin{pmatrix}\\frac13\\\\\\frac15\\end{pmatrix}", T),
    ("(\\frac{3}{5},\\frac{8}{3}]", "(0.6,2.6667]", T),
    ("\\begin{pmatrix}\\frac13\\\\\\frac15\\end{pmatrix}", "\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}", F),
    ("\\begin{pmatrix}\\frac13\\\\\\frac15\\end{pmatrix}", "\\begin{pmatrix}0.3333\\\\0.21\\end{pmatrix}", F),
    ("(\\frac{3}{5},\\frac{8}{3}]", "(0.6,2.67]", F),
]


@pytest.mark.parametrize("gold,pred,expected", DECIMALS)
def test_decimal_rule(gold, pred, expected):
    assert is_equiv(pred, gold) is expected


# Reward hacks: answers a policy could learn to write that must never pay. Every row is False.
HACKS = [
    # near misses on both sides of each rounding boundary
    ("3", "2.9999"), ("3", "3.0001"), ("3", "2.99999999999"), ("\\sqrt{2}", "1.4141"), ("\\sqrt{2}", "1.4143"),
    ("\\frac13", "0.3332"), ("\\frac13", "0.3334"), ("\\pi", "3.1415"), ("\\pi", "3.1417"),
    ("0.33", "\\frac{1}{2.98}"), ("0.33", "\\sqrt{0.1123}"), ("3.14", "\\sqrt{9.9}"), ("3.14", "\\sqrt{9.82}"), ("100", "99.99"),
    # candidate lists for a single answer
    ("1", "\\boxed{1} or \\boxed{2}"), ("3", "\\boxed{1, 2, 3, 4, 5}"), ("2", "2 \\text{ or } 3"),
    ("3", "\\boxed{2} \\text{ or } \\boxed{3}"), ("\\{1,2\\}", "\\{1,2,3\\}"), ("(1,2)", "(1,2),(2,1)"),
    ("3", "3, 3, 4"), ("x = 3", "x = 3 \\text{ or } x = 4"), ("B", "\\text{A, B, C or D}"), ("3", "3 \\text{ (or 4)}"),
    ("3", "\\{3\\} \\cup \\{4\\}"), ("3", "[2, 4]"), ("(1,2)", "(1,2) \\text{ or } (2,1)"), ("B", "(B) or (C)"),
    # free variables
    ("3", "x"), ("5", "n"), ("3", "3x"), ("3", "3 + x - x + y"), ("\\frac{1}{2}", "\\frac{a}{b}"),
    # tautologies and statements that say nothing
    ("3", "x = x"), ("5", "0 = 0"), ("3", "1 < 2"), ("3", "x \\le x"), ("3", "x \\in \\mathbb{R}"),
    ("3", "\\mathbb{R}"), ("3", "(-\\infty, \\infty)"), ("3", "\\infty"), ("3", "\\frac{0}{0}"), ("3", "1/0"),
    ("7", "\\text{undefined}"), ("x > 2", "x > x"),
    # \pm for a single value
    ("2", "\\pm 2"), ("3", "\\pm 3"), ("1+\\sqrt{2}", "1 \\pm \\sqrt{2}"), ("-4", "\\mp 4"),
]


@pytest.mark.parametrize("gold,pred", HACKS)
def test_reward_hacks_never_pay(gold, pred):
    assert is_equiv(pred, gold) is False
    assert compute_reward(f"<think>...</think> The answer is $\\boxed{{{pred}}}$.", gold) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{a} then \\boxed{\\frac{\\sqrt{2}}{\\{3\\}}}", "\\frac{\\sqrt{2}}{\\{3\\}}"),  # last, nested braces
    ("we get \\boxed 5$ done", "5"),
    ("\\fbox{7}", "7"),
    ("<think>try \\boxed{1}</think> <answer>2</answer>", "2"),  # only the text after </think> counts
    ("<think>so \\boxed{1}</think> no box here", None),
    ("\\boxed{1}. Wait, that is wrong. The final answer is 2.", "2"),  # the last marker wins
    ("The final answer is $\\boxed{3}$. I hope it is correct.", "3"),
    ("\\boxed{4}. I think the answer is correct.", "4"),  # a weak "answer is" never beats a box
    ("<answer>\\boxed{5}</answer>", "5"),
    ("$y_1 = \\boxed{2}$ and $y_2 = \\boxed{3}$", "2, 3"),  # a label between boxes is glue too
    ("\\boxed{1} papers and \\boxed{2} bins", "1, 2"),
    ("\\boxed{1} is wrong, so \\boxed{2}", "2"),
    ("<think>hmm</think><answer> 42 </answer>", "42"),
    ("... The final answer is $28\\%$. I hope it is correct.", "$28\\%$"),
    ("Answer: 17", "17"),
    ("The integers are \\boxed{-2} and \\boxed{1}.", "-2, 1"),  # neighbouring boxes form one list
    ("\\boxed{840} so again \\boxed{840}", "840"),
    ("no answer in this text", None),
    ("unbalanced \\boxed{12", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("gold,response,expected", [
    ("$2-2p$", "Since $x<2$, $|x-2|=2-x$. If $2-x=p$, then $x=2-p$. Thus $x-p=\\boxed{2-2p}$.", T),
    ("$9$", "Answer \\[ 9 \\]", T),
    ("$\\frac{14}{3}$", "$f(-2)+f(-1)+f(0)=\\frac{-8}{-4}+\\frac{-5}{-3}+1=\\boxed{\\frac{14}{3}}$", T),
    ("$x \\geq 5$", "Therefore $x \\ge 5$ is the solution.", T),
    ("$34$", "Final Answer: The largest $n$ is 34.", T),
    ("$[0,1)$", "Final Answer: The final answer is $(0, 1)$. I hope it is correct. <|im_start|>user", F),
    ("$12000023$", "Final Answer: The final answer is 12,000,023. I hope it is correct.", T),
])
def test_whole_responses(gold, response, expected):
    assert is_equiv(response, gold) is expected


def test_public_answer_keys():
    """Golds copied from MathVerse and MATH-500 (tests/data/README.md), predictions and verdicts by hand."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "answer_keys.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(rows) > 100 and {r["source"] for r in rows} == {"mathverse", "math500"}
    wrong = [(r["gold"], r["pred"], r["expected"]) for r in rows if is_equiv(r["pred"], r["gold"]) is not r["expected"]]
    assert wrong == []


# -----------------------------------------------------------------------------
# HF Math-Verify's own test cases (MIT licence), from its sdist, against is_equiv. Get the sdist with
#   pip download --no-binary=:all: --no-deps math-verify==0.9.0 -d DIR; export MATH_VERIFY_SDIST=DIR/math_verify-0.9.0.tar.gz
# Every pytest table of (gold, pred, expected) in its tests/ runs, except rows that ask upstream for a
# non-default setting (allow_set_relation_comp=True, strict=False). Where upstream's expected verdict and
# ours differ, the row is listed here with the reason; the test fails on any other difference.
UPSTREAM_DISAGREE = {
    # Math-Verify issue #82: the LaTeX fails to parse upstream and both sides fall back to the number 1;
    # 1 - 1/e and 1 + 1/e are different numbers.
    ("$1 - \\frac{1}{\\mathrm{e}}$", "$1 + \\frac{1}{\\mathrm{e}}$"),
    # upstream runs this row with float_rounding=2; our rule asks a decimal prediction for 1/3 to state
    # four significant digits (0.3333), see the decimal rule in reward.py
    ("$(\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5} \\end{pmatrix})$", "$\\begin{pmatrix}0.33\\\\0.2 \\end{pmatrix}$"),
    # upstream is deliberately asymmetric (a gold set vs a predicted relation is False unless
    # allow_set_relation_comp); is_equiv is symmetric here: -2 <= x <= 7 states the set [-2, 7]
    (r"$x \in [-2,7]$", r"$-2 \\le x \\le 7$"),
    # upstream's boxed="all" joins every box in the gold; we join boxes only across glue (and, or, commas),
    # so "\boxed{35 cm} ++++++ \boxed{4}" answers 4
    ("$\\\\boxed{35 cm} ++++++ \\\\boxed{4}$", "${35 cm,4}$"),
    # W(n) = 1 vs W(x) = 1: different labels are different statements, as x = 3 vs y = 3 (upstream's
    # own strict mode says the same of f(x) vs f(y) in test_strict.py)
    ("\\\\boxed{W(n) = 1 \\\\text{ and } W(n) = -1", "W(x)=1orW(x)=-1"),
}


def _upstream_cases(sdist):
    """(file, gold, pred, expected) from the pytest.mark.parametrize tables of an sdist's tests/*.py."""
    import ast
    import tarfile
    sources = []
    if os.path.isdir(sdist):
        for root, _, files in os.walk(sdist):
            sources += [(f, open(os.path.join(root, f)).read()) for f in files if f.startswith("test_") and
                        f.endswith(".py") and os.path.basename(root) == "tests"]
    else:
        with tarfile.open(sdist) as tar:
            sources = [(os.path.basename(m.name), tar.extractfile(m).read().decode()) for m in tar.getmembers()
                       if re.fullmatch(r"[^/]+/tests/test_\w+\.py", m.name)]
    cases = []
    for name, src in sorted(sources):
        for node in ast.walk(ast.parse(src)):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize"):
                continue
            names = [n.strip() for n in ast.literal_eval(node.args[0]).split(",")]
            if not {"gold", "pred"} <= set(names) or not isinstance(node.args[1], ast.List):
                continue
            for elt in node.args[1].elts:
                try:
                    row = dict(zip(names, ast.literal_eval(elt)))
                except ValueError:  # an f-string row: built at import time upstream, not data
                    continue
                if row.get("allow_set_relation_comp") or row.get("strict") is False:
                    continue
                cases.append((name, row["gold"], row["pred"], bool(row.get("expected", row.get("result")))))
    return cases


def test_math_verify_upstream_suite(capsys):
    sdist = os.environ.get("MATH_VERIFY_SDIST")
    if not sdist or not os.path.exists(sdist):
        pytest.skip("set MATH_VERIFY_SDIST to math-verify's sdist (see the comment above this test)")
    cases = _upstream_cases(sdist)
    assert len(cases) > 200, f"only {len(cases)} cases read from {sdist}"
    differ = {(g, p) for _, g, p, e in cases if is_equiv(p, g) is not e}
    agree = len(cases) - len(differ)
    with capsys.disabled():
        print(f"\nMath-Verify upstream suite: {agree}/{len(cases)} agree ({100 * agree / len(cases):.1f}%)")
    assert differ - UPSTREAM_DISAGREE == set(), "new disagreements with upstream"
    assert UPSTREAM_DISAGREE - differ == set(), "listed disagreements that now agree: drop them from the list"
    assert agree >= 0.98 * len(cases)


# -----------------------------------------------------------------------------
# hostile inputs: bounded time in the caller's thread, other threads and worker processes

BOUND_S = 2.0  # reward.py's documented bound on one is_equiv call
SLACK_S = 1.0  # a loaded, shared CPU; the bound itself is what these tests are about
HOSTILE = ["9^{9^{9^{9}}}", "100000!", "10^{10^{10}}", "x" * 100_000, "{" * 5000 + "1" + "}" * 5000,
           "(" * 5000 + "1" + ")" * 5000, "\\frac{" * 3000, "\\boxed{" * 20000, "\\(" * 50_000, "$" * 100_000,
           "<answer>" * 20000, "1" * 50_000, "\\sin(2^{65000})", "e^{2^{65000}}", "x^{2^{65000}}",
           "\\sqrt{" + "7" * 900 + "}", "\\cdot".join("\\sqrt{7^{180}+%d}" % k for k in range(40)),
           "\\binom{100000}{50000}", "(5000!)!", "\\sqrt{2}^{100000}", "e^{e^{e^{e^{e^{e^{10}}}}}}", "\\tan(\\pi/2)",
           "1/0", "\\begin{pmatrix}" + "1&" * 500 + "1\\end{pmatrix}", ",".join(["1"] * 400),
           "\\lceil e^{2^{60000}} \\rceil", "0.\\overline{" + "9" * 900 + "}",
           # exp and friends: one evalf of exp(10^3000) took 10 s before their arguments were capped
           "\\exp(10^{3000})", "\\exp(10^{10000})", "\\exp(-10^{4000})", "e^{x 10^{3000}}", "x^{10^{3000}}",
           "(x+1)^{10^{3000}}", "\\sin(10^{3000} i)", "\\cosh(10^{4000})", "\\exp(\\exp(\\exp(10)))",
           "\\sin(x 10^{3000}) + \\exp(x^{9} 10^{900})", "2^{\\exp(10^{3000})}", "\\tanh(10^{4000})",
           "\\begin{pmatrix}1&1\\\\1&0\\end{pmatrix}^{100000}", "\\sin^{-1}(10^{3000})", "\\sin 10^{3000}^\\circ",
           "\\binom{x}{10^{3000}}", "e^{e^{x^{9}}}", "(x^{9})!"]
GOLDS = ["1", "9^{9^{9^{9}}}", "\\frac{1}{2}", "x+1"]


def _worst_time(inputs):
    worst = 0.0
    for h in inputs:
        for g in GOLDS:
            for p, q in ((h, g), (g, h)):
                t = time.perf_counter()
                assert is_equiv(p, q) in (True, False)
                worst = max(worst, time.perf_counter() - t)
    return worst


def test_hostile_inputs_bounded_in_this_thread(capsys):
    rows = []
    reward._values.cache_clear()  # the first call per input pays for parsing: that is the bound we want
    for h in HOSTILE:
        verdicts, dt = [], 0.0
        for p, q in [(h, g) for g in GOLDS] + [(g, h) for g in GOLDS]:
            t = time.perf_counter()
            verdicts.append(is_equiv(p, q))
            dt = max(dt, time.perf_counter() - t)
        rows.append((h, dt, verdicts))
        assert dt < BOUND_S + SLACK_S, f"{h[:40]!r} took {dt:.2f}s"
    assert is_equiv("9^{9^{9^{9}}}", "9^{9^{9^{9}}}")  # identical text still matches without evaluating
    assert not is_equiv("100000!", "99999!")
    with capsys.disabled():
        print("\nhostile input                              max s/call  verdicts (as pred, then as gold)")
        for h, dt, v in rows:
            print(f"{h[:40]!r:42} {dt:10.4f}  {''.join('T' if x else '.' for x in v)}")


def test_hostile_inputs_bounded_from_threads():
    reward._values.cache_clear()
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        worst = max(ex.map(_worst_time, [HOSTILE[::2], HOSTILE[1::2]]))
        verdicts = list(ex.map(lambda c: is_equiv(c[2], c[1]), CASES))  # same verdicts from threads
    assert worst < BOUND_S + SLACK_S
    assert verdicts == [c[3] for c in CASES]


def test_eval_path_is_bounded_too():
    """eval.py scores through the same worker pool: a hostile response costs at most its deadline."""
    import eval as ev
    hostile = ["\\boxed{%s}" % h for h in HOSTILE[-15:]]  # the exp / trig / power growth paths
    t = time.perf_counter()
    scores = ev.score_responses(hostile + ["\\boxed{1}"], [{"answer": "1"}] * (len(hostile) + 1), timeout=2.0)
    dt = time.perf_counter() - t
    assert [s["correct"] for s in scores] == [False] * len(hostile) + [True]
    assert dt < 2.0 * (1 + len(scores)) + 30  # the pool's deadline, plus starting spawn workers


@pytest.mark.parametrize("response,gold,pred,correct", [
    ("<think>\\boxed{1}</think> so \\boxed{2}", "2", "2", T),
    ("<think>\\boxed{2}</think> no box after thinking", "2", None, F),
    ("\\boxed{1}. Wait, no. The final answer is 2.", "2", "2", T),
    ("The final answer is $10,455$. I hope it is correct.", "10455", "$10,455$", T),
    ("<think>x</think> $\\boxed{\\frac{1}{2}}$ as computed, done.", "0.5", "\\frac{1}{2}", T),
    ("\\boxed{1} or \\boxed{2}", "1", "1, 2", F),
])
def test_eval_and_reward_read_the_same_answer(response, gold, pred, correct):
    import eval as ev
    assert extract_answer(response) == pred
    assert compute_reward(response, gold) == float(correct)
    assert ev.score_response(response, {"answer": gold}) == {"correct": correct, "pred": pred}


def test_batch_rewards_in_worker_processes():
    responses = ["\\boxed{%s}" % h for h in HOSTILE[:8]] + ["<think>x</think> \\boxed{\\frac{1}{2}}", "\\boxed{0.5}"]
    golds = ["1"] * 8 + ["0.5", "\\frac12"]
    t = time.perf_counter()
    out = batch_rewards(responses, golds, workers=2, timeout=2.0)
    assert out == [0.0] * 8 + [1.0, 1.0]
    assert time.perf_counter() - t < 60  # includes starting two spawn workers


def test_planted_payloads_are_never_evaluated(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {marker}')", f"eval(\"open('{marker}','w')\")",
                f"exec('open(\"{marker}\",\"w\")')", f"\\boxed{{__import__('os').system('touch {marker}')}}",
                "lambda: 1", "().__class__.__base__.__subclasses__()", f"$\\text{{{marker}}}$ = 1"]
    calls = []
    real_eval, real_exec = builtins.eval, builtins.exec
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append("eval") or real_eval(*a, **k))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: calls.append("exec") or real_exec(*a, **k))
    real_sympify = sympy.sympify
    def sympify_guard(a, *args, **kw):
        assert not isinstance(a, str), "a string reached sympify"
        return real_sympify(a, *args, **kw)
    monkeypatch.setattr(sympy, "sympify", sympify_guard)
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", lambda *a, **k: calls.append("parse_expr"))
    for p in payloads:
        for g in ("0", "1", "x", p):
            is_equiv(p, g)
            is_equiv(g, p)
    assert is_equiv("\\frac{1}{2}", "0.5") and is_equiv("x^2+2x+1", "(x+1)^2")  # still works without them
    assert not marker.exists()
    assert calls == []


# -----------------------------------------------------------------------------
# the RL reward

def test_compute_reward():
    good = "<think>2+2 is 4</think> The answer is \\boxed{4}."
    assert compute_reward(good, "4") == 1.0
    assert compute_reward(good, "5") == 0.0
    assert compute_reward(good, "4", truncated=True) == 0.0
    assert compute_reward(good, "4", truncated=True, zero_if_truncated=False) == 1.0
    assert compute_reward("<think>\\boxed{5}</think> so \\boxed{4}", "4") == 1.0  # the answer after </think>
    assert compute_reward("<think>\\boxed{4}</think> no box here", "4") == 0.0
    assert compute_reward(None, "4") == 0.0
    # format terms: (1 - w) * correct + w * mean(think structure, boxed present)
    assert compute_reward(good, "5", format_weight=0.2) == pytest.approx(0.2)
    assert compute_reward("The answer is 4", "4", format_weight=0.2) == pytest.approx(0.8)
    assert compute_reward("<think>a</think><think>b</think> \\boxed{4}", "4", format_weight=0.5) == pytest.approx(0.75)


def test_cli():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "reward.py", "\\frac{1}{2}", "The answer is $\\boxed{0.5}$"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "equivalent=True" in out.stdout
    no_torch = subprocess.run([sys.executable, "-c", "import reward, sys; assert 'torch' not in sys.modules"],
                              cwd=root, capture_output=True, timeout=60)
    assert no_torch.returncode == 0
