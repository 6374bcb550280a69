"""
Peak host memory (RSS) per rank of loading a model for FSDP2 training, 2 gloo ranks under torchrun,
three ways side by side:

  full         every rank reads the whole checkpoint into an fp32 model, then fully_shard keeps its part
               (what sft.py and rl.py did before model.load_sharded)
  meta+tensor  meta device -> fully_shard -> each parameter read whole (get_tensor), its rows kept
  meta+slice   meta device -> fully_shard -> each rank reads only its rows (get_slice): model.load_sharded

    python bench/bench_memory.py                      # ~100M-parameter model, bf16 on disk, fp32 in memory
    python bench/bench_memory.py --nproc=2 --port=29620 --model_dir=/tmp/bench_mem_100m

Then each rank times one training step (forward + backward of a 512-token text row, best of 3) on the model
it loaded, so the table also shows that the way of loading changes nothing about the step ("step full/slice").

"peak" is ru_maxrss of each rank after loading; "base" is the same right before the model is built
(interpreter, torch, process group, and FSDP2's code, which its first call imports: ~100 MiB), so
peak - base ("load") is what loading cost. Pages of the mmapped safetensors count while mapped, as in RSS.
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402

MODES = ["full", "meta+tensor", "meta+slice"]


def build_100m(path):
    """A ~100M random Qwen2.5-VL (text 768 x 12 layers, vocab 16384, untied; vision 384 x 8), saved in bf16."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    vision = M.VisionConfig(depth=8, hidden_size=384, num_heads=6, intermediate_size=1024, out_hidden_size=768,
                            fullatt_block_indexes=[1, 3, 5, 7])
    cfg = M.QwenVLConfig(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=2, mrope_section=[8, 12, 12],
                         image_token_id=16382, video_token_id=16383, vision_start_token_id=16380,
                         vision_end_token_id=16381, bos_token_id=0, eos_token_id=1, vision=vision)
    model = M.QwenVL(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path, state_dict={k: v.to(torch.bfloat16) for k, v in model.hf_state_dict()})
    return path


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(mode, path):
    """One rank: load the model `mode`'s way, shard it as sft.py does, print a JSON line."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(torch.nn.Linear(8, 8, device="meta"), mesh=mesh)  # the first call imports ~100 MiB of code
    dist.barrier()
    base = peak_mib()
    t0 = time.time()

    def shard(m):
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m.visual, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    if mode == "full":
        model = shard(M.QwenVL.from_pretrained(path, dtype=torch.float32))
    elif mode == "meta+slice":
        model = M.load_sharded(shard(M.meta_model(path)), path)
    else:  # meta+tensor: the same, but every tensor read whole and cut here
        model = shard(M.meta_model(path))
        model.to_empty(device="cpu")
        keys = M.checkpoint_keys(path)
        with torch.no_grad():
            for name, p in model.named_parameters():
                with safe_open(keys[name][0], framework="pt", device="cpu") as f:
                    full = f.get_tensor(keys[name][1])
                start, end = M.local_rows(p.shape[0], rank, world)
                p.to_local().copy_(full[start:end])
                del full
    load_s, peak = time.time() - t0, peak_mib()
    n = sum(p.numel() for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())
    ids = torch.randint(0, 16000, (1, 513), generator=torch.Generator().manual_seed(rank))
    step_s = float("inf")
    for _ in range(3):  # one training step: logp of the next tokens, backward; best of 3
        t = time.time()
        model(ids[:, :-1], targets=ids[:, 1:]).mean().neg().backward()
        model.zero_grad(set_to_none=True)
        step_s = min(step_s, time.time() - t)
    rows = [None] * world  # rank 0 prints every rank's line (lines of two processes would interleave)
    dist.all_gather_object(rows, dict(mode=mode, rank=rank, base=base, peak=peak, params=n, local=local,
                                      load_s=load_s, step_s=step_s))
    if rank == 0:
        print("\n".join(json.dumps(r) for r in rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(nproc=2, port=29620, model_dir="/tmp/bench_mem_100m"):
    build_100m(model_dir)
    results = {}
    for mode in MODES:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               os.path.abspath(__file__), "--worker", mode, model_dir]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        results[mode] = sorted(rows, key=lambda r: r["rank"])
    r0 = results["full"][0]
    print(f"model: {r0['params'] / 1e6:.1f}M parameters, fp32 {r0['params'] * 4 / 2**20:.0f} MiB whole, "
          f"{r0['local'] * 4 / 2**20:.0f} MiB per rank's shard ({nproc} ranks); checkpoint in bf16")
    print(f"{'rank':>4}  " + "  ".join(f"{m + ' peak/load':>24}" for m in MODES) + "  full/slice (load)")
    for rank in range(nproc):
        cells = [results[m][rank] for m in MODES]
        load = [c["peak"] - c["base"] for c in cells]
        print(f"{rank:>4}  " + "  ".join(f"{c['peak']:>10.0f} / {d:>6.0f} MiB" for c, d in zip(cells, load))
              + f"  x{load[0] / max(load[-1], 1):.2f}")
    print(f"{'rank':>4}  " + "  ".join(f"{m + ' load s / step s':>24}" for m in MODES) + "  step full/slice")
    for rank in range(nproc):
        cells = [results[m][rank] for m in MODES]
        print(f"{rank:>4}  " + "  ".join(f"{c['load_s']:>13.2f} / {c['step_s']:>6.3f}" for c in cells)
              + f"  x{cells[0]['step_s'] / cells[-1]['step_s']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main(**{k.lstrip("-"): (int(v) if v.isdigit() else v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
