"""Data files of every format: JSON Lines and JSON (Python's json), parquet and Arrow (stream and
IPC file; written here with `datasets` itself, read through it); their errors by file and row;
fingerprints; nothing fetched and no cache left behind; and one real 2-rank launch through the
`deepspeed` launcher on parquet, Arrow and JSON files of TRL's formats (~20 s)."""

import hashlib
import json
import os
import socket
import sys

import pytest
from ds_testlib import run_launch

from train.args import DataArguments
from train.data import DataError, build_datasets, read_dataset, tokenize_records
from train.tiny_model import make_records

ROWS = [
    {"text": "after a comes b"},
    {"prompt": "count from 3:", "completion": " 4 5 6"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1 plus 2 is"},
                  {"role": "assistant", "content": "3"}]},
    {"prompt": [{"role": "user", "content": "after a comes"}], "completion": [{"role": "assistant", "content": "b"}]},
]
KINDS = ["text", "prompt", "messages", "chat_prompt"]


def columns(rows):
    """Rows as columns, None where a row lacks a key: how a columnar file holds mixed rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def write_rows(path, rows):
    """`rows` as the file format `path`'s suffix names (".ipc.arrow": Arrow's IPC file format)."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        return path
    from datasets import Dataset

    # "prompt" holds text in some rows and messages in others: a JSON column, as TRL's docs advise
    table = Dataset.from_dict(columns(rows), on_mixed_types="use_json")
    if path.endswith(".parquet"):
        table.to_parquet(path)
    elif path.endswith(".ipc.arrow"):
        import pyarrow as pa

        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.data.schema) as writer:
            writer.write_table(table.data.table)
    else:  # what save_to_disk writes: an Arrow stream file per shard
        saved = path + ".saved"
        table.save_to_disk(saved)
        os.replace(os.path.join(saved, "data-00000-of-00001.arrow"), path)
    return path


FORMATS = ["d.jsonl", "d.json", "d.parquet", "d.arrow", "d.ipc.arrow"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_rows_kinds_and_tokens_jsonl_gives(tmp_path, tokenizer, name):
    reference, _ = read_dataset(write_rows(tmp_path / "ref.jsonl", ROWS))
    path = write_rows(tmp_path / name, ROWS)
    records, digest = read_dataset(path)
    assert [r.kind for r in records] == KINDS
    assert [r.data for r in records] == ROWS  # nulls of the columnar files dropped: rows as written
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    want, want_stats = tokenize_records(reference, tokenizer, 64)
    got, stats = tokenize_records(records, tokenizer, 64)
    assert [(a.tolist(), b.tolist()) for a, b in got] == [(a.tolist(), b.tolist()) for a, b in want]
    assert stats == want_stats
    unit = "line" if name.endswith(".jsonl") else "row"
    assert [r.where for r in records][-1] == f"{path}:4" if unit == "line" else f"{path} row 4"


@pytest.mark.parametrize("name", ["bad.json", "bad.parquet", "bad.arrow"])
@pytest.mark.parametrize("row, reason", [
    ({"foo": 1}, "needs one of 'text', 'prompt'+'completion' or 'messages' (found keys: foo)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' has no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     "messages[0] (user) needs a string 'content'"),
    ({"text": ""}, "'text' is empty"),
    ({"prompt": "p"}, "'prompt' without 'completion'"),
])
def test_a_bad_row_of_a_columnar_or_json_file_is_named_by_row(tmp_path, name, row, reason):
    path = write_rows(tmp_path / name, [{"text": "fine"}, {"text": "also fine"}, row])
    with pytest.raises(DataError) as e:
        read_dataset(path)
    assert str(e.value).startswith(f"{path} row 3: ") and reason in str(e.value)


def test_json_list_errors_name_the_line_or_row(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n {"text": "a"}\n {"text": "b"}\n]\n')  # no comma after the first
    with pytest.raises(DataError, match=r"list.json:3: invalid JSON: .* \(column \d+\)"):
        read_dataset(str(path))
    path.write_text('[{"text": "a"}, {"text": 5}]')  # mixed types: datasets refuses, the row is named
    with pytest.raises(DataError, match=r"list.json row 2: 'text' must be a string, got int"):
        read_dataset(str(path))


@pytest.mark.parametrize("name", ["mixed.jsonl", "mixed.json"])
def test_json_rows_come_back_exactly_as_written(tmp_path, name):
    """Text and messages in one column: datasets' JSON builder would read " 12" as 12 and '"a"' as 'a'."""
    rows = [{"prompt": "q", "completion": " 12"}, {"prompt": "r", "completion": '"quoted"', "n": 1},
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}],
             "n": 2.5, "extra": None}]
    records, _ = read_dataset(write_rows(tmp_path / name, rows))
    del rows[2]["extra"]  # a null column is an absent one
    assert [r.data for r in records] == rows and isinstance(records[1].data["n"], int)
    assert [r.kind for r in records] == ["prompt", "prompt", "chat_prompt"]


def test_one_json_object_is_not_rows(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    with pytest.raises(DataError, match=r"obj.json: holds one JSON object, not rows: give JSON Lines"):
        read_dataset(str(path))


def test_files_that_are_not_local_data_files_are_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"HuggingFaceH4/ultrachat_200k: dataset file not found \(a hub name\? "
                                        r"datasets must be local files here"):
        read_dataset("HuggingFaceH4/ultrachat_200k")
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"saved: is a directory; pass the data files in it .*, "
                                        r"e\.g\. .*saved/data-00000-of-00001\.arrow"):
        read_dataset(str(saved))
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"d.csv: unknown data format '.csv'; give .jsonl, .json, .parquet, .arrow"):
        read_dataset(str(tmp_path / "d.csv"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"junk.parquet: cannot be read as parquet data: "):
        read_dataset(str(tmp_path / "junk.parquet"))
    for empty in ("empty.jsonl", "blank.jsonl"):
        (tmp_path / empty).write_text("" if empty == "empty.jsonl" else "\n  \n")
        with pytest.raises(DataError, match=f"{empty}: no records"):
            read_dataset(str(tmp_path / empty))


def test_parquet_without_datasets_installed_says_what_to_install(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "d.parquet", ROWS[:1])
    monkeypatch.setitem(sys.modules, "datasets.packaged_modules.arrow.arrow", None)  # import fails as if absent
    with pytest.raises(DataError, match=r"d.parquet: reading parquet files needs Hugging Face `datasets` in the "
                                        r"training environment .*convert the file to JSON Lines"):
        read_dataset(path)
    assert read_dataset(write_rows(tmp_path / "d.jsonl", ROWS[:1]))[0][0].kind == "text"


def test_no_network_and_no_cache_outside_a_temporary_directory(tmp_path, monkeypatch):
    import tempfile

    from datasets import config

    contacted = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        contacted.append(address)
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        contacted.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    hf_cache = config.HF_DATASETS_CACHE
    before = sorted(os.listdir(hf_cache)) if os.path.isdir(hf_cache) else None
    for name in FORMATS:
        read_dataset(write_rows(tmp_path / name, ROWS))
    assert contacted == []  # datasets.load_dataset would ask a hub to count the load
    assert os.listdir(scratch) == []  # the builders' cache went with its temporary directory
    assert (sorted(os.listdir(hf_cache)) if os.path.isdir(hf_cache) else None) == before


def test_fingerprints_stay_for_unchanged_files_and_follow_changes_and_options(tmp_path, tokenizer, tiny_dir):
    path = write_rows(tmp_path / "d.parquet", ROWS)
    args = DataArguments(dataset=[path], max_seq_length=64)
    first = build_datasets(args, tokenizer, str(tiny_dir), 1, 640).fingerprints
    assert first == build_datasets(args, tokenizer, str(tiny_dir), 1, 640).fingerprints
    assert first == {"train": [hashlib.sha256(open(path, "rb").read()).hexdigest()], "eval": []}  # no "options"
    write_rows(path, ROWS[:3])
    changed = build_datasets(args, tokenizer, str(tiny_dir), 1, 640).fingerprints
    assert changed["train"] != first["train"]
    args.assistant_only_loss = False
    assert build_datasets(args, tokenizer, str(tiny_dir), 1, 640).fingerprints == {
        **changed, "options": {"assistant_only_loss": False}}


def test_launch_trains_on_parquet_arrow_and_json_files_of_trls_formats(tmp_path, tiny_dir):
    """The tiny model's data as TRL writes it (chats as conversational prompt-completion, text under
    another column name) in parquet, Arrow and JSON, through the real launcher on 2 ranks."""
    from test_train_launch import BIN, ROOT, ds_config, metrics, ok

    def trl_rows(records):
        out = []
        for r in records:
            if "messages" in r:
                out.append({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]})
            elif "text" in r:
                out.append({"body": r["text"]})
            else:
                out.append(r)
        return out

    rows = trl_rows(make_records(240, seed=3))
    # one form per columnar file: a column of text in some rows and messages in others needs a JSON
    # column, which datasets 5.2 writes lossily (a string that parses as JSON, " 12", reads back as 12)
    chats = [r for r in rows if isinstance(r.get("prompt"), list)]
    train = [write_rows(tmp_path / "train.parquet", chats),
             write_rows(tmp_path / "train.arrow", [r for r in rows if r not in chats])]
    evaluation = write_rows(tmp_path / "eval.json", trl_rows(make_records(20, seed=4)))
    out = tmp_path / "out"
    config = ds_config(tmp_path, 2)
    cmd = lambda port: [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "train",
        "--model_name_or_path", str(tiny_dir), "--dataset", *train, "--eval_dataset", evaluation,
        "--dataset_text_field", "body", "--assistant_only_loss", "false", "--output_dir", str(out),
        "--deepspeed", config, "--max_seq_length", "256", "--max_steps", "8",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    proc = ok(run_launch(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400))
    summary = json.loads((out / "summary.json").read_text())
    from train.modeling import load_tokenizer

    args = DataArguments(dataset=train, eval_dataset=[evaluation], max_seq_length=256, dataset_text_field="body",
                         assistant_only_loss=False)
    expected = build_datasets(args, load_tokenizer(str(tiny_dir)), str(tiny_dir), 1, 640)
    assert summary["data"]["train"] == expected.train_stats.as_dict()
    assert summary["data"]["eval"] == expected.eval_stats.as_dict()
    assert expected.train_stats.examples == 240 and summary["steps"] == 8
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["data"] == expected.fingerprints
    assert expected.fingerprints["options"] == {"dataset_text_field": "body", "assistant_only_loss": False}
    losses = [m["loss"] for m in metrics(out)]
    assert losses[-1] < losses[0], proc.stdout[-2000:]


def test_cli_names_a_bad_parquet_row(tmp_path, tiny_dir):
    bad = write_rows(tmp_path / "bad.parquet", [ROWS[3], {"prompt": ROWS[3]["prompt"], "completion": []}])
    from test_train_launch import run_cli

    proc = run_cli(["--model_name_or_path", str(tiny_dir), "--dataset", bad, "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert f"error: {bad} row 2: 'completion' must be a non-empty list" in proc.stderr
    assert "Traceback" not in proc.stderr
