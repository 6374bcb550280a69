"""
Convert a downloaded cold-start dataset of reasoning traces into the messages JSONL that sft.py reads:
one {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line.

    # OpenR1-Math-220k (https://huggingface.co/datasets/open-r1/OpenR1-Math-220k), downloaded with e.g.
    #   huggingface-cli download open-r1/OpenR1-Math-220k --repo-type dataset --local-dir raw/openr1
    python data/prepare_sft.py raw/openr1/data/*.parquet --out data/sft/openr1_math.jsonl
    # any file that already has "messages" (e.g. OVR's cold-start release, if it comes in that layout)
    # or ShareGPT "conversations" ({"from": "human"/"gpt", "value": ...}) is normalised the same way
    python data/prepare_sft.py raw/coldstart.jsonl --out data/sft/coldstart.jsonl

Inputs are parquet (needs `pip install pyarrow`; read one row group at a time, so a 500 MB shard is never
in memory whole) or JSON lines. Rows are recognised by their columns:
- OpenR1 layout: problem + generations (DeepSeek-R1 traces) with per-trace flags correctness_math_verify,
  correctness_llama and is_reasoning_complete: keep the complete traces that Math-Verify checked against the
  reference answer (the first one, or all with --all_traces). Rows whose only correct traces were judged by
  the Llama-3.3-70B-Instruct judge are skipped and counted as "llama_only" (OpenR1-Math-220k's card and
  release post: the judge recovered correct examples a rule-based parser could not verify, e.g. malformed
  answers). This project's reward and eval use a rule-based verifier; a trace it cannot confirm teaches a
  final-answer form it cannot read. The manifest's llama_only count is that share of your download.
- messages: kept (roles checked, "human"/"gpt" style roles renamed).
- conversations: ShareGPT, converted.
Rows without a usable trace are skipped and counted by reason in OUT.manifest.json. No torch import.
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
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):  # one row group at a time (OpenR1's shards are ~500 MB)
            yield from f.read_row_group(g).to_pylist()
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not valid JSON ({e})")


def convert(row, all_traces=False):
    """One input row -> (a list of messages lists, why it is empty or None)."""
    if row.get("generations") and row.get("problem"):  # OpenR1-Math layout
        n = len(row["generations"])
        flag = lambda k: [bool(x) for x in row[k]] if row.get(k) is not None else [False] * n  # noqa: E731
        done = flag("is_reasoning_complete") if row.get("is_reasoning_complete") is not None else [True] * n
        verified, judged = flag("correctness_math_verify"), flag("correctness_llama")
        traces = [g for g, d, v in zip(row["generations"], done, verified) if d and v and g]
        if not traces:
            llama_only = any(d and j and g for g, d, j in zip(row["generations"], done, judged))
            return [], "llama_only" if llama_only else "no verified complete trace"
        prompt = PROMPT.format(problem=row["problem"].strip())
        return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": t.strip()}]
                for t in (traces if all_traces else traces[:1])], None
    turns = row.get("messages")
    if turns is None and row.get("conversations") is not None:  # ShareGPT
        turns = [{"role": t.get("from"), "content": t.get("value")} for t in row["conversations"]]
    if isinstance(turns, str):
        turns = json.loads(turns)
    if not turns:
        return [], "no messages, conversations or OpenR1 columns"
    messages = [{"role": ROLES.get(t.get("role")), "content": t.get("content")} for t in turns]
    if any(m["role"] is None or m["content"] is None for m in messages) or messages[-1]["role"] != "assistant":
        return [], "unknown role, empty turn, or no final assistant turn"
    return [messages], None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="parquet or JSONL files")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--all_traces", action="store_true", help="OpenR1: keep every verified trace, not just the first")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many output samples (0: all)")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n_rows = n_out = 0
    skipped = {}
    with open(args.out + ".tmp", "w") as f:
        for path in args.inputs:
            for row in read_rows(path):
                n_rows += 1
                samples, why = convert(row, args.all_traces)
                if why:
                    skipped[why] = skipped.get(why, 0) + 1
                for messages in samples:
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    n_out += 1
                if args.limit and n_out >= args.limit:
                    break
            if args.limit and n_out >= args.limit:
                break
    os.replace(args.out + ".tmp", args.out)
    with open(args.out + ".manifest.json", "w") as f:
        json.dump({"inputs": [os.path.abspath(p) for p in args.inputs], "output": os.path.abspath(args.out),
                   "rows": n_rows, "samples": n_out, "dropped": skipped}, f, indent=1)
    print(f"{n_rows} rows -> {n_out} samples in {args.out} ({sum(skipped.values())} rows skipped: {skipped})")


if __name__ == "__main__":
    main()
