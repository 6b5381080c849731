"""Write a model directory that needs no download: a tokenizer trained here, plus either a tiny
random-initialised Qwen2 with a small learnable dataset (the lab demo and the tests), or a real
model's config shape without weights (GPU benchmarks, trained with `--random_init`).

    python -m train.tiny_model DIR                        # tiny Qwen2 + DIR/data/{train,eval}.jsonl
    python -m train.tiny_model --preset qwen2.5-1.5b DIR  # Qwen2.5-1.5B shape, no weights, + the same data
    python -m train.tiny_model --from-config config.json DIR
"""

import argparse
import json
import os
import random
import sys

# Qwen's ChatML layout. The tiny tokenizer uses it so that `messages` data trains like on Qwen.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Shapes of real models (from their published config.json), for random-init benchmarks.
PRESETS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
    "deepseek-r1-distill-qwen-32b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "max_window_layers": 64,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
}

# The 32B shape cut to 8 of its 64 layers (5.46B parameters): the 32B model's per-layer work and
# memory on one GPU (GPU benchmark W4).
PRESETS["deepseek-r1-distill-qwen-32b-8layers"] = dict(PRESETS["deepseek-r1-distill-qwen-32b"], num_hidden_layers=8,
                                                       max_window_layers=8)

LETTERS = "abcdefghijklmnop"


def make_task(rng):
    """One (prompt, completion) pair from a few patterns a tiny model learns in a few dozen steps."""
    kind = rng.randrange(4)
    if kind == 0:
        start = rng.randrange(0, 40)
        return f"count from {start}:", " " + " ".join(str(start + i) for i in range(1, 6))
    if kind == 1:
        a, b = rng.randrange(0, 10), rng.randrange(0, 10)
        return f"{a} plus {b} is", f" {a + b}"
    if kind == 2:
        word = "".join(rng.choice(LETTERS[:8]) for _ in range(rng.randrange(3, 6)))
        return f"repeat {word}:", f" {word} {word}"
    i = rng.randrange(len(LETTERS) - 1)
    return f"after {LETTERS[i]} comes", f" {LETTERS[i + 1]}"


def make_records(n, seed):
    """JSONL records in all three formats: prompt/completion, chat messages and plain text."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        fmt = rng.random()
        prompt, completion = make_task(rng)
        if fmt < 0.45:
            records.append({"prompt": prompt, "completion": completion})
        elif fmt < 0.8:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]
            if rng.random() < 0.3:
                prompt2, completion2 = make_task(rng)
                messages += [{"role": "user", "content": prompt2},
                             {"role": "assistant", "content": completion2.strip()}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "You answer briefly."})
            records.append({"messages": messages})
        else:
            records.append({"text": prompt + completion})
    return records


def build_tokenizer(corpus, vocab_size=640):
    """A byte-level BPE trained on `corpus`, wrapped as a transformers fast tokenizer with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def corpus_for(records, chat_template=CHATML_TEMPLATE):
    import jinja2

    template = jinja2.Environment().from_string(chat_template)
    for r in records:
        if "messages" in r:
            yield template.render(messages=r["messages"], add_generation_prompt=False)
        elif "text" in r:
            yield r["text"]
        else:
            yield r["prompt"] + r["completion"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_generation_config(out_dir, tokenizer):
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)


def write_tiny(out_dir, seed=0, n_train=1200, n_eval=100, hidden_size=64, layers=2):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    records = make_records(n_train + n_eval, seed)
    tokenizer = build_tokenizer(corpus_for(records))
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Unit-norm embedding rows instead of std 0.02: with the tied head at that scale a
        # 64-wide model can hardly move its logits, and a LoRA (embeddings frozen) learns nothing.
        model.get_input_embeddings().weight.normal_(0.0, hidden_size ** -0.5)
    model.save_pretrained(out_dir)
    write_generation_config(out_dir, tokenizer)
    write_jsonl(os.path.join(out_dir, "data", "train.jsonl"), records[:n_train])
    write_jsonl(os.path.join(out_dir, "data", "eval.jsonl"), records[n_train:])
    return out_dir


def write_config_only(out_dir, config_dict, seed=0, n_train=1200, n_eval=100):
    """config.json of a real model plus the locally trained tokenizer; no weights (`--random_init`).
    The tiny model's learnable dataset goes beside it (DIR/data), so that a real shape can be
    fine-tuned on files as a job is (benchmarks with --synthetic_samples ignore it)."""
    records = make_records(400, seed)
    tokenizer = build_tokenizer(corpus_for(records))
    if config_dict.get("vocab_size", 0) < len(tokenizer):
        raise SystemExit(f"config vocab_size {config_dict.get('vocab_size')} < tokenizer size {len(tokenizer)}")
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    write_generation_config(out_dir, tokenizer)
    data = make_records(n_train + n_eval, seed)
    write_jsonl(os.path.join(out_dir, "data", "train.jsonl"), data[:n_train])
    write_jsonl(os.path.join(out_dir, "data", "eval.jsonl"), data[n_train:])
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.tiny_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--from-config", metavar="CONFIG.json", help="write this model shape, without weights")
    shape.add_argument("--preset", choices=sorted(PRESETS), help="write a known model shape, without weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=1200)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.from_config or args.preset:
        if args.from_config:
            with open(args.from_config) as f:
                config_dict = json.load(f)
        else:
            config_dict = dict(PRESETS[args.preset])
        write_config_only(args.out_dir, config_dict, args.seed, n_train=args.train_examples)
        print(f"wrote config + tokenizer (no weights) to {args.out_dir}, data to {os.path.join(args.out_dir, 'data')}/"
              "{train,eval}.jsonl; train it with --random_init")
    else:
        write_tiny(args.out_dir, seed=args.seed, n_train=args.train_examples,
                   hidden_size=args.hidden_size, layers=args.layers)
        print(f"wrote tiny Qwen2 model to {args.out_dir} and data to {os.path.join(args.out_dir, 'data')}/"
              "{train,eval}.jsonl")


if __name__ == "__main__":
    sys.exit(main())
