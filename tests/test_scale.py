# Scale: sharded loading (meta device + FSDP2 + per-rank safetensors slices), sft.py's cached length index,
# checkpoint averaging and the HF exports rl.py keeps for it.
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import sft
from model import (QwenVL, average_checkpoints, build_tiny, build_tiny_tokenizer, keep_hf_export, load_sharded,
                   load_tokenizer, local_rows, meta_model, render_chat)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_tensors(path):
    """Every tensor of an HF dir read with safetensors' own loader: the reference the loaders must match."""
    from safetensors.torch import load_file
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


@pytest.fixture(scope="module")
def odd_tied_dir(tmp_path_factory):
    # tied embeddings, 3 layers, weights in several files (the tiny vocabulary, 765 rows, shards unevenly)
    path = str(tmp_path_factory.mktemp("odd_tied"))
    build_tiny(path, tie_word_embeddings=True, num_hidden_layers=3)
    m = QwenVL.from_pretrained(path)
    m.save_pretrained(path, max_shard_bytes=200_000)  # several safetensors files + an index
    os.remove(os.path.join(path, "model.safetensors"))
    return path


def test_local_rows_is_torch_chunk():
    for n in (1, 2, 7, 1015, 1024):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(n).chunk(world)
            for r in range(world):
                start, end = local_rows(n, r, world)
                want = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(start, end)) == want, (n, world, r)


@pytest.mark.parametrize("tied", [False, True])
def test_unsharded_load_equals_files(tiny_model_dir, odd_tied_dir, tied):
    # no process group: load_sharded on a plain meta model loads every row
    path = odd_tied_dir if tied else tiny_model_dir
    model = load_sharded(meta_model(path), path)
    ref = file_tensors(path)
    sd = model.state_dict()
    assert set(sd) == set(ref) | ({"lm_head.weight"} if tied else set())
    for k, v in ref.items():
        assert torch.equal(sd[k], v.float()), k
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    plain = QwenVL.from_pretrained(path)
    ids = torch.randint(0, 500, (2, 17))
    assert torch.equal(model(ids), plain(ids))


def test_meta_model_bf16(tiny_model_dir):
    model = load_sharded(meta_model(tiny_model_dir, torch.bfloat16), tiny_model_dir)
    for k, v in file_tensors(tiny_model_dir).items():
        assert model.state_dict()[k].dtype == torch.bfloat16
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k


SCRIPT = r'''
import os, sys
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from safetensors.torch import load_file
from model import QwenVL, load_sharded, meta_model

path = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
model = meta_model(path)
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model.visual, mesh=mesh)
fully_shard(model, mesh=mesh)
load_sharded(model, path)
# each rank holds only its rows
for name, p in model.named_parameters():
    local = p.to_local()
    assert local.shape[0] == -(-p.shape[0] // world) or rank == world - 1, (name, local.shape, p.shape)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
ref = {}
for fn in sorted(os.listdir(path)):
    if fn.endswith(".safetensors"):
        ref.update(load_file(os.path.join(path, fn)))
if rank == 0:
    tied = model.config.tie_word_embeddings
    assert set(full) == set(ref) | ({"lm_head.weight"} if tied else set()), sorted(set(full) ^ set(ref))
    bad = [k for k, v in ref.items() if not torch.equal(full[k], v.float())]
    assert not bad, bad
plain = QwenVL.from_pretrained(path)
ids = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(rank))
with torch.no_grad():
    assert torch.equal(model(ids), plain(ids)), "logits differ"
print(f"rank {rank}: OK")
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.parametrize("nproc,which", [(1, "tiny"), (2, "tiny"), (2, "odd_tied")])
def test_fsdp_sharded_load_equals_files(tmp_path, tiny_model_dir, odd_tied_dir, nproc, which):
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    path = odd_tied_dir if which == "odd_tied" else tiny_model_dir
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={free_port()}", str(script), path],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(": OK") == nproc


# ---- sft.py's length index cache


def write_convs(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            think = " ".join("Let me check, wait." for _ in range(rng.randint(1, 8)))
            answer = f"<think> {think} </think> \\boxed{{{a + b}}}"
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return str(path)


def index(path, tok, cache, max_pixels=28 * 28 * 64, max_len=64):
    return sft.build_index([path], tok, (56 * 56, max_pixels), max_len, "drop", 0, 1, cache=cache)


def test_length_cache_equals_fresh_and_is_used(tiny_model_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_model_dir)
    data, cache = write_convs(tmp_path / "d.jsonl", 12), str(tmp_path / "out" / "length_index.json")
    fresh = index(data, tok, None)
    first = index(data, tok, cache)
    assert os.path.exists(cache) and first == fresh
    # the lengths are the rendered ones (0: longer than max_len, dropped)
    rows = [json.loads(line) for line in open(data)]
    want = [len(render_chat(r["messages"], tok)["input_ids"]) for r in rows]
    assert fresh[3] == want and fresh[1] == [n if n <= 64 else 0 for n in want]
    assert 0 in fresh[1] and any(fresh[1])  # the test data has both kept and dropped samples
    # a second start reads the cache: it renders nothing
    monkeypatch.setattr(sft, "load_sample", lambda *a, **k: pytest.fail("rendered although the cache is valid"))
    assert index(data, tok, cache) == fresh


def test_length_cache_invalidated_by_data_tokenizer_and_pixels(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    data, cache = write_convs(tmp_path / "d.jsonl", 10), str(tmp_path / "length_index.json")
    index(data, tok, cache)
    # same number of lines, different text: the file's bytes changed, and so did the lengths
    old = index(write_convs(tmp_path / "e.jsonl", 10), tok, None)  # what the cache holds
    write_convs(tmp_path / "d.jsonl", 10, seed=1)
    got = index(data, tok, cache)
    assert got == index(data, tok, None) and got[1] != old[1]
    # another tokenizer (a smaller BPE vocabulary: longer token sequences)
    small = build_tiny_tokenizer(vocab_size=400)
    got = index(data, small, cache)
    assert got == index(data, small, None) and got[3] != index(data, tok, None)[3]
    # the pixel bounds and max_len are in the key too
    k = sft.index_key([data], tok, (56 * 56, 28 * 28 * 64), 64, "drop")
    assert k != sft.index_key([data], tok, (56 * 56, 28 * 28 * 32), 64, "drop")
    assert k != sft.index_key([data], tok, (56 * 56, 28 * 28 * 64), 65, "drop")
    assert k != sft.index_key([data], small, (56 * 56, 28 * 28 * 64), 64, "drop")


# ---- checkpoint averaging


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_equals_hand_average(tmp_path, dtype):
    dirs = []
    for seed in range(3):
        d = build_tiny(str(tmp_path / f"m{seed}"), seed=seed, tie_word_embeddings=True)
        if dtype != torch.float32:
            m = QwenVL.from_pretrained(d)
            m.save_pretrained(d, state_dict={k: v.to(dtype) for k, v in m.hf_state_dict()})
        dirs.append(d)
    out = average_checkpoints(dirs, str(tmp_path / "avg"))
    got, inputs = file_tensors(out), [file_tensors(d) for d in dirs]
    assert got.keys() == inputs[0].keys() and "lm_head.weight" not in got  # tied: not written
    for k, v in got.items():
        hand = ((inputs[0][k].double() + inputs[1][k].double() + inputs[2][k].double()) / 3).to(dtype)
        assert v.dtype == dtype and torch.equal(v, hand), k
    for fn in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert open(os.path.join(out, fn), "rb").read() == open(os.path.join(dirs[0], fn), "rb").read(), fn
    QwenVL.from_pretrained(out)  # loads as a model


def test_average_command_and_mismatch(tmp_path):
    a, b = build_tiny(str(tmp_path / "a"), seed=0), build_tiny(str(tmp_path / "b"), seed=1)
    r = subprocess.run([sys.executable, "model.py", "average", a, b, f"--out={tmp_path / 'avg'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "averaged 2 checkpoints" in r.stdout, r.stderr[-2000:]
    wa, wb, avg = file_tensors(a), file_tensors(b), file_tensors(str(tmp_path / "avg"))
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(avg[k], (wa[k] + wb[k]) / 2, rtol=0, atol=1e-7)
    c = build_tiny(str(tmp_path / "c"), num_hidden_layers=3)
    r = subprocess.run([sys.executable, "model.py", "average", a, c, f"--out={tmp_path / 'bad'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and str(tmp_path / "c") in r.stderr and "model.layers.2" in r.stderr


def test_keep_hf_export_survives_rotation(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path
    for step in (2, 4, 6):
        hf = ckpt / f"step_{step:06d}" / "hf"
        hf.mkdir(parents=True)
        (hf / "model.safetensors").write_bytes(bytes([step]) * 10)
        (hf / "config.json").write_text("{}")
        keep_hf_export(str(hf), str(out), keep=2)
        if step >= 4:  # what keep_last=1 does to the checkpoint before it
            shutil.rmtree(ckpt / f"step_{step - 2:06d}")
    assert sorted(d for d in os.listdir(out) if d.startswith("hf_")) == ["hf_step_000004", "hf_step_000006"]
    assert (out / "hf_step_000004" / "model.safetensors").read_bytes() == bytes([4]) * 10
    assert (out / "hf_step_000006" / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_rl_keeps_hf_exports_past_keep_last(tiny_model_dir, tmp_path):
    with open(tmp_path / "toy.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": str(i), "question": "Guess the secret digit.", "answer": "3"}) + "\n")
    out = tmp_path / "rl"
    args = ["--engine=torch", "--device=cpu", "--dtype=float32", "--eval_path=", "--template={question}",
            "--length_stages=[(0, 8)]", "--prompts_per_step=2", "--group_size=4", "--reward_workers=1",
            "--gradient_checkpointing=False", "--num_steps=3", "--save_every=1", "--keep_last=1", "--keep_hf_exports=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "rl.py", f"--init_from={tiny_model_dir}", f"--data_path={tmp_path / 'toy.jsonl'}",
                        f"--out_dir={out}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # keep_last=1, plus step_000002: the newest checkpoint marked GOOD (a step ran after it), which keep_last
    # never deletes (the final step_000003 has no step after it to vouch for it)
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step_000002", "step_000003"]
    assert sorted(d for d in os.listdir(out) if d.startswith("hf_")) == ["hf_step_000002", "hf_step_000003"]
    # the last kept export is the final model; the averaging command takes the kept exports
    final, last = file_tensors(str(out / "hf")), file_tensors(str(out / "hf_step_000003"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    avg = average_checkpoints([str(out / "hf_step_000002"), str(out / "hf_step_000003")], str(out / "hf_avg"))
    QwenVL.from_pretrained(avg)
