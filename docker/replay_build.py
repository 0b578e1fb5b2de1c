#!/usr/bin/env python3
"""Replay the Dockerfile's build on this host, without a Docker engine.

Owns `make docker-replay`: it runs the build stage's COPY/ARG/ENV/WORKDIR/RUN
instructions as written, with every absolute image path (/src, /opt, /usr/bin,
/data) moved under a temporary root, then the final stage's COPY --from and
`ln -s` lines, and checks what the image would hold: `consensus -V`,
`consensus git` (the GIT_HASH build argument), both probe names. It never
touches the host outside that root: the final stage's useradd/chown/mkdir are
reported and skipped. It is slower than the CI checks (two venvs), so it is
not part of `make test`.

Usage: docker/replay_build.py [--git-hash HASH] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PATHS = ("/src", "/opt", "/usr/bin", "/data")


def instructions(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Stages of (INSTRUCTION, arguments), continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        current += line.rstrip("\\").strip() + " "
        if line.rstrip().endswith("\\"):
            continue
        inst, _, rest = current.strip().partition(" ")
        current = ""
        if inst.upper() == "FROM":
            stages.append([])
        stages[-1].append((inst.upper(), rest))
    return stages


def rebase(text: str, root: Path) -> str:
    """Move image paths under root: '/opt/x' -> '<root>/opt/x' (not '/usr/local/...')."""
    pattern = "|".join(re.escape(p) for p in IMAGE_PATHS)
    return re.sub(rf"(?<![\w./-])({pattern})(?=[/\s\"']|$)", lambda m: f"{root}{m.group(1)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-hash", default="replay1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root")
    args = parser.parse_args(argv)

    build, final = instructions(ROOT / "Dockerfile")
    root = Path(tempfile.mkdtemp(prefix="docker-replay-"))
    # `python` in the image is CPython 3.11; here the base interpreter of this one
    shims = root / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {"PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "GIT_CEILING_DIRECTORIES": str(root)}
    build_args = {"GIT_HASH": args.git_hash}
    workdir = root
    try:
        for inst, rest in build[1:]:
            if inst == "WORKDIR":
                workdir = Path(rebase(rest, root))
                workdir.mkdir(parents=True, exist_ok=True)
            elif inst == "COPY":
                *sources, dest = shlex.split(rest)
                target = Path(rebase(dest, root)) if dest.startswith("/") else workdir / dest
                for src in sources:
                    path = ROOT / src
                    if path.is_dir():  # Docker copies a directory's contents into dest
                        shutil.copytree(path, target, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, target / path.name)
            elif inst == "ARG":
                name, _, default = rest.partition("=")
                env[name] = build_args.get(name, default)
            elif inst == "ENV":
                for item in shlex.split(rest):
                    name, _, value = item.partition("=")
                    env[name] = value
            elif inst == "RUN":
                command = rebase(rest, root)
                print(f"RUN {command}", flush=True)
                subprocess.run(["sh", "-c", command], cwd=workdir, env=env, check=True)
        for inst, rest in final[1:]:
            if inst == "COPY" and rest.startswith("--from=build"):
                _, src, dest = shlex.split(rest)
                print(f"COPY --from=build {src} {dest} (already in place)")
            elif inst == "RUN" and "ln -s" in rest:
                (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
                command = rebase(rest, root)
                print(f"RUN {command}", flush=True)
                subprocess.run(["sh", "-c", command], env=env, check=True)
            elif inst == "RUN":
                print(f"skipped (would change this host): RUN {rest}")

        usr_bin = root / "usr" / "bin"
        data = root / "data"
        data.mkdir(exist_ok=True)
        checks = [
            ([usr_bin / "consensus", "-V"], 0, None),
            ([usr_bin / "consensus", "git"], 0, f"git version: {args.git_hash}"),
            ([usr_bin / "grpc-health-probe", "-addr=127.0.0.1:1", "-connect-timeout=200ms"], 2, None),
            ([usr_bin / "grpc_health_probe", "-addr=127.0.0.1:1", "-connect-timeout=200ms"], 2, None),
        ]
        failed = 0
        for cmd, want_rc, want_text in checks:
            proc = subprocess.run([str(c) for c in cmd], cwd=data, env=env, capture_output=True, text=True,
                                  timeout=60)
            ok = proc.returncode == want_rc and (want_text is None or want_text in proc.stdout)
            failed += not ok
            shown = (proc.stdout or proc.stderr).strip().replace("\n", " | ")
            print(f"{'ok  ' if ok else 'FAIL'} {' '.join(str(c) for c in cmd).replace(str(root), '')} "
                  f"-> rc={proc.returncode} {shown}")
        print(f"{len(checks) - failed} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
