"""ssh-audit (the pinned one in .venv) against lab nodes: the server policy from the controller, the
client policy from inside the lab (ssh-audit listening on one node, another node's ssh connecting
to it with its cluster client settings)."""
import json
import subprocess
import time

import yaml
from lab import ROOT, VENV_BIN

SSH_AUDIT = VENV_BIN / "ssh-audit"
CLIENT_AUDIT_PORT = 2222


def policy(role, release="Debian_12"):
    """The ssh-audit policy a release's vars file names (the lab's nodes run Debian 12)."""
    data = yaml.safe_load((ROOT / "roles" / role / "vars" / f"{release}.yml").read_text())
    return data[f"{role}_os"]["policy"]


def server_audit(address, policy_name):
    """ssh-audit's verdict on the sshd at `address`: {'passed': bool, 'errors': [...]}."""
    proc = subprocess.run([str(SSH_AUDIT), "-j", "-P", policy_name, str(address)], capture_output=True, text=True,
                          timeout=120)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise AssertionError(f"ssh-audit {address}: rc={proc.returncode} {proc.stdout}{proc.stderr}") from err


def client_audit(lab, server, client, policy_name, user=None):
    """ssh-audit's verdict on `client`'s ssh as it connects to `server` (a cluster host, so the
    cluster's client settings apply): ssh-audit listens on the server node for one connection."""
    out = f"/tmp/dsmesh-client-audit-{client}.json"
    lab.exec(server, f"rm -f {out}; setsid timeout 60 {SSH_AUDIT} -c -p {CLIENT_AUDIT_PORT} -t 30 -j "
                     f"-P '{policy_name}' >{out} 2>&1 </dev/null & "
                     f"for i in $(seq 100); do ss -ltn | grep -q ':{CLIENT_AUDIT_PORT} ' && exit 0; sleep 0.1; done; exit 1")
    # The connection ends once ssh-audit has the client's offer: the login itself fails.
    lab.exec(client, f"ssh -p {CLIENT_AUDIT_PORT} -o ConnectTimeout=10 {server} true", check=False, user=user)
    deadline = time.time() + 30
    while time.time() < deadline:
        text = lab.exec(server, f"cat {out} 2>/dev/null || true").stdout.strip()
        if text.endswith("}"):
            return json.loads(text)
        time.sleep(0.5)
    raise AssertionError(f"no client audit of {client} on {server}: {lab.exec(server, f'cat {out}', check=False).stdout}")


def mismatches(verdict):
    """{field: (actual, expected_required)} of an ssh-audit verdict's errors."""
    return {e["mismatched_field"]: (e["actual"], e["expected_required"]) for e in verdict.get("errors") or []}
