"""The documented commands work from a checkout under any python (issue 15 §1).

`./consensus.py ...` and `cita_raft_tools/grpc_health_probe.py ...` are run by a
python that sees no site-packages (`-S`, an empty environment): after `make
setup` they re-exec into the checkout's .venv; in a copy without .venv they
print one line saying to run `make setup`, never a traceback."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def bare_python() -> str:
    """An interpreter outside the venv (the venv's base one)."""
    for candidate in (Path(sys.base_prefix) / "bin" / "python3", Path("/usr/bin/python3")):
        if candidate.exists():
            return str(candidate)
    pytest.fail("no python outside the venv found")


def run_bare(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    # -S: no site-packages; an empty environment: no PYTHONPATH, no VIRTUAL_ENV
    return subprocess.run([bare_python(), "-S", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_the_bare_python_really_lacks_the_packages():
    proc = run_bare("-c", "import gevent")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_scripts_are_executable():
    for script in ("consensus.py", "devnet.py", "cita_raft_tools/grpc_health_probe.py"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
        assert (ROOT / script).read_text().startswith("#!/usr/bin/env python3\n")


@pytest.mark.skipif(not VENV.exists(), reason="needs the checkout's .venv (make setup)")
@pytest.mark.parametrize("args,expect", [
    (["-h"], "SUBCOMMANDS:"),
    (["-V"], "consensus_raft "),
    (["git"], "git version: "),
    (["help", "run"], "--stdout"),
    (["run", "-h"], "--config <config>"),
    ([], "no subcommand provided"),
])
def test_consensus_commands_reexec_into_the_venv(args, expect):
    proc = run_bare(ROOT / "consensus.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.skipif(not VENV.exists(), reason="needs the checkout's .venv (make setup)")
def test_consensus_run_with_a_missing_config_is_one_line():
    proc = run_bare(ROOT / "consensus.py", "run", "-c", "/nonexistent/config.toml")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(not VENV.exists(), reason="needs the checkout's .venv (make setup)")
def test_devnet_reexecs_into_the_venv(tmp_path):
    proc = run_bare(ROOT / "devnet.py", "--dir", tmp_path / "none", "status")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("devnet status: no devnet in ") and proc.stderr.count("\n") == 1


@pytest.mark.skipif(not VENV.exists(), reason="needs the checkout's .venv (make setup)")
def test_probe_reexecs_into_the_venv():
    # nothing listens on port 1: the probe itself ran (with grpc) and reports a connection failure
    proc = run_bare(ROOT / "cita_raft_tools" / "grpc_health_probe.py", "-addr=127.0.0.1:1", "-connect-timeout=200ms")
    assert proc.returncode == 2, proc.stderr
    assert "failed to connect" in proc.stderr and "Traceback" not in proc.stderr


def test_before_setup_one_line_says_make_setup(tmp_path):
    # a checkout without .venv: consensus.py and the probe, copied alone
    shutil.copy(ROOT / "consensus.py", tmp_path)
    (tmp_path / "cita_raft_tools").mkdir()
    shutil.copy(ROOT / "cita_raft_tools" / "grpc_health_probe.py", tmp_path / "cita_raft_tools")
    for args in (["-h"], ["run", "-c", "config.toml"], ["git"]):
        proc = run_bare(tmp_path / "consensus.py", *args, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "make setup" in lines[0], proc.stderr
    proc = run_bare(tmp_path / "cita_raft_tools" / "grpc_health_probe.py", "-addr=127.0.0.1:1", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "make setup" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # ./devnet.py, copied with its package
    shutil.copy(ROOT / "devnet.py", tmp_path)
    shutil.copytree(ROOT / "devnet", tmp_path / "devnet", ignore=shutil.ignore_patterns("__pycache__"))
    proc = run_bare(tmp_path / "devnet.py", "status", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "make setup" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # what needs no grpc still works
    proc = run_bare(tmp_path / "cita_raft_tools" / "grpc_health_probe.py", "-version", cwd=tmp_path)
    assert proc.returncode == 0 and "grpc-health-probe" in proc.stdout


def test_make_setup_says_what_it_does():
    if shutil.which("make") is None:
        pytest.fail("make is needed")
    # -n -B: print every command setup would run, run none
    out = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    for step in ("creating the virtualenv", "pinned packages from requirements.txt", "generating the gRPC"):
        assert step in out, f"make setup does not announce {step!r}:\n{out}"
    assert "pip install -q" not in out, "pip's own progress must show"


def test_make_run_data_dir_is_ignored():
    proc = subprocess.run(["git", "check-ignore", "-q", "raft-data-dir/wal"], cwd=ROOT, timeout=30)
    assert proc.returncode == 0, "raft-data-dir/ (made by `make run`) must be ignored by git"


def test_probe_reports_an_unknown_service_as_the_go_probe_does():
    """The maintained health servicer answers NOT_FOUND for a name it does not
    know; the probe exits 3 and prints grpc-go's code name, as the Go probe."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("consensus.Ready", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        def probe(*args):
            return subprocess.run([sys.executable, str(ROOT / "cita_raft_tools" / "grpc_health_probe.py"),
                                   f"-addr=127.0.0.1:{port}", *args], capture_output=True, text=True, timeout=60)
        assert probe("-service=consensus.Ready").returncode == 0
        r = probe("-service=no.such.Service")
        assert r.returncode == 3
        assert r.stderr.startswith("error: health rpc failed: rpc error: code = NotFound desc ="), r.stderr
    finally:
        server.stop(0).wait(5)
