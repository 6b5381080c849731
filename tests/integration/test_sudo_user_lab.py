"""site.yml's ssh and pdsh part on nodes reached as a sudo user, the usual Ubuntu server: root may not
log in over ssh, the cluster user `dsadmin` logs in with its password and becomes root with sudo
(a fresh 2-node lab, LAB_SUDO_USER). The mesh, pdsh and the hardened sshd are the cluster user's;
root login stays off."""
import subprocess

import pytest
from hardening import mismatches, policy, server_audit
from lab import Lab, recap

pytestmark = pytest.mark.lab

USER = "dsadmin"


@pytest.fixture(scope="module")
def lab():
    lab = Lab("dssudo", 2, sudo_user=USER).up(fresh=True)
    yield lab
    lab.down()


def ssh_from_controller(lab, address, *options, user=USER):
    base = ["-o", f"UserKnownHostsFile={lab.state / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10"]
    return subprocess.run(["ssh", *base, *options, f"{user}@{address}", "hostname"], capture_output=True, text=True)


def password_login(lab, address, user):
    return subprocess.run(["sshpass", "-p", lab.password(), "ssh", "-o", f"UserKnownHostsFile={lab.state / 'known_hosts'}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "PubkeyAuthentication=no", "-o", "ConnectTimeout=10",
                           f"{user}@{address}", "true"], capture_output=True, text=True)


def test_the_fresh_nodes_refuse_root_and_take_the_sudo_users_password(lab):
    for vars_ in lab.hosts().values():
        assert password_login(lab, vars_["ansible_host"], USER).returncode == 0
        root = password_login(lab, vars_["ansible_host"], "root")
        assert root.returncode != 0 and "Permission denied" in root.stderr, root.stderr


def test_first_run_builds_the_mesh_as_the_sudo_user(lab):
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", check=True)
    counts = recap(proc.stdout)
    assert set(counts) == set(lab.names()) and all(r["failed"] == 0 and r["changed"] > 0 for r in counts.values())


def test_second_run_changes_nothing(lab):
    proc = lab.playbook("site.yml", "--tags", "ssh,pdsh", check=True)
    counts = recap(proc.stdout)
    assert counts and all(r["changed"] == 0 and r["failed"] == 0 for r in counts.values()), proc.stdout[-3000:]


def test_the_cluster_user_reaches_every_node_and_pdsh_runs_as_it(lab):
    nodes = lab.names()
    for node in nodes:
        assert lab.exec(node, f"test -s /home/{USER}/.ssh/id_ed25519 && test ! -e /root/.ssh/id_ed25519")
        for target in nodes:
            out = lab.exec(node, f"ssh {target} whoami; ssh {target} hostname", user=USER).stdout.split()
            assert out == [USER, target], (node, target, out)
    master = next(iter(lab.load_inventory()["all"]["children"]["master"]["hosts"]))
    answered = lab.exec(master, "pdsh -a whoami", user=USER).stdout.splitlines()
    assert sorted(answered) == sorted(f"{node}: {USER}" for node in nodes)


def test_root_stays_locked_out_and_passwords_are_refused(lab):
    for node, vars_ in lab.hosts().items():
        effective = set(lab.exec(node, "sshd -T").stdout.splitlines())
        assert {"permitrootlogin no", "passwordauthentication no"} <= effective, node
        by_key = ssh_from_controller(lab, vars_["ansible_host"], "-o", "BatchMode=yes", "-i",
                                     str(lab.state / "controller_ed25519"))
        assert by_key.returncode == 0 and by_key.stdout.strip() == node, by_key.stderr
        as_root = ssh_from_controller(lab, vars_["ansible_host"], "-o", "BatchMode=yes", "-i",
                                      str(lab.state / "controller_ed25519"), user="root")
        assert as_root.returncode != 0 and "Permission denied" in as_root.stderr, as_root.stderr
        refused = password_login(lab, vars_["ansible_host"], USER)
        assert refused.returncode != 0 and "Permission denied (publickey)" in refused.stderr, refused.stderr


def test_every_node_passes_ssh_audits_hardened_policy(lab):
    for node, vars_ in lab.hosts().items():
        verdict = server_audit(vars_["ansible_host"], policy("sshd_lockdown"))
        assert verdict["passed"], f"{node}: {mismatches(verdict)}"
