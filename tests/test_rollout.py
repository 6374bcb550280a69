"""rollout.py: the torch engine against full forwards and model.py's training log-probs (CPU).
The vLLM engine's tests are in test_vllm.py."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
from rollout import TorchEngine, hf_weights, sample_tokens


def perturb(model, scale, seed):
    # a freshly initialised model has near-uniform next-token distributions; noise makes them peaked,
    # so greedy paths, EOS and the sampling tests mean something
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = M.load_tokenizer(tiny_model_dir)
    return perturb(M.QwenVL.from_pretrained(tiny_model_dir).eval(), 0.1, seed=0), tok


def image(seed, size=(84, 56)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": [{"type": "image", "image": image(0)}, {"type": "text", "text": "How many circles?"}]}],
    [{"role": "system", "content": "Think first."}, {"role": "user", "content": "Count the red squares, then answer."}],
]


def full_forward_greedy(model, tok, messages, max_tokens, eos):
    """Reference: no KV cache, the whole sequence through the model at every step."""
    r = M.render_chat(messages, tok, add_generation_prompt=True)
    ids, out = r["input_ids"][None], []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = model(ids, r["pixel_values"], r["image_grid_thw"])[0, -1].argmax().item()
            out.append(nxt)
            if nxt in eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def trainer_logprobs(model, tok, messages, completion, temperature):
    """model.py's training path: one forward over prompt + completion with targets."""
    r = M.render_chat(messages, tok, add_generation_prompt=True)
    ids = torch.cat([r["input_ids"], torch.tensor(completion.token_ids, dtype=torch.long)])[None]
    targets = torch.full_like(ids, -100)
    targets[0, :-1] = ids[0, 1:]
    targets[0, :len(r["input_ids"]) - 1] = -100  # only the completion's tokens
    with torch.no_grad():
        lp = model(ids, r["pixel_values"], r["image_grid_thw"], targets=targets, temperature=temperature)
    return lp[0, len(r["input_ids"]) - 1:-1]


def test_greedy_equals_full_forward_argmax(tiny):
    model, tok = tiny
    eng = TorchEngine(model, tok)
    out = eng.generate(PROMPTS, n=2, temperature=0.0, max_tokens=12)
    for messages, group in zip(PROMPTS, out):
        ref = full_forward_greedy(model, tok, messages, 12, eng.eos_ids)
        assert [c.token_ids for c in group] == [ref, ref]
        assert group[0].finish_reason == ("stop" if ref[-1] in eng.eos_ids else "length")


def test_logprobs_equal_training_logprobs(tiny):
    model, tok = tiny
    out = TorchEngine(model, tok).generate(PROMPTS, n=2, temperature=0.7, top_p=0.9, max_tokens=10, seed=1)
    for messages, group in zip(PROMPTS, out):
        for c in group:
            ref = trainer_logprobs(model, tok, messages, c, temperature=0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_seeded_and_independent_of_batching(tiny):
    model, tok = tiny
    a = TorchEngine(model, tok).generate(PROMPTS, n=3, max_tokens=8, seed=7)
    b = TorchEngine(model, tok, max_batch_tokens=1).generate(PROMPTS, n=3, max_tokens=8, seed=7)  # a chunk per prompt
    c = TorchEngine(model, tok).generate(PROMPTS, n=3, max_tokens=8, seed=8)
    ids = lambda out: [[x.token_ids for x in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_samples_of_one_prompt_differ(tiny):
    model, tok = tiny
    group = TorchEngine(model, tok).generate(PROMPTS[:1], n=4, temperature=1.0, max_tokens=8)[0]
    assert len({tuple(c.token_ids) for c in group}) == 4


def test_stop_string_cuts_the_completion(tiny):
    model, tok = tiny
    eng = TorchEngine(model, tok)
    free = eng.generate(PROMPTS[:1], temperature=1.0, max_tokens=24, seed=3)[0][0]
    text = free.text
    assert len(text) > 8, "pick another seed: the free-running sample is too short for this test"
    stop = text[4:6]
    cut = eng.generate(PROMPTS[:1], temperature=1.0, max_tokens=24, seed=3, stop=[stop])[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop) + len(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert len(cut.logprobs) == len(cut.token_ids)


def test_eos_ends_rows_while_the_others_go_on(tiny):
    # Make a token that shows up mid-way an end token: the rows that sample it stop there (token kept,
    # reason "stop") and are dropped from the batch, and every other row samples exactly as before.
    model, tok = tiny
    eng = TorchEngine(model, tok)
    free = eng.generate(PROMPTS, n=2, temperature=1.0, max_tokens=12, seed=5)
    end = free[0][0].token_ids[3]
    eng.eos_ids = [end]
    out = eng.generate(PROMPTS, n=2, temperature=1.0, max_tokens=12, seed=5)
    stopped = 0
    for g_free, g in zip(free, out):
        for f, c in zip(g_free, g):
            k = f.token_ids.index(end) + 1 if end in f.token_ids else len(f.token_ids)
            assert c.token_ids == f.token_ids[:k] and c.logprobs == pytest.approx(f.logprobs[:k], abs=1e-5)
            assert c.finish_reason == ("stop" if end in f.token_ids else "length")
            stopped += end in f.token_ids
    assert 0 < stopped < 6


def test_sample_tokens_top_p_by_hand():
    # p = [0.5, 0.3, 0.15, 0.05]; top_p 0.7 keeps {0, 1}, renormalised to [0.625, 0.375]
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].expand(4, 4)
    u = torch.tensor([0.0, 0.6, 0.63, 0.99])
    tok, lp = sample_tokens(logits, 1.0, 0.7, u)
    assert tok.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(lp, torch.tensor([0.5, 0.5, 0.3, 0.3]).log())  # before truncation
    tok, _ = sample_tokens(logits, 1.0, 1.0, u)
    assert tok.tolist() == [0, 1, 1, 3]  # plain inverse CDF over [0.5, 0.8, 0.95, 1.0]
    tok, lp = sample_tokens(logits * 2, 0.0, 1.0, u)
    assert tok.tolist() == [0] * 4
    torch.testing.assert_close(lp, (logits * 2).log_softmax(-1)[:, 0])  # greedy: logprob at temperature 1


def test_sample_tokens_never_picks_a_banned_id_by_hand():
    # p = [0.5, 0.3, 0.15, 0.05] with token 0 banned: inverse CDF over [0, 0.3, 0.45, 0.5] (unnormalised)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].expand(4, 4)
    u = torch.tensor([0.0, 0.59, 0.61, 0.99])
    tok, lp = sample_tokens(logits, 1.0, 1.0, u, banned=torch.tensor([0]))
    assert tok.tolist() == [1, 1, 2, 3]
    torch.testing.assert_close(lp, torch.tensor([0.3, 0.3, 0.15, 0.05]).log())  # unbanned log-probs
    tok, _ = sample_tokens(logits, 0.0, 1.0, u, banned=torch.tensor([0]))
    assert tok.tolist() == [1] * 4  # greedy takes the best allowed token
    # the banned id holds all the mass: exp(logp) of the others underflows to 0 in fp32, yet they are sampled
    # from softmax([0, 1, -1]) = [0.245, 0.665, 0.090]
    logits = torch.tensor([300.0, 0.0, 1.0, -1.0])[None].expand(4, 4)
    tok, lp = sample_tokens(logits, 1.0, 1.0, u, banned=torch.tensor([0]))
    assert tok.tolist() == [1, 2, 2, 3]
    torch.testing.assert_close(lp, logits[0, tok] - 300.0)  # log p under the full distribution: logits - ~300


def test_engine_never_emits_image_placeholders(tiny):
    """A model that puts almost all its mass on <|image_pad|> still never samples it (a sampled pad would
    claim image features in training); vLLM's engine does the same with logit_bias."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    c = model.config
    with torch.no_grad():
        model.lm_head.weight[c.image_token_id] = model.model.norm.weight * 50  # aligned with every hidden state
    eng = TorchEngine(model, tok)
    out = eng.generate([[{"role": "user", "content": "hi"}]], n=4, temperature=1.0, max_tokens=8, seed=0)
    ids = {i for comp in out[0] for i in comp.token_ids}
    assert ids and c.image_token_id not in ids and c.video_token_id not in ids


def test_output_follows_weight_updates(tiny):
    model, tok = tiny
    trainer = copy.deepcopy(model)
    eng = TorchEngine(trainer, tok)  # the trained module itself
    side = TorchEngine(copy.deepcopy(model), tok)  # a separate inference copy, kept in sync by copying
    before = eng.generate(PROMPTS, temperature=0.0, max_tokens=8)
    perturb(trainer, 0.2, seed=1)  # "an optimizer step", vision tower included
    eng.sync_weights(trainer)
    side.sync_weights(trainer)
    after = eng.generate(PROMPTS, temperature=0.0, max_tokens=8)
    ids = lambda out: [g[0].token_ids for g in out]  # noqa: E731
    assert ids(after) != ids(before)
    assert ids(after) == [full_forward_greedy(trainer, tok, p, 8, eng.eos_ids) for p in PROMPTS]
    assert ids(side.generate(PROMPTS, temperature=0.0, max_tokens=8)) == ids(after)


def test_weight_stream_is_the_checkpoint(tiny):
    model, _ = tiny
    stream = list(hf_weights(model, dtype=torch.bfloat16))
    assert [n for n, _ in stream] == [n for n, _ in model.hf_state_dict()]
    assert all(t.dtype == torch.bfloat16 for _, t in stream)
