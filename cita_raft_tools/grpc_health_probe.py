#!/usr/bin/env python3
"""grpc-health-probe: a Python stand-in for grpc-ecosystem's probe (v0.4.x).

Owns the command that container images and Kubernetes liveness checks run as
`grpc-health-probe -addr=localhost:50001` (and under the old name
`grpc_health_probe`): it calls grpc.health.v1.Health/Check once and reports
through the exit code, with the same flags, messages (on stderr) and codes as
the Go probe:

    0 SERVING, 1 invalid arguments, 2 connection failure, 3 RPC failure,
    4 answered but not SERVING.

Flags follow Go's `flag` package: `-addr x`, `-addr=x`, `--addr=x`; boolean
flags take no separate value (`-v`, `-gzip=true`); parsing stops at the first
non-flag argument or `--`. Durations are Go durations (`1s`, `500ms`, `1m30s`).

TLS works as in the Go probe (-tls with -tls-ca-cert, -tls-client-cert/-key,
-tls-server-name). What Python's grpc cannot do is refused with exit code 1
and a message saying so, never silently probed without the security asked
for: -tls-no-verify (grpc offers no way to skip verification), -alts and
-spiffe.

It must never need the generated protobuf package: the two tiny health
messages are encoded by hand, so the probe works from any Python with grpcio.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

VERSION = "0.1.0"
PROG = "grpc-health-probe"

STATUS_SERVING = 0
STATUS_INVALID_ARGUMENTS = 1
STATUS_CONNECTION_FAILURE = 2
STATUS_RPC_FAILURE = 3
STATUS_UNHEALTHY = 4

# grpc.health.v1.HealthCheckResponse.ServingStatus names, as the Go probe prints them
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

CHECK_METHOD = "/grpc.health.v1.Health/Check"

STRING_FLAGS = ("addr", "service", "user-agent", "tls-ca-cert", "tls-client-cert", "tls-client-key",
                "tls-server-name")
DURATION_FLAGS = ("connect-timeout", "rpc-timeout")
BOOL_FLAGS = ("tls", "tls-no-verify", "alts", "v", "version", "gzip", "spiffe")
LIST_FLAGS = ("rpc-header",)

USAGE = """Usage of grpc-health-probe:
  -addr string
    \t(required) tcp host:port to connect
  -alts
    \tuse ALTS (not supported by this probe)
  -connect-timeout duration
    \ttimeout for establishing connection (default 1s)
  -gzip
    \tuse GZIPCompressor for requests and GZIPDecompressor for response (default: false)
  -rpc-header value
    \tadditional RPC headers in 'name: value' format. May specify more than one via multiple flags.
  -rpc-timeout duration
    \ttimeout for health check rpc (default 1s)
  -service string
    \tservice name to check (default: "")
  -spiffe
    \tuse SPIFFE to obtain mTLS credentials (not supported by this probe)
  -tls
    \tuse TLS (default: false, INSECURE plaintext transport)
  -tls-ca-cert string
    \t(with -tls, optional) file containing trusted certificates for verifying server
  -tls-client-cert string
    \t(with -tls, optional) client certificate for authenticating to the server (requires -tls-client-key)
  -tls-client-key string
    \t(with -tls) client private key for authenticating to the server (requires -tls-client-cert)
  -tls-no-verify
    \t(not supported by this probe: Python's grpc cannot skip verification)
  -tls-server-name string
    \t(with -tls) override the hostname used to verify the server certificate
  -user-agent string
    \tuser-agent header value of health check requests (default "grpc_health_probe")
  -v\tverbose logs
  -version
    \tshow probe version and exit"""


class ArgError(Exception):
    """Invalid command line: exit code 1, as the Go probe (flag.ContinueOnError)."""


@dataclass
class Options:
    addr: str = ""
    service: str = ""
    user_agent: str = "grpc_health_probe"
    connect_timeout: float = 1.0
    rpc_timeout: float = 1.0
    rpc_headers: list[tuple[str, str]] = field(default_factory=list)
    verbose: bool = False
    version: bool = False
    gzip: bool = False
    tls: bool = False
    tls_no_verify: bool = False
    tls_ca_cert: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_server_name: str = ""
    alts: bool = False
    spiffe: bool = False


# --------------------------------------------------------------------------
# Go-compatible flag and duration handling
# --------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds: '1s', '1.5s', '300ms', '1m30s', '0'."""
    s = text
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for the values a probe prints: '1s', '1.5s', '300ms', '1m30s'."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if seconds >= scale:
                return f"{sign}{_trim(seconds / scale)}{unit}"
        return f"{sign}{_trim(seconds / 1e-9)}ns"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return f"{sign}{out}{_trim(secs)}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def _parse_bool(name: str, value: str) -> bool:
    # strconv.ParseBool's accepted spellings
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ArgError(f'invalid boolean value "{value}" for -{name}: parse error')


def parse_args(argv: list[str]) -> Options:
    """Parse like Go's flag.FlagSet.Parse; raises ArgError with Go's message."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args[0]
        if len(arg) < 2 or arg[0] != "-":
            break  # first non-flag argument ends flag parsing
        if arg == "--":
            args.pop(0)
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not body or body[0] in "-=":
            raise ArgError(f"bad flag syntax: {arg}")
        args.pop(0)
        name, has_value, value = body.partition("=")
        if name in ("h", "help"):
            raise ArgError("help requested")
        if name in BOOL_FLAGS:
            attr = {"v": "verbose", "tls-no-verify": "tls_no_verify"}.get(name, name)
            setattr(opts, attr, _parse_bool(name, value) if has_value else True)
            continue
        if name not in STRING_FLAGS + DURATION_FLAGS + LIST_FLAGS:
            raise ArgError(f"flag provided but not defined: -{name}")
        if not has_value:
            if not args:
                raise ArgError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        if name in DURATION_FLAGS:
            try:
                seconds = parse_duration(value)
            except ValueError:
                raise ArgError(f'invalid value "{value}" for flag -{name}: parse error') from None
            if name == "connect-timeout":
                opts.connect_timeout = seconds
            else:
                opts.rpc_timeout = seconds
        elif name == "rpc-header":
            key, sep, header_value = value.partition(":")
            if not sep:
                raise ArgError(f"invalid value \"{value}\" for flag -rpc-header: "
                               f"invalid RPC header, expected 'key: value', got \"{value}\"")
            opts.rpc_headers.append((key.lower(), header_value.lstrip()))
        else:
            setattr(opts, name.replace("-", "_"), value)
    return opts


def validate(opts: Options) -> None:
    """The Go probe's argument checks, in its order, then the refusal of what
    this probe cannot do (-tls-no-verify, -alts, -spiffe)."""
    if not opts.addr:
        raise ArgError("-addr not specified")
    if opts.connect_timeout <= 0:
        raise ArgError(f"-connect-timeout must be greater than zero (specified: "
                       f"{format_duration(opts.connect_timeout)})")
    if opts.rpc_timeout <= 0:
        raise ArgError(f"-rpc-timeout must be greater than zero (specified: {format_duration(opts.rpc_timeout)})")
    checks = [
        (opts.alts and opts.spiffe, "-alts and -spiffe are mutually incompatible"),
        (opts.tls and opts.alts, "cannot specify -tls with -alts"),
        (not opts.tls and opts.tls_no_verify, "specified -tls-no-verify without specifying -tls"),
        (not opts.tls and opts.tls_ca_cert, "specified -tls-ca-cert without specifying -tls"),
        (not opts.tls and opts.tls_client_cert, "specified -tls-client-cert without specifying -tls"),
        (not opts.tls and opts.tls_server_name, "specified -tls-server-name without specifying -tls"),
        (opts.tls_client_cert and not opts.tls_client_key,
         "specified -tls-client-cert without specifying -tls-client-key"),
        (not opts.tls_client_cert and opts.tls_client_key,
         "specified -tls-client-key without specifying -tls-client-cert"),
        (opts.tls_no_verify and opts.tls_ca_cert,
         "cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)"),
        (opts.tls_no_verify and opts.tls_server_name,
         "cannot specify -tls-server-name with -tls-no-verify (server name would not be used)"),
        (opts.tls and opts.spiffe, "-tls and -spiffe are mutually incompatible"),
    ]
    for failed, message in checks:
        if failed:
            raise ArgError(message)
    unsupported = [f for f, on in (("-tls-no-verify", opts.tls_no_verify), ("-alts", opts.alts),
                                   ("-spiffe", opts.spiffe)) if on]
    if unsupported:
        raise ArgError(f"{', '.join(unsupported)}: not supported by this grpc-health-probe (Python grpc); "
                       "use -tls with -tls-ca-cert, or plaintext as the CITA-Cloud services serve")


def tls_credentials(opts: Options):
    """grpc channel credentials for -tls, like the Go probe's buildCredentials;
    raises ArgError (exit 1) when the files cannot be used."""
    import grpc

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ArgError(f"failed to initialize tls credentials. error={what}: {e}") from None

    key = cert = roots = None
    if opts.tls_client_cert:
        cert = read(opts.tls_client_cert, "failed to load tls client cert/key pair")
        key = read(opts.tls_client_key, "failed to load tls client cert/key pair")
    if opts.tls_ca_cert:
        roots = read(opts.tls_ca_cert, f"failed to load root CA certificates from file ({opts.tls_ca_cert})")
        if b"-----BEGIN CERTIFICATE-----" not in roots:
            raise ArgError(f"failed to initialize tls credentials. error=no root CA certs parsed from file "
                           f"{opts.tls_ca_cert}")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)


# --------------------------------------------------------------------------
# grpc.health.v1 messages, hand-encoded (proto3: field 1 only)
# --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1}; an empty string is the default and is omitted."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, varint); unknown fields are skipped."""
    status, pos = 0, 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise ValueError("truncated HealthCheckResponse")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = read_varint()
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = read_varint()
            if field_number == 1:
                status = value
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            pos += read_varint()
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in HealthCheckResponse")
    return status


# --------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------


def go_code_name(python_name: str) -> str:
    """grpc-go's name of a status code, as the Go probe prints it: NOT_FOUND -> NotFound."""
    special = {"OK": "OK", "CANCELLED": "Canceled"}
    return special.get(python_name) or "".join(w.capitalize() for w in python_name.split("_"))


def _log(message: str) -> None:
    # Go's log package writes to stderr, one line per message
    print(message, file=sys.stderr, flush=True)


def probe(opts: Options) -> int:
    """Connect within connect_timeout, call Check within rpc_timeout, map the outcome to an exit code."""
    # grpc's C core would add its own log lines to the probe's stderr
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import grpc  # deferred: argument errors and -version need no grpc import
    except ImportError:
        _log("error: the Python package grpcio is missing: run `make setup` in the checkout "
             "(or install the package consensus-raft, which provides this probe)")
        return STATUS_INVALID_ARGUMENTS

    if opts.verbose:
        _log("parsed options:")
        _log(f"> addr={opts.addr} conn_timeout={format_duration(opts.connect_timeout)} "
             f"rpc_timeout={format_duration(opts.rpc_timeout)}")
        if opts.rpc_headers:
            _log(f"> headers: {opts.rpc_headers}")
        _log(f"> tls={str(opts.tls).lower()}")
        if opts.tls:
            _log(f"  > no-verify={str(opts.tls_no_verify).lower()} ")
            _log(f"  > ca-cert={opts.tls_ca_cert}")
            _log(f"  > client-cert={opts.tls_client_cert}")
            _log(f"  > client-key={opts.tls_client_key}")
            _log(f"  > server-name={opts.tls_server_name}")
        _log(f"> alts={str(opts.alts).lower()}")
        _log(f"> spiffe={str(opts.spiffe).lower()}")
    channel_options = [("grpc.primary_user_agent", opts.user_agent)]
    compression = grpc.Compression.Gzip if opts.gzip else None
    if opts.tls:
        if opts.tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", opts.tls_server_name))
        channel = grpc.secure_channel(opts.addr, tls_credentials(opts), options=channel_options,
                                      compression=compression)
    else:
        channel = grpc.insecure_channel(opts.addr, options=channel_options, compression=compression)
    if opts.verbose:
        _log("establishing connection")
    with channel:
        # Like the Go probe's blocking dial: keep trying until the connect timeout.
        try:
            grpc.channel_ready_future(channel).result(timeout=opts.connect_timeout)
        except grpc.FutureTimeoutError:
            _log(f'timeout: failed to connect service "{opts.addr}" within {format_duration(opts.connect_timeout)}')
            return STATUS_CONNECTION_FAILURE
        if opts.verbose:
            _log("connection established")
        check = channel.unary_unary(CHECK_METHOD, request_serializer=None, response_deserializer=None)
        try:
            reply = check(encode_request(opts.service), timeout=opts.rpc_timeout,
                          metadata=opts.rpc_headers or None)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                _log("error: this server does not implement the grpc health protocol "
                     f"(grpc.health.v1.Health): {details}")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                _log(f"timeout: health rpc did not complete within {format_duration(opts.rpc_timeout)}")
            else:
                name = go_code_name(code.name) if code is not None else "Unknown"
                _log(f"error: health rpc failed: rpc error: code = {name} desc = {details}")
            return STATUS_RPC_FAILURE
    try:
        status = decode_status(reply)
    except ValueError as err:
        _log(f"error: health rpc failed: {err}")
        return STATUS_RPC_FAILURE
    status_name = SERVING_STATUS.get(status, str(status))
    if status != 1:
        _log(f'service unhealthy (responded with "{status_name}")')
        return STATUS_UNHEALTHY
    _log(f"status: {status_name}")
    return STATUS_SERVING


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
        if opts.version:
            print(f"{VERSION}; Python grpc-health-probe of consensus_raft")
            return 0
        validate(opts)
    except ArgError as err:
        message = str(err)
        if message.startswith(("flag ", "bad flag", "invalid ")):
            # a flag-parsing error: Go's flag package prints it, then the usage
            _log(f"{message}\n{USAGE}")
        elif message == "help requested":
            _log(USAGE)
        else:
            _log(f"error: {message}")
        return STATUS_INVALID_ARGUMENTS
    try:
        return probe(opts)
    except ArgError as err:  # unusable TLS files, found while building credentials
        _log(str(err))
        return STATUS_INVALID_ARGUMENTS
    except KeyboardInterrupt:
        _log("cancellation received (signal: interrupt)")
        return STATUS_RPC_FAILURE


def _enter_checkout_venv() -> None:
    """`cita_raft_tools/grpc_health_probe.py ...` from a checkout under a python
    without grpcio: run under the checkout's .venv (made by `make setup`)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        venv = os.path.join(repo, ".venv")
        venv_py = os.path.join(venv, "bin", "python")
        if os.path.exists(venv_py) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
            os.execv(venv_py, [venv_py, os.path.abspath(__file__), *sys.argv[1:]])


if __name__ == "__main__":
    _enter_checkout_venv()
    sys.exit(main())
