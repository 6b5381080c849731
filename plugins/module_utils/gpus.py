"""GPUs: the one table of data-center GPUs (dense 16-bit peak, memory, bf16), used by the planner,
the metrics' MFU and the status; nvidia-smi and /proc/meminfo parsing (standard library only)."""

import re

NVIDIA_SMI_FIELDS = "index,name,memory.total,compute_cap"
NVIDIA_SMI_FIELDS_OLD = "index,name,memory.total"  # drivers before compute_cap was a field

# (name pattern, dense bf16/fp16 tensor TFLOP/s, memory GB as sold, bf16) from the vendors' data
# sheets; the first pattern that matches a device name wins, so the specific ones come first.
GPU_TABLE = (
    (r"GB200", 2500, 186, True),
    (r"B200", 2250, 180, True),
    (r"B100", 1750, 192, True),
    (r"GH200", 989, 96, True),
    (r"H200", 989, 141, True),
    (r"H100\s*PCIe", 756, 80, True),
    (r"H100\s*NVL", 835, 94, True),
    (r"H100", 989, 80, True),
    (r"H800\s*PCIe", 756, 80, True),
    (r"H800", 989, 80, True),
    (r"H20\b", 148, 96, True),
    (r"A100", 312, 80, True),
    (r"A800", 312, 80, True),
    (r"L40S", 362, 48, True),
    (r"L40\b", 181, 48, True),
    (r"L20\b", 119.5, 48, True),
    (r"L4\b", 121, 24, True),
    (r"A40\b", 150, 48, True),
    (r"A30\b", 165, 24, True),
    (r"A10G", 70, 24, True),
    (r"A10\b", 125, 24, True),
    (r"A6000", 155, 48, True),
    (r"V100", 125, 32, False),
    (r"T4\b", 65, 16, False),
)

# bf16 needs compute capability 8.0 (Ampere) or newer: for names outside the table.
_BF16_NAMES = re.compile(r"\b(A16|A2|A[4-6]000|RTX\s*(30|40|50)\d\d|RTX\s*(PRO|\d+\s*Ada))\b", re.I)
_NO_BF16_NAMES = re.compile(r"\b(P100|P40|P4|K80|M60|TITAN\s*V|RTX\s*20\d\d|Quadro)\b", re.I)


def gpu_spec(name):
    """{"peak_tflops", "memory_gib", "bf16"} of the table's GPU that `name` (as nvidia-smi or the
    inventory says it) is, or None for a GPU the table does not know."""
    for pattern, tflops, memory_gib, bf16 in GPU_TABLE:
        if name and re.search(pattern, name, re.I):
            return {"peak_tflops": tflops, "memory_gib": memory_gib, "bf16": bf16}
    return None


class GpuFactsError(Exception):
    pass


def _value(text):
    """A field of nvidia-smi's csv: None for what it cannot tell ([N/A], [Not Supported], [Unknown Error])."""
    text = text.strip()
    return None if text.startswith("[") and text.endswith("]") else text


def parse_query(text, fields):
    """Rows of `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits` as dicts keyed by field."""
    names = [f.strip() for f in fields.split(",")]
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = [_value(v) for v in line.split(",")]
        if len(values) != len(names):
            raise GpuFactsError(f"unexpected nvidia-smi line for {fields}: {line!r}")
        rows.append(dict(zip(names, values)))
    return rows


def as_int(value):
    """An nvidia-smi number as an int (None stays None; '97871.0' is 97871)."""
    return None if value is None else int(float(value))


def parse_nvidia_smi(text):
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total[,compute_cap] --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            raise GpuFactsError(f"unexpected nvidia-smi line: {line!r}")
        try:
            gpu = {"index": int(fields[0]), "name": fields[1], "memory_mib": int(float(fields[2]))}
        except ValueError:
            raise GpuFactsError(f"unexpected nvidia-smi line: {line!r}") from None
        if len(fields) > 3 and re.match(r"^\d+\.\d+$", fields[3]):
            gpu["compute_capability"] = fields[3]
        gpus.append(gpu)
    return gpus


def supports_bf16(gpu_model=None, compute_capability=None):
    """True/False, or None when neither the capability nor the name tells."""
    if compute_capability:
        major = int(str(compute_capability).split(".")[0])
        return major >= 8
    if gpu_model:
        spec = gpu_spec(gpu_model)
        if spec:
            return spec["bf16"]
        if _NO_BF16_NAMES.search(gpu_model):
            return False
        if _BF16_NAMES.search(gpu_model):
            return True
    return None


def summarize(gpus):
    """Facts for the planner: count, model, smallest memory (GiB), bf16."""
    if not gpus:
        return {"gpu_count": 0, "gpu_model": None, "gpu_memory_gib": None, "gpu_bf16": None,
                "gpu_compute_capability": None, "gpus": []}
    names = sorted(set(g["name"] for g in gpus))
    caps = sorted(set(g.get("compute_capability") for g in gpus if g.get("compute_capability")))
    bf16_each = [supports_bf16(g["name"], g.get("compute_capability")) for g in gpus]
    bf16 = None if None in bf16_each else all(bf16_each)
    return {
        "gpu_count": len(gpus),
        "gpu_model": names[0] if len(names) == 1 else "mixed: " + " / ".join(names),
        # nvidia-smi reports MiB; memory_gib facts are GiB (an "80 GB" H100 shows 81559 MiB = 79.6).
        "gpu_memory_gib": round(min(g["memory_mib"] for g in gpus) / 1024.0, 2),
        "gpu_bf16": bf16,
        "gpu_compute_capability": caps[0] if len(caps) == 1 else (caps or None),
        "gpus": gpus,
    }


def parse_meminfo(text):
    """MemTotal from /proc/meminfo, in GiB."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
            return round(kib / 1024.0 / 1024.0, 2)
    raise GpuFactsError("no MemTotal in /proc/meminfo")
