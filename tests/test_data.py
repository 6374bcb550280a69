# data/prepare_*.py on fixture files written in each dataset's published layout (a few rows each; images as
# parquet bytes where the dataset stores them so; two shards with the same file name), converted with the
# README's commands and loaded with the loader each stage uses (rl.load_data / rl.load_sources, eval.load_problems,
# sft.read_messages). Every row's question, answer, choices and image pixels are checked against values written
# here by hand. Then (slow) a mixed text + image RL run on the tiny model logs reward per source.
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

import eval as ev
import rl
import sft

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(color, fmt="PNG"):
    """A small image of one colour, encoded: each row gets its own colour, so a swapped image is caught."""
    from io import BytesIO
    buf = BytesIO()
    Image.new("RGB", (28 + color[0] % 5, 28), color).save(buf, format=fmt)
    return buf.getvalue()


def pixels(src):
    from io import BytesIO
    return np.asarray(Image.open(BytesIO(src) if isinstance(src, bytes) else src).convert("RGB"))


def parquet(path, rows, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def run(*args, ok=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


def check(problems, expected, root_images=None):
    """problems (loaded) vs expected [(question, answer, choices or None, image bytes / path or None)]."""
    assert len(problems) == len(expected), [p["question"] for p in problems]
    for p, (q, a, choices, image) in zip(problems, expected):
        assert (p["question"], p["answer"], p.get("choices")) == (q, a, choices)
        if image is None:
            assert p["images"] == []
        else:
            [im] = p["images"]
            assert (pixels(im) == pixels(image)).all(), (p["id"], im)


# -----------------------------------------------------------------------------
# RL sets: each builder writes the published layout under tmp and returns (inputs, expected rows in order)

def hf_geometry3k(tmp):
    # hiyouga/geometry3k: two shards with the same file name (e.g. two revisions / copies), images [{bytes, path}]
    a, b = png((250, 0, 0)), png((0, 250, 0))
    s1 = parquet(tmp / "v1/data/train-00000-of-00001.parquet",
                 [{"images": [{"bytes": a, "path": None}], "problem": "<image>Find x.", "answer": "3",
                   "id": 0, "choices": ["1", "2", "3", "4"]}])
    s2 = parquet(tmp / "v2/data/train-00000-of-00001.parquet",
                 [{"images": [{"bytes": b, "path": None}], "problem": "<image>Find y.", "answer": "2\\sqrt{3}",
                   "id": 0, "choices": ["2", "2\\sqrt{3}", "4", "6"]}])
    return [s1, s2], [("Find x.", "3", ["1", "2", "3", "4"], a), ("Find y.", "2\\sqrt{3}", ["2", "2\\sqrt{3}", "4", "6"], b)]


def geoqa(tmp):
    # leonardPKU/GEOQA_R1V_Train_8K: image {bytes, path}, problem, solution with the answer in <answer> tags
    a, b = png((10, 20, 200), "JPEG"), png((200, 200, 0))
    rows = [{"image": {"bytes": a, "path": "1.jpg"}, "problem": "As shown, angle ACB = ?",
             "solution": "<answer> 145° </answer>"},
            {"image": {"bytes": b, "path": "2.png"}, "problem": "Find AB.", "solution": "<answer>4</answer>"},
            {"image": {"bytes": b, "path": "3.png"}, "problem": "Broken row", "solution": "4"},
            {"image": {"bytes": b"not an image", "path": "4.png"}, "problem": "Bad bytes", "solution": "<answer>1</answer>"}]
    return [parquet(tmp / "geoqa/data/train-00000-of-00001.parquet", rows)], \
        [("As shown, angle ACB = ?", "145°", None, a), ("Find AB.", "4", None, b)]


def mmk12(tmp):
    # FanqingM/MMK12: id, subject, image {bytes, path}, question, answer. Same shard file name as geoqa's.
    a, b = png((0, 120, 120)), png((120, 0, 120))
    rows = [{"id": "m1", "subject": "math", "image": {"bytes": a, "path": None}, "question": "Compute the area.",
             "answer": "12"},
            {"id": "p7", "subject": "physics", "image": {"bytes": b, "path": None},
             "question": "Which is right?\nA. up\nB. down", "answer": "B"}]
    return [parquet(tmp / "mmk12/data/train-00000-of-00001.parquet", rows)], \
        [("Compute the area.", "12", None, a), ("Which is right?\nA. up\nB. down", "B", None, b)]


def scienceqa(tmp):
    # derek-thomas/ScienceQA: image {bytes, path} or null, question, choices, answer = index into choices, hint
    a = png((90, 90, 30))
    rows = [{"image": {"bytes": a, "path": None}, "question": "Which animal is a mammal?",
             "choices": ["frog", "whale", "trout"], "answer": 1, "hint": "Look at the picture."},
            {"image": None, "question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": ""}]
    return [parquet(tmp / "scienceqa/data/train-00000-of-00001.parquet", rows)], \
        [("Context: Look at the picture.\nWhich animal is a mammal?", "B", ["frog", "whale", "trout"], a),
         ("Which word is a noun?", "B", ["run", "dog"], None)]


def chartqa(tmp):
    # HuggingFaceM4/ChartQA: image, query, label [answer], human_or_machine
    a = png((5, 5, 5))
    rows = [{"image": {"bytes": a, "path": None}, "query": "What is the highest value?", "label": ["62"],
             "human_or_machine": 0}]
    return [parquet(tmp / "chartqa/data/test-00000-of-00001.parquet", rows)], [("What is the highest value?", "62", None, a)]


def puzzle(tmp, name):
    # declare-lab/LLM-PuzzleTest <Set>/data/<puzzle>.json: a JSON object per line; images in <Set>/data/images/
    d = tmp / name / "data"
    (d / "images" / "p").mkdir(parents=True)
    exp = []
    with open(d / "p.json", "w") as f:
        for i, color in enumerate([(1, 2, 3), (200, 100, 50)]):
            Image.new("RGB", (30, 30), color).save(d / "images" / "p" / f"p_{i:04d}.png")
            q, a = f"What is the missing number? ({i})", str(5 + i)
            # as published: options are numbers, the answer is the option as a string
            f.write(json.dumps({"image": f"images/p/p_{i:04d}.png", "question": q, "options": [4, 5, 6, 7], "answer": a,
                                "caption": "...", "explanation": "..."}) + "\n")
            exp.append((q, a, ["4", "5", "6", "7"], d / "images" / "p" / f"p_{i:04d}.png"))
    return [str(d / "p.json")], exp


def pixmo_count(tmp):
    # allenai/pixmo-count: URLs only; images downloaded by the user to images/<image_sha256>.<ext>
    d = tmp / "pixmo" / "data"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(d / "images" / "abc123.jpg", quality=100)
    rows = [{"image_url": "http://x/1.jpg", "image_sha256": "abc123", "count": 4, "points": [{"x": 1.0, "y": 2.0}],
             "label": "Book"},
            {"image_url": "http://x/2.jpg", "image_sha256": "def456", "count": 2, "points": [], "label": "Chair"}]
    return [parquet(d / "train-00000-of-00001.parquet", rows)], \
        [("How many Book are there in the image?", "4", None, d / "images" / "abc123.jpg")]


def geometry3k_intergps(tmp):
    # lupantech/InterGPS geometry3k zips: <split>/<n>/data.json {problem_text, choices, answer} + img_diagram.png
    src, exp = tmp / "geometry3k" / "train", []
    for i, (ans, color) in enumerate([("B", (0, 0, 0)), ("D", (255, 255, 255))]):
        (src / str(i)).mkdir(parents=True)
        (src / str(i) / "data.json").write_text(json.dumps(
            {"id": i, "problem_text": f"Find x. ({i})", "choices": ["1", "2", "3", "4"], "answer": ans}))
        Image.new("RGB", (30, 20), color).save(src / str(i) / "img_diagram.png")
        exp.append((f"Find x. ({i})", ans, ["1", "2", "3", "4"], src / str(i) / "img_diagram.png"))
    return [str(src)], exp


def iconqa(tmp):
    # lupantech/IconQA iconqa_data.zip: iconqa/<split>/<ques_type>/<pid>/data.json + image.png
    src = tmp / "iconqa" / "train"
    rows = {"choose_txt/1": {"question": "Which is bigger?", "choices": ["cat", "dog", "ant"], "answer": 2,
                             "ques_type": "choose_txt"},
            "fill_in_blank/2": {"question": "How many dots?", "choices": [], "answer": "7", "ques_type": "fill_in_blank"},
            "choose_img/3": {"question": "Which shape?", "choices": ["choice_0.png", "choice_1.png"], "answer": 0,
                             "ques_type": "choose_img"}}
    for i, (d, r) in enumerate(rows.items()):
        (src / d).mkdir(parents=True)
        (src / d / "data.json").write_text(json.dumps(r))
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(src / d / "image.png")
    return [str(src)], [("Which is bigger?", "C", ["cat", "dog", "ant"], src / "choose_txt/1/image.png"),
                        ("How many dots?", "7", None, src / "fill_in_blank/2/image.png")]


def tqa(tmp):
    # TQA tqa_train_val_test.zip: train/tqa_v1_train.json (lessons; questions two dicts deep), images by imagePath
    d = tmp / "tqa" / "train"
    (d / "question_images").mkdir(parents=True)
    Image.new("RGB", (50, 40), (33, 66, 99)).save(d / "question_images" / "cycle.png")
    choice = lambda t: {"idStructural": "a.", "processedText": t, "rawText": t}  # noqa: E731
    lesson = {"globalID": "L_0001", "lessonName": "water cycle", "questions": {
        "nonDiagramQuestions": {"NDQ_000001": {"beingAsked": {"processedText": "rain is a form of", "rawText": "..."},
                                               "answerChoices": {"a": choice("evaporation"), "b": choice("precipitation")},
                                               "correctAnswer": {"processedText": "b", "rawText": "b"},
                                               "globalID": "NDQ_000001", "questionType": "Multiple Choice"}},
        "diagramQuestions": {"DQ_000002": {"beingAsked": {"processedText": "which stage is shown?", "rawText": "..."},
                                           "answerChoices": {"a": choice("melting"), "b": choice("runoff"),
                                                             "c": choice("condensation")},
                                           "correctAnswer": {"processedText": "c", "rawText": "c"},
                                           "imagePath": "question_images/cycle.png", "imageName": "cycle.png",
                                           "globalID": "DQ_000002", "questionType": "Diagram Multiple Choice"}}}}
    (d / "tqa_v1_train.json").write_text(json.dumps([lesson]))
    return [str(d / "tqa_v1_train.json")], [("rain is a form of", "B", ["evaporation", "precipitation"], None),
                                            ("which stage is shown?", "C", ["melting", "runoff", "condensation"],
                                             d / "question_images" / "cycle.png")]


def orz(tmp):
    # Open-Reasoner-Zero data/orz_math_57k_collected.json: one JSON array of [human, assistant] pairs
    rows = [[{"from": "human", "value": "What is $1+1$?"}, {"from": "assistant", "ground_truth": {"value": "2"}}],
            [{"from": "human", "value": "Solve $x^2=4$, $x>0$."}, {"from": "assistant", "ground_truth": {"value": "2"}}],
            [{"from": "human", "value": "No answer"}, {"from": "assistant", "ground_truth": {"value": ""}}]]
    (tmp / "orz").mkdir(parents=True)
    (tmp / "orz" / "orz_math_57k_collected.json").write_text(json.dumps(rows))
    return [str(tmp / "orz" / "orz_math_57k_collected.json")], [("What is $1+1$?", "2", None, None),
                                                                ("Solve $x^2=4$, $x>0$.", "2", None, None)]


def geos(tmp):
    # lmms-lab/LLaVA-OneVision-Data GEOS(MathV360K)/train-00000-of-00001.parquet: id, image, conversations, data_source;
    # MathV360K's turns: "<image>\nHint: ...\nQuestion: ..." and "The answer is X"
    a, b = png((30, 60, 90)), png((90, 60, 30))
    hint = "<image>\nHint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
    q1 = "In the diagram, AB = BC. What is x?\nChoices:\n(A) 30\n(B) 45\n(C) 60\n(D) 90"
    rows = [{"id": "identity_1", "image": {"bytes": a, "path": None}, "data_source": "GEOS(MathV360K)",
             "conversations": [{"from": "human", "value": hint + "Question: " + q1}, {"from": "gpt", "value": "The answer is B"}]},
            {"id": "identity_2", "image": {"bytes": b, "path": None}, "data_source": "GEOS(MathV360K)",
             "conversations": [{"from": "human", "value": "<image>\nHint: Please answer the question requiring an integer "
                                "answer and provide the final value, e.g., 1, 2, 3, at the end.\nQuestion: What is the area "
                                "of the square?"}, {"from": "gpt", "value": "The answer is 16"}]},
            {"id": "identity_3", "image": {"bytes": b, "path": None}, "data_source": "GEOS(MathV360K)",
             "conversations": [{"from": "human", "value": "<image>\nFind y."}, {"from": "gpt", "value": "y is 3"}]}]
    return [parquet(tmp / "LLaVA-OneVision-Data/GEOS(MathV360K)/train-00000-of-00001.parquet", rows)], \
        [(q1, "B", None, a), ("What is the area of the square?", "16", None, b)]


def atomthink_turn(question, steps):
    # AtomThink's prompt (github Quinn777/AtomThink src/llamafactory/evaluation/utils/prompts.py) with <image> in front
    return (f"<image>\nTHE GIVEN QUESTION:\n{question}\nAnswer the question using a single word or phrase.\n\n"
            f"HISTORICAL REASONING STEPS:\n{steps}\n\nYour task is to predict the next step of reasoning ...")


def atomthink(tmp):
    # HF Quinn777/AMATH-SFT: AMATH-SFT.json (sharegpt: image, conversations; one record per atomic step) and
    # images.zip unpacked to images/. Two problems share an image; one has no final step. The last step as in the
    # repo's figures/asft1.png ("Step 7: To sum up, the final answer is: A.") and as its prompt asks (no "Step n:").
    d = tmp / "AMATH-SFT"
    for sub, color in (("geo", (5, 100, 5)), ("clevr", (100, 5, 5))):
        (d / "images" / sub).mkdir(parents=True)
        Image.new("RGB", (32, 24), color).save(d / "images" / sub / "1.png")
    q1, q2, q3 = "As shown, find angle ABC.\nChoices:\n(A) 30°\n(B) 60°", "How many cubes are left?", "Find AB."
    step = lambda image, q, steps, out: {"image": image, "conversations": [  # noqa: E731
        {"from": "human", "value": atomthink_turn(q, steps)}, {"from": "gpt", "value": out}]}
    records = [step("geo/1.png", q1, "Step 1: a.\n\nStep 2: b.", "Step 3: To sum up, the final answer is: B."),
               step("geo/1.png", q1, "Step 1: a.", "Step 2: b."),
               step("geo/1.png", q1, "", "Step 1: a."),
               step("clevr/1.png", q2, "", "Step 1: there are 5 cubes, 2 are removed."),
               step("geo/1.png", q3, "", "Step 1: AB is a side."),
               step("clevr/1.png", q2, "Step 1: there are 5 cubes, 2 are removed.", "To sum up, the final answer is: 3")]
    (d / "AMATH-SFT.json").write_text(json.dumps(records))
    return [str(d / "AMATH-SFT.json")], [(q1, "B", None, d / "images/geo/1.png"), (q2, "3", None, d / "images/clevr/1.png")]


RL_SETS = {"geometry3k": hf_geometry3k, "geoqa": geoqa, "mmk12": mmk12, "scienceqa": scienceqa, "chartqa": chartqa,
           "puzzlevqa": lambda t: puzzle(t, "PuzzleVQA"), "algopuzzlevqa": lambda t: puzzle(t, "AlgoPuzzleVQA"),
           "pixmo_count": pixmo_count, "tqa": tqa, "geometry3k_intergps": geometry3k_intergps, "iconqa": iconqa, "orz": orz,
           "geos": geos, "atomthink": atomthink}
DROPPED = {"geoqa": {"no <answer> tag in the solution": 1, "image missing or unreadable": 1}, "pixmo_count": {"image missing or unreadable": 1},
           "iconqa": {"choose_img: the options are pictures": 1}, "orz": {"empty question or answer": 1},
           "geos": {"no 'The answer is ...' in the gpt turn": 1},
           "atomthink": {"no final step ('To sum up, the final answer is')": 1}}


@pytest.mark.parametrize("name", sorted(RL_SETS))
def test_rl_set_converts_and_loads(name, tmp_path):
    inputs, expected = RL_SETS[name](tmp_path / "raw")
    out = tmp_path / "rl" / f"{name}.jsonl"
    run("data/prepare_rl.py", name, *inputs, str(out))
    check(rl.load_data(str(out)), expected)  # what rl.py trains on
    check(ev.load_problems(str(out)), expected)  # what eval.py and data/filter_difficulty.py read
    manifest = json.loads((tmp_path / "rl" / f"{name}.jsonl.manifest.json").read_text())
    assert manifest["problems"] == len(expected) and manifest["dropped"] == DROPPED.get(name, {})
    assert manifest["rows"] == len(expected) + sum(manifest["dropped"].values())


def test_atomthink_data_engine_layout(tmp_path):
    # the records as AtomThink's data engine writes them (github Quinn777/AtomThink, data_engine/generate_with_gt.py
    # at 5bb7f3e): final_input_prompt, image, conversations, answer; the prompt without "THE GIVEN QUESTION:"
    d = tmp_path / "AtomMATH"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), (7, 77, 177)).save(d / "images" / "42.png")
    prompt = "<image>\nWhat is the perimeter?\nAnswer the question using a single word or phrase."
    records = [{"final_input_prompt": prompt, "image": "42.png", "answer": "24",
                "conversations": [{"from": "human", "value": f"{prompt}\n\nHISTORICAL REASONING STEPS:\n{h}\n\nYour task ..."},
                                  {"from": "gpt", "value": g}]}
               for h, g in (("Step 1: the side is 6.", "Step 2: 4 * 6 = 24."), ("", "Step 1: the side is 6."))]
    (d / "AMATH-SFT.json").write_text(json.dumps(records))
    run("data/prepare_rl.py", "atomthink", str(d / "AMATH-SFT.json"), str(tmp_path / "rl" / "atomthink.jsonl"))
    check(rl.load_data(str(tmp_path / "rl" / "atomthink.jsonl")), [("What is the perimeter?", "24", None, d / "images/42.png")])


def test_same_shard_names_never_share_images_or_ids(tmp_path):
    # geoqa and mmk12 shards are both train-00000-of-00001.parquet; converted into one folder, and a third call
    # with two same-named geometry3k shards: every image stays its own row's, every id is unique
    out = tmp_path / "rl"
    loaded = []
    for name in ("geoqa", "mmk12", "geometry3k"):
        inputs, expected = RL_SETS[name](tmp_path / "raw")
        run("data/prepare_rl.py", name, *inputs, str(out / f"{name}.jsonl"))
        loaded.append(rl.load_data(str(out / f"{name}.jsonl")))
        check(loaded[-1], expected)
    problems, _ = rl.load_sources(",".join(str(out / f"{n}.jsonl") for n in ("geoqa", "mmk12", "geometry3k")))
    ids = [p["id"] for p in problems]
    assert len(set(ids)) == len(ids), ids
    assert ids[-2:] == ["geometry3k/v1/data/train-00000-of-00001/0", "geometry3k/v2/data/train-00000-of-00001/0"]
    images = [p["images"][0] for p in problems]
    assert len(set(images)) == len(images)


# -----------------------------------------------------------------------------
# benchmarks (eval.py)

def mathvision_github(tmp):
    # github.com/mathllm/MATH-V: data/test.jsonl, data/testmini.jsonl; images/<id>.jpg at the repo root
    repo = tmp / "MATH-V"
    (repo / "data").mkdir(parents=True)
    (repo / "images").mkdir()
    rows = [{"id": "1", "question": "How many dots?", "options": [], "image": "images/1.jpg", "answer": "6",
             "solution": None, "level": 2, "subject": "counting"},
            {"id": "2", "question": "Which bike?\n<image1>", "options": ["A", "B", "C", "D", "E"], "image": "images/2.jpg",
             "answer": "C", "solution": None, "level": 1, "subject": "arithmetic"}]
    for i, color in ((1, (10, 10, 10)), (2, (240, 10, 10))):
        Image.new("RGB", (40, 40), color).save(repo / "images" / f"{i}.jpg", quality=100)
    (repo / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "data" / "testmini.jsonl").write_text(json.dumps(rows[1]) + "\n")
    return repo, [("How many dots?", "6", None, repo / "images/1.jpg"),
                  ("Which bike?\n<image1>", "C", ["A", "B", "C", "D", "E"], repo / "images/2.jpg")]


@pytest.mark.parametrize("where", ["repo", "data"])
def test_mathvision_github_layout(where, tmp_path):
    repo, expected = mathvision_github(tmp_path / "raw")
    out = tmp_path / "eval"
    run("data/prepare_eval.py", "mathvision", str(repo if where == "repo" else repo / "data"), f"--out={out}")
    check(ev.load_problems(str(out / "mathvision.jsonl")), expected)
    check(ev.load_problems(str(out / "mathvision_mini.jsonl")), expected[1:])
    assert json.loads((out / "mathvision.jsonl.manifest.json").read_text())["images_not_found"] == 0


def test_mathvision_hf_parquet_layout(tmp_path):
    # HF MathLLMs/MathVision: data/test-*.parquet and data/testmini-*.parquet, image bytes in decoded_image
    a, b = png((1, 200, 1)), png((1, 1, 200))
    rows = [{"id": "1", "question": "How many dots?", "options": [], "image": "images/1.jpg",
             "decoded_image": {"bytes": a, "path": None}, "answer": "6", "solution": None, "level": 2, "subject": "counting"},
            {"id": "2", "question": "Which bike?", "options": ["A", "B", "C", "D", "E"], "image": "images/2.jpg",
             "decoded_image": {"bytes": b, "path": None}, "answer": "C", "solution": None, "level": 1, "subject": "arithmetic"}]
    raw = tmp_path / "MathVision" / "data"
    parquet(raw / "test-00000-of-00001-3532b8d3f1b4047a.parquet", rows)
    parquet(raw / "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet", rows[1:])
    out = tmp_path / "eval"
    run("data/prepare_eval.py", "mathvision", str(tmp_path / "MathVision"), f"--out={out}")
    check(ev.load_problems(str(out / "mathvision.jsonl")), [("How many dots?", "6", None, a),
                                                             ("Which bike?", "C", ["A", "B", "C", "D", "E"], b)])
    [p] = ev.load_problems(str(out / "mathvision_mini.jsonl"))
    assert p["id"] == "2" and p["level"] == 1 and (pixels(p["images"][0]) == pixels(b)).all()


def test_math500_and_its_lfs_pointer(tmp_path):
    # prm800k/math_splits/test.jsonl: JSONL; a clone without git-lfs has a 3-line pointer instead
    row = {"problem": "Compute $1+1$.", "solution": "...", "answer": "2", "subject": "Algebra", "level": 1,
           "unique_id": "test/algebra/1.json"}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    run("data/prepare_eval.py", "math500", str(tmp_path / "test.jsonl"), f"--out={tmp_path / 'eval'}")
    [p] = ev.load_problems(str(tmp_path / "eval" / "math500.jsonl"))
    assert (p["id"], p["question"], p["answer"], p["images"]) == ("test/algebra/1.json", "Compute $1+1$.", "2", [])
    (tmp_path / "ptr.jsonl").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:35dc41\nsize 446564\n")
    r = run("data/prepare_eval.py", "math500", str(tmp_path / "ptr.jsonl"), f"--out={tmp_path / 'eval2'}", ok=False)
    assert "Git LFS pointer" in r.stderr and "git lfs pull" in r.stderr and "Traceback" not in r.stderr


def test_mathverse_layout(tmp_path):
    # HF AI4Math/MathVerse: testmini.json (a JSON array, 5 versions per problem) + images_version_*/ folders
    raw = tmp_path / "MathVerse"
    (raw / "images_version_1-4").mkdir(parents=True)
    Image.new("RGB", (30, 30), (9, 99, 199)).save(raw / "images_version_1-4" / "image_1.png")
    q = "As shown, AB ∥ CD, then angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°"
    rows = [{"problem_index": "1", "problem_version": "Text Dominant", "question": q, "image": "images_version_1-4/image_1.png",
             "answer": "D", "question_type": "multi-choice", "metadata": {"subject": "Plane Geometry"}}]
    (raw / "testmini.json").write_text(json.dumps(rows))
    run("data/prepare_eval.py", "mathverse", str(raw), f"--out={tmp_path / 'eval'}")
    check(ev.load_problems(str(tmp_path / "eval" / "mathverse_text_dominant.jsonl")),
          [("As shown, AB ∥ CD, then angle CED is ()", "D", ["40°", "60°", "120°", "140°"], raw / "images_version_1-4/image_1.png")])


# -----------------------------------------------------------------------------
# SFT (sft.py): OpenR1-Math-220k shards, streamed by row group

def test_openr1_rows_verified_only_by_llama_are_skipped(tmp_path):
    rows = [{"problem": "What is 1+1?", "answer": "2", "generations": ["<think>no</think> \\boxed{3}", "<think>1+1=2</think> \\boxed{2}"],
             "correctness_math_verify": [False, True], "correctness_llama": None, "is_reasoning_complete": [True, True]},
            {"problem": "Judge only", "answer": "x", "generations": ["<think>...</think> \\boxed{x}"],
             "correctness_math_verify": [False], "correctness_llama": [True], "is_reasoning_complete": [True]},
            {"problem": "Unsolved", "answer": "y", "generations": ["<think>...</think>"],
             "correctness_math_verify": [False], "correctness_llama": [False], "is_reasoning_complete": [False]},
            {"problem": "What is 2+2?", "answer": "4", "generations": ["<think>2+2=4</think> \\boxed{4}"],
             "correctness_math_verify": [True], "correctness_llama": [True], "is_reasoning_complete": [True]}]
    shard = parquet(tmp_path / "raw" / "data" / "default" / "train-00000-of-00010.parquet", rows, row_group_size=1)
    assert pq.ParquetFile(shard).num_row_groups == 4
    out = tmp_path / "sft" / "openr1.jsonl"
    r = run("data/prepare_sft.py", shard, "--out", str(out))
    assert "2 rows skipped" in r.stdout
    manifest = json.loads((tmp_path / "sft" / "openr1.jsonl.manifest.json").read_text())
    assert manifest["dropped"] == {"llama_only": 1, "no verified complete trace": 1} and manifest["samples"] == 2
    refs = sft.scan_files([str(out)])
    got = [sft.read_messages(str(out), pos) for _, pos, _ in refs]
    assert [m[1]["content"] for m in got] == ["<think>1+1=2</think> \\boxed{2}", "<think>2+2=4</think> \\boxed{4}"]
    assert got[1][0] == {"role": "user", "content": "What is 2+2?\nPlease reason step by step, and put your final "
                                                    "answer within \\boxed{}."}


def test_load_sources_weights_and_next_mixed(tmp_path):
    for name, n in (("text", 30), ("image", 10)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": str(i), "question": "q", "answer": "1"}) + "\n"
                                                        for i in range(n)))
    spec = f"{tmp_path / 'text.jsonl'},{tmp_path / 'image.jsonl'}"
    problems, sources = rl.load_sources(spec, [3.0, 1.0])
    assert [(s[0], s[1], s[2]) for s in sources] == [("text", 0, 30), ("image", 30, 10)]
    assert [s[3] for s in sources] == [0.75, 0.25] and problems[30]["mix_source"] == "image"
    assert [s[3] for s in rl.load_sources(spec)[1]] == [0.75, 0.25]  # no weights: by size
    state = {"draws": 0, "sources": [{"epoch": 0, "cursor": 0}, {"epoch": 0, "cursor": 0}]}
    picks = [i for _ in range(200) for i in rl.next_mixed(8, state, sources, 0, 1)]
    share = sum(i >= 30 for i in picks) / len(picks)
    assert 0.2 < share < 0.3, share  # 1600 draws at p = 0.25: sd 0.011
    saved = json.loads(json.dumps(state))
    a = rl.next_mixed(8, state, sources, 0, 1)
    assert rl.next_mixed(8, saved, sources, 0, 1) == a  # the state is all a resume needs
    with pytest.raises(SystemExit, match="2 data_path files"):
        rl.load_sources(spec, [1.0])


def test_source_sums_by_hand():
    c = lambda text: types.SimpleNamespace(text=text)  # noqa: E731
    groups = [{"problem": {"mix_source": "text"}, "rewards": [1.0, 0.0, 1.0], "correct": [1.0, 0.0, 1.0],
               "completions": [c("Let me verify: 2 + 3 = 5."), c("5"), c("Wait, that is wrong. Let me verify it.")]},
              {"problem": {"mix_source": "image"}, "rewards": [0.1, 0.1, 0.0], "correct": [0.0, 0.0, 0.0],
               "completions": [c("Let me look at the picture again."), c("3"), c("4")]},
              {"problem": {"mix_source": "text"}, "rewards": [0.0, 0.0, 1.0], "correct": [0.0, 0.0, 1.0],
               "completions": [c("1"), c("2"), c("3")]}]
    got = rl.source_sums(groups, ["text", "image", "unused"],
                         [ev.detect_behaviours(c.text) for g in groups for c in g["completions"]])
    beh = {f"behaviour/{b}/{name}": 0 for b in ev.BEHAVIOURS for name in ("text", "image", "unused")}
    beh.update({"behaviour/verification/text": 2, "behaviour/backtracking/text": 1,
                "behaviour/visual_reflection/image": 1})  # responses showing each, counted by hand
    assert got == {"n/text": 6, "reward/text": 3.0, "correct/text": 3, "n/image": 3, "reward/image": pytest.approx(0.2),
                   "correct/image": 0, "n/unused": 0, "reward/unused": 0, "correct/unused": 0} | beh


@pytest.mark.slow
def test_mixed_text_and_image_rl_run_logs_per_source_reward(tiny_model_dir, tmp_path):
    # README's commands: ORZ text problems + GeoQA image problems, mixed half and half
    raw = tmp_path / "raw"
    raw.mkdir()
    run("data/prepare_rl.py", "orz", *orz(raw)[0], str(tmp_path / "rl" / "orz.jsonl"))
    run("data/prepare_rl.py", "geoqa", *geoqa(raw)[0], str(tmp_path / "rl" / "geoqa.jsonl"))
    out = tmp_path / "run"
    run("rl.py", f"--init_from={tiny_model_dir}", f"--out_dir={out}",
        f"--data_path={tmp_path / 'rl' / 'orz.jsonl'},{tmp_path / 'rl' / 'geoqa.jsonl'}", "--data_weights=[0.5, 0.5]",
        "--engine=torch", "--device=cpu", "--dtype=float32", "--eval_path=", "--template={question}",
        "--length_stages=[(0, 8)]", "--prompts_per_step=8", "--group_size=2", "--num_steps=3", "--save_every=0",
        "--reward_workers=1", "--export_every_save=False", "--gradient_checkpointing=False", "--dynamic_sampling=False",
        "--warmup_steps=1")
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 3
    for r in m:
        n = r["source/orz/responses"] + r["source/geoqa/responses"]
        assert n == 8 * 2  # every sampled response belongs to one source
        for s in ("orz", "geoqa"):
            if r[f"source/{s}/responses"]:
                assert 0.0 <= r[f"source/{s}/reward_mean"] <= 1.0 and f"source/{s}/accuracy" in r
                assert 0.0 <= r[f"source/{s}/behaviour/verification"] <= 1.0
    assert sum(r["source/geoqa/responses"] for r in m) > 0 and sum(r["source/orz/responses"] for r in m) > 0
