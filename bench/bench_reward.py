"""
Verifications per second and agreement with the expected verdict: reward.is_equiv vs HF math-verify,
side by side on the same pairs built from MATH500 answers (the 500 rows of PRM800K's test split:
github.com/openai/prm800k prm800k/math_splits/test.jsonl, or data/eval/math500.jsonl from data/prepare_eval.py):
  - positive: gold vs an equivalent rewriting of it (expected True),
  - negative: gold vs another problem's answer (expected False).
Both verifiers read the same prediction, a short response ending "... the final answer is $\\boxed{...}$.";
math-verify gets the gold as "$gold$" (its parser needs math delimiters), reward.py the bare gold.

math-verify lives in its own venv, not in requirements.txt:
    python -m venv /tmp/mv-venv && /tmp/mv-venv/bin/pip install 'math-verify[antlr4_13_2]'
    /tmp/mv-venv/bin/python bench/bench_reward.py      # both verifiers
    python bench/bench_reward.py                       # reward.py only, when math_verify is not importable
(the data: data/eval/math500.jsonl, or the path given as the first argument)
Timing: one pass over all pairs in this process, caches cleared first ("cold"; golds repeat, so gold
parses are reused as in RL), then a second pass for reward.py ("warm").
"""
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402

DATA = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "data", "eval", "math500.jsonl")
if not os.path.exists(DATA):
    sys.exit(f"{DATA} not found: pass MATH500's test.jsonl (python bench/bench_reward.py PATH) or run data/prepare_eval.py")


def rewrite(gold, k):
    """An equivalent way to write gold; k picks among the rules that apply (deterministic)."""
    rules = []
    if re.fullmatch(r"\d{4,}", gold):
        rules.append(lambda s: f"{int(s):,}")                                 # 12345 -> 12,345
    if re.fullmatch(r"-?\d+", gold):
        rules += [lambda s: s + ".0", lambda s: f"x = {s}"]                     # 7 -> 7.0, x = 7
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        rules.append(lambda s, m=m: f"{m.group(1)}{m.group(2)}/{m.group(3)}")  # \frac{3}{4} -> 3/4
        rules.append(lambda s, m=m: f"{m.group(1)}\\frac{{{2 * int(m.group(2))}}}{{{2 * int(m.group(3))}}}")
    if "\\frac" in gold:
        rules.append(lambda s: s.replace("\\frac", "\\dfrac"))
    if re.search(r"\\sqrt\{\d\}", gold):
        rules.append(lambda s: re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", s))      # \sqrt{3} -> \sqrt3
    if re.fullmatch(r"\(.*\)", gold) and "\\left" not in gold:
        rules.append(lambda s: "\\left" + s[:-1] + "\\right)")
    if "," in gold and "\\!" not in gold:
        rules.append(lambda s: re.sub(r",\s*", ", ", s))
    if re.fullmatch(r"\\text\{[A-Za-z ]+\}", gold):
        rules.append(lambda s: "\\text{" + s[6:-1].swapcase() + "}")            # \text{Evelyn} -> \text{eVELYN}
    if re.search(r"[a-z]\s*\+\s*\d", gold) and not re.search(r"[=<>,^_]", gold):
        rules.append(lambda s: re.sub(r"^(.*?)\s*\+\s*(\d+)$", r"\2 + \1", s))  # x + 3 -> 3 + x
    rules.append(lambda s: re.sub(r"([=+\-])", r" \1 ", s))                    # spacing only
    return rules[k % len(rules)](gold)


def build_pairs():
    golds = [json.loads(line)["answer"] for line in open(DATA)]
    pairs = []
    for i, g in enumerate(golds):
        pairs.append((g, rewrite(g, i), True))
        for j in range(i + 1, i + len(golds)):  # the next answer that is really different
            o = golds[j % len(golds)]
            strip = lambda s: re.sub(r"^[a-z]\s*=\s*", "", reward._squash(s))  # 5 vs x=5 is not a negative
            if strip(o) != strip(g):
                pairs.append((g, o, False))
                break
    return pairs


def response(ans):
    return f"We simplify step by step and check the result. Therefore, the final answer is $\\boxed{{{ans}}}$."


def run(name, verify, pairs):
    t = time.perf_counter()
    verdicts = [verify(g, p) for g, p, _ in pairs]
    dt = time.perf_counter() - t
    agree = sum(v == e for v, (_, _, e) in zip(verdicts, pairs))
    misses = [(g, p, e) for v, (g, p, e) in zip(verdicts, pairs) if v != e]
    print(f"{name:24} {len(pairs) / dt:9.0f} verifications/s   agreement {agree}/{len(pairs)} "
          f"({100 * agree / len(pairs):.1f}%)")
    for g, p, e in misses[:6]:
        print(f"    disagrees: gold {g!r} pred {p!r} expected {e}")
    return len(pairs) / dt, agree


def main():
    pairs = build_pairs()
    print(f"{len(pairs)} pairs from {DATA} ({sum(e for *_, e in pairs)} positive)")
    ours = lambda g, p: reward.is_equiv(response(p), g)
    reward._values.cache_clear()
    reward._num.cache_clear()
    speed, agree = run("reward.is_equiv (cold)", ours, pairs)
    run("reward.is_equiv (warm)", ours, pairs)
    try:
        from math_verify import parse, verify
    except ImportError:
        print("math_verify not importable: see the docstring for its venv")
        return
    mv = lambda g, p: bool(verify(parse(f"${g}$"), parse(response(p))))
    mv_speed, mv_agree = run("math-verify", mv, pairs)
    print(f"speed ratio reward/math-verify: {speed / mv_speed:.1f}x; agreement {agree} vs {mv_agree}")


if __name__ == "__main__":
    main()
