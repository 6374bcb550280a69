"""
Cold-start SFT (OVR stage 1): fine-tune Qwen2.5-VL on long reasoning traces with PyTorch FSDP2.
Conversations are rendered with model.py's chat template, loss on assistant tokens only, packed
several to a row (attention and positions restart per sample), and the loss is a token mean over
the whole global batch, so it does not depend on how rows fall into micro-batches or ranks.

    python sft.py config/sft_demo.py                                      # one process, CPU, minutes
    python -m torch.distributed.run --nproc_per_node=2 sft.py config/sft_demo.py   # 2 CPU procs (gloo)
    torchrun --nproc_per_node=1 sft.py config/sft_3b_1gpu.py              # Qwen2.5-VL-3B on one GPU
    torchrun --nproc_per_node=8 sft.py config/sft_ovr7b.py                # the OVR recipe on one node
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_ADDR:29500 sft.py config/sft_ovr7b.py     # many nodes (shared file system)
    torchrun --nproc_per_node=8 sft.py config/sft_ovr7b.py --resume=True  # continue a killed run

Outputs in out_dir: metrics.jsonl (one JSON object per step), ckpt/step_N/ (resumable sharded
state + hf/ export), ckpt/latest (name of the newest complete checkpoint), hf/ (the final model,
loadable by QwenVL.from_pretrained, transformers and vLLM), length_index.json (every sample's length,
so a resume does not render the data again). `python sft.py --help` lists the keys.
"""

import bisect
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist

from model import (QwenVL, barrier, blow_up, configure, data_fingerprint, export_hf, image_bounds, latest_checkpoint, load_checkpoint,
                   load_sharded, load_tokenizer, lock_out_dir, mark_good, meta_model, render_chat, resumable_checkpoint,
                   resume_changes, save_checkpoint, trim_jsonl)

# -----------------------------------------------------------------------------
# config (plain globals; a config file from config/ and --key=value override them)
# I/O
init_from = "out/tiny"          # HF-format model dir to start from (e.g. a local Qwen2.5-VL-7B-Instruct)
out_dir = "out/sft"             # checkpoints, metrics.jsonl, hf/ (the final export)
resume = False                  # continue from out_dir/ckpt/latest (starts fresh if there is none)
save_every = 100                # steps between resumable checkpoints (0: only at the end)
keep_last = 2                   # resumable checkpoints kept on disk
export_every_save = True        # also write an HF export into every checkpoint (ckpt/step_N/hf)
# data
data_path = "data/demo/sft.jsonl"   # JSONL or parquet of {"messages": [...], "images": [...]}; comma-separated list ok
max_seq_len = 4096              # tokens per packed row
overlong = "drop"               # samples longer than max_seq_len: "drop" or "truncate" (keep the first max_seq_len)
min_pixels = 0                  # image resize bounds in pixels (0: from init_from/preprocessor_config.json)
max_pixels = 0
# model
freeze = "visual"               # comma-separated parameter-name prefixes to freeze (OVR: the vision tower); "" trains all
dtype = "auto"                  # compute: "auto" (bfloat16 on GPU, float32 on CPU) | "bfloat16" | "float32"; weights fp32
gradient_checkpointing = True   # recompute each decoder layer / vision block in backward
# optim
epochs = 1                      # passes over the data (each epoch reshuffles and repacks)
max_steps = 0                   # optimizer steps (0: all steps of `epochs` epochs); sets the LR schedule length
batch_size = 8                  # packed rows per optimizer step, all ranks together (OVR: 640 rows of 64k)
micro_batch_size = 1            # packed rows per forward/backward on one rank
learning_rate = 1e-5            # peak LR
lr_schedule = "cosine"          # "cosine" (to min_lr_ratio * learning_rate) or "constant" after warmup
warmup_steps = 0                # linear warmup from 0
min_lr_ratio = 0.0              # floor of the cosine
weight_decay = 0.0              # AdamW, on matrices only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0                 # max global grad norm (0: off)
blowup_factor = 10.0            # stop when loss > this x its median over the last 50 steps, grad norm > this^2 x or < 1/this (0: NaN/inf only)
# system
seed = 0                        # data order (shuffle and packing per epoch)
device = "auto"                 # "auto" (cuda if available), "cuda", "cpu"
wandb_project = ""              # log to wandb when set
wandb_run_name = "sft"

# -----------------------------------------------------------------------------
# data: index the files, render each sample once for its length, pack per epoch


@functools.lru_cache(maxsize=4)
def parquet_messages(path):
    import pyarrow.parquet as pq  # optional dependency
    table = pq.read_table(path)
    cols = [c for c in ("messages", "images") if c in table.column_names]
    return [dict(zip(cols, row)) for row in zip(*(table.column(c).to_pylist() for c in cols))]


def scan_files(paths):
    """One reference (file index, byte offset or row, line number) per sample. Blank lines are skipped."""
    refs = []
    for fi, path in enumerate(paths):
        if not os.path.isfile(path):
            raise SystemExit(f"data file not found: {path}")
        if path.endswith(".parquet"):
            refs += [(fi, i, i + 1) for i in range(len(parquet_messages(path)))]
            continue
        with open(path, "rb") as f:
            pos, line = 0, 0
            for raw in f:
                line += 1
                if raw.strip():
                    refs.append((fi, pos, line))
                pos += len(raw)
    return refs


def read_messages(path, pos):
    """The sample at byte offset / row `pos` as a messages list with image paths made absolute."""
    if path.endswith(".parquet"):
        row = parquet_messages(path)[pos]
    else:
        with open(path, "rb") as f:
            f.seek(pos)
            row = json.loads(f.readline())
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, str):  # parquet files often store the list as a JSON string
        messages = json.loads(messages)
    assert isinstance(messages, list) and messages, 'expected an object with a non-empty "messages" list'
    images = list(row.get("images") or [])  # TRL/LLaMA-Factory style: {"type": "image"} items take these in order
    root = os.path.dirname(os.path.abspath(path))
    roles = []
    for m in messages:
        assert isinstance(m, dict) and m.get("role") in ("system", "user", "assistant"), f"bad message {str(m)[:80]}"
        roles.append(m["role"])
        if isinstance(m["content"], list):
            for item in m["content"]:
                if item.get("type") == "image" or "image" in item:
                    img = item.get("image") or (images.pop(0) if images else None)
                    assert isinstance(img, str), "image item without a path"
                    img = os.path.join(root, img)
                    assert os.path.isfile(img), f"image not found: {img}"
                    item["image"] = img
        else:
            assert isinstance(m["content"], str), f"content must be a string or a list, got {type(m['content'])}"
    assert "assistant" in roles, "no assistant message (nothing to train on)"
    return messages


def fit(sample, max_len, mode):
    """Apply the overlong policy: the sample, its truncated version, or None (dropped). A cut through
    an image's tokens would orphan its features, so such samples are dropped even when truncating."""
    n = len(sample["input_ids"])
    if n <= max_len:
        return sample
    if mode != "truncate" or sample["image_grid_thw"] is not None:
        return None
    out = dict(sample, input_ids=sample["input_ids"][:max_len], loss_mask=sample["loss_mask"][:max_len])
    return out if out["loss_mask"][1:].any() else None


def load_sample(paths, ref, tokenizer, pixels, max_len, mode):
    fi, pos, line = ref
    try:
        messages = read_messages(paths[fi], pos)
        sample = render_chat(messages, tokenizer, min_pixels=pixels[0], max_pixels=pixels[1])
    except Exception as e:  # untrusted user data: name the file and line, then stop
        raise ValueError(f"{paths[fi]}:{line}: {type(e).__name__}: {e}") from None
    return fit(sample, max_len, mode), len(sample["input_ids"])


def index_key(paths, tokenizer, pixels, max_len, mode):
    """What a sample's rendered length depends on, hashed: the data files' bytes, the tokenizer (its whole
    JSON: vocabulary, merges, special tokens), the chat template, the image pixel bounds and the overlong
    policy. Image files are not hashed (the data file names them): edit an image in place, delete the cache."""
    import hashlib
    from model import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, list(pixels), max_len, mode]).encode())
    return h.hexdigest()


def read_index_cache(cache, paths, tokenizer, pixels, max_len, mode, n, rank, world):
    """(key, table): rank 0 hashes the inputs (index_key) and reads `cache` if its key matches, then
    every rank gets the table (None: render)."""
    key, table = None, None
    if rank == 0:
        key = index_key(paths, tokenizer, pixels, max_len, mode)
        try:
            with open(cache) as f:
                saved = json.load(f)
            if saved["key"] == key and len(saved["table"]) == n:
                table = [tuple(row) for row in saved["table"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: render
    if world > 1:
        box = [table]
        dist.broadcast_object_list(box, src=0)
        table = box[0]
    return key, table


def build_index(paths, tokenizer, pixels, max_len, mode, rank, world, cache=None):
    """Render every sample once (rank r takes samples r, r+W, ...) to learn its length and number of
    target tokens, which packing and the loss denominator need. Any bad sample stops every rank.
    Every rank ends up with the whole index, so every rank knows the packing of every global batch.
    `cache`: a JSON file that keeps the index under index_key's hash, so a restart or resume on the
    same data and tokenizer reads it (seconds) instead of rendering again (hours for millions of traces)."""
    refs = scan_files(paths)
    key, cached = read_index_cache(cache, paths, tokenizer, pixels, max_len, mode, len(refs), rank, world) \
        if cache else (None, None)
    if cached is not None:
        return (refs, *map(list, zip(*cached))) if refs else (refs, [], [], [], [])
    mine, error = {}, None
    for i in range(rank, len(refs), world):
        try:
            s, n_full = load_sample(paths, refs[i], tokenizer, pixels, max_len, mode)
        except ValueError as e:
            error = str(e)
            break
        has_image = s is not None and s["image_grid_thw"] is not None
        mine[i] = (len(s["input_ids"]), int(s["loss_mask"][1:].sum()), n_full, has_image) if s else (0, 0, n_full, False)
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, (mine, error))
    else:
        parts = [(mine, error)]
    errors = sorted(e for _, e in parts if e)
    if errors:
        raise SystemExit(f"bad training data, stopping before training: {errors[0]}")
    table = {k: v for m, _ in parts for k, v in m.items()}
    if cache and rank == 0:  # written whole, then renamed: a killed run leaves no half-written file
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            json.dump({"key": key, "files": paths, "table": [table[i] for i in range(len(refs))]}, f)
        os.replace(cache + ".tmp", cache)
    cols = zip(*(table[i] for i in range(len(refs)))) if refs else ((), (), (), ())
    return (refs, *map(list, cols))  # refs, lengths (0: dropped), target counts, untruncated lengths, has-image flags


def pack(items, max_len):
    """Best-fit packing: each (index, length), in the given order, goes into the open row with the
    least room that still holds it, else a new row. Returns rows as lists of sample indices."""
    rows, free = [], []  # free: sorted (room left, row) of rows that can still take something
    for i, n in items:
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            bisect.insort(free, (room - n, r))
    return rows


def epoch_rows(lengths, max_len, seed, epoch):
    """The packed rows of one epoch: a seeded shuffle of the kept samples, best-fit packed, rows shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = [i for i, n in enumerate(lengths) if n > 0]
    rng.shuffle(order)
    rows = pack([(i, lengths[i]) for i in order], max_len)
    rng.shuffle(rows)
    return rows


def collate(rows, pad_id):
    """Rows of rendered samples -> one micro-batch. input_ids/segment_ids/targets (B, T), T = longest row.
    targets[t] = input_ids[t+1] where that next token is an assistant token of the same sample, else -100
    (prompts, sample ends, pads). Images are concatenated in row order, as the model expects."""
    T = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    pv, grid = [], []
    for b, row in enumerate(rows):
        t = 0
        for j, s in enumerate(row):
            x, m, n = s["input_ids"], s["loss_mask"], len(s["input_ids"])
            ids[b, t:t + n], seg[b, t:t + n] = x, j
            tgt[b, t:t + n - 1] = torch.where(m[1:].bool(), x[1:], -100)
            if s["pixel_values"] is not None:
                pv.append(s["pixel_values"])
                grid.append(s["image_grid_thw"])
            t += n
    return dict(input_ids=ids, segment_ids=seg, targets=tgt,
                pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grid) if grid else None)


def add_dummy_image(batch, config, pad_id):
    """Append a 3-token segment <|vision_start|><|image_pad|><|vision_end|> with a blank 2x2-patch image
    to row 0 of an image-less micro-batch (segment id -2, no targets). Under FSDP the vision tower's
    all-gather is a collective every rank must join in the same order, so every micro-batch on every
    rank runs the tower once, inside the model's forward. The segment is attended to by nothing and
    has no targets, so the loss is unchanged and the tower's gradients are exactly 0."""
    B = batch["input_ids"].shape[0]
    extra = torch.full((B, 3), pad_id, dtype=torch.long)
    extra[0] = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    seg = torch.full((B, 3), -1, dtype=torch.long)
    seg[0] = -2
    v = config.vision
    return dict(input_ids=torch.cat([batch["input_ids"], extra], 1), segment_ids=torch.cat([batch["segment_ids"], seg], 1),
                targets=torch.cat([batch["targets"], torch.full((B, 3), -100)], 1),
                pixel_values=torch.zeros(v.spatial_merge_size ** 2, v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                image_grid_thw=torch.tensor([[1, v.spatial_merge_size, v.spatial_merge_size]]))


def microbatch_loss(model, batch, n_targets_global, device):
    """Sum of -log p over this micro-batch's target tokens / the number of target tokens in the GLOBAL
    batch (all micro-batches, all ranks). Summed over micro-batches and ranks this is exactly the token
    mean of the global batch, however rows are split."""
    b = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    logp = model(b["input_ids"], b["pixel_values"], b["image_grid_thw"], segment_ids=b["segment_ids"],
                 targets=b["targets"])  # (B, T) fp32, 0 where targets < 0
    return -logp.sum() / n_targets_global


def freeze_params(model, prefixes):
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in prefixes))


def make_optimizer(params):
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=learning_rate, betas=(beta1, beta2))


def lr_at(step, total):
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return learning_rate
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -----------------------------------------------------------------------------


def main():
    config = configure(globals(), sys.argv[1:])
    # logp comes back as a view; nothing here modifies it in place, which is what FSDP2 warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in a single process
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from tqdm import tqdm

    # ---- init: torchrun sets RANK/WORLD_SIZE; without it this is one plain process (no FSDP)
    ddp = "RANK" in os.environ
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if ddp:
        from torch.distributed.device_mesh import init_device_mesh
        dist.init_process_group("nccl" if use_cuda else "gloo")
        mesh = init_device_mesh(dev.type, (world,))
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(seed)
    # settings a user types: one line saying what is wrong, not a traceback
    if dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"config error: dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if overlong not in ("drop", "truncate") or lr_schedule not in ("cosine", "constant"):
        raise SystemExit(f"config error: overlong must be drop|truncate ({overlong!r}), lr_schedule cosine|constant ({lr_schedule!r})")
    if batch_size < 1 or micro_batch_size < 1 or batch_size % (micro_batch_size * world):
        raise SystemExit(f"config error: batch_size {batch_size} must be a positive multiple of micro_batch_size "
                         f"{micro_batch_size} x world size {world}")
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise SystemExit(f"init_from={init_from!r} is not a model directory (no config.json): give a local Qwen2.5-VL "
                         "in HF layout (huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR), or build "
                         "a tiny one with python model.py tiny out/tiny")
    # bf16 on a GPU: in fp32 SDPA falls back to its math kernel (flash refuses fp32; memory-efficient refuses GQA)
    compute = dtype if dtype != "auto" else "bfloat16" if use_cuda else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute]
    lock_out_dir(out_dir)  # rank 0: one run per out_dir (a second one exits here, naming the first)
    micro_steps = batch_size // (micro_batch_size * world)  # gradient accumulation steps per rank
    log(json.dumps(config))
    log(f"batch: {world} ranks x {micro_batch_size} rows x {micro_steps} accumulation steps = "
        f"{batch_size} packed rows of <= {max_seq_len} tokens per optimizer step")

    # ---- data: validate and measure every sample up front, so bad input stops the run here
    tokenizer = load_tokenizer(init_from)
    b = image_bounds(init_from, min_pixels, max_pixels)  # rl.py and eval.py resize with the same helper
    pixels = (b["min_pixels"], b["max_pixels"])
    paths = [p.strip() for p in data_path.split(",") if p.strip()]
    t0 = time.time()
    refs, lengths, n_tgt, n_full, has_img = build_index(paths, tokenizer, pixels, max_seq_len, overlong, rank, world,
                                                        cache=os.path.join(out_dir, "length_index.json"))
    n_kept = sum(n > 0 for n in lengths)
    n_trunc = sum(0 < n < f for n, f in zip(lengths, n_full))
    if n_kept == 0:
        raise SystemExit(f"no training samples in {data_path}: {len(refs)} read, all dropped as longer than "
                         f"max_seq_len {max_seq_len}" if refs else f"no training samples in {data_path}: the file is empty")
    rows_per_epoch = [len(epoch_rows(lengths, max_seq_len, seed, e)) for e in range(epochs)]
    total = max_steps or sum(r // batch_size for r in rows_per_epoch)
    if rows_per_epoch[0] < batch_size:
        raise SystemExit(f"the data packs into {rows_per_epoch[0]} rows of {max_seq_len} tokens, fewer than "
                         f"batch_size {batch_size}: lower batch_size or add data")
    # what the data position (epoch, row) means: the packing of every epoch follows from these alone
    packing = data_fingerprint(lengths, max_seq_len, seed)
    log(f"data: {len(refs)} samples read in {time.time() - t0:.1f}s; {len(refs) - n_kept} dropped, {n_trunc} truncated "
        f"(longer than max_seq_len {max_seq_len}, overlong={overlong}); {sum(lengths)} tokens, {sum(n_tgt)} targets")
    log(f"packing: {rows_per_epoch[0]} rows per epoch, {sum(lengths) / (rows_per_epoch[0] * max_seq_len):.1%} of row "
        f"space is real tokens; {rows_per_epoch[0] // batch_size} steps per epoch, {total} steps in all")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- model: fp32 master weights; FSDP2 shards each decoder layer, the vision tower, then the root.
    # Under torchrun the model is built on the meta device and each rank loads only its shard (load_sharded)
    model = meta_model(init_from) if ddp else QwenVL.from_pretrained(init_from, dtype=torch.float32)
    frozen = [p for p in freeze.split(",") if p]
    freeze_params(model, frozen)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained (frozen: {frozen})")
    model.set_gradient_checkpointing(gradient_checkpointing)
    autocast = nullcontext()
    if ddp:
        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model.visual, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        load_sharded(model, init_from, dev)
        for m in model.modules():  # the loss is already a global mean: gradients SUM over ranks, not average
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    else:
        model.to(dev)
        if ptdtype != torch.float32:
            autocast = torch.autocast(dev.type, dtype=ptdtype)
    model.train()
    dummy_vision = ddp and any(has_img)  # see add_dummy_image; text-only data never calls the tower

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)

    # ---- resume
    ckpt_dir = os.path.join(out_dir, "ckpt")
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        for d in os.listdir(ckpt_dir):  # half-written checkpoints of a run that died mid-save
            if d.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    barrier()
    step, epoch, row = 0, 0, 0  # optimizer steps done; data position = (epoch, next unused row of its packing)
    latest = latest_checkpoint(ckpt_dir)
    if latest and not resume:
        raise SystemExit(f"{out_dir} already has a checkpoint ({latest}): pass --resume=True or use another out_dir")
    latest = resumable_checkpoint(ckpt_dir) if resume else None  # checked against its manifest; else an older one
    if latest:
        meta, _ = load_checkpoint(latest, model, optimizer)  # and each rank's RNG, with as many ranks as before
        step, epoch, row = meta["step"], meta["epoch"], meta["row"]
        if meta.get("packing", packing) != packing:  # other samples, lengths, max_seq_len or seed: rows differ
            data_keys = ("data_path", "max_seq_len", "overlong", "seed", "min_pixels", "max_pixels")
            changed = [f"{k} {meta['config'].get(k)!r} -> {config[k]!r}" for k in data_keys if meta["config"].get(k) != config[k]]
            raise SystemExit(f"cannot resume from {latest}: the data packs differently than when it was written "
                             f"({', '.join(changed) or 'the content of the data files changed'}), so epoch {epoch} row {row} "
                             "would be other samples. Resume with the old data and settings, or start a new out_dir.")
        resume_changes(meta["config"], config, refuse={})  # a warning naming every other changed key (LR, batch_size...)
        log(f"resumed from {latest}: step {step}, epoch {epoch}, row {row}")
    elif resume:
        log(f"--resume: no checkpoint in {ckpt_dir} yet, starting from {init_from}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    # keep only the lines up to the checkpoint we resume from (a line's step counts steps done); their losses
    # and grad norms are the history the blow-up check compares with, the same on every rank
    history = [trim_jsonl(metrics_path, step + 1) if master else None]
    if ddp:
        dist.broadcast_object_list(history, src=0)
    losses, norms = [r["loss"] for r in history[0]], [r["grad_norm"] for r in history[0] if r["grad_norm"] > 0]
    if master and wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")

    # ---- train
    def save():
        meta = dict(step=step, epoch=epoch, row=row, config=config, packing=packing)
        return save_checkpoint(ckpt_dir, model, optimizer, meta, keep_last=keep_last,
                               hf=(tokenizer, ptdtype) if export_every_save else None)

    start, saved_at, rows_epoch = step, step if latest else -1, None
    pbar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    while step < total:
        if save_every and step % save_every == 0 and step != saved_at:
            latest, saved_at = save(), step
        if rows_epoch != epoch:
            rows, rows_epoch = epoch_rows(lengths, max_seq_len, seed, epoch), epoch
        if row + batch_size > len(rows):  # the leftover rows of an epoch are not used
            epoch, row = epoch + 1, 0
            continue
        batch_rows = rows[row:row + batch_size]
        n_targets = max(1, sum(n_tgt[i] for r in batch_rows for i in r))  # global loss denominator, same on every rank
        n_tokens = sum(lengths[i] for r in batch_rows for i in r)
        lr = lr_at(step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        mine = batch_rows[rank::world]
        loss_sum = torch.zeros((), device=dev)
        for k in range(micro_steps):
            chunk = mine[k * micro_batch_size:(k + 1) * micro_batch_size]
            batch = collate([[load_sample(paths, refs[i], tokenizer, pixels, max_seq_len, overlong)[0] for i in r]
                             for r in chunk], pad_id)
            if dummy_vision and batch["pixel_values"] is None:
                batch = add_dummy_image(batch, model.config, pad_id)
            with autocast:
                loss = microbatch_loss(model, batch, n_targets, dev)
            loss.backward()
            loss_sum += loss.detach()
        if ddp:
            dist.all_reduce(loss_sum)  # sum of per-rank partial sums = the global token mean
        for p in params:  # a trained tensor that got no gradient (e.g. the vision tower, text-only step)
            if p.grad is None:  # still takes its AdamW step, as it does under FSDP: same update on 1 or N ranks
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # the global L2 norm, before the clip
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP: all-reduced
        loss_val, norm_val = loss_sum.item(), norm.item()
        # NaN/inf, or far above the run's own history: stop before the update, naming the last good checkpoint
        # (a loss spike of 10x, or a grad norm 100x up, is past anything a healthy run does). A grad norm 10x down
        # is a collapse only while the loss is not falling: a model that fits a small, easy set (the demo's 300
        # picture traces) sees its grad norm fall 10x with the loss, and that is convergence
        recent = sorted(losses[-50:])
        falling = bool(recent) and loss_val < recent[len(recent) // 2]
        blow_up("loss", loss_val, losses, step + 1, ckpt_dir, high=blowup_factor)
        blow_up("grad norm", norm_val, norms, step + 1, ckpt_dir, high=blowup_factor ** 2,
                low=0 if falling else blowup_factor)
        if saved_at == step:  # the weights saved at the top of this step gave a normal loss: a good checkpoint
            mark_good(latest)
        losses.append(loss_val)
        if norm_val > 0:  # (a median of 0 would make any later norm a blow-up)
            norms.append(norm_val)
        if grad_clip > 0:  # takes the parameters (it scales their .grad), not the gradients
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, row = step + 1, row + batch_size
        dt = time.time() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        m = dict(step=step, epoch=epoch, loss=loss_val, lr=lr, grad_norm=norm_val, tokens=n_tokens, targets=n_targets,
                 tokens_per_s=n_tokens / dt, fill=n_tokens / (batch_size * max_seq_len), peak_mem_gb=round(peak, 3))
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if wandb_project:
                wandb.log(m, step=step)
        pbar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")
        pbar.update(1)
    pbar.close()

    # ---- teardown: last checkpoint, final export
    if step != saved_at:
        save()
    export_hf(model, tokenizer, os.path.join(out_dir, "hf"), ptdtype)
    log(f"done: {step - start} steps this run, {step} in all; model in {os.path.join(out_dir, 'hf')}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
