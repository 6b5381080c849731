"""The preflight report: per-node facts (from dsmesh.probe through pdsh) compared across the
cluster, one row per check per node. Pure functions, unit-tested; the dsmesh_preflight module runs
the probes and the collective and wraps these."""
import json

OK, WARN, FAIL = "ok", "warn", "FAIL"
VERSION_KEYS = ("python", "torch", "deepspeed", "transformers", "accelerate", "peft")


def parse_probe_output(stdout):
    """{host: facts} from pdsh lines `host: {json}`; a host whose line is not JSON maps to an error."""
    facts = {}
    for line in stdout.splitlines():
        host, sep, rest = line.partition(": ")
        if not sep or not rest.lstrip().startswith("{"):
            continue
        try:
            facts[host.strip()] = json.loads(rest)
        except json.JSONDecodeError as e:
            facts[host.strip()] = {"error": f"unreadable probe output: {e}"}
    return facts


def _row(check, node, status, detail):
    return {"check": check, "node": node, "status": status, "detail": detail}


def _versions(f):
    v = dict(f.get("versions") or {})
    torch = f.get("torch") or {}
    v.update(cuda=torch.get("cuda"), nccl=torch.get("nccl"), driver=f.get("driver"))
    return v


def _manifest_diff(mine, ref):
    missing = sorted(set(ref) - set(mine))
    extra = sorted(set(mine) - set(ref))
    differ = sorted(k for k in set(ref) & set(mine) if mine[k] != ref[k])
    parts = []
    for label, names in (("missing", missing), ("extra", extra), ("different", differ)):
        if names:
            parts.append(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return "; ".join(parts)


def build_report(master, nodes, mesh, paths, min_free_gib=10.0, clock_warn_s=1.0, clock_fail_s=30.0,
                 clock=None, busy_mib=1024, env_kind="venv", shared=None):
    """Rows of the report.

    master: the master's name. nodes: {name: {"address", "slots", "facts" (probe JSON or None)}}.
    mesh: {name: (ok, detail)} from BatchMode ssh on the master. paths: {label: path} that must be
    identical on every node (model, dataset). clock: pdsh_clock's report with offsets by name.
    env_kind: conda when the training interpreter must be a conda environment's. shared: with shared
    storage, {"path", "token"} of the marker the master wrote, which every node must read back.
    """
    rows = []
    ref = (nodes.get(master) or {}).get("facts") or {}
    ref_versions = _versions(ref) if ref and "error" not in ref else {}
    for name, node in nodes.items():
        ok, detail = mesh.get(name, (False, "not checked"))
        rows.append(_row("ssh", name, OK if ok else FAIL, detail or f"BatchMode ssh from {master} to {node['address']}"))
        f = node.get("facts")
        if not f:
            rows.append(_row("pdsh", name, FAIL, f"no answer through pdsh from {master}"))
            continue
        if "error" in f:
            rows.append(_row("pdsh", name, FAIL, f["error"]))
            continue
        rows.append(_row("pdsh", name, OK, f"answered as {f.get('hostname')}, python {f.get('python_executable')}"))

        mine = _versions(f)
        diffs = [f"{k} {mine.get(k)} (master {ref_versions.get(k)})" for k in sorted(set(mine) | set(ref_versions))
                 if mine.get(k) != ref_versions.get(k)]
        missing = [k for k in VERSION_KEYS if not mine.get(k)]
        if missing:
            rows.append(_row("versions", name, FAIL, f"not installed: {', '.join(missing)}"))
        elif diffs:
            rows.append(_row("versions", name, FAIL, "differs from the master: " + ", ".join(diffs)))
        else:
            rows.append(_row("versions", name, OK, ", ".join(f"{k} {mine[k]}" for k in
                                                             ("torch", "deepspeed", "transformers", "cuda", "nccl", "driver")
                                                             if mine.get(k))))

        gpus, slots = f.get("gpus") or [], int(node.get("slots") or 0)
        if f.get("gpu_error"):
            rows.append(_row("gpus", name, FAIL, f"nvidia-smi failed: {f['gpu_error']} (fix the driver there first)"))
        elif not gpus:
            rows.append(_row("gpus", name, OK, f"no GPU: {slots} CPU slot(s) from the inventory"))
        else:
            # a field nvidia-smi cannot tell ([N/A]) does not count as use
            busy = [g["index"] for g in gpus
                    if (g.get("memory_used_mib") or 0) > busy_mib or (g.get("utilization_pct") or 0) > 5]
            if len(gpus) < slots:
                rows.append(_row("gpus", name, FAIL, f"{len(gpus)} GPU(s) found, inventory says gpus={slots}"))
            elif busy:
                rows.append(_row("gpus", name, FAIL, f"GPU(s) {busy} are in use (memory or utilization): "
                                                     "stop what runs there first"))
            else:
                rows.append(_row("gpus", name, OK, f"{len(gpus)} x {gpus[0]['name']}, idle; slots {slots}"))

        for label, path in paths.items():
            m, rm = (f.get("paths") or {}).get(label), (ref.get("paths") or {}).get(label)
            if m is None:
                rows.append(_row(label, name, FAIL, f"{path} is missing"))
            elif not m:
                rows.append(_row(label, name, FAIL, f"{path} is empty"))
            elif rm is not None and m != rm:
                rows.append(_row(label, name, FAIL, f"{path} differs from the master's: {_manifest_diff(m, rm)}"))
            else:
                size = sum(v[0] for v in m.values())
                rows.append(_row(label, name, OK, f"{path}: {len(m)} file(s), {size / 2**20:.1f} MiB, same as master"))

        free = f.get("disk_free_gib")
        if free is not None:
            rows.append(_row("disk", name, OK if free >= min_free_gib else FAIL,
                             f"{free} GiB free for checkpoints (need {min_free_gib})"))

        if clock and name in clock.get("offsets_seconds", {}):
            offset = clock["offsets_seconds"][name]
            window = clock["uncertainty_seconds"]
            status = FAIL if abs(offset) > clock_fail_s + window else WARN if abs(offset) > clock_warn_s + window else OK
            rows.append(_row("clock", name, status, f"{offset:+.2f} s from {master} (within +-{window:.1f} s)"))
        if env_kind == "conda":
            prefix = f.get("prefix") or {}
            rows.append(_row("conda", name, OK if prefix.get("conda") else FAIL,
                             f"{prefix.get('path')} is a conda environment" if prefix.get("conda") else
                             f"{prefix.get('path')} has no conda-meta: not a conda environment (training_env_mode: "
                             "conda); point training_env_python at the env's bin/python, or use mode existing"))
        if shared:
            seen = (f.get("markers") or {}).get(shared["path"])
            rows.append(_row("shared storage", name, OK if seen == shared["token"] else FAIL,
                             f"{shared['path']} is the master's (read its marker)" if seen == shared["token"] else
                             f"{shared['path']} is not shared with {master}: "
                             f"{'no marker' if seen is None else 'another marker'} there; mount the shared "
                             "filesystem at the same path on every node, or set deepspeed_job_shared_storage: false"))
    return rows


def network_row(nccl, nodes, fabric="unknown", busbw_gbps=None, expected_busbw_gbps=None):
    """The cluster-wide row of NCCL's transport (nccl.transport()) and the bus bandwidth against what
    the inventory says the fabric gives. None on a CPU cluster (gloo prints no NCCL lines)."""
    from .nccl import FABRICS, describe

    if not nccl or (nccl["network"] is None and not nccl["within_node"]):
        return None
    status, notes = OK, []
    wanted = FABRICS.get(fabric)
    if nodes > 1 and wanted == "IB" and nccl["network"] != "IB":
        status = WARN
        notes.append(f"the inventory declares {fabric} (deepspeed_job_fabric) but NCCL fell back to "
                     f"{nccl['network'] or 'no network'}: check the RDMA devices (ibv_devices), NCCL_IB_HCA, "
                     "and that NCCL_IB_DISABLE is unset")
    if expected_busbw_gbps and busbw_gbps is not None and nodes > 1:
        ratio = busbw_gbps / expected_busbw_gbps
        notes.append(f"bus bandwidth {busbw_gbps:.1f} GB/s is {100 * ratio:.0f}% of the expected "
                     f"{expected_busbw_gbps:g} (deepspeed_job_expected_busbw_gbps)")
        if ratio < 0.7:
            status = WARN
    return _row("network", "cluster", status, "; ".join([describe(nccl, nodes)] + notes))


def collective_row(result, expected_hosts, expected_world):
    """The cluster-wide all-reduce row from allreduce.py's DSMESH_ALLREDUCE JSON (or None)."""
    if not result:
        return _row("all-reduce", "cluster", FAIL, "the collective did not complete (see the launcher's output)")
    problems = []
    if not result.get("correct"):
        problems.append("wrong sum")
    if result.get("world_size") != expected_world:
        problems.append(f"world size {result.get('world_size')}, expected {expected_world}")
    missing = sorted(set(expected_hosts) - set(result.get("hosts", [])))
    if missing and len(result.get("hosts", [])) < len(expected_hosts):
        problems.append(f"no rank ran on {', '.join(missing)}")
    # one rank sends nothing: its bus bandwidth is 0 by definition, not a measurement of the fabric
    busbw = (f"bus bandwidth {result['busbw_gbps']:.2f} GB/s" if result.get("world_size", 0) > 1
             else "no bus bandwidth with one rank")
    detail = (f"{result['backend']} over {result['world_size']} rank(s) on {len(result.get('hosts', []))} node(s): "
              f"{result['size_mb']:g} MB in {result['seconds_per_iter'] * 1000:.1f} ms, {busbw}")
    return _row("all-reduce", "cluster", FAIL if problems else OK, detail + (f" ({'; '.join(problems)})" if problems else ""))


def format_report(rows):
    width = max((len(r["check"]) for r in rows), default=5)
    nwidth = max((len(r["node"]) for r in rows), default=4)
    return [f"{r['status']:<4}  {r['check']:<{width}}  {r['node']:<{nwidth}}  {r['detail']}" for r in rows]


def failed(rows):
    return [r for r in rows if r["status"] == FAIL]
