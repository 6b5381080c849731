"""bench/gpu_cache_miss.py reads Inductor's cache-key details out of two starts' TORCH_LOGS and says
what differs besides DeepCompile's graph ids (the lines below are the H200 run's, shortened)."""

from bench.gpu_cache_miss import blank_graph_ids, changed_lines, differences, key_details

P = "[rank0]:V1201 18:43:36.805000 472 torch/_inductor/codecache.py:1006] [0/0] "


def start_log(tmp_path, name, graph_id, order):
    gathers = [f"    allgather_ds_param_primals_{p} = torch.ops.dc.allgather_param.default(primals_{p}, {graph_id}, {p}, "
               "dtype = torch.bfloat16)" for p in order]
    lines = ["compiling (0s)", P + "FX graph cache hash details for key fabc:", P + f"[h{graph_id}{''.join(map(str, order))}] gm: GraphModule()",
             P, P + "def forward(self, primals_1, primals_2):",
             P + f"    prefetch = torch.ops.dc.prefetch_params_fused.default({graph_id}, [primals_1, primals_2], [1, 2])",
             *(P + g for g in gathers), P + "[hx] torch_version: 2.11.0",
             "[rank0]:I1201 18:43:36.806000 472 torch/_inductor/codecache.py:1688] [0/0] fx graph cache miss for key fabc",
             "compiled and ran the first step in 31s (Inductor graph cache: 0 hit, 2 missed)"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_graph_ids_blanked_only_in_deepcompile_ops():
    line = "x = torch.ops.dc.allgather_param.default(primals_5, 139622095255600, 11, dtype = torch.bfloat16)"
    assert blank_graph_ids(line) == "x = torch.ops.dc.allgather_param.default(primals_5, GRAPH_ID, 11, dtype = torch.bfloat16)"
    assert blank_graph_ids("torch.ops.dc.prefetch_params_fused.default(139622095255600, [a], [1])").startswith(
        "torch.ops.dc.prefetch_params_fused.default(GRAPH_ID,")
    assert blank_graph_ids("torch.ops.aten.expand.default(x, [8, 32, 1])") == "torch.ops.aten.expand.default(x, [8, 32, 1])"


def test_two_starts_differ_in_graph_id_and_gather_order(tmp_path):
    first = key_details(start_log(tmp_path, "1.log", 139622095255600, (1, 2)))
    second = key_details(start_log(tmp_path, "2.log", 139772166608880, (2, 1)))
    assert len(first) == len(second) == 1
    assert set(first[0]) == {"gm", "torch_version"} and "def forward" in first[0]["gm"][1]
    (names, diffs), = differences(first, second)
    assert names == ["gm"]  # torch_version's hash is the same in both
    changed = changed_lines(diffs["gm"])
    assert changed and all("GRAPH_ID" in line and "1396" not in line for line in changed)  # only the order is left
    same = key_details(start_log(tmp_path, "3.log", 139772166608880, (1, 2)))
    assert blank_graph_ids(same[0]["gm"][1]) == blank_graph_ids(first[0]["gm"][1])
