"""
sft.py's start-up: rendering every sample to learn its length (sft.build_index) against reading the
cached index (out_dir/length_index.json), side by side, on synthetic text conversations of the length
of short reasoning traces, tokenised with the tiny model's tokenizer.

    python bench/bench_index.py                       # 2000 samples
    python bench/bench_index.py --n=20000 --think_words=2000

The cached start still hashes the data file (sha256) and reads the file once for its line offsets.
"""
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sft  # noqa: E402
from model import build_tiny_tokenizer  # noqa: E402


def main(n=2000, think_words=400):
    tok = build_tiny_tokenizer()
    words = "Let me check the sum again , wait so the answer is 3 + 4 = 7 . Hmm".split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = os.path.join(tmp, "data.jsonl"), os.path.join(tmp, "out", "length_index.json")
        with open(data, "w") as f:
            for _ in range(n):
                think = " ".join(rng.choice(words) for _ in range(rng.randint(think_words // 4, think_words)))
                answer = f"<think> {think} </think> \\boxed{{7}}"
                f.write(json.dumps({"messages": [{"role": "user", "content": "What is 3 + 4?"},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
        times = []
        for _ in range(2):  # the first call renders and writes the cache, the second reads it
            t0 = time.perf_counter()
            out = sft.build_index([data], tok, (56 * 56, 28 * 28 * 1280), 32768, "drop", 0, 1, cache=cache)
            times.append(time.perf_counter() - t0)
        mb = os.path.getsize(data) / 2**20
        print(f"{n} samples ({mb:.1f} MiB, {sum(out[1]) / n:.0f} tokens each on average)")
        print(f"render: {times[0]:.2f} s   cached: {times[1]:.3f} s   x{times[0] / times[1]:.0f}")


if __name__ == "__main__":
    main(**{k.lstrip("-"): int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
