"""JSONL data for supervised fine-tuning: parsing, tokenisation with loss masks, packing, batching.

One JSON object per line, in one of three forms (other keys are ignored):
  {"text": "..."}                                   loss on every token
  {"prompt": "...", "completion": "..."}            loss on the completion (and EOS) only
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                                    rendered with the tokenizer's chat template,
                                                    loss on the assistant turns only
"""

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Stands in for an assistant message's content to see how a chat template wraps it.
_SENTINEL = "\ue000SFT-CONTENT\ue001"


class DataError(ValueError):
    """A problem with the training data, named by file and line."""


@dataclass
class Record:
    source: str
    line: int
    kind: str  # "text" | "prompt" | "messages"
    data: dict

    @property
    def where(self):
        return f"{self.source}:{self.line}"


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0  # longer than max_seq_length, cut to it
    dropped: int = 0  # nothing left to learn after truncation
    last_turn_only: int = 0  # multi-turn chats whose template forces training the final turn only
    tokens: int = 0
    trainable_tokens: int = 0
    rows: int = 0  # packed sequences (or examples, without packing)

    def as_dict(self):
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# Parsing


def _check_str(obj, key, where, allow_empty=True):
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise DataError(f"{where}: '{key}' is empty")


def parse_record(obj, source, line):
    """Check one decoded JSON line and say which form it has."""
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    forms = [k for k in ("text", "prompt", "messages") if k in obj]
    if "completion" in obj and "prompt" not in obj:
        raise DataError(f"{where}: 'completion' without 'prompt'")
    if len(forms) != 1:
        if not forms:
            raise DataError(f"{where}: needs one of 'text', 'prompt'+'completion' or 'messages' "
                            f"(found keys: {', '.join(sorted(obj)) or 'none'})")
        raise DataError(f"{where}: has several of 'text', 'prompt', 'messages'; use one per line")
    kind = forms[0]
    if kind == "text":
        _check_str(obj, "text", where, allow_empty=False)
    elif kind == "prompt":
        if "completion" not in obj:
            raise DataError(f"{where}: 'prompt' without 'completion'")
        _check_str(obj, "prompt", where)
        _check_str(obj, "completion", where)
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with a string 'role'")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] ({m['role']}) needs a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant message, so nothing to learn")
    return Record(source, line, kind, obj)


def read_jsonl(path):
    """All records of one JSONL file and the sha256 of its bytes; blank lines are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file not found")
    digest = hashlib.sha256()
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(parse_record(obj, path, lineno))
    if not records:
        raise DataError(f"{path}: no records")
    return records, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _render(tokenizer, messages, add_generation_prompt, where):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors: raise_exception() in the template, bad roles, ...
        raise DataError(f"{where}: chat template failed: {e}") from None


def _common_prefix_len(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_segments(tokenizer, messages, where):
    """Split a rendered conversation into (text, trainable) pieces.

    Each assistant turn is trained as the continuation of the generation prompt that inference
    would use. If the template renders every conversation prefix as a prefix of the whole
    (ChatML, Llama 3, ...), all assistant turns are trained in one sequence. Templates that render
    history differently (DeepSeek-R1's drops earlier reasoning and ends the generation prompt in
    '<think>\\n') can only train the final assistant turn; the second value says that happened.
    """
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i in assistant_turns:
        prompt = _render(tokenizer, messages[:i], True, where) if i else None
        turn = _render(tokenizer, messages[: i + 1], False, where)
        if prompt is None or not (turn.startswith(prompt) and full.startswith(turn)):
            spans = None
            break
        spans.append((len(prompt), len(turn)))
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
    last = assistant_turns[-1]
    history = messages[:last]
    prompt = _render(tokenizer, history, True, where) if history else ""
    probe = _render(tokenizer, history + [{"role": "assistant", "content": _SENTINEL}], False, where)
    at = probe.find(_SENTINEL)
    if at < 0:
        raise DataError(f"{where}: the chat template drops the assistant content; cannot find what to train")
    turn_end = probe[at + len(_SENTINEL):]
    # What the generation prompt adds after the rendered assistant header (e.g. "<think>\n") is
    # already given to the model at inference; don't train it twice.
    forced = prompt[_common_prefix_len(prompt, probe[:at]):]
    content = messages[last]["content"]
    if forced and content.startswith(forced):
        content = content[len(forced):]
    elif forced.strip() and content.startswith(forced.strip()):
        content = content[len(forced.strip()):].lstrip("\n")
    pieces = [(prompt, False)] if prompt else []
    pieces.append((content + turn_end, True))
    return pieces, len(assistant_turns) > 1


def tokenize_records(records, tokenizer, max_seq_length):
    """Token ids and labels (IGNORE_INDEX where no loss) per record, truncated to max_seq_length."""
    eos = tokenizer.eos_token_id
    # Collect every piece of text first and tokenise them in one batch: much faster than one by one.
    texts, plans, stats = [], [], DataStats()
    for rec in records:
        d = rec.data
        plan = []  # (index into texts, trainable, add_special_tokens)
        if rec.kind == "text":
            plan.append((len(texts), True, True))
            texts.append(d["text"])
            plan_eos = True
        elif rec.kind == "prompt":
            plan.append((len(texts), False, True))
            texts.append(d["prompt"])
            plan.append((len(texts), True, False))
            texts.append(d["completion"])
            plan_eos = True
        else:
            pieces, last_only = chat_segments(tokenizer, d["messages"], rec.where)
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
    for rec, (plan, plan_eos) in zip(records, plans):
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


# ---------------------------------------------------------------------------------------------
# Packing


def pack_examples(lengths, capacity):
    """Best-fit-decreasing bin packing: lists of example indices, each list summing to <= capacity.

    A segment tree over remaining capacities finds the fullest bin an example still fits in,
    in O(log capacity), so large datasets pack quickly. Deterministic for given lengths.
    """
    size = 1
    while size < capacity + 1:
        size *= 2
    # tree[node] = number of open bins whose remaining capacity lies in that node's range
    tree = [0] * (2 * size)
    bins_by_room = {}

    def add(room, delta):
        node = room + size
        while node:
            tree[node] += delta
            node //= 2

    def smallest_room_at_least(need):
        # leftmost leaf >= need with a nonzero count
        def go(node, lo, hi):
            if hi < need or tree[node] == 0:
                return -1
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            found = go(2 * node, lo, mid)
            return found if found >= 0 else go(2 * node + 1, mid + 1, hi)

        return go(1, 0, size - 1)

    bins = []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example of length {n} exceeds capacity {capacity}")
        room = smallest_room_at_least(n)
        if room < 0:
            bins.append([i])
            b = len(bins) - 1
            new_room = capacity - n
        else:
            b = bins_by_room[room].pop()
            add(room, -1)
            bins[b].append(i)
            new_room = room - n
        if new_room > 0:
            bins_by_room.setdefault(new_room, []).append(b)
            add(new_room, 1)
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Rows of several examples each. position_ids restart at 0 for every example: transformers
    turns that into a block-diagonal causal mask (SDPA/eager/flex) or varlen flash attention, so
    no token attends across examples."""

    def __init__(self, examples, max_seq_length):
        self.examples = examples
        self.rows = pack_examples([len(x[0]) for x in examples], max_seq_length)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        parts = [self.examples[j] for j in self.rows[i]]
        input_ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        position_ids = np.concatenate([np.arange(len(p[0])) for p in parts])
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class ExampleDataset(torch.utils.data.Dataset):
    """One example per row (no packing); the collator pads and masks."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        input_ids, labels = self.examples[i]
        return {"input_ids": input_ids, "labels": labels}


class SyntheticDataset(torch.utils.data.Dataset):
    """Full rows of random token ids, for throughput benchmarks that must not read any data."""

    def __init__(self, num_rows, max_seq_length, vocab_size, seed):
        self.num_rows, self.length, self.vocab_size, self.seed = num_rows, max_seq_length, vocab_size, seed

    def __len__(self):
        return self.num_rows

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        input_ids = rng.integers(0, self.vocab_size, size=self.length, dtype=np.int64)
        labels = input_ids.copy()
        labels[0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": np.arange(self.length)}


@dataclass
class Collator:
    """Stacks rows into a batch, right-padded to the longest row rounded up to `pad_to_multiple_of`.

    Packed rows carry position_ids and no attention_mask (padding becomes its own tiny sequence
    with labels IGNORE_INDEX); unpacked rows get an attention_mask. `num_tokens` (real tokens,
    a plain int) is removed by the trainer before the forward pass and feeds the throughput metric.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8
    max_length: int | None = None

    def __call__(self, rows):
        longest = max(len(r["input_ids"]) for r in rows)
        length = int(math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        if self.max_length:
            length = max(longest, min(length, self.max_length))
        packed = "position_ids" in rows[0]
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.zeros((len(rows), length), dtype=torch.long)
        else:
            batch["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
        num_tokens = 0
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            num_tokens += n
            batch["input_ids"][i, :n] = torch.from_numpy(np.asarray(r["input_ids"]))
            batch["labels"][i, :n] = torch.from_numpy(np.asarray(r["labels"]))
            if packed:
                batch["position_ids"][i, :n] = torch.from_numpy(np.asarray(r["position_ids"]))
                batch["position_ids"][i, n:] = torch.arange(length - n)
            else:
                batch["attention_mask"][i, :n] = 1
        batch["num_tokens"] = num_tokens
        return batch


# ---------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    train_stats: DataStats
    eval_stats: DataStats | None
    fingerprints: dict = field(default_factory=dict)  # sha256 of the files, identifies the data of a run


def split_paths(values):
    """--dataset a.jsonl b.jsonl and --dataset a.jsonl,b.jsonl both work."""
    out = []
    for v in values or []:
        out += [p for p in v.split(",") if p]
    return out


def check_chat_template(tokenizer, records, model_dir):
    if tokenizer.chat_template:
        return
    for rec in records:
        if rec.kind == "messages":
            raise DataError(
                f"{rec.where}: uses 'messages' but the tokenizer in {model_dir} has no chat template; "
                "add one (chat_template.jinja or tokenizer_config.json), pass --chat_template FILE, "
                "or write the data as prompt/completion"
            )


def build_datasets(data_args, tokenizer, model_dir, seed, vocab_size):
    max_len = data_args.max_seq_length
    if data_args.synthetic_samples:
        train = SyntheticDataset(data_args.synthetic_samples, max_len, vocab_size, seed)
        stats = DataStats(examples=len(train), rows=len(train), tokens=len(train) * max_len,
                          trainable_tokens=len(train) * (max_len - 1))
        return Datasets(train, None, stats, None, {"synthetic": [data_args.synthetic_samples, max_len]})

    # content hashes, not paths: moving the files does not make it another run
    fingerprints = {"train": [], "eval": []}

    def load(paths, split):
        records = []
        for p in paths:
            recs, digest = read_jsonl(p)
            fingerprints[split].append(digest)
            records += recs
        return records

    train_records = load(split_paths(data_args.dataset), "train")
    eval_records = load(split_paths(data_args.eval_dataset), "eval")
    if data_args.eval_split_ratio:
        if not 0 < data_args.eval_split_ratio < 1:
            raise DataError(f"--eval_split_ratio must be between 0 and 1, got {data_args.eval_split_ratio}")
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(order) * data_args.eval_split_ratio))
        held = set(order[:n_eval])
        eval_records += [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
    check_chat_template(tokenizer, train_records + eval_records, model_dir)

    def make(records):
        examples, stats = tokenize_records(records, tokenizer, max_len)
        if not examples:
            raise DataError(f"no usable examples in {', '.join(sorted({r.source for r in records}))}: "
                            f"{stats.dropped} dropped with nothing to learn after truncation to {max_len} tokens")
        ds = PackedDataset(examples, max_len) if data_args.packing else ExampleDataset(examples)
        stats.rows = len(ds)
        return ds, stats

    train, train_stats = make(train_records)
    ev, eval_stats = make(eval_records) if eval_records else (None, None)
    return Datasets(train, ev, train_stats, eval_stats, fingerprints)
