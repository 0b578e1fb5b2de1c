# The nixpkgs source that flake.lock pins, for default.nix (no flakes needed):
# the same revision and hash as the flake, so both build the same derivation.
# Until a networked machine has run `nix flake lock` (it cannot be made
# offline), this falls back to <nixpkgs> from NIX_PATH and says so.
let
  lockFile = ../flake.lock;
in
if builtins.pathExists lockFile then
  let
    lock = builtins.fromJSON (builtins.readFile lockFile);
    locked = lock.nodes.${lock.nodes.${lock.root}.inputs.nixpkgs}.locked;
  in
  builtins.fetchTarball {
    url = "https://github.com/${locked.owner}/${locked.repo}/archive/${locked.rev}.tar.gz";
    sha256 = locked.narHash;
  }
else
  builtins.trace "flake.lock is missing: using <nixpkgs> from NIX_PATH (run `nix flake lock` to pin it)" <nixpkgs>
