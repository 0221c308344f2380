"""File and command requests the guest agent serves beside the kernel (guest side).

These run in the agent, not in the kernel, so they work while a cell runs or hangs. They act
on the guest's own filesystem as root in the guest: a path such as ``../../etc/shadow`` or a
symlink to ``/`` reaches the guest's files, never the host's (the host only moves bytes).

Stdlib only, like the agent; imports nothing from the host package.
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import stat
import time

try:  # in the host package (tests, linting)
    from . import protocol as P
except ImportError:  # in the guest: protocol.py sits next to this file
    import protocol as P  # type: ignore[no-redef]


def resolve(path: str, cwd: str) -> str:
    """Relative paths start at the kernel's working folder, as in a cell."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"not a usable path: {path!r}")
    return os.path.normpath(os.path.join(cwd, path))


def write_file(path: str, data_b64: str, append: bool) -> dict:
    data = base64.b64decode(data_b64, validate=True)
    if len(data) > P.FILE_CHUNK:
        raise ValueError(f"a write_file chunk holds at most {P.FILE_CHUNK} bytes")
    if parent := os.path.dirname(path):
        os.makedirs(parent, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return {"size": os.fstat(fd).st_size}
    finally:
        os.close(fd)


def read_file(path: str, offset: int, length: int) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the agent
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.pread(fd, max(0, min(int(length), P.FILE_CHUNK)), max(0, int(offset)))
        return {"data": base64.b64encode(data).decode(), "size": st.st_size}
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def list_files(path: str) -> dict:
    entries, truncated = [], False
    with os.scandir(path) as it:
        for entry in it:
            if len(entries) >= P.MAX_LIST_ENTRIES:
                truncated = True
                break
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            entries.append({"name": entry.name, "type": _kind(st.st_mode),
                            "size": st.st_size, "mtime": st.st_mtime})  # fmt: skip
    entries.sort(key=lambda e: e["name"])
    return {"entries": entries, "truncated": truncated}


def remove_file(path: str) -> dict:
    if os.path.normpath(path) == "/":
        raise PermissionError(1, "refusing to remove /", path)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # never follows a symlink out of the folder
    else:
        os.unlink(path)  # a symlink goes, not what it points to
    return {}


def run_command(argv: list[str], env: dict[str, str], timeout: float, spawn, wait_child) -> dict:
    """Run ``argv`` with stdin from /dev/null; capture stdout and stderr up to
    ``COMMAND_OUTPUT_CAP`` bytes each (the rest is read and dropped), kill its process
    group after ``timeout`` seconds. ``spawn(argv, env, file_actions) -> pid`` and
    ``wait_child(pid, timeout) -> status|None`` come from the agent, which reaps children."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
        (os.POSIX_SPAWN_CLOSE, out_r),
        (os.POSIX_SPAWN_CLOSE, err_r),
    ]
    try:
        pid = spawn(argv, env, actions)
    finally:
        os.close(out_w)
        os.close(err_w)
    bufs = {out_r: bytearray(), err_r: bytearray()}
    truncated = timed_out = False
    deadline = time.monotonic() + max(0.0, timeout)
    open_fds = [out_r, err_r]
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0 and not timed_out:
                timed_out = True
                _kill_group(pid)
                deadline = time.monotonic() + 2  # drain what the dying group wrote
                continue
            if left <= 0:
                break  # something outside the group holds the pipe open
            ready, _, _ = select.select(open_fds, [], [], left)
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.remove(fd)
                    continue
                room = P.COMMAND_OUTPUT_CAP - len(bufs[fd])
                if len(data) > room:
                    truncated = True
                bufs[fd] += data[: max(0, room)]
        if timed_out:
            status = wait_child(pid, 5.0)
        else:
            status = wait_child(pid, max(0.1, deadline - time.monotonic()))
            if status is None:  # closed its output but kept running
                timed_out = True
                _kill_group(pid)
                status = wait_child(pid, 5.0)
    finally:
        for fd in (out_r, err_r):
            os.close(fd)
    return {
        "stdout": base64.b64encode(bytes(bufs[out_r])).decode(),
        "stderr": base64.b64encode(bytes(bufs[err_r])).decode(),
        "exit_code": status if status is not None else -signal.SIGKILL,
        "timed_out": timed_out,
        "truncated": truncated,
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
