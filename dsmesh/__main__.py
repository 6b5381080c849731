"""dsmesh: set up a GPU cluster, plan, launch, follow and stop a DeepSpeed job (docs/api.md).

    dsmesh setup -i INVENTORY [--ask-pass]      SSH mesh, pdsh, training environment (site.yml)
    dsmesh preflight -i INVENTORY               check every node, change nothing
    dsmesh plan -i INVENTORY [--tokens N]       the job's plan, on this machine alone
    dsmesh launch -i INVENTORY                  deepspeed --hostfile on the master, detached
    dsmesh status -i INVENTORY [--follow]       the job's state; --follow: a live progress bar
    dsmesh logs -i INVENTORY [-f] [--node N]    the ranks' output (the master's launch log)
    dsmesh stop -i INVENTORY                    stop the job on every node

Every command takes -e as ansible-playbook does (key=value, inline JSON/YAML, @file; repeatable)
and its vault options. Progress lines go to stderr; the result, in words, to stdout, or as JSON
with --json. The exit code is 0 when the playbook succeeded, ansible-playbook's own code when it
failed, 130 when interrupted; `status --follow` exits 0 only when the job finished.
"""
import argparse
import getpass
import json
import os
import sys

from rich.console import Console

from dsmesh import api
from dsmesh import format as fmt
from dsmesh.follow import StatusView, print_log_lines
from dsmesh.logs import master_host, node_names, shown
from dsmesh.options import OptionError, extra_vars_args, vault_args
from dsmesh.plan_table import plan_lines

# Commands that only read: their task lines are noise unless asked for (--progress).
READ_ONLY = ("plan", "status", "logs")


def exit_code(result):
    if result.ok:
        return 0
    if result.status == "canceled":
        return 130
    return result.rc or 1


def format_summary(result):
    """What stdout shows for one run of an action, in words."""
    if result.action == "status":
        lines = fmt.job_summary(result.job_status) + fmt.problem_lines(result)
    elif result.action in READ_ONLY:
        lines = fmt.problem_lines(result)
    else:
        lines = fmt.recap_lines(result)
    return "\n".join([*lines, fmt.outcome_line(result)])


def common_options():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--inventory", required=True, help="inventory file or directory")
    parser.add_argument("-e", "--extra-vars", action="append", default=[], metavar="VARS",
                        help="extra variables as ansible-playbook takes them: key=value, JSON/YAML inline, or @FILE "
                             "(repeatable; the last one wins)")
    parser.add_argument("-t", "--tags", help="only tasks with these tags (comma-separated)")
    parser.add_argument("--skip-tags", help="skip tasks with these tags (setup always skips 'launch')")
    parser.add_argument("-l", "--limit", help="limit the run to these hosts or groups")
    parser.add_argument("-C", "--check", action="store_true", help="dry run: change nothing")
    parser.add_argument("-k", "--ask-pass", action="store_true",
                        help="ask for the nodes' login password (the first setup of fresh nodes)")
    parser.add_argument("-J", "--ask-vault-pass", action="store_true", help="ask for the vault password")
    parser.add_argument("--vault-password-file", action="append", default=[], metavar="FILE",
                        help="the vault password's file (repeatable)")
    parser.add_argument("--vault-id", action="append", default=[], metavar="[LABEL@]SOURCE",
                        help="a vault id, SOURCE a file or 'prompt' (repeatable)")
    parser.add_argument("--timeout", type=int, help="stop a run after this many seconds")
    parser.add_argument("--keep-artifacts", metavar="DIR", help="keep ansible-runner's artifacts under DIR")
    shown_lines = parser.add_mutually_exclusive_group()
    shown_lines.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    shown_lines.add_argument("--progress", action="store_true",
                             help="progress lines for plan, status and logs too (they read only: none by default)")
    parser.add_argument("--json", action="store_true", help="the result as JSON on stdout (a line per update "
                                                            "when following)")
    return parser


def build_parser():
    parser = argparse.ArgumentParser(prog="dsmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    common = common_options()
    helps = {"setup": "SSH mesh, pdsh and the training environment: site.yml, --skip-tags launch",
             "preflight": "check every node: playbooks/preflight.yml", "launch": "start the job: playbooks/launch.yml",
             "stop": "stop the job on every node: playbooks/stop.yml"}
    for name, text in helps.items():
        commands.add_parser(name, parents=[common], help=text, description=text)
    plan = commands.add_parser("plan", parents=[common], help="the job's plan as a table (playbooks/render.yml, "
                               "on this machine: no node is contacted)")
    plan.add_argument("--tokens", type=float, help="the job's token count, for the time to finish (default: "
                      "max_steps x global batch x sequence, when the job sets max_steps)")
    plan.add_argument("--render-dir", metavar="DIR", help="keep the rendered files (hostfile, ds_config.json, "
                      ".deepspeed_env, plan.json, launch.sh) in DIR")
    status = commands.add_parser("status", parents=[common], help="the job's state (playbooks/status.yml)")
    status.add_argument("-f", "--follow", action="store_true", help="follow the job until it ends: a live "
                        "progress bar on a terminal, a line per change otherwise")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between two reads (default 5)")
    logs = commands.add_parser("logs", parents=[common], help="the ranks' output (playbooks/logs.yml)")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing what is added until the job ends")
    logs.add_argument("--node", help="only the lines of this node (its inventory name or cluster address)")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many of the last lines (default 100)")
    logs.add_argument("--interval", type=float, default=2.0, help="seconds between two reads when following")
    return parser


def run_options(args, parser):
    """api.run()'s options from the command line (passwords asked here)."""
    try:
        ansible_args = extra_vars_args(args.extra_vars)
        vault, prompts = vault_args(args.vault_password_file, args.vault_id, args.ask_vault_pass)
    except OptionError as err:
        parser.error(str(err))
    vault_passwords = {label: getpass.getpass("Vault password: " if label == api.VAULT_DEFAULT_ID
                                              else f"Vault password ({label}): ") for label in prompts}
    quiet = args.quiet or (args.action in READ_ONLY and not args.progress) or getattr(args, "follow", False)
    return dict(tags=args.tags, skip_tags=args.skip_tags, limit=args.limit, check=args.check,
                password=getpass.getpass("SSH password: ") if args.ask_pass else None,
                ansible_args=ansible_args + vault, vault_passwords=vault_passwords,
                progress=None if quiet else api.print_to_stderr, keep_artifacts=args.keep_artifacts,
                timeout=args.timeout)


def print_json(data, indent=2):
    print(json.dumps(data, indent=indent, default=str), flush=True)


def follow_status(args, options, console):
    """status --follow: 0 when the job finished, 1 when it failed, stopped or there is none."""
    last = None
    interrupted = False
    with StatusView(console) as view:
        try:
            for result in api.follow_status(args.inventory, interval=args.interval, **options):
                last = result
                if args.json:
                    print_json(result.to_dict(), indent=None)
                elif not result.ok:
                    if result.status != "canceled":
                        view.note("could not read the status: " + "; ".join(fmt.problem_lines(result) or
                                                                           [fmt.outcome_line(result)]))
                else:
                    view.update(result.job_status)
        except KeyboardInterrupt:  # Ctrl-C between two reads (during one, the read is canceled)
            interrupted = True
    if last is None:
        return 130 if interrupted else 1
    if interrupted or last.status == "canceled":
        if not args.json:
            console.print("stopped following; the job goes on (dsmesh stop to end it)")
        return 130
    if not args.json:
        console.print(format_summary(last), highlight=False, soft_wrap=True)
    if not last.ok:
        return exit_code(last)
    return 0 if api.job_state(last) == "finished" else 1


def print_logs(args, result, lines, console, last=None):
    """The lines --node keeps, the `last` of them when given."""
    master = master_host(result)
    names = node_names(result)
    node = names.get(args.node, args.node) if args.node else None
    kept = [(host, line, text) for host, line in lines
            if (text := shown(host, line, master, node, names)) is not None]
    kept = kept[-last:] if last else kept
    if args.json:
        for host, line, _ in kept:
            print_json({"host": host, "line": line}, indent=None)
    else:
        print_log_lines(console, [text for _, _, text in kept])


def logs(args, options, console, parser):
    """logs [-f]: the first read's last lines, then (following) what each read adds, until the job ends."""
    code = 0
    first = True
    # -n counts the lines shown: with --node, read enough of the master's log for that node's share of it
    wanted = max(args.lines * 10, 1000) if args.node else args.lines
    for result, lines in api.follow_logs(args.inventory, lines=wanted, interval=args.interval, **options):
        if not result.ok:
            print("\n".join(fmt.problem_lines(result) + [fmt.outcome_line(result)]), file=sys.stderr)
            code = exit_code(result)
            if result.status == "canceled" or not args.follow:
                break
            continue  # following: the next read tries again
        if first:
            if args.node and args.node not in node_names(result) and result.logs:
                parser.error(f"--node {args.node}: no such node; the nodes are {', '.join(sorted(result.logs))}")
            if not result.logs:
                print("\n".join(fmt.job_summary(result.job_status)), file=sys.stderr)
                return 1
        print_logs(args, result, lines, console, last=args.lines if first else None)
        first = False
        code = 0
        if not args.follow:
            break
    return code


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.exists(args.inventory):
        parser.error(f"inventory {os.path.abspath(args.inventory)} does not exist")
    options = run_options(args, parser)
    console = Console(highlight=False)
    if args.action == "status" and args.follow:
        return follow_status(args, options, console)
    if args.action == "logs":
        return logs(args, options, console, parser)
    if args.action == "plan":
        result = api.plan(args.inventory, render_dir=args.render_dir, **options)
    else:
        result = api.run(args.action, args.inventory, **options)
    if args.json:
        print_json(result.to_dict())
    else:
        if args.action == "plan" and result.plan:
            print("\n".join(plan_lines(result.plan, tokens=args.tokens)))
        print(format_summary(result), flush=True)
    return exit_code(result)


def entry_point(argv=None):
    """The `dsmesh` command: main(), quiet when its reader goes away (`dsmesh logs | head`)."""
    try:
        return main(argv)
    except BrokenPipeError:
        # no more output can be written: point stdout at nothing so the interpreter's flush at exit is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(entry_point())
