"""Run `date` on every node through pdsh and measure the clock skew between them.

Kept free of Ansible so it can be unit-tested; the pdsh_clock module is a thin wrapper.
"""
import re
import subprocess
import time

from .pdsh import pdsh_argv

_LINE = re.compile(r"^(?P<host>[^\s:]+):\s+(?P<epoch>\d+(?:\.\d+)?)\s*$")


def pdsh_command(hosts, connect_timeout):
    """pdsh over ssh, one `date` per node, nanoseconds since the epoch."""
    return pdsh_argv(hosts, "date +%s.%N", connect_timeout=connect_timeout, command_timeout=connect_timeout + 20)


def parse_dates(stdout):
    """{host: epoch seconds} from pdsh's `host: 1700000000.123` lines; other lines are ignored."""
    dates = {}
    for line in stdout.splitlines():
        m = _LINE.match(line.strip())
        if m:
            dates[m.group("host")] = float(m.group("epoch"))
    return dates


def clock_report(hosts, dates, started, finished):
    """Offsets of each node's clock from the caller's, and the skew between the nodes.

    Each remote `date` ran somewhere between `started` and `finished` on the caller's clock, so an
    offset is known to within half that window; the skew between two nodes to within all of it.
    """
    middle = (started + finished) / 2.0
    offsets = {h: dates[h] - middle for h in hosts if h in dates}
    skew = (max(offsets.values()) - min(offsets.values())) if offsets else 0.0
    return {
        "answered": sorted(offsets),
        "missing": [h for h in hosts if h not in dates],
        "offsets_seconds": {h: round(o, 3) for h, o in offsets.items()},
        "skew_seconds": round(skew, 3),
        "uncertainty_seconds": round(finished - started, 3),
    }


def check_clocks(hosts, connect_timeout=10, run=subprocess.run):
    cmd = pdsh_command(hosts, connect_timeout)
    started = time.time()
    proc = run(cmd, capture_output=True, text=True)
    finished = time.time()
    report = clock_report(hosts, parse_dates(proc.stdout), started, finished)
    report.update(cmd=cmd, rc=proc.returncode, stderr=proc.stderr)
    return report
