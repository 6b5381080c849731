"""site.yml's ssh and pdsh part against a fresh 3-node container lab with real sshd.

Order matters: the bad-input runs come first and must leave the fresh nodes untouched; then the
real run builds the mesh, and the later tests inspect it from inside the nodes.
"""
import copy
import subprocess

import pytest
from hardening import client_audit, mismatches, policy, server_audit
from lab import ROOT, Lab, recap

pytestmark = pytest.mark.lab

FOREIGN_KEY = None
FOREIGN_KEY_DIR = None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    global FOREIGN_KEY, FOREIGN_KEY_DIR
    lab = Lab("dstest", 3).up(fresh=True)
    # A key the project did not add: it must survive every run.
    keydir = FOREIGN_KEY_DIR = tmp_path_factory.mktemp("foreign")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "someone@elsewhere",
                    "-f", str(keydir / "key")], check=True)
    FOREIGN_KEY = (keydir / "key.pub").read_text().strip()
    for node in lab.names():
        lab.exec(node, f"mkdir -p -m 700 /root/.ssh && echo '{FOREIGN_KEY}' >> /root/.ssh/authorized_keys")
    yield lab
    lab.down()


def _no_master(inv):
    del inv["all"]["children"]["master"]


def _two_masters(inv):
    nodes = list(inv["all"]["children"]["cluster"]["hosts"])
    inv["all"]["children"]["master"]["hosts"] = {nodes[0]: None, nodes[1]: None}


def _master_outside_cluster(inv):
    inv["all"]["children"]["master"]["hosts"] = {"outsider": {"ansible_host": "127.0.0.1"}}


def _shared_address(inv):
    hosts = inv["all"]["children"]["cluster"]["hosts"]
    first, second = list(hosts)[:2]
    hosts[second]["ansible_host"] = hosts[first]["ansible_host"]


def _unreachable_node(inv):
    # Loopback with a closed port: a node that is down, without leaving this machine.
    inv["all"]["children"]["cluster"]["hosts"]["dstest-node4"] = {
        "ansible_host": "127.0.0.1", "ansible_port": 1, "cluster_address": "dstest-node4", "gpus": 1}


def _wrong_password(inv):
    inv["all"]["vars"]["ansible_password"] = "not-the-password"


BAD_INPUTS = [
    (_no_master, ["group 'master' must hold exactly one host, it holds 0"]),
    (_two_masters, ["group 'master' must hold exactly one host, it holds 2: dstest-node1, dstest-node2"]),
    (_master_outside_cluster, ["master host 'outsider' is not in group 'cluster'"]),
    (_shared_address, ["hosts dstest-node1 and dstest-node2", "share the ansible_host address"]),
    (_unreachable_node, ["dstest-node4 (127.0.0.1)", "check that the node is up", "Nothing was changed on any node"]),
    (_wrong_password, ["dstest-node1", "check the password for root", "Nothing was changed on any node"]),
]


@pytest.mark.parametrize("mutate,messages", BAD_INPUTS, ids=[f.__name__.lstrip("_") for f, _ in BAD_INPUTS])
def test_bad_input_stops_before_any_change(lab, tmp_path, mutate, messages):
    inv = copy.deepcopy(lab.load_inventory())
    mutate(inv)
    # Own ssh control sockets: a master connection left by an earlier run would log in for it.
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", inventory=lab.write_inventory(inv, tmp_path / "hosts.yml"),
                        env={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")})
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, proc.stdout[-3000:]
    for message in messages:
        assert message in out, f"expected {message!r} in:\n{proc.stdout[-4000:]}"
    assert all(r["changed"] == 0 for r in recap(proc.stdout).values()), proc.stdout[-3000:]


def test_bad_inputs_left_the_nodes_untouched(lab):
    for node in lab.names():
        lab.exec(node, "test ! -e /root/.ssh/id_ed25519 && test ! -e /etc/ssh/sshd_config.d/00-dsmesh.conf "
                       "&& sshd -T | grep -qx 'passwordauthentication yes'")


def test_first_run_builds_the_mesh_with_the_password(lab):
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", check=True)
    counts = recap(proc.stdout)
    assert set(counts) == set(lab.names())
    assert all(r["changed"] > 0 and r["failed"] == 0 for r in counts.values())
    assert "clock skew between nodes" in proc.stdout


def test_second_run_changes_nothing(lab):
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", check=True)
    counts = recap(proc.stdout)
    assert counts and all(r["changed"] == 0 and r["failed"] == 0 for r in counts.values()), proc.stdout[-3000:]


def test_every_node_reaches_every_node_by_name_and_address(lab):
    hosts = lab.hosts()
    for node in hosts:
        for target, vars_ in hosts.items():
            for address in (target, vars_["ansible_host"]):
                out = lab.exec(node, "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "
                                     f"-o PasswordAuthentication=no {address} hostname").stdout.strip()
                assert out == target, f"{node} -> {address} answered {out!r}"


def test_sshd_takes_keys_only_and_refuses_passwords(lab):
    for node, vars_ in lab.hosts().items():
        effective = lab.exec(node, "sshd -T").stdout.splitlines()
        assert "passwordauthentication no" in effective
        assert "permitrootlogin without-password" in effective
        base = ["-o", f"UserKnownHostsFile={lab.state / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=10"]
        refused = subprocess.run(["sshpass", "-p", lab.password(), "ssh", *base, "-o", "PubkeyAuthentication=no",
                                  f"root@{vars_['ansible_host']}", "true"], capture_output=True, text=True)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr
        by_key = subprocess.run(["ssh", *base, "-o", "BatchMode=yes", "-i", str(lab.state / "controller_ed25519"),
                                 f"root@{vars_['ansible_host']}", "hostname"], capture_output=True, text=True)
        assert by_key.returncode == 0 and by_key.stdout.strip() == node, by_key.stderr


def test_keys_the_project_did_not_add_are_kept(lab):
    for node in lab.names():
        keys = lab.exec(node, "cat /root/.ssh/authorized_keys").stdout
        assert FOREIGN_KEY in keys
        # every node's key and the controller's, once each
        assert sum(line.endswith(" dsmesh") for line in keys.splitlines()) == len(lab.names())
        assert keys.count("dsmesh-lab-controller") == 1


def test_pdsh_from_the_master_reaches_every_node(lab):
    master = next(iter(lab.load_inventory()["all"]["children"]["master"]["hosts"]))
    out = lab.exec(master, "pdsh -a hostname").stdout
    answered = sorted(line.split(":", 1)[0] for line in out.splitlines())
    assert answered == sorted(lab.names())


def test_every_node_passes_ssh_audits_hardened_policy(lab):
    for node, vars_ in lab.hosts().items():
        verdict = server_audit(vars_["ansible_host"], policy("sshd_lockdown"))
        assert verdict["passed"], f"{node}: {mismatches(verdict)}"


def test_every_nodes_ssh_client_passes_ssh_audits_client_policy(lab):
    nodes = lab.names()
    for client, server in zip(nodes, nodes[1:] + nodes[:1]):
        verdict = client_audit(lab, server, client, policy("ssh_mesh"))
        assert verdict["passed"], f"{client} -> {server}: {mismatches(verdict)}"


def test_sshd_turns_off_what_a_training_cluster_does_not_use(lab):
    for node in lab.names():
        effective = set(lab.exec(node, "sshd -T").stdout.splitlines())
        assert {"x11forwarding no", "allowagentforwarding no", "allowtcpforwarding no", "logingracetime 30",
                "maxauthtries 3"} <= effective, node
        assert lab.exec(node, "ssh-keygen -l -f /etc/ssh/ssh_host_rsa_key.pub").stdout.split()[0] == "4096"
        # SHA-1 RSA signatures (ssh-rsa) are refused until ssh_mesh_legacy_ssh_rsa asks for them.
        sha1 = lab.exec(node, f"ssh -o HostKeyAlgorithms=ssh-rsa {node} true", check=False)
        assert sha1.returncode != 0 and "no matching host key type" in sha1.stderr, sha1.stderr
        # The group-exchange moduli left are all of 3072 bits or more.
        sizes = {int(line.split()[4]) + 1 for line in lab.exec(node, "grep -v '^#' /etc/ssh/moduli").stdout.splitlines()}
        assert sizes and min(sizes) >= 3072, (node, sorted(sizes))


@pytest.fixture(scope="module")
def outsider(lab):
    """A container on the lab's network that is not in the inventory (same image, no sshd needed)."""
    name = f"{lab.prefix}-outsider"
    image = subprocess.run(["bash", str(ROOT / "scripts" / "lab.sh"), "image-name"], env=lab.env,
                           capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["podman", "rm", "-f", name], env=lab.env, capture_output=True)
    subprocess.run(["podman", "run", "-d", "--name", name, "--network", lab.prefix, image, "sleep", "infinity"],
                   env=lab.env, check=True, capture_output=True)
    # A container joining the network makes podman's DNS reload: names fail to resolve for a moment.
    first, second = lab.names()[:2]
    lab.exec(first, f"for i in $(seq 100); do getent hosts {second} >/dev/null && exit 0; sleep 0.1; done; exit 1")
    yield name
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=lab.env, capture_output=True)


def test_a_node_key_is_refused_from_outside_the_cluster(lab, outsider):
    first, second = lab.names()[:2]
    # The outsider holds node1's private key, the cluster's known_hosts and the foreign key.
    for path in ("/root/.ssh/id_ed25519", "/etc/ssh/ssh_known_hosts"):
        content = lab.exec(first, f"cat {path}").stdout
        lab.exec(outsider, f"mkdir -p -m 700 /root/.ssh && umask 077 && cat > /tmp/{path.rsplit('/', 1)[1]}", stdin=content)
    lab.exec(outsider, "cat > /tmp/foreign", stdin=(FOREIGN_KEY_DIR / "key").read_text())
    lab.exec(outsider, "chmod 600 /tmp/foreign /tmp/id_ed25519")
    ssh = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/tmp/ssh_known_hosts -o IdentitiesOnly=yes"
    address = lab.hosts()[second]["ansible_host"]
    stolen = lab.exec(outsider, f"{ssh} -i /tmp/id_ed25519 root@{address} hostname", check=False)
    assert stolen.returncode != 0 and "Permission denied (publickey)" in stolen.stderr, stolen.stderr
    # The same key from inside the cluster, and a key without from= from the outsider, log in.
    assert lab.exec(first, f"ssh -o BatchMode=yes root@{second} hostname").stdout.strip() == second
    unrestricted = lab.exec(outsider, f"{ssh} -i /tmp/foreign root@{address} hostname", check=False)
    assert unrestricted.returncode == 0 and unrestricted.stdout.strip() == second, unrestricted.stderr


def test_legacy_ssh_rsa_relaxes_exactly_ssh_rsa(lab):
    proc = lab.playbook("site.yml", "--tags", "ssh", "-e", "ssh_mesh_legacy_ssh_rsa=true", check=True)
    assert "ssh_mesh_legacy_ssh_rsa is on" in proc.stdout
    expected = ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]
    nodes = lab.names()
    for node, vars_ in lab.hosts().items():
        verdict = server_audit(vars_["ansible_host"], policy("sshd_lockdown"))
        assert mismatches(verdict) == {"Host keys": (expected + ["ssh-rsa"], expected)}, node
    client, server = nodes[0], nodes[1]
    verdict = client_audit(lab, server, client, policy("ssh_mesh"))
    (actual, wanted), = [v for k, v in mismatches(verdict).items() if k == "Host keys"]
    assert list(mismatches(verdict)) == ["Host keys"] and actual == wanted + ["ssh-rsa"], mismatches(verdict)
    # What an sshd older than OpenSSH 7.2 can do, an ssh-rsa (SHA-1) host key signature, now works.
    assert lab.exec(client, f"ssh -o HostKeyAlgorithms=ssh-rsa {server} hostname").stdout.strip() == server
    again = lab.playbook("site.yml", "--tags", "ssh", "-e", "ssh_mesh_legacy_ssh_rsa=true", check=True)
    assert all(r["changed"] == 0 for r in recap(again.stdout).values()), again.stdout[-3000:]


def test_a_node_whose_openssh_cannot_meet_its_policy_keeps_its_settings_and_is_named(lab, tmp_path):
    inv = copy.deepcopy(lab.load_inventory())
    last = lab.names()[-1]
    # Debian 13's policy wants mlkem768x25519-sha256, which OpenSSH 9.2 does not have.
    inv["all"]["children"]["cluster"]["hosts"][last].update(
        {"sshd_lockdown_crypto_policy": "Debian_13", "ssh_mesh_crypto_policy": "Debian_13"})
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", inventory=lab.write_inventory(inv, tmp_path / "hosts.yml"),
                        check=True)
    out = " ".join(proc.stdout.split())
    assert f"WARNING: sshd on {last} keeps its own key exchanges" in out
    assert f"{last}: KexAlgorithms mlkem768x25519-sha256" in out
    assert f"WARNING: the ssh client of {last} keeps its default key exchanges" in out
    dropin = lab.exec(last, "cat /etc/ssh/sshd_config.d/00-dsmesh.conf").stdout
    lines = dropin.splitlines()
    assert not [line for line in lines if line.startswith("KexAlgorithms")] and "PasswordAuthentication no" in lines
    assert "ecdh-sha2-nistp256" in lab.exec(last, "sshd -T | grep ^kexalgorithms").stdout
    # The other nodes keep the hardened policy, and the mesh and pdsh still work.
    for node in lab.names()[:-1]:
        assert server_audit(lab.hosts()[node]["ansible_host"], policy("sshd_lockdown"))["passed"], node
    master = next(iter(lab.load_inventory()["all"]["children"]["master"]["hosts"]))
    assert sorted(line.split(":", 1)[0] for line in lab.exec(master, "pdsh -a hostname").stdout.splitlines()) == sorted(lab.names())
