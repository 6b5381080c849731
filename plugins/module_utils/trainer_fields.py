"""The one table between ds_config.json and Hugging Face TrainingArguments (standard library only).

HF Trainer refuses a DeepSpeed config whose values differ from its arguments. The planner writes
the config and the launch arguments from the same job values through this table, and the training
package (train/args.py, on the nodes) fills the arguments a user left out from the config through
it too, so the two sides cannot disagree.
"""

# (ds_config path, TrainingArguments field, type). A number in a path indexes a list.
CONFIG_FIELDS = (
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size", int),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", int),
    ("gradient_clipping", "max_grad_norm", float),
    ("bf16.enabled", "bf16", bool),
    ("fp16.enabled", "fp16", bool),
    ("optimizer.params.lr", "learning_rate", float),
    ("optimizer.params.betas.0", "adam_beta1", float),
    ("optimizer.params.betas.1", "adam_beta2", float),
    ("optimizer.params.eps", "adam_epsilon", float),
    ("optimizer.params.weight_decay", "weight_decay", float),
)

# The optimizer's hyperparameters: the part of the table a user sets (the rest is the plan's).
OPTIMIZER_FIELDS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm")
# Decided by the plan (batch layout) or by the GPUs (precision), never by a user's training argument.
PLAN_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16")


def get_path(config, path):
    """The value at a dotted path, or None where any part is missing."""
    node = config
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def is_set(value):
    return value is not None and value != "auto"


def trainer_values(config):
    """{TrainingArguments field: value} for every field of the table the config sets."""
    out = {}
    for path, field, kind in CONFIG_FIELDS:
        value = get_path(config, path)
        if is_set(value):
            out[field] = kind(value)
    return out
