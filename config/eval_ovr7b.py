# The OVR paper's benchmarks on one GPU with vLLM (python data/prepare_eval.py ... first):
# MATH500, MathVision (full test, 3,040) and its testmini (304; where OVR measured behaviours),
# MathVerse testmini Vision-Only (the paper's column). OVR publishes no decoding settings; these follow
# ORZ (avg@16, T=1.0, top-p 1.0) with a budget that does not cut OVR's 10k+ token traces.
#   python eval.py config/eval_ovr7b.py --model=out/rl_ovr7b
# Quick pass (about 1/16 of the compute): --n=1 --pass_k=1
engine = "vllm"
data_dir = "data/eval"
benchmarks = "math500,mathvision,mathvision_mini,mathverse_vision_only"
template = "ovr"
temperature = 1.0
top_p = 1.0
max_tokens = 32768
n = 16
pass_k = "1,4,16"
batch_size = 512          # vLLM schedules the batch itself; larger batches keep it busy
judge_benchmarks = "mathvision_mini"
