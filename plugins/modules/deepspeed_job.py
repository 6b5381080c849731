#!/usr/bin/python

DOCUMENTATION = r"""
---
module: deepspeed_job
short_description: Start, query or stop a detached C(deepspeed --hostfile) launch on the master
description:
  - C(state=started) starts the command detached (its own session, output to
    C(RUN_DIR/logs/RUN_ID.log), C(RUN_DIR/launch.log) pointing at the newest) and records the run in
    C(RUN_DIR/launches.json). It refuses while a run of this run directory is still going.
  - C(state=status) reports the newest run - C(none), C(running), C(finished), C(failed) or C(stopped) - with
    the last logged step, loss and tokens/s from C(OUTPUT_DIR/metrics.jsonl), and for a failed run the
    nodes the launcher's log blames. It changes nothing.
  - C(state=stopped) interrupts the launcher (which ends the ranks on every node), then makes sure no rank
    of this run is left on any node (C(pkill) through pdsh).
options:
  state:
    description: What to do.
    type: str
    choices: [started, status, stopped]
    default: status
  run_dir:
    description: The run's directory on the master.
    type: path
    required: true
  output_dir:
    description: The training's output directory (metrics.jsonl, summary.json, checkpoints).
    type: path
    required: true
  run_name:
    description: Prefix of the run id (C(RUN_NAME-YYYYmmdd-HHMMSS)).
    type: str
    default: run
  command:
    description: The launcher's argv, for C(state=started).
    type: list
    elements: str
  supervisor:
    description: Argv of the supervisor that runs the launcher (C(python -m dsmesh.supervise ...)); it is
      given C(--run-dir) and reads the command from C(RUN_DIR/launch_command.json). Without it the
      command runs directly.
    type: list
    elements: str
  chdir:
    description: Working directory of the launcher (it must exist on every node; ranks run there too).
    type: path
  environment:
    description: Variables for the launcher (for example C(DS_ENV_FILE)).
    type: dict
    default: {}
  nodes:
    description: Addresses of every node, to end ranks of this run left on any node (through pdsh)
      when stopping and before starting.
    type: list
    elements: str
    default: []
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
attributes:
  check_mode:
    support: full
    details: C(started) and C(stopped) report what they would do and change nothing.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Launch
  deepspeed_job:
    state: started
    run_dir: /var/lib/dsmesh/runs/demo
    output_dir: /var/lib/dsmesh/runs/demo/output
    command: [/opt/venv/bin/deepspeed, --hostfile, /var/lib/dsmesh/runs/demo/hostfile, --module, train]
    chdir: /opt/dsmesh/src

- name: Status
  deepspeed_job:
    run_dir: /var/lib/dsmesh/runs/demo
    output_dir: /var/lib/dsmesh/runs/demo/output
  register: job
"""

RETURN = r"""
job_status:
  description:
    - The newest run's state (C(none), C(running), C(finished), C(failed), C(stopped)) and numbers - C(run_id),
      C(run_dir), C(pid), C(started), C(exit_code), C(log); once training logged a step C(step), C(loss),
      C(tokens_per_s) and the whole C(metrics) line, with the plan's C(predicted_tokens_per_s) and
      C(speed_vs_predicted) (measured over predicted) where the plan has them; while running C(phase) (C(loading), C(compiling),
      C(training), C(saving) and since when); when finished C(summary); when failed C(failed_nodes),
      C(failed_node), C(failure) (the supervisor's record of a lost node), C(error) (the last C(error:) line a rank
      printed: a bad input, a full disk with its node and path) and C(log_tail); when the launch's resume step did
      something, C(resume) (the checkpoint, C(from_layout) and C(to_layout), whether it was converted to the universal
      format and in how long, the copies between nodes, the checkpoints removed, and a C(line) saying so).
  returned: always
  type: dict
run_id:
  description: Id of the run started (state=started).
  returned: when started
  type: str
stopped_ranks_on:
  description: Nodes where ranks of the run were still alive and were ended (state=stopped).
  returned: when stopped
  type: list
  elements: str
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.jobctl import end_leftover_ranks, job_status, start, stop


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["started", "status", "stopped"], default="status"),
            run_dir=dict(type="path", required=True),
            output_dir=dict(type="path", required=True),
            run_name=dict(type="str", default="run"),
            command=dict(type="list", elements="str"),
            supervisor=dict(type="list", elements="str"),
            chdir=dict(type="path"),
            environment=dict(type="dict", default={}),
            nodes=dict(type="list", elements="str", default=[]),
        ),
        required_if=[("state", "started", ("command", "chdir"))],
        supports_check_mode=True,
    )
    p = module.params
    before = job_status(p["run_dir"], p["output_dir"])

    if p["state"] == "status":
        module.exit_json(changed=False, job_status=before)

    if p["state"] == "started":
        if before["state"] == "running":
            module.fail_json(msg=f"a job is already running in {p['run_dir']}: run {before['run_id']} "
                                 f"(pid {before['pid']}, since {before['started']}). Wait for it, or stop it "
                                 "with playbooks/stop.yml.", job_status=before)
        run_id = f"{p['run_name']}-{time.strftime('%Y%m%d-%H%M%S')}"
        if module.check_mode:
            module.exit_json(changed=True, run_id=run_id, job_status=before)
        # Ranks of an earlier attempt that lost a peer may still wait in a collective.
        leftovers = end_leftover_ranks(p["nodes"], p["output_dir"])
        if leftovers:
            module.warn(f"ended ranks of an earlier attempt still running on {', '.join(leftovers)}")
        start(p["run_dir"], p["command"], p["chdir"], {k: str(v) for k, v in p["environment"].items()}, run_id,
              supervisor=p["supervisor"])
        module.exit_json(changed=True, run_id=run_id, job_status=job_status(p["run_dir"], p["output_dir"]))

    # stopped
    if module.check_mode:
        module.exit_json(changed=before["state"] == "running", job_status=before)
    was_running = stop(p["run_dir"])
    leftovers = end_leftover_ranks(p["nodes"], p["output_dir"])
    module.exit_json(changed=was_running or bool(leftovers), stopped_ranks_on=leftovers,
                     job_status=job_status(p["run_dir"], p["output_dir"]))


if __name__ == "__main__":
    main()
