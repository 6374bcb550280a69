"""
Synthetic data for the CPU demo, generated deterministically from a seed:

  sft.jsonl         cold-start traces (messages format), worked in <think> and ending in \\boxed{}:
                    - text: counting the shapes named in a list (1-8), and adding two digits. Their
                      reasoning carries the behaviours below.
                    - a few (n_sft_image) picture-counting traces, a glance and the answer, with NO
                      behaviour phrase: any behaviour on pictures after the cold start is transfer from text
  rl_image.jsonl    RL's picture questions: "How many shapes are in the image?" over PIL-drawn pictures of
                    1-4 shapes, the answer only in the picture
  rl_lists.jsonl    RL's text questions: list counts
  rl_add.jsonl      and additions over digit pairs the cold start's equations never had. rl.py mixes the
                    three files as OVR mixes text and image problems, and logs each one's metrics
  eval_text.jsonl   held-out text questions: list counts, and additions over pairs seen neither in SFT nor RL
  eval_image.jsonl  held-out image questions (pictures never used in SFT or RL)
  eval_rl.jsonl     the first eval_rl_each of each eval file, interleaved: rl.py's periodic eval
  images/           the PNGs

    python data/prepare_demo.py                       # -> data/demo/
    python data/prepare_demo.py --out=data/demo --seed=0 --n_sft=3000 --n_rl=2000

Behaviours in the text traces of list counts (eval.py's detector finds them by these phrases):
  - linguistic mental imagery: "Let me picture them in my mind." OVR (arXiv 2507.05255, §5.2) traces the
    visual behaviours it sees after a text-only cold start to such phrases in DeepSeek-R1's text traces.
  - a recount with utility, worded as a second look at the pictured list: "At a glance, there are 5." then
    "Let me look at the picture again and count them one by one: 1, 2, 3, 4, 5, 6." and "Wait, that is not
    right." where the glance was off (visual reflection and backtracking for the detector). Some glances in
    the traces are off by one and only the recount fixes them, so answers with the recount are more often
    right: RL has something to pay for.
  - a phrase without utility: "First, let me read the question again." (subgoal setting; on additions too):
    it changes no answer, so RL has nothing to amplify.
"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "heart"]
COLORS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20), (150, 50, 180)]
MAX_COUNT = 4  # shapes per picture
CELL, ROWS, COLS = 28, 2, 3  # one shape per 28x28 cell = one merged vision token per cell
# Addition pairs a + b of digits 0-9, split once (the same for every seed): 10 of the 45 pairs a != b give eval one
# order and 12 give RL one order, the other order staying in the cold start (the model can learn that a + b = b + a);
# the rest, both orders, and the doubles are the cold start's.
_SPLIT = [(a, b) for a in range(10) for b in range(a + 1, 10)]
random.Random(1234).shuffle(_SPLIT)
_SPLIT = [p if random.Random(1234 + i).random() < 0.5 else p[::-1] for i, p in enumerate(_SPLIT)]
EVAL_PAIRS, RL_PAIRS = _SPLIT[:10], _SPLIT[10:22]
SFT_PAIRS = ([p for q in _SPLIT[22:] for p in (q, q[::-1])] + [p[::-1] for p in _SPLIT[:22]]
             + [(a, a) for a in range(10)])
P_IMAGERY = 0.5   # share of list-count traces that picture the list in mind ("Let me picture them in my mind.")
P_CHECK = 0.5     # share of list-count traces that check the glance: "Let me look at the picture again and count"
P_WRONG = 0.4     # share of checking traces whose first answer is off (the check corrects it)
P_NOOP = 0.3      # share of text traces with the useless "First, let me read the question again."
MAX_LIST = 8      # shapes per text list


def count_trace(n, rng, text=True):
    """A glance, then (sometimes) a recount of the pictured list that checks it. text=False for a picture: the
    glance alone, no behaviour phrase at all."""
    check = text and rng.random() < P_CHECK
    glance = n + (rng.choice([-1, 1]) if check and rng.random() < P_WRONG else 0)
    glance = glance if glance >= 1 else n + 1
    lines = ["I need to count the shapes."]
    if text and rng.random() < P_NOOP:
        lines += ["First, let me read the question again."]
    if text and rng.random() < P_IMAGERY:
        lines += ["Let me picture them in my mind."]
    lines += [f"At a glance, there are {glance}."]
    if check:
        lines += ["Let me look at the picture again and count them one by one: " +
                  ", ".join(str(i) for i in range(1, n + 1)) + "."]
        lines += ["Correct." if glance == n else "Wait, that is not right."]
    lines += [f"So there are {n}."]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(n) + "}"


def add_trace(a, b, rng):
    lines = [f"I need to add {a} and {b}."]
    if rng.random() < P_NOOP:
        lines += ["First, let me read the question again."]
    lines += [f"{a} + {b} = {a + b}.", f"So the answer is {a + b}."]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(a + b) + "}"


def count_question(rng):
    # the same words as the picture question, so the cold start's answer format carries over to images
    n = rng.randint(1, MAX_LIST)
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
                      "images": [rel], "subject": "image counting", "source": "demo"})
    return probs


def text_problems(split, count, pairs, rng, share_add=0.5):
    probs = []
    for i in range(count):
        if rng.random() < share_add:
            a, b = rng.choice(pairs)
            q, ans, subject = f"What is {a} + {b}?", a + b, "addition"
        else:
            ans, q = count_question(rng)
            subject = "counting"
        probs.append({"id": f"{split}-{i}", "question": q, "answer": str(ans), "images": [], "subject": subject})
    return probs


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(out="data/demo", seed=0, n_sft=3000, n_sft_image=300, n_rl=2000, n_rl_lists=1400, n_rl_add=600,
         n_eval_text=200, n_eval_image=200, eval_rl_each=30):
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    sft = []
    for _ in range(n_sft):
        if rng.random() < 0.6:
            n, q = count_question(rng)
            answer = count_trace(n, rng)
        else:
            a, b = rng.choice(SFT_PAIRS)
            q, answer = f"What is {a} + {b}?", add_trace(a, b, rng)
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    # A little image supervision in the cold start (the paper lists more of it as future work): with a
    # random vision tower, text-only SFT leaves the model blind to images, and RL from chance on a
    # ~1M-parameter model needs far more steps than a demo has. Pictures distinct from RL's and eval's, and
    # traces without any behaviour phrase: what the model does on pictures beyond a glance comes from text.
    for p in image_problems("sft", n_sft_image, rng, out):
        user = [{"type": "image", "image": p["images"][0]}, {"type": "text", "text": p["question"]}]
        answer = count_trace(int(p["answer"]), rng, text=False)
        sft.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    rng.shuffle(sft)
    write_jsonl(os.path.join(out, "sft.jsonl"), sft)
    # RL mixes text and image problems (OVR §3.3), one file each: rl.py mixes them with data_weights and logs
    # reward, accuracy and behaviours per file. Text: list counts, and additions over pairs new to the model.
    write_jsonl(os.path.join(out, "rl_image.jsonl"), image_problems("rl", n_rl, rng, out))
    write_jsonl(os.path.join(out, "rl_lists.jsonl"), text_problems("rllist", n_rl_lists, RL_PAIRS, rng, share_add=0))
    write_jsonl(os.path.join(out, "rl_add.jsonl"), text_problems("rladd", n_rl_add, RL_PAIRS, rng, share_add=1))
    eval_text = text_problems("text", n_eval_text, EVAL_PAIRS, rng)
    eval_image = image_problems("eval", n_eval_image, rng, out)
    write_jsonl(os.path.join(out, "eval_text.jsonl"), eval_text)
    write_jsonl(os.path.join(out, "eval_image.jsonl"), eval_image)
    write_jsonl(os.path.join(out, "eval_rl.jsonl"),
                [p for pair in zip(eval_text[:eval_rl_each], eval_image[:eval_rl_each]) for p in pair])
    print(f"wrote {n_sft} + {n_sft_image} SFT traces (text + image), {n_rl} + {n_rl_lists} + {n_rl_add} RL problems "
          f"(image + lists + additions), {n_eval_text} + {n_eval_image} held-out eval questions to {out}")


if __name__ == "__main__":
    kw = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    main(**{k: (int(v) if v.isdigit() else v) for k, v in kw.items()})
