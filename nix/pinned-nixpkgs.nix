# The nixpkgs source that flake.lock pins, for default.nix (no flakes needed):
# the same revision and hash as the flake, so both build the same derivation.
# Until a networked machine has run `nix flake lock` (it cannot be made
# offline), this falls back to <nixpkgs> from NIX_PATH and says so.
{
  lockFile ? ../flake.lock,
  # replaceable so the offline tests can see the URL and hash without a download
  fetchTarball ? builtins.fetchTarball,
}:
if builtins.pathExists lockFile then
  let
    lock = builtins.fromJSON (builtins.readFile lockFile);
    locked = lock.nodes.${lock.nodes.${lock.root}.inputs.nixpkgs}.locked;
  in
  if locked.type or "" != "github" then
    throw "flake.lock: nixpkgs is locked as ${locked.type or "?"}, expected a github input"
  else
    fetchTarball {
      url = "https://github.com/${locked.owner}/${locked.repo}/archive/${locked.rev}.tar.gz";
      sha256 = locked.narHash;
    }
else
  builtins.trace "flake.lock is missing: using <nixpkgs> from NIX_PATH (run `nix flake lock` to pin it)" <nixpkgs>
