# RL on CPU in a few minutes: the tiny cold-start model from config/sft_demo.py (mostly text traces, a few
# pictures) gets much better at counting the shapes in data/demo's pictures (python data/prepare_demo.py first).
#   python rl.py config/rl_demo.py            (then: python eval.py plot out/demo/rl)
init_from = "out/demo/sft/hf"
out_dir = "out/demo/rl"
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
minibatches = 2              # two optimizer steps per rollout batch
learning_rate = 3e-4         # seen here: 1e-3 destabilised the policy within ~40 steps, constant 3e-4 after ~85
min_lr_ratio = 0.1           # cosine decay: late steps stay gentle once the policy is sharp (low entropy)
freeze = "visual"            # the tiny model's vision tower is random, not pretrained: trained at these LRs its
                             # features collapse to a constant; frozen, its random features are informative
warmup_steps = 5
num_steps = 100
save_every = 50
export_every_save = False
eval_every = 50
eval_n = 2
eval_limit = 50
log_rollouts_every = 5
