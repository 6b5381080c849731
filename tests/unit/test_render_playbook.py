"""The preview (playbooks/render.yml) on the example inventory: files on the controller, no node
contacted, the same files the launch stage renders, idempotent, check mode into a directory that
does not exist yet, and the user's settings reaching ds_config.json and the command alike."""

import json
import shlex

import pytest
from deepspeed.launcher.runner import fetch_hostfile
from ds_testlib import run_playbook

from ansible_collections.dsmesh.cluster.plugins.module_utils.render import FILES

PLAYBOOK = "playbooks/render.yml"


def _task(out, name, host="gpu-node-33"):
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ")[-1] == name:
                return task["hosts"][host]
    raise AssertionError(f"no task {name!r}")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, runs_dir):
    render_dir = tmp_path_factory.mktemp("render")
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", f"render_dir={render_dir}",
                                "-e", f"deepspeed_job_runs_dir={runs_dir}")
    assert rc == 0, json.dumps(out)[-3000:] + err
    return render_dir, out


def test_files_are_written_without_contacting_nodes(rendered):
    render_dir, out = rendered
    assert sorted(p.name for p in render_dir.iterdir()) == sorted(FILES)
    stats = out["stats"]
    assert list(stats) == ["gpu-node-33"] and stats["gpu-node-33"]["unreachable"] == 0
    assert list(fetch_hostfile(str(render_dir / "hostfile")).items()) == [("172.16.80.33", 8), ("172.16.80.31", 8)]


def test_the_launch_renders_the_same_files(rendered, runs_dir):
    render_dir, _ = rendered
    rc, out, err = run_playbook("tests/unit/playbooks/launch_render_local.yml", "-i", "inventory/example",
                                "-e", f"deepspeed_job_runs_dir={runs_dir}", "--skip-tags", "gpu_facts,start")
    assert rc == 0, json.dumps(out)[-3000:] + err
    run_dir = runs_dir / "r1-sft"
    for name in FILES:
        assert (run_dir / name).read_text() == (render_dir / name).read_text(), name


def test_plan_config_and_command_agree(rendered, runs_dir):
    render_dir, out = rendered
    cfg = json.loads((render_dir / "ds_config.json").read_text())
    plan = json.loads((render_dir / "plan.json").read_text())
    assert '"auto"' not in (render_dir / "ds_config.json").read_text()
    assert cfg["train_batch_size"] == 64 == plan["global_batch_size"]
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 16 == 64
    assert plan["model"]["name"] == "DeepSeek-R1-Distill-Qwen-32B" and plan["precision"] == "bf16"
    assert plan["master_weights"] == "fp32"
    summary = _task(out, "Show the plan")["msg"]
    assert any(line.startswith("plan: ZeRO-") for line in summary)
    assert any("GPU memory per rank" in line for line in summary)
    launch = (render_dir / "launch.sh").read_text()
    run_dir = runs_dir / "r1-sft"
    assert (f"/opt/conda/envs/train/bin/deepspeed --hostfile {run_dir}/hostfile --launcher pdsh "
            "--master_addr 172.16.80.33 --master_port 29500 --force_multi --module train" in launch)
    argv = shlex.split(launch.splitlines()[-1])
    assert f"--per_device_train_batch_size={cfg['train_micro_batch_size_per_gpu']}" in argv
    assert f"--gradient_accumulation_steps={cfg['gradient_accumulation_steps']}" in argv
    assert f"--learning_rate={cfg['optimizer']['params']['lr']!r}" in argv and "--num_train_epochs=2" in argv
    env = (render_dir / ".deepspeed_env").read_text().splitlines()
    assert env[0].startswith("PATH=/opt/conda/envs/train/bin:") and all("=" in line for line in env)
    assert "TORCHINDUCTOR_CACHE_DIR=/var/cache/dsmesh/inductor" in env and "TRAIN_PYCACHE_DIR=/var/cache/dsmesh/pycache" in env


def test_user_settings_reach_config_and_command(tmp_path):
    render_dir = tmp_path / "user"
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", f"render_dir={render_dir}",
                                "-e", json.dumps({"deepspeed_job_train_args": {"adam_beta2": 0.95, "max_grad_norm": 0.3,
                                                                              "learning_rate": 2e-5},
                                                  "deepspeed_job_finetune": "lora", "deepspeed_job_lora_alpha": 64,
                                                  "deepspeed_job_lora_dropout": 0.1}))
    assert rc == 0, json.dumps(out)[-3000:] + err
    cfg = json.loads((render_dir / "ds_config.json").read_text())
    argv = shlex.split((render_dir / "launch.sh").read_text().splitlines()[-1])
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95] and "--adam_beta2=0.95" in argv
    assert cfg["gradient_clipping"] == 0.3 and "--max_grad_norm=0.3" in argv
    assert cfg["optimizer"]["params"]["lr"] == 2e-5 and "--learning_rate=2e-05" in argv
    assert {"--lora=true", "--lora_alpha=64", "--lora_dropout=0.1"} <= set(argv)
    plan = json.loads((render_dir / "plan.json").read_text())
    assert plan["lora"] == {"rank": 16, "alpha": 64, "dropout": 0.1,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}


def test_a_training_argument_the_plan_owns_is_refused_before_any_file(tmp_path):
    render_dir = tmp_path / "owned"
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", f"render_dir={render_dir}",
                                "-e", json.dumps({"deepspeed_job_train_args": {"gradient_accumulation_steps": 4}}))
    assert rc != 0
    msg = _task(out, "Plan the job and render its files")["msg"]
    assert "gradient_accumulation_steps" in msg and "remove it" in msg
    assert not any(render_dir.iterdir())


def test_second_run_changes_nothing_check_and_diff(rendered, runs_dir):
    render_dir, _ = rendered
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", f"render_dir={render_dir}",
                                "-e", f"deepspeed_job_runs_dir={runs_dir}", "--check", "--diff")
    assert rc == 0, err
    assert out["stats"]["gpu-node-33"]["changed"] == 0


def test_check_mode_writes_nothing(tmp_path):
    render_dir = tmp_path / "fresh"
    rc, out, err = run_playbook(PLAYBOOK, "-i", "inventory/example", "-e", f"render_dir={render_dir}",
                                "-e", "deepspeed_job_finetune=lora", "--check")
    assert rc == 0, json.dumps(out)[-2000:] + err
    assert out["stats"]["gpu-node-33"]["changed"] > 0
    assert not render_dir.exists()
    summary = _task(out, "Show the plan")["msg"]
    assert any("LoRA" in line for line in summary)
