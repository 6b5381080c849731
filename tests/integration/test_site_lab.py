"""site.yml's ssh and pdsh part against a fresh 3-node container lab with real sshd.

Order matters: the bad-input runs come first and must leave the fresh nodes untouched; then the
real run builds the mesh, and the later tests inspect it from inside the nodes.
"""
import copy
import subprocess

import pytest

from lab import Lab, recap

pytestmark = pytest.mark.lab

FOREIGN_KEY = None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    global FOREIGN_KEY
    lab = Lab("dstest", 3).up(fresh=True)
    # A key the project did not add: it must survive every run.
    keydir = tmp_path_factory.mktemp("foreign")
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
