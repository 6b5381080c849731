"""The plan (deepspeed_render's result, from playbooks/render.yml) as `dsmesh plan` prints it: the
model and cluster, the plan, GPU memory per rank and memory per node broken down, the predicted
speed and time to finish where the plan carries a prediction, why this plan, and the faster plans
that do not fit. Pure functions: tests/unit/test_api_events.py."""
from dsmesh.format import count, duration, gib, percent

# gpu_memory_gib's totals, in the order they add up; their parts are the keys "<total>.<part>".
GPU_TOTALS = ("model_states", "activations", "buffers")
GPU_BOTTOM = ("fragmentation", "peak_allocated", "peak_reserved")
GPU_LIMITS = ("usable", "device_total")
HOST_PARTS = ("reserved_and_processes", "model_loading", "offload", "final_save")


def label(key):
    return key.replace("_", " ")


def rows_table(rows, headers, right=()):
    """Rows of strings as aligned columns under `headers`; columns in `right` right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(cell).rjust(width) if i in right else str(cell).ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers), line(["-" * width for width in widths]), *[line(row) for row in rows]]


def gpu_memory_rows(memory):
    """[(item, GiB)] of gpu_memory_gib: each total then its non-zero parts, indented."""
    rows = []
    totals = [key for key in GPU_TOTALS if key in memory]
    totals += [key for key in memory if "." not in key and key not in (*GPU_TOTALS, *GPU_BOTTOM, *GPU_LIMITS)]
    for total in totals:
        rows.append((label(total), gib(memory[total])))
        rows += [(f"  {label(key.split('.', 1)[1])}", gib(value)) for key, value in memory.items()
                 if key.startswith(f"{total}.") and value]
    for key in GPU_BOTTOM:
        if key in memory:
            rows.append((label(key), gib(memory[key])))
    return rows


def job_tokens(plan, argv, tokens=None):
    """(tokens the job trains on, how that is known): --tokens, else max_steps x global batch x
    sequence length (packed sequences) from the launch command; None when the job counts epochs of a
    dataset the controller does not read."""
    if tokens:
        return int(tokens), "as given"
    for arg in argv or []:
        if arg.startswith("--max_steps="):
            steps = int(arg.split("=", 1)[1])
            if steps > 0 and plan.get("global_batch_size") and plan.get("seq_len"):
                total = steps * plan["global_batch_size"] * plan["seq_len"]
                return total, f"max_steps {steps} x global batch {plan['global_batch_size']} x seq {plan['seq_len']}"
    return None, None


def speed_lines(plan, argv, tokens=None, summary=()):
    predicted = plan.get("predicted_tokens_per_s")
    if not predicted:
        # the renderer says why there is none (a GPU not in its table, CPU ranks)
        said = [line for line in summary if line.startswith("speed:")]
        return [f"Speed: no prediction ({said[0][len('speed:'):].strip()})" if said else "Speed: no prediction"]
    peak = f" of {plan['peak_tflops_per_gpu']:g} TFLOP/s per GPU" if plan.get("peak_tflops_per_gpu") else ""
    mfu = f" (MFU {percent(plan['predicted_mfu'])}{peak})" if plan.get("predicted_mfu") is not None else ""
    seconds = plan.get("predicted_step_seconds")
    step = f", {seconds:.2g}s per step" if seconds and seconds < 10 else f", {duration(seconds)} per step" if seconds else ""
    lines = [f"Speed: predicted {count(predicted)} tokens/s over {sum(plan.get('slots') or [])} GPU(s){mfu}{step}"]
    total, how = job_tokens(plan, argv, tokens)
    if total:
        lines.append(f"Time to finish: ~{duration(total / predicted)} for {count(total)} tokens ({how})")
    else:
        lines.append(f"Time to finish: ~{duration(1e9 / predicted)} per billion tokens; the job counts epochs of a "
                     "dataset this machine does not read: --tokens N (tokens per epoch x epochs) says how long")
    return lines


def plan_lines(report, tokens=None):
    """The plan report's lines (report: Result.plan)."""
    plan = report.get("plan") or {}
    argv = report.get("argv") or []
    model = plan.get("model") or {}
    memory = plan.get("gpu_memory_gib") or {}
    host = plan.get("host_memory_gib") or {}
    slots = plan.get("slots") or []
    ranks = sum(slots)
    lines = []
    finetune = plan.get("finetune") or "full"
    trainable = plan.get("trainable_parameters")
    lines.append(f"Model: {model.get('name')}, {count(model.get('parameters'))} parameters, {finetune} fine-tune"
                 + (f" ({count(trainable)} trainable)" if trainable and finetune != "full" else "")
                 + f", sequence {plan.get('seq_len')}, global batch {plan.get('global_batch_size')}")
    gpu = plan.get("device") != "cpu"
    ranks_are = f"{ranks} x {plan.get('gpu_model')} ({gib(memory.get('device_total'))} GiB)" if gpu else \
        f"{ranks} CPU rank(s)"
    lines.append(f"Cluster: {plan.get('nodes')} node(s), {ranks_are}, slots {' + '.join(map(str, slots))}, "
                 f"{plan.get('precision')}")
    lines.append("")
    lines.append(f"Plan: {plan.get('label')}")
    lines.append(f"  engine {plan.get('engine')}, ZeRO stage {plan.get('zero_stage')}, "
                 f"micro-batch {plan.get('micro_batch_size')} x {plan.get('gradient_accumulation_steps')} "
                 f"accumulation step(s) x {ranks} rank(s) = global batch {plan.get('global_batch_size')}")
    # the renderer's own words for the weights' precision
    weights = [line.split(":", 1)[1].strip() for line in report.get("summary") or [] if line.startswith("weights:")]
    lines.append(f"  compile {plan.get('compile')}, {weights[0] if weights else plan.get('master_weights')}, "
                 f"offload: optimizer {'yes' if plan.get('offload_optimizer') else 'no'}, "
                 f"parameters {'yes' if plan.get('offload_param') else 'no'}")
    lines.append("")
    rows = gpu_memory_rows(memory)
    lines += rows_table(rows, ("GPU memory per rank" if gpu else "Memory per rank", "GiB"), right=(1,))
    lines.append(f"of {gib(memory.get('usable'))} GiB usable ({gib(memory.get('device_total'))} on the device)")
    lines.append("")
    per_node = [(f"GPU: {max(slots, default=0)} rank(s) x {gib(memory.get('peak_reserved'))} reserved",
                 gib((memory.get("peak_reserved") or 0) * max(slots, default=0)))] if gpu else []
    per_node += [(f"host: {label(key)}", gib(host[key])) for key in HOST_PARTS if key in host]
    per_node += [(f"host: {label(key)}", gib(value)) for key, value in host.items()
                 if key not in (*HOST_PARTS, "peak")]
    if "peak" in host:
        per_node.append(("host: peak", gib(host["peak"])))
    lines += rows_table(per_node, ("Memory per node", "GiB"), right=(1,))
    if plan.get("host_memory_usable_gib"):
        lines.append(f"of {gib(plan['host_memory_usable_gib'])} GiB host memory usable per node")
    lines.append("")
    lines += speed_lines(plan, argv, tokens, report.get("summary") or [])
    lines.append("")
    why = [line for line in plan.get("why") or [] if not line.startswith(" ") and not line.startswith("faster plans")]
    lines.append("Why this plan:")
    lines += [f"  {line}" for line in why]
    rejected = plan.get("rejected_faster_plans") or []
    if rejected:
        lines.append("")
        lines.append("Faster plans that do not fit:")
        lines += ["  " + line for line in rows_table(
            [(f"{entry.get('relative_step_time', 0):.2f}", entry.get("plan", ""), entry.get("why_not", ""))
             for entry in rejected], ("time", "plan", "why not"), right=(0,))]
    for warning in plan.get("warnings") or []:
        lines.append(f"warning: {warning}")
    return lines
