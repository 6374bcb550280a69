"""
Difficulty filter for RL data (OVR §3.3, ORZ): sample k responses per problem from a model, score them
with eval.py's scorer (the reward's verifier), and keep the problems whose pass rate is strictly between
min_pass and max_pass; by default drop the always-right and the never-right, which give GRPO no signal.
Per-sample results go to OUT.samples.jsonl, so re-running the same command resumes.

    python data/filter_difficulty.py --model=out/sft/hf --data=data/rl/train.jsonl --out=data/rl/train_filtered.jsonl
    python data/filter_difficulty.py --model=out/sft_demo/hf --data=data/demo/rl_image.jsonl --out=data/demo/rl_image_f.jsonl \\
        --engine=torch --device=cpu --k=4 --max_tokens=160 --template="{question}"
"""
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
from model import QwenVL, configure, load_tokenizer  # noqa: E402
from rollout import make_engine  # noqa: E402

model = "out/sft/hf"        # the model whose pass rate decides (the RL starting point)
data = "data/rl/train.jsonl"
out = ""                    # "" = <data>_filtered.jsonl
engine = "vllm"             # "vllm" | "torch"
device = "cuda"             # torch engine only
template = "ovr"            # the prompt RL will use
k = 8                       # samples per problem
temperature = 1.0
max_tokens = 8192
min_pass = 0.0              # keep pass rates > min_pass ...
max_pass = 1.0              # ... and < max_pass
batch_size = 64             # problems per generate call


def main():
    configure(globals(), sys.argv[1:])
    dst = out or data.removesuffix(".jsonl") + "_filtered.jsonl"
    problems = ev.load_problems(data)
    net = QwenVL.from_pretrained(model, device=device if engine == "torch" else "cpu")
    eng = make_engine(engine, net, load_tokenizer(model), model_path=model)
    ev.evaluate(eng, problems, template, k, temperature, 1.0, max_tokens, out_path=dst + ".samples.jsonl", batch_size=batch_size)
    correct = defaultdict(list)
    for r in ev.read_jsonl(dst + ".samples.jsonl"):
        correct[r["id"]].append(r["correct"])
    rate = {i: sum(c) / len(c) for i, c in correct.items()}
    src_dir, dst_dir = os.path.dirname(os.path.abspath(data)), os.path.dirname(os.path.abspath(dst))
    kept = 0
    with open(data) as fi, open(dst, "w") as fo:
        for line in fi:
            if not line.strip():
                continue
            p = json.loads(line)
            if min_pass < rate[str(p["id"])] < max_pass:
                p["pass_rate"] = rate[str(p["id"])]
                p["images"] = [os.path.relpath(os.path.join(src_dir, im), dst_dir) for im in p.get("images", [])]
                fo.write(json.dumps(p, ensure_ascii=False) + "\n")
                kept += 1
    hist = defaultdict(int)
    for v in rate.values():
        hist[round(v * k)] += 1
    print(f"pass rate over {k} samples: " + ", ".join(f"{c}/{k}: {hist[c]}" for c in range(k + 1)))
    print(f"kept {kept} of {len(rate)} problems ({min_pass} < pass rate < {max_pass}) -> {dst}")


if __name__ == "__main__":
    main()
