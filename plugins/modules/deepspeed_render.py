#!/usr/bin/python
"""Ansible module: plan a DeepSpeed job and write every file its launch needs."""

DOCUMENTATION = r"""
---
module: deepspeed_render
short_description: Plan a DeepSpeed job and write its hostfile, ds_config.json, .deepspeed_env, plan.json and launch.sh
description:
  - Plans the job with the ZeRO planner (the fastest plan that fits the GPU and host memory of the nodes - engine,
    ZeRO stage, offload, checkpointing, micro-batch, accumulation, compilation) and writes, into I(dest),
    C(hostfile) (master first, cluster addresses), C(ds_config.json) (concrete values only, no C(auto)),
    C(.deepspeed_env) (what every remote rank needs), C(plan.json) and C(launch.sh) (the launch command).
  - The launch stage of the C(deepspeed_job) role runs it on the master with I(dest) = the run directory; the
    preview (C(playbooks/render.yml)) runs it on the controller with the same settings, so it writes the same files.
  - The user's training arguments that the config also holds (learning_rate, adam_beta1, adam_beta2,
    adam_epsilon, weight_decay, max_grad_norm) go into C(ds_config.json) and the command alike; arguments the
    launch sets itself are refused, naming the setting to change.
  - Bad settings fail before any file is written, naming the host or setting; files are written atomically and
    only when their content differs.
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
options:
  dest:
    description: Directory the files are written into. It must exist (in check mode it may not).
    type: path
    required: true
  nodes:
    description:
      - The cluster's nodes in inventory order, each with C(name), C(address) (the address the nodes reach it by),
        C(slots) (the inventory's C(gpus)), and what is known of its hardware - C(gpu_count), C(gpu_model),
        C(gpu_memory_gib), C(bf16), C(compute_capability), C(host_memory_gib), C(cpu_cores), C(interface) - from
        M(dsmesh.cluster.gpu_facts) or the inventory.
    type: list
    elements: dict
    required: true
  master:
    description: Inventory name of the master (rank 0 runs there; it comes first in the hostfile).
    type: str
    required: true
  job:
    description:
      - The job's settings - C(python), C(code_dir), C(run_dir), C(output_dir), C(model_dir), C(datasets),
        C(eval_datasets), C(max_seq_length), C(global_batch_size), C(finetune) (C(full) or C(lora)), C(lora)
        (C(r), C(alpha), C(dropout), C(target_modules)), C(train_args), C(plan_overrides), C(config_overrides),
        C(planner_settings), C(shared_storage), C(cache_dir), C(env), C(launcher_args), C(master_port), and
        C(model_shape) (the model's config.json inline; else C(model_dir)/config.json is read where this runs).
      - The C(deepspeed_job) role documents each as its C(deepspeed_job_*) variable.
    type: dict
    required: true
  mode:
    description: Permission bits of the files (C(launch.sh) gets the execute bits as well).
    type: raw
    default: "0644"
notes:
  - C(ds_config.json) is written for every plan; the command passes it only when the plan's engine is
    C(deepspeed) (on one GPU the planner may choose plain PyTorch).
seealso:
  - module: dsmesh.cluster.gpu_facts
  - module: dsmesh.cluster.deepspeed_job
"""

EXAMPLES = r"""
- name: Plan a full fine-tune of a 32B model on 2 x 8 H20 and render its files
  dsmesh.cluster.deepspeed_render:
    dest: /var/lib/dsmesh/runs/r1-sft
    master: gpu-node-33
    nodes:
      - {name: gpu-node-33, address: 172.16.80.33, slots: 8, gpu_model: NVIDIA H20, gpu_memory_gib: 96,
         host_memory_gib: 1024}
      - {name: gpu-node-31, address: 172.16.80.31, slots: 8, gpu_model: NVIDIA H20, gpu_memory_gib: 96,
         host_memory_gib: 1024}
    job:
      python: /opt/dsmesh/venv/bin/python
      code_dir: /opt/dsmesh/src
      run_dir: /var/lib/dsmesh/runs/r1-sft
      output_dir: /var/lib/dsmesh/runs/r1-sft/output
      model_dir: /data/models/DeepSeek-R1-Distill-Qwen-32B
      datasets: [/data/sft/train.jsonl]
      max_seq_length: 4096
      global_batch_size: 64
      train_args: {learning_rate: 1.0e-5, adam_beta2: 0.95, num_train_epochs: 2}
  register: run
"""

RETURN = r"""
plan:
  description:
    - The chosen plan - C(engine), C(compile), C(master_weights), C(zero_stage), offload, checkpointing
      (C(checkpoint_layers)), C(micro_batch_size), C(gradient_accumulation_steps), C(chunked_loss), the GPU memory per rank
      (C(gpu_memory_gib), broken down), host memory per node (C(host_memory_gib)), predicted peaks, and the
      faster plans that do not fit and why (C(rejected_faster_plans)).
  returned: success
  type: dict
summary:
  description: The plan as readable lines.
  returned: success
  type: list
  elements: str
argv:
  description: The launch command (run on the master, in I(job.code_dir), with C(DS_ENV_FILE) set).
  returned: success
  type: list
  elements: str
config:
  description: The content of C(ds_config.json).
  returned: success
  type: dict
ds_config_json:
  description: The text of C(ds_config.json), to put the same file on every node.
  returned: success
  type: str
env:
  description: The variables of C(.deepspeed_env), in file order.
  returned: success
  type: dict
hosts:
  description: The hostfile's entries (name, address, slots), master first.
  returned: success
  type: list
  elements: dict
master_address:
  description: The master's address (the launcher's C(--master_addr)).
  returned: success
  type: str
files:
  description: The paths of the files written (or that would be, in check mode).
  returned: success
  type: list
  elements: str
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.files import FileWriteError, parse_mode, write_file
from ..module_utils.hostfile import HostfileError
from ..module_utils.planner import PlanError
from ..module_utils.rank_env import EnvError
from ..module_utils.render import FILES, RunSpec, render_run

# Every way a job's settings can be wrong; each message names the host or setting.
SETTING_ERRORS = (ValueError, PlanError, HostfileError, EnvError, FileWriteError)

SPEC_FIELDS = set(RunSpec.__dataclass_fields__)


def run_spec(job):
    unknown = sorted(set(job) - SPEC_FIELDS)
    if unknown:
        raise ValueError(f"job: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(SPEC_FIELDS))})")
    values = {k: v for k, v in job.items() if v is not None}
    try:
        return RunSpec(**values)
    except TypeError as exc:
        raise ValueError(f"job: {exc}") from None


def write_files(dest, files, mode, check_mode):
    """Write each file; returns (changed, diffs, paths). Nothing is written when any would fail first."""
    changed, diffs, paths = False, [], []
    for name in FILES:
        path = os.path.join(dest, name)
        file_mode = mode | 0o111 if name == "launch.sh" else mode
        result = write_file(path, files[name], file_mode, check_mode=check_mode)
        changed = changed or result["changed"]
        if result["changed"]:
            diffs.append(result["diff"])
        paths.append(path)
    return changed, diffs, paths


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            nodes=dict(type="list", elements="dict", required=True),
            master=dict(type="str", required=True),
            job=dict(type="dict", required=True),
            mode=dict(type="raw", default="0644"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        spec = run_spec(p["job"])
        rendered = render_run(spec, p["nodes"], p["master"])
        if not module.check_mode and not os.path.isdir(p["dest"]):
            raise FileWriteError(f"{p['dest']} does not exist (create the run directory first)")
        changed, diffs, paths = write_files(p["dest"], rendered.files, parse_mode(p["mode"]), module.check_mode)
    except SETTING_ERRORS as exc:
        module.fail_json(msg=str(exc), error_lines=str(exc).splitlines())
    for warning in rendered.warnings:
        module.warn(warning)
    result = dict(changed=changed, plan=rendered.plan.as_dict(), summary=rendered.summary, argv=rendered.argv,
                  config=json.loads(rendered.files["ds_config.json"]),
                  ds_config_json=rendered.files["ds_config.json"], env=rendered.env, hosts=rendered.hosts,
                  master_address=rendered.hosts[0]["address"], files=paths)
    if module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
