"""train.bytecode: a start under an interpreter that writes no bytecode keeps it in the node's cache."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from train.bytecode import PYCACHE_DIR_ENV, keep_bytecode

ROOT = Path(__file__).resolve().parents[2]


def test_only_an_interpreter_that_writes_none_is_redirected(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert keep_bytecode({PYCACHE_DIR_ENV: str(tmp_path)}) is None and sys.pycache_prefix is None
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert keep_bytecode({}) is None and sys.dont_write_bytecode
    # a prefix of the user's own (PYTHONPYCACHEPREFIX) with writing off: both kept
    monkeypatch.setattr(sys, "pycache_prefix", "/elsewhere")
    assert keep_bytecode({PYCACHE_DIR_ENV: str(tmp_path)}) is None and sys.dont_write_bytecode
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert keep_bytecode({PYCACHE_DIR_ENV: str(tmp_path)}) == str(tmp_path)
    assert sys.pycache_prefix == str(tmp_path) and not sys.dont_write_bytecode


def test_python_m_train_writes_torchs_bytecode_under_the_cache(tmp_path):
    """What a rank of the launch does in an image with PYTHONDONTWRITEBYTECODE=1: the package's and
    torch's modules compiled once into TRAIN_PYCACHE_DIR, read back by the next start."""
    cache = tmp_path / "pycache"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}  # make test sets its own
    env.update(PYTHONDONTWRITEBYTECODE="1", **{PYCACHE_DIR_ENV: str(cache)})
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_dir = Path(torch.__file__).resolve().parent.relative_to("/")  # the prefix mirrors source paths
    assert list(cache.glob(f"{torch_dir}/__init__.*.pyc")), "torch's bytecode is not under the cache"
    assert list(cache.rglob("sft.*.pyc"))
