# python3Packages attribute names this project may use, each checked to exist
# in nixpkgs (pkgs/top-level/python-packages.nix; see docs/packaging.md).
# Any other name is undefined in the stub, so a typo such as
# `prometheus_client` fails evaluation here as it would against nixpkgs.
[
  "docopt"
  "gevent"
  "grpcio"
  "grpcio-health-checking"
  "grpcio-tools"
  "prometheus-client"
  "protobuf"
  "pytest"
  "pytestCheckHook"
  "setuptools"
  "toml"
]
