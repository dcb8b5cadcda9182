"""HF -> Megatron (TP=2, PP=2) -> HF is bitwise identical, output is sharded, and bad inputs get clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_m2po.checkpoint.hf_io import INDEX_FILE, HFSafetensorsReader
from megatron_m2po.models import load_hf_config
from megatron_m2po.models.tiny import make_tiny_model

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_process_group():
    torch.set_num_threads(1)
    yield
    platform.destroy_distributed()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "qwen3_moe"])
def test_hf_megatron_hf_round_trip_is_bitwise(tmp_path, arch):
    hf_dir = make_tiny_model(arch, tmp_path / "hf", seed=5)
    experts = {"expert_parallel": 2} if arch == "qwen3_moe" else {}
    convert_hf_to_megatron(hf_dir, tmp_path / "megatron", tensor_parallel=2, pipeline_parallel=2, **experts)
    # a tiny shard limit forces several safetensors shards + an index
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", max_shard_bytes=64 * 1024)
    assert (tmp_path / "back" / INDEX_FILE).exists()
    with HFSafetensorsReader(hf_dir) as original, HFSafetensorsReader(tmp_path / "back") as back:
        assert sorted(original.names()) == sorted(back.names())
        for name in original.names():
            a, b = original.read(name), back.read(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (hf_dir / "config.json").read_text()
    )
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert load_hf_config(tmp_path / "megatron").architectures == load_hf_config(hf_dir).architectures


def test_transformers_loads_the_converted_moe_model(tmp_path):
    """Megatron -> HF writes the per-expert Hub names, which transformers 5 fuses on load: same model."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=6)
    convert_hf_to_megatron(hf_dir, tmp_path / "megatron", expert_parallel=4)
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", max_shard_bytes=32 * 1024)
    with HFSafetensorsReader(tmp_path / "back") as back:
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in back.names()
        assert not any("gate_up_proj" in name for name in back.names())
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    for (name, a), (name_b, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    ids = torch.randint(1, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)


def test_expert_parallel_must_divide_the_experts(tmp_path):
    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf")
    with pytest.raises(ValueError, match=r"config\.json: expert_parallel=3 does not divide num_experts=8"):
        convert_hf_to_megatron(hf_dir, tmp_path / "m", expert_parallel=3)
    dense = make_tiny_model("qwen3", tmp_path / "dense")
    with pytest.raises(ValueError, match="expert_parallel=2 does not divide num_experts=0"):
        convert_hf_to_megatron(dense, tmp_path / "m2", expert_parallel=2)
    to_megatron = _tool("convert_hf_to_megatron").main
    with pytest.raises(ValueError, match="expert_parallel=3 does not divide num_experts=8"):
        to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m3"), "--ep", "3"])
    assert to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m4"), "--ep", "4"]) == 0
    marker = json.loads((tmp_path / "m4" / "m2po_checkpoint.json").read_text())
    assert marker["expert_parallel"] == 4 and marker["architecture"] == "Qwen3MoeForCausalLM"


def test_raw_dist_checkpoint_converts_with_hf_config_dir(tmp_path):
    """A training run's checkpoint (a plain dist checkpoint of {"model": ..., ...}) exports to HF too."""
    from megatron_m2po.checkpoint import model_sharded_state_dict, save_sharded

    hf_dir = make_tiny_model("llama", tmp_path / "hf", seed=2)
    platform.init_distributed()
    model = load_policy(hf_dir)
    save_sharded({"model": model_sharded_state_dict(model), "step": 7}, tmp_path / "run" / "dist")
    with pytest.raises(ValueError, match="--hf-config-dir"):
        convert_megatron_to_hf(tmp_path / "run" / "dist", tmp_path / "x")
    convert_megatron_to_hf(tmp_path / "run" / "dist", tmp_path / "back", hf_config_dir=hf_dir)
    with HFSafetensorsReader(hf_dir) as a, HFSafetensorsReader(tmp_path / "back") as b:
        assert sorted(a.names()) == sorted(b.names())
        assert all(torch.equal(a.read(n), b.read(n)) for n in a.names())


def test_bf16_round_trip_is_bitwise(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = make_tiny_model("qwen2", tmp_path / "hf", seed=4)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(hf_dir / "model.safetensors").items()}
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_megatron(hf_dir, tmp_path / "m", tensor_parallel=2)
    convert_megatron_to_hf(tmp_path / "m", tmp_path / "back")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor), name


def _tool(name: str):
    """Import a tools/ script as a module, so its `main(argv)` runs in-process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_clis(tmp_path, capsys):
    hf_dir = make_tiny_model("qwen3", tmp_path / "hf", num_hidden_layers=2)
    to_megatron = _tool("convert_hf_to_megatron").main
    to_hf = _tool("convert_megatron_to_hf").main
    assert to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m"), "--tp", "2", "--pp", "2"]) == 0
    assert "hf -> megatron" in capsys.readouterr().err  # the progress bar
    assert to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 0
    with HFSafetensorsReader(hf_dir) as a, HFSafetensorsReader(tmp_path / "back") as b:
        assert all(torch.equal(a.read(n), b.read(n)) for n in a.names())
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel=3"):
        to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m3"), "--tp", "3"])
    with pytest.raises(ValueError, match="num_hidden_layers=2 is not divisible by pipeline_parallel=4"):
        to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "m4"), "--pp", "4"])


# ------------------------------------------------------------------------------------------- bad input


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
        load_hf_config(tmp_path)


def test_corrupt_config(tmp_path):
    hf_dir = make_tiny_model("qwen2", tmp_path / "m")
    (hf_dir / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], ')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_hf_config(hf_dir)


def test_unknown_architecture(tmp_path):
    hf_dir = make_tiny_model("llama", tmp_path / "m")
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture \['MistralForCausalLM'\]"):
        load_hf_config(hf_dir)


@pytest.mark.parametrize(
    "key,value,tp",
    [("num_attention_heads", 6, 4), ("num_key_value_heads", 2, 4), ("vocab_size", 330, 4)],
)
def test_tp_must_divide(tmp_path, key, value, tp):
    overrides = {key: value}
    if key == "num_attention_heads":
        overrides["num_key_value_heads"] = 2
    if key == "vocab_size":
        overrides["num_attention_heads"] = overrides["num_key_value_heads"] = 4
    hf_dir = make_tiny_model("qwen3", tmp_path / "m", **overrides)
    with pytest.raises(ValueError, match=rf"{key}={value} is not divisible by tensor_parallel={tp}"):
        load_hf_config(hf_dir, tensor_parallel=tp)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        (
            "rope_scaling",
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
            "rope_type='yarn'",
        ),
        ("attention_bias", True, "attention_bias=true is not supported for LlamaForCausalLM"),
    ],
)
def test_unsupported_option(tmp_path, key, value, message):
    hf_dir = make_tiny_model("llama", tmp_path / "m")
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None) if key == "rope_scaling" else None
    config[key] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_hf_config(hf_dir)


def test_missing_weights(tmp_path):
    hf_dir = make_tiny_model("qwen3", tmp_path / "m")
    (hf_dir / "model.safetensors").unlink()
    platform.init_distributed()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_policy(hf_dir)


def test_corrupt_weights(tmp_path):
    hf_dir = make_tiny_model("qwen3", tmp_path / "m")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    platform.init_distributed()
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_policy(hf_dir)


def test_weights_not_matching_config(tmp_path):
    hf_dir = make_tiny_model("qwen3", tmp_path / "m")
    other = make_tiny_model("qwen3", tmp_path / "other", intermediate_size=96)
    (hf_dir / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    platform.init_distributed()
    with pytest.raises(ValueError, match=r"mlp\.linear_fc1\.weight"):
        load_policy(hf_dir)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = make_tiny_model("qwen2", tmp_path / "m")
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, hf_dir / "model.safetensors")
    platform.init_distributed()
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        load_policy(hf_dir)


def test_not_a_megatron_checkpoint(tmp_path):
    hf_dir = make_tiny_model("qwen3", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="neither a megatron_m2po checkpoint"):
        convert_megatron_to_hf(hf_dir, tmp_path / "out")
