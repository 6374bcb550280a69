#!/usr/bin/env bash
# The whole OVR pipeline on a CPU in minutes, on a tiny random Qwen2.5-VL and synthetic data:
#   1. data        data/prepare_demo.py: text reasoning traces, image counting questions, held-out sets
#   2. base model  model.py tiny: a ~1M-parameter random Qwen2.5-VL + byte-level BPE tokenizer, offline
#   3. cold start  sft.py: SFT of the LLM (vision tower frozen) on text traces plus a few pictures (README)
#   4. RL          rl.py: GRPO on image questions with a binary \boxed{} reward
#   5. eval        eval.py on held-out text and image questions after each stage, and the RL curves
# The last line is machine-readable:  demo: text_acc base=A sft=B | image_acc sft=C rl=D
#
#   bash demo.sh                 # everything, into out/demo/
#   OUT=out/demo2 SEED=1 bash demo.sh
#   SFT_ARGS="--epochs=1" RL_ARGS="--num_steps=10" bash demo.sh     # a quick smoke run (what the slow test does)
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-out/demo}
SEED=${SEED:-0}
DATA=${DATA:-data/demo}
SFT_ARGS=${SFT_ARGS:-}
RL_ARGS=${RL_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "1/6 synthetic data -> $DATA"
python data/prepare_demo.py --out="$DATA" --seed="$SEED"

step "2/6 tiny random Qwen2.5-VL -> $OUT/base"
rm -rf "$OUT"
python model.py tiny "$OUT/base" --seed="$SEED" --hidden_size=128 --intermediate_size=384 --num_hidden_layers=4 \
    --num_attention_heads=4 --num_key_value_heads=2

step "3/6 eval of the untrained model"
python eval.py config/eval_demo.py --model="$OUT/base" --out_dir="$OUT/eval_base" --data_dir="$DATA" $EVAL_ARGS

step "4/6 cold start: SFT on text traces (+ a few pictures) -> $OUT/sft"
python sft.py config/sft_demo.py --init_from="$OUT/base" --out_dir="$OUT/sft" --data_path="$DATA/sft.jsonl" \
    --seed="$SEED" $SFT_ARGS
python eval.py config/eval_demo.py --model="$OUT/sft/hf" --out_dir="$OUT/eval_sft" --data_dir="$DATA" $EVAL_ARGS

step "5/6 multimodal RL -> $OUT/rl"
python rl.py config/rl_demo.py --init_from="$OUT/sft/hf" --out_dir="$OUT/rl" --data_path="$DATA/rl.jsonl" \
    --eval_path="$DATA/eval_image.jsonl" --seed="$SEED" $RL_ARGS
python eval.py config/eval_demo.py --model="$OUT/rl/hf" --out_dir="$OUT/eval_rl" --data_dir="$DATA" $EVAL_ARGS

step "6/6 report"
python eval.py table "$OUT/eval_base" "$OUT/eval_sft" "$OUT/eval_rl" | tee "$OUT/table.md"
python eval.py plot "$OUT/rl"
echo "wall time: $(( $(date +%s) - start )) s; curves: $OUT/rl/curves.png; table: $OUT/table.md"
python - "$OUT" <<'EOF'
import json, sys
acc = lambda run, bench: json.load(open(f"{sys.argv[1]}/eval_{run}/summary.json"))["benchmarks"][bench]["accuracy"]
print(f"demo: text_acc base={acc('base', 'eval_text'):.3f} sft={acc('sft', 'eval_text'):.3f} | "
      f"image_acc sft={acc('sft', 'eval_image'):.3f} rl={acc('rl', 'eval_image'):.3f}")
EOF
