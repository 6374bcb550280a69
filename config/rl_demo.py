# RL on CPU in a few minutes: the tiny cold-start model from config/sft_demo.py on data/demo's mix of picture
# counts and text questions (list counts, additions), half and half (python data/prepare_demo.py first).
#   python rl.py config/rl_demo.py            (then: python eval.py plot out/demo/rl)
init_from = "out/demo/sft/hf"
out_dir = "out/demo/rl"
data_path = "data/demo/rl_image.jsonl,data/demo/rl_lists.jsonl,data/demo/rl_add.jsonl"  # OVR mixes text and images
data_weights = [0.5, 0.35, 0.15]  # half pictures; metrics.jsonl has source/<file>/... (reward, accuracy, behaviours)
eval_path = "data/demo/eval_rl.jsonl"  # 30 held-out text + 30 image questions, interleaved
template = "{question}"      # the demo's SFT traces have the bare question as the user turn
engine = "torch"
device = "cpu"
dtype = "float32"
gradient_checkpointing = False
prompts_per_step = 16
group_size = 8
length_stages = [(0, 160)]   # tokens; the demo traces are under 100
max_sampling_rounds = 2
reward_workers = 2
micro_batch_tokens = 4096
minibatches = 2              # two optimizer steps per rollout batch
learning_rate = 2e-4         # seen here: 3e-4 let picture accuracy swing between 20% and 70% in one seed of three
min_lr_ratio = 0.1           # cosine decay: late steps stay gentle once the policy is sharp (low entropy)
freeze = "visual"            # the tiny model's vision tower is random, not pretrained: trained at these LRs its
                             # features collapse to a constant; frozen, its random features are informative
warmup_steps = 5
num_steps = 100
save_every = 0
export_every_save = False
eval_every = 20              # the behaviour curves along RL (demo.sh: $OUT/behaviours.png) come from these evals
eval_n = 2
eval_limit = 0
log_rollouts_every = 5
