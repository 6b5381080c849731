"""The command line's ansible-playbook options, checked here and passed on as ansible-playbook takes
them: -e (key=value pairs, inline JSON/YAML, @file) and the vault options. ansible-playbook itself
reads them (vault-encrypted var files included), in the order given; they are checked first with
Ansible's own parsers so that a bad one stops before anything runs. Files become absolute paths:
the playbooks run from the collection's directory, not the caller's."""
import os
from collections.abc import MutableMapping

from dsmesh.api import VAULT_DEFAULT_ID


class OptionError(ValueError):
    """A command-line option ansible-playbook would refuse, with the reason."""


def absolute(path, cwd=None):
    return os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(path)))


def check_extra_vars(value):
    """Refuse what ansible-playbook's -e would refuse (ansible.utils.vars.load_extra_vars' cases)."""
    # imported here: ansible's import wraps the process's stdout, which only -e needs to pay for
    from ansible.errors import AnsibleError
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.splitter import parse_kv

    if value[0] in "/.":
        raise OptionError(f"-e {value}: a file of variables is written @{value}")
    if value[0] in "[{":
        try:
            data = DataLoader().load(value)
        except AnsibleError as err:
            raise OptionError(f"-e {value}: not JSON or YAML: {err.message}") from None
    else:
        data = parse_kv(value)
        if "_raw_params" in data:
            raise OptionError(f"-e {value}: expected key=value, inline JSON/YAML or @file")
    if not isinstance(data, MutableMapping):
        raise OptionError(f"-e {value}: not a mapping of variables")


def extra_vars_args(values, cwd=None):
    """ansible-playbook's arguments for -e VALUE..., in order (the last one wins, as there)."""
    args = []
    for value in values:
        value = value.strip()
        if not value:
            continue
        if value.startswith("@"):
            path = absolute(value[1:], cwd)
            if not os.path.isfile(path):
                raise OptionError(f"-e {value}: no such file {path}")
            value = f"@{path}"
        else:
            check_extra_vars(value)
        args += ["-e", value]
    return args


def vault_args(password_files=(), vault_ids=(), ask_vault_pass=False, cwd=None):
    """(ansible-playbook's arguments, the vault ids to ask a password for) from --vault-password-file,
    --vault-id [LABEL@]SOURCE and --ask-vault-pass. A SOURCE of `prompt` is asked here and answered
    to ansible's prompt (dsmesh.api.run's vault_passwords); a file is passed as an absolute path."""
    args, prompts = [], []
    if ask_vault_pass:
        prompts.append(VAULT_DEFAULT_ID)
    for path in password_files:
        args += ["--vault-password-file", absolute(path, cwd)]
    for vault_id in vault_ids:
        label, sep, source = vault_id.rpartition("@")
        label = label if sep else VAULT_DEFAULT_ID
        if source == "prompt":
            if label in prompts:
                raise OptionError(f"--vault-id {vault_id}: that vault id is asked for twice")
            prompts.append(label)
            continue
        source = absolute(source, cwd)
        if not os.path.exists(source):
            raise OptionError(f"--vault-id {vault_id}: no such file {source}")
        args += ["--vault-id", f"{label}@{source}" if sep else source]
    return args, prompts
