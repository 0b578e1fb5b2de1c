# For `nix-build` users: the very same derivation as the flake's
# packages.<system>.default (both callPackage nix/package.nix).
#
#   nix-build --argstr gitRev "$(git rev-parse --short HEAD)"
#
# Without `pkgs`, nixpkgs is the revision that flake.lock pins.
{
  pkgs ? import (import ./nix/pinned-nixpkgs.nix { }) { },
  gitRev ? "unknown",
}:
pkgs.callPackage ./nix/package.nix { inherit gitRev; }
