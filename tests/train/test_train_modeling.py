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


def _sdpa_calls(monkeypatch):
    """Records the attn_mask and is_causal that transformers hands torch's SDPA (also while Dynamo traces)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_causal_sdpa_trains_as_masked_sdpa_on_right_padded_rows(tiny_dir, tokenizer, monkeypatch, packed):
    """One sequence per row, right-padded (as the collator pads): SDPA's causal kernel without a mask
    gives the loss and the gradients of transformers' own masked SDPA."""
    from transformers import AutoModelForCausalLM

    from train.data.batches import Collator
    from train.modeling import CAUSAL_SDPA, register_causal_sdpa

    register_causal_sdpa()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (13, 7, 10):
        ids = torch.randint(3, 200, (n,), generator=g).numpy()
        row = {"input_ids": ids, "labels": ids.copy()}
        if packed:
            row["position_ids"] = list(range(n))
        rows.append(row)
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    batch.pop("num_tokens")
    assert batch["input_ids"].shape[1] == 16  # every row padded
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="sdpa", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation=CAUSAL_SDPA, dtype=torch.float32)
    loss_ref, grads_ref = _loss_and_grads(ref, batch)
    calls = _sdpa_calls(monkeypatch)
    loss, grads = _loss_and_grads(ours, batch)
    assert calls and all(mask is None and causal for mask, causal in calls)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_causal_sdpa_passes_no_mask_while_compiled(tiny_dir, monkeypatch):
    """DeepCompile's whole-model graph: traced by Dynamo, transformers 5.17's SDPA builds a dense mask
    even for rows without padding (its skip tests read tensor values; on the H200 SDPA then ran 3x
    slower); the causal variant passes none, traced or not."""
    from transformers import AutoModelForCausalLM

    from train.modeling import CAUSAL_SDPA, register_causal_sdpa

    register_causal_sdpa()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation=CAUSAL_SDPA, dtype=torch.float32)
    calls = _sdpa_calls(monkeypatch)
    torch.compile(model, backend="eager", fullgraph=True)(**batch).loss.backward()
    assert calls and all(mask is None and causal for mask, causal in calls)


def test_causal_sdpa_only_where_it_is_exact(tiny_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from train.modeling import CAUSAL_SDPA, resolve_attn_implementation

    config = AutoConfig.from_pretrained(str(tiny_dir))
    assert resolve_attn_implementation("sdpa", True, config) == CAUSAL_SDPA
    assert resolve_attn_implementation("sdpa", False, config) == "sdpa"  # packed rows: block-diagonal mask
    assert resolve_attn_implementation("eager", True, config) == "eager"
    windowed = AutoConfig.from_pretrained(str(tiny_dir), use_sliding_window=True, sliding_window=8)
    windowed.layer_types = ["sliding_attention"] * config.num_hidden_layers
    assert resolve_attn_implementation("sdpa", True, windowed) == "sdpa"
    windowed.layer_types = None
    assert resolve_attn_implementation("sdpa", True, windowed) == "sdpa"
    other = AutoConfig.for_model("gemma3_text")  # a model type whose masks may carry more than causality
    assert resolve_attn_implementation("sdpa", True, other) == "sdpa"
    # auto: on CUDA (without flash_attn) packed rows get FlexAttention's document mask, unless the whole
    # model is compiled as one graph; rows of one example causal SDPA; the CPU plain SDPA
    assert resolve_attn_implementation("auto", False, config, cuda=True) == "flex_attention"
    assert resolve_attn_implementation("auto", False, config, cuda=True, whole_model_compiled=True) == "sdpa"
    assert resolve_attn_implementation("auto", True, config, cuda=True) == CAUSAL_SDPA
    assert resolve_attn_implementation("auto", False, other, cuda=True) == "sdpa"
    assert resolve_attn_implementation("auto", False, config, cuda=False) == "sdpa"
    # the saved model says nothing of it: it loads with the stock implementations elsewhere
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation=CAUSAL_SDPA)
    model.save_pretrained(tmp_path / "saved")
    assert CAUSAL_SDPA not in (tmp_path / "saved" / "config.json").read_text()


def test_causal_sdpa_mask_builds_one_where_causality_is_not_all():
    """A training forward gets no mask; a sliding window (either spelling) or decoding with a cache
    gets transformers' own mask."""
    from transformers.masking_utils import causal_mask_function

    from train.modeling import causal_sdpa_mask

    common = {"batch_size": 1, "mask_function": causal_mask_function, "attention_mask": None, "device": "cpu"}
    assert causal_sdpa_mask(q_length=6, kv_length=6, q_offset=0, **common) is None
    assert causal_sdpa_mask(q_length=6, kv_length=6, local_size=4, **common) is not None
    assert causal_sdpa_mask(q_length=3, kv_length=6, q_offset=3, **common) is not None
