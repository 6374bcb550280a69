"""model.py against transformers' Qwen2_5_VLForConditionalGeneration on tiny random checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

IMG, VSTART, VEND = 340, 338, 339


def tiny_cfg(tie=False):
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        vocab_size=346, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, image_token_id=IMG, video_token_id=341,
        vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie, bos_token_id=332,
        eos_token_id=333,
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, tokens_per_second=2, in_chans=3))


def make_hf(tie=False, seed=0):
    """A transformers model with every parameter perturbed: random init leaves norms at 1 and biases at 0,
    which would hide a missing norm weight or bias from the comparison."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny_cfg(tie))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved)."""
    hf = make_hf(tie=request.param)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, M.QwenVL.from_pretrained(str(path)).eval()


def image_sample(grids, texts=((5, 6, 7), (8, 9), (11, 12, 13))):
    """ids: text, then each image as <vision_start> pads <vision_end>, separated by text."""
    ids = list(texts[0])
    for i, (t, h, w) in enumerate(grids):
        ids += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + list(texts[(i + 1) % len(texts)])
    grid = torch.tensor(grids)
    return torch.tensor([ids]), torch.randn(int(grid.prod(-1).sum()), 1176), grid


def hf_logits(hf, ids, pv=None, grid=None, mask=None):
    # transformers 5.x needs mm_token_type_ids for the 3-D positions (without it 5.x silently
    # falls back to 1-D positions: transformers' Qwen2_5_VLModel.get_rope_index)
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask,
                  mm_token_type_ids=(ids == IMG).int()).logits


CASES = {
    "text": [],
    "one_image": [(1, 8, 10)],
    "two_images_sizes": [(1, 8, 10), (1, 4, 6)],
    "partial_windows": [(1, 22, 30)],  # 11x15 merged tokens: windows of 4x4 leave partial edges
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case):
    hf, mine = pair
    torch.manual_seed(1)
    ids, pv, grid = image_sample(CASES[case]) if CASES[case] else (torch.randint(0, 330, (2, 17)), None, None)
    with torch.no_grad():
        diff = (hf_logits(hf, ids, pv, grid) - mine(ids, pv, grid)).abs().max().item()
    assert diff <= 1e-4, diff


def test_left_padded_batch_mixing_text_and_images(pair):
    hf, mine = pair
    torch.manual_seed(2)
    a, pa, ga = image_sample([(1, 8, 10)])
    b, pb, gb = image_sample([(1, 4, 6), (1, 6, 4)])
    c = torch.randint(0, 330, (1, 9))
    rows = [a[0], b[0], c[0]]
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(T) >= T - len(r) for r in rows]).long()
    pv, grid = torch.cat([pa, pb]), torch.cat([ga, gb])
    with torch.no_grad():
        ref, out = hf_logits(hf, ids, pv, grid, mask), mine(ids, pv, grid, attention_mask=mask)
    diff = ((ref - out).abs() * mask[..., None]).max().item()  # pad positions are don't-care
    assert diff <= 1e-4, diff


def test_new_style_names_and_flat_config(tmp_path):
    """A checkpoint with transformers >= 4.52 names (model.language_model.*, model.visual.*) and the
    official flat config.json loads to the same logits."""
    hf = make_hf()
    sd = {}
    for k, v in hf.state_dict().items():
        k = M.official_name(k)
        k = "model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.") else k
        sd[k] = v.contiguous()
    assert any(k.startswith("model.language_model.") for k in sd) and any(k.startswith("model.visual.") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_cfg()))
    mine = M.QwenVL.from_pretrained(str(tmp_path)).eval()
    ids, pv, grid = image_sample([(1, 8, 10)])
    with torch.no_grad():
        assert (hf_logits(hf, ids, pv, grid) - mine(ids, pv, grid)).abs().max() <= 1e-4


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, mine = pair
    mine.save_pretrained(str(tmp_path), max_shard_bytes=200_000)  # force several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert all(n.startswith(("model.layers.", "model.embed_tokens", "model.norm", "visual.", "lm_head")) for n in names)
    assert ("lm_head.weight" in names) != mine.config.tie_word_embeddings
    hf2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    back = M.QwenVL.from_pretrained(str(tmp_path)).eval()
    ids, pv, grid = image_sample([(1, 4, 6)])
    with torch.no_grad():
        ref = mine(ids, pv, grid)
        assert (hf_logits(hf2, ids, pv, grid) - ref).abs().max() <= 1e-4
        assert torch.equal(back(ids, pv, grid), ref)


def test_missing_tensor_is_a_clear_error(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.norm.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(AssertionError, match="missing.*model.norm.weight"):
        M.QwenVL.from_pretrained(str(tmp_path))


def test_kv_cache_decoding_matches_full_forward_and_generate(pair):
    """Prefill a left-padded batch (one row with an image), decode greedily with the cache; at every step
    the cached logits equal a full forward over the whole sequence, and the tokens equal HF generate."""
    hf, mine = pair
    torch.manual_seed(3)
    a, pv, grid = image_sample([(1, 8, 10)])
    c = torch.randint(0, 330, (1, 7))
    T = a.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, T - 7, dtype=torch.long), c], 1)])
    mask = torch.cat([torch.ones(1, T), torch.cat([torch.zeros(1, T - 7), torch.ones(1, 7)], 1)]).long()
    steps = 6
    cache = mine.new_kv_cache(2, T + steps)
    seq, m = ids, mask
    with torch.no_grad():
        logits = mine(ids, pv, grid, attention_mask=mask, kv_cache=cache)
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
            logits = mine(nxt, attention_mask=m, kv_cache=cache)
            full = mine(seq, pv, grid, attention_mask=m)
            assert (full[:, -1] - logits[:, -1]).abs().max() <= 1e-4
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=(ids == IMG).int(), max_new_tokens=steps, do_sample=False)
    assert torch.equal(ref[:, T:], seq[:, T:])


def test_kv_cache_select_shares_a_prefill():
    """Replicating cache rows after one prefill (n samples per prompt) equals prefilling each copy."""
    mine = M.QwenVL(M.QwenVLConfig.from_hf(tiny_cfg())).eval()
    mine.init_weights(generator=torch.Generator().manual_seed(0))
    ids, pv, grid = image_sample([(1, 4, 6)])
    with torch.no_grad():
        cache = mine.new_kv_cache(1, ids.shape[1] + 2)
        mine(ids, pv, grid, kv_cache=cache)
        cache.select(torch.tensor([0, 0, 0]))
        nxt = torch.tensor([[3], [4], [5]])
        out = mine(nxt, kv_cache=cache)[:, -1]
        for i in range(3):
            full = mine(torch.cat([ids, nxt[i:i + 1]], 1), pv, grid)[:, -1]
            assert (full - out[i]).abs().max() <= 1e-4


def test_token_logprobs_match_naive_with_gradients():
    torch.manual_seed(4)
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 37))
    t[0, :5] = -100
    lp, ent = M.token_logprobs(h, w, t, temperature=0.7, chunk=8, return_entropy=True)
    logits = (h @ w.t()) / 0.7
    ref = logits.log_softmax(-1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * (t >= 0)
    ref_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * (t >= 0)
    assert (lp - ref).abs().max() <= 1e-5 and (ent - ref_ent).abs().max() <= 1e-5
    g = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    g_ref = torch.autograd.grad(ref.sum() + ref_ent.sum(), (h, w))
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() <= 1e-5


def test_packed_rows_equal_separate_forwards():
    """Two samples (one with an image) packed in one row with segment_ids give the logits each has alone:
    positions restart per sample and attention stays inside it."""
    mine = M.QwenVL(M.QwenVLConfig.from_hf(tiny_cfg())).eval()
    mine.init_weights(generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a, pv, grid = image_sample([(1, 4, 6)])
    b = torch.randint(0, 330, (1, 11))
    packed = torch.cat([b, a, torch.zeros(1, 3, dtype=torch.long)], 1)
    seg = torch.tensor([[0] * 11 + [1] * a.shape[1] + [-1] * 3])
    with torch.no_grad():
        out = mine(packed, pv, grid, segment_ids=seg)
        assert (out[:, :11] - mine(b)).abs().max() <= 1e-5
        assert (out[:, 11:11 + a.shape[1]] - mine(a, pv, grid)).abs().max() <= 1e-5


def test_gradient_checkpointing_same_gradients():
    mine = M.QwenVL(M.QwenVLConfig.from_hf(tiny_cfg()))
    mine.init_weights(generator=torch.Generator().manual_seed(0))
    ids, pv, grid = image_sample([(1, 8, 10)])
    grads = []
    for ckpt in (False, True):
        mine.zero_grad()
        mine.set_gradient_checkpointing(ckpt)
        mine(ids, pv, grid, targets=ids.roll(-1, 1)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in mine.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bf16_close_to_fp32(pair):
    hf, mine = pair
    ids, pv, grid = image_sample([(1, 8, 10)])
    bf = M.QwenVL.from_pretrained(mine.source_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref, out = mine(ids, pv, grid), bf(ids, pv, grid).float()
    assert out.dtype == torch.float32 and (ref - out).abs().max() / ref.abs().max() < 0.05


def test_nested_transformers5_config_is_read(pair):
    _, mine = pair
    d = json.load(open(os.path.join(mine.source_path, "config.json")))
    assert "text_config" in d  # transformers 5.x wrote the nested layout
    c = M.QwenVLConfig.from_hf(d)
    assert (c.hidden_size, c.num_key_value_heads, c.mrope_section, c.vision.depth) == (64, 2, [2, 3, 3], 4)


def test_build_tiny_end_to_end_with_transformers(tiny_model_dir):
    """`python model.py tiny` output: transformers loads it, and a rendered chat with an image gives the
    same logits through both implementations."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    tok = M.load_tokenizer(tiny_model_dir)
    mine = M.QwenVL.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine.save_pretrained(tiny_model_dir + "_perturbed", tokenizer=tok)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir + "_perturbed").eval()
    img = Image.fromarray((torch.rand(60, 90, 3) * 255).byte().numpy())
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is 2+3?"}]}]
    b = M.render_chat(msgs, tok, add_generation_prompt=True, max_pixels=28 * 28 * 64)
    ids = b["input_ids"][None]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                 mm_token_type_ids=(ids == mine.config.image_token_id).int()).logits
        assert (ref - mine(ids, b["pixel_values"], b["image_grid_thw"])).abs().max() <= 1e-4
    assert M.load_tokenizer(tiny_model_dir + "_perturbed")("<|im_end|>")["input_ids"] == [mine.config.eos_token_id]
