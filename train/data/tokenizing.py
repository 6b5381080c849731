"""Tokenising rows with their loss masks: text, prompt-completion, and chats through the tokenizer's
chat template (loss on the assistant turns, or on every token when asked)."""

import json

import numpy as np

from .records import IGNORE_INDEX, DataError, DataStats

# Stands in for an assistant message's content to see how a chat template wraps it.
_SENTINEL = "\ue000SFT-CONTENT\ue001"


def _tools(data):
    tools = data.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def _render(tokenizer, messages, add_generation_prompt, where, tools=None):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools)
    except Exception as e:  # jinja errors: raise_exception() in the template, bad roles, ...
        raise DataError(f"{where}: chat template failed: {e}") from None


def _common_prefix_len(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_segments(tokenizer, messages, where, completion_start=0, assistant_only=True, tools=None):
    """Split a rendered conversation into (text, trainable) pieces.

    Trained: the assistant turns from message `completion_start` on (a conversational
    prompt-completion's completion starts after its prompt), or with `assistant_only` off every
    token from there on, i.e. after the generation prompt inference would end the prompt with.
    Each assistant turn is trained as the continuation of the generation prompt that inference
    would use. If the template renders every conversation prefix as a prefix of the whole
    (ChatML, Llama 3, ...), all assistant turns are trained in one sequence. Templates that render
    history differently (DeepSeek-R1's drops earlier reasoning and ends the generation prompt in
    '<think>\\n') can only train the final assistant turn; the second value says that happened.
    """
    def render(msgs, add_generation_prompt):
        return _render(tokenizer, msgs, add_generation_prompt, where, tools)

    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_turns = [i for i in assistant_turns if i >= completion_start]
    full = render(messages, False)
    spans = []
    for i in trained_turns:
        prompt = render(messages[:i], True) if i else None
        turn = render(messages[: i + 1], False)
        if prompt is None or not (turn.startswith(prompt) and full.startswith(turn)):
            spans = None
            break
        spans.append((len(prompt), len(turn)))
    if spans is not None and not assistant_only:
        # the same tokens as with assistant_only: only the labels differ
        prompt = render(messages[:completion_start], True) if completion_start else ""
        spans = [(len(prompt), len(full))] if full.startswith(prompt) else None
    if spans is not None:
        pieces, pos = [], 0
        for start, end in spans:
            if start > pos:
                pieces.append((full[pos:start], False))
            pieces.append((full[start:end], True))
            pos = end
        if pos < len(full):
            pieces.append((full[pos:], False))
        return pieces, False

    # Final assistant turn only: prompt = generation prompt, completion = content + turn end.
    last = trained_turns[-1]
    history = messages[:last]
    prompt = render(history, True) if history else ""
    probe = render(history + [{**messages[last], "content": _SENTINEL}], False)
    at = probe.find(_SENTINEL)
    if at < 0:
        raise DataError(f"{where}: the chat template drops the assistant content; cannot find what to train")
    turn_end = probe[at + len(_SENTINEL):]
    # What the generation prompt adds after the rendered assistant header (e.g. "<think>\n") is
    # already given to the model at inference; don't train it twice.
    forced = prompt[_common_prefix_len(prompt, probe[:at]):]
    content = messages[last].get("content") or ""
    if forced and content.startswith(forced):
        content = content[len(forced):]
    elif forced.strip() and content.startswith(forced.strip()):
        content = content[len(forced.strip()):].lstrip("\n")
    # with every token trained, the history is trained too (as the generation prompt renders it)
    whole_chat = not assistant_only and completion_start == 0
    pieces = [(prompt, whole_chat)] if prompt else []
    pieces.append((content + turn_end, True))
    return pieces, len(trained_turns) > 1 and not whole_chat


def tokenize_records(records, tokenizer, max_seq_length, completion_only_loss=True, assistant_only_loss=True):
    """Token ids and labels (IGNORE_INDEX where no loss) per record, truncated to max_seq_length.

    completion_only_loss: prompt-completion rows train their completion only (else the prompt too);
    assistant_only_loss: chats train their assistant turns only (else every token)."""
    eos = tokenizer.eos_token_id
    # Collect every piece of text first and tokenise them in one batch: much faster than one by one.
    texts, plans, stats = [], [], DataStats()
    for rec in records:
        d = rec.data
        plan = []  # (index into texts, trainable, add_special_tokens)
        if rec.kind == "text":
            plan.append((len(texts), True, True))
            texts.append(d[rec.text_field])
            plan_eos = True
        elif rec.kind == "prompt":
            plan.append((len(texts), not completion_only_loss, True))
            texts.append(d["prompt"])
            plan.append((len(texts), True, False))
            texts.append(d["completion"])
            plan_eos = True
        else:
            if rec.kind == "messages":
                messages, completion_start = d["messages"], 0
            else:
                messages = d["prompt"] + d["completion"]
                completion_start = len(d["prompt"]) if completion_only_loss else 0
            pieces, last_only = chat_segments(tokenizer, messages, rec.where, completion_start,
                                              assistant_only_loss, _tools(d))
            stats.last_turn_only += int(last_only)
            for text, trainable in pieces:
                plan.append((len(texts), trainable, False))
                texts.append(text)
            plan_eos = False
        plans.append((plan, plan_eos))

    with_special = [i for p, _ in plans for i, _, s in p if s]
    without_special = [i for p, _ in plans for i, _, s in p if not s]
    ids = [None] * len(texts)
    for idx, special in ((with_special, True), (without_special, False)):
        if idx:
            out = tokenizer([texts[i] for i in idx], add_special_tokens=special)["input_ids"]
            for i, t in zip(idx, out):
                ids[i] = t

    examples = []
    for plan, plan_eos in plans:
        input_ids, labels = [], []
        for i, trainable, _ in plan:
            input_ids += ids[i]
            labels += ids[i] if trainable else [IGNORE_INDEX] * len(ids[i])
        if plan_eos and eos is not None and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)
            labels.append(eos)
        if len(input_ids) > max_seq_length:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        if labels:
            # The first token is never predicted (nothing precedes it); masking it here also keeps
            # packed examples from learning to predict one example's start from another's end.
            labels[0] = IGNORE_INDEX
        n_train = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_train == 0:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.trainable_tokens += n_train
        examples.append((np.asarray(input_ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return examples, stats
