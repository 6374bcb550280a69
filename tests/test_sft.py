# sft.py: packing, loss normalisation, data errors, checkpoints, and end-to-end runs on the tiny model
# (one process, and torchrun with 2 gloo processes). Synthetic conversations are written per test.
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import sft
from model import QwenVL, load_tokenizer, render_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_data(folder, n=16, images_every=4, seed=0, name="data.jsonl"):
    """n synthetic reasoning conversations of varied length; every `images_every`-th has an image."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(os.path.join(folder, "img", "red.png"))
    Image.new("RGB", (30, 70), (20, 30, 200)).save(os.path.join(folder, "img", "blue.png"))
    rng = random.Random(seed)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            think = " ".join(f"Let me check {a} + {b}, wait." for _ in range(rng.randint(1, 6)))
            user = f"What is {a} + {b}?"
            if images_every and i % images_every == 0:
                user = [{"type": "image", "image": f"img/{rng.choice(['red', 'blue'])}.png"}, {"type": "text", "text": user}]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"<think> {think} </think> The answer is \\boxed{{{a + b}}}."}]}) + "\n")
    return path


def samples_of(path, tokenizer):
    rows = [json.loads(line) for line in open(path)]
    root = os.path.dirname(path)
    return [render_chat(r["messages"], tokenizer, image_root=root, max_pixels=28 * 28 * 64) for r in rows]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(args, nproc=1, timeout=240, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    r = subprocess.run(launch + ["sft.py"] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def base_args(tiny_model_dir, data, out, **kw):
    a = dict(init_from=tiny_model_dir, data_path=data, out_dir=out, max_seq_len=192, batch_size=4, epochs=1,
             learning_rate=1e-3, save_every=0, dtype="float32", device="cpu")
    a.update(kw)
    return [f"--{k}={v}" for k, v in a.items()]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


# ---- packing and the loss


def test_pack_best_fit_by_hand():
    # 6 -> row0 (room 4); 5 -> row1 (room 5); 4 -> row0 (best fit: room 4 < 5, now full); 3 -> row1 (room 2);
    # 3 -> row2 (nothing has room 3); 2 -> row1 (room 2 is the tightest fit)
    rows = sft.pack([(0, 6), (1, 5), (2, 4), (3, 3), (4, 3), (5, 2)], 10)
    assert rows == [[0, 2], [1, 3, 5], [4]]


def test_epoch_rows_cover_each_kept_sample_once():
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(200)] + [0, 0]  # two dropped samples
    rows = sft.epoch_rows(lengths, 64, seed=3, epoch=0)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert rows == sft.epoch_rows(lengths, 64, seed=3, epoch=0)  # deterministic (resume relies on it)
    assert rows != sft.epoch_rows(lengths, 64, seed=3, epoch=1)  # reshuffled per epoch


def test_collate_targets_by_hand():
    s1 = dict(input_ids=torch.tensor([10, 11, 12, 13]), loss_mask=torch.tensor([0, 0, 1, 1]), pixel_values=None, image_grid_thw=None)
    s2 = dict(input_ids=torch.tensor([20, 21, 22]), loss_mask=torch.tensor([0, 1, 1]), pixel_values=None, image_grid_thw=None)
    b = sft.collate([[s1, s2], [s2]], pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22], [20, 21, 22, 0, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, -1, -1, -1, -1]]
    # the target at t is token t+1 when t+1 is an assistant token of the same sample
    assert b["targets"].tolist() == [[-100, 12, 13, -100, 21, 22, -100], [21, 22, -100, -100, -100, -100, -100]]


def reference_loss(model, samples):
    """Token-mean cross-entropy of each sample on its own (no packing), from the logits."""
    total, count = 0.0, 0
    for s in samples:
        logits = model(s["input_ids"][None], s["pixel_values"], s["image_grid_thw"])[0]  # (T, V)
        keep = s["loss_mask"][1:].bool()
        total = total + F.cross_entropy(logits[:-1][keep], s["input_ids"][1:][keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def test_packed_loss_equals_unpacked(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    model = QwenVL.from_pretrained(tiny_model_dir)
    samples = samples_of(write_data(str(tmp_path), n=5, images_every=2), tok)
    assert sum(s["pixel_values"] is not None for s in samples) == 3
    n = sum(int(s["loss_mask"][1:].sum()) for s in samples)
    packed = sft.microbatch_loss(model, sft.collate([samples[:3], samples[3:]], tok.pad_token_id), n, "cpu")
    torch.testing.assert_close(packed, reference_loss(model, samples), rtol=1e-5, atol=1e-5)


def test_loss_and_grads_do_not_depend_on_micro_batch_split(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    model = QwenVL.from_pretrained(tiny_model_dir)
    samples = samples_of(write_data(str(tmp_path), n=8, images_every=3), tok)
    rows = [samples[0:3], samples[3:4], samples[4:6], samples[6:8]]  # 4 packed rows of uneven length
    n = sum(int(s["loss_mask"][1:].sum()) for s in samples)  # the global denominator

    def grads_for(split):
        model.zero_grad()
        loss = 0.0
        for mb in split:
            part = sft.microbatch_loss(model, sft.collate(mb, tok.pad_token_id), n, "cpu")
            part.backward()
            loss += part.item()
        return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = reference_loss(model, samples)
    model.zero_grad()
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for split in ([rows], [rows[:1], rows[1:2], rows[2:3], rows[3:]], [rows[:3], rows[3:]]):
        loss, grads = grads_for(split)
        assert abs(loss - ref.item()) < 1e-5
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_dummy_image_changes_nothing(tiny_model_dir, tmp_path):
    # the FSDP dummy vision segment: same loss, and the vision tower gets zero (not missing) gradients
    tok = load_tokenizer(tiny_model_dir)
    model = QwenVL.from_pretrained(tiny_model_dir)
    samples = samples_of(write_data(str(tmp_path), n=3, images_every=0), tok)
    batch = sft.collate([samples[:2], samples[2:]], tok.pad_token_id)
    plain = sft.microbatch_loss(model, batch, 50, "cpu")
    loss = sft.microbatch_loss(model, sft.add_dummy_image(batch, model.config, tok.pad_token_id), 50, "cpu")
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    vis = [p.grad for p in model.visual.parameters()]
    assert all(g is not None and g.abs().max() == 0 for g in vis)


def test_lr_schedule(monkeypatch):
    monkeypatch.setattr(sft, "learning_rate", 1.0)
    monkeypatch.setattr(sft, "warmup_steps", 4)
    monkeypatch.setattr(sft, "min_lr_ratio", 0.1)
    monkeypatch.setattr(sft, "lr_schedule", "cosine")
    assert [sft.lr_at(s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sft.lr_at(4, 14) == 1.0 and abs(sft.lr_at(9, 14) - 0.55) < 1e-12 and abs(sft.lr_at(14, 14) - 0.1) < 1e-12
    monkeypatch.setattr(sft, "lr_schedule", "constant")
    assert sft.lr_at(10, 14) == 1.0


# ---- bad input


def index(path, tiny_model_dir, max_len=4096, mode="drop"):
    tok = load_tokenizer(tiny_model_dir)
    return sft.build_index([path], tok, (56 * 56, 28 * 28 * 64), max_len, mode, 0, 1)


def test_malformed_json_line_names_file_and_line(tiny_model_dir, tmp_path):
    path = write_data(str(tmp_path), n=4)
    lines = open(path).read().splitlines()
    lines[2] = lines[2][:-5]  # line 3: truncated JSON
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=rf"{path}:3: JSONDecodeError"):
        index(path, tiny_model_dir)


def test_missing_image_names_file_line_and_image(tiny_model_dir, tmp_path):
    path = write_data(str(tmp_path), n=6, images_every=5)  # images on lines 1 and 6
    os.remove(os.path.join(tmp_path, "img", "red.png"))
    os.remove(os.path.join(tmp_path, "img", "blue.png"))
    with pytest.raises(SystemExit, match=rf"{path}:1: .*image not found: .*img/(red|blue).png"):
        index(path, tiny_model_dir)


def test_bad_data_stops_the_run_before_training(tiny_model_dir, tmp_path):
    path = write_data(str(tmp_path), n=8)
    with open(path, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}]}\n')  # line 9: nothing to train on
    out = str(tmp_path / "out")
    r = run_sft(base_args(tiny_model_dir, path, out), check=False)
    assert r.returncode != 0 and f"{path}:9" in r.stderr and "no assistant message" in r.stderr
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_overlong_samples_dropped_or_truncated_and_counted(tiny_model_dir, tmp_path):
    path = write_data(str(tmp_path), n=8, images_every=4)
    _, full_len, _, _, _ = index(path, tiny_model_dir)
    cut = sorted(full_len)[4]  # about half the samples are longer
    _, lengths, targets, full, _ = index(path, tiny_model_dir, cut, "drop")
    assert full == full_len and [n for n in lengths] == [n if n <= cut else 0 for n in full_len]
    _, lengths, targets, _, has_img = index(path, tiny_model_dir, cut, "truncate")
    for n, f, img, t in zip(lengths, full_len, has_img, targets):
        if f <= cut:
            assert n == f
        else:  # text is cut to max_seq_len; image samples are dropped (a cut could split an image)
            assert n == (0 if img or t == 0 else cut)
    assert any(n == cut < f for n, f in zip(lengths, full_len))


# ---- checkpoints


def test_crash_during_save_keeps_latest_readable(tiny_model_dir, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    model = QwenVL.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # sft.py gives every trained tensor a gradient, so each has AdamW state
        p.grad = torch.ones_like(p)
    opt.step()
    ckpt = str(tmp_path / "ckpt")
    os.makedirs(ckpt)
    good = sft.save_checkpoint(ckpt, model, opt, dict(step=1, epoch=0, row=4))
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(dcp, "save", crash)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        sft.save_checkpoint(ckpt, model, opt, dict(step=2, epoch=0, row=8))
    assert os.path.isdir(os.path.join(ckpt, "step_000002.tmp"))  # the half-written one
    assert sft.latest_checkpoint(ckpt) == good
    fresh = QwenVL.from_pretrained(tiny_model_dir)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    meta, _ = sft.load_checkpoint(good, fresh, opt2)
    assert (meta["step"], meta["row"]) == (1, 4)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_single_process_run_logs_and_exports_for_transformers(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    data = write_data(str(tmp_path), n=12)
    out = str(tmp_path / "out")
    r = run_sft(base_args(tiny_model_dir, data, out, save_every=2, keep_last=1, epochs=3))
    assert "real tokens" in r.stdout and "dropped" in r.stdout
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, len(m) + 1)) and len(m) >= 2
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_gb"} <= m[0].keys()
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "ckpt")) if d.startswith("step_"))
    # keep_last=1, plus the newest checkpoint a healthy step followed (the final one has no step after it)
    assert ckpts[-1] == f"step_{len(m):06d}" and len(ckpts) == 2
    assert os.path.exists(os.path.join(out, "ckpt", ckpts[0], "GOOD"))
    hf_dir = os.path.join(out, "hf")
    ours = QwenVL.from_pretrained(hf_dir).eval()
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    tok = load_tokenizer(hf_dir)
    s = samples_of(data, tok)[0]
    with torch.no_grad():
        a = ours(s["input_ids"][None], s["pixel_values"], s["image_grid_thw"])
        b = theirs(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], image_grid_thw=s["image_grid_thw"],
                   mm_token_type_ids=(s["input_ids"][None] == ours.config.image_token_id).int()).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the weights moved away from the start
    assert any(not torch.equal(v, weights(tiny_model_dir)[k]) for k, v in weights(hf_dir).items())


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, tmp_path):
    data = write_data(str(tmp_path), n=16, images_every=0)
    out = str(tmp_path / "out")
    # an absurd LR blows the weights up after step 1; the run must stop at the first non-finite loss
    r = run_sft(base_args(tiny_model_dir, data, out, learning_rate=1e30, grad_clip=0.0, save_every=1,
                          export_every_save=False), check=False)
    assert r.returncode != 0 and "stopping without updating" in r.stderr, r.stderr[-2000:]
    bad_step = int(r.stderr.split("step ")[-1].split(":")[0]) if "step " in r.stderr else None
    assert bad_step is not None and bad_step >= 2
    # step_{bad_step - 1} holds the weights that gave the bad loss: the last good one is the checkpoint before
    latest = sft.latest_checkpoint(os.path.join(out, "ckpt"))
    assert latest.endswith(f"step_{bad_step - 2:06d}") and f"Last good checkpoint: {latest}" in r.stderr
    model = QwenVL.from_pretrained(tiny_model_dir)
    sft.freeze_params(model, ["visual"])
    meta, _ = sft.load_checkpoint(latest, model, sft.make_optimizer([p for p in model.parameters() if p.requires_grad]))
    assert meta["step"] == bad_step - 2


# ---- distributed and resume (torchrun, 2 gloo processes)


@pytest.mark.slow
def test_two_ranks_match_one_rank(tiny_model_dir, tmp_path):
    # images in the data and everything trained: exercises the dummy vision segment under FSDP
    data = write_data(str(tmp_path), n=16, images_every=3)
    kw = dict(freeze="", learning_rate=1e-4, max_steps=2, micro_batch_size=1)
    run_sft(base_args(tiny_model_dir, data, str(tmp_path / "one"), **kw))
    run_sft(base_args(tiny_model_dir, data, str(tmp_path / "two"), **kw), nproc=2)
    m1, m2 = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["tokens"] == b["tokens"]
    w1, w2 = weights(str(tmp_path / "one" / "hf")), weights(str(tmp_path / "two" / "hf"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_after_checkpoint_then_resume_matches(tiny_model_dir, tmp_path, nproc):
    data = write_data(str(tmp_path), n=40, images_every=4)
    kw = dict(batch_size=2, max_steps=8, save_every=3, export_every_save=False)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run_sft(base_args(tiny_model_dir, data, ref, **kw), nproc=nproc)
    # start the same run, SIGKILL the whole process group as soon as a checkpoint is complete
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    p = subprocess.Popen(launch + ["sft.py"] + base_args(tiny_model_dir, data, out, **kw), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(out, "ckpt", "latest")
    deadline = time.time() + 180
    while not os.path.exists(latest) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "hf")), "the run finished before it could be killed"
    killed_at = len(metrics(out))
    run_sft(base_args(tiny_model_dir, data, out, resume=True, **kw), nproc=nproc)
    a, b = metrics(ref), metrics(out)
    assert [x["step"] for x in b] == list(range(1, 9)) and killed_at < 8
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and x["tokens"] == y["tokens"], (x, y)
    wa, wb = weights(os.path.join(ref, "hf")), weights(os.path.join(out, "hf"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_prepare_sft_converts_openr1_and_sharegpt_rows(tmp_path):
    raw = tmp_path / "raw.jsonl"
    rows = [
        {"problem": "What is 1+1?", "generations": ["<think>wrong</think> \\boxed{3}", "<think>1+1=2</think> \\boxed{2}"],
         "correctness_math_verify": [False, True], "is_reasoning_complete": [True, True]},
        {"problem": "Unsolved", "generations": ["<think>...</think>"], "correctness_math_verify": [False]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<think>greet</think> Hello"}]},
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft.jsonl"
    r = subprocess.run([sys.executable, "data/prepare_sft.py", str(raw), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert got[0][1] == {"role": "assistant", "content": "<think>1+1=2</think> \\boxed{2}"}
    assert got[0][0]["content"].startswith("What is 1+1?\nPlease reason step by step")
    assert got[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think> Hello"}]
    assert len(got) == 2 and "1 rows skipped" in r.stdout
