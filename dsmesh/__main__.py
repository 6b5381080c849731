"""The command line of dsmesh's API (docs/api.md):

    python -m dsmesh {setup,preflight,launch,status,stop} -i INVENTORY [-e key=value ...] [--tags a,b]

Progress lines go to stderr while the playbook runs; the recap (and for `status` the job's state)
goes to stdout, or the whole result as JSON with --json. The exit code is 0 when the playbook
succeeded, ansible-playbook's own code when it failed, 130 when it was interrupted.
"""
import argparse
import getpass
import json
import sys
from pathlib import Path

import yaml

from dsmesh import api


def parse_extravars(values):
    """-e key=value (a string, as with ansible-playbook) or -e @file.yml (YAML or JSON), merged in order."""
    extravars = {}
    for value in values:
        if value.startswith("@"):
            loaded = yaml.safe_load(Path(value[1:]).read_text())
            if not isinstance(loaded, dict):
                raise argparse.ArgumentTypeError(f"{value[1:]} does not hold a mapping of variables")
            extravars.update(loaded)
        elif "=" in value:
            key, _, val = value.partition("=")
            extravars[key.strip()] = val
        else:
            raise argparse.ArgumentTypeError(f"-e {value!r}: expected key=value or @file")
    return extravars


def format_summary(result):
    lines = []
    width = max([len(host) for host in result.hosts] + [8])
    for host, counts in result.hosts.items():
        lines.append(f"{host:<{width}}  " + "  ".join(f"{name}={n}" for name, n in counts.items()))
    for host, task, msg in result.failures:
        lines.append(f"FAILED {host}: {task}: {msg}")
    for error in result.errors:
        lines.append(f"ERROR {error}")
    if result.action == "status":
        if result.job_status is None:
            lines.append("job: no job_status was reported")
        else:
            lines.append("job: " + "  ".join(f"{key}={value}" for key, value in result.job_status.items()
                                             if key != "log"))
            if result.job_status.get("log"):
                lines.append(f"log: {result.job_status['log']}")
    lines.append(f"{result.action}: {result.status} (rc={result.rc}, {result.playbook})")
    return "\n".join(lines)


def exit_code(result):
    if result.ok:
        return 0
    if result.status == "canceled":
        return 130
    return result.rc or 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dsmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=list(api.ACTIONS),
                        help="; ".join(f"{name}: {book}" for name, book in api.PLAYBOOKS.items()))
    parser.add_argument("-i", "--inventory", required=True, help="inventory file or directory")
    parser.add_argument("-e", "--extra-vars", action="append", default=[], metavar="KEY=VALUE|@FILE",
                        help="extra variables (repeatable)")
    parser.add_argument("-t", "--tags", help="only tasks with these tags (comma-separated)")
    parser.add_argument("--skip-tags", help="skip tasks with these tags (setup always skips 'launch')")
    parser.add_argument("-l", "--limit", help="limit the run to these hosts or groups")
    parser.add_argument("-C", "--check", action="store_true", help="dry run: change nothing")
    parser.add_argument("-k", "--ask-pass", action="store_true",
                        help="ask for the nodes' login password (the first setup of fresh nodes)")
    parser.add_argument("--timeout", type=int, help="stop the run after this many seconds")
    parser.add_argument("--keep-artifacts", metavar="DIR", help="keep ansible-runner's artifacts under DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)

    try:
        extravars = parse_extravars(args.extra_vars)
    except (argparse.ArgumentTypeError, OSError, yaml.YAMLError) as err:
        parser.error(str(err))
    password = getpass.getpass("SSH password: ") if args.ask_pass else None
    try:
        result = api.run(args.action, args.inventory, tags=args.tags,
                         skip_tags=args.skip_tags,
                         limit=args.limit, check=args.check, password=password, extravars=extravars,
                         progress=None if args.quiet else api.print_to_stderr,
                         keep_artifacts=args.keep_artifacts, timeout=args.timeout)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_summary(result), flush=True)
    return exit_code(result)


if __name__ == "__main__":
    sys.exit(main())
