# The consensus_raft service as a Python application: the one derivation that
# flake.nix and default.nix both `callPackage`, so `nix build` and `nix-build`
# yield the same store path.
#
# Name, version, description and homepage are read from pyproject.toml; the
# dependency lists below must match its [project].dependencies and
# [build-system].requires (tests/test_packaging.py checks that, and replays
# preBuild with pip in a clean venv).
{
  lib,
  python3Packages,
  # Short git hash shown by `consensus git`; the build source has no .git, so
  # the flake passes self.shortRev and nix-build users pass --argstr gitRev.
  gitRev ? "unknown",
}:

let
  project = (lib.importTOML ../pyproject.toml).project;
in
python3Packages.buildPythonApplication {
  pname = project.name;
  inherit (project) version;
  pyproject = true;

  # Only these tracked inputs reach the build: no generated cita_raft_pb,
  # _version.py, .venv, result links or byte code, so the source hash (and the
  # derivation) depends on nothing but the sources.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.difference (lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../consensus.py
      ../raft
      ../protos
      ../scripts
      ../cita_raft_tools
      ../tests
      ../example
      ../devnet
    ]) (lib.fileset.fileFilter (file: file.hasExt "pyc") ../.);
  };

  build-system = with python3Packages; [ setuptools ];

  # protoc runs inside the build, with the grpcio-tools of the same nixpkgs
  # as the runtime protobuf, so the generated code always matches it.
  nativeBuildInputs = with python3Packages; [ grpcio-tools ];

  dependencies = with python3Packages; [
    gevent
    grpcio
    protobuf
    docopt
    prometheus-client
    grpcio-health-checking
  ];

  preBuild = ''
    python scripts/genproto.py protos cita_raft_pb
    printf 'GIT_HASH = "%s"\n' ${lib.escapeShellArg gitRev} > _version.py
  '';

  nativeCheckInputs = with python3Packages; [ pytestCheckHook ];
  # The packaging test needs apt, pip and nix; the interop tests need Go and
  # the etcd oracle outside this repository; test_deploy needs promtool and
  # test_operator_cli a git checkout with its .venv. None exists in the sandbox.
  # tests/service runs below, in a pytest process of its own.
  disabledTestPaths = [
    "tests/test_packaging.py"
    "tests/test_deploy.py"
    "tests/test_operator_cli.py"
    "tests/interop"
    "tests/test_interop.py"
    "tests/service"
  ];
  pytestFlags = [
    "-m"
    "not slow"
  ];
  # The tests start gRPC servers and real service processes on loopback.
  __darwinAllowLocalNetworking = true;
  preCheck = ''
    export HOME=$(mktemp -d)
  '';
  # tests/service imports consensus.py, which monkey-patches the whole
  # process with gevent: as in `make test`, it gets its own pytest process.
  postCheck = ''
    python -m pytest -q -p no:cacheprovider -m "not slow" tests/service
  '';

  pythonImportsCheck = [
    "consensus"
    "raft"
    "cita_raft_pb.consensus_pb2_grpc"
    "cita_raft_pb.eraftpb_pb2"
    "cita_raft_pb.health_check_pb2_grpc"
    "cita_raft_tools.grpc_health_probe"
  ];

  meta = {
    inherit (project) description;
    homepage = project.urls.Homepage;
    license = lib.licenses.asl20;
    mainProgram = "consensus";
    platforms = lib.platforms.unix;
  };
}
