"""
Convert the public RL datasets of the OVR recipe, in the layouts they are published in, to the problem
format of README's "Data formats" (one JSON object per line; image paths relative to the output's folder).
One table, LAYOUTS, says where each dataset keeps its question, answer, images, choices and id; one
function, convert, reads any of them. Images stored as bytes (the HF parquet layout) are written to
OUT's folder as images/<dataset>/<sha1 of the bytes>.<ext>, so shards with the same file name (two
`train-00000-of-00001.parquet` from different datasets or splits) can never overwrite each other's images;
ids are <dataset>/<shard>/<the row's own id or its row number>, <shard> being the input's path relative
to the inputs' common folder. Images given as paths are not copied: the output points at them.
Every run writes OUT.manifest.json next to OUT: the inputs, counts, and the dropped rows with why.

    python data/prepare_rl.py NAME INPUT [INPUT ...] OUT
    python data/prepare_rl.py geometry3k raw/geometry3k/data/train-*.parquet data/rl/geometry3k.jsonl
    python data/prepare_rl.py geometry3k_intergps raw/InterGPS/data/geometry3k/train data/rl/geometry3k.jsonl
    python data/prepare_rl.py geoqa raw/GEOQA_R1V_Train_8K/data/*.parquet data/rl/geoqa.jsonl
    python data/prepare_rl.py mmk12 raw/MMK12/data/train-*.parquet data/rl/mmk12.jsonl
    python data/prepare_rl.py scienceqa raw/ScienceQA/data/train-*.parquet data/rl/scienceqa.jsonl
    python data/prepare_rl.py chartqa raw/ChartQA/data/train-*.parquet data/rl/chartqa.jsonl
    python data/prepare_rl.py puzzlevqa raw/LLM-PuzzleTest/PuzzleVQA/data/*.json data/rl/puzzlevqa.jsonl
    python data/prepare_rl.py algopuzzlevqa raw/LLM-PuzzleTest/AlgoPuzzleVQA/data/*.json data/rl/algopuzzlevqa.jsonl
    python data/prepare_rl.py iconqa raw/iconqa_data/iconqa/train data/rl/iconqa.jsonl
    python data/prepare_rl.py pixmo_count raw/pixmo-count/data/train-*.parquet data/rl/pixmo_count.jsonl
    python data/prepare_rl.py tqa raw/tqa/train/tqa_v1_train.json data/rl/tqa.jsonl
    python data/prepare_rl.py geos "raw/LLaVA-OneVision-Data/GEOS(MathV360K)/train-00000-of-00001.parquet" data/rl/geos.jsonl
    python data/prepare_rl.py atomthink raw/AMATH-SFT/AMATH-SFT.json data/rl/atomthink.jsonl
    python data/prepare_rl.py orz raw/Open-Reasoner-Zero/data/orz_math_57k_collected.json data/rl/orz_57k.jsonl
Then mix them in rl.py (data_path="a.jsonl,b.jsonl", data_weights=[...]) and drop the problems the starting
model always or never solves: data/filter_difficulty.py. Needs pyarrow for parquet (pip install pyarrow).
"""
import functools
import hashlib
import json
import os
import re
import sys
from io import BytesIO

LETTERS = "ABCDEFGHIJ"

# Where each dataset keeps its fields, as published (download commands in README, "Data"). Keys:
#   q, a, images, choices, id: column names (images: a column holding one image or a list of them; an image
#     is {"bytes", "path"} as HF datasets stores it, or a path relative to the input file's folder)
#   a_is: how to read the answer: "text" (as is), "index" (0-based index into choices -> letter),
#     "key" (an option key such as "b" -> letter), "tag" (the text inside <answer>...</answer>), "first" (a list's first)
#   q_from: a template over the row's columns when the dataset has no question column
#   context: a column prepended to the question when non-empty
#   flatten: the function (FLATTEN below) that turns the published records into one row per problem first
#   image_dir: a folder next to the input that image paths are relative to
LAYOUTS = {
    # hiyouga/geometry3k (HF, EasyR1's copy of Geometry3K): images [{bytes,path}], problem with <image>, answer;
    # newer revisions add id and choices
    "geometry3k": dict(q="problem", a="answer", images="images", choices="choices", id="id"),
    # leonardPKU/GEOQA_R1V_Train_8K (HF, R1-V's GeoQA): image {bytes,path}, problem, solution "<answer> 145° </answer>"
    "geoqa": dict(q="problem", a="solution", a_is="tag", images="image"),
    # FanqingM/MMK12 (HF, MM-Eureka's K12): id, subject, image {bytes,path}, question, answer; the test split's
    # options are written inside the question and its answer is the letter
    "mmk12": dict(q="question", a="answer", images="image", id="id"),
    # derek-thomas/ScienceQA (HF): image {bytes,path} or None, question, choices [..], answer = index into choices, hint
    "scienceqa": dict(q="question", a="answer", a_is="index", images="image", choices="choices", context="hint"),
    # HuggingFaceM4/ChartQA (HF): image {bytes,path}, query, label [answer], human_or_machine
    "chartqa": dict(q="query", a="label", a_is="first", images="image"),
    # declare-lab/LLM-PuzzleTest PuzzleVQA/data/<puzzle>.json and AlgoPuzzleVQA/data/<puzzle>.json: one JSON object
    # per line {image: "images/<puzzle>/<puzzle>_0000.png" (under data/), question, options [often numbers],
    # answer: the option as a string, ...}
    "puzzlevqa": dict(q="question", a="answer", images="image", choices="options"),
    "algopuzzlevqa": dict(q="question", a="answer", images="image", choices="options"),
    # allenai/pixmo-count (HF): image_url, image_sha256, count, points, label. Only URLs are published: download
    # the images yourself to images/<image_sha256>.<ext> next to the parquet files; rows without one are dropped
    "pixmo_count": dict(q_from="How many {label} are there in the image?", a="count", images="image_sha256"),
    # MathLLMs/MathVision (HF): id, question, options, image (path), decoded_image {bytes,path}, answer, level, subject
    "mathvision": dict(q="question", a="answer", images="decoded_image", choices="options", id="id"),
    # Inter-GPS's Geometry3K zips (lupantech/InterGPS): <split>/<n>/data.json {problem_text, choices, answer letter}
    # and img_diagram.png: one folder per problem
    "geometry3k_intergps": dict(q="problem_text", a="answer", images="img_diagram.png", choices="choices", folder=True),
    # IconQA (lupantech/IconQA, iconqa_data.zip): iconqa/<split>/<ques_type>/<pid>/data.json {question, choices,
    # answer (index for choose_txt, text for fill_in_blank), ques_type} and image.png. choose_img (the options
    # are pictures) has no text answer and is dropped.
    "iconqa": dict(q="question", a="answer", a_is="index", images="image.png", choices="choices", folder=True),
    # TQA (allenai, tqa_train_val_test.zip; schema in the authors' docs): <split>/tqa_v1_<split>.json is a JSON array
    # of lessons whose questions sit in questions.{nonDiagramQuestions,diagramQuestions}.<id> as {beingAsked,
    # answerChoices.<a, b, ...>, correctAnswer (the option key), imagePath (diagram questions, from the split folder)},
    # every text in .processedText; tqa_questions flattens them into the columns named here
    "tqa": dict(q="question", a="answer", a_is="key", images="image", choices="choices", id="id", flatten="tqa"),
    # Geos (Seo et al. 2015) as bundled in MathV360K (Math-LLaVA) and republished with the images inside by
    # lmms-lab/LLaVA-OneVision-Data (HF), GEOS(MathV360K)/train-00000-of-00001.parquet, 498 rows: id, image
    # {bytes,path}, conversations [{from: human, value: "<image>\nHint: ...\nQuestion: ...\nChoices: ..."},
    # {from: gpt, value: "The answer is B"}], data_source. (The columns are the card's; the MathV360K wording of the
    # turns is from rows of other MathV360K subsets, not from a GEOS row.) llava_answers reads the turns; the
    # options stay inside the question and the answer is their letter, as in MMK12's test split.
    "geos": dict(q="question", a="answer", images="image", id="id", flatten="llava"),
    # AtomThink's AMATH-SFT (HF Quinn777/AMATH-SFT, AMATH-SFT.json + images.zip unpacked to images/ beside it; the
    # older Quinn777/AtomMATH-SFT alike): a JSON array in LLaMA-Factory's sharegpt layout (github Quinn777/AtomThink
    # data/dataset_info.json: messages in "conversations" with from/value/human/gpt, images in "image"), one record
    # per atomic step: the human turn holds the question (src/llamafactory/evaluation/utils/prompts.py:
    # "THE GIVEN QUESTION:\n{q}\nAnswer the question using a single word or phrase.\n\nHISTORICAL REASONING
    # STEPS: ...") and the record of the last step answers "Step n: To sum up, the final answer is: X" (the records are
    # written by data_engine/generate_with_gt.py at commit 5bb7f3e, which also stores "answer"). atomthink_problems
    # keeps one problem per (image, question).
    "atomthink": dict(q="question", a="answer", images="image", id="id", flatten="atomthink", image_dir="images"),
    # Open-Reasoner-Zero data/orz_math_57k_collected.json (and orz_math_72k_collection_extended.json,
    # orz_math_13k_collection_hard.json): one JSON array of pairs
    # [{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}]; text only
    "orz": dict(pairs=True),
}


def read_rows(path):
    """Rows of one input as dicts: parquet (streamed by row group), JSONL, or a JSON array."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("parquet inputs need pyarrow: pip install pyarrow")
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):  # one row group in memory at a time, not the whole shard
            yield from f.read_row_group(g).to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(200)
        f.seek(0)
        if head.startswith("version https://git-lfs"):
            raise SystemExit(f"{path} is a Git LFS pointer, not the data: install git-lfs and run `git lfs pull`"
                             " in the clone (or download the file from the web page)")
        if head.lstrip().startswith("["):
            yield from json.load(f)
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not valid JSON ({e})")


def folder_rows(root):
    """Folder layouts (Inter-GPS Geometry3K, IconQA): every folder under root with a data.json is one problem."""
    for d, _, files in sorted(os.walk(root)):
        if "data.json" in files:
            with open(os.path.join(d, "data.json"), encoding="utf-8") as f:
                row = json.load(f)
            yield dict(row, _dir=d)


def tqa_questions(lessons):
    """TQA's lessons -> one flat row per question, in the columns LAYOUTS["tqa"] names."""
    for lesson in lessons:
        for kind in ("nonDiagramQuestions", "diagramQuestions"):
            for qid, q in sorted((lesson.get("questions") or {}).get(kind, {}).items()):
                keys = sorted(q.get("answerChoices") or {})
                yield {"id": qid, "question": q["beingAsked"]["processedText"], "keys": keys,
                       "choices": [q["answerChoices"][k]["processedText"] for k in keys],
                       "answer": q["correctAnswer"]["processedText"], "image": q.get("imagePath")}


def llava_answers(records):
    """One-question LLaVA records (MathV360K's) -> flat rows: the human turn without MathV360K's "Hint: ..." line
    (the RL template asks for the answer its own way), and the answer from the gpt turn's "The answer is X"."""
    for r in records:
        turns = {c.get("from"): c.get("value") or "" for c in reversed(r.get("conversations") or [])}  # first of each
        q = re.sub(r"^\s*(<image>\s*)?Hint:[^\n]*\n(Question:\s*)?", "", turns.get("human", ""))
        m = re.fullmatch(r"\s*(?:the answer is|answer\s*:)\s*(.+?)\.?\s*", turns.get("gpt", ""), re.I | re.S)
        a = re.sub(r"^\(([A-Z])\)$", r"\1", m.group(1).strip()) if m else None  # "(B)" -> "B"
        yield dict(r, question=q, answer=a, **({} if m else {"_drop": "no 'The answer is ...' in the gpt turn"}))


def atomthink_problems(records):
    """AMATH-SFT's step records -> one row per (image, question), its answer from the record whose gpt turn is the
    last step ("To sum up, the final answer is: X"), or the record's own "answer" field where it has one."""
    problems = {}
    for i, r in enumerate(records):
        turns = {c.get("from"): c.get("value") or "" for c in reversed(r.get("conversations") or [])}
        q = r.get("question") or turns.get("human", "").replace("<image>", "")
        q = q.split("HISTORICAL REASONING STEPS:")[0].replace("THE GIVEN QUESTION:", "")
        q = q.split("Answer the question using a single word or phrase.")[0].strip()
        p = problems.setdefault((json.dumps(r.get("image")), q), {"id": i, "question": q, "image": r.get("image"),
                                                                  "answer": r.get("answer")})
        m = re.match(r"\s*(?:Step \d+:\s*)?To sum up, the final answer is:?\s*(.+?)\.?\s*$", turns.get("gpt", ""),
                     re.I | re.S)  # figures/asft1.png (commit 9bfc5db): "Step 7: To sum up, the final answer is: A."
        if m and p["answer"] in (None, ""):
            p["answer"] = m.group(1)
    for p in problems.values():
        yield p if p["answer"] not in (None, "") else dict(p, _drop="no final step ('To sum up, the final answer is')")


FLATTEN = {"tqa": tqa_questions, "llava": llava_answers, "atomthink": atomthink_problems}


def save_image(data, out_root, name):
    """Image bytes -> images/<name>/<sha1>.<ext> under out_root (content-addressed: no collisions, no duplicates)."""
    from PIL import Image, UnidentifiedImageError
    try:
        ext = (Image.open(BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
    except UnidentifiedImageError:
        return None  # counted as a dropped row, not a traceback
    rel = os.path.join("images", name, hashlib.sha1(data).hexdigest() + "." + ext)
    if not os.path.exists(os.path.join(out_root, rel)):
        os.makedirs(os.path.dirname(os.path.join(out_root, rel)), exist_ok=True)
        with open(os.path.join(out_root, rel), "wb") as f:
            f.write(data)
    return rel


@functools.lru_cache(maxsize=None)
def downloaded(folder):
    """{file name without extension: path} of a folder's files, read once (pixmo: 37k lookups)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return {f.rsplit(".", 1)[0]: os.path.join(folder, f) for f in names}


def find_image(im, src_dir, out_root, name, layout):
    """One image value of a row -> a path relative to out_root, or None if it is not there."""
    if isinstance(im, dict):  # HF datasets' Image feature
        if im.get("bytes"):
            return save_image(im["bytes"], out_root, name)
        im = im.get("path")
    if not im:
        return None
    if layout.get("folder"):
        path = os.path.join(src_dir, layout["images"])
    elif name == "pixmo_count":  # the images column holds the sha256 of a downloaded image
        path = downloaded(os.path.join(src_dir, "images")).get(im, "")
    else:  # a relative path: next to the input, in its image_dir, or one folder up (repos keep images beside data/)
        where = [src_dir, os.path.join(src_dir, layout.get("image_dir", "")), os.path.dirname(src_dir)]
        path = next((p for p in (os.path.join(d, im) for d in where) if os.path.exists(p)), os.path.join(src_dir, im))
    return os.path.relpath(path, out_root) if os.path.exists(path) else None


def convert_row(row, layout, name, src_dir, out_root):
    """One published row -> (problem without id, None) or (None, why it was dropped)."""
    if layout.get("pairs"):  # ORZ
        if not (isinstance(row, list) and len(row) == 2 and row[0].get("from") == "human"):
            return None, "not a [human, assistant] pair"
        q, a = row[0].get("value"), (row[1].get("ground_truth") or {}).get("value")
        return ({"question": q.strip(), "answer": str(a).strip(), "images": []}, None) if q and a not in (None, "") \
            else (None, "empty question or answer")
    if name == "iconqa" and row.get("ques_type") == "choose_img":
        return None, "choose_img: the options are pictures"
    if row.get("_drop"):  # the flatten function's reason
        return None, row["_drop"]
    q = layout["q_from"].format(**row) if "q_from" in layout else row.get(layout["q"])
    a = row.get(layout["a"])
    if not q or a is None or a == "" or a == []:
        return None, "empty question or answer"
    choices = [str(c) for c in row.get(layout.get("choices"), None) or []] or None
    kind = layout.get("a_is", "text")
    if kind == "index" and choices and str(a).isdigit():  # (IconQA's fill_in_blank has no choices: kept as text)
        if int(a) >= len(choices):
            return None, "answer index outside the choices"
        a = LETTERS[int(a)]  # the letter; reward.is_equiv also accepts the option text when choices are given
    elif kind == "key":  # TQA: the option's key; anything else is kept as the answer text
        a = LETTERS[row["keys"].index(a)] if a in row.get("keys", []) else a
    elif kind == "tag":
        m = re.search(r"<answer>(.*?)</answer>", str(a), re.S)
        if not m:
            return None, "no <answer> tag in the solution"
        a = m.group(1)
    elif kind == "first":
        a = a[0] if isinstance(a, list) else a
    images = row.get(layout["images"]) if not layout.get("folder") else layout["images"]
    images = images if isinstance(images, list) else [images] if images else []
    paths = [find_image(im, src_dir, out_root, name, layout) for im in images]
    if None in paths:
        return None, "image missing or unreadable"
    q = str(q).replace("<image>", "").strip()
    if layout.get("context") and row.get(layout["context"]):
        q = f"Context: {row[layout['context']].strip()}\n{q}"
    p = {"question": q, "answer": str(a).strip(), "images": paths}
    if choices:
        p["choices"] = choices
    return p, None


def convert(name, inputs, out):
    """Convert every input of dataset `name` -> (problems, manifest)."""
    layout = LAYOUTS[name]
    out_root = os.path.dirname(os.path.abspath(out))
    common = os.path.commonpath([os.path.abspath(i) for i in inputs])
    common = common if len(inputs) > 1 else os.path.dirname(common)
    problems, dropped, seen, n_rows = [], {}, set(), 0
    for src in inputs:
        shard = os.path.splitext(os.path.relpath(os.path.abspath(src), common))[0]
        rows = folder_rows(src) if layout.get("folder") else read_rows(src)
        rows = FLATTEN[layout["flatten"]](rows) if "flatten" in layout else rows
        for i, row in enumerate(rows):
            n_rows += 1
            src_dir = row.pop("_dir", None) if isinstance(row, dict) else None
            p, why = convert_row(row, layout, name, src_dir or os.path.dirname(os.path.abspath(src)), out_root)
            if src_dir:  # folder layouts: the problem's folder names it
                rid = f"{name}/{shard}/{os.path.relpath(src_dir, src)}"
            else:  # the dataset's own id where it has one, else the row number in its shard
                own = row.get(layout["id"]) if isinstance(row, dict) and layout.get("id") else None
                rid = f"{name}/{shard}/{own if own is not None else i}"
            if p and rid in seen:
                p, why = None, "duplicate id"
            if p is None:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            seen.add(rid)
            problems.append({"id": rid, **p, "source": name})
    manifest = {"dataset": name, "inputs": [os.path.abspath(i) for i in inputs], "output": os.path.abspath(out),
                "rows": n_rows, "problems": len(problems), "with_images": sum(bool(p["images"]) for p in problems),
                "dropped": dropped}
    return problems, manifest


def write(problems, manifest, out):
    """The JSONL (written to .tmp and renamed, so a killed run leaves no half file) and OUT.manifest.json."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
    os.replace(out + ".tmp", out)
    with open(out + ".manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{manifest['rows']} rows -> {len(problems)} problems in {out}; dropped: {manifest['dropped'] or 'none'}")


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
    manifest = {"dataset": "wethink", "inputs": [os.path.abspath(src)], "output": os.path.abspath(out),
                "rows": len(rows) + len(missing), "problems": len(rows), "with_images": len(rows), "free_form": free,
                "method_from_answer": by_rule, "dropped": {"image missing": len(missing)} if missing else {}}
    return rows, manifest


def wethink_main(argv):
    images = [a.split("=", 1)[1] for a in argv if a.startswith("--images=")]
    args = [a for a in argv if not a.startswith("--images=")]
    if len(args) != 2 or len(images) != 1:
        sys.exit("usage: python data/prepare_rl.py wethink WeThink_Multimodal_Reasoning_120K.jsonl OUT.jsonl --images=DIR")
    src, out = args
    write(*wethink(src, out, images[0]), out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["wethink"]:
        sys.exit(wethink_main(sys.argv[2:]))
    if len(sys.argv) < 4 or sys.argv[1] not in LAYOUTS:
        sys.exit(__doc__ + "\ndatasets: " + ", ".join(LAYOUTS) + ", wethink")
    name, *inputs, out = sys.argv[1:]
    for i in inputs:
        if not os.path.exists(i):
            sys.exit(f"{i}: not found")
    write(*convert(name, inputs, out), out)
