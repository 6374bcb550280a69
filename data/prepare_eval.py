"""
Convert the public benchmark releases into the one problem format eval.py reads (README, "Data formats"):
  {"id", "question", "answer", "images": [paths relative to the output file], "choices", "subject", "level", "source"}

Download first (nothing here ships with the repo except the few rows in tests/data/ the tests use):
  MATH500     github.com/openai/prm800k: prm800k/math_splits/test.jsonl (500 problems, text only)
  MathVision  github.com/mathllm/MATH-V: data/test.jsonl (3,040) and data/testmini.jsonl (304); the images
              (images.zip, from the repo or the HF dataset MathLLMs/MathVision) unzipped to data/images/
  MathVerse   HF dataset AI4Math/MathVerse: testmini.json (788 problems x 5 versions) and images.zip unzipped
              next to it (images_version_1-4/, images_version_5/, images_version_6/); testmini_text_only.json optional

Commands (outputs go to data/eval/, which config/eval_ovr7b.py reads; --out=DIR to change):
  python data/prepare_eval.py math500 PATH/prm800k/math_splits/test.jsonl  # -> math500.jsonl
  python data/prepare_eval.py mathvision PATH/MATH-V/data      # -> mathvision.jsonl, mathvision_mini.jsonl
  python data/prepare_eval.py mathverse PATH/MathVerse         # -> mathverse_<version>.jsonl (vision_only: headline)
Images are not copied: the output records the path from the output folder to the downloaded image.
(The CPU demo's held-out questions come from data/prepare_demo.py, already in this format.)
"""
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "ABCDEFGHIJ"


def convert_math500(rows):
    return [{"id": r["unique_id"], "question": r["problem"], "answer": r["answer"], "images": [],
             "subject": r["subject"], "level": r["level"], "source": "MATH500"} for r in rows]


def convert_mathvision(rows, image_dir):
    """MATH-V rows; image_dir is the MATH-V data/ folder relative to the output folder. Multiple-choice
    rows have 5 options (sometimes just 'A'..'E', the real options being drawn in the image) and a letter answer."""
    return [{"id": r["id"], "question": r["question"], "answer": r["answer"],
             "images": [os.path.join(image_dir, r["image"])] if r.get("image") else [],
             **({"choices": r["options"]} if r.get("options") else {}),
             "subject": r["subject"], "level": r["level"], "source": "MathVision"} for r in rows]


def split_choices(question):
    """MathVerse writes options inside the question ('...\\nChoices:\\nA:40°\\nB:60°'); pull them out.
    Parsing stops at the first line that is not the next option (a few rows end in a stray number)."""
    m = re.search(r"\n\s*Choices?\s*:\s*\n", question)
    if not m:
        return question, None
    choices = []
    for line in question[m.end():].strip().split("\n"):
        opt = re.match(r"^\s*\(?([A-J])\)?\s*[:.)]\s*(.*)$", line)
        if not opt or opt.group(1) != LETTERS[len(choices)]:
            break
        choices.append(opt.group(2).strip())
    return (question[:m.start()].rstrip(), choices) if len(choices) >= 2 else (question, None)


def convert_mathverse(rows, image_dir):
    """MathVerse testmini rows (any of its problem versions) -> {version: problems}, e.g. 'vision_only'.
    The answer is the same across versions (keyed by problem_index); the Vision Only question is all in the image."""
    out = {}
    for r in rows:
        version = r["problem_version"].lower().replace(" ", "_")
        question, choices = split_choices(r["question"])
        mc = r["question_type"] == "multi-choice"
        if not question.strip():  # Vision Only: the question (and any options) are drawn in the image
            question = "Answer the question shown in the image."
            question += " Give the letter of the correct option." if mc and not choices else ""
        answer = r["answer"].strip()
        if mc and re.fullmatch(r"\([A-J]\)", answer):
            answer = answer[1]
        out.setdefault(version, []).append({
            "id": r["problem_index"], "question": question, "answer": answer,
            "images": [os.path.join(image_dir, r["image"])] if r.get("image") else [],
            **({"choices": choices} if choices else {}), "subject": r["metadata"]["subject"],
            "source": f"MathVerse testmini ({r['problem_version']})"})
    return out


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # MathVerse ships JSON arrays, the others JSONL
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(problems, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
    root = os.path.dirname(os.path.abspath(path))
    missing = sum(not os.path.exists(os.path.join(root, im)) for p in problems for im in p["images"])
    print(f"wrote {len(problems)} problems to {path}" + (f" ({missing} images not found yet)" if missing else ""))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--out=")]
    outs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")]
    kind = args[0] if args else ""
    out = outs[-1] if outs else os.path.join(REPO, "data", "eval")
    if kind == "math500" and len(args) == 2:
        write_jsonl(convert_math500(read_rows(args[1])), os.path.join(out, "math500.jsonl"))
    elif kind == "mathvision" and len(args) == 2:
        image_dir = os.path.relpath(args[1], out)
        for split, name in (("test", "mathvision"), ("testmini", "mathvision_mini")):
            rows = read_rows(os.path.join(args[1], f"{split}.jsonl"))
            write_jsonl(convert_mathvision(rows, image_dir), os.path.join(out, f"{name}.jsonl"))
    elif kind == "mathverse" and len(args) == 2:
        image_dir = os.path.relpath(args[1], out)
        rows = read_rows(os.path.join(args[1], "testmini.json"))
        text_only = os.path.join(args[1], "testmini_text_only.json")
        rows += read_rows(text_only) if os.path.exists(text_only) else []
        for version, problems in convert_mathverse(rows, image_dir).items():
            write_jsonl(problems, os.path.join(out, f"mathverse_{version}.jsonl"))
    else:
        sys.exit(__doc__)
