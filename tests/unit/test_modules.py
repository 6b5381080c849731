"""The four modules run by Ansible itself (AnsiballZ, module_utils shipped with them): check mode,
diff mode, honest changed, failures that name the problem and leave files alone.

One playbook runs every case (one Ansible start-up instead of one per case); the tests read the
registered results from the json callback.
"""

import json
import shutil
import stat
import subprocess
import sys

import pytest
from ansible.module_utils.ds_env import parse_ip_addr
from ds_testlib import DATA, run_playbook

H20_X8 = "".join("%d, NVIDIA H20, 97871, 9.0\n" % i for i in range(8))
NODES = [
    {"name": "gpu-node-31", "address": "172.16.80.31", "slots": 8},
    {"name": "gpu-node-33", "address": "172.16.80.33", "slots": 8},
    {"name": "gpu-node-35", "address": "node35.cluster", "slots": None, "gpu_count": 4},
]


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _this_nodes_address():
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [(i, a) for i, a in parse_ip_addr(out) if i != "lo"][0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modules")
    model_dir = tmp / "model"
    model_dir.mkdir()
    shutil.copy(DATA / "DeepSeek-R1-Distill-Qwen-32B.json", model_dir / "config.json")
    h20 = _script(tmp / "nvidia-smi-h20", "cat <<'EOF'\n%sEOF\n" % H20_X8)
    broken = _script(tmp / "nvidia-smi-broken", "echo 'NVIDIA-SMI has failed because it could not communicate "
                                                "with the NVIDIA driver.'\nexit 9\n")
    iface, address = _this_nodes_address()
    hostfile = {"dest": str(tmp / "hostfile"), "master": "gpu-node-33", "nodes": NODES}
    env = {"dest": str(tmp / ".deepspeed_env"), "venv": "/opt/ds-venv", "cpu_cores": 96, "ranks_per_node": 8,
           "interfaces": ["bond0", "bond0"], "env": {"NCCL_DEBUG": "WARN"}}
    config = {"dest": str(tmp / "ds_config.json"), "model_dir": str(model_dir), "slots": [8, 8],
              "gpu_model": "NVIDIA H20", "gpu_memory_gb": 96, "host_memory_gb": 1024, "seq_len": 4096,
              "global_batch_size": 64}

    def task(name, module, args, **keywords):
        return dict({"name": name, module: args, "register": name.replace("-", "_")}, **keywords)

    tasks = [
        task("hostfile-check", "deepspeed_hostfile", hostfile, check_mode=True, diff=True),
        task("hostfile-after-check", "ansible.builtin.stat", {"path": hostfile["dest"]}),
        task("hostfile-first", "deepspeed_hostfile", hostfile),
        task("hostfile-again", "deepspeed_hostfile", hostfile),
        task("hostfile-bad", "deepspeed_hostfile", dict(hostfile, master="gpu-node-99"), ignore_errors=True),
        task("env-first", "deepspeed_env", env, diff=True),
        task("env-again", "deepspeed_env", env),
        task("env-bad", "deepspeed_env", dict(env, env={"X": "$(reboot)"}), ignore_errors=True),
        task("config-check", "deepspeed_config", config, check_mode=True, diff=True),
        task("config-first", "deepspeed_config", config),
        task("config-again", "deepspeed_config", config),
        task("config-lora", "deepspeed_config", dict(config, finetune="lora", lora={"r": 8}), check_mode=True),
        task("config-impossible", "deepspeed_config", dict(config, seq_len=131072), ignore_errors=True),
        task("facts-gpu", "gpu_facts", {"nvidia_smi": h20}, check_mode=True),
        task("facts-cpu", "gpu_facts", {"cluster_address": address}),
        task("facts-broken", "gpu_facts", {"nvidia_smi": broken}, ignore_errors=True),
        task("facts-broken-lenient", "gpu_facts", {"nvidia_smi": broken, "fail_on_error": False}),
    ]
    playbook = tmp / "modules.yml"
    playbook.write_text(json.dumps([{"name": "Modules", "hosts": "localhost", "connection": "local",
                                     "gather_facts": False,
                                     "vars": {"ansible_python_interpreter": sys.executable},
                                     "tasks": tasks}]))
    rc, out, err = run_playbook(str(playbook))
    by_name = dict((t["task"]["name"], t["hosts"]["localhost"]) for t in out["plays"][0]["tasks"])
    files = dict((p.name, p.read_text()) for p in tmp.iterdir() if p.is_file() and p.suffix != ".yml"
                 and not p.name.startswith("nvidia-smi"))
    return by_name, files, iface


def test_hostfile_module(results):
    r, files, _ = results
    assert r["hostfile-check"]["changed"] and not r["hostfile-after-check"]["stat"]["exists"]
    assert "172.16.80.33 slots=8" in r["hostfile-check"]["diff"]["after"]
    first = r["hostfile-first"]
    assert first["changed"] and first["master_address"] == "172.16.80.33" and first["world_size"] == 20
    assert files["hostfile"] == first["content"]
    assert not r["hostfile-again"]["changed"]
    assert r["hostfile-bad"]["failed"] and "gpu-node-99" in r["hostfile-bad"]["msg"]


def test_env_module(results):
    r, files, _ = results
    first = r["env-first"]
    assert first["changed"] and "OMP_NUM_THREADS=12\n" in files[".deepspeed_env"]
    assert first["env"]["NCCL_SOCKET_IFNAME"] == "=bond0" and first["diff"]["after"] == first["content"]
    assert not r["env-again"]["changed"]
    assert r["env-bad"]["failed"] and files[".deepspeed_env"] == first["content"]


def test_config_module(results):
    r, files, _ = results
    assert r["config-check"]["changed"] and '"train_batch_size": 64' in r["config-check"]["diff"]["after"]
    first = r["config-first"]
    assert first["changed"] and json.loads(files["ds_config.json"]) == first["config"]
    assert first["plan"]["model"]["name"] == "model" and first["plan"]["zero_stage"] == 3
    assert first["trainer_args"]["per_device_train_batch_size"] == first["config"]["train_micro_batch_size_per_gpu"]
    assert "--per_device_train_batch_size" in first["trainer_argv"]
    assert not r["config-again"]["changed"]
    assert r["config-lora"]["plan"]["lora"]["rank"] == 8
    bad = r["config-impossible"]
    assert bad["failed"] and "what would make it fit" in bad["msg"] and bad["plan_error"]
    assert json.loads(files["ds_config.json"]) == first["config"]


def test_gpu_facts_module(results):
    r, _, iface = results
    facts = r["facts-gpu"]["ansible_facts"]
    assert not r["facts-gpu"]["changed"]
    assert facts["ds_gpu_count"] == 8 and facts["ds_gpu_memory_gb"] == 95.58 and facts["ds_gpu_bf16"]
    assert facts["ds_host_memory_gb"] > 0 and facts["ds_cpu_count"] >= 1
    cpu = r["facts-cpu"]["ansible_facts"]
    assert cpu["ds_gpu_count"] == 0 and cpu["ds_gpu_model"] is None and cpu["ds_cluster_interface"] == iface
    assert r["facts-broken"]["failed"] and "could not communicate" in r["facts-broken"]["msg"]
    lenient = r["facts-broken-lenient"]
    assert lenient["ansible_facts"]["ds_gpu_count"] == 0 and lenient["warnings"]
