"""The memory planner: parameter counts, model-state memory against DeepSpeed's estimators,
activation memory against what autograd keeps on a real (tiny) model, plan choice over many
shapes, and the ds_config.json it writes, checked by DeepSpeed and HF Trainer themselves."""

import copy
import io
import json
import os
import re
from contextlib import redirect_stdout

import pytest
import torch
from ds_testlib import MODEL_NAMES, free_port, model_config
from transformers import AutoConfig, AutoModelForCausalLM

from ansible_collections.dsmesh.cluster.plugins.module_utils.planner import (
    PACKAGE_ARGS,
    Cluster,
    Job,
    ModelShape,
    PlanError,
    build_ds_config,
    plan,
    summary_lines,
    trainer_args,
)
from ansible_collections.dsmesh.cluster.plugins.module_utils.planner.memory import (
    activation_bytes,
    activation_bytes_per_layer_token,
    model_state_bytes,
)

GIB = 1024 ** 3


def hf_model(cfg, device="meta", dtype=torch.bfloat16):
    config = AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def hf_counts(model):
    """Total parameters (shared ones once) and DeepSpeed's largest layer, on a meta model."""
    total = sum(dict((id(p), p.numel()) for p in model.parameters()).values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@pytest.fixture(scope="module")
def meta_counts():
    return dict((name, hf_counts(hf_model(model_config(name)))) for name in MODEL_NAMES)


# ---------------------------------------------------------------------------------------------
# Parameters and model states


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_matches_transformers(name, meta_counts):
    shape = ModelShape.from_config(model_config(name))
    total, largest = meta_counts[name]
    assert shape.num_parameters == total
    assert shape.largest_layer_parameters == largest


def test_known_sizes():
    assert round(ModelShape.from_config(model_config("Qwen2.5-0.5B")).num_parameters / 1e9, 2) == 0.49
    assert round(ModelShape.from_config(model_config("Qwen2.5-7B")).num_parameters / 1e9, 2) == 7.62
    assert round(ModelShape.from_config(model_config("DeepSeek-R1-Distill-Qwen-32B")).num_parameters / 1e9, 1) == 32.8
    assert round(ModelShape.from_config(model_config("Qwen2.5-72B")).num_parameters / 1e9, 1) == 72.7
    assert round(ModelShape.from_config(model_config("Meta-Llama-3-8B")).num_parameters / 1e9, 2) == 8.03


LAYOUTS = [(1, 1), (8, 1), (8, 2), (4, 4), (8, 8)]  # (GPUs per node, nodes): 1 to 64 GPUs


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("gpus,nodes", LAYOUTS)
def test_model_states_match_deepspeed_estimators(name, gpus, nodes, meta_counts):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = ModelShape.from_config(model_config(name))
    total, largest = meta_counts[name]
    job = Job(seq_len=2048, global_batch_size=gpus * nodes)
    world = gpus * nodes

    def ours(stage, off_opt=False, off_param=False):
        return sum(model_state_bytes(shape, job, world, "bf16", stage, off_opt, off_param).values())

    cases = [
        (ours(2), estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)[1]),
        (ours(2, True), estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)[1]),
        (ours(3), estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False)[1]),
        (ours(3, True), estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                               cpu_offload_params=False)[1]),
        (ours(3, True, True), estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                                     cpu_offload_params=True)[1]),
    ]
    for mine, deepspeed_says in cases:
        assert abs(mine - deepspeed_says) <= 0.05 * deepspeed_says, (mine, deepspeed_says)


def test_all_live_estimators_on_a_real_model():
    """The printing *_all_live estimators on an instantiated model agree with the planner too."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    cfg = dict(model_config("Qwen2.5-0.5B"), num_hidden_layers=2, vocab_size=32000)
    model = hf_model(cfg, device="cpu")
    shape = ModelShape.from_config(cfg)
    job = Job(seq_len=1024, global_batch_size=8)
    for estimator, stage in ((estimate_zero2_model_states_mem_needs_all_live, 2),
                             (estimate_zero3_model_states_mem_needs_all_live, 3)):
        out = io.StringIO()
        with redirect_stdout(out):
            estimator(model, num_gpus_per_node=4, num_nodes=2)
        # "  0.55GB |   0.67GB | offload_optimizer=none, ..." : the GPU column of the no-offload row
        row = [line for line in out.getvalue().splitlines() if "offload_optimizer=none" in line][0]
        gpu_gib = float(re.findall(r"([\d.]+)GB", row)[1])
        mine = sum(model_state_bytes(shape, job, 8, "bf16", stage).values()) / GIB
        assert abs(mine - gpu_gib) <= 0.05 * gpu_gib, (stage, mine, gpu_gib)


def test_lora_states_are_frozen_base_plus_small_adapters():
    shape = ModelShape.from_config(model_config("DeepSeek-R1-Distill-Qwen-32B"))
    job = Job(seq_len=4096, global_batch_size=16, finetune="lora", lora_rank=16)
    adapters = shape.lora_parameters(16)
    assert adapters == 64 * 16 * (9 * 5120 + 2 * 1024 + 3 * 27648)
    s2 = model_state_bytes(shape, job, 16, "bf16", 2)
    assert s2["parameters"] == 2 * shape.num_parameters
    assert s2["optimizer_states"] == 12 * adapters // 16
    s3 = model_state_bytes(shape, job, 16, "bf16", 3)
    assert s3["parameters"] == 2 * shape.num_parameters // 16


# ---------------------------------------------------------------------------------------------
# Activations, against autograd on a real tiny model (bf16, CPU, SDPA)

TINY = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 2048, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}


def tiny_model(finetune, dropout=0.0, checkpointing=False, layers=2, intermediate=2048, vocab=512):
    torch.manual_seed(0)
    cfg = dict(TINY, num_hidden_layers=layers, intermediate_size=intermediate, vocab_size=vocab)
    model = hf_model(cfg, device="cpu")
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
        # What deepspeed.initialize does with bf16 enabled: every parameter, adapters included.
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if finetune == "lora":
            model.enable_input_require_grads()
    model.train()
    return model, ModelShape.from_config(cfg)


def saved_tensor_bytes(model, ids):
    """Bytes autograd keeps for backward (distinct storages, parameters excluded), per token."""
    params = set(p.untyped_storage().data_ptr() for p in model.parameters())
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_layer_activations_match_autograd(finetune):
    """The per-layer count is exact: two models differing by one layer differ by exactly that."""
    b, s = 2, 64
    ids = torch.randint(0, 512, (b, s))
    job = Job(seq_len=s, global_batch_size=b, finetune=finetune, lora_rank=8, lora_dropout=0.0)
    m1, shape = tiny_model(finetune, layers=1)
    m2, _ = tiny_model(finetune, layers=2)
    one_layer = (saved_tensor_bytes(m2, ids) - saved_tensor_bytes(m1, ids)) / (b * s)
    predicted = sum(activation_bytes_per_layer_token(shape, job, "bf16").values())
    # cos/sin are shared by layers; the planner counts them once per position, not per layer.
    assert abs(one_layer - predicted) <= 0.01 * predicted, (one_layer, predicted)


def peak_bytes_during_step(model, ids):
    """Peak memory above the start of one forward+backward, from PyTorch's CPU memory profiler.

    Parameter gradients are dropped as soon as they are produced (as ZeRO moves them into its
    buckets), so what remains is activations plus backward working memory.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        del out
        loss.backward()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    totals = [sum(x) for x in sizes]
    return max(totals) - totals[0]


@pytest.mark.parametrize("finetune,checkpointing,intermediate,vocab", [
    ("full", False, 2048, 512),  # every layer's activations
    ("full", True, 688, 4096),   # checkpointed: the fp32 loss dominates the peak
    ("lora", True, 2048, 512),   # checkpointed: the recomputed layer and its backward dominate
])
def test_peak_activations_match_cpu_profiler(finetune, checkpointing, intermediate, vocab):
    b, s = 2, 256
    model, shape = tiny_model(finetune, checkpointing=checkpointing, layers=3, intermediate=intermediate,
                              vocab=vocab)
    ids = torch.randint(0, vocab, (b, s))
    measured = peak_bytes_during_step(model, ids)
    job = Job(seq_len=s, global_batch_size=b, finetune=finetune, lora_rank=8, lora_dropout=0.0)
    predicted = activation_bytes(shape, job, "bf16", b, checkpointing)["total"]
    assert abs(measured - predicted) <= 0.05 * measured, (measured, predicted)


# ---------------------------------------------------------------------------------------------
# Plans over many shapes

GPU_SIZES = [24, 40, 80, 96, 141]
CLUSTERS = [[1], [8], [8, 8], [4] * 4, [8] * 8]


def _check_plan(p, shape, cluster, job):
    assert p.micro_batch_size * p.gradient_accumulation_steps * cluster.world_size == job.global_batch_size
    g = p.gpu_memory_gib
    assert g["peak_reserved"] <= g["usable"]
    assert p.host_memory_gib["peak"] <= p.host_memory_usable_gib
    for r in p.rejected_faster_plans:
        assert r["relative_step_time"] <= p.relative_step_time
        assert "needs" in r["why_not"]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_plans_fit_or_explain(name, finetune):
    shape = ModelShape.from_config(model_config(name))
    outcomes = {}
    for slots in CLUSTERS:
        previous_time = None
        for gib in GPU_SIZES:
            cluster = Cluster(slots, gpu_memory_gib=gib, host_memory_gib=1024, bf16=True)
            job = Job(seq_len=4096, global_batch_size=8 * cluster.world_size, finetune=finetune)
            try:
                p = plan(shape, cluster, job)
            except PlanError as exc:
                msg = str(exc)
                assert "GiB per GPU" in msg and "what would make it fit" in msg
                outcomes[(len(slots), gib)] = None
                continue
            _check_plan(p, shape, cluster, job)
            # More GPU memory never makes the chosen plan slower.
            if previous_time is not None:
                assert p.relative_step_time <= previous_time
            previous_time = p.relative_step_time
            outcomes[(len(slots), gib)] = p
    # Something fits for every model on 8 x 8 x 141 GB.
    assert outcomes[(8, 141)] is not None


def test_small_model_gets_the_fastest_plan():
    shape = ModelShape.from_config(model_config("Qwen2.5-0.5B"))
    p = plan(shape, Cluster([8], gpu_memory_gib=80, host_memory_gib=512), Job(seq_len=2048, global_batch_size=64))
    assert p.zero_stage == 0 and not p.offload_optimizer and not p.gradient_checkpointing
    assert p.rejected_faster_plans == [] or all(r["relative_step_time"] <= p.relative_step_time
                                                   for r in p.rejected_faster_plans)


def test_the_32b_example():
    shape = ModelShape.from_config(model_config("DeepSeek-R1-Distill-Qwen-32B"))
    cluster = Cluster([8, 8], gpu_memory_gib=96, host_memory_gib=1024, bf16=True, gpu_model="NVIDIA H20")
    full = plan(shape, cluster, Job(seq_len=4096, global_batch_size=64))
    assert full.zero_stage == 3 and not full.offload_optimizer
    assert full.rejected_faster_plans, "a faster plan that does not fit should be reported"
    lora = plan(shape, cluster, Job(seq_len=4096, global_batch_size=64, finetune="lora"))
    assert lora.gpu_memory_gib["model_states"] < full.gpu_memory_gib["model_states"] * 2
    lines = summary_lines(full)
    assert any("GPU memory per rank" in line for line in lines)


def test_offload_when_nothing_else_fits():
    shape = ModelShape.from_config(model_config("Qwen2.5-72B"))
    p = plan(shape, Cluster([8, 8], gpu_memory_gib=96, host_memory_gib=1024), Job(seq_len=4096, global_batch_size=64))
    assert p.zero_stage == 3 and p.offload_optimizer
    assert p.host_memory_gib["offload"] > 0


def test_impossible_job_says_what_would_fit():
    shape = ModelShape.from_config(model_config("Qwen2.5-72B"))
    with pytest.raises(PlanError) as err:
        plan(shape, Cluster([8], gpu_memory_gib=24, host_memory_gib=256), Job(seq_len=32768, global_batch_size=8))
    msg = str(err.value)
    assert "does not fit on 1 node(s) x 8 GPUs" in msg
    assert re.search(r"needs [\d.]+ GiB per GPU", msg) and "usable" in msg
    assert "nodes of 8 GPUs" in msg and "sequence length" in msg


def test_batch_must_divide_over_ranks():
    shape = ModelShape.from_config(model_config("Qwen2.5-0.5B"))
    with pytest.raises(PlanError, match="use 96 or 112"):
        plan(shape, Cluster([8, 8], gpu_memory_gib=80, host_memory_gib=512), Job(seq_len=2048, global_batch_size=100))


def test_plan_overrides_are_obeyed_and_checked():
    shape = ModelShape.from_config(model_config("Qwen2.5-7B"))
    cluster = Cluster([8], gpu_memory_gib=80, host_memory_gib=1024)
    job = Job(seq_len=4096, global_batch_size=32)
    p = plan(shape, cluster, job, overrides={"zero_stage": 3, "micro_batch_size": 1})
    assert p.zero_stage == 3 and p.micro_batch_size == 1 and p.gradient_accumulation_steps == 4
    with pytest.raises(PlanError, match="drop the plan overrides"):
        plan(shape, cluster, job, overrides={"zero_stage": 0, "gradient_checkpointing": False})
    with pytest.raises(PlanError, match="unknown plan override"):
        plan(shape, cluster, job, overrides={"stage": 3})


def test_cpu_ranks_plan_in_fp32():
    shape = ModelShape.from_config(dict(TINY))
    p = plan(shape, Cluster([2, 2], host_memory_gib=24, device="cpu"), Job(seq_len=128, global_batch_size=8))
    assert p.precision == "fp32" and not p.offload_optimizer


# ---------------------------------------------------------------------------------------------
# ds_config.json


def _config(name="Qwen2.5-7B", slots=(8, 8), gib=80, finetune="full", overrides=None, bf16=True, **job):
    shape = ModelShape.from_config(model_config(name), name=name)
    cluster = Cluster(list(slots), gpu_memory_gib=gib, host_memory_gib=1024, bf16=bf16)
    j = Job(seq_len=job.pop("seq_len", 4096), global_batch_size=job.pop("global_batch_size", 64),
            finetune=finetune, **job)
    p = plan(shape, cluster, j, overrides=overrides)
    return p, j, shape


def test_config_is_concrete_and_consistent():
    p, job, shape = _config()
    cfg = build_ds_config(p, job, shape)
    text = json.dumps(cfg)
    assert '"auto"' not in text
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 16
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["zero_optimization"]["stage"] == p.zero_stage
    args = trainer_args(cfg, p)
    assert args["per_device_train_batch_size"] == p.micro_batch_size
    assert args["gradient_checkpointing"] == p.gradient_checkpointing


def test_fp16_without_bf16_hardware():
    p, job, shape = _config(bf16=False)
    cfg = build_ds_config(p, job, shape)
    assert cfg["fp16"]["enabled"] and "bf16" not in cfg
    assert trainer_args(cfg, p)["fp16"] is True


def test_config_overrides_merge_and_are_checked():
    p, job, shape = _config()
    cfg = build_ds_config(p, job, shape, {"steps_per_print": 7, "zero_optimization": {"overlap_comm": False}})
    assert cfg["steps_per_print"] == 7 and cfg["zero_optimization"]["overlap_comm"] is False
    assert cfg["zero_optimization"]["stage"] == p.zero_stage
    with pytest.raises(PlanError, match="auto"):
        build_ds_config(p, job, shape, {"gradient_clipping": "auto"})
    with pytest.raises(PlanError, match="batch sizes disagree"):
        build_ds_config(p, job, shape, {"train_micro_batch_size_per_gpu": p.micro_batch_size + 1})


def test_an_override_to_deepspeeds_fused_adam_drops_torchs_fused_flag():
    """`fused` is torch.optim.AdamW's argument; DeepSpeed's FusedAdam (torch_adam false) stops every rank
    on it (TypeError: FusedAdam.__init__() got an unexpected keyword argument 'fused')."""
    p, job, shape = _config()
    assert build_ds_config(p, job, shape)["optimizer"]["params"]["fused"] is True
    params = build_ds_config(p, job, shape, {"optimizer": {"params": {"torch_adam": False}}})["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params
    with pytest.raises(PlanError, match="optimizer.params.fused"):
        build_ds_config(p, job, shape, {"optimizer": {"params": {"torch_adam": False, "fused": True}}})


class DataParallelOnly:
    """DeepSpeed's mpu interface, saying how many data-parallel ranks the config is for."""

    def __init__(self, world):
        self.world = world

    def get_data_parallel_world_size(self):
        return self.world

    def get_data_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


@pytest.fixture(scope="module")
def deepspeed_dist():
    """A one-process gloo group on loopback, so DeepSpeedConfig can ask for the rank."""
    import deepspeed
    import deepspeed.comm as dist
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


CONFIG_CASES = [
    # (model, slots, GPU GiB, finetune, plan overrides): every stage and offload variant
    ("Qwen2.5-0.5B", (8,), 80, "full", {}),
    ("Qwen2.5-1.5B", (8, 8), 24, "full", {"zero_stage": 1}),
    ("Qwen2.5-7B", (8, 8), 80, "full", {"zero_stage": 2}),
    ("Qwen2.5-7B", (8,), 40, "full", {"zero_stage": 2, "offload_optimizer": True}),
    ("DeepSeek-R1-Distill-Qwen-32B", (8, 8), 96, "full", {}),
    ("DeepSeek-R1-Distill-Qwen-32B", (8, 8), 96, "lora", {}),
    ("Qwen2.5-72B", (8, 8), 96, "full", {}),
    ("Qwen2.5-72B", (8,) * 8, 40, "full", {"offload_param": True}),
    ("Meta-Llama-3-8B", (4,) * 4, 40, "lora", {"zero_stage": 3}),
]


@pytest.mark.parametrize("name,slots,gib,finetune,overrides", CONFIG_CASES)
def test_deepspeed_accepts_the_config(deepspeed_dist, name, slots, gib, finetune, overrides):
    from deepspeed.runtime.config import DeepSpeedConfig

    p, job, shape = _config(name, slots, gib, finetune, overrides)
    cfg = build_ds_config(p, job, shape)
    parsed = DeepSpeedConfig(copy.deepcopy(cfg), mpu=DataParallelOnly(p.world_size))
    assert parsed.world_size == p.world_size
    assert parsed.train_batch_size == p.global_batch_size
    assert parsed.train_micro_batch_size_per_gpu == p.micro_batch_size
    assert parsed.gradient_accumulation_steps == p.gradient_accumulation_steps
    assert parsed.zero_optimization_stage == p.zero_stage
    assert parsed.bfloat16_config.enabled
    assert (parsed.zero_config.offload_optimizer is not None) == p.offload_optimizer
    assert (parsed.zero_config.offload_param is not None) == p.offload_param
    # The same config for a different number of ranks is refused: the check is real.
    with pytest.raises(AssertionError):
        DeepSpeedConfig(copy.deepcopy(cfg), mpu=DataParallelOnly(p.world_size * 2))


@pytest.mark.parametrize("stage,finetune", [(0, "lora"), (1, "full"), (2, "full"), (3, "lora")])
def test_deepspeed_engine_trains_with_the_config(deepspeed_dist, stage, finetune):
    """deepspeed.initialize and two micro-steps on a tiny model with the planned bf16 config
    (one rank on DeepSpeed's CPU accelerator)."""
    shape = ModelShape.from_config(dict(TINY))
    job = Job(seq_len=64, global_batch_size=4, finetune=finetune, lora_rank=8)
    p = plan(shape, Cluster([1], gpu_memory_gib=24, host_memory_gib=64, bf16=True), job,
             overrides={"zero_stage": stage, "micro_batch_size": 2})
    cfg = build_ds_config(p, job, shape)
    model = hf_model(dict(TINY), device="cpu")
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, _, _, _ = deepspeed_dist.initialize(model=model, model_parameters=trainable, config=cfg)
    ids = torch.randint(0, 512, (2, 64))
    for _ in range(p.gradient_accumulation_steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss)
    assert engine.global_steps == 1 and engine.zero_optimization_stage() == stage
    assert engine.train_batch_size() == 4 and engine.bfloat16_enabled()
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)


@pytest.fixture
def hf_args_cleanup():
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()


class WithWorldSize:
    """Real TrainingArguments, seen as one rank of a bigger job (HF reads args.world_size)."""

    def __init__(self, args, world):
        self._args = args
        self.world_size = world

    def __getattr__(self, name):
        return getattr(self._args, name)


@pytest.mark.parametrize("name,slots,gib,finetune,overrides", CONFIG_CASES)
def test_hf_trainer_accepts_the_config(name, slots, gib, finetune, overrides, hf_args_cleanup):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    p, job, shape = _config(name, slots, gib, finetune, overrides)
    cfg = build_ds_config(p, job, shape)
    targs = dict((k, v) for k, v in trainer_args(cfg, p).items() if k not in PACKAGE_ARGS)
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], **targs)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(cfg))
    hf.trainer_config_process(WithWorldSize(args, p.world_size))
    assert hf.mismatches == []
    # A Trainer argument that disagrees is caught: the comparison is real.
    wrong = HfTrainerDeepSpeedConfig(copy.deepcopy(cfg))
    wrong.trainer_config_process(WithWorldSize(args, p.world_size * 2))
    assert wrong.mismatches


def test_hf_training_arguments_take_the_config(tmp_path, hf_args_cleanup):
    """TrainingArguments(deepspeed=...) runs HF's whole DeepSpeed config processing (1 CPU rank)."""
    from transformers import TrainingArguments

    shape = ModelShape.from_config(dict(TINY))
    job = Job(seq_len=64, global_batch_size=4)
    p = plan(shape, Cluster([1], gpu_memory_gib=24, host_memory_gib=64, bf16=True), job,
             overrides={"zero_stage": 2})
    cfg = build_ds_config(p, job, shape)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    targs = {k: v for k, v in trainer_args(cfg, p).items() if k not in PACKAGE_ARGS}
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), use_cpu=True, report_to=[], **targs)
    model = hf_model(dict(TINY), device="cpu")
    args.hf_deepspeed_config.trainer_config_finalize(args, model, num_training_steps=10)
    assert args.hf_deepspeed_config.config["train_batch_size"] == 4
    assert args.hf_deepspeed_config.mismatches == []


# ---------------------------------------------------------------------------------------------
# One GPU: the plain PyTorch engine, partial checkpointing


def test_one_gpu_gets_the_torch_engine_and_its_arguments():
    shape = ModelShape.from_config(model_config("Qwen2.5-1.5B"))
    job = Job(seq_len=2048, global_batch_size=8)
    p = plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job)
    assert p.engine == "torch" and p.compile == "regions" and not p.gradient_checkpointing
    assert p.micro_batch_size == 8
    # fp32 master weights: fp32 weights (4), gradients (4), AdamW moments (8), autocast's 16-bit copies (2)
    assert p.master_weights == "fp32"
    states = p.gpu_memory_gib
    assert abs(states["model_states"] - 18 * shape.num_parameters / GIB) < 0.05
    assert states["model_states.autocast_weight_copies"] == round(2 * shape.num_parameters / GIB, 2)
    args = trainer_args(build_ds_config(p, job, shape), p)
    assert args["optim"] == "adamw_torch_fused" and args["compile"] == "regions"
    # DeepSpeed stays available (compiled with DeepCompile at ZeRO 1-3), and several GPUs never get the torch engine
    ds = plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job, overrides={"engine": "deepspeed"})
    assert ds.engine == "deepspeed" and ds.relative_step_time > p.relative_step_time and ds.master_weights == "fp32"
    assert "optim" not in trainer_args(build_ds_config(ds, job, shape), ds)
    z3 = plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job, overrides={"zero_stage": 3})
    assert z3.compile == "deepcompile" and build_ds_config(z3, job, shape)["compile"] == {"deepcompile": True}
    eager = plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job,
                 overrides={"zero_stage": 3, "compile": "none"})
    assert "compile" not in build_ds_config(eager, job, shape) and eager.relative_step_time > z3.relative_step_time
    multi = plan(shape, Cluster([8], gpu_memory_gib=80, host_memory_gib=512), Job(seq_len=2048, global_batch_size=64))
    assert multi.engine == "deepspeed"
    with pytest.raises(PlanError, match="engine must be one of"):
        plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job, overrides={"engine": "fsdp"})
    with pytest.raises(PlanError, match="compile must be one of"):
        plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128), job, overrides={"compile": "jit"})
    cpu = plan(shape, Cluster([2], host_memory_gib=64, device="cpu"), job)
    assert cpu.compile == "none" and cpu.master_weights == "fp32-weights"


def test_partial_checkpointing_keeps_as_many_layers_as_fit():
    shape = ModelShape.from_config(model_config("DeepSeek-R1-Distill-Qwen-32B"))
    job = Job(seq_len=2048, global_batch_size=4, finetune="lora")
    cluster = Cluster([1], gpu_memory_gib=79.65, host_memory_gib=128)
    p = plan(shape, cluster, job)
    # the H100 run: 60 of 64 layers checkpointed at micro-batch 2, 74.0 GiB predicted, 74.1 measured
    assert p.engine == "torch" and p.gradient_checkpointing and p.micro_batch_size == 2
    assert 0 < p.checkpoint_layers < 64 and "of 64 layers" in p.label
    assert abs(p.predicted_peak_allocated_gib - 74.1) / 74.1 < 0.05
    assert trainer_args(build_ds_config(p, job, shape), p)["checkpoint_layers"] == p.checkpoint_layers
    # one more unchecked layer would not fit: the choice is the fewest checkpointed layers
    tighter = plan(shape, cluster, job, overrides={"micro_batch_size": 2, "checkpoint_layers": p.checkpoint_layers})
    assert tighter.predicted_peak_allocated_gib == p.predicted_peak_allocated_gib
    with pytest.raises(PlanError, match="does not fit"):
        plan(shape, cluster, job, overrides={"micro_batch_size": 2, "checkpoint_layers": p.checkpoint_layers - 1})
    # fewer checkpointed layers, less recomputation: faster under the speed model
    full = plan(shape, cluster, job, overrides={"micro_batch_size": 2, "checkpoint_layers": 64})
    assert full.relative_step_time > p.relative_step_time
    assert "checkpoint_layers" not in trainer_args(build_ds_config(full, job, shape), full)


def test_predicted_speed_from_the_gpu_table():
    shape = ModelShape.from_config(model_config("Qwen2.5-1.5B"))
    job = Job(seq_len=2048, global_batch_size=8)
    p = plan(shape, Cluster([1], gpu_memory_gib=139.8, host_memory_gib=128, gpu_model="NVIDIA H200"), job)
    # the H200 run (docs/gpu-benchmarks.md): 49,259 tokens/s, 51.4% MFU; the prediction is within 15%
    assert p.peak_tflops_per_gpu == 989 and abs(p.predicted_tokens_per_s / 49259 - 1) < 0.15
    assert p.predicted_step_seconds == round(8 * 2048 / p.predicted_tokens_per_s, 3)
    assert any(line.startswith("speed: about") for line in summary_lines(p))
    # twice the GPUs, about twice the tokens/s; an unknown GPU gets no absolute figure and says so
    two = plan(shape, Cluster([2], gpu_memory_gib=139.8, host_memory_gib=128, gpu_model="NVIDIA H200"), job)
    assert 1.4 < two.predicted_tokens_per_s / p.predicted_tokens_per_s < 2.0
    unknown = plan(shape, Cluster([1], gpu_memory_gib=80, host_memory_gib=128, gpu_model="Some GPU"), job)
    assert unknown.predicted_tokens_per_s is None
    assert any("not in the GPU table" in line for line in summary_lines(unknown))
    # the FLOPs per token of docs/gpu-benchmarks.md (the training package's formula on the real models)
    assert round(shape.training_flops_per_token(2048) / 1e9, 2) == 10.32
    big = ModelShape.from_config(model_config("DeepSeek-R1-Distill-Qwen-32B"))
    assert round(big.training_flops_per_token(2048, lora_rank=16) / 1e9, 1) == 136.8


def w4_shape():
    from train.tiny_model import PRESETS

    return ModelShape.from_config(dict(PRESETS["deepseek-r1-distill-qwen-32b-8layers"]))


W4_JOB = Job(seq_len=4096, global_batch_size=8, finetune="full", learning_rate=1e-5)
H200 = Cluster([1], gpu_memory_gib=143771 / 1024, host_memory_gib=128, gpu_model="NVIDIA H200")


def test_the_chunked_loss_lets_w4_run_the_faster_micro_batch_within_the_margin():
    """W4 (the 32B shape in 8 layers, ZeRO-3 DeepCompile on an H200): micro-batch 4 with the whole
    logits measured 134.1 GiB allocated, past the 134.7 usable once fragmentation is counted; the
    chunked loss keeps one chunk of logits and the 16-bit gradient of all of them instead (~6 GiB less)."""
    shape, overrides = w4_shape(), {"zero_stage": 3}
    p = plan(shape, H200, W4_JOB, overrides=overrides)
    assert p.chunked_loss and p.micro_batch_size == 4 and not p.gradient_checkpointing and "chunked loss" in p.label
    assert p.predicted_peak_reserved_gib < p.gpu_memory_gib["usable"]
    assert trainer_args(build_ds_config(p, W4_JOB, shape), p)["chunked_loss"] is True
    stock = plan(shape, H200, W4_JOB, overrides=dict(overrides, chunked_loss=False))
    assert not stock.chunked_loss and stock.micro_batch_size == 2  # the plan measured before it
    assert "chunked_loss" not in trainer_args(build_ds_config(stock, W4_JOB, shape), stock)
    assert p.relative_step_time < stock.relative_step_time
    whole = activation_bytes(shape, W4_JOB, "bf16", 4, False, compiled=True)
    chunked = activation_bytes(shape, W4_JOB, "bf16", 4, False, compiled=True, chunked_loss=True)
    assert whole["layers"] == chunked["layers"]
    assert 5.5 < (whole["loss_and_working"] - chunked["loss_and_working"]) / GIB < 6.5
    # where both fit at the same speed, transformers' own loss is kept
    assert not plan(shape, H200, W4_JOB, overrides=dict(overrides, micro_batch_size=2)).chunked_loss


def test_the_chunked_loss_only_where_the_package_runs_it():
    shape = w4_shape()
    cpu = plan(shape, Cluster([1], device="cpu", host_memory_gib=1024), W4_JOB.with_changes(seq_len=256))
    assert not cpu.chunked_loss  # the lab's CPU ranks: transformers' own loss
    regions = plan(shape, H200, W4_JOB, overrides={"engine": "torch"})
    assert regions.compile == "regions" and not regions.chunked_loss
    other = ModelShape.from_config(dict(model_config("Qwen2.5-1.5B"), model_type="gemma2"))
    with pytest.raises(PlanError, match="chunked_loss.*not 'gemma2'.*drop the override"):
        plan(other, H200, W4_JOB, overrides={"chunked_loss": True})
