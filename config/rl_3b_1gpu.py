# GRPO on one 80 GB GPU: Qwen2.5-VL-3B (after its cold start), vLLM colocated with the trainer (it sleeps
# while the trainer runs), DAPO's dynamic sampling, clip-higher and overlong masking, shorter responses.
#   python rl.py config/rl_3b_1gpu.py          (resume: add --resume=True)
init_from = "out/sft_3b/hf"
out_dir = "out/rl_3b"
data_path = "data/rl/train.jsonl"
eval_path = "data/eval/mathvision_mini.jsonl"
template = "ovr"
engine = "vllm"
# vLLM's budget on one 80 GB GPU (79.6 GiB): between steps the trainer keeps its fp32 weights and AdamW's two
# moments, 3.75e9 params x 12 B = 41.9 GiB (gradients are freed after the step), plus ~2 GiB of CUDA context
# and ~4 GiB of headroom -> 0.4 x 79.6 = 31.8 GiB for vLLM, which sleeps while the trainer runs: 7 GiB of bf16
# weights, ~3 GiB of activations and CUDA graphs, ~22 GiB of KV cache = 630k tokens at 36 KiB/token (36 layers
# x K,V x 2 kv heads x 128 x 2 B).
engine_kwargs = {"gpu_memory_utilization": 0.4, "max_model_len": 8192 + 4096}  # longest response + prompt
min_pixels = 56 * 56
max_pixels = 1280 * 28 * 28  # <= 1,280 image tokens per image, so a prompt fits in the 4,096 tokens above
prompts_per_step = 64
group_size = 8
length_stages = [(0, 4096), (150, 8192)]
overlong = "mask"
dynamic_sampling = True
max_sampling_rounds = 3
eps_low = 0.2
eps_high = 0.28
tis_cap = 2.0                # truncated importance sampling for vLLM-vs-trainer numerics (Yao et al. 2025: C = 2)
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
