# Faults made for real, and what a user sees: a corrupt or huge image, a torn JSONL line, a truncated or
# overwritten checkpoint file, a second process on the same out_dir, a kill -9, a blow-up without NaN, a resume
# with other data or settings, bad settings. Each test checks the exit code, the message (file, line, step) and
# that nothing was lost. The stage runs use the tiny model and a few steps.
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import eval as ev
import model as M
import rl
from test_rl import TOY, toy  # noqa: F401  (the toy RL task fixture: a warmed-up tiny model, "answer 3")
from test_sft import base_args, metrics, run_sft, write_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def steps_in(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def run(args, timeout=300):
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def no_traceback(r):
    return "Traceback" not in r.stderr and "Traceback" not in r.stdout


def corrupt_png(path):
    Image.new("RGB", (64, 48), (10, 200, 10)).save(path)
    data = bytearray(open(path, "rb").read())
    data[60:80] = b"\x00" * 20  # inside the IDAT chunk: the CRC no longer matches
    open(path, "wb").write(bytes(data))


# ---- 1. the repository stands alone


def test_no_file_reads_or_cites_the_development_machines_shared_folder():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    words = ["../" + "shared", "shared" + "/notes", "shared" + "/data"]  # split, so this file does not match itself
    hits = []
    for name in files:
        if name.endswith((".png", ".jpg")):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if any(w in line for w in words):
                    hits.append(f"{name}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ---- 2 and 11. images: checked when the data is loaded, huge ones resized once


def test_check_images_skips_bad_problems_and_resizes_huge_ones_once(tmp_path):
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "ok.png")
    corrupt_png(tmp_path / "crc.png")
    Image.new("RGB", (60, 60)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:70])  # truncated
    Image.new("RGB", (2000, 20)).save(tmp_path / "thin.png")  # aspect ratio 100 ok; 1:300 is not
    Image.new("RGB", (3000, 10)).save(tmp_path / "line.png")
    big = torch.randint(0, 255, (1500, 2100, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(big.numpy()).save(tmp_path / "big.png")
    rows = [{"id": f"p{i}", "question": "q", "answer": "1", "images": [im]}
            for i, im in enumerate(["ok.png", "crc.png", "cut.png", "thin.png", "line.png", "big.png", "missing.png"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    kept, bad = rl.check_images(rl.load_data(str(tmp_path / "d.jsonl")), pixels, str(tmp_path / "cache"), 0, 1)
    assert [p["id"] for p in kept] == ["p0", "p3", "p5"]
    path = str(tmp_path / "d.jsonl")
    assert len(bad) == 4
    for line, pid, why in [(2, "p1", "crc.png"), (3, "p2", "cut.png"), (5, "p4", "aspect ratio"), (7, "p6", "not found")]:
        assert any(b.startswith(f"{path}:{line} (problem id {pid}): ") and why in b for b in bad), (line, bad)
    # the huge image now points at a resized copy in the cache; what preprocess_image makes of it is bit-identical
    # to what it makes of the original (the reference: preprocess_image on the original file)
    small = kept[2]["images"][0]
    # by hand: beta = sqrt(2100 * 1500 / 50176) = 7.92; 1500 / 7.92 / 28 = 6.8 -> 6 * 28; 2100 / 7.92 / 28 = 9.5 -> 9 * 28
    assert small.startswith(str(tmp_path / "cache")) and Image.open(small).size == (252, 168)
    a, ga = M.preprocess_image(str(tmp_path / "big.png"), **pixels)
    b, gb = M.preprocess_image(small, **pixels)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert kept[0]["images"][0] == str(tmp_path / "ok.png")  # small images stay as they are


@pytest.mark.slow
def test_rl_run_skips_a_problem_with_a_corrupt_image(toy, tmp_path):  # noqa: F811
    data = tmp_path / "toy.jsonl"
    lines = (toy / "toy.jsonl").read_text().splitlines()
    corrupt_png(tmp_path / "bad.png")
    Image.new("RGB", (56, 84), (200, 30, 30)).save(tmp_path / "red.png")
    lines[6] = json.dumps({"id": "bad6", "question": "Guess the secret digit.", "answer": "3", "images": ["bad.png"]})
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    r = run(["rl.py", f"--init_from={toy / 'warm'}", f"--data_path={data}", f"--out_dir={out}", *TOY,
             "--num_steps=2", "--save_every=0", "--prompts_per_step=32", "--group_size=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped 1 problem(s)" in r.stderr and f"{data}:7 (problem id bad6)" in r.stderr and "bad.png" in r.stderr
    assert "data: 63 training problems" in r.stdout
    assert steps_in(out) == [0, 1]


def test_eval_stops_before_sampling_on_a_corrupt_benchmark_image(tiny_model_dir, tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "ok.png")
    corrupt_png(tmp_path / "data" / "bad.png")
    rows = [{"id": "a", "question": "1+1?", "answer": "2", "images": ["ok.png"]},
            {"id": "b", "question": "2+2?", "answer": "4", "images": ["bad.png"]}]
    (tmp_path / "data" / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "eval"
    r = run(["eval.py", f"--model={tiny_model_dir}", "--engine=torch", "--device=cpu", "--dtype=float32",
             f"--data_dir={tmp_path / 'data'}", "--benchmarks=bench", f"--out_dir={out}", "--n=1", "--max_tokens=4"])
    assert r.returncode == 1 and no_traceback(r), r.stderr[-2000:]
    assert f"{tmp_path / 'data' / 'bench.jsonl'}:2: problem b: image " in r.stderr and "bad.png" in r.stderr
    assert not (out / "bench.jsonl").exists()  # nothing was sampled


# ---- 3. eval.py resumes only a run with the same settings, model and data


def eval_args(model_dir, data_dir, out, *extra):
    return ["eval.py", f"--model={model_dir}", "--engine=torch", "--device=cpu", "--dtype=float32", f"--data_dir={data_dir}",
            "--benchmarks=bench", f"--out_dir={out}", "--n=2", "--max_tokens=4", "--pass_k=1", *extra]


@pytest.mark.slow
def test_eval_resume_refuses_other_seed_or_data_and_keeps_its_config(tiny_model_dir, tmp_path):
    for d, answer in (("data", "2"), ("other", "3")):  # same benchmark name and ids, other gold answers
        (tmp_path / d).mkdir()
        (tmp_path / d / "bench.jsonl").write_text(json.dumps({"id": "a", "question": "1+1?", "answer": answer}) + "\n")
    out = tmp_path / "eval"
    r = run(eval_args(tiny_model_dir, tmp_path / "data", out))
    assert r.returncode == 0, r.stderr[-2000:]
    config, samples = (out / "config.json").read_text(), (out / "bench.jsonl").read_text()
    r = run(eval_args(tiny_model_dir, tmp_path / "data", out, "--seed=7"))
    assert r.returncode == 1 and "seed 0 -> 7" in r.stderr and no_traceback(r), r.stderr[-2000:]
    r = run(eval_args(tiny_model_dir, tmp_path / "other", out))
    assert r.returncode == 1 and "the bench data (JSONL or images) differ" in r.stderr, r.stderr[-2000:]
    assert (out / "config.json").read_text() == config and (out / "bench.jsonl").read_text() == samples
    # the same settings from another folder holding the same data: resumes, nothing is sampled again
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "bench.jsonl").write_bytes((tmp_path / "data" / "bench.jsonl").read_bytes())
    r = run(eval_args(tiny_model_dir, tmp_path / "copy", out))
    assert r.returncode == 0 and (out / "bench.jsonl").read_text() == samples, r.stderr[-2000:]


# ---- 4. one run per out_dir


HOLD = """import sys, time; sys.path.insert(0, {root!r}); import model
model.lock_out_dir({out!r}); print("locked", flush=True); time.sleep(600)"""


def test_second_process_on_an_out_dir_is_refused_and_a_killed_ones_lock_is_taken_over(tiny_model_dir, tmp_path):
    data, out = write_data(str(tmp_path), n=8), str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=1, resume=True), check=False)
    assert r.returncode == 1 and f"in use by another run (pid {holder.pid} on " in r.stderr and no_traceback(r)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    holder.send_signal(signal.SIGKILL)  # a kill -9 leaves LOCK with its pid in it
    holder.wait()
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=1))
    assert f"taking over the lock of a run that is no longer running (pid {holder.pid} on" in r.stdout
    assert steps_in(out) == [1] and open(os.path.join(out, "LOCK")).read() == ""  # released at exit


@pytest.mark.slow
def test_resume_started_while_the_run_goes_is_refused_and_the_run_is_intact(tiny_model_dir, tmp_path):
    data, out = write_data(str(tmp_path), n=40), str(tmp_path / "out")
    args = base_args(tiny_model_dir, data, out, batch_size=2, max_steps=150, save_every=50, export_every_save=False)
    first = subprocess.Popen([sys.executable, "sft.py"] + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "ckpt", "latest")) and time.time() < deadline:
        time.sleep(0.05)
    second = run_sft(args + ["--resume=True"], check=False)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1 and f"(pid {first.pid} on " in second.stderr
    assert steps_in(out) == list(range(1, 151))


# ---- 5. a torn line in a log


def test_trim_jsonl_drops_a_torn_last_line_and_refuses_a_bad_middle_one(tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    good = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 31))
    open(path, "w").write(good + '{"step": 31, "lo')
    kept = M.trim_jsonl(path, 21)
    assert [r["step"] for r in kept] == list(range(1, 21))
    assert open(path).read() == good[:good.index('{"step": 21')]
    assert f"{path}:31: dropping a torn last line" in capsys.readouterr().out
    lines = good.splitlines(keepends=True)
    lines[9] = '{"step": 10, "loss"\n'  # line 10 of 30
    open(path, "w").write("".join(lines))
    with pytest.raises(SystemExit, match=rf"{path}:10: not a JSON object"):
        M.trim_jsonl(path, 21)
    assert open(path).read() == "".join(lines)  # untouched: nothing lost


def test_sft_resume_after_a_torn_metrics_line(tiny_model_dir, tmp_path):
    data, out = write_data(str(tmp_path), n=24), str(tmp_path / "out")
    kw = dict(batch_size=2, save_every=2, export_every_save=False)
    run_sft(base_args(tiny_model_dir, data, out, max_steps=3, **kw))  # checkpoints at steps 0, 2 and 3
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')  # what a kill mid-write leaves
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=5, resume=True, **kw))
    assert "dropping a torn last line" in r.stdout and steps_in(out) == [1, 2, 3, 4, 5]


# ---- 6 and 8. a blow-up without NaN stops the run naming the step and the last good checkpoint


def test_sft_blow_up_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    data, out = write_data(str(tmp_path), n=24, images_every=0), str(tmp_path / "out")
    kw = dict(batch_size=2, export_every_save=False, keep_last=1, learning_rate=1e-3)
    run_sft(base_args(tiny_model_dir, data, out, max_steps=4, save_every=2, **kw))
    # LR 1e6 from step 5 on: the tiny model collapses (grad norm 0, a flat loss, no NaN: today it exits 0)
    kw.update(learning_rate=1e6, lr_schedule="constant")
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=12, save_every=1, resume=True, **kw), check=False)
    assert r.returncode == 1 and no_traceback(r), r.stderr[-2000:]
    ckpt = os.path.join(out, "ckpt")
    assert "step 6: grad norm 0, less than 1/10 of its median" in r.stderr
    assert f"Last good checkpoint: {ckpt}/step_000004" in r.stderr
    assert M.latest_checkpoint(ckpt) == os.path.join(ckpt, "step_000004")
    assert M.checkpoint_problem(os.path.join(ckpt, "step_000004")) is None  # keep_last=1 did not rotate it away
    assert steps_in(out) == [1, 2, 3, 4, 5]  # step 6 was not taken


def test_sft_that_fits_a_small_set_is_not_stopped_as_a_collapse(tiny_model_dir, tmp_path):
    # 4 short conversations, 40 epochs: the model learns them, the loss and the grad norm both fall 10x and more
    data, out = write_data(str(tmp_path), n=4, images_every=0), str(tmp_path / "out")
    run_sft(base_args(tiny_model_dir, data, out, batch_size=1, epochs=40, learning_rate=3e-3, lr_schedule="constant"))
    m = [r for r in metrics(out) if "grad_norm" in r]
    assert m[-1]["epoch"] == 39 and [r["step"] for r in m] == list(range(1, len(m) + 1))  # every step ran
    assert m[-1]["loss"] < m[0]["loss"] / 10 and min(r["grad_norm"] for r in m[-10:]) < sorted(
        r["grad_norm"] for r in m[:20])[10] / 10  # a fall the collapse check alone would have stopped


@pytest.mark.slow
def test_rl_blow_up_stops_and_names_the_last_good_checkpoint(toy, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    base = ["rl.py", f"--init_from={toy / 'warm'}", f"--data_path={toy / 'toy.jsonl'}", f"--out_dir={out}", *TOY]
    r = run(base + ["--num_steps=4", "--save_every=2", "--keep_last=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    # LR 1e15 from step 4 on: today the policy collapses to reward 0 with nothing left to train, and exits 0
    r = run(base + ["--num_steps=8", "--save_every=1", "--keep_last=1", "--learning_rate=1e15", "--resume=True"])
    assert r.returncode == 1 and no_traceback(r), r.stderr[-2000:]
    assert "learning_rate 0.002 -> 1000000000000000.0" in r.stderr  # the resume warned about the change (item 9)
    assert "step 5: sampled-token NLL" in r.stderr and f"Last good checkpoint: {out}/ckpt/step_000004" in r.stderr
    assert M.latest_checkpoint(str(out / "ckpt")) == str(out / "ckpt" / "step_000004")
    assert steps_in(out) == [0, 1, 2, 3, 4]
    # item 9: other problems (same count, other answers) would put each rank's seeded position elsewhere
    other = tmp_path / "other.jsonl"
    other.write_text((toy / "toy.jsonl").read_text().replace('"answer": "3"', '"answer": "4"'))
    Image.new("RGB", (56, 84), (200, 30, 30)).save(tmp_path / "red.png")
    r = run(base + ["--num_steps=8", f"--data_path={other}", "--resume=True"])
    assert r.returncode == 1 and no_traceback(r), r.stderr[-2000:]
    assert f"cannot resume from {out}/ckpt/step_000004: the problems differ" in r.stderr


# ---- 7. a corrupt checkpoint: found by its manifest, the newest intact one is used


def test_checkpoint_problem_finds_truncated_and_same_size_overwritten_files(tiny_model_dir, tmp_path):
    net = M.QwenVL.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(net.parameters())
    ckpt = str(tmp_path / "ckpt")
    os.makedirs(ckpt)
    path = M.save_checkpoint(ckpt, net, opt, dict(step=1))
    assert M.checkpoint_problem(path) is None
    shard = os.path.join(path, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    open(shard, "wb").write(bytes(data))
    assert "__0_0.distcp does not match its sha256" in M.checkpoint_problem(path)
    open(shard, "wb").write(bytes(data[:1000]))
    assert f"__0_0.distcp has 1000 bytes, the manifest says {len(data)}" in M.checkpoint_problem(path)


@pytest.mark.slow
def test_sft_resume_falls_back_from_a_truncated_checkpoint(tiny_model_dir, tmp_path):
    data = write_data(str(tmp_path), n=24)
    kw = dict(batch_size=2, save_every=2, export_every_save=False, keep_last=2, lr_schedule="constant")  # LR not tied to max_steps
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_sft(base_args(tiny_model_dir, data, ref, max_steps=6, **kw))
    run_sft(base_args(tiny_model_dir, data, out, max_steps=4, **kw))  # step_000002 and step_000004
    shard = os.path.join(out, "ckpt", "step_000004", "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=6, resume=True, **kw))
    assert f"step_000004 is not usable: __0_0.distcp has {size // 2} bytes" in r.stderr
    assert f"resuming from the newest intact checkpoint, {out}/ckpt/step_000002" in r.stderr
    # nothing lost: steps 3-6 were redone from step 2 and match the uninterrupted run
    with open(os.path.join(ref, "metrics.jsonl")) as f, open(os.path.join(out, "metrics.jsonl")) as g:
        a, b = [json.loads(x) for x in f], [json.loads(x) for x in g]
    assert [x["step"] for x in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x, y)


# ---- 9. resuming with other data or settings


@pytest.mark.slow
def test_sft_resume_refuses_other_data_and_warns_about_other_settings(tiny_model_dir, tmp_path):
    data, out = write_data(str(tmp_path), n=24), str(tmp_path / "out")
    other = write_data(str(tmp_path), n=24, seed=1, name="other.jsonl")
    kw = dict(batch_size=2, save_every=2, export_every_save=False)
    run_sft(base_args(tiny_model_dir, data, out, max_steps=2, **kw))
    r = run_sft(base_args(tiny_model_dir, other, out, max_steps=4, resume=True, **kw), check=False)
    assert r.returncode == 1 and no_traceback(r)
    assert f"cannot resume from {out}/ckpt/step_000002: the data packs differently" in r.stderr
    assert f"data_path '{data}' -> '{other}'" in r.stderr and steps_in(out) == [1, 2]
    r = run_sft(base_args(tiny_model_dir, data, out, max_steps=4, resume=True, **dict(kw, learning_rate=5e-4)))
    assert "resuming with changed settings: " in r.stderr and "learning_rate 0.001 -> 0.0005" in r.stderr
    assert steps_in(out) == [1, 2, 3, 4]


# ---- 10. messages instead of tracebacks


@pytest.mark.parametrize("case", ["empty", "fp16", "batch0", "no_init"])
def test_sft_bad_settings_give_one_line(tiny_model_dir, tmp_path, case):
    data, out = write_data(str(tmp_path), n=8), str(tmp_path / "out")
    kw, want = {
        "empty": (dict(data_path=str(tmp_path / "empty.jsonl")), "no training samples in"),
        "fp16": (dict(dtype="fp16"), "'bfloat16', got 'fp16'"),
        "batch0": (dict(batch_size=0), "batch_size 0 must be a positive multiple"),
        "no_init": (dict(init_from=str(tmp_path / "nope")), "is not a model directory (no config.json)"),
    }[case]
    open(tmp_path / "empty.jsonl", "w").close()
    r = run_sft(base_args(tiny_model_dir, data, out, **kw), check=False)
    assert r.returncode == 1 and want in r.stderr and no_traceback(r), r.stderr[-2000:]


def test_help_of_model_and_eval():
    r = run(["model.py", "--help"])
    assert r.returncode == 0 and "--hidden_size = 64" in r.stdout and "--vocab_size = 1024" in r.stdout
    r = run(["eval.py", "--help"])
    assert r.returncode == 0 and "python eval.py table" in r.stdout and "python eval.py plot" in r.stdout
