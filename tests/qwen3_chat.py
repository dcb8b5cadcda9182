"""Qwen3's real chat template (tests/fixtures/qwen3) on the tiny byte-level tokenizer, plus Qwen3's own added
tokens, so multi-turn tests render conversations exactly as Qwen3 models see them without a hub download."""

from __future__ import annotations

from pathlib import Path

from megatron_m2po.models.tiny import IM_END, build_tokenizer, make_tiny_model, padded_vocab_size

TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3" / "chat_template.jinja"
# Added (not special) tokens of Qwen3's tokenizer_config.json that its chat template writes.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run Python code and return what it prints.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "the code"}},
                "required": ["code"],
            },
        },
    }
]


def qwen3_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = TEMPLATE.read_text()
    return tokenizer


def im_end_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IM_END)


def make_qwen3_chat_model(out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """A tiny Qwen3 model directory whose tokenizer is `qwen3_tokenizer()` (vocabulary padded to cover it)."""
    tokenizer = qwen3_tokenizer()
    out = make_tiny_model(
        "qwen3", out_dir, seed=seed, vocab_size=padded_vocab_size(len(tokenizer)), **config_overrides
    )
    tokenizer.save_pretrained(out)
    return out
