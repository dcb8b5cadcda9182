"""The tiny model dirs load with transformers' Auto classes and carry a working chat template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2po.models.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
REPO_TOOLS = "tools/make_tiny_model.py"


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_tiny_model_loads_and_chats(tmp_path, arch):
    torch.set_num_threads(1)
    out = make_tiny_model(arch, tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size and model.config.vocab_size % 64 == 0

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?\nAnswer: ~é"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # lossless: byte-level, nothing unknown
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_and_overridable(tmp_path):
    a = make_tiny_model("qwen3", tmp_path / "a", seed=3, hidden_size=32, num_hidden_layers=1)
    b = make_tiny_model("qwen3", tmp_path / "b", seed=3, hidden_size=32, num_hidden_layers=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = AutoModelForCausalLM.from_pretrained(a).config
    assert (config.hidden_size, config.num_hidden_layers) == (32, 1)


def test_cli_writes_model(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, REPO_TOOLS, "--arch", "llama", "--out", str(out), "--set", "num_hidden_layers=1"],
        check=True,
        cwd=REPO,
    )
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.num_hidden_layers == 1 and config.rope_parameters["rope_type"] == "llama3"


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model arch 'gpt2'"):
        make_tiny_model("gpt2", tmp_path / "x")
