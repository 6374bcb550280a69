"""
Qwen2.5-VL in plain PyTorch: the vision tower, the M-RoPE language model, a KV cache, memory-lean
per-token log-probs, image preprocessing and chat rendering without torchvision, and checkpoint IO
in the official Hugging Face layout (so transformers and vLLM load what we write, and we load theirs).

    model = QwenVL.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct-local-dir", device="cuda", dtype=torch.bfloat16)
    batch = render_chat(messages, tokenizer)                 # ids, loss mask, pixel_values, image_grid_thw
    logits = model(batch["input_ids"][None], batch["pixel_values"], batch["image_grid_thw"])
    python model.py tiny out/tiny                            # a tiny random model + tokenizer, offline

The module tree mirrors the official checkpoint names (`model.layers.*`, `visual.*`, `lm_head.*`),
so `state_dict()` is the checkpoint. Facts and shapes: transformers' modeling_qwen2_5_vl.py and
the Qwen2.5-VL technical report (arXiv:2502.13923).
"""

import ast
import difflib
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class VisionConfig:
    # class defaults of transformers (= 7B), used for keys a re-saved config.json leaves out;
    # except hidden_size, whose transformers default (3584) is wrong for every real checkpoint
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels: 112 / 14 / 2 = 4x4 merged tokens per attention window
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 3584  # = the LLM hidden size
    in_channels: int = 3
    tokens_per_second: int = 2


@dataclass
class QwenVLConfig:
    # defaults are Qwen2.5-VL-7B-Instruct
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # (t, h, w) split of head_dim/2 freqs
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None  # absent from the official config; the tokenizer knows it
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d):
        """Read a config.json dict: the official flat layout, or the nested one transformers 5.x writes."""
        text = {**d, **d.get("text_config", {})}  # nested keys win; flat files have no text_config
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        names = {f for f in cls.__dataclass_fields__ if f != "vision"}
        kw = {k: text[k] for k in names if k in text and text[k] is not None}
        kw["mrope_section"] = list(rope.get("mrope_section", [16, 24, 24]))
        kw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 1e6)))
        for k in ("tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
                  "vision_end_token_id"):
            if k in d:  # top-level wins for these (5.x keeps them there)
                kw[k] = d[k]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        v = dict(d.get("vision_config", {}))
        v.setdefault("patch_size", v.get("spatial_patch_size", 14))
        v.setdefault("in_channels", v.get("in_chans", 3))
        vnames = VisionConfig.__dataclass_fields__
        vision = VisionConfig(**{k: v[k] for k in vnames if k in v})
        cfg = cls(**kw, vision=vision)
        assert sum(cfg.mrope_section) == cfg.head_dim // 2, f"mrope_section {cfg.mrope_section} must sum to head_dim/2"
        assert vision.out_hidden_size == cfg.hidden_size, "vision out_hidden_size must equal the LLM hidden_size"
        return cfg

    def to_hf(self, dtype="bfloat16"):
        """The official flat config.json layout, which transformers 4.x, 5.x and vLLM all read."""
        d = {k: v for k, v in asdict(self).items() if k not in ("vision", "mrope_section") and v is not None}
        v = asdict(self.vision)
        v.update(model_type="qwen2_5_vl", in_chans=v["in_channels"], spatial_patch_size=v["patch_size"],
                 hidden_act="silu")
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                **d, "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False,
                "sliding_window": 32768, "max_window_layers": self.num_hidden_layers,
                "vision_token_id": self.image_token_id - 1, "torch_dtype": dtype,
                "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
                "vision_config": v}


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:  # the arithmetic below, as one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32, cast back, then scale in the model dtype (what the checkpoints were trained with)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # h * rsqrt(mean(h^2) + eps), as one op
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(angles):
    """cos and sin (..., hd) of rotary angles a (..., hd/2), for apply_rope: [cos a, cos a] and, with its first
    half negated, [-sin a, sin a]. Both are taken of [-a, a] (cos is even, sin odd): two ops fewer."""
    both = torch.cat([-angles, angles], -1)
    return both.cos(), both.sin()


def apply_rope(x, cos, sin):
    """The reference's x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: with the sign kept in the
    sin table, [-x2, x1] * [s, s] = roll(x) * [-s, s] bit for bit, one op where rotate_half takes three
    (a decode step of a small model is mostly per-op overhead)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def segment_attention(q, k, v, cu_seqlens, causal):
    """Attention inside segments of a flat token list, none across them.
    q (N, Hq, hd), k/v (N, Hkv, hd), cu_seqlens: python list [0, ..., N]. Segments of equal length
    are stacked into one SDPA call, so the vision tower's many equal-size windows cost a few kernels."""
    out = torch.empty_like(q)
    starts = torch.tensor(cu_seqlens[:-1], device=q.device)
    lens = torch.tensor(cu_seqlens[1:], device=q.device) - starts
    for L in lens.unique().tolist():
        if L == 0:
            continue
        idx = starts[lens == L][:, None] + torch.arange(L, device=q.device)  # (S, L)
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # (S, H, L, hd)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=ks.shape[1] != qs.shape[1])
        out[idx] = o.transpose(1, 2)
    return out


# -----------------------------------------------------------------------------
# vision tower: patch embedding -> 2-D rotary -> window/full attention blocks -> 2x2 patch merger


class VisionAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, H, hd) each
        # the 2-D rotary runs in fp32 (as the reference does), then back to the model dtype
        cos, sin = cos[:, None].float(), sin[:, None].float()
        q, k = apply_rope(q.float(), cos, sin).to(v.dtype), apply_rope(k.float(), cos, sin).to(v.dtype)
        return self.proj(segment_attention(q, k, v, cu_seqlens, causal=False).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size)
        self.norm2 = RMSNorm(c.hidden_size)
        self.attn = VisionAttention(c.hidden_size, c.num_heads)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    # A Conv3d with kernel == stride over a (C, T, 14, 14) patch is a linear map of the flattened patch,
    # and pixel_values rows are already flattened in (C, T, y, x) order. Keep the Conv3d parameter so the
    # checkpoint name and shape stay official; compute it as one matmul.
    def __init__(self, c: VisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values):  # (N, C*T*P*P) -> (N, D)
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        dim = c.hidden_size * c.spatial_merge_size ** 2
        self.ln_q = RMSNorm(c.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, c.out_hidden_size))

    def forward(self, x):  # (N, D) -> (N/4, out): 4 consecutive rows are one 2x2 block (processor order)
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw, device):
        """rope_tables (N, hd) of the 2-D rotary, angles [row freqs | col freqs]; rows/cols in patch units,
        enumerated in the processor's 2x2 merge-block order."""
        m, hd = self.c.spatial_merge_size, self.c.hidden_size // self.c.num_heads
        inv_freq = 1.0 / 10000 ** (torch.arange(0, hd // 2, 2, device=device, dtype=torch.float) / (hd // 2))
        pos = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            block = lambda a: a.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()  # noqa: E731
            pos.append(torch.stack([block(rows), block(cols)], -1).repeat(t, 1))
        pos = torch.cat(pos)  # (N, 2)
        return rope_tables((pos[:, :, None].float() * inv_freq).flatten(1))  # angles (N, hd/2)

    def window_index(self, grid_thw):
        """The window permutation of merged tokens, and window boundaries in patch units.
        Windows of ws x ws merged tokens tile each frame row-major (edge windows are partial); inside a
        window tokens are row-major. Returns (window_index LongTensor (N/4,), cu_window_seqlens list)."""
        m = self.c.spatial_merge_size
        ws = self.c.window_size // m // self.c.patch_size
        index, cu, offset = [], [0], 0
        for t, h, w in grid_thw.tolist():
            H, W = h // m, w // m
            ids = torch.arange(t * H * W).view(t, H, W)
            for f in range(t):
                for r0 in range(0, H, ws):
                    for c0 in range(0, W, ws):
                        win = ids[f, r0:r0 + ws, c0:c0 + ws].flatten()
                        index.append(win + offset)
                        cu.append(cu[-1] + win.numel() * m * m)
            offset += t * H * W
        return torch.cat(index), cu

    def forward(self, pixel_values, grid_thw):
        x = self.patch_embed(pixel_values)  # (N, D)
        N, D = x.shape
        cos, sin = self.rotary(grid_thw, x.device)
        widx, cu_window = self.window_index(grid_thw)
        widx = widx.to(x.device)
        # move whole 2x2 blocks into window order (the merger needs the 4 patches of a block adjacent)
        x = x.view(N // 4, 4, D)[widx].view(N, D)
        cos, sin = (t.view(N // 4, 4, -1)[widx].view(N, -1) for t in (cos, sin))
        # "full" attention is per frame of one image: images never see each other
        sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        cu_full = [0] + torch.tensor(sizes).cumsum(0).tolist()
        for i, blk in enumerate(self.blocks):
            cu = cu_full if i in self.c.fullatt_block_indexes else cu_window
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, cos, sin, cu, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cu)
        x = self.merger(x)  # (N/4, out)
        return x[torch.argsort(widx)]  # back to the processor's raster order


# -----------------------------------------------------------------------------
# language model: Qwen2 decoder with GQA and M-RoPE


def get_rope_index(input_ids, image_grid_thw, attention_mask, config):
    """3-D (temporal, height, width) position ids of a prompt, and the rope delta of each row.
    Text tokens get (s, s, s) and s += 1. An image of H x W merged tokens gets (s, s+r, s+c) for token
    (r, c), then s += max(H, W). Pads get 0. delta = (max id + 1) - (number of real tokens), so a token
    appended at real index p later gets position p + delta on all three axes.
    Returns position_ids (3, B, T) long and rope_deltas (B, 1) long."""
    B, T = input_ids.shape
    dev = input_ids.device
    if image_grid_thw is None and not (input_ids == config.image_token_id).any():  # text only: no row loop
        keep = attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids)
        pos = (keep.cumsum(-1) - 1).clamp(min=0) * keep
        return pos.expand(3, B, T), torch.zeros(B, 1, dtype=torch.long, device=dev)
    m = config.vision.spatial_merge_size
    pos = torch.zeros(3, B, T, dtype=torch.long, device=dev)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    g = 0  # next image, counted over the whole batch in order
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool, device=dev)
        ids = input_ids[b][keep]
        img_at = (ids == config.image_token_id).nonzero().flatten().tolist()
        parts, s, cursor, i = [], 0, 0, 0
        while i < len(img_at):
            assert g < len(grids), f"row {b}: more images in input_ids than rows in image_grid_thw"
            t, h, w = grids[g]
            H, W = h // m, w // m
            n, start = t * H * W, img_at[i]
            block = img_at[i:i + n]
            assert len(block) == n and block[-1] == start + n - 1, \
                f"row {b}: image {g} needs {n} consecutive <|image_pad|> tokens (grid {t}x{h}x{w})"
            parts.append(torch.arange(start - cursor, device=dev).expand(3, -1) + s)  # text before it
            s += start - cursor
            tt = torch.arange(t, device=dev).repeat_interleave(H * W)  # still images: t = 1
            rr = torch.arange(H, device=dev).repeat_interleave(W).repeat(t)
            cc = torch.arange(W, device=dev).repeat(H * t)
            parts.append(torch.stack([tt, rr, cc]) + s)
            s += max(t, H, W)
            cursor, i, g = start + n, i + n, g + 1
        parts.append(torch.arange(len(ids) - cursor, device=dev).expand(3, -1) + s)
        p = torch.cat(parts, dim=1)
        pos[:, b, keep] = p
        deltas[b] = p.max() + 1 - len(ids) if len(ids) else 0
    assert g == len(grids), f"{len(grids)} images in image_grid_thw but {g} image blocks in input_ids"
    return pos, deltas


@functools.lru_cache(maxsize=16)
def rope_inv_freq(head_dim, theta, device):
    """1 / theta^(2j / hd) for j < hd/2, fp32. Cached: the scalar ** tensor power costs as much as the rest
    of a decode step's RoPE. Made outside inference_mode, so a rollout may create it and training reuse it."""
    with torch.inference_mode(False):
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)


def mrope_cos_sin(position_ids, config, dtype):
    """rope_tables (B, T, 1, hd) of M-RoPE: frequency j takes its position from axis 0 (t), 1 (h) or 2 (w)
    according to mrope_section; computed in fp32, then cast to the activation dtype (as the reference).
    position_ids (3, B, T), or (B, T) when the three axes are equal (decoding text): then M-RoPE is plain
    1-D RoPE and the per-frequency axis gather is skipped (it would pick the same numbers)."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, T, hd/2) or (B, T, hd/2)
    if position_ids.dim() == 3:
        axis = torch.repeat_interleave(torch.arange(3, device=freqs.device) % 3,
                                       torch.tensor(config.mrope_section, device=freqs.device))  # (hd/2,)
        freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)  # (B, T, hd/2)
    cos, sin = rope_tables(freqs[:, :, None])  # (B, T, 1, hd): broadcasts over the heads of (B, T, H, hd)
    return cos.to(dtype), sin.to(dtype)


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding, plus what decoding needs to
    place new tokens: which cached slots are real (left padding) and each row's rope delta."""

    def __init__(self, num_layers, batch_size, num_kv_heads, max_len, head_dim, device, dtype):
        # one tensor per layer (a python list, not one 5-D tensor): indexing a list costs no tensor op, and a
        # decode step of a small model is mostly per-op overhead
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.rope_deltas = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far (same for every row; left padding keeps rows aligned)

    def update(self, layer, k, v):  # k, v (B, Hkv, T, hd) -> all keys/values so far (B, Hkv, L+T, hd)
        L, T = self.length, k.shape[2]
        ck, cv = self.k[layer], self.v[layer]
        assert L + T <= ck.shape[2], f"KV cache full: {L}+{T} > {ck.shape[2]} slots"
        ck[:, :, L:L + T] = k
        cv[:, :, L:L + T] = v
        return ck[:, :, :L + T], cv[:, :, :L + T]

    def select(self, index):
        """Keep/reorder/replicate rows, e.g. index = arange(B).repeat_interleave(n) shares one prefill
        among n samples, or the rows still generating."""
        self.k, self.v = [k[index] for k in self.k], [v[index] for v in self.v]
        self.key_mask, self.rope_deltas = self.key_mask[index], self.rope_deltas[index]

    def put(self, rows, other):
        """Copy `other`, a cache prefilled for rows `rows` (long tensor) of this one, into them right-aligned
        at slot self.length; the slots before stay pads. This lets prompts of very different lengths be
        prefilled in groups with little padding and then decoded as one batch."""
        L, S = self.length, other.length
        for k, v, ok, ov in zip(self.k, self.v, other.k, other.v):
            k[rows, :, L - S:L] = ok[:, :, :S]
            v[rows, :, L - S:L] = ov[:, :, :S]
        self.key_mask[rows, L - S:L] = other.key_mask[:, :S]
        self.rope_deltas[rows] = other.rope_deltas


class Attention(nn.Module):
    def __init__(self, c: QwenVLConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cu_seqlens=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        # q and k side by side, so that RoPE is one set of ops for both (a decode step is mostly per-op overhead),
        # rotated in the projections' (B, T, H, hd) layout, which is contiguous (the transposed view is slower)
        qk = torch.cat([self.q_proj(x), self.k_proj(x)], -1).view(B, T, self.nh + self.nkv, self.hd)
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([self.nh, self.nkv], 1)  # (B, nh|nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cu_seqlens is not None:  # packed rows: causal attention inside each sample only
            flat = lambda t: t.transpose(1, 2).reshape(B * T, -1, self.hd)  # noqa: E731
            y = segment_attention(flat(q), flat(k), flat(v), cu_seqlens, causal=True).view(B, T, -1)
            return self.o_proj(y)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if T == 1 and mask is not None:  # decoding one token: the nh/nkv query heads of each kv head attend
            # as that many queries of one head (they see the same keys), so SDPA does no GQA expansion
            y = F.scaled_dot_product_attention(q.view(B, self.nkv, -1, self.hd), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, -1))
        # mask None means plain causal attention over T == S positions
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: QwenVLConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cu_seqlens=None, kv_cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cu_seqlens, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c: QwenVLConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def attention_mask_4d(key_mask, T):
    """(B, S) bool of real key slots -> (B, 1, T, S) bool for the last T queries: causal, no pad keys.
    A query may always see itself, so pad rows are finite (their outputs are never used)."""
    B, S = key_mask.shape
    q_pos = torch.arange(S - T, S, device=key_mask.device)[:, None]
    k_pos = torch.arange(S, device=key_mask.device)[None, :]
    return ((k_pos <= q_pos) & key_mask[:, None, :] | (k_pos == q_pos))[:, None]


def segments_to_cu(segment_ids):
    """(B, T) segment ids -> cu_seqlens over the flattened B*T tokens: a new segment wherever the id changes
    or a row starts."""
    B, T = segment_ids.shape
    flat = segment_ids.flatten()
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[::T] = True
    starts = new.nonzero().flatten().tolist()
    return starts + [B * T]


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk=1024, return_entropy=False):
    """log p(target) (and the entropy) of every position without materialising (N, V) fp32 logits:
    the lm_head matmul + log_softmax runs `chunk` positions at a time, and under autograd each chunk is
    recomputed in backward (activation checkpointing), so peak memory is one (chunk, V) block.
    hidden (B, T, D), weight (V, D), targets (B, T) long; targets < 0 give logp 0 (and entropy 0).
    Returns logp (B, T) fp32 [, entropy (B, T) fp32]."""
    B, T, D = hidden.shape
    h, t = hidden.reshape(-1, D), targets.reshape(-1)

    def piece(h, t):
        logits = (h @ weight.t()).float() / temperature  # (chunk, V)
        lse = torch.logsumexp(logits, -1)
        lp = logits.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) - lse
        ent = lse - (logits.softmax(-1) * logits).sum(-1) if return_entropy else torch.zeros_like(lse)
        valid = t >= 0
        return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)

    lps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(piece, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
        else:
            lp, ent = piece(h[i:i + chunk], t[i:i + chunk])
        lps.append(lp)
        ents.append(ent)
    # clone: a fresh tensor, not a view of the concatenation (FSDP2 warns about view outputs)
    lp = torch.cat(lps).view(B, T).clone()
    return (lp, torch.cat(ents).view(B, T).clone()) if return_entropy else lp


# -----------------------------------------------------------------------------
# the whole model


class QwenVL(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, on=True):
        self.gradient_checkpointing = on
        self.visual.gradient_checkpointing = on

    def init_weights(self, std=0.02, generator=None):
        """Random init as transformers does it: normal(0, std) matrices, zero biases, unit norms."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name or "ln_q" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def new_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        c, w = self.config, self.lm_head.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       device or w.device, dtype or w.dtype)

    def embed(self, input_ids, pixel_values, image_grid_thw):
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if pixel_values is not None:
            feats = self.visual(pixel_values, image_grid_thw).to(x.dtype)  # (n_image_tokens, D)
            is_img = input_ids == self.config.image_token_id
            assert is_img.sum().item() == feats.shape[0], \
                f"{is_img.sum().item()} <|image_pad|> tokens but {feats.shape[0]} image features: expand the pads per image_grid_thw"
            x = x.masked_scatter(is_img[..., None], feats)  # image features in prompt order
        return x

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                position_ids=None, segment_ids=None, kv_cache=None, targets=None, temperature=1.0,
                return_entropy=False, logprob_chunk=1024, return_hidden=False):
        """input_ids (B, T). pixel_values (N, 1176) and image_grid_thw (n, 3) as transformers' processor
        makes them, all images of the batch concatenated in order. attention_mask (B, T) with 0 on
        (left) pads, or (B, L+T) when decoding with kv_cache. segment_ids (B, T): packed rows, attention
        only inside a segment. Returns logits (B, T, V), or with targets (B, T) the per-token logp
        (B, T) fp32 (and entropy) from the memory-lean token_logprobs."""
        c = self.config
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        mask, cu = None, None
        if kv_cache is not None:
            L = kv_cache.length
            if attention_mask is not None:
                kv_cache.key_mask[:, :L + T] = attention_mask.bool()[:, -(L + T):]
            else:
                kv_cache.key_mask[:, L:L + T] = True
            if position_ids is None and L == 0:  # prefill: 3-D ids from the prompt, remember the deltas
                position_ids, kv_cache.rope_deltas = get_rope_index(input_ids, image_grid_thw, kv_cache.key_mask[:, :T], c)
            elif position_ids is None:  # decode: the real-token index + delta, same on all three axes (so 2-D)
                position_ids = kv_cache.key_mask[:, :L].sum(-1, keepdim=True) + kv_cache.rope_deltas  # (B, 1)
                if T > 1:
                    position_ids = position_ids + torch.arange(T, device=position_ids.device)  # (B, T)
            if T == 1 and attention_mask is None:
                # one new real token sees every real slot so far, itself included: no causal part to build
                mask = kv_cache.key_mask[:, None, None, :L + 1]  # (B, 1, 1, L+1), a view
            else:
                mask = attention_mask_4d(kv_cache.key_mask[:, :L + T], T)
        elif segment_ids is not None:
            cu = segments_to_cu(segment_ids)
            if position_ids is None:
                position_ids = self.packed_position_ids(input_ids, image_grid_thw, cu)
        else:
            if attention_mask is not None and not attention_mask.bool().all():
                mask = attention_mask_4d(attention_mask.bool(), T)
            if position_ids is None:
                position_ids, _ = get_rope_index(input_ids, image_grid_thw, attention_mask, c)
        cos, sin = mrope_cos_sin(position_ids, c, x.dtype)
        if mask is not None:  # as an additive 0/-inf bias, made once: SDPA would convert a bool mask in every layer
            mask = torch.full_like(mask, float("-inf"), dtype=x.dtype).masked_fill_(mask, 0.0)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cu, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cu, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.model.norm(x)
        if return_hidden:
            return x
        if targets is not None:
            return token_logprobs(x, self.lm_head.weight, targets, temperature, logprob_chunk, return_entropy)
        return self.lm_head(x)

    def packed_position_ids(self, input_ids, image_grid_thw, cu):
        """Positions restart in every packed segment; each segment takes its own images in order."""
        c, B, T = self.config, *input_ids.shape
        flat, pos = input_ids.flatten(), torch.zeros(3, B * T, dtype=torch.long, device=input_ids.device)
        m2 = c.vision.spatial_merge_size ** 2
        per_image = (image_grid_thw.prod(-1) // m2).tolist() if image_grid_thw is not None else []
        g = 0
        for s, e in zip(cu[:-1], cu[1:]):
            seg = flat[s:e][None]
            n_tok, k = (seg == c.image_token_id).sum().item(), g
            while n_tok > 0:
                n_tok -= per_image[k]
                k += 1
            grid = image_grid_thw[g:k] if k > g else None
            pos[:, s:e] = get_rope_index(seg, grid, None, c)[0][:, 0]
            g = k
        return pos.view(3, B, T)

    # ---- checkpoint IO (official names; either naming accepted on load)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        from safetensors import safe_open
        with open(os.path.join(path, "config.json")) as f:
            config = QwenVLConfig.from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(config)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        state = {}
        for fn in files:
            with safe_open(os.path.join(path, fn), framework="pt", device="cpu") as f:
                for name in f.keys():
                    state[official_name(name)] = f.get_tensor(name).to(device=device, dtype=dtype)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {n for n, _ in model.named_parameters()}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        assert not missing and not unexpected, \
            f"{path}: checkpoint does not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_path = path
        return model

    def hf_state_dict(self):
        """(official name, tensor) pairs: what save_pretrained writes and vLLM's load_weights reads."""
        for name, t in self.state_dict().items():
            if not (self.config.tie_word_embeddings and name == "lm_head.weight"):
                yield name, t

    def save_pretrained(self, path, tokenizer=None, state_dict=None, max_shard_bytes=5 * 2**30):
        """config.json + safetensors (sharded above max_shard_bytes) in the official naming, plus the
        tokenizer and the preprocessor/generation configs of the checkpoint this model came from."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        state = dict(state_dict.items()) if state_dict is not None else dict(self.hf_state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
                weight_map.update({k: fn for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_hf(dtype), f, indent=2)
        src = getattr(self, "source_path", None)
        for fn in ("preprocessor_config.json", "generation_config.json", "chat_template.json"):
            if src and os.path.exists(os.path.join(src, fn)) and os.path.abspath(src) != os.path.abspath(path):
                with open(os.path.join(src, fn)) as fi, open(os.path.join(path, fn), "w") as fo:
                    fo.write(fi.read())
        if tokenizer is not None:
            save_tokenizer(tokenizer, path)


def official_name(name):
    """transformers >= 4.52 module-tree names -> the official checkpoint names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


# -----------------------------------------------------------------------------
# sharded loading (sft.py and rl.py under torchrun): no rank ever holds the whole model.
# The torchtitan recipe: build the module on the meta device (shapes, no storage), let the caller shard
# it with fully_shard (FSDP2 splits every parameter along dim 0 into world_size chunks, torch.chunk
# style), allocate only the local chunks (to_empty), then read each rank's rows of every tensor from
# the safetensors files with safe_open's get_slice, which touches just those rows of the mmap.
# Peak memory per rank is its shard plus one tensor's slice (bench/bench_memory.py measures it).


def meta_model(path, dtype=torch.float32):
    """The QwenVL of an HF dir on the meta device, parameters in `dtype`: the module tree, no memory.
    Shard it (fully_shard), then fill it with load_sharded."""
    with open(os.path.join(path, "config.json")) as f:
        config = QwenVLConfig.from_hf(json.load(f))
    with torch.device("meta"):
        model = QwenVL(config).to(dtype)  # a tied lm_head is the embedding's Parameter object, and stays it
    model.source_path = path  # save_pretrained copies the preprocessor/generation configs from here
    return model


def checkpoint_keys(path):
    """{official tensor name: (safetensors file, the name in that file)} of an HF dir, one file or sharded."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt", device="cpu") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    return {official_name(k): (os.path.join(path, fn), k) for k, fn in weight_map.items()}


def local_rows(n, rank, world):
    """Rows [start, end) of a dim-0 length n that FSDP2's Shard(0) gives `rank`: torch.chunk into world
    pieces of ceil(n / world) rows; the last ranks may get fewer rows, or none."""
    size = -(-n // world)
    return min(rank * size, n), min((rank + 1) * size, n)


def load_sharded(model, path, device="cpu"):
    """Fill a meta_model, sharded by fully_shard or not at all, with the weights of the HF dir `path`
    (cast to the parameters' dtype), each rank reading only the rows of its own shards."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard
    keys = checkpoint_keys(path)
    model.to_empty(device=device)  # under FSDP2 this allocates each rank's chunks only (DTensor local tensors)
    if model.config.tie_word_embeddings:  # without FSDP, to_empty made two new Parameters of the tied one
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())  # taken after to_empty, which may replace the Parameter objects
    missing, unexpected = params.keys() - keys.keys(), keys.keys() - params.keys() - {"lm_head.weight"}
    assert not missing and not unexpected, \
        f"{path}: checkpoint does not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
    # QwenVL keeps no buffers (the RoPE frequencies are computed: rope_inv_freq), so every byte of to_empty's
    # uninitialised memory is overwritten below. A buffer added to the model would need its own init here.
    assert not list(model.buffers()), "load_sharded: the model has buffers now; initialise them after to_empty"
    with torch.no_grad():
        for name, p in params.items():
            local, start, end = p, 0, p.shape[0]
            if isinstance(p, DTensor):
                assert p.placements == (Shard(0),), f"{name}: expected FSDP2's Shard(0), got {p.placements}"
                local = p.to_local()
                start, end = local_rows(p.shape[0], p.device_mesh.get_local_rank(), p.device_mesh.size())
                assert local.shape[0] == end - start, f"{name}: local shard {tuple(local.shape)}, not rows {start}:{end}"
            # the file is opened per tensor: pages of an mmap count in RSS until it is closed, and with one open
            # per file they add up to the rank's part of the file (bench/bench_memory.py, 116M: +150 MiB a rank)
            fn, key = keys[name]
            with safe_open(fn, framework="pt", device="cpu") as f:
                local.copy_(f.get_slice(key)[start:end])  # reads only these rows; casts dtype and device
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "the tied lm_head lost its embedding"
    return model


# -----------------------------------------------------------------------------
# checkpoint averaging: OVR's released model is a uniform weight average of several intermediate RL
# checkpoints (Wei et al. 2025, arXiv 2507.05255, section 4.1). rl.py keeps its HF exports as
# out_dir/hf_step_N (keep_hf_exports); then
#   python model.py average out/rl/hf_step_000800 out/rl/hf_step_000900 out/rl/hf_step_001000 --out=out/rl/hf_avg


def keep_hf_export(src, dst_dir, keep):
    """Keep the HF export `src` (a checkpoint's hf/) as dst_dir/hf_step_N after the checkpoint is rotated out:
    its files are hard-linked (no second copy on disk while both exist; a copy where links are not
    possible), and only the newest `keep` hf_step_* folders stay. Rank 0 only."""
    assert keep > 0, f"keep must be positive, got {keep}"
    dst = os.path.join(dst_dir, "hf_" + os.path.basename(os.path.dirname(os.path.abspath(src))))
    shutil.rmtree(dst + ".tmp", ignore_errors=True)
    shutil.copytree(src, dst + ".tmp", copy_function=_link_or_copy)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(dst + ".tmp", dst)
    done = sorted(d for d in os.listdir(dst_dir) if d.startswith("hf_step_") and not d.endswith(".tmp"))
    for d in done[:-keep]:
        shutil.rmtree(os.path.join(dst_dir, d), ignore_errors=True)
    return dst


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def average_checkpoints(paths, out):
    """Uniform average of HF checkpoints of one architecture into `out`: tensor by tensor (memory: the
    output plus one tensor in fp64), summed in fp64 and written in the inputs' dtype. Tokenizer,
    preprocessor and generation configs come from the first checkpoint. Written to out.tmp, then renamed."""
    from safetensors import safe_open
    assert len(paths) >= 2, "average needs at least two checkpoints"
    assert os.path.abspath(out) not in map(os.path.abspath, paths), f"--out={out} is one of the inputs"
    keys = [checkpoint_keys(p) for p in paths]
    for p, k in zip(paths[1:], keys[1:]):
        if k.keys() != keys[0].keys():
            raise SystemExit(f"{p}: tensors differ from {paths[0]}: {sorted(k.keys() ^ keys[0].keys())[:5]}")
    avg = {}
    for name in keys[0]:
        total = None
        for p, k in zip(paths, keys):
            with safe_open(k[name][0], framework="pt", device="cpu") as f:
                t = f.get_tensor(k[name][1])
            if total is None:
                total, dtype, shape = t.double(), t.dtype, t.shape
            elif t.shape != shape or t.dtype != dtype:
                raise SystemExit(f"{p}: {name} is {t.dtype} {tuple(t.shape)}, in {paths[0]} {dtype} {tuple(shape)}")
            else:
                total += t.double()
        avg[name] = (total / len(paths)).to(dtype)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fn in os.listdir(paths[0]):  # tokenizer and configs; the weights are written below
        src = os.path.join(paths[0], fn)
        if os.path.isfile(src) and not fn.endswith(".safetensors") and fn != "model.safetensors.index.json":
            shutil.copy2(src, os.path.join(tmp, fn))
    meta_model(paths[0]).save_pretrained(tmp, state_dict=avg)  # a tied lm_head is not in avg: not written
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


# -----------------------------------------------------------------------------
# training checkpoints (sft.py and rl.py): resumable DCP state + HF export, written atomically
# ckpt/step_N.tmp/ gets the DCP-sharded model + optimizer, one rank{r}.pt per rank (its RNG states and
# the stage's `extra`), meta.json and optionally hf/; it is renamed to step_N/ when complete, and
# ckpt/latest names the newest complete one, so a kill mid-save leaves the previous one as the latest.


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank_world():
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def export_hf(model, tokenizer, path, out_dtype):
    """Full (unsharded) weights gathered to rank 0's CPU tensor by tensor, written in the official layout
    (QwenVL.from_pretrained, transformers and vLLM load it) via a tmp dir, so `path` is never half-written."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank_world()[0] == 0:
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, tokenizer, state_dict={k: v.to(out_dtype) for k, v in sd.items()})
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def save_checkpoint(ckpt_dir, model, optimizer, meta, extra=None, keep_last=2, hf=None):
    """Write ckpt_dir/step_{meta['step']}; every rank calls it. meta (JSON, rank 0's) is what a resume
    needs besides the weights; extra is this rank's own state (any picklable object); hf=(tokenizer,
    dtype) also exports the model into the checkpoint's hf/. Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, world = _rank_world()
    final = os.path.join(ckpt_dir, f"step_{meta['step']:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"rng": rng, "extra": extra}, os.path.join(tmp, f"rank{rank}.pt"))
    if hf:
        export_hf(model, hf[0], os.path.join(tmp, "hf"), hf[1])
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, world_size=world), f, indent=1)
        write_manifest(tmp)  # last: a checkpoint with a manifest is complete, and a resume can check every byte
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # atomic: a step_N dir without .tmp is complete
        with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
        done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        good = [d for d in done if os.path.exists(os.path.join(ckpt_dir, d, "GOOD"))][-1:]
        for d in done[:-keep_last] if keep_last > 0 else []:
            if d not in good:  # a blow-up in the steps after the newer ones still leaves a good one (mark_good)
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(ckpt_dir):
    p = os.path.join(ckpt_dir, "latest")
    return os.path.join(ckpt_dir, open(p).read().strip()) if os.path.exists(p) else None


def load_checkpoint(path, model, optimizer):
    """Load model + optimizer (DCP reshards to the current world size) -> (meta, extra). With as many
    ranks as wrote it, each rank also gets its RNG states and its extra back; otherwise extra is None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    rank, world = _rank_world()
    if meta["world_size"] != world:
        return meta, None
    saved = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return meta, saved["extra"]


def trim_jsonl(path, step):
    """Keep only the lines of a JSONL log whose "step" is below `step`: on resume, drop what the killed
    run logged after the checkpoint (a fresh run passes a step below its first, which empties the file).
    Every line is checked before anything is written, and the file is replaced atomically (tmp + rename),
    so a kill here loses nothing. A torn last line (a run killed mid-write) is dropped with a message; a
    bad line anywhere else stops the run with the file untouched. Returns the kept records."""
    lines = []  # a fresh run starts with an empty file
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept, text = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            s = r["step"]
            if type(s) is not int:
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == last:
                print(f"{path}:{i + 1}: dropping a torn last line (a run killed mid-write): {line[:60]!r}")
                continue
            raise SystemExit(f"{path}:{i + 1}: not a JSON object with an integer \"step\" ({line[:60]!r}); the file "
                             "is left as it is: fix or delete that line, then resume") from None
        if s < step:
            kept.append(r)
            text.append(line + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return kept


# ---- checkpoint manifests: every file's size and sha256, written last, checked on resume


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder):
    found = (os.path.join(root, n) for root, _, names in os.walk(folder) for n in names)
    return sorted(os.path.relpath(p, folder) for p in found if os.path.basename(p) not in ("manifest.json", "GOOD"))


def write_manifest(folder):
    """folder/manifest.json: {relative path: [bytes, sha256]} of every file in the checkpoint. Hashing reads
    the checkpoint once more; threads hash the per-rank shards in parallel (hashlib releases the GIL), so a
    7B checkpoint with its AdamW state (~90 GB) costs about a minute per save on one node."""
    from concurrent.futures import ThreadPoolExecutor
    names = _files(folder)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(lambda n: _sha256(os.path.join(folder, n)), names))
    manifest = {n: [os.path.getsize(os.path.join(folder, n)), s] for n, s in zip(names, sums)}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path):
    """None if every file the checkpoint's manifest lists is there with its size and sha256; else what is wrong."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest.json" if os.path.isdir(path) else "missing"
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({e})"
    for name, (size, digest) in manifest.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            return f"{name} is missing"
        if os.path.getsize(p) != size:
            return f"{name} has {os.path.getsize(p)} bytes, the manifest says {size} (truncated or overwritten)"
        if _sha256(p) != digest:
            return f"{name} does not match its sha256 in the manifest (overwritten or corrupt)"
    return None


def resumable_checkpoint(ckpt_dir):
    """The checkpoint to resume from: ckpt/latest if intact, else the newest older intact one, with a message
    saying what was wrong (rank 0 checks, every rank gets its answer). None if there is no checkpoint;
    exits if there are checkpoints and none is intact. Newer step dirs than `latest` are never used: a
    divergence stop points `latest` back at the last good checkpoint (mark_good)."""
    rank, _ = _rank_world()
    answer = [None]
    if rank == 0:
        latest = latest_checkpoint(ckpt_dir)
        steps = sorted((d for d in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+", d)), reverse=True) \
            if os.path.isdir(ckpt_dir) else []
        if latest:
            steps = [d for d in steps if d < os.path.basename(latest)]
            candidates = [latest] + [os.path.join(ckpt_dir, d) for d in steps]
        else:  # no pointer (deleted, or a kill between the rename and writing it): every complete step dir
            candidates = [os.path.join(ckpt_dir, d) for d in steps]
        bad = []
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem == "no manifest.json":  # written before manifests existed: complete (renamed), not checkable
                print(f"WARNING: {path} has no manifest.json; resuming from it unverified", file=sys.stderr)
                problem = None
            if problem is None:
                answer = [path]
                break
            bad.append(f"{path}: {problem}")
            print(f"WARNING: checkpoint {path} is not usable: {problem}", file=sys.stderr)
        if bad and answer[0]:
            print(f"WARNING: resuming from the newest intact checkpoint, {answer[0]}", file=sys.stderr)
            _write_latest(ckpt_dir, answer[0])
        elif bad:
            answer = ["none intact: " + "; ".join(bad)]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[0] and answer[0].startswith("none intact: "):
        raise SystemExit(f"{ckpt_dir}: no intact checkpoint to resume from ({answer[0][13:]}). Move {ckpt_dir} "
                         "away to start over from init_from.")
    return answer[0]


def _write_latest(ckpt_dir, path):
    with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(path))
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))


def mark_good(path):
    """Record that a step after checkpoint `path` passed the blow-up check (rank 0): its weights trained
    normally. keep_last never deletes the newest such checkpoint, and a blow-up stop points latest at it."""
    if path and _rank_world()[0] == 0 and os.path.isdir(path):
        open(os.path.join(path, "GOOD"), "w").close()


def last_good_checkpoint(ckpt_dir):
    steps = sorted(d for d in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+", d)) if os.path.isdir(ckpt_dir) else []
    good = [d for d in steps if os.path.exists(os.path.join(ckpt_dir, d, "GOOD"))]
    return os.path.join(ckpt_dir, good[-1]) if good else None


def blow_up(name, value, history, step, ckpt_dir, high=0.0, low=0.0):
    """Stop the run (every rank calls it with the same values) when `value` is not finite, above `high` times
    the median of the run's last 50 values of it (history, resumed runs included), or below the median / `low`
    (a collapse: a tiny model at SFT LR 1e6 went to grad norm exactly 0 with a flat loss, never NaN). The
    message names the step and the last good checkpoint, and ckpt/latest is pointed at it, so --resume=True
    continues from there. high/low 0: that side is not checked. Returns None when the value is fine."""
    recent = sorted(history[-50:])
    median = recent[len(recent) // 2] if recent else None
    why = None
    if not math.isfinite(value):
        why = f"{name} {value}"
    elif median is not None and high and value > high * median:
        why = f"{name} {value:.4g}, more than {high:g}x its median {median:.4g} over the last {len(recent)} steps"
    elif median is not None and low and value < median / low:
        why = f"{name} {value:.4g}, less than 1/{low:g} of its median {median:.4g} over the last {len(recent)} steps"
    if why is None:
        return None
    if math.isfinite(value):
        why += " (a blow-up: lower the learning rate; blowup_factor=0 turns this check off)"
    good = last_good_checkpoint(ckpt_dir)
    if good and _rank_world()[0] == 0:
        _write_latest(ckpt_dir, good)
    raise SystemExit(f"step {step}: {why}; stopping without updating. Last good checkpoint: {good or 'none'}"
                     + (" (ckpt/latest now points at it; --resume=True continues from there)" if good else ""))


def resume_changes(old, new, refuse, keys_ignored=("resume",)):
    """Compare the config a checkpoint was written with to this run's: print a warning naming every changed
    key, and exit naming the changed keys of `refuse` ({key: why}), where the resumed data position or
    schedule would be wrong."""
    new = json.loads(json.dumps(new))  # as meta.json stores it (tuples become lists)
    changed = {k: (old.get(k), v) for k, v in new.items() if k not in keys_ignored and k in old and old[k] != v}
    stop = {k: c for k, c in changed.items() if k in refuse}
    if stop:
        raise SystemExit("cannot resume: " + "; ".join(f"{k} was {a!r}, now {b!r} ({refuse[k]})" for k, (a, b) in stop.items())
                         + ". Resume with the old values, or start a new run in another out_dir.")
    if changed:
        print("WARNING: resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
              file=sys.stderr)
    return changed


# ---- one run per out_dir


_LOCKS = []  # open lock files: the kernel holds the lock while the file stays open, and drops it when we die


def lock_out_dir(out_dir):
    """Rank 0 takes an exclusive flock on out_dir/LOCK and writes its pid, host and start time into it. A
    second run on the same out_dir exits naming the holder. The kernel releases the lock when the holder
    dies (even by kill -9), so a lock left by a dead run is taken over, with a message naming it."""
    import fcntl
    import socket
    import time
    if _rank_world()[0] != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "LOCK")
    f = open(path, "a+")
    f.seek(0)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "(no pid written yet)"
        f.close()
        raise SystemExit(f"{out_dir} is in use by another run ({holder}); wait for it to finish or stop it, or pass "
                         "another --out_dir") from None
    old = f.read().strip()
    if old:
        print(f"{path}: taking over the lock of a run that is no longer running ({old})")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS.append(f)
    import atexit
    atexit.register(lambda: (f.truncate(0), f.close()))  # a clean exit leaves an empty, unlocked file
    return path


def data_fingerprint(*parts):
    """A short sha256 of anything JSON-serialisable (sample lengths, problem ids and answers)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# Image preprocessing (no torchvision)
# Bit-for-bit the same as transformers' Qwen2VLImageProcessorPil (the PIL backend): convert to RGB
# (alpha composited on white, see load_image), PIL bicubic resize to a multiple of 28, x/255 in float64
# cast to float32, CLIP normalise in float32, then cut into 14x14 patches in 2x2 merge-block order.
# transformers' torchvision backend (what AutoImageProcessor and vLLM pick whenever torchvision is
# installed) resizes with torch's bicubic (a = -0.75, PIL's is a = -0.5): other pixels whenever an image
# is resized. Hence resize_image below, shared with rollout.VLLMEngine.

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56          # official preprocessor_config.json
MAX_PIXELS = 28 * 28 * 1280   # transformers' class default (the official file says 28*28*16384)


def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    # both sides become multiples of `factor`, the area lands in [min_pixels, max_pixels], and the
    # aspect ratio is kept as well as rounding allows (Python round: ties to even)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image):
    # path or PIL image -> RGB PIL image. Transparency is composited onto white, as Qwen's own
    # qwen-vl-utils does (QwenLM/Qwen3-VL PR #661) and transformers 4.x and 5.23 do. transformers 5.19 (the
    # version vLLM 0.32 accepts) calls image.convert("RGB") in image_transforms.convert_to_rgb, which drops
    # alpha and shows whatever colour lies under transparent pixels: a bug there (transformers #30253 review,
    # #49003), not followed here. EXIF orientation is NOT applied (neither does the image processor).
    if not isinstance(image, Image.Image):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        image = Image.open(path)
        image.load()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_bounds(model_dir, min_pixels=0, max_pixels=0):
    """The resize bounds a checkpoint was trained with (its preprocessor_config.json), unless given (> 0):
    sft.py, rl.py and eval.py all call this, so training and evaluation see the same pixels."""
    path, pre = os.path.join(model_dir, "preprocessor_config.json"), {}
    if os.path.exists(path):
        with open(path) as f:
            pre = json.load(f)
    return dict(min_pixels=min_pixels or pre.get("min_pixels", MIN_PIXELS),
                max_pixels=max_pixels or pre.get("max_pixels", MAX_PIXELS))


def resize_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, factor=28):
    """Path or PIL image -> RGB PIL image at its patch grid (sides multiples of `factor`), PIL bicubic.
    preprocess_image starts here, and rollout.VLLMEngine hands vLLM these very images: their size is
    already a fixed point of smart_resize, so vLLM's processor (transformers' torchvision backend, whose
    bicubic kernel differs from PIL's) does not resample them and both sides see the same pixels."""
    image = load_image(image)
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    return image if (w, h) == image.size else image.resize((w, h), resample=Image.BICUBIC)


def preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                     patch_size=14, temporal_patch_size=2, merge_size=2):
    image = resize_image(image, min_pixels, max_pixels, patch_size * merge_size)
    h, w = image.height, image.width
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # (h, w, 3)
    x = (x - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p): rows in 2x2 merge-block order
    # a still image is a 'video' of temporal_patch_size identical frames; the frame axis goes after C
    x = np.repeat(x[:, :, :, :, :, None], temporal_patch_size, axis=5)
    pixel_values = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, -1))  # (N, 3*2*14*14)
    return pixel_values, torch.tensor([1, gh, gw], dtype=torch.long)


def checked_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, factor=28):
    """Open, verify and fully decode an image once, when the data is loaded, so a corrupt, truncated or
    unusable file is found before training (ValueError saying what is wrong), not at the step that samples it.
    Returns what to put in the problem: the path itself, or, for an image larger than max_pixels, an RGB copy
    already resized to the size preprocess_image gives it. preprocess_image then resizes that copy to its own
    size, which PIL does as a plain copy: the same pixels, bit for bit, without decoding the big file again at
    every step (a 12000x12000 PNG is ~430 MB of RGB and seconds of decode)."""
    if isinstance(image, Image.Image):  # e.g. parquet bytes, opened lazily: decode a throwaway copy of them
        fp = getattr(image, "fp", None)
        if hasattr(fp, "getvalue"):
            from io import BytesIO
            try:
                with Image.open(BytesIO(fp.getvalue())) as im:
                    im.load()
            except Exception as e:
                raise ValueError(f"embedded {image.format} image cannot be used: {type(e).__name__}: {e}") from None
        return image
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()  # the container: PNG chunk CRCs, headers
        with Image.open(path) as im:
            im.load()  # the pixels: a truncated file fails here
            w, h = im.size
            target = smart_resize(h, w, factor, min_pixels, max_pixels)
            if w * h <= max_pixels:
                return path
            return load_image(im).resize(target[::-1], resample=Image.BICUBIC)
    except Exception as e:  # untrusted files: PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"image {path} cannot be used: {type(e).__name__}: {e}") from None


def preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **kw):
    # several images, concatenated in order: (sum N_i, 1176) and image_grid_thw (n, 3)
    out = [preprocess_image(im, min_pixels, max_pixels, **kw) for im in images]
    return torch.cat([pv for pv, _ in out]), torch.stack([g for _, g in out])


# -----------------------------------------------------------------------------
# Chat rendering: the official Qwen2.5-VL chat template, then image-pad expansion

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
# Verbatim from Qwen/Qwen2.5-VL-7B-Instruct chat_template.json; format_chat below renders the same
# text in Python (the tests check one against the other).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _is_image_item(item):
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _chat_pieces(messages, add_generation_prompt):
    # The template as a list of (text, is_assistant_content, image_or_None). Assistant content and
    # its closing <|im_end|> are flagged: they are the tokens the SFT loss is taken on.
    pieces = []
    if messages and messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", False, None))
    for msg in messages:
        train = msg["role"] == "assistant"
        pieces.append((f"<|im_start|>{msg['role']}\n", False, None))
        content = msg["content"]
        if isinstance(content, str):
            pieces.append((content, train, None))
        else:
            for item in content:
                if _is_image_item(item):
                    pieces.append((IMAGE_PLACEHOLDER, train, item.get("image", item.get("image_url"))))
                elif item.get("type") == "video" or "video" in item:
                    pieces.append((VIDEO_PLACEHOLDER, train, None))
                elif "text" in item:
                    pieces.append((item["text"], train, None))
        pieces.append(("<|im_end|>", train, None))
        pieces.append(("\n", False, None))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False, None))
    return pieces


def format_chat(messages, add_generation_prompt=False):
    # template text with ONE <|image_pad|> per image (the form vLLM expands itself)
    return "".join(text for text, _, _ in _chat_pieces(messages, add_generation_prompt))


def render_chat(messages, tokenizer, add_generation_prompt=False, min_pixels=MIN_PIXELS,
                max_pixels=MAX_PIXELS, image_root=None, merge_size=2):
    # Expand each image's <|image_pad|> to t*h*w/merge^2 copies, tokenise the whole text in one call
    # (BPE can merge across piece boundaries, e.g. "assistant\n" + "\n..." -> "\n\n"), and mark the
    # loss tokens from character spans: a token is trained if it overlaps an assistant span. A token
    # straddling the header/content boundary therefore counts as content.
    text, spans, pixel_values, grids = "", [], [], []
    for piece, train, image in _chat_pieces(messages, add_generation_prompt):
        if piece == IMAGE_PLACEHOLDER:
            assert image is not None, "image item without an 'image' field"
            if isinstance(image, (str, os.PathLike)) and image_root is not None:
                image = os.path.join(image_root, image)
            pv, grid = preprocess_image(image, min_pixels, max_pixels, merge_size=merge_size)
            pixel_values.append(pv)
            grids.append(grid)
            piece = piece.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge_size**2))
        elif piece == VIDEO_PLACEHOLDER:
            raise ValueError("video items are not supported by render_chat")
        if train:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    assert tokenizer.is_fast, "render_chat needs a fast tokenizer (for the offsets mapping)"
    enc = tokenizer(text, return_offsets_mapping=True)
    input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).view(-1, 2)
    loss_mask = torch.zeros(len(input_ids), dtype=torch.long)
    for a, b in spans:
        loss_mask |= ((offsets[:, 0] < b) & (offsets[:, 1] > a)).long()
    loss_mask[input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 0  # never a target
    return dict(input_ids=input_ids, loss_mask=loss_mask,
                pixel_values=torch.cat(pixel_values) if pixel_values else None,
                image_grid_thw=torch.stack(grids) if grids else None)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


# -----------------------------------------------------------------------------
# Tiny model pieces, offline: tokenizer, config.json, preprocessor/generation configs

# the 14 special tokens of the Qwen2/2.5 tokenizer, in id order (151643.. in the real one)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newline runs, whitespace
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def default_corpus(n_arith=400, seed=0):
    # enough text for BPE to learn the words of the demo (reasoning in <think>, \boxed answers,
    # reflection phrases, shapes and colours); digits stay single tokens by the split regex
    rng = random.Random(seed)
    words = ("think answer boxed Let me wait Wait verify check image picture count total sum "
             "difference product number numbers shape shapes circle circles square squares triangle "
             "triangles red blue green yellow black white left right top bottom first second then so "
             "therefore because answer is the of and in on how many what which are there Hmm again "
             "Yes No correct compute calculate step Step equals plus minus times divided question "
             "User Assistant system user assistant solve look carefully re-check list one by need to add "
             "redo it not right them skipped star stars apple apples coin coins ball balls cat cats "
             "Correct heart hearts").split()
    corpus = [
        "A conversation between User and Assistant. The User asks a question, and the Assistant "
        "solves it. The Assistant first thinks about the reasoning process in the mind and then "
        "provides the User with the answer. The reasoning process is enclosed within <think> </think> "
        "and the final answer is put in \\boxed{}.",
        "<think> Let me look at the image carefully. I count the shapes first. Wait, let me verify "
        "that again. </think> The answer is \\boxed{7}.",
        "Let me check: 3 + 4 = 7. Wait, I should verify. 7 - 4 = 3, so that is correct.",
        "How many red circles are in the image? Answer with a number in \\boxed{}.",
        " ".join(words), " ".join(w.capitalize() for w in words),
    ]
    # the chat template's own words start a segment right after <|im_start|> (no leading space)
    corpus += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"] * 50
    corpus += [f"{w} " for w in ("Wait", "Let", "So", "Therefore", "Hmm", "Yes", "The", "First", "Now")] * 30
    for _ in range(n_arith):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*", "/"])
        w = rng.sample(words, 4)
        corpus.append(f"<think> Let me compute {a} {op} {b}. {w[0]} {w[1]}, wait, {w[2]} {w[3]}. "
                      f"Let me verify: {a} {op} {b} = {a + b}. </think> The answer is \\boxed{{{a + b}}}.\n")
        corpus.append(f"What is {a} {op} {b}?\nThere are {a} {rng.choice(words)} in the image\n\n")
    return corpus


def build_tiny_tokenizer(corpus=None, vocab_size=1024):
    # A byte-level BPE trained in memory with Qwen2's normaliser/pre-tokenizer/decoder, then the 14
    # Qwen special tokens appended (ids vocab..vocab+13, not 151643..), wrapped for transformers.
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or default_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768)


def _mrope_section(head_dim):
    # split head_dim/2 rotary frequencies over (t, h, w) like the official [16, 24, 24] of 64
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    assert head_dim % 2 == 0 and t > 0, f"head_dim {head_dim} too small for M-RoPE"
    return [t, h, half - t - h]


def tiny_config_dict(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vision_depth=4, vision_hidden_size=32,
                     vision_num_heads=2, vision_intermediate_size=64, fullatt_block_indexes=(1, 3),
                     tie_word_embeddings=False, vocab_size=None):
    # a FLAT config.json in the official Qwen2.5-VL layout (loads in transformers 4.5x and 5.x)
    assert (vision_hidden_size // vision_num_heads) % 4 == 0, \
        "vision head_dim must be divisible by 4 (2D rope: half rows, half cols, rotate-half)"
    tid = tokenizer.convert_tokens_to_ids
    vision = VisionConfig(depth=vision_depth, hidden_size=vision_hidden_size, num_heads=vision_num_heads,
                          intermediate_size=vision_intermediate_size, out_hidden_size=hidden_size,
                          fullatt_block_indexes=list(fullatt_block_indexes))
    cfg = QwenVLConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, mrope_section=_mrope_section(hidden_size // num_attention_heads),
        max_position_embeddings=32768, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"), vision=vision)
    return cfg.to_hf(dtype="float32")


def save_tokenizer(tokenizer, out_dir):
    # transformers 5.x writes tokenizer_class "TokenizersBackend", which 4.x cannot load;
    # "Qwen2Tokenizer" loads in both and gives the same ids
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def write_tiny_extras(out_dir, tokenizer, min_pixels=56 * 56, max_pixels=28 * 28 * 64):
    # everything in a model dir except config.json and the weights
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(tokenizer, out_dir)
    tid = tokenizer.convert_tokens_to_ids
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
    }
    generation = {"bos_token_id": tid("<|endoftext|>"), "pad_token_id": tid("<|endoftext|>"),
                  "eos_token_id": [tid("<|im_end|>"), tid("<|endoftext|>")]}
    for name, obj in [("preprocessor_config.json", preprocessor), ("generation_config.json", generation)]:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    return out_dir


# -----------------------------------------------------------------------------
# Configurator (nanoGPT style), shared by sft.py / rl.py / eval.py:
#   python sft.py config/sft_demo.py --learning_rate=1e-5 --batch_size=8
# The config keys are the script's lowercase globals of simple types. A config file is plain Python
# run in its own namespace; --key=value is parsed with ast.literal_eval (falling back to the raw
# string). Unknown keys and wrong types stop the run before anything expensive starts.

_CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


def _config_keys(g):
    return {k: v for k, v in g.items()
            if not k.startswith("_") and k == k.lower() and isinstance(v, _CONFIG_TYPES)}


def _checked(key, value, default, where):
    # returns value, coerced where harmless (int -> float, list <-> tuple), or exits with a message
    if default is None:  # a None default accepts anything
        return value
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, (list, tuple)),
          tuple: lambda v: isinstance(v, (list, tuple)),
          dict: lambda v: isinstance(v, dict)}[type(default)]
    if not ok(value):
        raise SystemExit(f"config error ({where}): {key} must be {type(default).__name__} "
                         f"like its default {default!r}, got {type(value).__name__} {value!r}")
    return type(default)(value) if type(default) in (float, list, tuple) else value


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return SystemExit(f"config error ({where}): unknown key '{key}'{hint} (--help lists the keys)")


def _key_comments(path):
    # the trailing `# comment` of each top-level `key = value  # comment` line of the script
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, TypeError):
        return {}
    found = (re.match(r"^([a-z_][a-z0-9_]*)\s*=.*?#\s*(.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def configure(g, argv):
    keys = _config_keys(g)
    defaults = dict(keys)  # types are checked against the script's defaults, not a config file's values
    if "--help" in argv or "-h" in argv:
        script = os.path.basename(g.get("__file__", "script.py"))
        print(f"usage: python {script} [config_file.py] [--key=value ...]\n")
        notes = _key_comments(g.get("__file__"))
        width = max(map(len, keys), default=0)
        for k, v in keys.items():
            print(f"  --{k:<{width}} = {v!r}" + (f"  # {notes[k]}" if notes.get(k) else ""))
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file not found: {arg}")
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in _config_keys(ns).items():
                if k not in keys:
                    raise _unknown(k, keys, arg)
                g[k] = keys[k] = _checked(k, v, defaults[k], arg)
        else:
            if "=" not in arg:
                raise SystemExit(f"config error: expected --key=value, got {arg}")
            k, raw = arg[2:].split("=", 1)
            if k not in keys:
                raise _unknown(k, keys, arg)
            try:
                v = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                v = raw
            if isinstance(defaults[k], str) and not isinstance(v, str):
                v = raw  # --run_name=123 means the string "123"
            g[k] = keys[k] = _checked(k, v, defaults[k], arg)
    return dict(keys)


def build_tiny(out_dir, seed=0, corpus=None, vocab_size=1024, min_pixels=56 * 56, max_pixels=28 * 28 * 64, **shape):
    """A tiny random Qwen2.5-VL + byte-level BPE tokenizer with Qwen's special tokens and chat template,
    saved in the official layout, offline. `shape` overrides tiny_config_dict's sizes (hidden_size, ...)."""
    tok = build_tiny_tokenizer(corpus, vocab_size)
    cfg = QwenVLConfig.from_hf(tiny_config_dict(tok, **shape))
    model = QwenVL(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(out_dir)
    write_tiny_extras(out_dir, tok, min_pixels=min_pixels, max_pixels=max_pixels)
    return out_dir


if __name__ == "__main__":
    # python model.py tiny OUT_DIR [--hidden_size=128 --num_hidden_layers=4 ...]
    # python model.py average HF_DIR HF_DIR ... --out=OUT_DIR
    if len(sys.argv) > 1 and sys.argv[1] == "average":
        outs = [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--out=")]
        dirs = [a for a in sys.argv[2:] if not a.startswith("--")]
        if len(outs) != 1 or len(dirs) < 2:
            sys.exit("usage: python model.py average HF_DIR HF_DIR [...] --out=OUT_DIR")
        for d in dirs:
            if not os.path.isfile(os.path.join(d, "config.json")):
                sys.exit(f"not an HF checkpoint (no config.json): {d}")
        print(f"averaged {len(dirs)} checkpoints into {average_checkpoints(dirs, outs[0])}")
        sys.exit(0)
    import inspect
    keys = {k: p.default for f in (tiny_config_dict, build_tiny) for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty and k != "corpus"}  # build_tiny's vocab_size wins
    wants_help = "--help" in sys.argv or "-h" in sys.argv
    if wants_help or len(sys.argv) < 3 or sys.argv[1] != "tiny":
        print("usage: python model.py tiny OUT_DIR [--key=value ...]   (a tiny random Qwen2.5-VL + tokenizer, offline)\n"
              "       python model.py average HF_DIR HF_DIR [...] --out=OUT_DIR\n")
        for k, v in keys.items():
            print(f"  --{k} = {v!r}")
        sys.exit(0 if wants_help else 1)
    kw = {}
    for arg in sys.argv[3:]:
        k, _, v = arg.lstrip("-").partition("=")
        if k not in keys:
            raise _unknown(k, keys, arg)
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            sys.exit(f"config error ({arg}): {k} must be a Python literal like its default {keys[k]!r}")
    path = build_tiny(sys.argv[2], **kw)
    n = sum(p.numel() for p in QwenVL.from_pretrained(path).parameters())
    print(f"wrote a tiny random Qwen2.5-VL ({n / 1e3:.0f}k parameters) and its tokenizer to {path}")
