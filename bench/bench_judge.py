"""
What the model judge costs an RL step: seconds for one step's judge calls (reward.judge_batch) at several
concurrencies, side by side, against a judge server.

    python bench/bench_judge.py                                   # a local stub that answers after --latency s
    python bench/bench_judge.py --url=http://127.0.0.1:8000/v1 --model=Qwen/Qwen2.5-7B-Instruct --n=512
        (`vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000` first, on its own GPU)

Each call sends reward.JUDGE_PROMPT with a question, a reference and a student answer of typical length and
gets one word back; --n calls per batch, as in a step where n responses go to the judge.
"""
import http.server
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402

url, model = "", "stub"          # judge endpoint; "" = start a local stub
latency = 0.2                    # seconds the stub takes per request
n = 128                          # judge calls in one batch (one RL step's judged responses)
concurrency = "1,8,32,128"       # requests in flight, compared side by side
extra = "{}"                     # JSON request fields, e.g. '{"structured_outputs": {"choice": ["YES", "NO"]}}'
for arg in sys.argv[1:]:
    key, val = arg.lstrip("-").split("=", 1)
    assert key in globals() and not key.startswith("_"), f"unknown option {key}"
    globals()[key] = type(globals()[key])(val)


class Stub(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(latency)
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "YES"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if not url:
    http.server.ThreadingHTTPServer.request_queue_size = 1024  # the default listen backlog (5) drops bursts
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    print(f"local stub judge at {url}, {latency} s per request")

question = "Why does the man in the picture carry an umbrella although the street is dry?"
items = [(question, f"because the forecast said it would rain later (variant {i})", "He expects rain later.")
         for i in range(n)]
print(f"{n} judge calls per batch against {url} ({model})")
print(f"{'concurrency':>11} | {'batch s':>8} | {'mean call s':>11} | {'max call s':>10} | verdicts | vs concurrency 1")
base = None
for c in [int(x) for x in concurrency.split(",")]:
    t = time.perf_counter()
    out = reward.judge_batch(items, url, model, concurrency=c, timeout=120.0, step_timeout=3600.0,
                             extra=json.loads(extra), max_tokens=8)
    wall = time.perf_counter() - t
    base = base or wall
    secs = [s for _, _, s in out]
    ok = sum(v is not None for v, _, _ in out)
    print(f"{c:>11} | {wall:>8.2f} | {sum(secs) / len(secs):>11.3f} | {max(secs):>10.3f} | {ok:>4}/{n:<3} | x{base / wall:.1f}")
