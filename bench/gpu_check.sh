#!/usr/bin/env bash
# The vLLM checks that need a GPU, in one command and a few minutes (run it where the GPU stack of README's
# "The pinned stack" is installed):
#   bash bench/gpu_check.sh
# 1. tests/test_vllm.py with the GPU-only test included: pixels, greedy, weight sync, sleep levels 1 and 2
#    (the synced weights survive level 1; level 2 needs a sync before generating), bf16 gap < 0.1.
# 2. the bf16 logprob gap (vLLM bf16 vs model.py bf16 and fp32) and sleep/wake/sync times, printed.
# 3. rollout throughput: torch engine vs transformers generate vs vLLM, bf16 (bench/bench_rollout.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
python -m pytest -q tests/test_vllm.py -m "gpu or not slow" -p no:cacheprovider

python - <<'PY'
import os, sys, time, tempfile
sys.path.insert(0, "tests")
import torch
import model as M
from rollout import VLLMEngine, logprob_gap
from test_rollout import PROMPTS, perturb, trainer_logprobs
path = M.build_tiny(tempfile.mkdtemp(), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, vision_hidden_size=128, vision_num_heads=2, vision_intermediate_size=256)
perturb(M.QwenVL.from_pretrained(path), 0.1, seed=0).save_pretrained(path)
tok = M.load_tokenizer(path)
bf16 = M.QwenVL.from_pretrained(path, device="cuda", dtype=torch.bfloat16).eval()
fp32 = M.QwenVL.from_pretrained(path, device="cuda", dtype=torch.float32).eval()
eng = VLLMEngine(bf16, tok, path, gpu_memory_utilization=0.2, max_model_len=2048)
out = eng.generate(PROMPTS, n=8, temperature=1.0, max_tokens=64, seed=0)
with torch.no_grad():
    for name, m in [("model.py bf16", bf16), ("model.py fp32", fp32)]:
        gaps = [logprob_gap(g, [trainer_logprobs(m, tok, p, c, 1.0).float().cpu() for c in g]) for p, g in zip(PROMPTS, out)]
        print(f"vLLM bf16 vs {name}: mean |logp gap| per prompt " + ", ".join(f"{x:.4f}" for x in gaps))
for level in (1, 2):
    eng.sleep_level = level
    t = time.perf_counter(); eng.sleep(); t_sleep = time.perf_counter() - t
    t = time.perf_counter(); eng.sync_weights(bf16); t_sync = time.perf_counter() - t
    t = time.perf_counter(); eng.wake_up(); t_wake = time.perf_counter() - t
    print(f"sleep level {level}: sleep {t_sleep:.3f} s, wake weights + sync {t_sync:.3f} s, wake KV {t_wake:.3f} s")
PY

python bench/bench_rollout.py --device=cuda --shapes=100m,3b --dtype=bfloat16 --vllm=1 --min_time=5
