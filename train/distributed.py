"""Process-group plumbing: the same code runs under the deepspeed launcher, torchrun, or by hand,
on GPUs (NCCL, set up by accelerate) or on CPUs (gloo, set up here)."""

import os
import socket

import torch
import torch.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_per_node(default=1):
    """This node's ranks, as the deepspeed launcher (LOCAL_SIZE) or torchrun (LOCAL_WORLD_SIZE) says."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or default)


def prepare_environment(use_deepspeed):
    """Before anything touches torch.distributed. Returns (rank, local_rank, world_size)."""
    if use_deepspeed and "RANK" not in os.environ:
        # started by hand (python -m train): a one-process group, which DeepSpeed needs anyway
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Growable segments instead of fixed blocks: almost no fragmentation, so a plan that uses most of
    # the GPU does not fail on a block that cannot be split (read at the first CUDA allocation).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks on one host share its cores; oversubscribing made ZeRO-3 4x slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node()))
    return rank, local_rank, world_size


def init_cpu_process_group(use_deepspeed, world_size):
    """accelerate 1.15 sets up no backend without a GPU and would count one process; create its
    state with gloo first (TrainingArguments then gets accelerator_config use_configured_state)."""
    if torch.cuda.is_available() or world_size <= 1 and not use_deepspeed:
        return
    from accelerate import PartialState

    if use_deepspeed:
        PartialState(backend="gloo")
    else:
        PartialState(cpu=True, backend="gloo")


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_initialized():
        dist.barrier()


def broadcast_object(obj, src=0):
    """rank `src`'s obj on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(value, device):
    if not is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def shutdown():
    """End cleanly: a run that exits without this sometimes crashed in a destructor."""
    if is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
