"""pdsh as the project runs it (standard library only): its command line, and the parsers of what it
prints. The preflight, the clock check, the job control and dsmesh.supervise all go through here."""

import re

# pdsh's own report of a node whose ssh session ended badly, e.g.
# "pdsh@node1: node2: ssh exited with exit code 255" (255: the connection was lost).
NODE_EXIT = re.compile(r"pdsh@\S+: (?P<node>[^\s:]+): ssh exited with exit code (?P<code>\d+)")
SSH_LOST = "255"
# DeepSpeed's per-node launcher on a rank that died: "node2: ... exits with return code = -9"
_RANK_EXIT = re.compile(r"^(?P<node>[^\s:@]+): .*exits with return code = (?P<code>-?\d+)")
_TRACEBACK = re.compile(r"^(?P<node>[^\s:@]+): Traceback")
_OUTPUT_LINE = re.compile(r"^(?P<node>[^\s:@]+): (?P<text>.*)$")


def pdsh_argv(hosts, command, connect_timeout=10, command_timeout=None):
    """pdsh over ssh to `hosts`: -t bounds each connection, -u the command (None: no bound)."""
    argv = ["pdsh", "-R", "ssh", "-t", str(connect_timeout)]
    if command_timeout is not None:
        argv += ["-u", str(command_timeout)]
    return argv + ["-w", ",".join(hosts), command]


def node_lines(stdout):
    """{node: [its lines]} from pdsh's `node: text` output, in the order printed."""
    out = {}
    for line in stdout.splitlines():
        m = _OUTPUT_LINE.match(line)
        if m:
            out.setdefault(m.group("node"), []).append(m.group("text"))
    return out


def node_exit(line):
    """(node, exit code as text) when `line` is pdsh reporting a node's ssh session ending badly."""
    m = NODE_EXIT.search(line)
    return (m.group("node"), m.group("code")) if m else None


def node_errors(stderr, nodes):
    """{node: pdsh's words about it} from pdsh's stderr (`pdsh@m: node: ssh: connect ... refused`)."""
    errors = {}
    for line in stderr.splitlines():
        for node in nodes:
            if f": {node}: " in line and node not in errors:
                errors[node] = line.split(f": {node}: ", 1)[1].strip()
    return errors


def failed_nodes(log_text):
    """Nodes the launcher's log blames, the likeliest cause first.

    When one rank dies, its peers fail too a moment later (their collectives lose it), so order of
    appearance is not enough: a node whose ssh session was lost (exit 255) comes first, then a node
    whose rank was killed by a signal (return code < 0), then the others in the order seen."""
    lost, killed, others = [], [], []
    for line in log_text.splitlines():
        ended = node_exit(line)
        if ended:
            (lost if ended[1] == SSH_LOST else others).append(ended[0])
            continue
        m = _RANK_EXIT.search(line)
        if m and m.group("code") != "0":
            (killed if m.group("code").startswith("-") else others).append(m.group("node"))
            continue
        m = _TRACEBACK.search(line)
        if m:
            others.append(m.group("node"))
    return list(dict.fromkeys(lost + killed + others))
