"""The ssh roles' hardened crypto settings: every release's vars/<OS>.yml against ssh-audit's own
built-in policies and hardening guides (the ssh-audit pinned in requirements.txt), and the filters
that turn them into a node's settings, authorized_keys lines and key-login arguments
(plugins/filter/openssh.py)."""
import re
from pathlib import Path

import pytest
import yaml
from ssh_audit.builtin_policies import BUILTIN_POLICIES
from ssh_audit.hardening_guides import Hardening_Guides

from ansible_collections.dsmesh.cluster.plugins.filter.openssh import (
    controller_key_logins,
    crypto_by_node,
    from_restricted_keys,
    key_login_args,
    login_offers,
    mesh_key_logins,
    openssh_crypto,
    release_name,
    release_settings,
    sshd_t_lines,
)

ROOT = Path(__file__).resolve().parents[2]
# Names a server or client adds to its key exchange list by itself; sshd_config never lists them.
PSEUDO_KEX = {"kex-strict-s-v00@openssh.com", "kex-strict-c-v00@openssh.com", "ext-info-s", "ext-info-c"}
# What the ssh_keys role's host keys offer, in the order of the HostKey files (an RSA key signs
# with rsa-sha2-512 and rsa-sha2-256).
OFFERED = {"/etc/ssh/ssh_host_ed25519_key": ["ssh-ed25519"], "/etc/ssh/ssh_host_rsa_key": ["rsa-sha2-512", "rsa-sha2-256"]}
RELEASES = ["Debian_12", "Debian_13", "Ubuntu_22", "Ubuntu_24"]


def os_vars(role, release):
    data = yaml.safe_load((ROOT / "roles" / role / "vars" / f"{release}.yml").read_text())
    return data[f"{role}_os"]


def guide_settings(name):
    """The sshd_config/ssh_config lines ssh-audit's hardening guide NAME ("Debian 12 Server (version 3)")
    writes, as {directive: value}."""
    m = re.fullmatch(r"(.+) (Server|Client) \(version (\d+)\)", name)
    os_name, kind, version = m.group(1), m.group(2), int(m.group(3))
    guides = [g for g in Hardening_Guides.HARDENING_GUIDES[os_name]
              if g["server_guide"] == (kind == "Server") and g["version"] == version]
    assert len(guides) == 1, f"ssh-audit has no hardening guide {name!r}"
    text = "\n".join(c["command"] for c in guides[0]["commands"]).replace("\\n", "\n")
    settings = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z][A-Za-z]+)\s+(\S+)\s*$", line.split('"')[0])
        if m:
            settings[m.group(1)] = m.group(2)
    return settings


def test_every_release_has_both_sides():
    for role in ("sshd_lockdown", "ssh_mesh"):
        files = sorted(p.stem for p in (ROOT / "roles" / role / "vars").glob("*.yml") if p.stem != "main")
        assert files == sorted(RELEASES + ["default"]), role


@pytest.mark.parametrize("release", RELEASES)
def test_sshd_settings_are_ssh_audits_server_policy(release):
    os_settings = os_vars("sshd_lockdown", release)
    policy = BUILTIN_POLICIES[os_settings["policy"]]
    assert policy["server_policy"]
    settings = os_settings["settings"]
    # What a scan compares exactly: the lists sshd offers, in order.
    assert settings["KexAlgorithms"] == [k for k in policy["kex"] if k not in PSEUDO_KEX]
    assert settings["Ciphers"] == policy["ciphers"]
    assert settings["MACs"] == policy["macs"]
    offered = [alg for path in settings["HostKey"] for alg in OFFERED[path]]
    assert offered == policy["host_keys"]
    assert set(offered) <= set(settings["HostKeyAlgorithms"])
    assert os_settings["strict_kex"] == ("kex-strict-s-v00@openssh.com" in policy["kex"])
    gex = "diffie-hellman-group-exchange-sha256"
    assert os_settings["moduli_min_bits"] == (policy["dh_modulus_sizes"][gex] if gex in policy["kex"] else 0)
    # The RSA host key the ssh_keys role makes has the size the policy checks.
    rsa_bits = yaml.safe_load((ROOT / "roles/ssh_keys/defaults/main.yml").read_text())["ssh_keys_host_rsa_bits"]
    assert policy["hostkey_sizes"]["rsa-sha2-512"]["hostkey_size"] == rsa_bits


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("role", ["sshd_lockdown", "ssh_mesh"])
def test_settings_a_scan_cannot_see_are_ssh_audits_hardening_guide(role, release):
    os_settings = os_vars(role, release)
    guide = guide_settings(os_settings["guide"])
    settings = os_settings["settings"]
    for name in ("HostKeyAlgorithms", "PubkeyAcceptedAlgorithms", "CASignatureAlgorithms", "HostbasedAcceptedAlgorithms",
                 "Ciphers", "MACs"):
        assert ",".join(settings[name]) == guide[name], name
    # The guide adds Debian's GSSAPI key exchange prefixes (only offered with GSSAPIKeyExchange on).
    assert settings["KexAlgorithms"] == [k for k in guide["KexAlgorithms"].split(",") if not k.startswith("gss-")]
    assert str(settings.get("RequiredRSASize", "absent")) == guide.get("RequiredRSASize", "absent")


@pytest.mark.parametrize("release", RELEASES)
def test_ssh_client_settings_are_ssh_audits_client_policy(release):
    os_settings = os_vars("ssh_mesh", release)
    policy = BUILTIN_POLICIES[os_settings["policy"]]
    assert not policy["server_policy"]
    settings = os_settings["settings"]
    assert settings["KexAlgorithms"] == [k for k in policy["kex"] if k not in PSEUDO_KEX]
    assert settings["Ciphers"] == policy["ciphers"]
    assert settings["MACs"] == policy["macs"]
    assert settings["HostKeyAlgorithms"] == policy["host_keys"]
    assert os_settings["strict_kex"] == ("kex-strict-c-v00@openssh.com" in policy["kex"])


def debian12_node(**changes):
    """ssh_keys' facts of a Debian 12 node (OpenSSH 9.2p1-2+deb12u10, as the lab's nodes report)."""
    sig = ["ssh-ed25519", "ssh-ed25519-cert-v01@openssh.com", "sk-ssh-ed25519@openssh.com",
           "sk-ssh-ed25519-cert-v01@openssh.com", "ecdsa-sha2-nistp256", "ssh-rsa", "rsa-sha2-256",
           "rsa-sha2-256-cert-v01@openssh.com", "rsa-sha2-512", "rsa-sha2-512-cert-v01@openssh.com"]
    host = {
        "openssh": {
            "kex": ["diffie-hellman-group14-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
                    "diffie-hellman-group-exchange-sha256", "ecdh-sha2-nistp256", "curve25519-sha256",
                    "curve25519-sha256@libssh.org", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com"],
            "ciphers": ["aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                        "chacha20-poly1305@openssh.com"],
            "macs": ["hmac-sha1", "hmac-sha2-256", "hmac-sha2-512", "umac-128-etm@openssh.com",
                     "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"],
            "key_algorithms": sig,
            "strict_kex": {"server": True, "client": True},
        },
        "host_key_files": ["/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"],
    }
    host["openssh"].update(changes)
    return host


def test_a_node_that_knows_every_algorithm_gets_the_policy_in_order():
    crypto = openssh_crypto(os_vars("sshd_lockdown", "Debian_12"), debian12_node(), "server")
    assert crypto["missing"] == [] and crypto["policy"] == "Hardened Debian 12 (version 3)"
    names = [name for name, _ in crypto["settings"]]
    assert names[:2] == ["HostKey", "HostKey"] and "KexAlgorithms" in names and names[-1] == "RequiredRSASize"
    settings = dict(crypto["settings"][2:])
    assert settings["MACs"] == "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,umac-128-etm@openssh.com"
    assert "ssh-rsa" not in settings["HostKeyAlgorithms"].split(",")


def test_legacy_ssh_rsa_adds_exactly_ssh_rsa_host_keys_and_signatures():
    plain = dict(openssh_crypto(os_vars("ssh_mesh", "Debian_12"), debian12_node(), "client")["settings"])
    legacy = dict(openssh_crypto(os_vars("ssh_mesh", "Debian_12"), debian12_node(), "client", legacy_ssh_rsa=True)["settings"])
    changed = {name for name in plain if plain[name] != legacy[name]}
    assert changed == {"HostKeyAlgorithms", "PubkeyAcceptedAlgorithms"}
    for name in changed:
        assert legacy[name] == plain[name] + ",ssh-rsa"


def test_a_node_whose_openssh_lacks_an_algorithm_keeps_its_settings_and_says_which():
    node = debian12_node(kex=["curve25519-sha256", "curve25519-sha256@libssh.org"])
    crypto = openssh_crypto(os_vars("sshd_lockdown", "Debian_12"), node, "server")
    assert crypto["settings"] == []
    assert crypto["missing"] == ["KexAlgorithms sntrup761x25519-sha512,sntrup761x25519-sha512@openssh.com,"
                                 "diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
                                 "diffie-hellman-group-exchange-sha256"]


def test_no_strict_kex_no_policy_no_host_key():
    assert "strict key exchange" in openssh_crypto(os_vars("sshd_lockdown", "Debian_12"),
                                                   debian12_node(strict_kex={"server": False, "client": True}),
                                                   "server")["missing"][0]
    no_rsa = debian12_node()
    no_rsa["host_key_files"] = ["/etc/ssh/ssh_host_ed25519_key"]
    assert openssh_crypto(os_vars("sshd_lockdown", "Debian_12"), no_rsa)["missing"] == [
        "HostKey /etc/ssh/ssh_host_rsa_key (no such key)"]
    default = yaml.safe_load((ROOT / "roles/sshd_lockdown/vars/default.yml").read_text())["sshd_lockdown_os"]
    assert openssh_crypto(default, debian12_node()) == {
        "policy": None, "settings": [], "missing": ["no hardened policy for this release (no vars file)"]}
    with pytest.raises(ValueError, match="side must be"):
        openssh_crypto(default, {}, "both")


def test_sshd_t_lines_use_sshds_own_spelling():
    assert sshd_t_lines([["PermitRootLogin", "prohibit-password"], ["MaxAuthTries", 3], ["HostKey", "/k"]]) == [
        "permitrootlogin without-password", "maxauthtries 3", "hostkey /k"]


def test_restricted_keys_carry_from_and_bad_addresses_are_refused():
    keys = ["ssh-ed25519 AAAA root@n1 dsmesh", "  ", "ssh-ed25519 BBBB   root@n2 dsmesh"]
    assert from_restricted_keys(keys, ["10.0.0.1", "10.0.0.2", "10.0.0.1", "::1"]) == [
        'from="10.0.0.1,10.0.0.2,::1" ssh-ed25519 AAAA root@n1 dsmesh',
        'from="10.0.0.1,10.0.0.2,::1" ssh-ed25519 BBBB root@n2 dsmesh']
    assert from_restricted_keys(keys[:1], []) == keys[:1]
    with pytest.raises(ValueError, match="'10.0.0.1,10.0.0.2'"):
        from_restricted_keys(keys, ["10.0.0.1,10.0.0.2"])


def test_key_login_arguments_for_the_controller_and_the_mesh():
    crypto = {"n1": {"settings": [["HostKey", "/k"], ["KexAlgorithms", "a,b"], ["RequiredRSASize", "3072"],
                                  ["MACs", "m"]]},
              "n2": {"settings": [], "missing": ["x"]}}
    assert login_offers(crypto["n1"]) == {"KexAlgorithms": ["a", "b"], "MACs": ["m"]}
    hosts = [{"inventory_hostname": "n1", "ansible_host": "10.0.0.1", "ansible_ssh_private_key_file": "/key",
              "ansible_ssh_common_args": "-o UserKnownHostsFile='/state dir/kh'"},
             {"inventory_hostname": "n2", "ansible_host": "10.0.0.2", "ansible_port": 2222, "ansible_user": "admin"}]
    assert key_login_args(controller_key_logins(hosts, "root", crypto)) == [
        "--", "n1", "--server-offer", "KexAlgorithms=a,b", "--server-offer", "MACs=m",
        "-o", "UserKnownHostsFile=/state dir/kh", "-i", "/key", "-p", "22", "root@10.0.0.1",
        "--", "n2", "-p", "2222", "admin@10.0.0.2"]
    assert key_login_args(mesh_key_logins(["node2"], ["n1", "n2"], ["node1", "node2"], crypto)) == ["--", "node2", "node2"]
    with pytest.raises(ValueError, match="none of the cluster's addresses"):
        mesh_key_logins(["node9"], ["n1"], ["node1"], crypto)


def test_each_node_gets_its_releases_settings_or_the_one_it_asks_for():
    paths = sorted(str(p) for p in (ROOT / "roles/sshd_lockdown/vars").glob("*.yml"))
    by_release = release_settings(paths, "sshd_lockdown_os")
    assert set(by_release) == set(RELEASES) | {"default"}
    debian = {"distribution": "Debian", "distribution_major_version": "12"}
    assert release_name(debian) == "Debian_12" and release_name(None) == "_"
    hosts = [{"inventory_hostname": "n1", "ansible_facts": debian, "ssh_keys_host": debian12_node()},
             {"inventory_hostname": "n2", "ansible_facts": {"distribution": "Rocky", "distribution_major_version": "9"},
              "ssh_keys_host": debian12_node()},
             {"inventory_hostname": "n3", "ansible_facts": debian, "ssh_keys_host": debian12_node(),
              "sshd_lockdown_crypto_policy": "Debian_13"},
             {"inventory_hostname": "n4", "ansible_facts": debian, "sshd_lockdown_crypto_policy": "none"}]
    crypto = crypto_by_node(hosts, by_release, "sshd_lockdown_crypto_policy", "auto", "server")
    assert crypto["n1"]["policy"] == "Hardened Debian 12 (version 3)" and crypto["n1"]["settings"]
    assert crypto["n2"]["missing"] == ["no hardened policy for this release (no vars file)"]
    assert crypto["n3"]["missing"][0].startswith("KexAlgorithms mlkem768x25519-sha256")
    assert crypto["n4"] == {"policy": None, "settings": [], "missing": []}
    with pytest.raises(ValueError, match="n1: sshd_lockdown_crypto_policy is 'Debian_11'; it takes auto, none or one of"):
        crypto_by_node([{**hosts[0], "sshd_lockdown_crypto_policy": "Debian_11"}], by_release,
                       "sshd_lockdown_crypto_policy", "auto", "server")
