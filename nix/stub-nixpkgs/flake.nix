{
  description = "Stand-in for nixpkgs for offline evaluation checks (see default.nix); not nixpkgs";

  outputs =
    { self }:
    let
      lib = import ./lib.nix;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs lib.systems.flakeExposed (system: import ./default.nix { inherit system; });
    };
}
