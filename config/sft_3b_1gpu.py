# Cold start for Qwen2.5-VL-3B-Instruct on one 80 GB GPU (LLM only), on converted OpenR1-Math traces:
#   python data/prepare_sft.py raw/openr1/data/*.parquet --out data/sft/openr1_math.jsonl
#   torchrun --nproc_per_node=1 sft.py config/sft_3b_1gpu.py
init_from = "checkpoints/Qwen2.5-VL-3B-Instruct"   # a local download of Qwen/Qwen2.5-VL-3B-Instruct
out_dir = "out/sft_3b"
data_path = "data/sft/openr1_math.jsonl"
max_seq_len = 16384
overlong = "drop"
batch_size = 32              # packed rows per step: about 0.5M tokens
micro_batch_size = 1
epochs = 3
learning_rate = 5e-5         # smaller than OVR's 2e-4: the batch is ~80x smaller in tokens
lr_schedule = "cosine"
warmup_steps = 20
min_lr_ratio = 0.1
grad_clip = 1.0
freeze = "visual"            # OVR: LLM only
dtype = "bfloat16"
min_pixels = 56 * 56
max_pixels = 1280 * 28 * 28  # <= 1,280 image tokens per image, as config/rl_3b_1gpu.py
gradient_checkpointing = True
save_every = 100
keep_last = 2
