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

from .batches import Collator, ExampleDataset, GlobalBatchOrder, PackedDataset, SyntheticDataset, pack_examples
from .build import Datasets, build_datasets, check_chat_template, split_paths
from .readers import FORMATS, looks_like_hub_id, read_dataset
from .records import IGNORE_INDEX, DataError, DataStats, Record, check_text_field, record_kind
from .tokenizing import chat_segments, tokenize_records

__all__ = ["Collator", "DataError", "DataStats", "Datasets", "ExampleDataset", "FORMATS", "GlobalBatchOrder",
           "IGNORE_INDEX", "PackedDataset", "Record", "SyntheticDataset", "build_datasets", "chat_segments",
           "check_chat_template", "check_text_field", "looks_like_hub_id", "pack_examples", "read_dataset",
           "record_kind", "split_paths", "tokenize_records"]
