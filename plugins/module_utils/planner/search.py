"""The search: every way to run the job (engine, ZeRO stage, offload, checkpointing, micro-batch,
compilation), ranked by a stated speed model; the fastest one that fits is the plan."""

import copy
import json

from .errors import PlanError
from .memory import estimate, master_weights
from .model import CHUNKED_LOSS_MODEL_TYPES, ModelShape
from .result import Plan, why_lines
from .settings import gib, merge_settings

ENGINES = ("deepspeed", "torch")
# regions: the torch engine's per-layer torch.compile. deepcompile: DeepSpeed's compiler passes
# (ZeRO 1-3) through engine.compile(). torch: engine.compile() without them. none: eager.
COMPILE_MODES = ("regions", "deepcompile", "torch", "none")
PLAN_OVERRIDE_KEYS = ("engine", "zero_stage", "offload_optimizer", "offload_param", "gradient_checkpointing",
                      "checkpoint_layers", "micro_batch_size", "compile", "chunked_loss")


class Candidate:
    """One way to run the job. engine "torch" (one GPU only) is plain PyTorch: no DeepSpeed, no
    partitioning (stage 0). checkpoint_layers: how many decoder layers are checkpointed when
    checkpointing (None: all). compile: one of COMPILE_MODES. chunked_loss: the training package's
    chunked LM head and loss (--chunked_loss) instead of the whole logits."""
    __slots__ = ("stage", "offload_optimizer", "offload_param", "checkpointing", "micro_batch", "engine",
                 "checkpoint_layers", "num_layers", "compile", "chunked_loss")

    def __init__(self, stage, offload_optimizer, offload_param, checkpointing, micro_batch, engine="deepspeed",
                 checkpoint_layers=None, num_layers=None, compile="none", chunked_loss=False):
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_param = offload_param
        self.checkpointing = checkpointing
        self.micro_batch = micro_batch
        self.engine = engine
        self.checkpoint_layers = checkpoint_layers
        self.num_layers = num_layers
        self.compile = compile
        self.chunked_loss = chunked_loss

    @property
    def compiled(self):
        return self.compile != "none"

    def with_checkpoint_layers(self, k):
        c = copy.copy(self)
        c.checkpoint_layers = k
        return c

    def with_compile(self, mode):
        c = copy.copy(self)
        c.compile = mode
        return c

    def checkpoint_fraction(self):
        if not self.checkpointing:
            return 0.0
        if self.checkpoint_layers is None or not self.num_layers:
            return 1.0
        return min(1.0, float(self.checkpoint_layers) / self.num_layers)

    def label(self):
        off = "no offload"
        if self.offload_param:
            off = "optimizer+params offloaded to CPU"
        elif self.offload_optimizer:
            off = "optimizer offloaded to CPU"
        ckpt = "no checkpointing"
        if self.checkpointing:
            ckpt = "gradient checkpointing"
            if self.checkpoint_layers is not None and self.num_layers and self.checkpoint_layers < self.num_layers:
                ckpt = f"gradient checkpointing of {self.checkpoint_layers} of {self.num_layers} layers"
        compiled = {"regions": "compiled layers", "deepcompile": "DeepCompile", "torch": "torch.compile",
                    "none": "eager"}[self.compile]
        loss = ", chunked loss" if self.chunked_loss else ""
        if self.engine == "torch":
            return (f"no DeepSpeed (one GPU: PyTorch, fused AdamW, {compiled}), {ckpt}, micro-batch "
                    f"{self.micro_batch}{loss}")
        return f"ZeRO-{self.stage}, {off}, {ckpt}, micro-batch {self.micro_batch}, {compiled}{loss}"


def compile_modes(engine, stage, offloaded, device):
    """The compilation modes a candidate can run with, the default first. Nothing compiles on CPU ranks
    (the lab). The package's per-layer compilation (regions) runs beside DeepSpeed's hooks up to
    ZeRO-2; ZeRO-3's parameter hooks need DeepCompile's passes (ZeRO 1-3, no ZeRO-Offload). A whole
    model under torch.compile (torch) compiles each of its layers apart: minutes for 64 layers."""
    if device != "gpu":
        return ["none"]
    if engine == "torch":
        return ["regions", "none"]
    if offloaded:
        return ["none", "regions", "torch"]
    if stage == 0:
        return ["regions", "torch", "none"]
    if stage in (1, 2):
        return ["regions", "deepcompile", "torch", "none"]
    return ["deepcompile", "torch", "none"]


def relative_step_time(cand, job, cluster, settings, model=None):
    """Speed model: relative time of one optimizer step (same tokens for every candidate)."""
    tokens = cand.micro_batch * job.seq_len
    half = settings["micro_tokens_half_efficiency"]
    if model is not None:
        half = half * settings["micro_efficiency_hidden"] / float(model.hidden_size)
    efficiency = tokens / float(tokens + half)
    # Checkpointing recomputes the forward of the checkpointed layers only.
    t = (1.0 + (settings["checkpointing_cost"] - 1.0) * cand.checkpoint_fraction()) / efficiency
    t *= settings["compile_cost"][cand.compile]
    if cand.chunked_loss:
        t *= settings["chunked_loss_cost"]
    if cand.engine == "torch":
        return round(t, 4)
    if cluster.world_size == 1:
        t *= settings["deepspeed_single_gpu_cost"]
    comm = settings["zero_comm"][str(cand.stage)]
    reference = settings["zero_comm_reference_tokens"] / float(tokens)
    if cand.stage >= 2:
        # Reduce-scatter (ZeRO-2) and parameter gathers (ZeRO-3) happen every micro-step: the
        # bigger the micro-batch, the more compute hides them.
        comm *= reference
    if cluster.nodes > 1:
        comm *= settings["multi_node_comm_factor"]
    if job.finetune == "lora" and cand.stage == 3:
        # the same parameter gathers, behind 4N instead of 6N FLOPs per token (no weight gradients)
        comm *= 1.5
    hooks = 0.0
    if cand.stage == 3:
        hidden = settings["micro_efficiency_hidden"] / float(model.hidden_size) if model is not None else 1.0
        hooks = settings["zero3_hook_cost"] * reference * hidden
        if cand.compile == "deepcompile":
            hooks *= settings["deepcompile_hook_cost"]
    t *= 1.0 + comm + hooks
    if cand.offload_optimizer:
        t *= settings["offload_optimizer_cost"]
    if cand.offload_param:
        t *= settings["offload_param_cost"]
    return round(t, 4)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "true", "yes", "on", "1"):
            return True
        if v in ("none", "false", "no", "off", "0", ""):
            return False
    if isinstance(value, int):
        return bool(value)
    raise PlanError(f"cannot read {value!r} as a yes/no (or cpu/none) value")


def candidates(job, cluster, overrides, settings, num_layers=None, model_type=None):
    per_rank = job.global_batch_size // cluster.world_size
    micro_options = [m for m in _divisors(per_rank) if m <= settings["max_micro_batch"]]
    offloads = [(False, False)]
    if cluster.device == "gpu":
        offloads += [(True, False), (True, True)]
    shapes = []
    if cluster.device == "gpu" and cluster.world_size == 1:
        shapes += [("torch", 0, False, False)]
    for stage in (0, 1, 2, 3):
        for off_opt, off_param in offloads:
            if off_param and stage != 3:
                continue
            if off_opt and stage < 2:
                continue  # ZeRO-2 offload keeps the same GPU states as ZeRO-1 offload, and is faster
            shapes.append(("deepspeed", stage, off_opt, off_param))
    o = overrides or {}
    if "compile" in o and o["compile"] not in COMPILE_MODES:
        raise PlanError(f"plan override compile must be one of {', '.join(COMPILE_MODES)}, got {o['compile']!r}")
    # The chunked loss where the package can run it, inside a whole-model graph (DeepCompile,
    # engine.compile()), where Inductor fuses each chunk's softmax and gradient as it fuses the stock
    # loss; the plan override chunked_loss true asks for it anywhere.
    forced = _as_bool(o["chunked_loss"]) if "chunked_loss" in o else None
    if forced and model_type not in CHUNKED_LOSS_MODEL_TYPES:
        raise PlanError(f"plan override chunked_loss: the package's chunked loss runs model types "
                        f"{', '.join(CHUNKED_LOSS_MODEL_TYPES)}, not {model_type!r}; drop the override")

    def chunked_options(mode):
        if forced is not None:
            return [forced]
        whole_graph = cluster.device == "gpu" and mode in ("deepcompile", "torch")
        return [False, True] if whole_graph and model_type in CHUNKED_LOSS_MODEL_TYPES else [False]

    out = []
    for engine, stage, off_opt, off_param in shapes:
        modes = compile_modes(engine, stage, off_opt or off_param, cluster.device)
        if "compile" in o:
            if o["compile"] not in modes:
                continue
            mode = o["compile"]
        else:
            mode = modes[0]
        for ckpt in (False, True):
            for m in micro_options:
                for chunked in chunked_options(mode):
                    out.append(Candidate(stage, off_opt, off_param, ckpt, m, engine=engine, num_layers=num_layers,
                                         compile=mode, chunked_loss=chunked))
    if "engine" in o:
        if o["engine"] not in ENGINES:
            raise PlanError(f"plan override engine must be one of {', '.join(ENGINES)}, got {o['engine']!r}")
        out = [c for c in out if c.engine == o["engine"]]
    if "zero_stage" in o:
        # a ZeRO stage means DeepSpeed
        out = [c for c in out if c.engine == "deepspeed" and c.stage == int(o["zero_stage"])]
    if "checkpoint_layers" in o:
        k = int(o["checkpoint_layers"])
        out = [c.with_checkpoint_layers(k) for c in out if c.checkpointing == (k > 0)]
    if "offload_optimizer" in o:
        out = [c for c in out if c.offload_optimizer == _as_bool(o["offload_optimizer"])]
    if "offload_param" in o:
        out = [c for c in out if c.offload_param == _as_bool(o["offload_param"])]
    if "gradient_checkpointing" in o:
        out = [c for c in out if c.checkpointing == _as_bool(o["gradient_checkpointing"])]
    if "micro_batch_size" in o:
        out = [c for c in out if c.micro_batch == int(o["micro_batch_size"])]
    return out


def _gpu_line(est):
    fragmentation = round((est["peak_reserved"] / max(est["peak_allocated"], 1) - 1) * 100)
    states, acts = gib(est["model_states_total"]), gib(est["activations"]["total"])
    buffers = gib(sum(est["buffers"].values()))
    return (f"{gib(est['peak_reserved']):.1f} GiB per {est['unit']} (model states {states:.1f}, activations "
            f"{acts:.1f}, buffers {buffers:.1f}, +{fragmentation}% fragmentation) vs {gib(est['usable']):.1f} usable")


def _reason(est):
    reasons = []
    if not est["fits_gpu"]:
        reasons.append("needs " + _gpu_line(est))
    if not est["fits_host"]:
        reasons.append(f"needs {gib(est['host']['peak']):.1f} GiB host RAM per node vs {gib(est['host_usable']):.1f}")
    return "; ".join(reasons)


def _fewest_checkpointed_layers(model, job, cluster, cand, settings):
    """The candidate with as few checkpointed layers as fit (all of them if even that does not)."""
    def fits(k):
        est = estimate(model, job, cluster, cand.with_checkpoint_layers(k), settings)
        return est["fits_gpu"] and est["fits_host"]

    L = model.num_layers
    if L <= 1 or not fits(L):
        return cand.with_checkpoint_layers(L)
    lo, hi = 1, L  # memory falls as k grows: find the smallest k that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return cand.with_checkpoint_layers(lo)


def _search(model, job, cluster, overrides, settings):
    cands = candidates(job, cluster, overrides, settings, model.num_layers, model.model_type)
    scored = []
    for c in cands:
        if c.checkpointing and c.checkpoint_layers is None:
            c = _fewest_checkpointed_layers(model, job, cluster, c, settings)
        est = estimate(model, job, cluster, c, settings)
        scored.append((relative_step_time(c, job, cluster, settings, model), c, est))
    # Fastest first; ties go to less partitioning, no offload, no checkpointing, bigger micro-batch,
    # transformers' own loss.
    scored.sort(key=lambda x: (x[0], x[1].engine != "torch", x[1].stage, x[1].offload_optimizer,
                               x[1].offload_param, x[1].checkpointing, -x[1].micro_batch, x[1].chunked_loss))
    return scored


def _fits(scored):
    return [s for s in scored if s[2]["fits_gpu"] and s[2]["fits_host"]]


def _check_batch(job, cluster):
    n = cluster.world_size
    if job.global_batch_size % n:
        lower = (job.global_batch_size // n) * n
        options = [str(x) for x in (lower, lower + n) if x > 0]
        raise PlanError(f"global_batch_size {job.global_batch_size} is not a multiple of the {n} ranks "
                        f"({' + '.join(str(s) for s in cluster.slots)}): use {' or '.join(options)}")


def _smallest_plan(model, job, cluster, settings, overrides=None):
    """The least memory-hungry candidate (for error messages), ignoring the batch layout."""
    j = job.with_changes(global_batch_size=cluster.world_size)
    scored = _search(model, j, cluster, overrides, settings)
    if not scored:
        return None
    return min(scored, key=lambda s: (s[2]["peak_reserved"] - s[2]["usable"], s[2]["host"]["peak"]))


def _what_would_fit(model, job, cluster, overrides, settings):
    """Suggestions for an impossible job, each one checked by planning it.

    Tries more nodes, LoRA and shorter sequences, alone and combined, and reports the smallest
    change of each kind that fits (one rank's micro-batch of 1, batch layout ignored).
    """
    def fits(j, c, o):
        j = j.with_changes(global_batch_size=c.world_size)
        return bool(_fits(_search(model, j, c, o, settings)))

    tips = []
    if overrides and fits(job, cluster, None):
        tips.append(f"drop the plan overrides {json.dumps(overrides, sort_keys=True)}: another plan fits")
    node_options = sorted({cluster.nodes + 1} | {cluster.nodes * k for k in (2, 3, 4, 6, 8, 16)})
    seq_options = []
    seq = job.seq_len
    while seq > 256:
        seq //= 2
        seq_options.append(seq)
    finetunes = [job.finetune] + (["lora"] if job.finetune == "full" else [])
    found = []
    for ft in finetunes:
        for seq in [job.seq_len] + seq_options:
            for nodes in [cluster.nodes] + node_options:
                changes = (ft != job.finetune) + (seq != job.seq_len) + (nodes != cluster.nodes)
                if changes == 0:
                    continue
                if fits(job.with_changes(finetune=ft, seq_len=seq), cluster.with_nodes(nodes), overrides):
                    found.append((changes, ft, seq, nodes))
                    break
    # Smallest change of each kind: per set of changed dimensions, the first found.
    kinds = {}
    for changes, ft, seq, nodes in found:
        kind = (ft != job.finetune, seq != job.seq_len, nodes != cluster.nodes)
        if kind not in kinds:
            kinds[kind] = (changes, ft, seq, nodes)
    for _, ft, seq, nodes in sorted(kinds.values())[:4]:
        parts = []
        if nodes != cluster.nodes:
            parts.append(f"{nodes} nodes of {cluster.ranks_per_node} GPUs (instead of {cluster.nodes})")
        if ft != job.finetune:
            parts.append(f"LoRA rank {job.lora_rank} instead of a full fine-tune")
        if seq != job.seq_len:
            parts.append(f"sequence length {seq} (instead of {job.seq_len})")
        tips.append(" + ".join(parts))
    if overrides and ("offload_optimizer" in overrides or "offload_param" in overrides):
        o = {k: v for k, v in overrides.items() if k not in ("offload_optimizer", "offload_param")}
        if fits(job, cluster, o):
            tips.append("allow offload to CPU (remove offload_* from the plan overrides)")
    return tips


def _impossible(model, job, cluster, overrides, settings, scored):
    smallest = _smallest_plan(model, job, cluster, settings, overrides) or (None, scored[-1][1], scored[-1][2])
    _, cand, est = smallest
    kind = "full fine-tune" if job.finetune == "full" else "LoRA"
    units = "GPUs" if cluster.device == "gpu" else "CPU ranks"
    lines = [
        f"{model.name} ({model.num_parameters / 1e9:.2f}B parameters, {kind}, seq {job.seq_len}, global batch "
        f"{job.global_batch_size}) does not fit on {cluster.nodes} node(s) x {cluster.ranks_per_node} {units}",
        f"least memory-hungry plan: {cand.label()}",
        f"  it needs {_gpu_line(est)}",
        f"  and {gib(est['host']['peak']):.1f} GiB host RAM per node of {gib(est['host_usable']):.1f}",
    ]
    if overrides:
        lines.append(f"plan overrides in force: {json.dumps(overrides, sort_keys=True)}")
    tips = _what_would_fit(model, job, cluster, overrides, settings)
    lines.append("what would make it fit: " + ("; ".join(tips) if tips else
                                               "nothing the planner tried (more nodes, LoRA, shorter sequences)"))
    return PlanError("\n".join(lines))


def _rejected_faster(scored, best):
    """Faster plans (ranked before the chosen one) do not fit, or they would have been chosen. One
    line per (engine, stage, offload, checkpointing): its smallest micro-batch that is still faster,
    the strongest statement ("even micro-batch 1 needs ...")."""
    by_key, order = {}, []
    for t, c, est in scored:
        if c is best:
            break
        key = (c.engine, c.stage, c.offload_optimizer, c.offload_param, c.checkpointing)
        if key not in by_key:
            order.append(key)
        if key not in by_key or c.micro_batch < by_key[key][1].micro_batch:
            by_key[key] = (t, c, est)
    rejected = [{"plan": by_key[k][1].label(), "relative_step_time": by_key[k][0], "why_not": _reason(by_key[k][2])}
                for k in order]
    return sorted(rejected, key=lambda r: r["relative_step_time"])


def _warnings(model, job):
    warnings = []
    if model.max_position_embeddings and job.seq_len > model.max_position_embeddings:
        warnings.append(f"seq_len {job.seq_len} exceeds the model's max_position_embeddings "
                        f"{model.max_position_embeddings}")
    if model.declared_parameters and abs(model.declared_parameters - model.num_parameters) > 0.1 * model.num_parameters:
        warnings.append(f"declared num_parameters {model.declared_parameters} differs from the shape's "
                        f"{model.num_parameters} by more than 10%")
    if model.model_type not in ModelShape.KNOWN_TYPES:
        warnings.append(f"model_type {model.model_type!r} is treated as a Llama-style decoder")
    return warnings


def plan(model, cluster, job, overrides=None, settings=None):
    """Pick the fastest plan that fits. Returns a Plan; raises PlanError with numbers otherwise."""
    settings = merge_settings(settings)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in PLAN_OVERRIDE_KEYS]
    if unknown:
        raise PlanError(f"unknown plan override(s) {unknown} (known: {', '.join(PLAN_OVERRIDE_KEYS)})")
    _check_batch(job, cluster)
    per_rank = job.global_batch_size // cluster.world_size
    if "micro_batch_size" in overrides and per_rank % int(overrides["micro_batch_size"]):
        raise PlanError(f"micro_batch_size {overrides['micro_batch_size']} does not divide the {per_rank} samples "
                        f"per rank per step (global_batch_size {job.global_batch_size} / {cluster.world_size} ranks)")
    scored = _search(model, job, cluster, overrides, settings)
    if not scored:
        raise PlanError(f"the plan overrides {json.dumps(overrides, sort_keys=True)} leave no candidate plan")
    fitting = _fits(scored)
    if not fitting:
        raise _impossible(model, job, cluster, overrides, settings, scored)
    best_time, best, best_est = fitting[0]
    result = Plan.build(model, job, cluster, best, best_time, best_est, settings, overrides,
                        rejected=_rejected_faster(scored, best), considered=len(scored), fitting=len(fitting),
                        master_weights=master_weights(best.engine, job, cluster.precision),
                        warnings=_warnings(model, job))
    result.why = why_lines(result)
    return result
