# eval.py: scores from known responses, pass@k, multiple choice, resume, the behaviour detector, the LLM-judge
# client against a local fake endpoint, the table and the plot (data/prepare_eval.py: tests/test_data.py).
import http.server
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeEngine:
    """rollout-API stand-in: fixed responses per question (cycled over the n samples), counts calls."""

    def __init__(self, responses, fail_after=None):
        self.responses, self.fail_after, self.prompts = responses, fail_after, []

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=0):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise RuntimeError("engine died")
        out = []
        for messages in prompts:
            text = messages[0]["content"][-1]["text"]
            self.prompts.append(text)
            key = next(q for q in self.responses if q in text)
            texts = [self.responses[key][j % len(self.responses[key])] for j in range(n)]
            out.append([SimpleNamespace(text=t, token_ids=list(range(len(t.split()))), logprobs=[],
                                        finish_reason="length" if t.endswith("...") else "stop") for t in texts])
        return out


PROBLEMS = [
    {"id": "p1", "question": "What is 2+3?", "answer": "5", "subject": "arith", "level": 1},
    {"id": "p2", "question": "What is 6*7?", "answer": "42", "subject": "arith", "level": 2},
    {"id": "p3", "question": "Solve x+1=4.", "answer": "3", "subject": "algebra", "level": 2},
]
RESPONSES = {  # per problem, 4 samples: p1 4/4 correct, p2 1/4, p3 0/4 (one truncated, one without a box)
    "2+3": ["<think>2+3=5</think> \\boxed{5}"] * 4,
    "6*7": ["\\boxed{42}", "\\boxed{48}", "\\boxed{36}", "I think 13"],
    "x+1=4": ["\\boxed{2}", "\\boxed{5}", "x is", "let me keep going..."],
}


def test_pass_at_k_matches_enumeration():
    # independent reference: the share of all k-subsets of the n samples that hold a correct one
    for n, c in [(4, 2), (5, 1), (6, 0), (6, 6), (7, 3)]:
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert ev.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # by hand: 1 - C(2,2)/C(4,2)


def test_scores_from_known_responses(tmp_path):
    out = tmp_path / "bench.jsonl"
    s = ev.evaluate(FakeEngine(RESPONSES), PROBLEMS, "ovr", n=4, temperature=1.0, top_p=1.0, max_tokens=64,
                    out_path=str(out), pass_k=(1, 2, 4, 8), batch_size=2)
    # hand count: per-problem correct 4, 1, 0 of 4
    assert s["accuracy"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert s["pass@1"] == pytest.approx(s["accuracy"])
    assert s["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)   # p2: 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in s                                   # k > n is not reported
    assert s["by_subject"] == pytest.approx({"algebra": 0.0, "arith": 0.625})
    assert s["by_level"] == pytest.approx({"1": 1.0, "2": 0.125})
    assert s["truncated"] == pytest.approx(1 / 12)
    assert (s["problems"], s["samples"], s["n"]) == (3, 12, 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    r = next(r for r in rows if r["id"] == "p2" and r["sample"] == 1)
    assert (r["pred"], r["correct"], r["answer"], r["finish_reason"]) == ("48", False, "42", "stop")
    assert r["response"] == "\\boxed{48}" and set(r["behaviours"]) == set(ev.BEHAVIOURS)
    assert next(r for r in rows if r["id"] == "p2" and r["sample"] == 3)["pred"] is None


def test_multiple_choice_prompt_and_scoring():
    p = {"id": "m", "question": "Which angle?", "answer": "B", "choices": ["40°", "60", "120°", "140°"]}
    text = ev.build_messages(p, "ovr")[0]["content"][-1]["text"]
    assert "Which angle?\n\nChoices:\nA. 40°\nB. 60\nC. 120°\nD. 140°" in text and "\\boxed{}" in text
    assert ev.score_response("so \\boxed{B}", p) == {"correct": True, "pred": "B"}
    assert ev.score_response("so \\boxed{60}", p)["correct"]        # the option text counts too
    assert not ev.score_response("so \\boxed{C}", p)["correct"]
    assert not ev.score_response("so \\boxed{120°}", p)["correct"]
    # MathVision draws some options in the image: choices are bare letters, listed once each
    bare = dict(p, choices=list("ABCDE"))
    assert "Choices:\nA\nB\nC\nD\nE" in ev.build_messages(bare, "ovr")[0]["content"][-1]["text"]
    # a custom template without {choices} still shows them, after the question; images come first
    msg = ev.build_messages(dict(p, images=["/x/a.png"]), "Q: {question}")[0]["content"]
    assert msg[0] == {"type": "image", "image": "/x/a.png"}
    assert msg[1]["text"].startswith("Q: Which angle?\n\nChoices:\nA. 40°")


def test_resume_partial_run(tmp_path):
    out = str(tmp_path / "bench.jsonl")
    with pytest.raises(RuntimeError):  # dies after the first batch (problems p1, p2)
        ev.evaluate(FakeEngine(RESPONSES, fail_after=2), PROBLEMS, "ovr", 4, 1.0, 1.0, 64, out_path=out, batch_size=2)
    with open(out, "a") as f:  # a half-written problem and a torn last line, as a kill mid-write leaves
        f.write(json.dumps({"id": "p3", "sample": 0, "correct": True}) + "\n" + '{"id": "p3", "sam')
    engine = FakeEngine(RESPONSES)
    s = ev.evaluate(engine, PROBLEMS, "ovr", 4, 1.0, 1.0, 64, out_path=out, batch_size=2, pass_k=(1,))
    assert len(engine.prompts) == 1 and "x+1=4" in engine.prompts[0]   # only p3 was sampled again
    rows = [json.loads(line) for line in open(out)]
    assert sorted((r["id"], r["sample"]) for r in rows) == [(i, j) for i in ("p1", "p2", "p3") for j in range(4)]
    assert s["accuracy"] == pytest.approx((1 + 0.25 + 0) / 3) and s["samples"] == 12
    # a run over fewer problems (--limit) scores those only and keeps the others on disk
    s = ev.evaluate(FakeEngine({}), PROBLEMS[:1], "ovr", 4, 1.0, 1.0, 64, out_path=out)
    assert s["accuracy"] == 1.0 and s["problems"] == 1 and len(open(out).readlines()) == 12


LABELLED = {
    "backtracking": ["Wait, that gives 12, not 15.", "That led to a dead end. Let's try another approach.",
                     "My previous assumption was wrong, so I'll start over."],
    "verification": ["Let me double-check: 3*4 = 12.", "Plugging x = 2 back in gives 0, so it checks out."],
    "subgoal_setting": ["First, I need to find the radius.", "Let's break the problem into two cases."],
    "backward_chaining": ["To find the area, we need to know the radius first.",
                          "Working backwards from 24, the last step is 4*6."],
    "visual_reflection": ["Let me see the image again.", "Looking at the figure again, the angle is marked 30."],
    "visual_verification": ["I will now verify this against the image.", "This is consistent with the diagram."],
    "visual_divide_and_conquer": ["Let's first look at the numbers on the left.",
                                  "The top half of the figure holds the circles."],
    "visual_goal_tracing": ["To get this answer, I need to find an object that is red.",
                            "We need to locate the shaded triangle in the figure."],
}
NEUTRAL = ["The sum of 3 and 4 is 7.", "The image shows a triangle with sides 3, 4 and 5.",
           "Therefore the answer is \\boxed{12}.", "We multiply both sides by 2 and get x = 6.",
           "The figure has three circles of equal radius.", "Let me compute the area of the square.",
           "Next, we substitute x = 2 into the equation.", "We compare the two numbers in the figure.",
           "Looking at the equation, the degree is 3.", "To find x, we divide both sides by 2.",
           "The graph of y = x^2 is a parabola.", "In the image, there are 5 apples and 3 pears."]


def test_detector_on_labelled_sentences():
    for behaviour, sentences in LABELLED.items():
        for s in sentences:
            assert ev.detect_behaviours(s)[behaviour] >= 1, (behaviour, s)
    for s in NEUTRAL:
        assert sum(ev.detect_behaviours(s).values()) == 0, s
    assert ev.detect_behaviours("Wait, no. Wait, hmm. Wait!")["backtracking"] == 3


def test_behaviour_rates_by_hand():
    zero = dict.fromkeys(ev.BEHAVIOURS, 0)
    counts = [dict(zero, backtracking=2, visual_reflection=1), dict(zero, backtracking=1), dict(zero),
              dict(zero, verification=5)]
    r = ev.behaviour_rates(counts)
    assert r["backtracking"] == 0.5 and r["visual_reflection"] == 0.25 and r["verification"] == 0.25
    assert r["transfer/visual_reflection"] == 0.5           # 0.25 / 0.5
    assert r["transfer/visual_verification"] == 0.0 and r["transfer/visual_goal_tracing"] is None


def test_judge_against_local_endpoint():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            seen.append((self.path, body["model"], prompt))
            name = re.search(r"Behaviour \((\w+)\)", prompt).group(1)
            content = {"backtracking": "Two instances. <count>2</count>", "visual_reflection": "no tag here"}.get(
                name, "<count>0</count>")
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        counts = ev.judge_behaviours("What is 2+3?", "Wait, no. Let me redo it: 5.", url, model="judge-x")
    finally:
        server.shutdown()
    assert counts == dict(dict.fromkeys(ev.BEHAVIOURS, 0), backtracking=2)   # no tag -> 0
    assert len(seen) == len(ev.BEHAVIOURS) and {p for p, _, _ in seen} == {"/v1/chat/completions"}
    assert all(m == "judge-x" and "What is 2+3?" in q and "Let me redo it" in q and "<count>" in q for _, m, q in seen)


def test_load_problems_errors_name_file_and_line(tmp_path):
    good = {"id": "a", "question": "q", "answer": 1}
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"id": "b", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:3: .*missing \['answer'\]"):
        ev.load_problems(str(path))
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:2"):
        ev.load_problems(str(path))
    path.write_text(json.dumps(dict(good, images=["img/a.png"])) + "\n")
    with pytest.raises(FileNotFoundError, match=r"b\.jsonl:1: image .*img/a\.png not found"):
        ev.load_problems(str(path))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")  # there, but not an image
    with pytest.raises(ValueError, match=r"b\.jsonl:1: problem a: image .*img/a\.png cannot be used"):
        ev.load_problems(str(path))
    from PIL import Image
    Image.new("RGB", (30, 20)).save(tmp_path / "img" / "a.png")
    [p] = ev.load_problems(str(path))
    assert p["images"] == [str(tmp_path / "img" / "a.png")] and p["answer"] == "1"


def test_markdown_table_and_plot_cli(tmp_path):
    table = ev.markdown_table({"sft": {"math500": {"accuracy": 0.5, "behaviours": {"backtracking": 0.25}}}})
    lines = table.splitlines()
    assert lines[0] == "| benchmark | Qwen2.5-VL-7B (paper) | OVR-7B (paper) | sft |"
    assert "| math500 | 67.4 | 95.3 | 50.0 |" in lines and "| mathvision | 25.5 | 51.8 | – |" in lines
    assert "| mathverse_vision_only | 41.1 | 54.6 | – |" in lines and "| backtracking | 25.0 |" in lines
    run = tmp_path / "rl_demo"
    run.mkdir()
    rows = [{"step": i, "reward_mean": 0.1 * i, "response_len_mean": 10 + i, "behaviour/backtracking": 0.05 * i}
            for i in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "plot", str(run)], check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_behaviours_writes_one_png_and_skips_missing_values(tmp_path):
    stages = [(0, "base", {"a": 0.0, "ratio": None}), (1, "cold start", {"a": 0.5, "ratio": 0.1})]
    along = [(s, None, {"a": 0.1 * s, "b": None if s % 2 else 0.2}) for s in range(12)]
    out = ev.plot_behaviours([("stages", "stage", stages, ["a", "ratio"]), ("RL", "step", along, ["a", "b", "c"])],
                             str(tmp_path / "b.png"))
    assert out == str(tmp_path / "b.png") and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tiny_model_end_to_end(tmp_path, request):
    # the real engine on the tiny model (a few seconds): scores are ~0, the point is that every piece connects
    rollout = pytest.importorskip("rollout")
    model = pytest.importorskip("model")
    path = request.getfixturevalue("tiny_model_dir")
    net, tok = model.QwenVL.from_pretrained(path), model.load_tokenizer(path)
    engine = rollout.make_engine("torch", net, tok)
    s = ev.evaluate(engine, PROBLEMS[:2], "ovr", n=2, temperature=1.0, top_p=1.0, max_tokens=8,
                    out_path=str(tmp_path / "e.jsonl"), pass_k=(1, 2))
    assert s["samples"] == 4 and 0.0 <= s["accuracy"] <= 1.0 and s["truncated"] > 0


def test_evaluate_creates_the_output_folder(tmp_path):
    """rl.py's periodic eval writes into out_dir/eval/, which does not exist on a fresh run."""
    class Fixed:
        def generate(self, prompts, n=1, **kw):
            return [[SimpleNamespace(text="\\boxed{4}", token_ids=[1], logprobs=[0.0], finish_reason="stop")] * n
                    for _ in prompts]
    out = tmp_path / "run" / "eval" / "step000000_rank0.jsonl"
    s = ev.evaluate(Fixed(), [{"id": "a", "question": "2+2?", "answer": "4", "images": []}], "{question}",
                    1, 1.0, 1.0, 16, str(out))
    assert out.exists() and s["accuracy"] == 1.0
