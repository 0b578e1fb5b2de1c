"""Processes of a devnet: start detached with a log file, track by pid file, signal by pid.

A pid is acted on only if /proc/<pid>/cmdline still names this devnet's dir,
so a recycled pid is never signalled. Nothing here kills by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def read_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _settled_cmdline(pid: int, patience: float = 2.0) -> str:
    """The cmdline of a live process, waiting out the moment inside execve when
    the kernel has already let Popen return (close-on-exec fired) but has not yet
    set up the new program's arguments: /proc/<pid>/cmdline reads empty then.
    A process that is gone, or stays empty (a kernel thread), gives ""."""
    deadline = time.monotonic() + patience
    while True:
        cmd = _cmdline(pid)
        if cmd or _state(pid) in ("", "Z", "X") or time.monotonic() >= deadline:
            return cmd
        time.sleep(0.005)


def alive(pid_file: str, marker: str) -> int | None:
    """The pid if the process of this pid file runs (not a zombie) and its cmdline holds marker."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    _reap(pid)
    st = _state(pid)
    if not st or st in ("Z", "X") or marker not in _settled_cmdline(pid):
        return None
    return pid


def spawn(argv: list[str], pid_file: str, log_file: str, cwd: str, env: dict | None = None) -> int:
    os.makedirs(os.path.dirname(pid_file), exist_ok=True)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        log.flush()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                             env=env, start_new_session=True)
    with open(pid_file, "w") as f:
        f.write(str(p.pid))
    return p.pid


def signal_pid(pid_file: str, marker: str, sig: int) -> int | None:
    pid = alive(pid_file, marker)
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid


def wait_gone(pid_file: str, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive(pid_file, marker) is None:
            return True
        time.sleep(0.02)
    return alive(pid_file, marker) is None


def stop(pid_file: str, marker: str, timeout: float = 5.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if something was running."""
    pid = signal_pid(pid_file, marker, signal.SIGTERM)
    if pid is None:
        return False
    if not wait_gone(pid_file, marker, timeout):
        signal_pid(pid_file, marker, signal.SIGKILL)
        wait_gone(pid_file, marker, 2.0)
    return True


def kill9(pid_file: str, marker: str) -> bool:
    pid = signal_pid(pid_file, marker, signal.SIGKILL)
    if pid is None:
        return False
    wait_gone(pid_file, marker, 2.0)
    return True


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


# SIGKILL constant re-exported for callers that pick the signal.
SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM
