# Cold-start SFT on CPU in minutes: the tiny random model on the synthetic demo traces.
#   (bash demo.sh runs it; by hand: python data/prepare_demo.py && python model.py tiny out/demo/base ...)
#   python sft.py config/sft_demo.py        (or: python -m torch.distributed.run --nproc_per_node=2 sft.py config/sft_demo.py)
init_from = "out/demo/base"
out_dir = "out/demo/sft"
data_path = "data/demo/sft.jsonl"
max_seq_len = 1024
batch_size = 4               # packed rows of 1024 tokens per step: small steps, many of them
micro_batch_size = 1
epochs = 3                   # 3 x 78 steps of 4 packed rows (234 in all)
learning_rate = 3e-3         # a random tiny model needs a large LR to learn anything in minutes
lr_schedule = "cosine"
warmup_steps = 10
min_lr_ratio = 0.1
save_every = 20
keep_last = 1
dtype = "float32"
device = "cpu"
freeze = "visual"
