{
  description = "consensus_raft for CITA-Cloud, in Python: a drop-in replacement for the Rust service";

  # The only input. flake.lock pins its revision; it is written by the first
  # `nix flake lock` on a machine that can reach GitHub (see docs/packaging.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      # `consensus git` shows this; the store copy of the source has no .git.
      gitRev = self.shortRev or self.dirtyShortRev or "unknown";
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          consensus-raft = pkgs.callPackage ./nix/package.nix { inherit gitRev; };
          default = self.packages.${system}.consensus-raft;
        }
      );

      apps = forAllSystems (
        system: pkgs: {
          default = {
            type = "app";
            program = lib.getExe self.packages.${system}.default;
            meta.description = "the consensus service (consensus run -c config.toml --stdout)";
          };
          grpc-health-probe = {
            type = "app";
            program = "${self.packages.${system}.default}/bin/grpc-health-probe";
            meta.description = "gRPC health probe with grpc-ecosystem's flags and exit codes";
          };
        }
      );

      # Everything `make` needs, from nixpkgs instead of a pip venv.
      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.default ];
            packages = [
              (pkgs.python3.withPackages (
                ps: with ps; [
                  gevent
                  grpcio
                  protobuf
                  toml
                  docopt
                  prometheus-client
                  grpcio-health-checking
                  grpcio-tools
                  pytest
                ]
              ))
              pkgs.ruff
              pkgs.gnumake
            ];
          };
        }
      );

      checks = forAllSystems (
        system: pkgs: {
          # Building the package runs the test suite (pytestCheckHook).
          default = self.packages.${system}.default;
          # The installed commands answer as the container image needs them to.
          cli = pkgs.runCommand "consensus-raft-cli-check" {
            nativeBuildInputs = [ self.packages.${system}.default ];
            # the script runs the service and probes it on loopback
            __darwinAllowLocalNetworking = true;
          } (import ./nix/cli-check.nix { inherit gitRev; });
        }
      );
    };
}
