"""The run's log lines as `dsmesh logs` shows them, from what playbooks/logs.yml read on the nodes
(Result.logs: {host: {run_id, path, address, first_line, text}}): pure functions and the follower
that remembers, per node, the next line to read."""

MASTER_KEY = "master"


def split_lines(text, final):
    """(complete lines, count read): a last line without its newline is still being written, so it
    waits for the next read - unless the job ended (final)."""
    parts = (text or "").split("\n")
    partial = parts.pop()  # "" when the text ends with a newline
    if final and partial:
        parts.append(partial)
    return parts, len(parts)


def master_host(result):
    """The inventory name of the node whose log is the launcher's (job_status.log's path)."""
    log = (result.job_status or {}).get("log")
    for host, entry in result.logs.items():
        if log and entry.get("path") == log:
            return host
    return None


def node_names(result):
    """{name or cluster address: inventory name} for every node that logs.yml ran on."""
    names = {}
    for host, entry in result.logs.items():
        names[host] = host
        if entry.get("address"):
            names[str(entry["address"])] = host
    return names


def pdsh_node(line):
    """The node pdsh prefixed `line` with ('node: text'), else None."""
    head, sep, _ = line.partition(": ")
    return head if sep and head and " " not in head else None


def shown(host, line, master, node=None, names=None):
    """The line as printed, or None when --node leaves it out. The master's log is printed as it is
    (pdsh prefixed the ranks' lines); another node's own log gets its name in front, as pdsh does."""
    if host == master:
        if node is None:
            return line
        prefix = pdsh_node(line)
        return line if prefix is not None and (names or {}).get(prefix, prefix) == node else None
    if node is not None and host != node:
        return None
    return f"{host}: {line}"


class LogFollower:
    """Next line to read per node for one run; a new run (another run id) starts over."""

    def __init__(self):
        self.run_id = None
        self.next_line = {}

    def start_lines(self):
        return dict(self.next_line)

    def update(self, result, final=False):
        """[(host, line)] of the lines `result` read that were not returned before, the master's first."""
        run_id = (result.job_status or {}).get("run_id")
        if run_id != self.run_id:
            stale = bool(self.next_line)
            self.run_id, self.next_line = run_id, {}
            if stale:  # read from the lines the old run had reached: the next read starts at the new log's tail
                return []
        master = master_host(result)
        order = sorted(result.logs, key=lambda host: (host != master, host))
        new = []
        for host in order:
            entry = result.logs[host]
            if entry.get("run_id") not in (None, run_id):
                continue
            lines, count = split_lines(entry.get("text"), final)
            self.next_line[host] = int(entry.get("first_line") or 1) + count
            new += [(host, line) for line in lines]
        return new
