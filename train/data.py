"""Training data for supervised fine-tuning: local files, checked row by row, tokenised with loss
masks, packed and batched.

Files: JSON Lines (.jsonl) and JSON (.json: a list of objects, or JSON Lines), read with Python's
json; parquet (.parquet) and Arrow (.arrow: a shard `Dataset.save_to_disk` writes, or an Arrow IPC
file), read through Hugging Face `datasets`. Nothing from a hub.
Each row has one of TRL's SFT forms (other keys are ignored; a null column counts as absent, and in
parquet and Arrow files, which cannot tell a null from a missing key, so does a null in a message):
  {"text": "..."}                                   language modeling: loss on every token
                                                    (--dataset_text_field names another column)
  {"prompt": "...", "completion": "..."}            prompt-completion: loss on the completion (and EOS)
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                                    conversational: rendered with the tokenizer's
                                                    chat template, loss on the assistant turns
  {"prompt": [messages], "completion": [messages]}  conversational prompt-completion: loss on the
                                                    completion's assistant turns
Chats may carry TRL's `tools` column (tool schemas, or a JSON string of them) for the template.
`--completion_only_loss false` trains the prompt as well; `--assistant_only_loss false` trains
every token of a chat (TRL's switches, with this package's defaults: both on).
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field, fields

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Stands in for an assistant message's content to see how a chat template wraps it.
_SENTINEL = "\ue000SFT-CONTENT\ue001"
# File suffix -> what reads it: Python's json, or the `datasets` builder of that name.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
# Columns with a meaning of their own, so none of them can be the text column.
RESERVED_COLUMNS = ("prompt", "completion", "messages")


class DataError(ValueError):
    """A problem with the training data, named by file and line (or row)."""


@dataclass
class Record:
    source: str
    line: int  # 1-based: the line of a JSON Lines file, else the row
    kind: str  # "text" | "prompt" | "messages" | "chat_prompt" (conversational prompt-completion)
    data: dict
    unit: str = "line"  # "line" or "row"
    text_field: str = "text"  # the column holding a "text" record's text

    @property
    def where(self):
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} row {self.line}"


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
# Checking rows


def _check_str(obj, key, where, allow_empty=True):
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise DataError(f"{where}: '{key}' is empty")


def _check_messages(messages, key, where):
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with a string 'role'")
        # an assistant turn that calls tools may have no text (TRL's tool-calling format)
        tool_call = m["role"] == "assistant" and isinstance(m.get("tool_calls"), list) and m["tool_calls"]
        if not isinstance(m.get("content"), str) and not (tool_call and m.get("content") is None):
            raise DataError(f"{where}: {key}[{i}] ({m['role']}) needs a string 'content'")


def _check_tools(obj, where):
    tools = obj.get("tools")
    if tools is None:
        return
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is a string but not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be a list of tool schemas (objects), or a JSON string of one")


def record_kind(obj, where, text_field="text"):
    """Check one row and say which form it has."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    forms = [k for k in (text_field, "prompt", "messages") if k in obj]
    if "completion" in obj and "prompt" not in obj:
        raise DataError(f"{where}: 'completion' without 'prompt'")
    if len(forms) != 1:
        if not forms:
            raise DataError(f"{where}: needs one of '{text_field}', 'prompt'+'completion' or 'messages' "
                            f"(found keys: {', '.join(sorted(obj)) or 'none'})")
        raise DataError(f"{where}: has several of '{text_field}', 'prompt', 'messages'; use one per row")
    form = forms[0]
    if form == text_field:
        _check_str(obj, text_field, where, allow_empty=False)
        return "text"
    if form == "prompt":
        if "completion" not in obj:
            raise DataError(f"{where}: 'prompt' without 'completion'")
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, list) and not isinstance(completion, list):
            _check_str(obj, "prompt", where)
            _check_str(obj, "completion", where)
            return "prompt"
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(f"{where}: 'prompt' is a {type(prompt).__name__} and 'completion' a "
                            f"{type(completion).__name__}: both must be text, or both lists of messages "
                            "(conversational prompt-completion)")
        _check_messages(prompt, "prompt", where)
        _check_messages(completion, "completion", where)
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"{where}: 'completion' has no assistant message, so nothing to learn")
        _check_tools(obj, where)
        return "chat_prompt"
    _check_messages(obj["messages"], "messages", where)
    if not any(m["role"] == "assistant" for m in obj["messages"]):
        raise DataError(f"{where}: 'messages' has no assistant message, so nothing to learn")
    _check_tools(obj, where)
    return "messages"


def check_text_field(text_field):
    if not text_field or text_field in RESERVED_COLUMNS:
        raise DataError(f"--dataset_text_field must name the plain-text column, not "
                        f"{text_field or 'nothing'!r} ({', '.join(RESERVED_COLUMNS)} have their own meaning)")


def _without_nulls(value):
    """Columnar files give every row every column (null where a row had none) and every message
    every key any message had: drop the nulls so each row reads as it was written (a null written
    on purpose inside a parquet or Arrow row goes too)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Reading files


def looks_like_hub_id(name):
    """'org/name' with no path of that name: someone expected a download from a hub."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _builder(path):
    """What reads a local file (a FORMATS value), or a DataError saying what to give instead."""
    if not os.path.exists(path):
        hint = ""
        if looks_like_hub_id(path) and os.path.splitext(path)[1].lower() not in FORMATS:
            hint = " (a hub name? datasets must be local files here: download it and pass its files)"
        raise DataError(f"{path}: dataset file not found{hint}")
    if os.path.isdir(path):
        # a save_to_disk directory: its .arrow shards, not its metadata
        inside = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in FORMATS
                        and n not in ("dataset_info.json", "state.json", "dataset_dict.json"))
        found = f", e.g. {os.path.join(path, inside[0])} (1 of {len(inside)})" if inside else ""
        raise DataError(f"{path}: is a directory; pass the data files in it ({', '.join(FORMATS)}){found}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; "
                        f"give {', '.join(FORMATS)} files")
    return FORMATS[suffix]


def _json_rows(path):
    """(position, object) per row of a JSON Lines file (position: the line; blank lines skipped) or
    of a JSON file holding a list of rows (position: the row), the unit, and the sha256 of the bytes.

    Python's json, not datasets' JSON builder: that one types columns with pyarrow, and a column
    holding text in some rows and messages in others comes back with strings that parse as JSON
    replaced by their value (" 12" -> 12, '"a"' -> 'a'), ints turned floats beside floats, and no
    line numbers for errors."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(0)
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # one JSON list
            raw = f.read()
            digest.update(raw)
            try:
                rows = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            return list(enumerate(rows, start=1)), "row", digest.hexdigest()
        rows = []
        for lineno, line in enumerate(f, start=1):  # line by line: a large file is never whole in memory
            digest.update(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                rows.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                if lineno == 1 and _one_json_object(path):
                    raise DataError(f"{path}: holds one JSON object, not rows: give JSON Lines (one object per "
                                    "line) or a JSON list of objects") from None
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows, "line", digest.hexdigest()


def _one_json_object(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return isinstance(json.load(f), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or error lines from `datasets`: this module reports problems itself."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    bars_were_on = not are_progress_bars_disabled()
    datasets.disable_progress_bars()
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        ds_logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _columnar_rows(path, builder):
    """(row, object) per row of a parquet or Arrow file, streamed in batches by the `datasets`
    builder for its format (load_dataset would also ask a hub to count the load), and the sha256
    of the bytes. Streaming writes no Arrow cache (only a lock file, in a temporary directory
    removed after the read), so nothing lands in ~/.cache or /tmp on the nodes, and it read 200k
    chats of parquet in 1.3 s where preparing the cache took 1.9 s."""
    try:
        from datasets.packaged_modules.arrow.arrow import Arrow
        from datasets.packaged_modules.parquet.parquet import Parquet
    except ImportError as e:  # JSON data needs no `datasets`; an environment made without it can still train
        raise DataError(f"{path}: reading {builder} files needs Hugging Face `datasets` in the training "
                        f"environment ({e}); install the version requirements.txt pins, or convert the file "
                        "to JSON Lines") from None

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    rows = []
    try:
        with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="dsmesh-datasets-") as cache:
            reader = {"parquet": Parquet, "arrow": Arrow}[builder](cache_dir=cache,
                                                                    data_files={"train": [os.path.abspath(path)]})
            for batch in reader.as_streaming_dataset(split="train").iter(batch_size=10_000):
                names = list(batch)
                rows += [dict(zip(names, values)) for values in zip(*batch.values())]
    except Exception as e:  # pyarrow's and datasets' own errors: whatever they say is the reason
        raise DataError(f"{path}: cannot be read as {builder} data: {type(e).__name__}: {e}") from None
    return [(i, _without_nulls(row)) for i, row in enumerate(rows, start=1)], digest.hexdigest()


def read_dataset(path, text_field="text"):
    """All records of one local data file and the sha256 of its bytes.

    Errors name the file and the line (JSON Lines) or row (JSON lists, parquet, Arrow)."""
    builder = _builder(path)
    if builder == "json":
        rows, unit, digest = _json_rows(path)
    else:
        (rows, digest), unit = _columnar_rows(path, builder), "row"
    if not rows:
        raise DataError(f"{path}: no records")
    records = []
    for position, row in rows:
        if isinstance(row, dict):  # a null column is an absent one (pandas writes nulls for them)
            row = {k: v for k, v in row.items() if v is not None}
        record = Record(path, position, "", row, unit, text_field)
        record.kind = record_kind(row, record.where, text_field)
        records.append(record)
    return records, digest


# ---------------------------------------------------------------------------------------------
# Tokenisation


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
        if rec.kind in ("messages", "chat_prompt"):
            form = "'messages'" if rec.kind == "messages" else "'prompt'/'completion' as messages"
            raise DataError(
                f"{rec.where}: uses {form} but the tokenizer in {model_dir} has no chat template; "
                "add one (chat_template.jinja or tokenizer_config.json), pass --chat_template FILE, "
                "or write the data as prompt/completion text"
            )


# The data options that change what is trained, by name: a run that sets one other than its
# default gets it in its fingerprint (and runs left at the defaults keep the fingerprint they had).
FINGERPRINTED_OPTIONS = ("dataset_text_field", "completion_only_loss", "assistant_only_loss")


def data_options(data_args):
    defaults = {f.name: f.default for f in fields(data_args)}
    return {name: getattr(data_args, name) for name in FINGERPRINTED_OPTIONS
            if getattr(data_args, name) != defaults[name]}


def build_datasets(data_args, tokenizer, model_dir, seed, vocab_size):
    max_len = data_args.max_seq_length
    if data_args.synthetic_samples:
        train = SyntheticDataset(data_args.synthetic_samples, max_len, vocab_size, seed)
        stats = DataStats(examples=len(train), rows=len(train), tokens=len(train) * max_len,
                          trainable_tokens=len(train) * (max_len - 1))
        return Datasets(train, None, stats, None, {"synthetic": [data_args.synthetic_samples, max_len]})

    text_field = data_args.dataset_text_field
    check_text_field(text_field)
    # content hashes, not paths: moving the files does not make it another run
    fingerprints = {"train": [], "eval": []}
    options = data_options(data_args)
    if options:
        fingerprints["options"] = options

    def load(paths, split):
        records = []
        for p in paths:
            recs, digest = read_dataset(p, text_field)
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
        examples, stats = tokenize_records(records, tokenizer, max_len, data_args.completion_only_loss,
                                           data_args.assistant_only_loss)
        if not examples:
            raise DataError(f"no usable examples in {', '.join(sorted({r.source for r in records}))}: "
                            f"{stats.dropped} dropped with nothing to learn after truncation to {max_len} tokens")
        ds = PackedDataset(examples, max_len) if data_args.packing else ExampleDataset(examples)
        stats.rows = len(ds)
        return ds, stats

    train, train_stats = make(train_records)
    ev, eval_stats = make(eval_records) if eval_records else (None, None)
    return Datasets(train, ev, train_stats, eval_stats, fingerprints)
