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


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("geometry3k", "parquet"):
        sys.exit(__doc__)
    kind, src, out = sys.argv[1:]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = {"geometry3k": geometry3k, "parquet": parquet}[kind](src, out)
    with open(out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(rows)} problems -> {out}")
