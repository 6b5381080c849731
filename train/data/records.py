"""One training row: which of TRL's SFT forms it has, checked, with its file and line or row."""

import json
from dataclasses import dataclass

IGNORE_INDEX = -100


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
