"""The modules run by Ansible itself (AnsiballZ, module_utils shipped with them): check mode,
diff mode, honest changed, failures that name the problem and leave files alone.

One playbook runs every case (one Ansible start-up instead of one per case); the tests read the
registered results from the json callback.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from ds_testlib import DATA, run_playbook

from ansible_collections.dsmesh.cluster.plugins.module_utils.rank_env import parse_ip_addr

H20_X8 = "".join(f"{i}, NVIDIA H20, 97871, 9.0\n" for i in range(8))


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _this_nodes_address():
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [(i, a) for i, a in parse_ip_addr(out) if i != "lo"][0]


NODES_H20 = [{"name": "gpu-node-33", "address": "172.16.80.33", "slots": 8, "gpu_model": "NVIDIA H20",
              "gpu_memory_gib": 96, "host_memory_gib": 1024, "cpu_cores": 96, "interface": "bond0"},
             {"name": "gpu-node-31", "address": "172.16.80.31", "slots": 8, "gpu_model": "NVIDIA H20",
              "gpu_memory_gib": 96, "host_memory_gib": 1024, "cpu_cores": 96, "interface": "bond0"}]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modules")
    model_dir = tmp / "model"
    model_dir.mkdir()
    shutil.copy(DATA / "DeepSeek-R1-Distill-Qwen-32B.json", model_dir / "config.json")
    run_dir = tmp / "run"
    run_dir.mkdir()
    h20 = _script(tmp / "nvidia-smi-h20", f"cat <<'EOF'\n{H20_X8}EOF\n")
    broken = _script(tmp / "nvidia-smi-broken", "echo 'NVIDIA-SMI has failed because it could not communicate "
                                                "with the NVIDIA driver.'\nexit 9\n")
    iface, address = _this_nodes_address()
    job = {"python": "/opt/ds-venv/bin/python", "code_dir": "/opt/dsmesh/src", "run_dir": str(run_dir),
           "output_dir": str(run_dir / "output"), "model_dir": str(model_dir), "datasets": ["/data/train.jsonl"],
           "max_seq_length": 4096, "global_batch_size": 64, "env": {"NCCL_DEBUG": "WARN"},
           "train_args": {"adam_beta2": 0.95, "max_grad_norm": 0.5, "num_train_epochs": 2}}
    render = {"dest": str(run_dir), "master": "gpu-node-33", "nodes": NODES_H20, "job": job}

    def task(name, module, args, **keywords):
        return dict({"name": name, module: args, "register": name.replace("-", "_")}, **keywords)

    tasks = [
        task("render-check", "dsmesh.cluster.deepspeed_render", render, check_mode=True, diff=True),
        task("render-after-check", "ansible.builtin.stat", {"path": str(run_dir / "ds_config.json")}),
        task("render-first", "dsmesh.cluster.deepspeed_render", render, diff=True),
        task("render-again", "dsmesh.cluster.deepspeed_render", render),
        task("render-lora", "dsmesh.cluster.deepspeed_render",
             dict(render, job=dict(job, finetune="lora", lora={"r": 8, "alpha": 16, "dropout": 0.1})), check_mode=True),
        task("render-impossible", "dsmesh.cluster.deepspeed_render",
             dict(render, job=dict(job, max_seq_length=131072)), ignore_errors=True),
        task("render-bad-master", "dsmesh.cluster.deepspeed_render", dict(render, master="gpu-node-99"),
             ignore_errors=True),
        task("render-bad-env", "dsmesh.cluster.deepspeed_render", dict(render, job=dict(job, env={"X": "$(reboot)"})),
             ignore_errors=True),
        task("render-owned-arg", "dsmesh.cluster.deepspeed_render",
             dict(render, job=dict(job, train_args={"per_device_train_batch_size": 2})), ignore_errors=True),
        task("facts-gpu", "dsmesh.cluster.gpu_facts", {"nvidia_smi": h20}, check_mode=True),
        task("facts-cpu", "dsmesh.cluster.gpu_facts", {"cluster_address": address}),
        task("facts-broken", "dsmesh.cluster.gpu_facts", {"nvidia_smi": broken}, ignore_errors=True),
        task("facts-broken-lenient", "dsmesh.cluster.gpu_facts", {"nvidia_smi": broken, "fail_on_error": False}),
    ]
    playbook = tmp / "modules.yml"
    playbook.write_text(json.dumps([{"name": "Modules", "hosts": "localhost", "connection": "local",
                                     "gather_facts": False,
                                     "vars": {"ansible_python_interpreter": sys.executable},
                                     "tasks": tasks}]))
    rc, out, err = run_playbook(str(playbook))
    by_name = {t["task"]["name"]: t["hosts"]["localhost"] for t in out["plays"][0]["tasks"]}
    files = {p.name: p.read_text() for p in run_dir.iterdir() if p.is_file()}
    return by_name, files, iface


def test_render_check_and_diff_write_nothing(results):
    r, _, _ = results
    check = r["render-check"]
    assert check["changed"] and not r["render-after-check"]["stat"]["exists"]
    assert any('"train_batch_size": 64' in d["after"] for d in check["diff"])


def test_render_writes_every_file_consistently(results):
    r, files, _ = results
    first = r["render-first"]
    assert first["changed"] and sorted(files) == [".deepspeed_env", "ds_config.json", "hostfile", "launch.sh",
                                                  "plan.json"]
    assert files["hostfile"] == "172.16.80.33 slots=8\n172.16.80.31 slots=8\n"
    assert first["master_address"] == "172.16.80.33" and [h["slots"] for h in first["hosts"]] == [8, 8]
    cfg = json.loads(files["ds_config.json"])
    assert cfg == first["config"] and files["ds_config.json"] == first["ds_config_json"]
    assert json.loads(files["plan.json"]) == first["plan"] and first["plan"]["zero_stage"] == 3
    # the user's optimizer settings reach the config and the command alike
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95] and cfg["gradient_clipping"] == 0.5
    argv = first["argv"]
    assert "--adam_beta2=0.95" in argv and "--max_grad_norm=0.5" in argv and "--num_train_epochs=2" in argv
    assert f"--per_device_train_batch_size={cfg['train_micro_batch_size_per_gpu']}" in argv
    assert f"--deepspeed={first['files'][1]}" in argv
    assert "OMP_NUM_THREADS=12\n" in files[".deepspeed_env"] and first["env"]["NCCL_SOCKET_IFNAME"] == "=bond0"
    assert "NCCL_DEBUG=WARN\n" in files[".deepspeed_env"]
    assert os.access(first["files"][4], os.X_OK) and " ".join(argv[:3]) in files["launch.sh"]
    assert not r["render-again"]["changed"]


def test_render_lora_settings_reach_the_plan_and_the_command(results):
    r, _, _ = results
    lora = r["render-lora"]
    assert lora["plan"]["lora"]["rank"] == 8 and lora["plan"]["lora"]["alpha"] == 16
    assert {"--lora=true", "--lora_r=8", "--lora_alpha=16", "--lora_dropout=0.1"} <= set(lora["argv"])


def test_render_failures_name_the_problem_and_leave_files_alone(results):
    r, files, _ = results
    bad = r["render-impossible"]
    assert bad["failed"] and "what would make it fit" in bad["msg"] and bad["error_lines"]
    assert r["render-bad-master"]["failed"] and "gpu-node-99" in r["render-bad-master"]["msg"]
    assert r["render-bad-env"]["failed"] and "X:" in r["render-bad-env"]["msg"]
    owned = r["render-owned-arg"]
    assert owned["failed"] and "per_device_train_batch_size" in owned["msg"] and "micro_batch_size" in owned["msg"]
    assert json.loads(files["ds_config.json"]) == r["render-first"]["config"]


def test_gpu_facts_module(results):
    r, _, iface = results
    facts = r["facts-gpu"]["ansible_facts"]
    assert not r["facts-gpu"]["changed"]
    assert facts["ds_gpu_count"] == 8 and facts["ds_gpu_memory_gib"] == 95.58 and facts["ds_gpu_bf16"]
    assert facts["ds_host_memory_gib"] > 0 and facts["ds_cpu_count"] >= 1
    cpu = r["facts-cpu"]["ansible_facts"]
    assert cpu["ds_gpu_count"] == 0 and cpu["ds_gpu_model"] is None and cpu["ds_cluster_interface"] == iface
    assert r["facts-broken"]["failed"] and "could not communicate" in r["facts-broken"]["msg"]
    lenient = r["facts-broken-lenient"]
    assert lenient["ansible_facts"]["ds_gpu_count"] == 0 and lenient["warnings"]
