# The few nixpkgs `lib` functions that flake.nix and nix/package.nix use,
# re-implemented with builtins for the offline checks. Same contracts as the
# real ones where it matters: fileset paths must exist, filesets hold files
# only (no empty directories reach the source), getExe needs meta.mainProgram.
# If the Nix files start using another lib function, evaluation fails loudly
# with "attribute ... missing" and this file has to grow.
let
  inherit (builtins)
    attrNames
    any
    concatMap
    concatStringsSep
    dirOf
    filter
    listToAttrs
    match
    pathExists
    readDir
    replaceStrings
    stringLength
    substring
    ;

  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix = suf: s:
    let
      n = stringLength s;
      k = stringLength suf;
    in
    k <= n && substring (n - k) k s == suf;
  isUnder = dir: p: p == dir || hasPrefix (dir + "/") p;

  # Regular files (and symlinks) at or below path p, as strings.
  walk =
    p:
    let
      name = baseNameOf (toString p);
      type = (readDir (dirOf p)).${name};
    in
    if type == "directory" then walkDir p else [ { path = toString p; inherit name type; } ];
  walkDir =
    dir:
    let
      entries = readDir dir;
    in
    concatMap (
      n:
      if entries.${n} == "directory" then walkDir (dir + "/${n}") else [ { path = toString dir + "/${n}"; name = n; type = entries.${n}; } ]
    ) (attrNames entries);

  # A fileset: the roots to walk and a predicate on each file found there.
  coerce =
    x:
    if x ? _stubFileset then
      x
    else if builtins.isPath x then
      (
        if pathExists x then
          {
            _stubFileset = true;
            roots = [ x ];
            include = f: isUnder (toString x) f.path;
          }
        else
          throw "lib.fileset: path ${toString x} does not exist"
      )
    else
      throw "lib.fileset: expected a path or a fileset";

  ancestors =
    root: p:
    let
      parent = dirOf p;
    in
    if p == root || !(isUnder root parent) then [ ] else [ parent ] ++ ancestors root parent;
in
rec {
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  importTOML = path: builtins.fromTOML (builtins.readFile path);
  getExe =
    x:
    if x ? meta.mainProgram then
      "${x}/bin/${x.meta.mainProgram}"
    else
      throw "lib.getExe: ${x.name or "package"} has no meta.mainProgram";

  # As nixpkgs lib.strings.escapeShellArg
  escapeShellArg =
    arg:
    let
      s = toString arg;
    in
    if match "[[:alnum:],._+:@%/-]+" s == null then "'${replaceStrings [ "'" ] [ "'\\''" ] s}'" else s;

  licenses.asl20 = {
    spdxId = "Apache-2.0";
    shortName = "asl20";
    fullName = "Apache License 2.0";
  };
  platforms.unix = [
    "x86_64-linux"
    "aarch64-linux"
    "x86_64-darwin"
    "aarch64-darwin"
  ];
  systems.flakeExposed = platforms.unix;

  fileset = {
    unions =
      sets:
      let
        cs = map coerce sets;
      in
      {
        _stubFileset = true;
        roots = concatMap (s: s.roots) cs;
        include = f: any (s: s.include f) cs;
      };
    difference =
      a: b:
      let
        ca = coerce a;
        cb = coerce b;
      in
      {
        _stubFileset = true;
        inherit (ca) roots;
        include = f: ca.include f && !(cb.include f);
      };
    fileFilter = pred: dir: {
      _stubFileset = true;
      roots = [ dir ];
      include =
        f:
        isUnder (toString dir) f.path
        && pred {
          inherit (f) name type;
          hasExt = ext: hasSuffix ".${ext}" f.name;
        };
    };
    toSource =
      { root, fileset }:
      let
        set = coerce fileset;
        rootStr = toString root;
        outside = filter (r: !(isUnder rootStr (toString r))) set.roots;
        files = filter set.include (concatMap walk set.roots);
        keep = listToAttrs (
          map (p: { name = p; value = true; }) (
            concatMap (f: [ f.path ] ++ ancestors rootStr f.path) files
          )
        );
      in
      if outside != [ ] then
        throw "lib.fileset.toSource: ${concatStringsSep ", " (map toString outside)} not under root ${rootStr}"
      else
        builtins.path {
          name = "source";
          path = root;
          filter = p: _type: keep ? ${p};
        };
  };
}
