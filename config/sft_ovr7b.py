# The OVR cold-start recipe (OVR paper arXiv 2507.05255 §3.3, §4.1) for Qwen2.5-VL-7B-Instruct:
# ~2M language-only R1 traces, 5 epochs, LR 2e-4, batch 640 packed 64k-token rows (~40M tokens/step),
# vision tower frozen. The packing reading of "batch 640" and the schedule details are inferred.
#   torchrun --nproc_per_node=8 sft.py config/sft_ovr7b.py                       (one node)
#   torchrun --nnodes=N --node_rank=$R --nproc_per_node=8 --rdzv_backend=c10d \
#       --rdzv_endpoint=$MASTER:29500 sft.py config/sft_ovr7b.py                  (N nodes, shared file system)
init_from = "checkpoints/Qwen2.5-VL-7B-Instruct"   # a local download of Qwen/Qwen2.5-VL-7B-Instruct
out_dir = "out/sft_ovr7b"
data_path = "data/sft/coldstart.jsonl"   # data/prepare_sft.py output (OVR's data once released, or OpenR1-Math)
max_seq_len = 65536          # 64k packed length [stated]
overlong = "drop"
batch_size = 640             # packed rows per optimizer step, all ranks [stated: 640; packing inferred]
micro_batch_size = 1         # one 64k row per forward per GPU
epochs = 5                   # [stated]
learning_rate = 2e-4         # [stated] "aggressive" and essential per the paper
lr_schedule = "cosine"       # [inferred] "default Qwen2.5 configuration"
warmup_steps = 30            # [inferred] ~3% of ~950 steps
min_lr_ratio = 0.1           # [inferred]
weight_decay = 0.0           # [inferred]
grad_clip = 1.0
freeze = "visual"            # LLM only [stated]
dtype = "bfloat16"           # bf16 compute, fp32 master weights and gradient reduction
gradient_checkpointing = True
save_every = 50              # ~19 checkpoints; each has an hf/ export for evaluating the cold start over time
keep_last = 3
wandb_project = ""
