"""Examples into sequences and batches: packing without attention leaking between examples, the
datasets the Trainer reads, synthetic rows for benchmarks, the order of training rows, the collator."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .records import IGNORE_INDEX, DataError


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
        self.one_sequence_per_row = all(len(r) == 1 for r in self.rows)

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

    one_sequence_per_row = True

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        input_ids, labels = self.examples[i]
        return {"input_ids": input_ids, "labels": labels}


class SyntheticDataset(torch.utils.data.Dataset):
    """Full rows of random token ids, for throughput benchmarks that must not read any data. With
    example_length, each row packs examples of that many tokens (the last one takes what is left), laid
    out as PackedDataset lays out real ones: position_ids restart and no loss on each first token."""

    def __init__(self, num_rows, max_seq_length, vocab_size, seed, example_length=0):
        self.num_rows, self.length, self.vocab_size, self.seed = num_rows, max_seq_length, vocab_size, seed
        n = example_length if 0 < example_length < max_seq_length else max_seq_length
        self.example_lengths = [n] * (max_seq_length // n) + ([max_seq_length % n] if max_seq_length % n else [])
        self.one_sequence_per_row = len(self.example_lengths) == 1
        # every row has the same layout (the collator copies it into each batch)
        self.starts = np.cumsum([0] + self.example_lengths[:-1])
        self.position_ids = np.concatenate([np.arange(k) for k in self.example_lengths])

    def __len__(self):
        return self.num_rows

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        input_ids = rng.integers(0, self.vocab_size, size=self.length, dtype=np.int64)
        labels = input_ids.copy()
        labels[self.starts] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": self.position_ids}


class GlobalBatchOrder(torch.utils.data.Sampler):
    """The order training rows are read in: each epoch a permutation seeded by (seed, epoch), cut to
    whole global batches, so optimizer step k of an epoch trains rows [k*G, (k+1)*G) of it whatever
    the ranks x micro-batch x accumulation that make up G (a run resumed on another world size sees
    the rows the uninterrupted run would). accelerate hands rank r micro-batches r, r+W, ... of it;
    the epoch's last rows that fill no global batch are left out (other rows each epoch)."""

    def __init__(self, num_rows, global_batch, seed):
        if num_rows < global_batch:
            raise DataError(f"the training data has {num_rows} sequences, fewer than one global batch of "
                            f"{global_batch}: give more data or a smaller global batch")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_rows // self.global_batch * self.global_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator)[:len(self)].tolist())


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
