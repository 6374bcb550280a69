"""
Convert a downloaded cold-start dataset of reasoning traces into the messages JSONL that sft.py reads:
one {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line.

    # OpenR1-Math-220k (https://huggingface.co/datasets/open-r1/OpenR1-Math-220k), downloaded with e.g.
    #   huggingface-cli download open-r1/OpenR1-Math-220k --repo-type dataset --local-dir raw/openr1
    python data/prepare_sft.py raw/openr1/data/*.parquet --out data/sft/openr1_math.jsonl
    # any file that already has "messages" (e.g. OVR's cold-start release, if it comes in that layout)
    # or ShareGPT "conversations" ({"from": "human"/"gpt", "value": ...}) is normalised the same way
    python data/prepare_sft.py raw/coldstart.jsonl --out data/sft/coldstart.jsonl

Inputs are parquet (needs `pip install pyarrow`) or JSON lines. Rows are recognised by their columns:
- OpenR1 layout: problem + generations (DeepSeek-R1 traces) with correctness_math_verify /
  is_reasoning_complete flags: keep the verified, complete traces (the first one, or all with --all_traces).
- messages: kept (roles checked, "human"/"gpt" style roles renamed).
- conversations: ShareGPT, converted.
Rows without a usable trace are skipped and counted. No torch import; runs anywhere.
"""

import argparse
import json
import os
import sys

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."  # OpenR1's instruction


def read_rows(path):
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("reading parquet needs pyarrow: pip install pyarrow")
        yield from pq.read_table(path).to_pylist()
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not valid JSON ({e})")


def convert(row, all_traces=False):
    """One input row -> a list of messages lists (empty when the row has no usable trace)."""
    if row.get("generations") and row.get("problem"):  # OpenR1-Math layout
        ok = [True] * len(row["generations"])
        for flag in ("correctness_math_verify", "is_reasoning_complete"):
            if row.get(flag) is not None:
                ok = [a and bool(b) for a, b in zip(ok, row[flag])]
        traces = [g for g, good in zip(row["generations"], ok) if good and g]
        prompt = PROMPT.format(problem=row["problem"].strip())
        return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": t.strip()}]
                for t in (traces if all_traces else traces[:1])]
    turns = row.get("messages")
    if turns is None and row.get("conversations") is not None:  # ShareGPT
        turns = [{"role": t.get("from"), "content": t.get("value")} for t in row["conversations"]]
    if isinstance(turns, str):
        turns = json.loads(turns)
    if not turns:
        return []
    messages = [{"role": ROLES.get(t.get("role")), "content": t.get("content")} for t in turns]
    if any(m["role"] is None or m["content"] is None for m in messages) or messages[-1]["role"] != "assistant":
        return []
    return [messages]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="parquet or JSONL files")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--all_traces", action="store_true", help="OpenR1: keep every verified trace, not just the first")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many output samples (0: all)")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n_rows = n_out = n_skipped = 0
    with open(args.out + ".tmp", "w") as f:
        for path in args.inputs:
            for row in read_rows(path):
                n_rows += 1
                samples = convert(row, args.all_traces)
                n_skipped += not samples
                for messages in samples:
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    n_out += 1
                if args.limit and n_out >= args.limit:
                    break
            if args.limit and n_out >= args.limit:
                break
    os.replace(args.out + ".tmp", args.out)
    print(f"{n_rows} rows -> {n_out} samples in {args.out} ({n_skipped} rows skipped: no verified/complete trace)")


if __name__ == "__main__":
    main()
