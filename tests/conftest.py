import glob
import os
import time
from pathlib import Path

STARTED = time.time()


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: runs against a container lab with real sshd (needs podman)")


def pytest_sessionfinish(session):
    """DeepSpeed's CPU ranks each leave a ~66 MiB shared-memory buffer in /dev/shm that it never
    deletes (the training tests launch about a dozen runs on this machine): remove those this session
    wrote, once no process maps them. The controller only (xdist's workers may still run)."""
    if hasattr(session.config, "workerinput"):
        return
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if "/dev/shm/deepspeed_" in line)
        except OSError:
            pass
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.stat(path).st_mtime >= STARTED and path not in mapped:
                os.unlink(path)
        except OSError:
            pass


# The modules that take minutes, longest first (about 4-6 minutes each for the first five on the 2-core
# CI machine). scripts/test.sh runs pytest on two xdist workers, each taking a whole module at a time
# (--dist loadscope, in this order): started first, the long ones do not leave one worker running
# them alone at the end. A module keeps its own tests' order; modules not named here follow as
# collected.
SLOW_FIRST = [
    "integration/test_launch_lab.py",
    "integration/test_resume_lab.py",
    "integration/test_api.py",
    "train/test_train_launch.py",
    "integration/test_site_lab.py",
    "train/test_train_resume.py",
    "integration/test_sudo_user_lab.py",
    "train/test_numerics.py",
    "train/test_train_data_formats.py",
]


def pytest_collection_modifyitems(session, config, items):
    tests = Path(__file__).parent
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def slowness(item):
        try:
            return rank.get(item.path.relative_to(tests).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=slowness)  # stable: each module's tests keep their order
