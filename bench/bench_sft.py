"""
Training throughput of the SFT step on one device: tokens/s and MFU of forward + backward (+ AdamW)
on packed rows of long-tailed random "reasoning traces", with activation checkpointing, through the
same code as sft.py (sft.pack, sft.collate, sft.microbatch_loss). Random weights, text only.

    python bench/bench_sft.py                                              # CPU: tiny shape, short rows
    python bench/bench_sft.py --device=cuda --shape=7b --seq_lens=8192,16384,32768 --dtype=bfloat16
    python bench/bench_sft.py --device=cuda --shape=3b --seq_lens=8192,16384,32768 --dtype=bfloat16 --optimizer

MFU = model FLOPs / time / peak, model FLOPs = 6 * N * tokens (N = matmul parameters of the LLM incl.
lm_head, not the embedding lookup) + 6 * layers * heads * head_dim * sum(L_i^2) for causal attention
inside each packed sample of length L_i (fwd 2 * 2 * L^2/2 * d, bwd twice that). Recomputation from
activation checkpointing is not counted (PaLM's MFU, not HFU). The peak is --peak_tflops, or the bf16
dense peak for a known GPU (H100/H200 SXM: 989 TFLOP/s). The 7B shape does not fit one GPU with fp32
AdamW states, so by default the weights are in --dtype and no optimizer step is taken (the FSDP run
computes in the same dtype; its optimizer step is sharded across GPUs).
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sft  # noqa: E402
from model import QwenVL, QwenVLConfig  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "tiny": (64, 128, 2, 4, 2, 1024, False),
    "small": (512, 1536, 8, 8, 2, 32000, False),
    "3b": (2048, 11008, 36, 16, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16 dense


def packed_row(seq_len, rng, mean_len):
    """One packed row of long-tailed sample lengths (lognormal, like R1 traces): of a few hundred samples
    packed by sft.pack, the row with the most samples among those at least 90% full. Returns the lengths."""
    lengths = [max(64, min(seq_len, int(rng.lognormvariate(0, 0.8) * mean_len))) for _ in range(400)]
    rows = [[lengths[i] for i in r] for r in sft.pack(list(enumerate(lengths)), seq_len)]
    full = [r for r in rows if sum(r) >= 0.9 * seq_len] or rows
    return max(full, key=len)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument("--seq_lens", default="512,1024", help="packed row lengths (tokens), comma-separated")
    ap.add_argument("--mean_len", type=int, default=0, help="mean sample length (0: seq_len / 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--optimizer", action="store_true", help="also time an AdamW step (fp32 weights + autocast)")
    ap.add_argument("--no_checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak in TFLOP/s (0: known GPUs only)")
    args = ap.parse_args()

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    h, inter, layers, heads, kv, vocab, tied = SHAPES[args.shape]
    hd = h // heads
    cfg = QwenVLConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       mrope_section=[hd // 8, 3 * hd // 16, hd // 2 - hd // 8 - 3 * hd // 16])
    cfg.vision.depth, cfg.vision.out_hidden_size = 1, h  # text-only bench: a token vision tower
    with torch.device(dev):
        model = QwenVL(cfg)
    model.init_weights()
    weights_dtype = torch.float32 if args.optimizer else dt  # --optimizer: fp32 master weights, bf16 autocast
    model.to(weights_dtype).train()
    model.set_gradient_checkpointing(not args.no_checkpointing)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers")) + vocab * h
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda") if args.optimizer else None
    autocast = torch.autocast(dev.type, dtype=dt) if args.optimizer and dt != torch.float32 else torch.autocast(dev.type, enabled=False)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    print(f"device: {name}; shape {args.shape} ({n_matmul / 1e9:.2f}B matmul params), {args.dtype}, "
          f"checkpointing {not args.no_checkpointing}, optimizer {args.optimizer}, peak {peak or 'unknown'} TFLOP/s")
    print(f"{'seq_len':>8} {'samples':>8} {'real%':>6} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")

    rng = random.Random(0)
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        lengths = packed_row(seq_len, rng, args.mean_len or seq_len // 8)
        g = torch.Generator().manual_seed(0)
        samples = [dict(input_ids=torch.randint(0, vocab - 16, (n,), generator=g), loss_mask=torch.ones(n, dtype=torch.long),
                        pixel_values=None, image_grid_thw=None) for n in lengths]
        batch = sft.collate([samples], pad_id=0)
        tokens = sum(lengths)
        flops = 6 * n_matmul * tokens + 6 * layers * heads * hd * sum(n * n for n in lengths)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for i in range(args.warmup + args.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with autocast:
                loss = sft.microbatch_loss(model, batch, tokens, dev)
            loss.backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        s = sorted(times)[len(times) // 2]
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        mfu = f"{flops / s / (peak * 1e12):.1%}" if peak else "n/a"
        print(f"{seq_len:>8} {len(lengths):>8} {tokens / seq_len:>6.1%} {s:>8.3f} {tokens / s:>10.0f} "
              f"{flops / s / 1e12:>8.2f} {mfu:>6} {mem:>8.1f}")


if __name__ == "__main__":
    main()
