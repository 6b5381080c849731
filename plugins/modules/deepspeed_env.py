#!/usr/bin/python
"""Ansible module: write the .deepspeed_env that DeepSpeed's runner exports on remote ranks."""



DOCUMENTATION = r"""
---
module: deepspeed_env
short_description: Write .deepspeed_env - the variables DeepSpeed's multi-node runner exports on every rank
description:
  - DeepSpeed's pdsh runner forwards only C(NCCL*), C(PYTHON*), C(UCX*), C(MV2*) and C(MLFLOW*)
    variables to remote ranks; the rest must be listed in C(.deepspeed_env) (read from the
    launch directory and from the home directory, or C(DS_ENV_FILE)).
  - Writes C(KEY=VALUE) lines - the user's variables plus what remote ranks need - C(PATH) with
    the training environment's C(bin) first, C(VIRTUAL_ENV), C(OMP_NUM_THREADS), C(HF_HOME),
    C(TORCH_EXTENSIONS_DIR), and C(NCCL_SOCKET_IFNAME) set to the interfaces that hold the
    nodes' cluster addresses (so NCCL does not pick a docker bridge). When those interfaces are
    unknown it excludes lo, docker, bridges and veth pairs instead.
  - When every node uses the same interface name, C(GLOO_SOCKET_IFNAME) is set too (gloo takes one name).
  - The user's variables win; a user variable set to null removes a default one.
  - Refuses names that are not shell identifiers and values that the runner would pass to the
    remote shell unescaped (C($), backquote, backslash, double quote, line breaks).
  - Writes atomically and only when the content or mode differs.
version_added: "1.0.0"
author:
  - ML infrastructure team
options:
  dest:
    description: Path of the file to write (normally C(<launch dir>/.deepspeed_env)). Its directory must exist.
    type: path
    required: true
  env:
    description: The user's variables (name to value). They override the defaults.
    type: dict
    default: {}
  venv:
    description: The training environment (a virtualenv prefix) that must come first on C(PATH) on every node.
    type: path
  omp_num_threads:
    description: C(OMP_NUM_THREADS) for every rank. Default CPU cores per node divided by ranks per node, else 1.
    type: int
  cpu_cores:
    description: CPU cores of a node (the smallest), to derive I(omp_num_threads).
    type: int
  ranks_per_node:
    description: Ranks on the busiest node, to derive I(omp_num_threads).
    type: int
  hf_home:
    description: C(HF_HOME) on the nodes (Hugging Face cache).
    type: str
  torch_extensions_dir:
    description: C(TORCH_EXTENSIONS_DIR) on the nodes, where DeepSpeed keeps its JIT-built ops.
    type: str
  interfaces:
    description:
      - The network interface that holds each node's cluster address, one entry per node
        (see M(gpu_facts)'s C(ds_cluster_interface)). An empty or null entry means unknown.
    type: list
    elements: raw
    default: []
  mode:
    description: Permission bits of the file, as an octal string.
    type: raw
    default: "0644"
notes:
  - Supports check mode and diff mode.
seealso:
  - module: deepspeed_hostfile
  - module: gpu_facts
"""

EXAMPLES = r"""
- name: Write .deepspeed_env in the launch directory
  deepspeed_env:
    dest: /srv/train/.deepspeed_env
    venv: /opt/ds-venv
    cpu_cores: 96
    ranks_per_node: 8
    hf_home: /root/.cache/huggingface
    torch_extensions_dir: /root/.cache/torch_extensions
    interfaces: [ens5f0, ens5f0]
    env:
      WANDB_MODE: offline
      NCCL_DEBUG: WARN
"""

RETURN = r"""
env:
  description: The variables written, in file order.
  returned: success
  type: dict
  sample: {"PATH": "/opt/ds-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "OMP_NUM_THREADS": "12", "NCCL_SOCKET_IFNAME": "=ens5f0"}
content:
  description: The file text.
  returned: success
  type: str
dest:
  description: The path written.
  returned: success
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ..module_utils.rank_env import EnvError, build_env, omp_threads, render_env
from ..module_utils.files import FileWriteError, parse_mode, write_file


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            env=dict(type="dict", default={}),
            venv=dict(type="path"),
            omp_num_threads=dict(type="int"),
            cpu_cores=dict(type="int"),
            ranks_per_node=dict(type="int"),
            hf_home=dict(type="str"),
            torch_extensions_dir=dict(type="str"),
            interfaces=dict(type="list", elements="raw", default=[]),
            mode=dict(type="raw", default="0644"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    threads = p["omp_num_threads"] or omp_threads(p["cpu_cores"], p["ranks_per_node"])
    interfaces = [str(i) if i else None for i in p["interfaces"]]
    try:
        env = build_env(user_vars=p["env"], venv=p["venv"], omp_num_threads=threads, hf_home=p["hf_home"],
                        torch_extensions_dir=p["torch_extensions_dir"], interfaces=interfaces)
        content = render_env(env)
        written = write_file(p["dest"], content, parse_mode(p["mode"]), check_mode=module.check_mode)
    except (EnvError, FileWriteError) as exc:
        module.fail_json(msg=str(exc))
    result = dict(changed=written["changed"], dest=p["dest"], env=dict(env), content=content)
    if module._diff:
        result["diff"] = written["diff"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
