"""Data: row checks and their errors (JSONL here; the other file formats in test_train_data_formats.py),
loss masks and TRL's loss switches, chat templates, packing, batching (seconds)."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from train.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    PackedDataset,
    SyntheticDataset,
    check_chat_template,
    check_text_field,
    pack_examples,
    read_dataset,
    tokenize_records,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def records_of(tmp_path, objs, text_field="text"):
    return read_dataset(write_lines(tmp_path / "d.jsonl", [json.dumps(o) for o in objs]), text_field)[0]


def labeled_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


# --- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ('{"text": "ok"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"foo": 1}', "needs one of 'text', 'prompt'+'completion' or 'messages' (found keys: foo)"),
    ('{"prompt": "p"}', "'prompt' without 'completion'"),
    ('{"completion": "c"}', "'completion' without 'prompt'"),
    ('{"text": "a", "messages": []}', "has several of"),
    ('{"text": 3}', "'text' must be a string, got int"),
    ('{"text": ""}', "'text' is empty"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "messages[0] (user) needs a string 'content'"),
    ('{"messages": [{"content": "x"}]}', "messages[0] must be an object with a string 'role'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}',
     "'prompt' is a list and 'completion' a str: both must be text, or both lists of messages"),
    ('{"prompt": [], "completion": [{"role": "assistant", "content": "a"}]}', "'prompt' must be a non-empty list"),
    ('{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant"}]}',
     "completion[0] (assistant) needs a string 'content'"),
    ('{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}',
     "'completion' has no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{"}',
     "'tools' is a string but not JSON"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [1]}',
     "'tools' must be a list of tool schemas"),
])
def test_malformed_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(DataError) as e:
        read_dataset(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert reason in str(e.value)


def test_dataset_text_field_names_the_text_column(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"body": "after a comes b", "text": 7}], text_field="body")
    assert recs[0].kind == "text"
    (ids, labels), = tokenize_records(recs, tokenizer, 64)[0]
    assert tokenizer.decode(ids) == "after a comes b<|endoftext|>"
    path = write_lines(tmp_path / "plain.jsonl", ['{"text": "x"}'])
    with pytest.raises(DataError, match=r"plain.jsonl:1: needs one of 'body', 'prompt'\+'completion' or 'messages' "
                                        r"\(found keys: text\)"):
        read_dataset(path, "body")
    for reserved in ("messages", ""):
        with pytest.raises(DataError, match="--dataset_text_field must name the plain-text column"):
            check_text_field(reserved)


def test_not_utf8_and_missing_file(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not UTF-8"):
        read_dataset(str(p))
    with pytest.raises(DataError, match="dataset file not found"):
        read_dataset(str(tmp_path / "nope.jsonl"))


def test_blank_lines_skipped_and_digest_tracks_content(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ['{"text": "x"}', "", '{"prompt": "p", "completion": "c", "id": 7}'])
    records, digest = read_dataset(a)
    assert [(r.line, r.kind, r.where) for r in records] == [(1, "text", f"{a}:1"), (3, "prompt", f"{a}:3")]
    assert digest == hashlib.sha256(open(a, "rb").read()).hexdigest()  # the fingerprint runs have recorded
    b = write_lines(tmp_path / "b.jsonl", ['{"text": "x"}', "", '{"prompt": "p", "completion": "c", "id": 8}'])
    assert read_dataset(b)[1] != digest


# --- masks ---------------------------------------------------------------------------------------

def test_prompt_completion_loss_only_on_completion_and_eos(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"prompt": "count from 3:", "completion": " 4 5 6"}])
    (ids, labels), = tokenize_records(recs, tokenizer, 64)[0]
    prompt_len = len(tokenizer("count from 3:")["input_ids"])
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert labeled_text(tokenizer, ids, labels) == " 4 5 6<|endoftext|>"
    assert ids[-1] == tokenizer.eos_token_id


def test_text_trains_every_token_but_the_first(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"text": "after a comes b"}])
    (ids, labels), = tokenize_records(recs, tokenizer, 64)[0]
    assert labels[0] == IGNORE_INDEX  # nothing predicts the first token
    assert (labels[1:] == ids[1:]).all()
    assert tokenizer.decode(ids) == "after a comes b<|endoftext|>"


def test_chat_trains_assistant_turns_only(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "1 plus 2 is"}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "after a comes"}, {"role": "assistant", "content": "b"}]
    recs = records_of(tmp_path, [{"messages": messages}])
    ((ids, labels),), stats = tokenize_records(recs, tokenizer, 256)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert labeled_text(tokenizer, ids, labels) == "3<|im_end|>\nb<|im_end|>\n"
    assert stats.last_turn_only == 0


CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "1 plus 2 is"}, {"role": "assistant", "content": "3"},
        {"role": "user", "content": "after a comes"}, {"role": "assistant", "content": "b"}]


def test_assistant_only_loss_off_trains_every_token_of_the_same_chat(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"messages": CHAT}])
    ((ids, labels),), _ = tokenize_records(recs, tokenizer, 256)
    ((ids_all, labels_all),), _ = tokenize_records(recs, tokenizer, 256, assistant_only_loss=False)
    assert (ids_all == ids).all()  # the switch changes the labels, never the tokens
    assert labels_all[0] == IGNORE_INDEX and (labels_all[1:] == ids[1:]).all()


@pytest.mark.parametrize("completion_only, assistant_only, trained", [
    (True, True, "b<|im_end|>\n"),  # the default: the completion's assistant turn
    (True, False, "b<|im_end|>\n"),  # every token of the completion (here one assistant turn)
    (False, True, "3<|im_end|>\nb<|im_end|>\n"),  # every assistant turn, the prompt's too
    (False, False, None),  # every token
])
def test_conversational_prompt_completion_follows_trls_switches(tmp_path, tokenizer, completion_only, assistant_only,
                                                                 trained):
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    recs = records_of(tmp_path, [row])
    assert recs[0].kind == "chat_prompt"
    ((ids, labels),), _ = tokenize_records(recs, tokenizer, 256, completion_only, assistant_only)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)  # the chat as a whole
    if trained is None:
        assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()
    else:
        assert labeled_text(tokenizer, ids, labels) == trained


def test_completion_only_loss_off_trains_the_prompt_too(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"prompt": "count from 3:", "completion": " 4 5 6"}])
    ((ids, labels),), _ = tokenize_records(recs, tokenizer, 64, completion_only_loss=False)
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()
    assert tokenizer.decode(ids) == "count from 3: 4 5 6<|endoftext|>"


# Renders the tools and tool calls it is given, so a test can see they reach the template.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>tools ' + tools | map(attribute='function.name') | join(',') + '<|im_end|>' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' }}{% if m.get('content') %}"
    "{{ m['content'] }}{% endif %}{% for c in m.get('tool_calls', []) %}{{ 'call ' + c['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def test_tools_reach_the_template_and_a_tool_call_needs_no_content(tmp_path, tiny_dir):
    from train.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_dir), chat_template=TOOLS_TEMPLATE)
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "1 plus 2"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add"}}]},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]
    for tools in ([tool], json.dumps([tool])):  # TRL takes either
        recs = records_of(tmp_path, [{"messages": messages, "tools": tools}])
        ((ids, labels),), _ = tokenize_records(recs, tok, 256)
        assert tok.decode(ids).startswith("<|im_start|>tools add<|im_end|>")
        assert labeled_text(tok, ids, labels) == "call add<|im_end|>3<|im_end|>"


# A DeepSeek-R1-style template (same logic, this tokenizer's tokens): earlier reasoning is cut from
# assistant turns and the generation prompt ends in "<think>\n".
R1_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_end|>' + c + '<|endoftext|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_end|><think>\\n' }}{% endif %}"
)


@pytest.fixture
def r1_tokenizer(tiny_dir):
    from train.modeling import load_tokenizer

    return load_tokenizer(str(tiny_dir), chat_template=R1_STYLE)


def test_r1_style_template_trains_final_turn_as_inference_sees_it(tmp_path, r1_tokenizer):
    tok = r1_tokenizer
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"}]
    recs = records_of(tmp_path, [{"messages": messages}])
    ((ids, labels),), stats = tokenize_records(recs, tok, 256)
    prompt = tok.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n") and "r1" not in prompt  # history without its reasoning
    # exactly what generation continues from the prompt: the reasoning is kept, "<think>\n" not repeated
    assert tok.decode(ids) == prompt + "r2\n</think>\n\na2<|endoftext|>"
    assert labeled_text(tok, ids, labels) == "r2\n</think>\n\na2<|endoftext|>"
    assert stats.last_turn_only == 1
    # every token: the same sequence, the history as the generation prompt renders it trained too
    ((ids_all, labels_all),), stats_all = tokenize_records(recs, tok, 256, assistant_only_loss=False)
    assert (ids_all == ids).all() and (labels_all[1:] == ids[1:]).all()
    assert stats_all.last_turn_only == 0
    # as a conversational prompt-completion: the completion is the final turn, nothing is lost
    recs = records_of(tmp_path, [{"prompt": messages[:3], "completion": messages[3:]}])
    ((ids_pc, labels_pc),), stats_pc = tokenize_records(recs, tok, 256)
    assert (ids_pc == ids).all() and (labels_pc == labels).all() and stats_pc.last_turn_only == 0


def test_messages_without_chat_template_is_a_clear_error(tmp_path, tiny_dir):
    from train.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    tok.chat_template = None
    recs = records_of(tmp_path, [{"text": "x"}, {"messages": [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:2: uses 'messages' but the tokenizer in MODEL has no chat template"):
        check_chat_template(tok, recs, "MODEL")
    recs = records_of(tmp_path, [{"prompt": [{"role": "user", "content": "a"}],
                                  "completion": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: uses 'prompt'/'completion' as messages but the tokenizer"):
        check_chat_template(tok, recs, "MODEL")


def test_truncation_and_dropping_are_counted(tmp_path, tokenizer):
    long_prompt = " ".join(["count"] * 50)
    recs = records_of(tmp_path, [
        {"text": "one two three four five six seven eight nine ten " * 3},  # truncated, kept
        {"prompt": long_prompt, "completion": " 1"},  # completion cut off entirely: dropped
        {"prompt": "a", "completion": " b"},
    ])
    examples, stats = tokenize_records(recs, tokenizer, 16)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)
    assert max(len(ids) for ids, _ in examples) == 16
    assert stats.tokens == sum(len(ids) for ids, _ in examples)


# --- packing -------------------------------------------------------------------------------------

def test_pack_examples_uses_every_example_once_and_fills_rows():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    rows = pack_examples(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    lower_bound = -(-sum(lengths) // 512)
    assert len(rows) <= lower_bound * 1.03  # best-fit decreasing: within 3% of perfect
    assert pack_examples(lengths, 512) == rows  # deterministic


def test_collator_packed_rows(tmp_path, tokenizer):
    recs = records_of(tmp_path, [{"prompt": "a", "completion": " b"}, {"text": "after c comes d"}])
    examples, _ = tokenize_records(recs, tokenizer, 64)
    ds = PackedDataset(examples, 64)
    assert len(ds) == 1
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=16)([ds[0]])
    n = sum(len(e[0]) for e in examples)
    assert batch["num_tokens"] == n and batch["input_ids"].shape == (1, 16)
    assert "attention_mask" not in batch
    pos = batch["position_ids"][0].tolist()
    lens = [len(examples[i][0]) for i in ds.rows[0]]
    assert pos == list(range(lens[0])) + list(range(lens[1])) + list(range(16 - n))
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # two examples in a row: the model needs the block-diagonal mask; one per row: causal alone
    assert not ds.one_sequence_per_row
    assert PackedDataset(examples, max(len(e[0]) for e in examples)).one_sequence_per_row


def test_synthetic_rows_are_full_and_reproducible():
    ds = SyntheticDataset(4, 32, 100, seed=1)
    a, b = ds[2], SyntheticDataset(4, 32, 100, seed=1)[2]
    assert (a["input_ids"] == b["input_ids"]).all() and len(a["input_ids"]) == 32
    assert a["input_ids"].max() < 100 and a["labels"][0] == IGNORE_INDEX
    assert ds.one_sequence_per_row and (a["position_ids"] == np.arange(32)).all()


def test_synthetic_rows_pack_examples_as_packing_lays_out_real_ones():
    """Benchmarks of packed data: position_ids restart per example (transformers' block-diagonal mask)
    and each example's first token has no loss, as in PackedDataset; the row stays full."""
    ds = SyntheticDataset(4, 32, 100, seed=1, example_length=12)
    row = ds[0]
    assert not ds.one_sequence_per_row and ds.example_lengths == [12, 12, 8]
    assert (row["position_ids"] == np.concatenate([np.arange(12), np.arange(12), np.arange(8)])).all()
    assert [i for i, x in enumerate(row["labels"]) if x == IGNORE_INDEX] == [0, 12, 24]
    assert (row["input_ids"] == SyntheticDataset(4, 32, 100, seed=1)[0]["input_ids"]).all()
    assert SyntheticDataset(4, 32, 100, seed=1, example_length=32).one_sequence_per_row


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_token_loss_as_separate_examples(tmp_path, tiny_dir, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    from train.tiny_model import make_records

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation=attn).eval()
    model.config.use_cache = False  # as in training: with a KV cache transformers ignores packing
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights than the init, so a leak would show clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    recs = records_of(tmp_path, make_records(24, seed=5))
    examples, _ = tokenize_records(recs, tokenizer, 96)
    ds = PackedDataset(examples, 96)
    assert len(ds) < len(examples) / 3  # several examples per row
    batch = Collator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    batch.pop("num_tokens")

    def token_losses(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], reduction="none",
                                                 ignore_index=IGNORE_INDEX)[labels[1:] != IGNORE_INDEX]

    with torch.no_grad():
        out = model(**batch)
        separate = []
        for r, row in enumerate(ds.rows):
            offset = 0
            for j in row:
                ids, labels = (torch.as_tensor(x) for x in examples[j])
                alone = token_losses(model(input_ids=ids[None]).logits[0], labels)
                n = len(ids)
                packed = token_losses(out.logits[r, offset:offset + n], batch["labels"][r, offset:offset + n])
                torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)
                separate.append(alone)
                offset += n
        # the model's own loss over the packed batch is the mean over the same tokens
        torch.testing.assert_close(out.loss, torch.cat(separate).mean(), atol=1e-5, rtol=1e-5)
        # control: without per-example position_ids the examples do see each other
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert abs(leaky.item() - out.loss.item()) > 1e-3
