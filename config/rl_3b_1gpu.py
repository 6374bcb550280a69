# GRPO on one 80 GB GPU: Qwen2.5-VL-3B (after its cold start), vLLM colocated with the trainer (it sleeps
# while the trainer runs), DAPO's dynamic sampling, clip-higher and overlong masking, shorter responses.
#   python rl.py config/rl_3b_1gpu.py          (resume: add --resume=True)
init_from = "out/sft_3b/hf"
out_dir = "out/rl_3b"
data_path = "data/rl/train.jsonl"
eval_path = "data/eval/mathvision_mini.jsonl"
template = "ovr"
engine = "vllm"
engine_kwargs = {"gpu_memory_utilization": 0.3, "max_model_len": 8192 + 4096}  # the trainer's fp32 state stays resident
prompts_per_step = 64
group_size = 8
length_stages = [(0, 4096), (150, 8192)]
overlong = "mask"
dynamic_sampling = True
max_sampling_rounds = 3
eps_low = 0.2
eps_high = 0.28
micro_batch_tokens = 16384
dtype = "bfloat16"
gradient_checkpointing = True
learning_rate = 1e-6
warmup_steps = 10
num_steps = 300
save_every = 25
eval_every = 25
eval_n = 2
eval_limit = 304
