"""Tiny HF-format models and a character-level tokenizer, built offline for tests and the CPU demo.

No hub downloads exist on development machines, so every test and the demo start from a model made
here: a real `transformers` model of the requested family with small dimensions, saved as
safetensors, plus a `tokenizers`-built tokenizer with a Qwen-style chat template.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import models as token_models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
VOCAB_MULTIPLE = 64
# Qwen2's pre-tokenizer split (the regex transformers' Qwen2Tokenizer uses), so both loaders agree.
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen-style ChatML template: the same shape the real Qwen models use, so prompts built by the data
# pipeline look like production prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HF architecture name and family defaults for each --arch choice. The defaults mirror the real
# families: Qwen2 has qkv bias, Qwen3 has q/k norms and an explicit head_dim, Qwen3-MoE routes each
# token to 2 of 8 experts, Llama 3.2 ties the embeddings and uses llama3 rope scaling.
ARCHS: dict[str, dict[str, Any]] = {
    "qwen3": {"config_class": "Qwen3Config", "tie_word_embeddings": False, "rope_theta": 1_000_000.0},
    "qwen2": {"config_class": "Qwen2Config", "tie_word_embeddings": False, "rope_theta": 1_000_000.0},
    # Qwen3-30B-A3B's MoE options at tiny size: every layer sparse, softmax top-k renormalised
    "qwen3_moe": {
        "config_class": "Qwen3MoeConfig",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
    },
    "llama": {
        "config_class": "LlamaConfig",
        "tie_word_embeddings": True,
        "rope_theta": 500_000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    },
}

TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}


def byte_alphabet() -> list[str]:
    """The 256 byte-level symbols (GPT-2 / Qwen byte-to-unicode map): every string tokenizes, none is unknown."""
    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)


def _byte_order(symbol: str) -> tuple[int, int]:
    # printable ASCII keeps its own code point under the byte-level map; list those first, in ASCII order
    code = ord(symbol)
    return (0, code) if 33 <= code <= 126 else (1, code)


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n_tokens // multiple) * multiple


def build_tokenizer(vocab_size: int | None = None):
    """A character-level (one token per byte, no merges) fast tokenizer with ChatML special tokens.

    It is a Qwen-style byte-level BPE without merges, so `transformers` loads it identically through
    `Qwen2Tokenizer` (which AutoTokenizer picks for model_type qwen2) and through `TokenizersBackend`.
    The vocabulary is padded with reserved special tokens up to a multiple of 64 (or `vocab_size`) so that
    `len(tokenizer) == config.vocab_size` and the vocabulary divides every TP size we test.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in byte_alphabet():
        vocab[symbol] = len(vocab)
    total = vocab_size if vocab_size is not None else padded_vocab_size(len(vocab))
    if total < len(vocab):
        raise ValueError(f"vocab_size={total} is smaller than the {len(vocab)} tokens of the byte tokenizer")
    reserved = [f"<|reserved_{i}|>" for i in range(total - len(vocab))]
    for tok in reserved:
        vocab[tok] = len(vocab)

    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS + reserved)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=TINY_DIMS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str, **config_overrides: Any):
    """The `transformers` config of a tiny model of family `arch` (a key of `ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; choose one of {sorted(ARCHS)}")
    family = dict(ARCHS[arch])
    config_class = getattr(transformers, family.pop("config_class"))
    kwargs: dict[str, Any] = {**TINY_DIMS, **family}
    kwargs.update(config_overrides)
    kwargs.setdefault("vocab_size", padded_vocab_size(len(SPECIAL_TOKENS) + 256))
    kwargs.update(bos_token_id=None, eos_token_id=0, pad_token_id=0)
    if arch == "qwen2":
        kwargs.pop("head_dim", None)  # Qwen2 derives head_dim = hidden / heads
    config = config_class(**kwargs)
    config.architectures = [config_class.__name__.replace("Config", "ForCausalLM")]
    config.dtype = torch.float32
    return config


# Std of a tiny MoE model's router weights: with the usual 0.02 the router logits of a 64-wide model are
# ~0.01 apart and the top-k choice is nearly a coin flip; at 1.0 choices are decided by clear margins, as in
# a trained router (parity tests check the margin on every token).
ROUTER_STD = 1.0


def _perturb_constant_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights start at 1 and biases at 0; make them random so parity tests can tell every tensor apart.
    MoE routers get decisive weights (`ROUTER_STD`)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            elif name.endswith("mlp.gate.weight"):
                param.copy_(ROUTER_STD * torch.randn(param.shape, generator=generator))


def make_tiny_model(arch: str, out_dir: str | Path, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a randomly initialised HF model dir (config.json, model.safetensors, tokenizer + chat template).

    `config_overrides` go to the HF config (e.g. `hidden_size=256, num_hidden_layers=4`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    tokenizer = build_tokenizer(config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} < tokenizer size {len(tokenizer)}")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_constant_weights(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info(
        "wrote tiny %s model (%d parameters) to %s", arch, sum(p.numel() for p in model.parameters()), out
    )
    return out
