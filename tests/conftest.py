import sys
from pathlib import Path

# tests/integration/lab.py is imported as `lab` by the integration tests.
sys.path.insert(0, str(Path(__file__).parent / "integration"))


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: runs against a container lab with real sshd (needs podman)")
