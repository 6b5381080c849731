"""playbooks/render.yml on the example inventory: files on the controller, no node contacted,
idempotent, check mode into a directory that does not exist yet. (An impossible plan failing
without touching files is tested on the module, in test_modules.py.)"""

import json

import pytest
from ds_testlib import run_playbook
from deepspeed.launcher.runner import fetch_hostfile

PLAYBOOK = "playbooks/render.yml"


def _task(out, name):
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == name:
                return task["hosts"]["localhost"]
    raise AssertionError("no task %r" % name)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    render_dir = tmp_path_factory.mktemp("render")
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", "render_dir=%s" % render_dir)
    assert rc == 0, json.dumps(out)[-3000:] + err
    return render_dir, out


def test_files_are_written_without_contacting_nodes(rendered):
    render_dir, out = rendered
    assert sorted(p.name for p in render_dir.iterdir()) == [".deepspeed_env", "ds_config.json", "hostfile",
                                                            "launch.sh", "plan.json"]
    for node in ("gpu-node-33", "gpu-node-31"):
        stats = out["stats"][node]
        assert stats["unreachable"] == 0 and stats["failures"] == 0 and stats["changed"] == 0
    assert list(fetch_hostfile(str(render_dir / "hostfile")).items()) == [("172.16.80.33", 8), ("172.16.80.31", 8)]


def test_plan_config_and_command_agree(rendered):
    render_dir, out = rendered
    cfg = json.loads((render_dir / "ds_config.json").read_text())
    plan = json.loads((render_dir / "plan.json").read_text())
    assert '"auto"' not in (render_dir / "ds_config.json").read_text()
    assert cfg["train_batch_size"] == 64 == plan["global_batch_size"]
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 16 == 64
    assert plan["model"]["name"] == "DeepSeek-R1-Distill-Qwen-32B" and plan["precision"] == "bf16"
    summary = _task(out, "Show the plan")["msg"]
    assert any(line.startswith("plan: ZeRO-") for line in summary)
    assert any("GPU memory per rank" in line for line in summary)
    launch = (render_dir / "launch.sh").read_text()
    assert ("deepspeed --hostfile /var/lib/dsmesh/runs/default/hostfile --launcher pdsh "
            "--master_addr 172.16.80.33 --master_port 29500 --module train" in launch)
    assert "--per_device_train_batch_size %d" % cfg["train_micro_batch_size_per_gpu"] in launch
    assert "--gradient_accumulation_steps %d" % cfg["gradient_accumulation_steps"] in launch
    env = (render_dir / ".deepspeed_env").read_text().splitlines()
    assert env[0].startswith("PATH=/opt/dsmesh/venv/bin:") and all("=" in line for line in env)


def test_second_run_changes_nothing_check_and_diff(rendered):
    render_dir, _ = rendered
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", "render_dir=%s" % render_dir,
                                "--check", "--diff")
    assert rc == 0, err
    assert out["stats"]["localhost"]["changed"] == 0


def test_check_mode_writes_nothing(tmp_path):
    render_dir = tmp_path / "fresh"
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", "render_dir=%s" % render_dir,
                                "-e", "ds_finetune=lora", "--check")
    assert rc == 0, json.dumps(out)[-2000:] + err
    assert out["stats"]["localhost"]["changed"] > 0
    assert not render_dir.exists()
    summary = _task(out, "Show the plan")["msg"]
    assert any("LoRA" in line for line in summary)
