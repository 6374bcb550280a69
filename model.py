"""
Qwen2.5-VL in plain PyTorch: the vision tower, the M-RoPE language model, a KV cache, memory-lean
per-token log-probs, image preprocessing and chat rendering without torchvision, and checkpoint IO
in the official Hugging Face layout (so transformers and vLLM load what we write, and we load theirs).

    model = QwenVL.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct-local-dir", device="cuda", dtype=torch.bfloat16)
    batch = render_chat(messages, tokenizer)                 # ids, loss mask, pixel_values, image_grid_thw
    logits = model(batch["input_ids"][None], batch["pixel_values"], batch["image_grid_thw"])
    python model.py tiny out/tiny                            # a tiny random model + tokenizer, offline

The module tree mirrors the official checkpoint names (`model.layers.*`, `visual.*`, `lm_head.*`),
so `state_dict()` is the checkpoint. Facts and shapes: shared/notes/qwen25vl.md.
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
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
        # normalise in fp32, cast back, then scale in the model dtype (what the checkpoints were trained with)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
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
        """cos/sin (N, hd) of the 2-D rotary: [row freqs | col freqs] twice; rows/cols in patch units,
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
        angles = (pos[:, :, None].float() * inv_freq).flatten(1)  # (N, hd/2)
        emb = torch.cat([angles, angles], -1)
        return emb.cos(), emb.sin()

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


def mrope_cos_sin(position_ids, config, dtype):
    """cos/sin (B, T, hd) of M-RoPE: frequency j takes its position from axis 0 (t), 1 (h) or 2 (w)
    according to mrope_section; computed in fp32, then cast to the activation dtype (as the reference)."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device, dtype=torch.float) / hd)
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, T, hd/2)
    axis = torch.repeat_interleave(torch.arange(3, device=freqs.device) % 3,
                                   torch.tensor(config.mrope_section, device=freqs.device))  # (hd/2,)
    freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding, plus what decoding needs to
    place new tokens: which cached slots are real (left padding) and each row's rope delta."""

    def __init__(self, num_layers, batch_size, num_kv_heads, max_len, head_dim, device, dtype):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.rope_deltas = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far (same for every row; left padding keeps rows aligned)

    def update(self, layer, k, v):  # k, v (B, Hkv, T, hd) -> all keys/values so far (B, Hkv, L+T, hd)
        L, T = self.length, k.shape[2]
        assert L + T <= self.k.shape[3], f"KV cache full: {L}+{T} > {self.k.shape[3]} slots"
        self.k[layer, :, :, L:L + T] = k
        self.v[layer, :, :, L:L + T] = v
        return self.k[layer, :, :, :L + T], self.v[layer, :, :, :L + T]

    def select(self, index):
        """Keep/reorder/replicate rows, e.g. index = arange(B).repeat_interleave(n) shares one prefill
        among n samples, or the rows still generating."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.key_mask, self.rope_deltas = self.key_mask[index], self.rope_deltas[index]


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
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cu_seqlens is not None:  # packed rows: causal attention inside each sample only
            flat = lambda t: t.transpose(1, 2).reshape(B * T, -1, self.hd)  # noqa: E731
            y = segment_attention(flat(q), flat(k), flat(v), cu_seqlens, causal=True).view(B, T, -1)
            return self.o_proj(y)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
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
    lp = torch.cat(lps).view(B, T)
    return (lp, torch.cat(ents).view(B, T)) if return_entropy else lp


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
            elif position_ids is None:  # decode: the real-token index + delta, same on all three axes
                p = kv_cache.key_mask[:, :L].sum(-1, keepdim=True) + kv_cache.rope_deltas  # (B, 1)
                position_ids = (p + torch.arange(T, device=p.device)).expand(3, B, T)
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
