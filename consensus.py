#!/usr/bin/env python3
"""consensus.py -- the Raft consensus service of a CITA-Cloud node, in Python.

A drop-in replacement for CITA-Cloud's Rust `consensus_raft`: same command
line, same `[consensus_raft]` config table, same gRPC surface, same peer
protocol (raft-rs `eraftpb` messages inside `NetworkMsg`). On every node it
fetches block proposals from the local controller while it leads, has the
controller check proposals from peers, agrees on them with the other
validators through Raft (package `raft/`), and commits each agreed proposal
with its (empty) proof to the local controller. It reaches other nodes only
through the local network service.

Process model: one gevent process. Greenlets run the tick loop, the gRPC
servers and the controller/network RPC workers; exactly one greenlet (the
peer loop) owns the RawNode and everything else talks to it through a queue.
See docs/internals.md and README.md.
"""

# gevent must patch the standard library before anything else is imported,
# and grpc's gevent integration must be initialised before any channel or
# server exists: otherwise blocking gRPC calls would block the whole process.
from gevent import monkey

monkey.patch_all()

import grpc  # noqa: E402
from grpc.experimental import gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import dataclasses  # noqa: E402
import gzip  # noqa: E402
import logging  # noqa: E402
import logging.handlers  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402  (TOML 1.0, stdlib)

import docopt  # noqa: E402

NAME = "consensus_raft"
VERSION = "0.1.0"
AUTHORS = "CITA-Cloud Python consensus developers"
HOMEPAGE = "https://github.com/cita-cloud/consensus_raft"
HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------
# Command line (docopt), shaped like the Rust service's clap output
# --------------------------------------------------------------------------

MAIN_HELP = f"""{NAME} {VERSION}
{AUTHORS}
Consensus service for CITA-Cloud

USAGE:
    consensus [SUBCOMMAND]

OPTIONS:
    -h, --help       Print help information
    -V, --version    Print version information

SUBCOMMANDS:
    git     show git info
    help    Print this message or the help of the given subcommand(s)
    run     run the service
"""

GIT_HELP = """consensus-git
show git info

USAGE:
    consensus git

OPTIONS:
    -h, --help    Print help information
"""

RUN_HELP = """consensus-run
run the service

USAGE:
    consensus run [OPTIONS]

OPTIONS:
    -c, --config <config>                  the consensus config [default: config.toml]
    -d, --log-dir <log-dir>                the log dir. Overrides the config
    -f, --log-file-name <log-file-name>    the log file name. Overrride the config
    -h, --help                             Print help information
        --stdout                           if specified, log to stdout. Overrides the config
"""

# docopt patterns. The printed help above keeps the original's layout; these
# say the same thing in the grammar docopt parses.
_MAIN_PATTERN = """Usage: consensus [-h | -V] [<subcommand>] [<args>...]

Options:
  -h --help
  -V --version
"""
_RUN_PATTERN = """Usage: consensus run [-h] [-c <config>] [-d <log-dir>] [-f <log-file-name>] [--stdout]

Options:
  -h --help
  -c <config> --config=<config>  [default: config.toml]
  -d <log-dir> --log-dir=<log-dir>
  -f <log-file-name> --log-file-name=<log-file-name>
  --stdout
"""
_GIT_PATTERN = """Usage: consensus git [-h]

Options:
  -h --help
"""


class UsageError(Exception):
    """Bad command line: printed with a usage hint, exit code 2 (as clap)."""


def git_hash() -> str:
    """The short git hash of this build: embedded at build time in
    `_version.py` (Nix, Docker, pip builds have no .git), else asked from git
    in the source tree, else 'unknown'."""
    try:
        from _version import GIT_HASH  # written by the build, gitignored

        if GIT_HASH:
            return GIT_HASH
    except ImportError:
        pass
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _docopt(pattern: str, argv: list[str], usage_hint: str) -> dict:
    try:
        return docopt.docopt(pattern, argv=argv, help=False, version=None, options_first=False)
    except docopt.DocoptExit:
        raise UsageError(f"invalid arguments: {' '.join(argv[1:]) or '(none)'}\n\n{usage_hint}") from None


def parse_command_line(argv: list[str]) -> tuple[str, dict]:
    """Returns (action, options); action is one of help/version/git/run
    with the printable text in options['text'] for help/version/git."""
    try:
        top = docopt.docopt(_MAIN_PATTERN, argv=argv, help=False, options_first=True)
    except docopt.DocoptExit:
        raise UsageError(f"invalid arguments: {' '.join(argv)}\n\nFor more information try --help") from None
    if top["--help"]:
        return "help", {"text": MAIN_HELP}
    if top["--version"]:
        return "version", {"text": f"{NAME} {VERSION}"}
    sub, rest = top["<subcommand>"], top["<args>"]
    if sub is None:
        # The original prints this and exits 0 when called without a subcommand.
        return "help", {"text": "no subcommand provided\n\n" + MAIN_HELP}
    if sub == "help":
        topic = rest[0] if rest else None
        texts = {None: MAIN_HELP, "run": RUN_HELP, "git": GIT_HELP, "help": MAIN_HELP}
        if topic not in texts:
            raise UsageError(f"unknown subcommand '{topic}'\n\nFor more information try --help")
        return "help", {"text": texts[topic]}
    if sub == "git":
        args = _docopt(_GIT_PATTERN, [sub, *rest], "USAGE:\n    consensus git")
        if args["--help"]:
            return "help", {"text": GIT_HELP}
        return "git", {"text": f"git version: {git_hash()}\nhomepage: {HOMEPAGE}"}
    if sub == "run":
        args = _docopt(_RUN_PATTERN, [sub, *rest], "USAGE:\n    consensus run [OPTIONS]\n\nFor more information try --help")
        if args["--help"]:
            return "help", {"text": RUN_HELP}
        if args["--stdout"]:
            for flag in ("--log-dir", "--log-file-name"):
                if args[flag] is not None:
                    value = "<log-dir>" if flag == "--log-dir" else "<log-file-name>"
                    raise UsageError(f"The argument '--stdout' cannot be used with '{flag} {value}'\n\n"
                                     "USAGE:\n    consensus run --stdout\n\nFor more information try --help")
        return "run", {"config": args["--config"], "log_dir": args["--log-dir"],
                       "log_file_name": args["--log-file-name"], "stdout": bool(args["--stdout"])}
    raise UsageError(f"unknown subcommand '{sub}'\n\nFor more information try --help")


# --------------------------------------------------------------------------
# Configuration: the [consensus_raft] table of config.toml
# --------------------------------------------------------------------------

DEFAULT_BUCKETS = [0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0]
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """A config problem; the message is one line naming file, key and problem."""


@dataclasses.dataclass
class Config:
    """Every key of the original's [consensus_raft] table, same defaults.
    Keys marked 'ours' are additions; the original ignores them."""

    node_addr: str = ""                 # path of a file with the hex address, or the hex itself
    grpc_listen_port: int = 50001       # our gRPC server (consensus, network handler, health)
    network_port: int = 50000           # network service at localhost:<port>
    controller_port: int = 50004        # controller service at localhost:<port>
    log_level: str = "info"             # trace/debug/info/warning/error/critical
    log_to_stdout: bool = False         # also forced by --stdout
    log_dir: str = "logs"               # overridden by -d
    log_file_name: str = "consensus-service.log"  # overridden by -f
    log_rotate_size: int = 128 * 1024 * 1024       # bytes per log file before rotation
    log_rotate_keep: int = 5            # rotated files kept
    log_rotate_compress: bool = False   # gzip rotated files
    tick_interval_in_millis: int = 200  # raft tick (the original ignores this key; we honour it)
    heartbeat_tick: int = 15            # ticks between leader heartbeats
    election_tick: int = 50             # ticks before a follower campaigns (randomised to [e, 2e))
    check_quorum: bool = False          # leader steps down without a live quorum
    pre_vote: bool = True               # ours: pre-vote keeps a rejoining node from disrupting the leader
    raft_data_path: str = "raft-data-dir"  # WAL and snapshots, relative to the working dir
    enable_metrics: bool = True         # Prometheus exporter + gRPC latency histograms
    metrics_port: int = 60001           # exporter port (/metrics)
    metrics_buckets: list = dataclasses.field(default_factory=lambda: list(DEFAULT_BUCKETS))  # ms
    # derived, not a key:
    node_address: bytes = b""           # the decoded 20-byte address
    unknown_keys: list = dataclasses.field(default_factory=list)


# Older names of keys, still accepted (6.3.x used raft_data_dir, then wal_path).
KEY_ALIASES = {"raft_data_dir": "raft_data_path", "wal_path": "raft_data_path"}
_DERIVED = {"node_address", "unknown_keys"}


def parse_address(value: str, where: str) -> bytes:
    """Hex address with or without 0x, whitespace stripped; must be 20 bytes."""
    text = "".join(value.split())
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if not text:
        raise ConfigError(f"{where}: empty address")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{where}: not a hex address: {value.strip()[:60]!r}") from None
    if len(raw) != 20:
        raise ConfigError(f"{where}: address must be 20 bytes (40 hex digits), got {len(raw)} bytes")
    return raw


def _check_type(path: str, key: str, value, default):
    where = f"{path}: [consensus_raft].{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        value = [float(v) for v in value]
        if not value or value != sorted(value) or len(set(value)) != len(value):
            raise ConfigError(f"{where}: buckets must be non-empty and strictly increasing")
    return value


def load_config(path: str) -> Config:
    """Load and check [consensus_raft] from `path`. Raises ConfigError with a
    one-line message; never a traceback for bad input."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    table = doc.get("consensus_raft")
    if table is None:
        raise ConfigError(f"{path}: missing section [consensus_raft]")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: consensus_raft must be a table, got {type(table).__name__}")
    cfg = Config()
    defaults = Config()
    fields = {f.name for f in dataclasses.fields(Config)} - _DERIVED
    for key, value in table.items():
        name = KEY_ALIASES.get(key, key)
        if name not in fields:
            cfg.unknown_keys.append(key)
            continue
        setattr(cfg, name, _check_type(path, key, value, getattr(defaults, name)))
    where = f"{path}: [consensus_raft]"
    if not cfg.node_addr.strip():
        raise ConfigError(f"{where}.node_addr: missing (a file holding the node's hex address, or the hex itself)")
    addr_path = cfg.node_addr.strip()
    if os.path.isfile(addr_path):
        try:
            with open(addr_path, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}.node_addr: cannot read address file {addr_path}: {e}") from None
        cfg.node_address = parse_address(content, f"{where}.node_addr (file {addr_path})")
    else:
        looks_like_path = os.sep in addr_path or addr_path.endswith("node_address")
        try:
            cfg.node_address = parse_address(addr_path, f"{where}.node_addr")
        except ConfigError:
            if looks_like_path:
                raise ConfigError(f"{where}.node_addr: address file not found: {addr_path}") from None
            raise
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{where}.log_level: unknown level {cfg.log_level!r} (one of {', '.join(LOG_LEVELS)})")
    cfg.log_level = cfg.log_level.lower()
    for key in ("grpc_listen_port", "network_port", "controller_port", "metrics_port"):
        if not 0 < getattr(cfg, key) < 65536:
            raise ConfigError(f"{where}.{key}: not a TCP port: {getattr(cfg, key)}")
    if cfg.tick_interval_in_millis == 0:
        raise ConfigError(f"{where}.tick_interval_in_millis: must be at least 1")
    if cfg.heartbeat_tick == 0:
        raise ConfigError(f"{where}.heartbeat_tick: must be at least 1")
    if cfg.heartbeat_tick >= cfg.election_tick:
        raise ConfigError(f"{where}.heartbeat_tick: must be less than election_tick "
                          f"({cfg.heartbeat_tick} >= {cfg.election_tick})")
    if cfg.log_rotate_size == 0:
        raise ConfigError(f"{where}.log_rotate_size: must be at least 1 byte")
    if not cfg.raft_data_path.strip():
        raise ConfigError(f"{where}.raft_data_path: must not be empty")
    return cfg


# --------------------------------------------------------------------------
# Logging: slog-like lines, stdout or a size-rotated file
# --------------------------------------------------------------------------

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
_LEVEL_NUMBERS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
                  "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_LEVEL_TAGS = {TRACE: "TRCE", logging.DEBUG: "DEBG", logging.INFO: "INFO",
               logging.WARNING: "WARN", logging.ERROR: "ERRO", logging.CRITICAL: "CRIT"}

log = logging.getLogger("consensus")


class LineFormatter(logging.Formatter):
    """`Mar 14 08:32:55.131 INFO <message>, tag: peer, module: consensus::run:45`:
    timestamp, level, message, `key: value` context (from extra={'ctx': {...}}),
    then where the line was logged."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        stamp = time.strftime("%b %d %H:%M:%S", t) + f".{int(record.msecs):03d}"
        level = _LEVEL_TAGS.get(record.levelno, record.levelname[:4])
        parts = [record.getMessage()]
        ctx = getattr(record, "ctx", None)
        if ctx:
            parts.extend(f"{k}: {v}" for k, v in ctx.items())
        module = record.name.replace(".", "::")
        parts.append(f"module: {module}::{record.funcName}:{record.lineno}")
        line = f"{stamp} {level} " + ", ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _gzip_rotator(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(source)


def setup_logging(cfg: Config, stdout: bool, log_dir: str | None, log_file_name: str | None,
                  stream=None) -> logging.Handler:
    """Route the 'consensus' and 'raft' loggers to stdout or a rotated file.
    CLI values override the config; returns the installed handler."""
    if stdout or cfg.log_to_stdout:
        handler: logging.Handler = logging.StreamHandler(stream or sys.stdout)
    else:
        directory = log_dir or cfg.log_dir
        os.makedirs(directory, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            os.path.join(directory, log_file_name or cfg.log_file_name),
            maxBytes=cfg.log_rotate_size, backupCount=cfg.log_rotate_keep, encoding="utf-8")
        if cfg.log_rotate_compress:
            handler.namer = lambda name: name + ".gz"
            handler.rotator = _gzip_rotator
    handler.setFormatter(LineFormatter())
    level = _LEVEL_NUMBERS[cfg.log_level]
    for name in ("consensus", "raft"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    return handler


def ctx(**kv) -> dict:
    """extra= for a log call: `log.info("...", extra=ctx(tag="peer"))`."""
    return {"ctx": kv}


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        action, opts = parse_command_line(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if action != "run":
        print(opts["text"].rstrip("\n"))
        return 0
    try:
        cfg = load_config(opts["config"])
    except ConfigError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        return 1
    try:
        setup_logging(cfg, opts["stdout"], opts["log_dir"], opts["log_file_name"])
    except OSError as e:
        print(f"error: cannot open the log file: {e}", file=sys.stderr)
        return 1
    if cfg.unknown_keys:
        log.warning("ignoring unknown config keys in [consensus_raft]: %s", ", ".join(cfg.unknown_keys),
                    extra=ctx(file=opts["config"]))
    return run_service(cfg)


def run_service(cfg: Config) -> int:
    raise NotImplementedError("the service lands with issue 5")


if __name__ == "__main__":
    sys.exit(main())
