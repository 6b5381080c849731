"""Why a relaunch of a DeepCompile plan misses Inductor's FX-graph cache, on one GPU (one device call,
about 2 minutes): the ZeRO-3 plan of a 2-layer Qwen2.5-0.5B shape launched twice with the same cache
directories and Inductor's cache-key details logged; prints the key components that differ between
the two starts' graphs and a diff of the graphs, DeepCompile's graph ids (an address) blanked out:

    BENCH=bench.gpu_cache_miss bash bench/gpu.sh     # writes OUT/cache_miss/ (OUT: gpu_bench)
"""

import argparse
import difflib
import os
import re
import sys
import tempfile

# a TORCH_LOGS line: "[rank0]:V1201 18:43:36.805000 472 torch/_inductor/codecache.py:1006] [0/0] text"
LOG_PREFIX = re.compile(r"^.*?torch/_inductor/codecache\.py:\d+\] (?:\[[^\]]*\] )?")
COMPONENT = re.compile(r"^\[(\w+)\] (\S+?): (.*)$")
# DeepCompile's ops take the graph id first: torch.ops.dc.allgather_param.default(p, 139622095255600, 11, ...)
DC_GRAPH_ID = re.compile(r"(torch\.ops\.dc\.\w+\.default\((?:[\w\[\], ]*?, )?)(\d{6,})")


def key_details(path):
    """Each graph's cache-key components in a run's log, in compile order: [{name: (hash, text)}]."""
    graphs, current, name = [], None, None
    with open(path, errors="replace") as f:
        for line in f:
            m = LOG_PREFIX.match(line)
            if not m:
                current = None
                continue
            text = line[m.end():].rstrip("\n")
            if text.startswith("FX graph cache hash details for key"):
                current, name = {}, None
                graphs.append(current)
            elif current is not None:
                c = COMPONENT.match(text)
                if c:
                    name = c.group(2)
                    current[name] = (c.group(1), c.group(3))
                elif name is not None:  # the graph's code goes on over lines
                    h, body = current[name]
                    current[name] = (h, body + "\n" + text)
    return graphs


def blank_graph_ids(text):
    return DC_GRAPH_ID.sub(lambda m: m.group(1) + "GRAPH_ID", text)


def differences(first, second):
    """(components whose hash differs, the unified diff of each, graph ids blanked) per graph pair."""
    out = []
    for a, b in zip(first, second):
        names = [k for k in a if k not in b or a[k][0] != b[k][0]] + [k for k in b if k not in a]
        diffs = {}
        for k in names:
            x = blank_graph_ids(a.get(k, ("", ""))[1]).splitlines()
            y = blank_graph_ids(b.get(k, ("", ""))[1]).splitlines()
            diffs[k] = list(difflib.unified_diff(x, y, "first start", "second start", lineterm="", n=0))
        out.append((names, diffs))
    return out


def changed_lines(diff):
    """The removed and added lines of a unified diff, without its file headers."""
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_bench")
    from ansible_collections.dsmesh.cluster.plugins.module_utils.rank_env import compile_cache_env
    from bench import gpu_throughput as g
    from train.tiny_model import PRESETS, write_config_only

    out = os.path.join(p.parse_args().out, "cache_miss")
    os.makedirs(out, exist_ok=True)
    wl = {"finetune": "full", "global_batch": 8, "seq_len": 1024, "lr": 1e-5}
    work = tempfile.mkdtemp(prefix="cache_miss.")
    model = os.path.join(work, "model")
    write_config_only(model, dict(PRESETS["qwen2.5-0.5b"], num_hidden_layers=2), 0, n_train=64)
    plan, cfg, argv = g.make_plan(model, wl, {"zero_stage": 3, "engine": "deepspeed"})
    env = dict(compile_cache_env(work), TORCH_LOGS="+torch._inductor.codecache")
    logs = []
    for i in (1, 2):
        log = os.path.join(out, f"start{i}.log")
        cmd = g.ours_cmd(model, wl, 3, 0, os.path.join(work, f"run{i}"), plan, cfg, argv, work, "ours_deepspeed")
        rc, wall, _ = g.run_child(cmd + ["--save_strategy", "no"], log, 240, env)
        said = g.package_lines(log, ("compile caches", "compiled and ran"))
        print(f"start {i}: rc={rc} {wall:.0f}s {said}", flush=True)
        logs.append(log)
    first, second = key_details(logs[0]), key_details(logs[1])
    print(f"cache keys: {len(first)} graphs in the first start, {len(second)} in the second", flush=True)
    with open(os.path.join(out, "diff.txt"), "w") as f:
        for n, (names, diffs) in enumerate(differences(first, second)):
            print(f"graph {n}: components that differ: {names or 'none'}", flush=True)
            for k, d in diffs.items():
                f.write(f"=== graph {n}, {k} (graph ids blanked)\n" + "\n".join(d) + "\n")
                changed = changed_lines(d)
                print(f"  {k}: {len(changed)} lines differ besides the graph ids; the first:", flush=True)
                for line in changed[:12]:
                    print("   ", line[:200], flush=True)


if __name__ == "__main__":
    sys.exit(main())
