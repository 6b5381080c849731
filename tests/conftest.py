import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The modules' logic lives in plugins/module_utils and the filters in plugins/filter: plain Python
# that tests import directly (Ansible finds them through ansible.cfg). tests/integration/lab.py is
# imported as `lab` by the lab tests.
for path in (ROOT / "plugins" / "module_utils", ROOT / "plugins" / "filter", ROOT / "tests" / "integration"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: runs against a container lab with real sshd (needs podman)")
