/**
 * The initramfs manifest: the one schema shared by `vdboot mkinitramfs` (which writes it as
 * JSON at MANIFEST_PATH inside the initramfs) and the init (which reads it at boot). The init
 * never parses kmod's text files to load its own kernel's modules: everything it needs is
 * precomputed here. (For another kernel, one it starts with kexec, it writes such a manifest
 * itself from that kernel's modules.dep/.alias/.builtin: kmod-index.ts.)
 *
 * Module names are stored canonical: the kernel's spelling with `_` (as in /sys/module).
 * `-` and `_` are equivalent in a module name (`dm-mod` is `dm_mod`); case is not.
 * Use `moduleKey()` or `findModule()` for any lookup.
 *
 * Engine-neutral: plain ECMAScript, safe to run in QuickJS.
 */

/** Where the manifest sits inside the initramfs. */
export const MANIFEST_PATH = '/etc/vdboot/manifest.json';
/** The schema version written by this generator; the init refuses other major versions. */
export const MANIFEST_VERSION = 1;

export interface InitramfsManifest {
  version: number;
  /** `uname -r` of the kernel the modules belong to, e.g. "6.1.0-56-amd64". */
  kernelRelease: string;
  build: ManifestBuildInfo;
  /** Every module in the initramfs, by canonical name (`moduleKey`). */
  modules: Record<string, ManifestModule>;
  /**
   * The modalias table for the included modules only: fnmatch patterns (`*`, `?`, `[...]`)
   * as in modules.alias, each with the canonical names of the modules that declare it.
   * Sorted by pattern. Use `matchModalias()`.
   */
  aliases: Array<[pattern: string, modules: string[]]>;
  /**
   * `aliases` grouped by literal prefix (see `buildAliasIndex`), written by the generator so
   * the init does not build it at boot: JSON.parse builds it in C, while a loop over every
   * pattern's characters runs in the interpreter (slow under emulation). Optional: the init
   * builds it when absent.
   */
  aliasIndex?: ManifestAliasIndex;
  /** Modules built into the kernel (canonical names): never loaded, always "present". */
  builtin: string[];
  /**
   * Modules the init loads at boot unconditionally, in this order (each with its deps
   * first): filesystems, device-mapper, loop, nbd/fuse when their tools are included, …
   * They are requested by name (mount's request_module), which the init must do itself.
   */
  preload: string[];
  /**
   * Filesystem type (as given to mount(2)) → the module that provides it, or "" when it is
   * built in. From the `fs-TYPE` aliases. Types missing here are unknown to this initramfs.
   */
  filesystems: Record<string, string>;
  /** Programs in the initramfs, as absolute paths inside it. */
  tools: ManifestTools;
  /**
   * For a kernel that cannot decompress modules itself (no CONFIG_MODULE_DECOMPRESS, or not
   * for this format): per compression, the argv of a program in the initramfs that writes
   * the decompressed module from stdin to stdout (`["/bin/busybox", "xzcat"]`). The init
   * runs it into a memfd and loads that. A compressed module whose format has no entry
   * here goes to the kernel as it is, with MODULE_INIT_COMPRESSED_FILE. Absent: none.
   */
  decompressors?: Partial<Record<Exclude<ManifestModule['compression'], ''>, string[]>>;
}

export interface ManifestAliasIndex {
  /** The distinct prefix lengths, ascending. */
  prefixLengths: number[];
  /** Literal prefix → indices into `aliases` of the patterns with that prefix. */
  byPrefix: Record<string, number[]>;
}

export interface ManifestBuildInfo {
  /** "vdboot mkinitramfs VERSION" */
  generator: string;
  /** Seconds since the epoch used for every mtime (SOURCE_DATE_EPOCH, or 0). */
  sourceDateEpoch: number;
  /** "zstd" | "gzip" | "xz" | "none" */
  compression: string;
  /** The modules directory read on the host, e.g. "/lib/modules/6.1.0-56-amd64". */
  modulesDir: string;
  /** Names given with --add-module, canonical. */
  addedModules: string[];
  /** Present when built with --hostonly: what the build machine needed, and what was left out. */
  hostonly?: ManifestHostonly;
  /**
   * The filesystem type the root most likely has, known when the image is built: the
   * --root device's with --hostonly, else the build machine's own / (the machine an
   * initramfs is usually built for). The init loads its module with the storage drivers,
   * while it waits for the root device, instead of after. Absent when unknown.
   */
  rootFsType?: string;
}

export interface ManifestHostonly {
  /** The build machine's block devices and the storage modules each one's device chain had bound ("sda": ["sd_mod", "ahci"]). */
  storage: Record<string, string[]>;
  /** The build machine's wired network interfaces and their driver modules ("eth0": ["virtio_net", "virtio_pci"]), for roots on an NBD server. */
  network?: Record<string, string[]>;
  /** The filesystem types included (the machine's mounted ones and the --root device's). */
  filesystems: string[];
  /** The --root spec given, if any. */
  root?: string;
  /**
   * The modalias patterns of the universal set's storage drivers this image left out, with
   * their modules: a device that matches one at boot is named in a warning, with the module.
   */
  leftOut: Array<[pattern: string, modules: string[]]>;
  /** Default programs left out because this machine's root needs none (ntfs-3g, cryptsetup): named at boot when one is needed. */
  toolsLeftOut?: string[];
}

export interface ManifestModule {
  /** Canonical name (`_` not `-`), as the kernel reports it in /sys/module. */
  name: string;
  /** Absolute path of the .ko inside the initramfs. */
  path: string;
  /**
   * Every hard dependency (the transitive closure from modules.dep), in load order:
   * deps[0] first. All of them are in `modules` (or built in, then omitted).
   */
  deps: string[];
  /** modules.softdep `pre:` entries resolved to included modules (load before, best effort). */
  softPre: string[];
  /** modules.softdep `post:` entries resolved to included modules (load after, best effort). */
  softPost: string[];
  /** Module parameters for finit_module ("" for none), from modprobe.d `options`. */
  options: string;
  /**
   * How the file is compressed: "" for a plain .ko (`path` ends in .ko), else as shipped
   * (`path` ends in .ko.xz, .ko.zst, .ko.gz). The kernel decompresses it itself
   * (finit_module's MODULE_INIT_COMPRESSED_FILE, CONFIG_MODULE_DECOMPRESS) unless
   * `decompressors` names a program for the format.
   */
  compression: '' | 'xz' | 'zst' | 'gz';
}

export interface ManifestTools {
  /** busybox for the rescue shell, always present. */
  busybox: string;
  /** ntfs-3g, when included (the loop path on a kernel without ntfs3). */
  ntfs3g?: string;
  /** qemu-nbd, when included (the nbd path). */
  qemuNbd?: string;
  /** zstd and lz4, when included: root=tmpfs: archives in those compressions unpack at C speed. */
  zstd?: string;
  lz4?: string;
  /** cryptsetup, when included: unlocks LUKS volumes. */
  cryptsetup?: string;
}

/** The canonical spelling of a module name: `-` and `_` are the same to the kernel. */
export function moduleKey(name: string): string {
  return name.replace(/-/g, '_');
}

/** The module called `name` (`-`/`_` equivalent), or undefined when it is not included. */
export function findModule(manifest: InitramfsManifest, name: string): ManifestModule | undefined {
  const key = moduleKey(name);
  return Object.prototype.hasOwnProperty.call(manifest.modules, key) ? manifest.modules[key] : undefined;
}

/** Whether `name` is built into the kernel. */
export function isBuiltin(manifest: InitramfsManifest, name: string): boolean {
  return builtinSet(manifest).has(moduleKey(name));
}

const builtinCache = new WeakMap<InitramfsManifest, Set<string>>();
function builtinSet(manifest: InitramfsManifest): Set<string> {
  let s = builtinCache.get(manifest);
  if (!s) {
    s = new Set(manifest.builtin.map(moduleKey));
    builtinCache.set(manifest, s);
  }
  return s;
}

/**
 * The module that provides filesystem type `fstype`: a name, "" when built in, or undefined
 * when this initramfs does not know the type.
 */
export function moduleForFilesystem(manifest: InitramfsManifest, fstype: string): string | undefined {
  return Object.prototype.hasOwnProperty.call(manifest.filesystems, fstype) ? manifest.filesystems[fstype] : undefined;
}

/**
 * The modules to load, in an order that loads every hard dependency before its user, for
 * the requested `names` (each `-`/`_` equivalent; unknown and built-in names are skipped;
 * softdep `pre:` modules come before and `post:` modules after their module, best effort).
 * Each module appears once.
 */
export function loadOrder(manifest: InitramfsManifest, names: readonly string[]): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visiting = new Set<string>();
  const visit = (name: string, withSoft: boolean): void => {
    const m = findModule(manifest, name);
    if (!m || seen.has(m.name) || visiting.has(m.name)) return;
    visiting.add(m.name);
    if (withSoft) for (const p of m.softPre) visit(p, true);
    for (const d of m.deps) visit(d, false);
    visiting.delete(m.name);
    if (seen.has(m.name)) return;
    seen.add(m.name);
    out.push(m.name);
    if (withSoft) for (const p of m.softPost) visit(p, true);
  };
  for (const n of names) visit(n, true);
  return out;
}

/**
 * `loadOrder` split into waves for parallel loading: every module's hard dependencies sit in
 * earlier waves, so the modules within one wave may be loaded concurrently.
 */
export function loadWaves(manifest: InitramfsManifest, names: readonly string[]): string[][] {
  const order = loadOrder(manifest, names);
  const level = new Map<string, number>();
  const waves: string[][] = [];
  for (const name of order) {
    const m = manifest.modules[name];
    let l = 0;
    for (const d of m.deps) {
      const dl = level.get(moduleKey(d));
      if (dl !== undefined && dl + 1 > l) l = dl + 1;
    }
    // softdep pre: placed strictly after its pre-modules when they are in this load
    for (const p of m.softPre) {
      const pl = level.get(moduleKey(p));
      if (pl !== undefined && pl + 1 > l) l = pl + 1;
    }
    level.set(name, l);
    (waves[l] ??= []).push(name);
  }
  return waves;
}

// ---------------------------------------------------------------- modalias matching

/**
 * The patterns grouped by their literal prefix (the text before the first wildcard):
 * "pci:v00008086d00002922sv" for most PCI ids, "pci:v" for class matches, "" for patterns
 * that start with a wildcard. A modalias string can only match patterns whose prefix it
 * starts with, so a lookup tries one probe per distinct prefix length and runs fnmatch on
 * the few candidates found: a few dozen instead of the whole table, per device.
 */
export function buildAliasIndex(aliases: InitramfsManifest['aliases']): ManifestAliasIndex {
  const byPrefix: Record<string, number[]> = Object.create(null) as Record<string, number[]>;
  const lengths = new Set<number>();
  aliases.forEach(([pattern], i) => {
    const wild = firstWildcard(pattern);
    const prefix = wild < 0 ? pattern : pattern.slice(0, wild);
    (byPrefix[prefix] ??= []).push(i);
    lengths.add(prefix.length);
  });
  return { prefixLengths: [...lengths].sort((a, b) => a - b), byPrefix };
}

const aliasCache = new WeakMap<InitramfsManifest, ManifestAliasIndex>();

function aliasIndex(manifest: InitramfsManifest): ManifestAliasIndex {
  let idx = aliasCache.get(manifest);
  if (idx) return idx;
  const given = manifest.aliasIndex;
  idx = given && Array.isArray(given.prefixLengths) && typeof given.byPrefix === 'object' && given.byPrefix !== null ? given : buildAliasIndex(manifest.aliases);
  aliasCache.set(manifest, idx);
  return idx;
}

function firstWildcard(s: string): number {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 42 /* * */ || c === 63 /* ? */ || c === 91 /* [ */ || c === 92 /* \ */) return i;
  }
  return -1;
}

/**
 * The included modules for `modalias` (a device's /sys/devices/.../modalias or a uevent's
 * MODALIAS), as `modprobe --resolve-alias` answers restricted to this initramfs: a module
 * name gives that module alone; otherwise every module with a matching alias pattern.
 * Canonical names, sorted, each once. Built-in modules are not listed (the kernel has them).
 */
export function matchModalias(manifest: InitramfsManifest, modalias: string): string[] {
  const direct = findModule(manifest, modalias);
  if (direct) return [direct.name];
  const found = new Set<string>();
  const idx = aliasIndex(manifest);
  const has = Object.prototype.hasOwnProperty;
  for (const len of idx.prefixLengths) {
    if (len > modalias.length) break;
    const key = len === modalias.length ? modalias : modalias.slice(0, len);
    if (!has.call(idx.byPrefix, key)) continue;
    for (const i of idx.byPrefix[key]!) {
      const entry = manifest.aliases[i];
      // a hand-edited index must not crash the init: bad entries are skipped
      if (entry && typeof entry[0] === 'string' && Array.isArray(entry[1]) && fnmatch(entry[0], modalias)) for (const m of entry[1]) found.add(m);
    }
  }
  return [...found].sort();
}

/**
 * fnmatch(3) without flags, as kmod uses it for aliases: `*` any run (including '/'),
 * `?` one character, `[abc]`, `[a-z]`, `[!x]`/`[^x]` a class, `\x` a literal x.
 * Iterative with single-star backtracking: linear-ish, no recursion.
 */
export function fnmatch(pattern: string, text: string): boolean {
  let p = 0;
  let t = 0;
  let starP = -1;
  let starT = 0;
  const pl = pattern.length;
  const tl = text.length;
  while (t < tl) {
    if (p < pl) {
      const pc = pattern.charCodeAt(p);
      if (pc === 42 /* * */) {
        starP = ++p;
        starT = t;
        continue;
      }
      if (pc === 63 /* ? */) {
        p++;
        t++;
        continue;
      }
      if (pc === 91 /* [ */) {
        const end = classEnd(pattern, p);
        if (end > 0) {
          if (classMatches(pattern, p + 1, end, text.charCodeAt(t))) {
            p = end + 1;
            t++;
            continue;
          }
        } else if (text.charCodeAt(t) === 91) {
          // an unterminated '[' is a literal
          p++;
          t++;
          continue;
        }
      } else if (pc === 92 /* \ */ && p + 1 < pl) {
        if (pattern.charCodeAt(p + 1) === text.charCodeAt(t)) {
          p += 2;
          t++;
          continue;
        }
      } else if (pc === text.charCodeAt(t)) {
        p++;
        t++;
        continue;
      }
    }
    if (starP >= 0) {
      p = starP;
      t = ++starT;
      continue;
    }
    return false;
  }
  while (p < pl && pattern.charCodeAt(p) === 42) p++;
  return p === pl;
}

/** Index of the ']' closing the class that opens at `open`, or -1. */
function classEnd(pattern: string, open: number): number {
  let i = open + 1;
  if (i < pattern.length && (pattern[i] === '!' || pattern[i] === '^')) i++;
  if (i < pattern.length && pattern[i] === ']') i++; // a leading ']' is a member
  for (; i < pattern.length; i++) {
    if (pattern[i] === ']') return i;
  }
  return -1;
}

function classMatches(pattern: string, from: number, end: number, c: number): boolean {
  let i = from;
  let negate = false;
  if (pattern[i] === '!' || pattern[i] === '^') {
    negate = true;
    i++;
  }
  let hit = false;
  while (i < end) {
    const lo = pattern.charCodeAt(i);
    if (i + 2 < end && pattern[i + 1] === '-') {
      const hi = pattern.charCodeAt(i + 2);
      if (c >= lo && c <= hi) hit = true;
      i += 3;
    } else {
      if (c === lo) hit = true;
      i++;
    }
  }
  return hit !== negate;
}

/**
 * Checks the shape of a parsed manifest before the init trusts it; returns problems written
 * for the console (empty when fine). The manifest comes from our own generator, but a
 * truncated or hand-edited file must give a message, not a crash.
 */
export function validateManifest(value: unknown): string[] {
  const problems: string[] = [];
  if (typeof value !== 'object' || value === null) return ['the manifest is not a JSON object'];
  const m = value as Partial<InitramfsManifest>;
  if (m.version !== MANIFEST_VERSION) problems.push(`manifest version ${String(m.version)} is not ${MANIFEST_VERSION}; rebuild the initramfs with this vdboot`);
  if (typeof m.kernelRelease !== 'string') problems.push('kernelRelease is missing');
  if (typeof m.modules !== 'object' || m.modules === null) problems.push('modules is missing');
  else
    for (const [k, mod] of Object.entries(m.modules)) {
      if (typeof mod !== 'object' || mod === null || typeof mod.path !== 'string' || !Array.isArray(mod.deps)) {
        problems.push(`module ${k} has no path or deps`);
        continue;
      }
      for (const d of mod.deps) if (!Object.prototype.hasOwnProperty.call(m.modules, moduleKey(d))) problems.push(`module ${k} depends on ${d}, which is not in the initramfs`);
    }
  if (!Array.isArray(m.aliases)) problems.push('aliases is missing');
  if (!Array.isArray(m.builtin)) problems.push('builtin is missing');
  if (!Array.isArray(m.preload)) problems.push('preload is missing');
  if (typeof m.filesystems !== 'object' || m.filesystems === null) problems.push('filesystems is missing');
  if (typeof m.tools !== 'object' || m.tools === null || typeof m.tools.busybox !== 'string') problems.push('tools.busybox is missing');
  if (m.decompressors !== undefined) {
    if (typeof m.decompressors !== 'object' || m.decompressors === null) problems.push('decompressors is not an object');
    else
      for (const [format, argv] of Object.entries(m.decompressors)) {
        if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === 'string')) problems.push(`decompressors.${format} is not a program's argv`);
      }
  }
  return problems;
}
