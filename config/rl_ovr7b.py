# The OVR multimodal RL recipe (Wei et al. 2025, "Open Vision Reasoner", arXiv 2507.05255, sec. 4.1 and App. B)
# on one node of 8 GPUs. It is GRPO, not what OVR ran: OVR trained PPO with a critic (GAE, gamma = lambda = 1)
# and normalised the advantages over the batch; here the baseline is the group mean and the advantages are
# whitened over the batch the same way (adv_norm="batch"), with no critic. 512 prompts x 16 samples,
# temperature 1.0, LR 1e-6 constant after 50 warm-up steps, no KL, clip 0.2, binary reward, 0 for truncated
# responses, response cap 24k -> 32k (step 300) -> 48k (step 700). Cost on paper: README, "What the 7B recipe costs".
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py --resume=True
init_from = "out/sft_ovr7b/hf"
out_dir = "out/rl_ovr7b"
# OVR trains RL on ~300k text and image prompts from 20+ sets (paper §3.3) and publishes no mixing ratio: half
# ORZ's text problems, half the converted multimodal sets, each run through data/filter_difficulty.py first
data_path = "data/rl/orz_57k_f.jsonl,data/rl/multimodal_f.jsonl"
data_weights = [0.5, 0.5]
eval_path = "data/eval/mathvision_mini.jsonl"
template = "ovr"
engine = "vllm"
# vLLM's budget per 80 GB H100 (79.6 GiB). vLLM sleeps while the trainer runs (its weights to CPU, its KV cache
# freed), so it can take what the trainer keeps between steps: fp32 weights and AdamW's two moments, sharded
# 8 ways, 8.29e9 params x 12 B / 8 = 11.6 GiB (gradients are freed after the step), plus ~2 GiB of CUDA context
# and NCCL buffers and ~4 GiB of headroom -> 0.78 x 79.6 = 62 GiB for vLLM: 15.4 GiB of bf16 weights, ~4 GiB
# of activations and CUDA graphs, ~42 GiB of KV cache = 790k tokens at 56 KiB/token (28 layers x K,V x 4 kv
# heads x 128 x 2 B): ~70 running sequences at 11k tokens, 12 at the 66k maximum.
# max_model_len: the longest response, one image of max_pixels (16,384 tokens) and 1,024 tokens of text.
engine_kwargs = {"gpu_memory_utilization": 0.78, "max_model_len": 49152 + 16384 + 1024}
min_pixels = 56 * 56          # the official preprocessor_config.json of Qwen2.5-VL-7B-Instruct:
max_pixels = 16384 * 28 * 28  # up to 16,384 image tokens per image (one per 28x28 pixels)
prompts_per_step = 512
group_size = 16
temperature = 1.0
top_p = 1.0
length_stages = [(0, 24576), (300, 32768), (700, 49152)]
overlong = "zero"            # ORZ's reward: 0 unless the response stopped by itself; trained on
dynamic_sampling = False     # OVR's PPO had none; True is DAPO's improvement for GRPO
format_weight = 0.0
reward_workers = 8
adv_norm = "batch"           # closest to OVR's PPO: advantages whitened over the whole batch (ORZ's code); a group
                             # with equal rewards is kept (no dynamic sampling) and gets -mean/std, not 0
loss_norm = "token"
eps_low = 0.2
eps_high = 0.2
ppo_epochs = 1               # strictly on-policy: one optimizer step per rollout batch
minibatches = 1
kl_coef = 0.0
tis_cap = 2.0                # truncated importance sampling for vLLM-vs-trainer numerics (Yao et al. 2025: C = 2)
micro_batch_tokens = 65536
dtype = "bfloat16"           # compute; weights, gradients and AdamW state stay fp32
gradient_checkpointing = True
learning_rate = 1e-6
warmup_steps = 50
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
num_steps = 1000
save_every = 50
eval_every = 50
eval_n = 4
log_rollouts_every = 10
