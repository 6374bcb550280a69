# RL on CPU in a few minutes: the tiny cold-start model from config/sft_demo.py learns to count the shapes
# in data/demo's pictures (python data/prepare_demo.py first), a skill its text-only SFT never saw.
#   python rl.py config/rl_demo.py            (then: python eval.py plot out/rl_demo)
init_from = "out/sft_demo/hf"
out_dir = "out/rl_demo"
data_path = "data/demo/rl.jsonl"
eval_path = "data/demo/eval_image.jsonl"
template = "{question}"      # the demo's SFT traces have the bare question as the user turn
engine = "torch"
device = "cpu"
dtype = "float32"
gradient_checkpointing = False
prompts_per_step = 16
group_size = 8
length_stages = [(0, 128), (40, 160)]  # tokens; the demo traces are under 130 (a curriculum in miniature)
max_sampling_rounds = 2
reward_workers = 2
micro_batch_tokens = 4096
learning_rate = 3e-4
warmup_steps = 5
num_steps = 60
save_every = 20
export_every_save = False
eval_every = 20
eval_n = 2
eval_limit = 50
log_rollouts_every = 5
