# rl.py: the advantage and the clipped loss against hand-computed values, the clip boundaries, invariance
# to how the batch is split into micro-batches and ranks, packing against unpacked forwards, the data
# stream; then (slow) a tiny model whose reward rises on a toy task, and a killed-and-resumed run that
# logs the same metrics as an uninterrupted one.
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    s = math.sqrt(1 / 3)  # unbiased std of {1, 0, 0, 1}: sqrt(4 * 0.25 / 3)
    grpo = rl.group_advantages(r, scale_by_std=True, eps=0.0 + 1e-12)
    assert torch.allclose(grpo[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert torch.equal(grpo[1], torch.zeros(4))  # all-equal rewards: exactly zero, no 0/0
    dr = rl.group_advantages(r, scale_by_std=False)
    assert torch.allclose(dr[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert torch.equal(dr[1], torch.zeros(4))


def test_loss_by_hand():
    # two responses, 3 target slots each, one masked; the token-level mean over 5 tokens
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.2]])
    old = torch.tensor([[-1.1, -1.5, -0.5], [-0.3, -1.0, -0.2]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    eps_low, eps_high = 0.2, 0.28
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                r = math.exp(logp[b, t] - old[b, t])
                rc = min(max(r, 1 - eps_low), 1 + eps_high)
                expected += -min(r * adv[b].item(), rc * adv[b].item())
    loss, stats = rl.grpo_loss(logp, old, adv, mask, eps_low, eps_high, denom=5)
    assert loss.item() == pytest.approx(expected / 5, rel=1e-6)
    # clipped: token (0,1) r=e^-0.5 < 0.8 but A>0 -> not clipped; (1,1) r=e^0.3=1.35 > 1.28 with A<0 -> not clipped
    # (pessimistic min keeps the unclipped term); (0,0) r=e^0.1=1.105 inside. None clipped here.
    assert stats["clip_frac"].item() == 0.0


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_clip_engages_exactly_outside_range(adv):
    eps_low, eps_high = 0.2, 0.28
    ratios = [0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0]
    old = torch.zeros(1, len(ratios))
    logp = torch.log(torch.tensor([ratios])).requires_grad_(True)
    loss, stats = rl.grpo_loss(logp, old, torch.tensor([adv]), torch.ones(1, len(ratios)), eps_low, eps_high, denom=7)
    loss.backward()
    for r, g in zip(ratios, logp.grad[0].tolist()):
        clipped = (adv > 0 and r > 1 + eps_high) or (adv < 0 and r < 1 - eps_low)
        # unclipped: d(-r * A / 7)/dlogp = -r * A / 7; clipped: the constant branch, zero gradient
        assert g == pytest.approx(0.0 if clipped else -r * adv / 7, abs=1e-7), (r, adv)
    assert stats["clip_frac"].item() == pytest.approx(2 / 7)  # two ratios past the bound on the advantage's side


def test_equal_rewards_give_zero_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 5, requires_grad=True)
    logp = torch.log_softmax(torch.randn(4, 6, 8) @ w, -1)[..., 0]  # (B, T) depends on w
    adv = rl.group_advantages(torch.ones(1, 4))[0]  # one group, all correct
    loss, _ = rl.grpo_loss(logp, logp.detach(), adv, torch.ones(4, 6), 0.2, 0.2, denom=24)
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_tis_and_kl_terms_by_hand():
    logp, old, eng = torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    ref = torch.tensor([[-1.5]])
    # TIS weight min(exp(old - engine), cap) = min(e, 2) = 2 on the surrogate -A * 1
    loss, _ = rl.grpo_loss(logp, old, torch.tensor([0.5]), torch.ones(1, 1), 0.2, 0.2, 1.0, engine_logp=eng, tis_cap=2.0)
    assert loss.item() == pytest.approx(-0.5 * 2.0)
    loss, _ = rl.grpo_loss(logp, old, torch.tensor([0.5]), torch.ones(1, 1), 0.2, 0.2, 1.0, engine_logp=eng, tis_cap=5.0)
    assert loss.item() == pytest.approx(-0.5 * math.e, rel=1e-6)
    # k3 KL: exp(d) - d - 1 with d = ref - logp = -0.5
    loss, st = rl.grpo_loss(logp, old, torch.tensor([0.0]), torch.ones(1, 1), 0.2, 0.2, 1.0, ref_logp=ref, kl_coef=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert st["kl"].item() == pytest.approx(k3, rel=1e-6) and loss.item() == pytest.approx(0.1 * k3, rel=1e-6)


def test_split_into_microbatches_and_ranks_does_not_change_the_gradient():
    # a toy policy: logp of fixed targets under softmax(x @ w); 6 responses of different lengths
    torch.manual_seed(0)
    x, tgt = torch.randn(6, 7, 4), torch.randint(0, 5, (6, 7))
    mask = torch.zeros(6, 7)
    for b, n in enumerate([7, 3, 5, 1, 6, 2]):
        mask[b, :n] = 1
    adv, old = torch.randn(6), torch.randn(6, 7) * 0.1 - 1.6
    w0 = torch.randn(4, 5)

    def grad(parts, per_part_denom=False):
        w = w0.clone().requires_grad_(True)
        for rows in parts:  # each part: a micro-batch (on some rank); gradients SUM as with divide factor 1
            lp = torch.log_softmax(x[rows] @ w, -1).gather(-1, tgt[rows, :, None])[..., 0]
            denom = mask[rows].sum() if per_part_denom else mask.sum()  # global token count
            loss, _ = rl.grpo_loss(lp, old[rows], adv[rows], mask[rows], 0.2, 0.28, denom)
            loss.backward()
        return w.grad

    full = grad([list(range(6))])
    micro = grad([[0, 1], [2], [3, 4, 5]])  # one rank, three micro-batches
    ranks = grad([[5, 0], [3], [1, 4], [2]])  # two ranks x two micro-batches, any order
    assert torch.allclose(full, micro, atol=1e-6) and torch.allclose(full, ranks, atol=1e-6)
    assert not torch.allclose(full, grad([[0, 1], [2], [3, 4, 5]], per_part_denom=True) / 3, atol=1e-4)


def test_length_schedule():
    stages = [(0, 24576), (300, 32768), (700, 49152)]
    assert [rl.length_schedule(s, stages) for s in (0, 299, 300, 699, 700, 5000)] == [24576, 24576, 32768, 32768, 49152, 49152]


def test_next_prompts_strides_epochs_and_resume():
    n, world, k = 10, 3, 4
    states = [{"epoch": 0, "cursor": 0} for _ in range(world)]
    first = [rl.next_prompts(k, states[r], n, r, world) for r in range(world)]
    for r in range(world):
        assert all(i % world == r for i in first[r])
    assert sorted(first[0][:4]) == [0, 3, 6, 9]  # rank 0 owns 4 problems: one epoch, each once
    saved = dict(states[1])
    a = rl.next_prompts(5, states[1], n, 1, world)
    assert rl.next_prompts(5, dict(saved), n, 1, world) == a  # the state is all a resume needs


def test_packed_logp_equals_unpacked(hf_tiny_dir, tiny_tokenizer):
    # build_sample + pack + collate against one plain forward per (prompt + response), with an image
    import numpy as np
    from PIL import Image
    from model import QwenVL, render_chat
    model = QwenVL.from_pretrained(hf_tiny_dir)
    img = Image.fromarray((np.random.RandomState(0).rand(60, 80, 3) * 255).astype("uint8"))
    msgs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "How many?"}]}],
            [{"role": "user", "content": "What is 3 + 4?"}]]
    samples, ref = [], []
    for i, msg in enumerate(msgs):
        prompt = render_chat(msg, tiny_tokenizer, add_generation_prompt=True, max_pixels=28 * 28 * 64)
        resp = tiny_tokenizer("The answer is \\boxed{7}.<|im_end|>")["input_ids"][: 5 + i]
        c = SimpleNamespace(token_ids=resp, logprobs=[-0.5] * len(resp))
        s = rl.build_sample(prompt, c, adv=float(i))
        samples.append(s)
        assert (s["targets"] >= 0).sum() == len(resp) and s["targets"][-1] == resp[-1]
        with torch.no_grad():
            ids = torch.cat([prompt["input_ids"], torch.tensor(resp)])[None]
            logits = model(ids, prompt["pixel_values"], prompt["image_grid_thw"]).float()
        ref.append(torch.log_softmax(logits[0, len(prompt["input_ids"]) - 1:-1], -1).gather(-1, torch.tensor(resp)[:, None])[:, 0])
    (mb,) = rl.pack(samples, budget=10**6)
    b = rl.collate(mb, "cpu")
    with torch.no_grad():
        lp = model(b["input_ids"], b["pixel_values"], b["image_grid_thw"], segment_ids=b["segment_ids"], targets=b["targets"])
    assert torch.allclose(lp[b["mask"]], torch.cat(ref), atol=1e-5)
    assert b["adv"][0, b["mask"][0]].tolist() == [0.0] * 5 + [1.0] * 6
    assert [len(p) for p in rl.pack(samples + samples, budget=len(samples[0]["input_ids"]) + 1)] == [1, 1, 1, 1]


# -----------------------------------------------------------------------------
# end to end on CPU: the toy task is "answer 3". A tiny model is first taught to answer \boxed{d} with d
# uniform over 0..4 (so about 1 in 5 samples is right), then rl.py has to find the 3.

TOY = ["--engine=torch", "--device=cpu", "--dtype=float32", "--eval_path=", "--template={question}",
       "--length_stages=[(0, 8)]", "--prompts_per_step=8", "--group_size=8", "--learning_rate=2e-3", "--warmup_steps=1",
       "--reward_workers=1", "--export_every_save=False", "--gradient_checkpointing=False", "--log_rollouts_every=1"]


@pytest.fixture(scope="module")
def toy(hf_tiny_dir, tiny_tokenizer, tmp_path_factory):
    import random
    from PIL import Image
    from model import QwenVL, render_chat
    out = tmp_path_factory.mktemp("rl_toy")
    torch.manual_seed(0)
    model, rng = QwenVL.from_pretrained(hf_tiny_dir), random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        rows = [render_chat([{"role": "user", "content": "Guess the secret digit."},
                             {"role": "assistant", "content": f"\\boxed{{{rng.randint(0, 4)}}}"}], tiny_tokenizer) for _ in range(16)]
        ids = torch.stack([r["input_ids"] for r in rows])  # all the same length
        targets = torch.where(torch.stack([r["loss_mask"] for r in rows])[:, 1:] > 0, ids[:, 1:], -100)
        logp = model(ids[:, :-1], targets=targets)
        (-logp.sum() / (targets >= 0).sum()).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out / "warm"), tiny_tokenizer)
    for f in ("preprocessor_config.json", "generation_config.json"):
        with open(os.path.join(hf_tiny_dir, f)) as fi, open(out / "warm" / f, "w") as fo:
            fo.write(fi.read())
    Image.new("RGB", (56, 84), (200, 30, 30)).save(out / "red.png")
    with open(out / "toy.jsonl", "w") as f:  # every other problem has an image: mixed micro-batches
        for i in range(64):
            f.write(json.dumps({"id": str(i), "question": "Guess the secret digit.", "answer": "3",
                                "images": ["red.png"] if i % 2 else []}) + "\n")
    return out


def run_rl(toy, out_dir, *extra, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "rl.py"), f"--init_from={toy / 'warm'}", f"--data_path={toy / 'toy.jsonl'}",
           f"--out_dir={out_dir}", *TOY, *extra]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if wait:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    return p


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_reward_rises_on_toy_task(toy, tmp_path):
    run_rl(toy, tmp_path / "run", "--num_steps=12", "--save_every=0")
    m = metrics(tmp_path / "run")
    first, last = [r["reward_mean"] for r in m[:3]], [r["reward_mean"] for r in m[-3:]]
    # 3 steps x 64 samples at p ~ 0.2: the standard error of a mean is ~0.03, the required gain 10x that
    assert sum(first) / 3 < 0.4 and sum(last) / 3 - sum(first) / 3 > 0.3, [r["reward_mean"] for r in m]
    # the engine samples with the trainer's own module: its log-probs are the trainer's
    assert max(r["logp_gap"] for r in m) < 1e-4
    assert os.path.exists(tmp_path / "run" / "hf" / "model.safetensors")


@pytest.mark.slow
def test_killed_and_resumed_run_logs_the_same_metrics(toy, tmp_path):
    args = ["--num_steps=6", "--save_every=2"]
    run_rl(toy, tmp_path / "a", *args)
    p = run_rl(toy, tmp_path / "b", *args, wait=False)
    latest = tmp_path / "b" / "ckpt" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the run and its reward workers, mid-step
    p.communicate()
    killed_at = len(metrics(tmp_path / "b"))
    run_rl(toy, tmp_path / "b", *args, "--resume=True")
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert killed_at < 6 and [r["step"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time_"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_filter_difficulty_keeps_mixed_pass_rates(hf_tiny_dir, tmp_path):
    # the per-sample file is already complete, so the script samples nothing and only filters
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "p.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": "q", "answer": "1", "images": []}) + "\n" for i in "abc"))
    out = tmp_path / "f.jsonl"
    correct = {"a": [1, 1, 1], "b": [0, 1, 0], "c": [0, 0, 0]}
    with open(str(out) + ".samples.jsonl", "w") as f:
        for i, cs in correct.items():
            for j, c in enumerate(cs):
                f.write(json.dumps({"id": i, "sample": j, "correct": bool(c), "finish_reason": "stop", "num_tokens": 1,
                                    "behaviours": {}, "response": "", "answer": "1"}) + "\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "filter_difficulty.py"), f"--model={hf_tiny_dir}",
                    f"--data={data}", f"--out={out}", "--engine=torch", "--device=cpu", "--k=3"], check=True, cwd=ROOT)
    kept = [json.loads(line) for line in open(out)]
    assert [(p["id"], p["pass_rate"]) for p in kept] == [("b", pytest.approx(1 / 3))]


def test_lr_schedule_constant_or_cosine(monkeypatch):
    """Warm-up is linear; min_lr_ratio 1.0 keeps the LR constant (OVR), < 1 decays by a cosine to
    min_lr_ratio * learning_rate at the last step (hand-computed values)."""
    monkeypatch.setattr(rl, "learning_rate", 1.0)
    monkeypatch.setattr(rl, "warmup_steps", 10)
    monkeypatch.setattr(rl, "num_steps", 110)
    monkeypatch.setattr(rl, "min_lr_ratio", 1.0)
    assert rl.lr_at(4) == 0.5 and rl.lr_at(9) == 1.0 and rl.lr_at(100) == 1.0
    monkeypatch.setattr(rl, "min_lr_ratio", 0.1)
    assert rl.lr_at(4) == 0.5 and rl.lr_at(10) == 1.0
    assert abs(rl.lr_at(60) - 0.55) < 1e-12 and abs(rl.lr_at(110) - 0.1) < 1e-12


def test_gap_check_warns_and_stops_naming_step_and_checkpoint():
    assert rl.gap_check(0.01, 3, "ckpt/step_2", 0.05, 0.3) is None  # healthy bf16 vLLM
    assert "step 3" in rl.gap_check(0.1, 3, "ckpt/step_2", 0.05, 0.3)
    with pytest.raises(SystemExit, match=r"step 7: .*gap 0\.6000 .*last checkpoint: ckpt/step_6"):
        rl.gap_check(0.6, 7, "ckpt/step_6", 0.05, 0.3)  # stale weights
    assert rl.gap_check(5.0, 7, None, 0, 0) is None  # both off
