"""The command line, run as a real process: help texts, version, git, flag
conflicts and exit codes match the Rust consensus_raft's clap interface."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "consensus.py")


def run(*args, cwd=ROOT, timeout=30):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_help_lists_subcommands_and_options():
    out = run("-h")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("consensus_raft ")
    for line in ("USAGE:", "consensus [SUBCOMMAND]", "-h, --help       Print help information",
                 "-V, --version    Print version information", "git     show git info",
                 "run     run the service"):
        assert line in out.stdout, f"missing {line!r} in:\n{out.stdout}"


def test_version():
    out = run("-V")
    assert out.returncode == 0
    assert out.stdout.strip() == f"consensus_raft {consensus_version()}"
    assert run("--version").stdout == out.stdout


def consensus_version():
    import consensus
    return consensus.VERSION


def test_git_prints_hash_and_homepage():
    out = run("git")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("git version: ")
    expected = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    assert lines[0] == f"git version: {expected}"
    assert lines[1] == "homepage: https://github.com/cita-cloud/consensus_raft"


def test_git_hash_from_embedded_version_module(tmp_path):
    # A build without .git (Nix, Docker) embeds the hash in _version.py.
    import shutil
    shutil.copy(SCRIPT, tmp_path / "consensus.py")
    (tmp_path / "_version.py").write_text('GIT_HASH = "abc1234"\n')
    env = dict(os.environ, PYTHONPATH=ROOT)  # the copy still imports raft/ and the generated code
    out = subprocess.run([sys.executable, str(tmp_path / "consensus.py"), "git"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=30)
    assert out.stdout.splitlines()[0] == "git version: abc1234", out.stderr


def test_git_hash_unknown_without_git_or_embedding(tmp_path):
    import shutil
    shutil.copy(SCRIPT, tmp_path / "consensus.py")
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, str(tmp_path / "consensus.py"), "git"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=30)
    assert out.stdout.splitlines()[0] == "git version: unknown", out.stdout + out.stderr


def test_run_help_matches_the_original_options():
    out = run("run", "-h")
    assert out.returncode == 0
    assert out.stdout.startswith("consensus-run\nrun the service\n")
    for line in ("-c, --config <config>                  the consensus config [default: config.toml]",
                 "-d, --log-dir <log-dir>                the log dir. Overrides the config",
                 "-f, --log-file-name <log-file-name>    the log file name. Overrride the config",
                 "--stdout                           if specified, log to stdout. Overrides the config"):
        assert line in out.stdout
    assert run("help", "run").stdout == out.stdout


@pytest.mark.parametrize("flag", [["-d", "logs"], ["-f", "x.log"], ["--log-dir", "d"]])
def test_stdout_conflicts_with_log_file_flags(flag):
    out = run("run", "--stdout", *flag)
    assert out.returncode == 2
    assert "cannot be used with" in out.stderr and "--stdout" in out.stderr


def test_unknown_subcommand_and_option_exit_2():
    assert run("bogus").returncode == 2
    out = run("run", "--nope")
    assert out.returncode == 2 and "invalid arguments" in out.stderr


def test_no_subcommand_says_so():
    out = run()
    assert out.returncode == 0
    assert out.stdout.startswith("no subcommand provided")


def test_run_with_missing_config_fails_with_one_clear_line(tmp_path):
    out = run("run", "-c", str(tmp_path / "missing.toml"), "--stdout")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "missing.toml: config file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_default_config_is_config_toml_in_cwd(tmp_path):
    out = run("run", "--stdout", cwd=tmp_path)
    assert out.returncode == 1
    assert "config.toml: config file not found" in out.stderr
