"""Filters for the ssh roles: which hardened OpenSSH settings a node gets (from its release's
policy, roles/*/vars/<OS>.yml, and what its own OpenSSH supports), authorized_keys lines that
work only from the cluster's addresses, the lines `sshd -T` must print for a drop-in, and the
arguments of the key-login check (roles/sshd_lockdown/files/key-login-check.sh).
"""
import os
import shlex

import yaml

# Settings that hold algorithm names, and the list of the node's facts (ssh_keys' host-keys.sh,
# from `ssh -Q`) that must know every one of them.
ALGORITHM_FACTS = {
    "KexAlgorithms": "kex",
    "Ciphers": "ciphers",
    "MACs": "macs",
    "HostKeyAlgorithms": "key_algorithms",
    "PubkeyAcceptedAlgorithms": "key_algorithms",
    "CASignatureAlgorithms": "key_algorithms",
    "HostbasedAcceptedAlgorithms": "key_algorithms",
}
# What ssh_mesh_legacy_ssh_rsa adds to the lists: RSA host keys and signatures with SHA-1, the
# only ones an sshd older than OpenSSH 7.2 makes.
LEGACY_SSH_RSA_SETTINGS = ("HostKeyAlgorithms", "PubkeyAcceptedAlgorithms")
LEGACY_SSH_RSA = "ssh-rsa"
# The settings a login negotiates: the key-login check restricts its login to what they allow.
LOGIN_SETTINGS = ("KexAlgorithms", "Ciphers", "MACs", "HostKeyAlgorithms", "PubkeyAcceptedAlgorithms")
# `sshd -T` prints a few values under another name than sshd_config takes.
SSHD_T_VALUES = {("permitrootlogin", "prohibit-password"): "without-password"}
# Loopback: a node reaching itself by `localhost`.
LOOPBACK = ("127.0.0.1", "::1")


def openssh_crypto(os_settings, host, side="server", legacy_ssh_rsa=False):
    """The hardened crypto settings one node gets, as a dict:

    - ``policy``: the ssh-audit policy they meet (None: the release has no vars file of its own);
    - ``settings``: ``[[name, value], ...]`` in the order they are written (values joined with
      commas; HostKey once per file); empty when the node cannot take them;
    - ``missing``: why not, naming what the node's OpenSSH lacks (empty when it takes them).

    os_settings is a vars/<OS>.yml mapping (policy, strict_kex, settings), host the node's SSH
    facts from ssh_keys (``ssh_keys_host``: the names `ssh -Q` lists, whether the binaries do the
    strict key exchange, the host key files present), side ``server`` (sshd) or ``client`` (ssh).
    """
    if side not in ("server", "client"):
        raise ValueError(f"openssh_crypto: side must be 'server' or 'client', got {side!r}")
    os_settings = os_settings or {}
    host = host or {}
    policy = os_settings.get("policy")
    if not policy:
        return {"policy": None, "settings": [], "missing": ["no hardened policy for this release (no vars file)"]}
    wanted = {name: list(value) if isinstance(value, (list, tuple)) else value
              for name, value in (os_settings.get("settings") or {}).items()}
    if legacy_ssh_rsa:
        for name in LEGACY_SSH_RSA_SETTINGS:
            if name in wanted and LEGACY_SSH_RSA not in wanted[name]:
                wanted[name] = wanted[name] + [LEGACY_SSH_RSA]
    openssh = host.get("openssh") or {}
    missing = []
    for name, values in wanted.items():
        if name in ALGORITHM_FACTS:
            known = set(openssh.get(ALGORITHM_FACTS[name]) or [])
            unknown = [v for v in values if v not in known]
            if unknown:
                missing.append(f"{name} {','.join(unknown)}")
        elif name == "HostKey":
            absent = [path for path in values if path not in (host.get("host_key_files") or [])]
            if absent:
                missing.append(f"HostKey {','.join(absent)} (no such key)")
    if os_settings.get("strict_kex") and not (openssh.get("strict_kex") or {}).get(side):
        missing.append("the strict key exchange (kex-strict, OpenSSH 9.6 or a package with the Terrapin fix)")
    if missing:
        return {"policy": policy, "settings": [], "missing": missing}
    settings = []
    for name, value in wanted.items():
        if name == "HostKey":
            settings += [[name, str(path)] for path in value]
        elif isinstance(value, list):
            settings.append([name, ",".join(str(v) for v in value)])
        else:
            settings.append([name, str(value)])
    return {"policy": policy, "settings": settings, "missing": []}


def release_name(facts):
    """The vars file name of a node's release, from its gathered facts: Debian_12, Ubuntu_22, ...
    (dev-sec's DISTRIBUTION_MAJOR); '_' without facts."""
    facts = facts or {}
    return f"{facts.get('distribution', '')}_{facts.get('distribution_major_version', '')}"


def release_settings(paths, key):
    """{release: settings} from a role's vars/<release>.yml files (vars/main.yml left out): each
    file's mapping under `key`, by the file's name without .yml."""
    settings = {}
    for path in paths or []:
        name = os.path.splitext(os.path.basename(str(path)))[0]
        if name == "main":
            continue
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if key not in data:
            raise ValueError(f"release_settings: {path} has no {key}")
        settings[name] = data[key]
    if "default" not in settings:
        raise ValueError("release_settings: no vars/default.yml among the release files")
    return settings


def crypto_by_node(hostvars_list, settings_by_release, policy_var, default_policy, side, legacy_ssh_rsa=False):
    """{node: openssh_crypto(...)} for every host (its hostvars): the release's settings as its
    policy variable (`policy_var`, else `default_policy`) chooses them: ``auto`` the node's own
    release (default.yml for a release without a file), a vars file's name that release, ``none``
    no hardened settings and nothing missing (the package's settings stay, on purpose)."""
    result = {}
    for hv in hostvars_list:
        name = str(hv.get("inventory_hostname"))
        choice = str(hv.get(policy_var) or default_policy)
        if choice == "none":
            result[name] = {"policy": None, "settings": [], "missing": []}
            continue
        release = release_name(hv.get("ansible_facts")) if choice == "auto" else choice
        if choice != "auto" and release not in settings_by_release:
            raise ValueError(f"crypto_by_node: {name}: {policy_var} is {choice!r}; it takes auto, none or one of "
                             f"{', '.join(sorted(k for k in settings_by_release if k != 'default'))}")
        os_settings = settings_by_release.get(release, settings_by_release["default"])
        result[name] = openssh_crypto(os_settings, hv.get("ssh_keys_host") or {}, side, legacy_ssh_rsa)
    return result


def sshd_t_lines(settings):
    """The lines `sshd -T` prints when sshd takes ``[[name, value], ...]``: lower-case names and
    sshd's own spelling of a few values (prohibit-password is without-password there)."""
    lines = []
    for name, value in settings:
        key = str(name).lower()
        value = str(value)
        lines.append(f"{key} {SSHD_T_VALUES.get((key, value), value)}")
    return lines


def from_restricted_keys(keys, addresses):
    """authorized_keys lines for public keys that work only from `addresses` (sshd's from="..."
    option: IP addresses, CIDR blocks or patterns; sshd matches the client's address, not its
    name, unless UseDNS is on). No addresses: the keys as they are."""
    patterns = []
    for address in addresses or []:
        address = str(address).strip()
        if not address or any(c in address for c in '" ,'):
            raise ValueError(f"from_restricted_keys: {address!r} is not an address or pattern sshd's from= takes")
        patterns.append(address)
    patterns = list(dict.fromkeys(patterns))
    lines = []
    for key in keys:
        key = " ".join(str(key).split())
        if not key:
            continue
        lines.append(f'from="{",".join(patterns)}" {key}' if patterns else key)
    return lines


def as_list(value):
    """A string as a one-item list, a list as it is, nothing as []: for variables that take
    either one address or several."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def login_offers(crypto):
    """{name: [algorithm, ...]} of the settings a login negotiates, from openssh_crypto's result
    (empty when the node keeps its own settings)."""
    offers = {}
    for name, value in (crypto or {}).get("settings") or []:
        if name in LOGIN_SETTINGS:
            offers[name] = str(value).split(",")
    return offers


def key_login_args(logins):
    """The LOGIN arguments of key-login-check.sh for a list of logins, each a dict with
    ``label``, ``ssh_args`` (ssh's arguments, the destination last) and ``offers`` (login_offers:
    what the server will allow once its new settings are in place):
    ``['--', label, '--server-offer', 'KexAlgorithms=a,b', ..., ssh_arg, ..., '--', ...]``."""
    args = []
    for login in logins:
        label = str(login["label"])
        ssh_args = [str(a) for a in login.get("ssh_args") or []]
        if not ssh_args:
            raise ValueError(f"key_login_args: login {label!r} has no destination")
        if "--" in ssh_args:
            raise ValueError(f"key_login_args: login {label!r}: ssh arguments may not contain '--'")
        args += ["--", label]
        for name, values in (login.get("offers") or {}).items():
            args += ["--server-offer", f"{name}={','.join(values)}"]
        args += ssh_args
    return args


def controller_key_logins(hostvars_list, default_user, crypto_by_node):
    """The controller's key logins to the nodes, one per host (its hostvars), as Ansible's ssh
    connection makes them: ansible_ssh_common_args, the private key, the port, user@address."""
    logins = []
    for hv in hostvars_list:
        name = str(hv.get("inventory_hostname"))
        ssh_args = shlex.split(str(hv.get("ansible_ssh_common_args") or ""))
        if hv.get("ansible_ssh_private_key_file"):
            ssh_args += ["-i", str(hv.get("ansible_ssh_private_key_file"))]
        ssh_args += ["-p", str(hv.get("ansible_port") or 22)]
        ssh_args.append(f"{hv.get('ansible_user') or default_user}@{hv.get('ansible_host') or name}")
        logins.append({"label": name, "ssh_args": ssh_args, "offers": login_offers((crypto_by_node or {}).get(name))})
    return logins


def mesh_key_logins(targets, nodes, addresses, crypto_by_node):
    """One node's key logins to `targets` (addresses, from key_login_targets): the destination is
    the address, the offers those of the node it belongs to (nodes and addresses are parallel)."""
    node_of = dict(zip([str(a) for a in addresses], nodes))
    logins = []
    for target in targets:
        target = str(target)
        if target not in node_of:
            raise ValueError(f"mesh_key_logins: {target!r} is none of the cluster's addresses")
        logins.append({"label": target, "ssh_args": [target],
                       "offers": login_offers((crypto_by_node or {}).get(node_of[target]))})
    return logins


class FilterModule:
    def filters(self):
        return {"openssh_crypto": openssh_crypto, "sshd_t_lines": sshd_t_lines, "release_name": release_name,
                "release_settings": release_settings, "crypto_by_node": crypto_by_node,
                "from_restricted_keys": from_restricted_keys, "as_list": as_list, "login_offers": login_offers,
                "key_login_args": key_login_args, "controller_key_logins": controller_key_logins,
                "mesh_key_logins": mesh_key_logins}
