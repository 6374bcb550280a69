# Evaluate the demo checkpoints on CPU in a minute or two: 8 MATH500 problems and 8 drawn counting
# images (python data/prepare_eval.py demo). The tiny model scores ~0; this checks the plumbing.
#   python eval.py config/eval_demo.py --model=out/sft_demo
engine = "torch"
device = "cpu"
dtype = "float32"
data_dir = "data/demo/eval"
benchmarks = "math500,dots"
max_tokens = 64
n = 2
pass_k = "1,2"
batch_size = 8
