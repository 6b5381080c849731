from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny Qwen2 + tokenizer + data that `python -m train.tiny_model` writes (~3 s)."""
    from train.tiny_model import write_tiny

    return Path(write_tiny(str(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from train.modeling import load_tokenizer

    return load_tokenizer(str(tiny_dir))
