# The optimizer step of sft.py and rl.py against plain PyTorch, and rl.py's loss terms against hand
# computations:
# - one step of sft.py / rl.py (1 process, and 2 FSDP2 ranks under torchrun with gloo) with a gradient clip
#   that engages gives the weights of a plain loop: the same loss on unpacked samples, backward,
#   torch.nn.utils.clip_grad_norm_, torch's AdamW; the logged grad_norm is the norm before the clip;
# - the trained vision tower on a text-only step takes the same step on 1 and 2 ranks;
# - Dr. GRPO (no std, responses x cap as the denominator) and the batch advantage normalisation, end to end;
# - the KL term's gradient is that of KL(pi || ref), computed exactly over a small vocabulary;
# - truncated importance sampling's weights and its logged stats; dynamic sampling asks for the shortfall only.
# rl.py runs with a replay engine (this file's __main__): fixed completions, so the batch is known here.
import json
import math
import os
import socket
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rl  # noqa: E402
from model import QwenVL, load_tokenizer, render_chat  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, args, nproc=1, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    r = subprocess.run(launch + script + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def adamw_step(params, lr, betas, weight_decay, clip):
    """The plain loop's update: zero gradients where the loss did not reach, torch's clip, torch's AdamW.
    Returns the norm clip_grad_norm_ reports (the total norm before clipping)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else None
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    opt.step()
    return norm


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -----------------------------------------------------------------------------
# sft.py: one step on the whole (tiny) data set


def write_sft_data(folder):
    """6 conversations, 2 with an image; each longer than half of max_seq_len (returned), so each packs alone."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(os.path.join(folder, "img", "red.png"))
    path = os.path.join(folder, "sft.jsonl")
    with open(path, "w") as f:
        for i in range(6):
            user = f"What is {10 + i} + {20 + i}?"
            if i in (1, 4):
                user = [{"type": "image", "image": "img/red.png"}, {"type": "text", "text": user}]
            think = " ".join(f"Let me add {10 + i} and {20 + i}, then check it." for _ in range(3))
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content":
                                f"<think> {think} </think> The answer is \\boxed{{{30 + 2 * i}}}."}]}) + "\n")
    return path


def sft_reference(init_dir, path, lr, clip, weight_decay):
    """Token-mean cross-entropy over every assistant token of every sample, each sample on its own (no
    packing), all parameters trained; AdamW with weight decay on matrices only, betas sft.py's defaults."""
    tok, model = load_tokenizer(init_dir), QwenVL.from_pretrained(init_dir)
    total, count = 0.0, 0
    for line in open(path):
        s = render_chat(json.loads(line)["messages"], tok, image_root=os.path.dirname(path), max_pixels=28 * 28 * 64)
        logits = model(s["input_ids"][None], s["pixel_values"], s["image_grid_thw"])[0]
        keep = s["loss_mask"][1:].bool()
        total = total + F.cross_entropy(logits[:-1][keep], s["input_ids"][1:][keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                      lr=lr, betas=(0.9, 0.999)).step()
    return model.state_dict(), norm.item()


@pytest.fixture(scope="module")
def sft_setup(tiny_model_dir, tmp_path_factory):
    import sft
    folder = str(tmp_path_factory.mktemp("sft_clip"))
    path = write_sft_data(folder)
    tok = load_tokenizer(tiny_model_dir)
    _, lengths, _, _, _ = sft.build_index([path], tok, (56 * 56, 28 * 28 * 64), 10**6, "drop", 0, 1)
    max_len = max(lengths) + 1
    assert 2 * min(lengths) > max_len, lengths  # no two samples share a row: one step = all 6 samples
    lr, clip, wd = 1e-3, 1e-6, 0.1  # the clip: |g| ~ 1e-9 per element, where Adam's eps 1e-8 makes the step depend on it
    ref, norm = sft_reference(tiny_model_dir, path, lr, clip, wd)
    unclipped, _ = sft_reference(tiny_model_dir, path, lr, 0.0, wd)
    args = [f"--init_from={tiny_model_dir}", f"--data_path={path}", f"--max_seq_len={max_len}", "--batch_size=6",
            "--max_steps=1", "--epochs=1", f"--learning_rate={lr}", "--warmup_steps=0", f"--grad_clip={clip}",
            f"--weight_decay={wd}", "--freeze=", "--save_every=0", "--export_every_save=False", "--device=cpu",
            "--gradient_checkpointing=False"]
    return dict(ref=ref, norm=norm, unclipped=unclipped, clip=clip, args=args, folder=folder)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])  # torchrun: ~1 min
def test_sft_step_equals_plain_loop_with_clip_grad_norm(sft_setup, nproc):
    ref, norm = sft_setup["ref"], sft_setup["norm"]
    assert norm > 1e4 * sft_setup["clip"]  # the clip engages, by far
    assert max_diff(ref, sft_setup["unclipped"]) > 1e-4  # and one step shows it (the test can fail)
    out = os.path.join(sft_setup["folder"], f"out{nproc}")
    run(["sft.py"], sft_setup["args"] + [f"--out_dir={out}"], nproc=nproc)
    (m,) = metrics(out)
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-4)  # logged: the norm before the clip
    got = QwenVL.from_pretrained(os.path.join(out, "hf")).state_dict()
    assert max_diff(got, ref) < 1e-6, max_diff(got, ref)


# -----------------------------------------------------------------------------
# rl.py: one step with a replay engine (every prompt gets the same fixed completions)

TEXTS = ["\\boxed{3}", "I think it is \\boxed{1}", "so \\boxed{3} it is", "\\boxed{2}, surely"]  # answer "3"
REWARDS = [1.0, 0.0, 1.0, 0.0]


def completion_ids(tok, text):
    return tok(text)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def response_logprobs(model, prompt, ids):
    """log p of each response token, one unpacked forward of prompt + response."""
    full = torch.cat([prompt["input_ids"], torch.tensor(ids)])[None]
    logits = model(full, prompt["pixel_values"], prompt["image_grid_thw"]).float()[0]
    tp = len(prompt["input_ids"])
    return torch.log_softmax(logits[tp - 1:-1], -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


class ReplayEngine:
    """rollout's engine interface with fixed completions: the first `mixed` prompts of a call get TEXTS
    (rewards 1, 0, 1, 0), the others TEXTS[0] n times (all right: no variance). Log-probs from the model it
    was given, plus `shift`. Each call's prompt count is appended to `calls`."""

    def __init__(self, model, tokenizer, spec, **pixels):
        self.model, self.tok, self.spec, self.pixels = model, tokenizer, spec, pixels

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=0):
        from rollout import Completion
        with open(self.spec["calls"], "a") as f:
            f.write(f"{len(prompts)}\n")
        groups = []
        for k, msgs in enumerate(prompts):
            texts = TEXTS if k < self.spec.get("mixed", len(prompts)) else [TEXTS[0]] * n
            prompt = render_chat(msgs, self.tok, add_generation_prompt=True, **self.pixels)
            group = []
            for text in texts[:n]:
                ids = completion_ids(self.tok, text)
                with torch.no_grad():
                    lp = response_logprobs(self.model, prompt, ids) + self.spec.get("shift", 0.0)
                group.append(Completion(ids, text, lp.tolist(), "stop"))
            groups.append(group)
        return groups

    def sleep(self):
        pass

    def sync_weights(self, model):
        pass


def replay_main():
    """python tests/test_trainer.py SPEC.json rl.py-arguments...: rl.py's main with the replay engine."""
    import rollout
    rollout.patch_cpu_torchvision()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    rl.make_engine = lambda kind, model, tokenizer, model_path=None, **kw: ReplayEngine(model, tokenizer, spec, **kw)
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    rl.main()


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("rl_data")
    Image.new("RGB", (56, 84), (200, 30, 30)).save(d / "red.png")
    for name, images in (("text", []), ("image", ["red.png"])):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(16):
                f.write(json.dumps({"id": str(i), "question": "Guess the secret digit.", "answer": "3", "images": images}) + "\n")
    return d


def run_rl(tmp, init_dir, data, nproc=1, spec=None, **kw):
    spec = dict(spec or {}, calls=str(tmp / "calls.txt"))
    with open(tmp / "spec.json", "w") as f:
        json.dump(spec, f)
    a = dict(init_from=init_dir, data_path=data, out_dir=tmp / "out", engine="torch", device="cpu", eval_path="",
             template="{question}", prompts_per_step=4, group_size=4, length_stages=[(0, 64)], num_steps=1,
             save_every=0, export_every_save=False, learning_rate=1e-3, warmup_steps=1, freeze="",
             gradient_checkpointing=False, reward_workers=1, log_rollouts_every=0, grad_clip=1e-6)
    a.update(kw)
    run([os.path.join("tests", "test_trainer.py"), str(tmp / "spec.json")],
        [f"--{k}={v}" for k, v in a.items()], nproc=nproc)
    return metrics(tmp / "out"), [int(x) for x in open(tmp / "calls.txt")]


def rl_reference(init_dir, image, adv_norm="group", loss_norm="token", lr=1e-3, clip=1e-6, weight_decay=0.0,
                 prompts=4, cap=64):
    """The step by hand: `prompts` identical groups of TEXTS; advantages from REWARDS; the loss
    -sum_i A_i sum_t log p_it / D on unpacked forwards (ratio 1 on policy), D = response tokens (DAPO) or
    responses x cap (Dr. GRPO); then adamw_step with rl.py's betas."""
    tok, model = load_tokenizer(init_dir), QwenVL.from_pretrained(init_dir)
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": "Guess the secret digit."}]
    prompt = render_chat([{"role": "user", "content": content}], tok, add_generation_prompt=True,
                         min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    ids = [completion_ids(tok, t) for t in TEXTS]
    n = [len(x) for x in ids]
    mean = sum(REWARDS) / 4
    adv = [r - mean for r in REWARDS]
    if adv_norm == "group":
        adv = [a / (statistics.stdev(REWARDS) + 1e-6) for a in adv]
    if adv_norm == "batch":  # every token of every response one value; population mean and std (ORZ)
        tokens = [a for a, k in zip(adv, n) for _ in range(k)]
        adv = [(a - statistics.fmean(tokens)) / (statistics.pstdev(tokens) + 1e-6) for a in adv]
    denom = prompts * (sum(n) if loss_norm == "token" else 4 * cap)
    loss = -prompts * sum(a * response_logprobs(model, prompt, x).sum() for a, x in zip(adv, ids)) / denom
    loss.backward()
    norm = adamw_step(list(model.parameters()), lr, (0.9, 0.95), weight_decay, clip)
    return model.state_dict(), norm.item() if clip else None


def check_rl(tmp, m, ref, norm):
    assert m["reward_mean"] == pytest.approx(sum(REWARDS) / 4)  # the verifier scores TEXTS as REWARDS says
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-4)  # logged: the norm before the clip
    got = QwenVL.from_pretrained(str(tmp / "out" / "hf")).state_dict()
    assert max_diff(got, ref) < 1e-6, max_diff(got, ref)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])  # torchrun: ~1 min
def test_rl_step_equals_plain_loop_with_clip_grad_norm(hf_tiny_dir, rl_data, tmp_path, nproc):
    # with an image in every prompt and everything trained (the vision tower too)
    ref, norm = rl_reference(hf_tiny_dir, str(rl_data / "red.png"))
    unclipped, _ = rl_reference(hf_tiny_dir, str(rl_data / "red.png"), clip=0.0)
    assert norm > 1e4 * 1e-6 and max_diff(ref, unclipped) > 1e-4  # the clip engages, and one step shows it
    m, _ = run_rl(tmp_path, hf_tiny_dir, rl_data / "image.jsonl", nproc=nproc)
    check_rl(tmp_path, m[0], ref, norm)
    assert m[0]["is_mean"] == pytest.approx(1.0, abs=1e-4) and m[0]["is_capped"] == 0.0  # engine = trainer


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])  # torchrun: ~1 min
def test_rl_text_only_step_moves_the_vision_tower_alike_on_1_and_2_ranks(hf_tiny_dir, rl_data, tmp_path, nproc):
    # text-only prompts: the tower gets no gradient, but a zero one and so AdamW's weight decay, on any rank count
    ref, norm = rl_reference(hf_tiny_dir, None, weight_decay=0.5)
    m, _ = run_rl(tmp_path, hf_tiny_dir, rl_data / "text.jsonl", nproc=nproc, weight_decay=0.5)
    check_rl(tmp_path, m[0], ref, norm)
    start = QwenVL.from_pretrained(hf_tiny_dir).state_dict()
    k = "visual.patch_embed.proj.weight"
    assert torch.allclose(ref[k], start[k] * (1 - 1e-3 * 0.5))  # decoupled decay only: (1 - lr * wd)


@pytest.mark.slow  # the arithmetic is also checked by hand below, in-process
@pytest.mark.parametrize("adv_norm,loss_norm", [("none", "constant"), ("batch", "token")])
def test_rl_dr_grpo_and_batch_normalisation_end_to_end(hf_tiny_dir, rl_data, tmp_path, adv_norm, loss_norm):
    ref, norm = rl_reference(hf_tiny_dir, None, adv_norm, loss_norm)
    m, _ = run_rl(tmp_path, hf_tiny_dir, rl_data / "text.jsonl", adv_norm=adv_norm, loss_norm=loss_norm)
    check_rl(tmp_path, m[0], ref, norm)


def test_dynamic_sampling_asks_for_the_shortfall_only(hf_tiny_dir, rl_data, tmp_path):
    # one prompt per call has reward variance: 4 wanted, 1 kept per round -> calls of 4, 3, 2 prompts
    m, calls = run_rl(tmp_path, hf_tiny_dir, rl_data / "text.jsonl", spec={"mixed": 1}, max_sampling_rounds=3,
                      grad_clip=1.0)
    assert calls == [4, 3, 2]
    assert m[0]["groups_kept"] == 3 and m[0]["sampling_rounds"] == 3


@pytest.mark.slow  # the weights and stats are also checked by hand below, in-process
def test_tis_logged_stats_end_to_end(hf_tiny_dir, rl_data, tmp_path):
    # engine log-probs 1 nat below the trainer's: every ratio is e, over the cap 2
    # (a gap of 1 nat is what rl.py's health check stops on: off here, the mismatch is the point)
    m, _ = run_rl(tmp_path, hf_tiny_dir, rl_data / "text.jsonl", spec={"shift": -1.0}, tis_cap=2.0, grad_clip=1.0,
                  logp_gap_stop=0.0)
    assert m[0]["is_mean"] == pytest.approx(math.e, rel=1e-4) and m[0]["is_max"] == pytest.approx(math.e, rel=1e-4)
    assert m[0]["is_capped"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# rl.grpo_loss terms by hand


def test_dr_grpo_constant_denominator_by_hand():
    # two responses of 3 and 1 tokens, rewards 1 and 0 -> Dr. GRPO advantages +0.5, -0.5; on policy the
    # surrogate is -A per token; divided by 2 responses x a cap of 4 tokens: -(0.5 * 3 - 0.5 * 1) / 8
    adv = rl.group_advantages(torch.tensor([[1.0, 0.0]]), scale_by_std=False)[0]
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, st = rl.grpo_loss(logp, logp.detach(), adv, mask, 0.2, 0.2, denom=2 * 4, n_tokens=4)
    assert loss.item() == pytest.approx(-1 / 8)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0, 0]]) / 8)
    assert st["ratio_mean"].item() == pytest.approx(1.0)  # stats stay token means


def test_batch_normalise_by_hand():
    adv, n = [0.5, -0.5, 1.0], [2, 1, 3]
    tokens = [a for a, k in zip(adv, n) for _ in range(k)]  # [0.5, 0.5, -0.5, 1, 1, 1]
    sums = (sum(n), sum(a * k for a, k in zip(adv, n)), sum(a * a * k for a, k in zip(adv, n)))
    got = [rl.batch_normalise(a, sums, eps=0.0) for a in adv]
    want = [(a - statistics.fmean(tokens)) / statistics.pstdev(tokens) for a in adv]
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("off_policy", [False, True])
def test_kl_gradient_is_that_of_kl_policy_to_ref(off_policy):
    # One position, a vocabulary of 6. Sampling y ~ p_old and averaging the per-token loss's gradient is,
    # exactly, weighting each y's gradient by p_old(y): the mask carries those weights (denom 1). The
    # reference is autograd of KL(p || ref) = sum_y p(y) (log p(y) - log ref(y)), written out.
    torch.manual_seed(0)
    logits = torch.randn(6, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6), -1)
    logp = torch.log_softmax(logits, -1)
    old = (logp + 0.3 * torch.randn(6)).log_softmax(-1).detach() if off_policy else logp.detach()
    loss, _ = rl.grpo_loss(logp[None], old[None], torch.zeros(1), old.exp()[None], 0.2, 0.2, 1.0,
                           ref_logp=ref[None], kl_coef=1.0)
    (got,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits, -1)
    (want,) = torch.autograd.grad((p * (torch.log(p) - ref)).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the plain k3 (no ratio) in the same place has the gradient of KL(ref || p) instead
    d = ref - torch.log_softmax(logits, -1)
    (k3,) = torch.autograd.grad((old.exp() * (d.exp() - d - 1)).sum(), logits)
    (reverse,) = torch.autograd.grad((ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(), logits)
    assert not torch.allclose(k3, want, atol=1e-3)
    if not off_policy:
        torch.testing.assert_close(k3, reverse, rtol=1e-5, atol=1e-7)


def test_tis_weights_and_stats_by_hand():
    # ratios p_old / p_engine = e^0.5, e^1, e^-0.3 and a masked e^2; cap 2: only e^1 is capped
    old = torch.zeros(1, 4)
    eng = -torch.tensor([[0.5, 1.0, -0.3, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logp = torch.zeros(1, 4, requires_grad=True)
    loss, st = rl.grpo_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, 3.0, engine_logp=eng, tis_cap=2.0)
    w = [math.exp(0.5), 2.0, math.exp(-0.3)]
    assert loss.item() == pytest.approx(-sum(w) / 3, rel=1e-6)  # on policy the surrogate is -A = -1 per token
    assert st["is_mean"].item() == pytest.approx((math.exp(0.5) + math.e + math.exp(-0.3)) / 3, rel=1e-6)
    assert st["is_max"].item() == pytest.approx(math.e, rel=1e-6)  # the masked e^2 does not count
    assert st["is_capped"].item() == pytest.approx(1 / 3)


if __name__ == "__main__":
    replay_main()
