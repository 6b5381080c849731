"""Python's bytecode for the training processes, kept on the node where the interpreter writes none."""
import os
import sys

PYCACHE_DIR_ENV = "TRAIN_PYCACHE_DIR"


def keep_bytecode(environ=os.environ):
    """Where this interpreter writes no bytecode (PYTHONDONTWRITEBYTECODE, which many container images
    set, or -B), every rank of every start compiles the sources of torch, transformers and DeepSpeed
    again: about 8 s of a start's 15-17 s of imports on the H200 machine. With TRAIN_PYCACHE_DIR set (the launch puts it in the
    node-local cache), write it there and read it back at the next start. Call it before those imports.
    An interpreter that writes bytecode is left alone (its own __pycache__ already serves every start),
    and so is one given a PYTHONPYCACHEPREFIX of the user's.
    Returns the directory now in use, or None."""
    path = environ.get(PYCACHE_DIR_ENV)
    if not path or not sys.dont_write_bytecode or sys.pycache_prefix:
        return None
    sys.pycache_prefix = path
    sys.dont_write_bytecode = False
    return path
