def pytest_configure(config):
    config.addinivalue_line("markers", "lab: runs against a container lab with real sshd (needs podman)")
