"""Facts about this node that must agree across the cluster, as one JSON line.

Run on every node through pdsh by the preflight, with the training environment's interpreter:
    python -m dsmesh.probe --path model=/models/x --path data=/data/train.jsonl --disk /var/lib/dsmesh
Reads only; changes nothing on the node.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "datasets")


def package_versions():
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def torch_facts():
    """The CUDA torch was built for and the NCCL it ships with (None on a CPU build), read from the
    installed files: importing torch would cost seconds per node, and the preflight must be quick."""
    facts = {"cuda": None, "nccl": None}
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return facts
    version_py = dist.locate_file("torch/version.py")
    try:
        text = open(version_py).read()
    except OSError:
        text = ""
    m = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    facts["cuda"] = m.group(1) if m else None
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl"):
            facts["nccl"] = d.version
    return facts


def gpu_facts():
    """GPUs from nvidia-smi: index, name, memory, use; [] where there is none."""
    if not shutil.which("nvidia-smi"):
        return {"driver": None, "gpus": []}
    query = "index,name,memory.total,memory.used,utilization.gpu,driver_version"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)
    gpus, driver = [], None
    for line in out.stdout.strip().splitlines():
        index, name, total, used, util, driver = [f.strip() for f in line.split(",")]
        gpus.append({"index": int(index), "name": name, "memory_total_mib": int(total),
                     "memory_used_mib": int(used), "utilization_pct": int(util)})
    return {"driver": driver, "gpus": gpus}


def manifest(path, checksum=True):
    """{relative file: [size, sha256 or None]} for a file or a directory tree."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        files = [path]
    else:
        files = []
        for d, dirs, names in os.walk(path):
            # caches (.cache/huggingface, __pycache__) are not part of the model
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            files += [os.path.join(d, f) for f in names]
        files.sort()
    out = {}
    for f in files:
        rel = os.path.basename(path) if f == path else os.path.relpath(f, path)
        digest = None
        if checksum:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
        out[rel] = [os.path.getsize(f), digest]
    return out


def free_gib(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return round(shutil.disk_usage(path or "/").free / 2**30, 1)


def probe(paths, disk, checksum):
    facts = {
        "hostname": socket.gethostname(),
        "python_executable": sys.executable,
        "versions": package_versions(),
        "torch": torch_facts(),
        **gpu_facts(),
        "paths": {name: manifest(p, checksum) for name, p in paths.items()},
        "disk_free_gib": free_gib(disk) if disk else None,
        "time": time.time(),
    }
    return facts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                   help="a file or directory whose manifest (sizes, sha256) is reported under NAME")
    p.add_argument("--disk", help="report the free space of the filesystem holding this path")
    p.add_argument("--no-checksum", action="store_true", help="sizes only (for very large models)")
    args = p.parse_args(argv)
    paths = dict(item.split("=", 1) for item in args.path)
    print(json.dumps(probe(paths, args.disk, not args.no_checksum), sort_keys=True))


if __name__ == "__main__":
    main()
