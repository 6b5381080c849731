"""The linear strategy run through mitogen (https://mitogen.networkgenomics.com/ansible_detailed.html).

ansible.cfg selects it for site.yml and the playbooks. Each node then keeps one Python
interpreter for the whole run, which imports Ansible's module_utils once, where the stock
strategy starts a fresh interpreter per task that recompiles them from AnsiballZ's zip
(about 0.2 CPU-seconds a task on a node). mitogen is a pinned dependency (requirements.txt);
this file only puts its strategy on the path that ansible.cfg's strategy_plugins names.
`ANSIBLE_STRATEGY=linear` runs the stock strategy instead.
"""
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
