# A stand-in for nixpkgs, for the offline checks in tests/test_packaging.py.
# It knows only the attribute names listed here and in python-attrs.nix (any
# other is undefined, as an unknown package is), and its
# buildPythonApplication rejects argument names it does not know, records
# what it is handed in `stubArgs` and builds a trivial /bin/sh derivation that
# holds the filtered source. It proves the Nix files are well formed and
# consistent, never that nixpkgs builds them.
{
  system ? builtins.currentSystem,
}:
let
  lib = import ./lib.nix;
  inherit (builtins) attrNames concatStringsSep filter toJSON;

  stubPackage = name: {
    pname = name;
    _stubPackage = true;
  };
  nameOf = p: if p ? _stubPackage then p.pname else throw "stub nixpkgs: not a stub package: ${toString p}";
  names = map nameOf;

  pythonAttrs = lib.genAttrs (import ./python-attrs.nix) stubPackage;
  python3Packages = pythonAttrs // {
    inherit buildPythonApplication;
  };

  # A real derivation built by /bin/sh from the host (Debian's nix-bin runs
  # with sandbox = false), so `nix flake check` and nix-build can build it.
  shDrv =
    name: script: env:
    derivation (
      {
        inherit name system;
        builder = "/bin/sh";
        args = [
          "-c"
          script
        ];
        PATH = "/usr/bin:/bin";
      }
      // env
    );

  knownPythonArgs = [
    "pname"
    "version"
    "pyproject"
    "format"
    "src"
    "build-system"
    "nativeBuildInputs"
    "buildInputs"
    "dependencies"
    "propagatedBuildInputs"
    "optional-dependencies"
    "postPatch"
    "preBuild"
    "preCheck"
    "postCheck"
    "doCheck"
    "nativeCheckInputs"
    "disabledTestPaths"
    "disabledTests"
    "pytestFlags"
    "pythonImportsCheck"
    "pythonRelaxDeps"
    "__darwinAllowLocalNetworking"
    "passthru"
    "meta"
  ];

  buildPythonApplication =
    args:
    let
      unknown = filter (n: !(builtins.elem n knownPythonArgs)) (attrNames args);
      get = n: args.${n} or [ ];
      recorded = {
        inherit (args) pname version;
        pyproject = args.pyproject or null;
        format = args.format or null;
        src = "${args.src}";
        build-system = names (get "build-system");
        nativeBuildInputs = names (get "nativeBuildInputs");
        buildInputs = names (get "buildInputs");
        dependencies = names (get "dependencies");
        propagatedBuildInputs = names (get "propagatedBuildInputs");
        nativeCheckInputs = names (get "nativeCheckInputs");
        postPatch = args.postPatch or "";
        preBuild = args.preBuild or "";
        postCheck = args.postCheck or "";
        doCheck = args.doCheck or true;
        disabledTestPaths = get "disabledTestPaths";
        disabledTests = get "disabledTests";
        pytestFlags = get "pytestFlags";
        pythonImportsCheck = get "pythonImportsCheck";
        mainProgram = args.meta.mainProgram or null;
        description = args.meta.description or null;
        homepage = args.meta.homepage or null;
      };
      drv =
        shDrv "${args.pname}-${args.version}"
          ''
            mkdir -p "$out/bin" "$out/share/stub"
            cp -R "$src" "$out/share/stub/source"
            printf '%s\n' "$stubArgs" > "$out/share/stub/args.json"
            printf '#!/bin/sh\necho "stub build: only nixpkgs builds the real %s" >&2\nexit 70\n' "$pname" > "$out/bin/$mainProgram"
            chmod +x "$out/bin/$mainProgram"
          ''
          {
            inherit (args) src pname;
            mainProgram = recorded.mainProgram;
            stubArgs = toJSON recorded;
          };
    in
    if unknown != [ ] then
      throw "stub buildPythonApplication: unknown argument(s) ${concatStringsSep ", " unknown}"
    else if !(args ? pyproject || args ? format) then
      throw "stub buildPythonApplication: set pyproject = true (or format)"
    else if recorded.mainProgram == null then
      throw "stub buildPythonApplication: meta.mainProgram is not set"
    else
      drv
      // {
        inherit (args) pname version;
        meta = args.meta or { };
        passthru = args.passthru or { };
        stubArgs = recorded;
      };

  pkgs = {
    inherit lib system python3Packages;
    python3 = {
      pkgs = python3Packages;
      withPackages =
        f:
        let
          ps = names (f pythonAttrs);
        in
        shDrv "python3-env" ''mkdir -p "$out"; printf '%s\n' $packages > "$out/packages"'' { packages = ps; }
        // {
          stubPackages = ps;
        };
    };
    ruff = shDrv "ruff-stub" ''mkdir -p "$out/bin"'' { };
    gnumake = shDrv "gnumake-stub" ''mkdir -p "$out/bin"'' { };

    # As nixpkgs: fills the function's arguments from pkgs, then overrides.
    callPackage =
      fn: overrides:
      let
        f = if builtins.isFunction fn then fn else import fn;
        formals = builtins.functionArgs f;
        auto = builtins.intersectAttrs formals pkgs;
        missing = filter (n: !formals.${n} && !(auto ? ${n}) && !(overrides ? ${n})) (attrNames formals);
      in
      if missing != [ ] then
        throw "stub callPackage: no stub for argument(s) ${concatStringsSep ", " missing}"
      else
        f (auto // overrides);

    mkShell =
      {
        inputsFrom ? [ ],
        packages ? [ ],
        shellHook ? "",
        name ? "nix-shell",
      }:
      shDrv name ''printf '%s\n' "$shellHook" > "$out"'' {
        inherit shellHook;
        inputs = map (p: "${p}") (inputsFrom ++ packages);
      }
      // {
        stubShell = {
          inputsFrom = map (p: p.pname or p.name) inputsFrom;
          packages = map (p: p.stubPackages or p.name) packages;
        };
      };

    # The script is recorded, not run: the packages it would call are stubs.
    # tests/test_packaging.py replays stubScript against the pip-built venv.
    runCommand =
      name: env: script:
      shDrv name ''printf '%s' "$stubScript" > "$out"'' (env // { stubScript = script; })
      // {
        stubScript = script;
      };
  };
in
pkgs
