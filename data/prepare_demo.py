"""
Synthetic data for the CPU demo, generated deterministically from a seed:

  sft.jsonl         cold-start traces (messages format): counting the shapes named in a list and one-digit
                    additions, worked step by step in <think> with some verification and backtracking
                    phrases, ending in \\boxed{}; plus a few (n_sft_image) picture-counting traces
  rl.jsonl          image questions for RL (problem format): "How many shapes are in the image?" over
                    PIL-drawn pictures of 1-4 shapes; the answer is only in the image
  eval_text.jsonl   held-out text questions (additions whose digit pair never appears in sft.jsonl,
                    and counting lists)
  eval_image.jsonl  held-out image questions (pictures never used in RL)
  images/           the PNGs

    python data/prepare_demo.py                       # -> data/demo/
    python data/prepare_demo.py --out=data/demo --seed=0 --n_sft=3000 --n_rl=2000

The story is OVR's in miniature: the cold start teaches the format and the counting skill from text
alone; RL on images has to ground that skill in what the vision tower sees.
"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "heart"]
COLORS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20), (150, 50, 180)]
MAX_COUNT = 4  # shapes per picture (text lists go up to 6, so the cold start's guess on a picture is wide)
CELL, ROWS, COLS = 28, 2, 3  # one shape per 28x28 cell = one merged vision token per cell
HELD_OUT_PAIRS = {(a, b) for a in range(10) for b in range(10) if (a * 7 + b * 3) % 10 == 0}  # 10 of 100


def count_trace(n, rng):
    steps = ", ".join(str(i) for i in range(1, n + 1))
    lines = ["I need to count the shapes.", f"Let me count them one by one: {steps}."]
    if rng.random() < 0.3 and n > 1:  # a backtracking example: a miscount, noticed and redone
        lines += [f"So there are {n - 1}. Wait, I skipped one. Let me look again and count: {steps}."]
    if rng.random() < 0.5:
        lines += [f"Let me verify: I counted up to {n}, so the count is {n}."]
    lines += [f"So there are {n}."]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(n) + "}"


def add_trace(a, b, rng):
    lines = [f"I need to add {a} and {b}."]
    if rng.random() < 0.25:
        wrong = a + b + rng.choice([-1, 1])
        lines += [f"{a} + {b} = {wrong}. Wait, that is not right. Let me redo it."]
    lines += [f"{a} + {b} = {a + b}."]
    if rng.random() < 0.5:
        lines += [f"Let me verify: {a + b} - {b} = {a}. Correct."]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(a + b) + "}"


def count_question(rng):
    # the same words as the picture question, so the cold start's answer format carries over to images
    n = rng.randint(1, 6)
    return n, f"How many shapes are in this list: {', '.join(rng.choice(SHAPES) for _ in range(n))}?"


def draw(n, rng, path):
    """n shapes of random colour and kind in n distinct cells of a 2x3 grid on white."""
    img = Image.new("RGB", (COLS * CELL, ROWS * CELL), "white")
    d = ImageDraw.Draw(img)
    for cell in rng.sample(range(ROWS * COLS), n):
        r, c = divmod(cell, COLS)
        x0, y0 = c * CELL + rng.randint(2, 6), r * CELL + rng.randint(2, 6)
        s = rng.randint(16, 20)
        box, color = (x0, y0, x0 + s, y0 + s), rng.choice(COLORS)
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=color)
    img.save(path)


def image_problems(split, count, rng, out):
    probs = []
    for i in range(count):
        n = rng.randint(1, MAX_COUNT)
        rel = f"images/{split}_{i:05d}.png"
        draw(n, rng, os.path.join(out, rel))
        probs.append({"id": f"{split}-{i}", "question": "How many shapes are in the image?", "answer": str(n),
                      "images": [rel], "subject": "counting", "source": "demo"})
    return probs


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(out="data/demo", seed=0, n_sft=3000, n_sft_image=400, n_rl=2000, n_eval_text=200, n_eval_image=200):
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train_pairs = [(a, b) for a in range(10) for b in range(10) if (a, b) not in HELD_OUT_PAIRS]
    sft = []
    for _ in range(n_sft):
        if rng.random() < 0.5:
            n, q = count_question(rng)
            answer = count_trace(n, rng)
        else:
            a, b = rng.choice(train_pairs)
            q, answer = f"What is {a} + {b}?", add_trace(a, b, rng)
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    # A little image supervision in the cold start (the paper lists more of it as future work): with a
    # random vision tower, text-only SFT leaves the model blind to images, and RL from chance on a
    # ~1M-parameter model needs far more steps than a demo has. Pictures distinct from RL's and eval's.
    for p in image_problems("sft", n_sft_image, rng, out):
        user = [{"type": "image", "image": p["images"][0]}, {"type": "text", "text": p["question"]}]
        answer = count_trace(int(p["answer"]), rng)
        sft.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    rng.shuffle(sft)
    write_jsonl(os.path.join(out, "sft.jsonl"), sft)
    eval_text = []
    for i in range(n_eval_text):
        if i % 2 == 0:
            n, q = count_question(rng)
            eval_text.append({"id": f"text-{i}", "question": q, "answer": str(n), "images": [], "subject": "counting"})
        else:
            a, b = sorted(HELD_OUT_PAIRS)[i // 2 % len(HELD_OUT_PAIRS)]
            eval_text.append({"id": f"text-{i}", "question": f"What is {a} + {b}?", "answer": str(a + b),
                              "images": [], "subject": "addition"})
    write_jsonl(os.path.join(out, "eval_text.jsonl"), eval_text)
    write_jsonl(os.path.join(out, "rl.jsonl"), image_problems("rl", n_rl, rng, out))
    write_jsonl(os.path.join(out, "eval_image.jsonl"), image_problems("eval", n_eval_image, rng, out))
    print(f"wrote {n_sft} + {n_sft_image} SFT traces (text + image), {n_rl} RL image questions, {n_eval_text} + {n_eval_image} held-out "
          f"eval questions to {out}")


if __name__ == "__main__":
    kw = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    main(**{k: (int(v) if v.isdigit() else v) for k, v in kw.items()})
