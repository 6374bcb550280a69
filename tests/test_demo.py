"""demo.sh end to end, shortened: the cold start must beat the untrained model on held-out text questions,
and RL must beat the cold start on held-out image questions."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_shortened_learns_in_the_right_direction(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"),
               SFT_ARGS="--epochs=3", RL_ARGS="--num_steps=60 --eval_every=0", EVAL_ARGS="--limit=100")
    proc = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: text_acc base=([\d.]+) sft=([\d.]+) \| image_acc sft=([\d.]+) rl=([\d.]+)", last)
    assert m, f"unexpected last line: {last!r}"
    base, sft, img_sft, img_rl = map(float, m.groups())
    assert all(0.0 <= a <= 1.0 for a in (base, sft, img_sft, img_rl))
    assert sft > base + 0.2, last       # the cold start teaches the format and the text skill
    assert img_rl > img_sft + 0.05, last  # RL improves held-out image accuracy even when shortened
    assert os.path.exists(tmp_path / "out" / "rl" / "curves.png")
