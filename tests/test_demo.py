"""The demo's synthetic data (data/prepare_demo.py) has the properties the demo's story rests on, and
demo.sh end to end, shortened: the cold start must beat the untrained model on held-out text questions,
RL must beat the cold start on held-out image questions, and the behaviour line must be there."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))

import eval as ev  # noqa: E402
import prepare_demo  # noqa: E402


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_data"))
    prepare_demo.main(out=out, seed=0, n_sft=3000, n_sft_image=40, n_rl=60, n_rl_lists=40, n_rl_add=40, n_eval_text=40,
                      n_eval_image=20, eval_rl_each=10)
    rows = lambda name: [json.loads(line) for line in open(os.path.join(out, name))]  # noqa: E731
    names = ("sft", "rl_image", "rl_lists", "rl_add", "eval_text", "eval_image", "eval_rl")
    return {name: rows(name + ".jsonl") for name in names}


def test_picture_traces_carry_no_behaviour_and_text_traces_do(demo_data):
    is_image = lambda r: isinstance(r["messages"][0]["content"], list)  # noqa: E731
    image = [r["messages"][1]["content"] for r in demo_data["sft"] if is_image(r)]
    text = [r["messages"][1]["content"] for r in demo_data["sft"] if not is_image(r)]
    assert len(image) == 40 and len(text) == 3000
    assert all(not any(ev.detect_behaviours(t).values()) for t in image)  # anything on pictures is transfer
    # linguistic mental imagery, the recount the detector calls visual reflection, the phrase without utility
    assert sum("Let me picture them in my mind." in t for t in text) > 300
    assert sum(ev.detect_behaviours(t)["visual_reflection"] > 0 for t in text) > 300
    assert sum(ev.detect_behaviours(t)["subgoal_setting"] > 0 for t in text) > 300


def test_the_recount_counts_the_list_and_fixes_a_wrong_glance(demo_data):
    n_fixed = 0
    for r in demo_data["sft"]:
        q, trace = r["messages"][0]["content"], r["messages"][1]["content"]
        if not isinstance(q, str) or not q.startswith("How many shapes are in this list: "):
            continue
        n = len(q.removeprefix("How many shapes are in this list: ").rstrip("?").split(", "))  # counted here
        assert trace.endswith(f"\\boxed{{{n}}}")
        glance = int(re.search(r"At a glance, there are (\d+)\.", trace).group(1))
        recount = re.search(r"Let me look at the picture again and count them one by one: ([\d, ]+)\.\n(.*)\n", trace)
        if recount is None:
            assert glance == n  # no recount: the glance is right
            continue
        assert recount.group(1) == ", ".join(str(i) for i in range(1, n + 1))
        assert abs(glance - n) <= 1
        assert recount.group(2) == ("Correct." if glance == n else "Wait, that is not right.")
        n_fixed += glance != n
    assert n_fixed > 20  # the recount has utility: some glances are wrong and only it gets them right


def test_addition_pairs_are_held_out_in_both_orders_of_the_equations(demo_data):
    pair = lambda q: tuple(map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q).groups()))  # noqa: E731
    user = [r["messages"][0]["content"] for r in demo_data["sft"]]
    sft = {pair(q) for q in user if isinstance(q, str) and q.startswith("What")}
    rl = {pair(p["question"]) for p in demo_data["rl_add"]}
    ev_pairs = {pair(p["question"]) for p in demo_data["eval_text"] if p["question"].startswith("What")}
    assert sft and rl and ev_pairs and not (sft & rl) and not (sft & ev_pairs) and not (rl & ev_pairs)
    assert {(b, a) for a, b in rl | ev_pairs} <= sft  # the other order is taught: a + b = b + a can be learned
    for r in demo_data["sft"] + [{"messages": [{"content": p["question"]}, None], "answer": p["answer"]}
                                 for p in demo_data["rl_add"] + demo_data["eval_text"]]:
        q = r["messages"][0]["content"]
        if isinstance(q, str) and q.startswith("What"):
            a, b = pair(q)
            assert (r["messages"][1]["content"].endswith(f"\\boxed{{{a + b}}}") if r["messages"][1]
                    else r["answer"] == str(a + b))


def test_rl_mixes_text_and_images_and_eval_rl_interleaves(demo_data):
    assert all(p["images"] for p in demo_data["rl_image"])
    assert not any(p["images"] for p in demo_data["rl_lists"] + demo_data["rl_add"])
    assert all(p["question"].startswith("How many shapes are in this list") for p in demo_data["rl_lists"])
    assert [bool(p["images"]) for p in demo_data["eval_rl"]] == [False, True] * 10
    ids = {p["id"] for p in demo_data["eval_text"] + demo_data["eval_image"]}
    assert {p["id"] for p in demo_data["eval_rl"]} <= ids


@pytest.mark.slow
def test_demo_shortened_learns_in_the_right_direction(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"),
               RL_ARGS="--num_steps=40 --eval_every=20", EVAL_ARGS="--limit=100")
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    *_, beh_line, last = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"demo: text_acc base=([\d.]+) sft=([\d.]+) \| image_acc sft=([\d.]+) rl=([\d.]+)", last)
    assert m, f"unexpected last line: {last!r}"
    base, sft, img_sft, img_rl = map(float, m.groups())
    assert all(0.0 <= a <= 1.0 for a in (base, sft, img_sft, img_rl))
    assert sft > base + 0.2, last       # the cold start teaches the format and the text skill
    assert img_rl > img_sft + 0.05, last  # RL improves held-out image accuracy even when shortened
    assert beh_line.startswith("behaviours: "), beh_line
    beh = json.loads(beh_line.removeprefix("behaviours: "))
    assert beh["base"]["image_look_again"] == 0.0 and beh["sft"]["text_look_again"] > 0.2, beh
    assert beh["sft"]["text_acc"] == sft and beh["rl"]["image_acc"] == img_rl
    assert os.path.exists(tmp_path / "out" / "rl" / "curves.png")
    assert os.path.exists(tmp_path / "out" / "behaviours.png")
