"""Model side: directory checks, LoRA merge, FLOP counting, the benchmark model writer (seconds)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from train.modeling import ModelDirError, check_model_dir, flops_per_token, merge_lora_state_dict

# peft asks transformers with the pre-5.2x name
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def copy_model(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_complete_tiny_model_passes(tiny_dir):
    check_model_dir(str(tiny_dir))


def test_missing_dir_and_hub_names(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist$"):
        check_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelDirError, match="a hub name\\? models must be local directories"):
        check_model_dir("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")


@pytest.mark.parametrize("skip, message", [
    (("config.json",), "has no config.json"),
    (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    (("model.safetensors",), "has no weights .* pass --random_init"),
])
def test_incomplete_dirs(tmp_path, tiny_dir, skip, message):
    d = copy_model(tiny_dir, tmp_path / "m", skip)
    with pytest.raises(ModelDirError, match=message):
        check_model_dir(str(d))


def test_truncated_and_missing_shards(tmp_path, tiny_dir):
    d = copy_model(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirError, match="model.safetensors is truncated"):
        check_model_dir(str(d))
    (d / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model-00001-of-00002.safetensors").write_bytes(data)
    with pytest.raises(ModelDirError, match="1 of 2 weight shards missing \\(model-00002-of-00002"):
        check_model_dir(str(d))
    check_model_dir(str(d), need_weights=False)  # --random_init needs config and tokenizer only


def test_merged_lora_weights_match_peft(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # lora_B starts at zero; make the adapter do something
    ids = torch.tensor([[5, 9, 33, 7, 100]])
    with torch.no_grad():
        expected = model(ids).logits
        merged_sd = merge_lora_state_dict(model.state_dict(), model.peft_config["default"])
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
        assert set(merged_sd) == set(plain.state_dict())
        plain.load_state_dict(merged_sd)
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_flops_per_token(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding doubles as the LM head
    attention = 12 * c.num_hidden_layers * c.hidden_size * 128
    assert flops_per_token(model, 128) == 6 * n + attention
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert flops_per_token(lora, 128) == 4 * n + 6 * trainable + attention


def test_benchmark_shapes_without_weights(tmp_path):
    from transformers import AutoConfig

    from train.tiny_model import PRESETS, main

    main(["--preset", "deepseek-r1-distill-qwen-32b", str(tmp_path / "r1")])
    check_model_dir(str(tmp_path / "r1"), need_weights=False)
    with pytest.raises(ModelDirError, match="pass --random_init"):
        check_model_dir(str(tmp_path / "r1"))
    config = AutoConfig.from_pretrained(str(tmp_path / "r1"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (5120, 64, 152064)
    # with the tiny model's dataset beside it, sized by --train-examples
    main(["--preset", "qwen2.5-0.5b", "--train-examples", "300", str(tmp_path / "q05")])
    assert len((tmp_path / "q05" / "data" / "train.jsonl").read_text().splitlines()) == 300
    config = AutoConfig.from_pretrained(str(tmp_path / "q05"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == \
        (896, 24, 14, 4864)
    # the preset is the published config.json (the planner's tests keep a copy)
    published = json.loads((Path(__file__).parents[1] / "unit" / "data" / "models" / "Qwen2.5-0.5B.json").read_text())
    assert {k: v for k, v in published.items() if k not in ("transformers_version", "use_cache")} == \
        PRESETS["qwen2.5-0.5b"]
    # a user's config.json works the same way
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(PRESETS["qwen2.5-1.5b"]))
    main(["--from-config", str(cfg), str(tmp_path / "q")])
    assert AutoConfig.from_pretrained(str(tmp_path / "q")).intermediate_size == 8960
