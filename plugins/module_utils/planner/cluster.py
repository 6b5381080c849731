"""What the job runs on (Cluster) and what it trains (Job): the planner's inputs, checked."""

import copy

from .errors import PlanError
from .model import ADAPTER_TARGETS


class Cluster:
    """What one rank and one node have. slots: ranks per node (one entry per node)."""

    def __init__(self, slots, gpu_memory_gib=None, host_memory_gib=None, bf16=True, device="gpu",
                 gpu_model=None):
        if not slots:
            raise PlanError("cluster has no nodes")
        self.slots = [int(s) for s in slots]
        if min(self.slots) <= 0:
            raise PlanError(f"every node needs at least one slot, got {self.slots}")
        self.device = device
        if device == "gpu" and not gpu_memory_gib:
            raise PlanError("gpu_memory_gib is unknown: set it in the inventory or gather GPU facts")
        if not host_memory_gib:
            raise PlanError("host_memory_gib is unknown: set it in the inventory or gather facts")
        self.gpu_memory_gib = float(gpu_memory_gib or 0)
        self.host_memory_gib = float(host_memory_gib)
        self.bf16 = bool(bf16) and device == "gpu"
        self.gpu_model = gpu_model

    @property
    def nodes(self):
        return len(self.slots)

    @property
    def world_size(self):
        return sum(self.slots)

    @property
    def ranks_per_node(self):
        return max(self.slots)

    @property
    def precision(self):
        if self.device != "gpu":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"

    def with_nodes(self, nodes):
        c = copy.copy(self)
        c.slots = [self.ranks_per_node] * nodes
        return c


class Job:
    """One training job. The optimizer's settings carry TrainingArguments' names (learning_rate,
    adam_beta1, adam_beta2, adam_epsilon, weight_decay, max_grad_norm): they go into ds_config.json
    and the launch arguments alike."""

    def __init__(self, seq_len, global_batch_size, finetune="full", lora_rank=16, lora_alpha=32,
                 lora_dropout=0.05, lora_targets=ADAPTER_TARGETS, learning_rate=None, adam_beta1=0.9,
                 adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                 shared_storage=False):
        if finetune not in ("full", "lora"):
            raise PlanError(f"finetune must be full or lora, got {finetune!r}")
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        if self.seq_len <= 0 or self.global_batch_size <= 0:
            raise PlanError("seq_len and global_batch_size must be positive")
        self.finetune = finetune
        self.lora_rank = int(lora_rank)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.lora_targets = tuple(lora_targets)
        unknown = [t for t in self.lora_targets if t not in ADAPTER_TARGETS]
        if unknown:
            raise PlanError(f"unknown LoRA targets {unknown} (known: {', '.join(ADAPTER_TARGETS)})")
        if learning_rate is None:
            learning_rate = 1e-5 if finetune == "full" else 2e-4
        self.learning_rate = float(learning_rate)
        self.adam_beta1 = float(adam_beta1)
        self.adam_beta2 = float(adam_beta2)
        self.adam_epsilon = float(adam_epsilon)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.shared_storage = bool(shared_storage)

    def with_changes(self, **changes):
        j = copy.copy(self)
        for k, v in changes.items():
            setattr(j, k, v)
        return j

