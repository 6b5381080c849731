"""Idempotent file writes for the modules (stdlib only): write_file() compares the wanted bytes and
mode with what is on disk, reports honestly whether anything would change (with Ansible's diff), and
writes atomically (rundir.write_atomic), so a failed run never leaves a half-written file."""


import os
import stat

from .rundir import write_atomic


class FileWriteError(Exception):
    pass


def _read(path):
    try:
        with open(path, "rb") as fd:
            return fd.read()
    except OSError:
        return None


def _text(data):
    if data is None:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "<binary>\n"


def write_file(path, content, mode=0o644, check_mode=False):
    """Make `path` hold `content` (str or bytes) with permission bits `mode`.

    Returns {"changed": bool, "diff": {...}} where diff is Ansible's before/after structure.
    """
    if isinstance(content, str):
        content = content.encode("utf-8")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        if check_mode:
            # A check run before the directory is created: the file would be new.
            return {"changed": True, "diff": {"before_header": path, "after_header": path, "before": "",
                                              "after": _text(content)}}
        raise FileWriteError(f"directory {directory} does not exist (create it first)")
    if os.path.isdir(path):
        raise FileWriteError(f"{path} is a directory")
    before = _read(path)
    current_mode = None
    if before is not None:
        current_mode = stat.S_IMODE(os.stat(path).st_mode)
    content_changed = before != content
    mode_changed = mode is not None and current_mode is not None and current_mode != mode
    diff = {"before_header": path, "after_header": path, "before": _text(before), "after": _text(content)}
    changed = content_changed or mode_changed
    if not changed or check_mode:
        return {"changed": changed, "diff": diff}
    if not content_changed:
        os.chmod(path, mode)
        return {"changed": True, "diff": diff}
    write_atomic(path, content, mode if mode is not None else 0o644)
    return {"changed": True, "diff": diff}


def parse_mode(value, default=0o644):
    """Accept 0644, '0644', '644' or 420 (int) as Ansible users write modes."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text, 8)
    except ValueError:
        raise FileWriteError(f"mode {value!r} is not an octal number like '0644'") from None
