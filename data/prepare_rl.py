"""
Convert a public multimodal RL dataset, in the layout it is published in, to the problem format of
README's "Data formats" (one JSON object per line; image paths relative to the output file's folder).

  geometry3k   Inter-GPS's Geometry3K (lupantech/InterGPS; train.zip / val.zip / test.zip): one folder per
               problem with data.json {problem_text, choices [4], answer "A".."D"} and img_diagram.png
  parquet      EasyR1-style parquet files (e.g. hiyouga/geometry3k: images [{bytes, path}], problem with
               <image> placeholders, answer); needs pyarrow. Images are written next to the output.

    python data/prepare_rl.py geometry3k PATH/geometry3k/train data/rl/geo3k_train.jsonl
    python data/prepare_rl.py parquet PATH/geometry3k/data/train-00000-of-00001.parquet data/rl/geo3k_train.jsonl
Then drop the problems the starting model always or never solves: data/filter_difficulty.py.
"""
import json
import os
import sys


def geometry3k(src, out):
    root, rows = os.path.dirname(os.path.abspath(out)), []
    for d in sorted(os.listdir(src), key=lambda s: (len(s), s)):
        path = os.path.join(src, d, "data.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            p = json.load(f)
        image = os.path.join(src, d, "img_diagram.png")
        if not os.path.exists(image):
            raise SystemExit(f"{image} missing: unpack the dataset's zip as published (one folder per problem)")
        rows.append({"id": f"geometry3k_{p.get('id', d)}", "question": p["problem_text"], "answer": p["answer"],
                     "choices": p["choices"], "images": [os.path.relpath(image, root)], "source": "geometry3k"})
    return rows


def parquet(src, out):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("the parquet layout needs pyarrow: pip install pyarrow")
    root = os.path.dirname(os.path.abspath(out))
    name = os.path.splitext(os.path.basename(src))[0]
    os.makedirs(os.path.join(root, "images", name), exist_ok=True)
    rows = []
    for i, r in enumerate(pq.read_table(src).to_pylist()):
        images = []
        for k, im in enumerate(r.get("images") or []):
            rel = os.path.join("images", name, f"{i}_{k}.png")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(im["bytes"])
            images.append(rel)
        question = (r.get("problem") or r["question"]).replace("<image>", "").strip()
        rows.append({"id": f"{name}_{i}", "question": question, "answer": str(r["answer"]), "images": images, "source": name})
    return rows


# -----------------------------------------------------------------------------
# WeThink-Multimodal-Reasoning-120K (hf.co/datasets/yangjie-cv/WeThink_Multimodal_Reasoning_120K), with its own
# arguments: one JSONL file, WeThink_Multimodal_Reasoning_120K.jsonl, whose records are (github.com/yangjie-cv/
# WeThink, README "Dataset Download") {"problem", "answer", "category", "abilities", "refined_cot", "image_path",
# "reward"}; `reward` names the record's reward method (rule-based or model-based; the README gives no list of
# values, so a value naming "model" goes to the judge, one naming "rule" to the rules, and anything else is
# decided from the answer by reward.needs_judge, counted in the output). The images are not in it:
# they are LLaVA-CoT-100k's (hf.co/datasets/Xkev/LLaVA-CoT-100k: cat image.zip.part-* > image.zip; unzip), and
# image_path is read relative to --images, the folder it was unpacked into (a record whose image is not there is
# skipped, counted and named in a warning). Free-form answers get "answer_type": "free_form"
# (rl.py's judge scores them, README "RL with a model judge"); the rest "rule".
#   python data/prepare_rl.py wethink PATH/WeThink_Multimodal_Reasoning_120K.jsonl data/rl/wethink.jsonl --images=PATH/llava_cot

def wethink(src, out, images):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reward import needs_judge  # the same decision rule as the RL reward, for records without a method
    root, rows, missing, by_rule = os.path.dirname(os.path.abspath(out)), [], [], 0
    with open(src, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                question, answer = r["problem"], r["answer"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SystemExit(f"{src}:{n}: not a WeThink record ({e!r}); expected the fields of its README")
            paths = r.get("image_path") or []
            paths = [paths] if isinstance(paths, str) else paths
            full = [os.path.join(images, p) for p in paths]
            if not all(os.path.exists(p) for p in full):
                missing.append(f"{src}:{n}: {paths}")
                continue
            method = str(r.get("reward") or "").lower()
            if "model" in method:
                kind = "free_form"
            elif "rule" in method:
                kind = "rule"
            else:  # no (or an unknown) method named: decide from the answer
                kind, by_rule = "free_form" if needs_judge(answer) else "rule", by_rule + 1
            rows.append({"id": f"wethink_{n}", "question": question.replace("<image>", "").strip(), "answer": str(answer),
                         "answer_type": kind, "images": [os.path.relpath(p, root) for p in full], "source": "wethink",
                         "category": r.get("category"), "abilities": r.get("abilities")})
    if missing:
        print(f"warning: skipped {len(missing)} problem(s) whose image is not under {images}, e.g. {missing[0]}",
              file=sys.stderr)
        if not rows:
            raise SystemExit(f"no image found under --images={images}: unpack LLaVA-CoT-100k's image.zip there")
    if by_rule:
        print(f"{by_rule} problem(s) name no reward method: rule or judge chosen from the answer (reward.needs_judge)")
    free = sum(r["answer_type"] == "free_form" for r in rows)
    print(f"{free} of {len(rows)} problems free-form (judged in RL)")
    return rows


def wethink_main(argv):
    images = [a.split("=", 1)[1] for a in argv if a.startswith("--images=")]
    args = [a for a in argv if not a.startswith("--images=")]
    if len(args) != 2 or len(images) != 1:
        sys.exit("usage: python data/prepare_rl.py wethink WeThink_Multimodal_Reasoning_120K.jsonl OUT.jsonl --images=DIR")
    src, out = args
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = wethink(src, out, images[0])
    with open(out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(rows)} problems -> {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["wethink"]:
        sys.exit(wethink_main(sys.argv[2:]))
    if len(sys.argv) != 4 or sys.argv[1] not in ("geometry3k", "parquet"):
        sys.exit(__doc__)
    kind, src, out = sys.argv[1:]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = {"geometry3k": geometry3k, "parquet": parquet}[kind](src, out)
    with open(out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(rows)} problems -> {out}")
