"""The plan the search picks (a typed result) and its readable summary."""

from dataclasses import asdict, dataclass, field

from ..gpus import gpu_spec
from .memory import trainable_parameters
from .settings import gib

# The DeepCompile pass that keeps gathered ZeRO-3 parameters resident plans against this fraction of
# the GPU (deepspeed/compile/passes/selective_gather.py MEM_MARGIN = 0.1): it fills free memory on
# purpose, so a DeepCompile run's peak reserved memory approaches it whatever the plan needs.
DEEPCOMPILE_MEMORY_FRACTION = 0.9


@dataclass
class Plan:
    """How the job runs: engine, ZeRO stage, offload, checkpointing, batch layout, compilation, and
    the memory it needs. Modules return as_dict(); bench and tests read the attributes."""
    model: dict
    trainable_parameters: int
    finetune: str
    nodes: int
    slots: list
    world_size: int
    device: str
    gpu_model: str
    precision: str
    seq_len: int
    global_batch_size: int
    engine: str
    compile: str
    master_weights: str
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    gradient_checkpointing: bool
    checkpoint_layers: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    label: str
    relative_step_time: float
    rejected_faster_plans: list
    candidates_considered: int
    candidates_fitting: int
    gpu_memory_gib: dict
    host_memory_gib: dict
    host_memory_usable_gib: float
    predicted_peak_allocated_gib: float
    predicted_peak_reserved_gib: float
    overrides: dict
    settings: dict
    warnings: list
    lora: dict = None
    deepcompile_memory_bound_gib: float = None
    # Absolute speed, where the GPU table knows the GPU's peak: the speed model's relative time turned
    # into MFU with settings base_mfu (calibrated on this project's H200 runs).
    peak_tflops_per_gpu: float = None
    predicted_mfu: float = None
    predicted_tokens_per_s: float = None
    predicted_step_seconds: float = None
    why: list = field(default_factory=list)
    # the training package's chunked LM head and loss (--chunked_loss) instead of the whole logits
    chunked_loss: bool = False

    @classmethod
    def build(cls, model, job, cluster, cand, step_time, est, settings, overrides, rejected, considered, fitting,
              master_weights, warnings):
        checkpoint_layers = 0
        if cand.checkpointing:
            checkpoint_layers = cand.checkpoint_layers if cand.checkpoint_layers is not None else model.num_layers
        lora = None
        if job.finetune == "lora":
            lora = {"rank": job.lora_rank, "alpha": job.lora_alpha, "dropout": job.lora_dropout,
                    "target_modules": list(job.lora_targets)}
        speed = predicted_speed(model, job, cluster, step_time, settings)
        bound = None
        if cand.compile == "deepcompile" and cand.stage == 3:
            bound = gib(max(est["device_total"] * DEEPCOMPILE_MEMORY_FRACTION, est["peak_reserved"]))
        return cls(
            model=model.describe(), trainable_parameters=trainable_parameters(model, job), finetune=job.finetune,
            nodes=cluster.nodes, slots=cluster.slots, world_size=cluster.world_size, device=cluster.device,
            gpu_model=cluster.gpu_model, precision=cluster.precision, seq_len=job.seq_len,
            global_batch_size=job.global_batch_size, engine=cand.engine, compile=cand.compile,
            master_weights=master_weights, zero_stage=cand.stage, offload_optimizer=cand.offload_optimizer,
            offload_param=cand.offload_param, gradient_checkpointing=cand.checkpointing,
            checkpoint_layers=checkpoint_layers, micro_batch_size=cand.micro_batch,
            gradient_accumulation_steps=job.global_batch_size // cluster.world_size // cand.micro_batch,
            label=cand.label(), relative_step_time=step_time, rejected_faster_plans=rejected,
            candidates_considered=considered, candidates_fitting=fitting, gpu_memory_gib=breakdown_gib(est),
            host_memory_gib={k: gib(v) for k, v in est["host"].items()}, host_memory_usable_gib=gib(est["host_usable"]),
            predicted_peak_allocated_gib=gib(est["peak_allocated"]),
            predicted_peak_reserved_gib=gib(est["peak_reserved"]), overrides=overrides, settings=settings,
            warnings=list(warnings), lora=lora, deepcompile_memory_bound_gib=bound, chunked_loss=cand.chunked_loss,
            **speed)

    def as_dict(self):
        return asdict(self)


def predicted_speed(model, job, cluster, step_time, settings):
    """Tokens/s over the whole cluster and seconds per optimizer step, where the GPU's peak is known."""
    spec = gpu_spec(cluster.gpu_model) if cluster.device == "gpu" else None
    if not spec:
        return {}
    mfu = settings["base_mfu"] / step_time
    flops = model.training_flops_per_token(job.seq_len, job.lora_rank if job.finetune == "lora" else None,
                                           job.lora_targets)
    tokens_per_s = mfu * spec["peak_tflops"] * 1e12 * cluster.world_size / flops
    return {"peak_tflops_per_gpu": spec["peak_tflops"], "predicted_mfu": round(mfu, 4),
            "predicted_tokens_per_s": round(tokens_per_s, 1),
            "predicted_step_seconds": round(job.global_batch_size * job.seq_len / tokens_per_s, 3)}


def breakdown_gib(est):
    out = {"model_states." + k: gib(v) for k, v in est["model_states"].items()}
    out["model_states"] = gib(est["model_states_total"])
    acts = est["activations"]
    out["activations"] = gib(acts["total"])
    out["activations.layers"] = gib(acts["layers"])
    out["activations.loss_and_working"] = gib(acts["loss_and_working"])
    for k, v in est["buffers"].items():
        out["buffers." + k] = gib(v)
    out["buffers"] = gib(sum(est["buffers"].values()))
    out["peak_allocated"] = gib(est["peak_allocated"])
    out["fragmentation"] = gib(est["peak_reserved"] - est["peak_allocated"])
    out["peak_reserved"] = gib(est["peak_reserved"])
    out["usable"] = gib(est["usable"])
    out["device_total"] = gib(est["device_total"])
    return out


MASTER_WEIGHTS = {
    "fp32": "fp32 master weights, 16-bit compute",
    "fp32-weights": "fp32 weights",
    "adapters": "fp32 LoRA adapters on the frozen 16-bit base",
}


def why_lines(p):
    g = p.gpu_memory_gib
    lines = [f"{p.label}: {p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation step(s) = global "
             f"batch {p.global_batch_size} on {p.world_size} rank(s)",
             f"GPU per rank: {g['peak_reserved']:.1f} GiB reserved of {g['usable']:.1f} usable (model states "
             f"{g['model_states']:.1f}, activations {g['activations']:.1f}, buffers {g['buffers']:.1f})"]
    if p.deepcompile_memory_bound_gib and p.deepcompile_memory_bound_gib > g["peak_reserved"]:
        lines.append(f"DeepCompile keeps gathered parameters resident while memory allows: reserved memory grows "
                     f"towards {p.deepcompile_memory_bound_gib:.1f} GiB on purpose")
    if p.rejected_faster_plans:
        lines.append("faster plans that do not fit:")
        for r in p.rejected_faster_plans[:6]:
            lines.append(f"  {r['plan']} (relative time {r['relative_step_time']:.2f}): {r['why_not']}")
    else:
        lines.append("no faster plan exists under the speed model")
    return lines


def speed_line(p):
    if p.predicted_tokens_per_s is None:
        return (f"speed: {p.gpu_model or p.device} is not in the GPU table (plugins/module_utils/gpus.py): no "
                "absolute prediction; pass the peak with the training package's --peak_tflops for MFU")
    return (f"speed: about {p.predicted_tokens_per_s:,.0f} tokens/s over {p.world_size} GPU(s) "
            f"({100 * p.predicted_mfu:.0f}% MFU of {p.peak_tflops_per_gpu:g} TFLOP/s each), "
            f"{p.predicted_step_seconds:.1f} s per step, {1e9 / p.predicted_tokens_per_s / 3600:.1f} h per billion tokens")


def _count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def summary_lines(p):
    """Human-readable plan, printed by the render step."""
    m, g, hm = p.model, p.gpu_memory_gib, p.host_memory_gib
    kind = "full fine-tune" if p.finetune == "full" else "LoRA"
    unit = "GPU" if p.device == "gpu" else "rank"
    out = [
        f"model: {m['name']}, {m['parameters_b']:.2f}B parameters ({kind}, {_count(p.trainable_parameters)} "
        f"trainable), seq {p.seq_len}, global batch {p.global_batch_size}",
        f"cluster: {p.nodes} node(s), slots {p.slots}, {p.gpu_model or p.device}, {p.precision}, "
        f"{g['device_total']:.0f} GiB per {unit}",
        f"plan: {p.label}, {p.gradient_accumulation_steps} accumulation step(s), relative step time "
        f"{p.relative_step_time:.2f}",
        speed_line(p),
        f"weights: {MASTER_WEIGHTS[p.master_weights]}",
        "GPU memory per rank (GiB): " + ", ".join(
            f"{k} {g[k]:.2f}" for k in sorted(g) if k.startswith("model_states.") and g[k]),
        f"  model states {g['model_states']:.2f} + activations {g['activations']:.2f} (layers "
        f"{g['activations.layers']:.2f}, loss/working {g['activations.loss_and_working']:.2f}) + buffers "
        f"{g['buffers']:.2f}",
        f"  = {g['peak_allocated']:.2f} allocated, {g['peak_reserved']:.2f} reserved (incl. fragmentation) of "
        f"{g['usable']:.2f} usable ({g['device_total']:.2f} total)",
        f"host memory per node (GiB): peak {hm['peak']:.1f} of {p.host_memory_usable_gib:.1f} (processes "
        f"{hm['reserved_and_processes']:.1f}, model loading {hm['model_loading']:.1f}, offload {hm['offload']:.1f}, "
        f"final save {hm['final_save']:.1f})",
    ]
    out.extend("why: " + line for line in p.why[1:])
    out.extend("warning: " + w for w in p.warnings)
    return out
