# Image preprocessing, chat rendering and the tiny tokenizer/config, each checked against transformers.
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil

from model import (CHAT_TEMPLATE, QWEN_PRETOKENIZE_REGEX, QWEN_SPECIAL_TOKENS, _mrope_section,
                       build_tiny_tokenizer, format_chat, load_image, preprocess_image, preprocess_images,
                       render_chat, resize_image, smart_resize)

TINY_MIN, TINY_MAX = 56 * 56, 28 * 28 * 64


def random_image(h, w, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def hf_process(images, min_pixels, max_pixels):
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# ---- image preprocessing

def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (30, 3000), (3000, 30), (28, 28), (14, 42), (100, 150), (1080, 1920), (4000, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(4, 2500, 2)) for _ in range(200)]
    for h, w in sizes:
        for mn, mx in [(56 * 56, 28 * 28 * 1280), (TINY_MIN, TINY_MAX), (28 * 28 * 16, 28 * 28 * 20)]:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, mn, mx) == hf_pil.smart_resize(h, w, 28, mn, mx), (h, w, mn, mx)
    with pytest.raises(ValueError):
        smart_resize(10, 2500)


@pytest.mark.parametrize("h, w, min_pixels, max_pixels", [
    (5, 7, TINY_MIN, TINY_MAX),               # tiny: min_pixels binds (upscale)
    (30, 3000, TINY_MIN, TINY_MAX),           # very wide: max_pixels binds, height clamps at 28
    (100, 150, TINY_MIN, TINY_MAX),           # neither binds
    (480, 640, TINY_MIN, TINY_MAX),           # max binds (downscale)
    (301, 199, 56 * 56, 28 * 28 * 1280),      # odd sizes, transformers' default limits
    (37, 1000, 28 * 28 * 20, 28 * 28 * 30),   # both limits tight
    (700, 90, 28 * 28 * 40, 28 * 28 * 200),   # tall; min binds
])
def test_preprocess_matches_hf_processor(h, w, min_pixels, max_pixels):
    img = random_image(h, w, seed=h * w)
    ref_pv, ref_grid = hf_process([img], min_pixels, max_pixels)
    pv, grid = preprocess_image(img, min_pixels, max_pixels)
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert grid.tolist() == ref_grid[0].tolist()
    assert pv.shape == ref_pv.shape == (int(grid.prod()), 1176)
    assert (pv - ref_pv).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_preprocess_other_modes_match_hf(mode):
    img = random_image(60, 90, mode)
    ref = img
    if mode == "RGBA":
        # Reference: alpha composited onto white by hand (out = a * rgb + (1 - a) * 255, as qwen-vl-utils and
        # transformers 5.23 do), then the PIL processor on the RGB result. transformers 5.19's processor would
        # drop the alpha channel instead (a bug, see model.load_image), so it is not the reference here.
        a = np.asarray(img).astype(np.float64)
        rgb = a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255)
        ref = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
        assert np.abs(np.asarray(load_image(img)).astype(int) - np.asarray(ref).astype(int)).max() <= 1  # PIL rounds
        ref = load_image(img)
    ref_pv, _ = hf_process([ref], TINY_MIN, TINY_MAX)
    assert (preprocess_image(img, TINY_MIN, TINY_MAX)[0] - ref_pv).abs().max().item() <= 1e-5


def test_preprocess_images_concatenates_like_hf(tmp_path):
    imgs = [random_image(5, 7, seed=1), random_image(100, 150, seed=2), random_image(64, 300, seed=3)]
    path = tmp_path / "b.png"
    imgs[1].save(path)
    pv, grids = preprocess_images([imgs[0], str(path), imgs[2]], TINY_MIN, TINY_MAX)  # a path works too
    ref_pv, ref_grids = hf_process(imgs, TINY_MIN, TINY_MAX)
    assert grids.tolist() == ref_grids.tolist()
    assert (pv - ref_pv).abs().max().item() <= 1e-5


def test_load_image_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "img.png"
    with pytest.raises(FileNotFoundError, match="img.png"):
        load_image(missing)
    assert load_image(random_image(4, 4, "L")).mode == "RGB"


def test_saved_preprocessor_config_matches(hf_tiny_dir):
    # the PIL backend explicitly: with torchvision installed (every vLLM build needs it) AutoImageProcessor
    # picks the torchvision backend, whose bicubic kernel differs from PIL's (checked below)
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(hf_tiny_dir, backend="pil")
    img = random_image(480, 640)
    out = proc(images=[img], return_tensors="pt")
    pv, grid = preprocess_image(img, TINY_MIN, TINY_MAX)
    assert out["image_grid_thw"][0].tolist() == grid.tolist()
    assert (out["pixel_values"] - pv).abs().max().item() <= 1e-5


def test_torchvision_backend_agrees_on_pre_resized_images(hf_tiny_dir):
    # What rollout.VLLMEngine relies on: an image already at its grid size (resize_image) is not resampled
    # by the torchvision backend, so it gives model.py's pixels; a raw image that needs resizing does not.
    pytest.importorskip("torchvision")
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(hf_tiny_dir, backend="torchvision")
    img = random_image(480, 640)
    pv, grid = preprocess_image(img, TINY_MIN, TINY_MAX)
    raw = proc(images=[img], return_tensors="pt")
    assert raw["image_grid_thw"][0].tolist() == grid.tolist()
    assert (raw["pixel_values"] - pv).abs().max().item() > 1e-3  # a = -0.75 against PIL's a = -0.5
    same = proc(images=[resize_image(img, TINY_MIN, TINY_MAX)], return_tensors="pt")
    assert same["image_grid_thw"][0].tolist() == grid.tolist()
    assert (same["pixel_values"] - pv).abs().max().item() <= 1e-5


# ---- chat rendering

def conversations(img_a, img_b):
    return {
        "text_only": [{"role": "user", "content": "What is 3 + 4?"},
                      {"role": "assistant", "content": "<think> 3 + 4 = 7 </think> \\boxed{7}"}],
        "one_image": [{"role": "user", "content": [{"type": "image", "image": img_a},
                                                   {"type": "text", "text": "How many circles?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Let me count. \\boxed{3}"}]}],
        "two_images": [{"role": "user", "content": [{"type": "image", "image": img_a},
                                                    {"type": "text", "text": "Compare with "},
                                                    {"type": "image", "image": img_b},
                                                    {"type": "text", "text": ". Which is bigger?"}]},
                       {"role": "assistant", "content": "The first.  Wait, verify... yes."}],
        "multi_turn_system": [{"role": "system", "content": "Think step by step."},
                              {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                           {"type": "image", "image": img_b}]},
                              {"role": "assistant", "content": "A square.\n"},
                              {"role": "user", "content": "And the colour?"},
                              {"role": "assistant", "content": "  Red, I think. \\boxed{red}"}],
    }


@pytest.fixture(scope="module")
def chat_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    random_image(100, 150, seed=5).save(root / "a.png")
    return str(root), "a.png", random_image(64, 300, seed=6)


def hf_reference_ids(tokenizer, messages, image_list, add_generation_prompt):
    # the processor's recipe: template text, i-th <|image_pad|> -> prod(grid_i)/4 copies, tokenise
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(image_list) + 1
    grids = hf_process(image_list, TINY_MIN, TINY_MAX)[1] if image_list else []
    text = parts[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p for g, p in zip(grids, parts[1:]))
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "multi_turn_system"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_ids_match_hf(tiny_tokenizer, chat_images, name, add_generation_prompt):
    root, rel_path, pil_b = chat_images
    messages = conversations(rel_path, pil_b)[name]
    image_list = [Image.open(os.path.join(root, item["image"])) if isinstance(item["image"], str) else item["image"]
                  for m in messages if not isinstance(m["content"], str)
                  for item in m["content"] if item.get("type") == "image"]
    out = render_chat(messages, tiny_tokenizer, add_generation_prompt, TINY_MIN, TINY_MAX, image_root=root)
    assert out["input_ids"].tolist() == hf_reference_ids(tiny_tokenizer, messages, image_list, add_generation_prompt)
    assert out["loss_mask"].shape == out["input_ids"].shape
    if image_list:
        ref_pv, ref_grids = hf_process(image_list, TINY_MIN, TINY_MAX)
        assert out["image_grid_thw"].tolist() == ref_grids.tolist()
        assert (out["pixel_values"] - ref_pv).abs().max().item() <= 1e-5
    else:
        assert out["pixel_values"] is None and out["image_grid_thw"] is None


def masked_runs(tokenizer, ids, mask):
    # decode each maximal run of mask == 1 separately
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def assistant_texts(messages):
    return [(m["content"] if isinstance(m["content"], str) else "".join(c["text"] for c in m["content"]))
            + "<|im_end|>" for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "multi_turn_system"])
def test_loss_mask_covers_exactly_assistant_content(tiny_tokenizer, chat_images, name):
    root, rel_path, pil_b = chat_images
    messages = conversations(rel_path, pil_b)[name]
    for agp in (False, True):  # the generation prompt header is never trained
        out = render_chat(messages, tiny_tokenizer, agp, TINY_MIN, TINY_MAX, image_root=root)
        assert masked_runs(tiny_tokenizer, out["input_ids"], out["loss_mask"]) == assistant_texts(messages)


def test_loss_mask_token_straddling_header(tiny_tokenizer):
    # "assistant\n" + "\n..." tokenises to one "\n\n" token (the real Qwen tokenizer does the same):
    # the token carries content, so it is trained, and the masked text gains the header's newline.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nWait, 7.\n\nSo 7."}]
    nn = tiny_tokenizer.convert_tokens_to_ids("ĊĊ")
    out = render_chat(messages, tiny_tokenizer)
    ids = out["input_ids"].tolist()
    header_end = ids.index(tiny_tokenizer.convert_tokens_to_ids("assistant")) + 1
    assert ids[header_end] == nn and out["loss_mask"][header_end] == 1
    assert out["loss_mask"][:header_end].sum() == 0
    assert masked_runs(tiny_tokenizer, out["input_ids"], out["loss_mask"]) == ["\n" + assistant_texts(messages)[0]]


def test_format_chat_matches_saved_template(tiny_tokenizer):
    convs = conversations("a.png", "b.png")
    convs["system_list"] = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    for messages in convs.values():
        for agp in (False, True):
            ref = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            assert format_chat(messages, agp) == ref
    # the documented example rendering (Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json)
    one = [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                        {"type": "text", "text": "Describe the image."}]}]
    assert format_chat(one, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n<|im_start|>assistant\n")


# ---- tiny tokenizer and config

def test_tokenizer_special_tokens_and_config(hf_tiny_dir, tiny_tokenizer):
    ids = tiny_tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + 14)) and ids[-1] == len(tiny_tokenizer) - 1
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    with open(os.path.join(hf_tiny_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "Qwen2Tokenizer"
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_roundtrip_and_autoload(hf_tiny_dir):
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert QWEN_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    fresh = build_tiny_tokenizer()  # deterministic: same vocab as the saved one
    loaded = AutoTokenizer.from_pretrained(hf_tiny_dir)
    texts = ["<think> Let me verify: 12 + 35 = 47. </think> \\boxed{47}", "héllo wörld 你好 🙂\n\n\t  x",
             "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Hi<|im_end|>\n", "  "]
    for text in texts:
        ids = loaded(text)["input_ids"]
        assert ids == fresh(text)["input_ids"]
        assert loaded.decode(ids) == text
    # the demo's words are single tokens (compact sequences on CPU)
    for word in ["think", "answer", "boxed", "Let", "me", "wait", "verify", "image"]:
        assert len(loaded(" " + word)["input_ids"]) == 1, word


def test_mrope_section_valid():
    for head_dim in [8, 12, 16, 32, 64, 80, 128]:
        sec = _mrope_section(head_dim)
        assert sum(sec) == head_dim // 2 and min(sec) > 0
    assert _mrope_section(128) == [16, 24, 24]  # the official split


def test_hf_loads_flat_tiny_config_and_runs_render_chat(hf_tiny_dir, tiny_tokenizer, chat_images):
    from transformers import Qwen2_5_VLForConditionalGeneration
    with open(os.path.join(hf_tiny_dir, "config.json")) as f:
        cfg = json.load(f)
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_tiny_dir).eval()
    tc, vc = model.config.text_config, model.config.vision_config
    assert tc.hidden_size == 64 and tc.rope_parameters["mrope_section"] == [2, 3, 3]
    assert vc.out_hidden_size == tc.hidden_size and vc.depth == 4 and vc.fullatt_block_indexes == [1, 3]
    assert model.config.image_token_id == tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tc.vocab_size == len(tiny_tokenizer)
    # HF raises if the number of image pads differs from the number of vision features
    root, rel_path, pil_b = chat_images
    out = render_chat(conversations(rel_path, pil_b)["two_images"], tiny_tokenizer, min_pixels=TINY_MIN,
                      max_pixels=TINY_MAX, image_root=root)
    ids = out["input_ids"][None]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                       mm_token_type_ids=(ids == model.config.image_token_id).int()).logits
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer)) and torch.isfinite(logits).all()


def test_image_bounds_come_from_the_checkpoint(tmp_path):
    # sft.py, rl.py and eval.py all resize with these: the checkpoint's bounds unless overridden (> 0)
    from model import MAX_PIXELS, MIN_PIXELS, image_bounds
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    assert image_bounds(str(tmp_path)) == {"min_pixels": 3136, "max_pixels": 12845056}
    assert image_bounds(str(tmp_path), 0, 50176) == {"min_pixels": 3136, "max_pixels": 50176}
    assert image_bounds(str(tmp_path / "none")) == {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
