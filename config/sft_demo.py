# Cold-start SFT on CPU in minutes: the tiny random model on the synthetic demo traces.
#   python model.py tiny out/tiny && python data/prepare_demo.py
#   python sft.py config/sft_demo.py        (or: python -m torch.distributed.run --nproc_per_node=2 sft.py config/sft_demo.py)
init_from = "out/tiny"
out_dir = "out/sft_demo"
data_path = "data/demo/sft.jsonl"
max_seq_len = 1024
batch_size = 8
micro_batch_size = 1
epochs = 3
learning_rate = 1e-3         # a random tiny model needs a large LR to learn anything in minutes
lr_schedule = "cosine"
warmup_steps = 5
min_lr_ratio = 0.1
save_every = 20
keep_last = 1
dtype = "float32"
device = "cpu"
freeze = "visual"
