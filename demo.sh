#!/usr/bin/env bash
# The whole OVR pipeline on a CPU in minutes, on a tiny random Qwen2.5-VL and synthetic data:
#   1. data        data/prepare_demo.py: text reasoning traces, image counting questions, held-out sets
#   2. base model  model.py tiny: a ~1M-parameter random Qwen2.5-VL + byte-level BPE tokenizer, offline
#   3. cold start  sft.py: SFT of the LLM (vision tower frozen) on text traces plus a few pictures (README)
#   4. RL          rl.py: GRPO on a mix of text and image questions with a binary \boxed{} reward
#   5. eval        eval.py on held-out text and image questions after each stage, the RL curves, and the
#                  behaviour rates at base, after the cold start and along RL ($OUT/behaviours.png)
# The last two lines are machine-readable:
#   behaviours: {JSON: behaviour rates and accuracies per stage, keys explained in README "Quickstart"}
#   demo: text_acc base=A sft=B | image_acc sft=C rl=D
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
python rl.py config/rl_demo.py --init_from="$OUT/sft/hf" --out_dir="$OUT/rl" \
    --data_path="$DATA/rl_image.jsonl,$DATA/rl_lists.jsonl,$DATA/rl_add.jsonl" --eval_path="$DATA/eval_rl.jsonl" \
    --seed="$SEED" $RL_ARGS
python eval.py config/eval_demo.py --model="$OUT/rl/hf" --out_dir="$OUT/eval_rl" --data_dir="$DATA" $EVAL_ARGS

step "6/6 report"
python eval.py table "$OUT/eval_base" "$OUT/eval_sft" "$OUT/eval_rl" | tee "$OUT/table.md"
python eval.py plot "$OUT/rl"
echo "wall time: $(( $(date +%s) - start )) s; curves: $OUT/rl/curves.png; behaviours: $OUT/behaviours.png; table: $OUT/table.md"
python - "$OUT" <<'EOF'
import json, sys
import eval as ev
out = sys.argv[1]
acc = lambda run, bench: json.load(open(f"{out}/eval_{run}/summary.json"))["benchmarks"][bench]["accuracy"]
has = lambda r, b: r["behaviours"][b] > 0
share = lambda rs, b: round(sum(has(r, b) for r in rs) / max(len(rs), 1), 3)
mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None
# Held-out answers after each stage. look_again: the recount "Let me look at the picture again and count them one by
# one" (visual reflection): text traces teach it on lists pictured in mind, no picture trace has it, so on pictures
# it is transfer. read_again: "First, let me read the question again." (subgoal setting), a phrase without utility.
res = {}
for run in ("base", "sft", "rl"):
    text, image = (ev.read_jsonl(f"{out}/eval_{run}/eval_{b}.jsonl") for b in ("text", "image"))
    lists = [r for r in text if r["subject"] == "counting"]
    res[run] = {"text_acc": round(acc(run, "eval_text"), 3), "image_acc": round(acc(run, "eval_image"), 3)}
    for name, rs in (("text", lists), ("image", image)):
        res[run] |= {f"{name}_look_again": share(rs, "visual_reflection"),
                     f"{name}_acc_look_again": mean([r["correct"] for r in rs if has(r, "visual_reflection")]),
                     f"{name}_acc_no_look": mean([r["correct"] for r in rs if not has(r, "visual_reflection")])}
    res[run]["text_read_again"] = share(text, "subgoal_setting")
# The figure: held-out rates per stage; then the same behaviours on RL's own samples per source, 5-step means.
stages = [(i, label, {"lists: look again": res[run]["text_look_again"],
                      "pictures: look again": res[run]["image_look_again"],
                      "text: read again (no utility)": res[run]["text_read_again"],
                      "transfer (pictures / lists)": res[run]["image_look_again"] / res[run]["text_look_again"]
                      if res[run]["text_look_again"] else None})
          for i, (run, label) in enumerate((("base", "base"), ("sft", "cold start"), ("rl", "after RL")))]
curves = {"lists: look again": "rl_lists/behaviour/visual_reflection",
          "pictures: look again": "rl_image/behaviour/visual_reflection",
          "lists: read again (no utility)": "rl_lists/behaviour/subgoal_setting",
          "lists": "rl_lists/accuracy", "additions": "rl_add/accuracy", "pictures": "rl_image/accuracy"}
m = list({r["step"]: r for r in ev.read_jsonl(f"{out}/rl/metrics.jsonl") if "reward_mean" in r}.values())
along = [(r["step"], None, {}) for r in m]
for label, key in curves.items():
    for i, (_, _, point) in enumerate(along):
        window = [r.get(f"source/{key}") for r in m[max(i - 4, 0):i + 1]]
        point[label] = mean([v for v in window if v is not None])
ev.plot_behaviours([("held-out answers", "stage", stages, list(stages[0][2])),
                    ("RL samples: behaviours", "RL step", along, list(curves)[:3]),
                    ("RL samples: accuracy", "RL step", along, list(curves)[3:])], f"{out}/behaviours.png")
print("behaviours:", json.dumps(res, separators=(",", ":")))
print(f"demo: text_acc base={acc('base', 'eval_text'):.3f} sft={acc('sft', 'eval_text'):.3f} | "
      f"image_acc sft={acc('sft', 'eval_image'):.3f} rl={acc('rl', 'eval_image'):.3f}")
EOF
