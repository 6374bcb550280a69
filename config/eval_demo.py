# Evaluate the demo checkpoints on CPU in well under a minute: 200 held-out text and 200 held-out image
# questions from data/prepare_demo.py, 2 samples each.
#   python eval.py config/eval_demo.py --model=out/demo/sft/hf --out_dir=out/demo/eval_sft   (bash demo.sh runs it)
engine = "torch"
device = "cpu"
dtype = "float32"
data_dir = "data/demo"
benchmarks = "eval_text,eval_image"
limit = 0                 # all 200 held-out questions of each set
template = "{question}"   # the demo's SFT traces (data/prepare_demo.py) have the bare question as the user turn
max_tokens = 160          # the demo traces are under 130 tokens
n = 2
pass_k = "1,2"
batch_size = 25
judge_benchmarks = "eval_image"
