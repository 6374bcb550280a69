# The OVR multimodal RL recipe (OVR paper arXiv 2507.05255 §3.2, §4.1) on one node of 8 GPUs, with GRPO in place
# of OVR's PPO + critic. 512 prompts x 16 samples, temperature 1.0, LR 1e-6 constant after 50 warm-up steps,
# no KL, clip 0.2, binary reward, 0 for truncated responses, response cap 24k -> 32k (step 300) -> 48k (step 700).
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_ovr7b.py --resume=True
init_from = "out/sft_ovr7b/hf"
out_dir = "out/rl_ovr7b"
data_path = "data/rl/train.jsonl"          # data/prepare_rl.py, then data/filter_difficulty.py
eval_path = "data/eval/mathvision_mini.jsonl"
template = "ovr"
engine = "vllm"
engine_kwargs = {"gpu_memory_utilization": 0.5, "max_model_len": 49152 + 4096}  # longest response + prompt
prompts_per_step = 512
group_size = 16
temperature = 1.0
top_p = 1.0
length_stages = [(0, 24576), (300, 32768), (700, 49152)]
overlong = "zero"            # ORZ's reward: 0 unless the response stopped by itself; trained on
dynamic_sampling = False     # OVR's PPO had none; True is DAPO's improvement for GRPO
format_weight = 0.0
reward_workers = 8
scale_by_std = True
eps_low = 0.2
eps_high = 0.2
ppo_epochs = 1               # strictly on-policy: one optimizer step per rollout batch
minibatches = 1
kl_coef = 0.0
tis_cap = 0.0
micro_batch_tokens = 65536
dtype = "bfloat16"
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
