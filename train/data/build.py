"""The training and evaluation datasets of a run: files read, rows tokenised, packed, fingerprinted."""

import random
from dataclasses import dataclass, field, fields

import torch

from .batches import ExampleDataset, PackedDataset, SyntheticDataset
from .readers import read_dataset
from .records import DataError, DataStats, check_text_field
from .tokenizing import tokenize_records


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    train_stats: DataStats
    eval_stats: DataStats | None
    fingerprints: dict = field(default_factory=dict)  # sha256 of the files, identifies the data of a run

    @property
    def one_sequence_per_row(self):
        """No row, in training or evaluation, packs several examples."""
        return all(d.one_sequence_per_row for d in (self.train, self.eval) if d is not None)


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
        train = SyntheticDataset(data_args.synthetic_samples, max_len, vocab_size, seed,
                                 data_args.synthetic_example_length)
        per_row = len(train.example_lengths)
        stats = DataStats(examples=len(train) * per_row, rows=len(train), tokens=len(train) * max_len,
                          trainable_tokens=len(train) * (max_len - per_row))
        synthetic = [data_args.synthetic_samples, max_len] + ([data_args.synthetic_example_length] if per_row > 1 else [])
        return Datasets(train, None, stats, None, {"synthetic": synthetic})

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
