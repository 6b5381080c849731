"""Every role under roles/ documents its variables twice, in defaults/main.yml (the values) and in
meta/argument_specs.yml (what `ansible-doc -t role` shows and what Ansible validates): the two must
name the same variables with the same defaults.

A spec default equals the role default when it is the same text, or when it is what the role
default renders to as Ansible would see it: with the role's other defaults and no inventory (so
`{{ cluster_user | default('root') }}` is `root`), both sides coerced by the spec's type with
Ansible's own argument validator (a `path` default's `~` expanded, say). A default that needs a
host to render (`{{ inventory_hostname }}`) must be given verbatim in the spec.
"""
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleError
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import filter_loader, init_plugin_loader
from ansible.template import Templar, trust_as_template

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())
# Roles that cannot pass yet, and why: each must be made to pass, then removed from here (strict
# xfail: a role that starts passing fails the run until it is).
NOT_YET = {}
# Keys of an option that are documentation, not validation.
DOC_KEYS = {"description", "short_description", "version_added"}


def role_params():
    return list(_role_params())


def _role_params():
    for role in ROLES:
        marks = [pytest.mark.xfail(reason=NOT_YET[role], strict=True)] if role in NOT_YET else []
        yield pytest.param(role, marks=marks, id=role)


@pytest.fixture(scope="module")
def templar_env():
    init_plugin_loader()
    filter_loader.add_directory(str(ROOT / "plugins" / "filter"))


def trusted(value):
    """Role defaults as Ansible loads them: strings may be templates."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, list):
        return [trusted(v) for v in value]
    if isinstance(value, dict):
        return {k: trusted(v) for k, v in value.items()}
    return value


def spec_options(role):
    path = ROOT / "roles" / role / "meta" / "argument_specs.yml"
    assert path.is_file(), f"roles/{role}: no meta/argument_specs.yml"
    specs = (yaml.safe_load(path.read_text()) or {}).get("argument_specs") or {}
    assert "main" in specs, f"roles/{role}/meta/argument_specs.yml has no `main` entry point"
    options = {}
    for spec in specs.values():
        for name, option in (spec.get("options") or {}).items():
            if name in options and options[name] != option:
                raise AssertionError(f"roles/{role}: entry points document {name} differently")
            options[name] = option
    return options


def coerced(name, option, value):
    """value as Ansible's validator hands it to the role for this option (type, elements, ~)."""
    spec = {k: v for k, v in option.items() if k not in DOC_KEYS | {"default"}}
    result = ArgumentSpecValidator({name: spec}).validate({name: value})
    assert not result.error_messages, f"{name}={value!r}: {result.error_messages}"
    return result.validated_parameters[name]


@pytest.mark.parametrize("role", role_params())
def test_argument_specs_defaults_equal_the_role_defaults(role, templar_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    defaults_path = ROOT / "roles" / role / "defaults" / "main.yml"
    defaults = (yaml.safe_load(defaults_path.read_text()) if defaults_path.is_file() else None) or {}
    options = spec_options(role)
    assert sorted(set(defaults) - set(options)) == [], f"roles/{role}: in defaults/main.yml, not in argument_specs"
    assert sorted(set(options) - set(defaults)) == [], f"roles/{role}: in argument_specs, not in defaults/main.yml"
    templar = Templar(loader=DataLoader(), variables=trusted(defaults))
    for name, raw in defaults.items():
        option = options[name]
        if option.get("default") == raw:
            continue
        try:
            rendered = templar.template(trusted(raw))
        except AnsibleError:
            # Needs a host (inventory_hostname, facts): the spec says the template itself.
            assert option.get("default") == raw, f"roles/{role}: {name}'s spec default must be {raw!r}"
            continue
        if rendered is None:
            assert option.get("default") is None, f"roles/{role}: {name} defaults to null, the spec says {option['default']!r}"
            continue
        assert "default" in option, f"roles/{role}: {name} has no default in argument_specs (defaults/main.yml: {raw!r})"
        assert coerced(name, option, rendered) == coerced(name, option, option["default"]), (
            f"roles/{role}: {name} is {rendered!r} in defaults/main.yml, {option['default']!r} in argument_specs")
