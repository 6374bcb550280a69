# Evaluate the demo checkpoints on CPU in a minute or two: 50 held-out text and 50 held-out image
# questions from data/prepare_demo.py, 2 samples each.
#   python eval.py config/eval_demo.py --model=out/sft_demo     (then --model=out/rl_demo, and
#   python eval.py table out/eval_sft_demo out/eval_rl_demo)
engine = "torch"
device = "cpu"
dtype = "float32"
data_dir = "data/demo"
benchmarks = "eval_text,eval_image"
limit = 50
template = "{question}"   # the demo's SFT traces (data/prepare_demo.py) have the bare question as the user turn
max_tokens = 160          # the demo traces are under 130 tokens
n = 2
pass_k = "1,2"
batch_size = 25
judge_benchmarks = "eval_image"
