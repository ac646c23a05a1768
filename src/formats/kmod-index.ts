/**
 * A kernel's module index as depmod writes it in /lib/modules/RELEASE (modules.dep,
 * modules.alias, modules.builtin, modules.softdep, modules.builtin.modinfo), read from its
 * text, and turned into an initramfs manifest for that kernel. The init uses this only to
 * hand a kernel found in the root (kexec.ts) an initramfs of its own: the manifest it
 * boots with was precomputed as usual, this one is computed at boot for the next kernel.
 *
 * Engine-neutral: plain ECMAScript, safe to run in QuickJS.
 */
import { buildAliasIndex, moduleKey, MANIFEST_VERSION, type InitramfsManifest, type ManifestModule } from './manifest.ts';

export interface ModuleIndex {
  release: string;
  /** canonical name → path relative to the modules directory (kernel/fs/ext4/ext4.ko.xz) */
  files: Map<string, string>;
  /** canonical name → its hard dependencies as modules.dep lists them (canonical names) */
  depList: DepList;
  /** canonical name → softdep pre/post names as written */
  softdeps: Map<string, { pre: string[]; post: string[] }>;
  /** canonical names of the modules built into the kernel */
  builtin: Set<string>;
}

/** The canonical module name of a path in modules.dep ("kernel/drivers/md/dm-mod.ko.xz" → "dm_mod"). */
export function moduleNameOfPath(p: string): string {
  const slash = p.lastIndexOf('/') + 1;
  const ko = p.lastIndexOf('.ko');
  const end = ko > slash && (ko + 3 === p.length || p.charCodeAt(ko + 3) === 46 /* . */) ? ko : p.length;
  const name = p.slice(slash, end);
  return name.indexOf('-') >= 0 ? moduleKey(name) : name;
}

/**
 * modules.dep's dependency lists, each turned into names when first asked for: a kernel
 * lists thousands of modules and the init wants the lists of a few dozen (the interpreter
 * is slow under emulation, so the work not done counts).
 */
export class DepList {
  private readonly parsed = new Map<string, string[]>();
  /** `at`: where each module's dependency list starts in `text` (after its colon) */
  constructor(private readonly text: string, private readonly at: Map<string, number>) {}

  get(name: string): string[] | undefined {
    let deps = this.parsed.get(name);
    if (deps) return deps;
    const start = this.at.get(name);
    if (start === undefined) return undefined;
    let end = this.text.indexOf('\n', start);
    if (end < 0) end = this.text.length;
    const text = this.text.slice(start, end).trim();
    deps = text ? text.split(/\s+/).map(moduleNameOfPath) : [];
    this.parsed.set(name, deps);
    return deps;
  }

  has(name: string): boolean {
    return this.at.has(name);
  }
}

/** modules.dep: "path: dep-path dep-path …" per line. */
export function parseModulesDep(text: string): Pick<ModuleIndex, 'files' | 'depList'> {
  const files = new Map<string, string>();
  const at = new Map<string, number>();
  // Line by line with indexOf, keeping only where each dependency list starts: few
  // strings are made (each costs an allocation, and there are thousands of lines).
  const len = text.length;
  for (let pos = 0; pos < len; ) {
    let nl = text.indexOf('\n', pos);
    if (nl < 0) nl = len;
    const colon = text.indexOf(':', pos);
    if (colon > pos && colon < nl) {
      const file = text.slice(pos, colon).trim();
      if (file) {
        const name = moduleNameOfPath(file);
        files.set(name, file);
        at.set(name, colon + 1);
      }
    }
    pos = nl + 1;
  }
  return { files, depList: new DepList(text, at) };
}

/**
 * modules.alias: "alias PATTERN MODULE" per line, in file order. `keep` filters by the
 * module's canonical name before anything else is done with the line (the file has tens
 * of thousands of lines; the init wants the few that belong to its modules).
 */
export function parseModulesAlias(text: string, keep?: ((name: string) => boolean) | ReadonlySet<string>): Array<[pattern: string, module: string]> {
  const out: Array<[string, string]> = [];
  const filter = keep instanceof Set ? (n: string) => keep.has(n) : (keep as ((name: string) => boolean) | undefined);
  // Line by line with indexOf: only the module name of each line becomes a string before
  // the filter (tens of thousands of lines; every string costs an allocation).
  const len = text.length;
  for (let pos = 0; pos < len; ) {
    let nl = text.indexOf('\n', pos);
    if (nl < 0) nl = len;
    let end = nl;
    while (end > pos && (text.charCodeAt(end - 1) === 32 || text.charCodeAt(end - 1) === 13 || text.charCodeAt(end - 1) === 9)) end--;
    const sp = text.lastIndexOf(' ', end - 1);
    if (sp > pos + 6 && text.startsWith('alias ', pos)) {
      const raw = text.slice(sp + 1, end);
      const name = raw.indexOf('-') >= 0 ? moduleKey(raw) : raw;
      if (!filter || filter(name)) {
        const pattern = text.slice(pos + 6, sp).trim();
        if (pattern) out.push([pattern, name]);
      }
    }
    pos = nl + 1;
  }
  return out;
}

/** modules.builtin: one path per line. */
export function parseModulesBuiltin(text: string): Set<string> {
  const out = new Set<string>();
  for (const line of text.split('\n')) if (line.trim()) out.add(moduleNameOfPath(line.trim()));
  return out;
}

/** modules.softdep (and modprobe.d) lines: "softdep MODULE pre: A B post: C". */
export function parseSoftdeps(text: string): Map<string, { pre: string[]; post: string[] }> {
  const out = new Map<string, { pre: string[]; post: string[] }>();
  for (const line of text.split('\n')) {
    const words = line.replace(/#.*/, '').trim().split(/\s+/);
    if (words[0] !== 'softdep' || words.length < 3) continue;
    const name = moduleKey(words[1]!);
    const entry = out.get(name) ?? { pre: [], post: [] };
    let mode: 'pre' | 'post' | '' = '';
    for (const w of words.slice(2)) {
      if (w === 'pre:') mode = 'pre';
      else if (w === 'post:') mode = 'post';
      else if (mode) entry[mode].push(w);
    }
    out.set(name, entry);
  }
  return out;
}

/** Filesystem types the kernel has built in: the `fs-TYPE` aliases of modules.builtin.modinfo (NUL-separated "module.key=value" records). */
export function builtinFilesystems(modinfo: string): string[] {
  const out = new Set<string>();
  const re = /(?:^|\0)[^.\0]+\.alias=fs-([^\0]+)/g;
  for (let m = re.exec(modinfo); m; m = re.exec(modinfo)) out.add(m[1]!);
  return [...out].sort();
}

/**
 * Orders two kernel releases as version numbers: "6.12.118+deb12-amd64" after
 * "6.1.0-57-amd64", "6.1.0-57" after "6.1.0-9". Runs of digits compare as numbers, other
 * runs as text; a release that is a prefix of the other sorts first. Negative when a < b.
 */
export function compareKernelReleases(a: string, b: string): number {
  const pa = a.match(/\d+|\D+/g) ?? [];
  const pb = b.match(/\d+|\D+/g) ?? [];
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    const x = pa[i]!;
    const y = pb[i]!;
    if (x === y) continue;
    const nx = /^\d/.test(x);
    const ny = /^\d/.test(y);
    if (nx && ny) return Number(x) - Number(y) || (x < y ? -1 : 1);
    // a number beats a separator: 6.1.10 after 6.1-rc
    if (nx !== ny) return nx ? 1 : -1;
    return x < y ? -1 : 1;
  }
  return pa.length - pb.length;
}

/**
 * The release string inside a bzImage (the x86 boot protocol's setup header: "HdrS" at
 * 0x202, the kernel_version pointer at 0x20E, plus 0x200), or undefined when `head` (the
 * file's first 64 KiB or less) is not one. The release is the version string's first word.
 */
export function bzImageRelease(head: Uint8Array): string | undefined {
  if (head.length < 0x210 || head[0x202] !== 0x48 || head[0x203] !== 0x64 || head[0x204] !== 0x72 || head[0x205] !== 0x53) return undefined;
  const off = (head[0x20e]! | (head[0x20f]! << 8)) + 0x200;
  if (off >= head.length) return undefined;
  let s = '';
  for (let i = off; i < head.length && i < off + 256; i++) {
    const c = head[i]!;
    if (c === 0 || c === 0x20) break;
    s += String.fromCharCode(c);
  }
  return /^[\w.+~-]+$/.test(s) ? s : undefined;
}

/** The module files of a manifest made by manifestForKernel, to copy from the root's modules directory. */
export interface KernelModuleFile {
  /** path relative to the modules directory, as modules.dep names it */
  rel: string;
  /** absolute path inside the new initramfs */
  path: string;
}

export interface KernelManifest {
  manifest: InitramfsManifest;
  files: KernelModuleFile[];
  /** modules of the running initramfs that the new kernel has neither as a module nor built in */
  missing: string[];
}

/**
 * A manifest for another kernel with the same module set as `running` (the manifest the
 * init booted with): every module it lists, by name, resolved through the other kernel's
 * index, with that kernel's dependencies (the closure over modules.dep and softdeps),
 * aliases, built-ins and filesystem types. Module files keep their compression (the
 * kernel decompresses them: finit_module's MODULE_INIT_COMPRESSED_FILE); their paths are
 * the index's under /lib/modules/RELEASE. Tools and preloads are the running manifest's.
 * With `only` (module names), the running set is cut down to those names first.
 */
export function manifestForKernel(index: ModuleIndex, aliasText: string, builtinModinfo: string, running: InitramfsManifest, only?: ReadonlySet<string>): KernelManifest {
  // `only`: of the running initramfs's modules, those this boot loaded (/proc/modules):
  // what reached the root on this machine. Modules asked for at build time (--add-module)
  // and preloads stay whatever was loaded.
  const preload = new Set(running.preload.map(moduleKey));
  const kept = only ? Object.keys(running.modules).filter((m) => only.has(m) || preload.has(m)) : Object.keys(running.modules);
  const wanted = new Set<string>([...kept, ...running.build.addedModules.map(moduleKey)]);
  const roots: string[] = [];
  const missing: string[] = [];
  for (const name of [...wanted].sort()) {
    if (index.files.has(name)) roots.push(name);
    else if (!index.builtin.has(name)) missing.push(name);
  }
  const resolve = (n: string): string | undefined => {
    const k = moduleKey(n);
    return index.files.has(k) ? k : undefined;
  };
  const included = new Set<string>();
  const queue = [...roots];
  while (queue.length) {
    const name = queue.shift()!;
    if (included.has(name)) continue;
    included.add(name);
    for (const d of index.depList.get(name) ?? []) if (index.files.has(d)) queue.push(d);
    const soft = index.softdeps.get(name);
    if (soft) for (const s of [...soft.pre, ...soft.post]) { const r = resolve(s); if (r) queue.push(r); }
  }

  const modRoot = `/lib/modules/${index.release}`;
  const modules: Record<string, ManifestModule> = {};
  const files: KernelModuleFile[] = [];
  for (const name of [...included].sort()) {
    const rel = index.files.get(name)!;
    const ext = /\.ko\.(xz|zst|gz)$/.exec(rel);
    const soft = index.softdeps.get(name) ?? { pre: [], post: [] };
    const resolveList = (list: string[]) => list.map(resolve).filter((m): m is string => m !== undefined && m !== name && included.has(m));
    const before = running.modules[name];
    modules[name] = {
      name,
      path: `${modRoot}/${rel}`,
      deps: hardDepsInLoadOrder(index.depList, name).filter((d) => included.has(d)),
      // the running manifest's softPre carries the charsets a filesystem asks for at mount
      softPre: [...new Set([...resolveList(soft.pre), ...resolveList(before?.softPre ?? [])])],
      softPost: [...new Set([...resolveList(soft.post), ...resolveList(before?.softPost ?? [])])],
      options: before?.options ?? '',
      compression: ext ? (ext[1] as 'xz' | 'zst' | 'gz') : '',
    };
    files.push({ rel, path: `${modRoot}/${rel}` });
  }

  const grouped = new Map<string, Set<string>>();
  const fsTypes: Record<string, string> = {};
  for (const t of builtinFilesystems(builtinModinfo)) fsTypes[t] = '';
  for (const [pattern, mod] of parseModulesAlias(aliasText, included)) {
    let s = grouped.get(pattern);
    if (!s) grouped.set(pattern, (s = new Set()));
    s.add(mod);
    if (pattern.startsWith('fs-') && !/[*?[]/.test(pattern)) fsTypes[pattern.slice(3)] = mod;
  }
  const aliases: Array<[string, string[]]> = [...grouped.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([p, s]) => [p, [...s].sort()]);
  const filesystems: Record<string, string> = {};
  for (const t of Object.keys(fsTypes).sort()) filesystems[t] = fsTypes[t]!;

  const manifest: InitramfsManifest = {
    version: MANIFEST_VERSION,
    kernelRelease: index.release,
    build: {
      generator: `${running.build.generator} (assembled at boot for kexec)`,
      sourceDateEpoch: 0,
      compression: 'none',
      modulesDir: modRoot,
      addedModules: running.build.addedModules,
    },
    modules,
    aliases,
    aliasIndex: buildAliasIndex(aliases),
    builtin: [...index.builtin].sort(),
    preload: running.preload.map(moduleKey).filter((m) => included.has(m)),
    filesystems,
    tools: running.tools,
  };
  return { manifest, files, missing };
}

/**
 * A module's hard dependencies in load order (each after its own dependencies), from
 * modules.dep's transitive lists walked from their end, as modprobe loads them.
 */
export function hardDepsInLoadOrder(depList: Pick<DepList, 'get'>, name: string): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visit = (n: string, stack: Set<string>): void => {
    for (const d of [...(depList.get(n) ?? [])].reverse()) {
      if (seen.has(d) || stack.has(d)) continue;
      stack.add(d);
      visit(d, stack);
      stack.delete(d);
      if (!seen.has(d)) {
        seen.add(d);
        out.push(d);
      }
    }
  };
  visit(name, new Set([name]));
  return out;
}
