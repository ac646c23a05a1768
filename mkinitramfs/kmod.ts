/**
 * Reads a kernel's module index as depmod writes it (/lib/modules/RELEASE/modules.*) and
 * answers what modprobe would: a module's file, its hard dependencies in load order, its
 * softdeps, the modules behind an alias. The init never does this; mkinitramfs precomputes
 * the answers into the manifest.
 */
import { readFileSync, existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { hardDepsInLoadOrder as depsInLoadOrder, moduleNameOfPath, parseModulesAlias, parseModulesBuiltin, parseModulesDep, parseSoftdeps, type DepList } from '../src/formats/kmod-index.ts';
import { matchModalias, moduleKey, MANIFEST_VERSION, type InitramfsManifest } from '../src/formats/manifest.ts';

export { moduleNameOfPath };

export interface KernelModuleIndex {
  /** e.g. /lib/modules/6.1.0-56-amd64 */
  dir: string;
  release: string;
  /** canonical name → path relative to `dir` (kernel/fs/ext4/ext4.ko) */
  files: Map<string, string>;
  /** canonical name → its transitive hard deps as modules.dep lists them (canonical names) */
  depList: DepList;
  /** alias lines in file order: pattern, canonical module name */
  aliases: Array<[string, string]>;
  /** canonical name → softdep pre/post names as written (module names or aliases) */
  softdeps: Map<string, { pre: string[]; post: string[] }>;
  /** canonical names of built-in modules */
  builtin: Set<string>;
  /** canonical name → options from modprobe.d */
  options: Map<string, string>;
}

/** A problem with the user's request or system (unknown module, missing kernel): shown as a message, not a stack. */
export class ModuleError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError'; // the CLI prints UsageErrors as "vdboot: MESSAGE"
  }
}

/** Where depmod's files of one kernel are, given a release or the modules directory itself. */
export function loadModuleIndex(modulesDir: string, modprobeDirs: string[] = ['/lib/modprobe.d', '/etc/modprobe.d']): KernelModuleIndex {
  const depPath = path.join(modulesDir, 'modules.dep');
  if (!existsSync(depPath)) throw new ModuleError(`${depPath} does not exist: ${modulesDir} is not a kernel's modules directory (install the kernel's package, or run depmod)`);
  // the text files are read here; their grammar is src/formats/kmod-index.ts's, which the
  // init also uses for a kernel it starts with kexec
  const aliasPath = path.join(modulesDir, 'modules.alias');
  const builtinPath = path.join(modulesDir, 'modules.builtin');
  const index: KernelModuleIndex = {
    dir: modulesDir,
    release: path.basename(modulesDir),
    ...parseModulesDep(readFileSync(depPath, 'utf8')),
    aliases: existsSync(aliasPath) ? parseModulesAlias(readFileSync(aliasPath, 'utf8')) : [],
    softdeps: new Map(),
    builtin: existsSync(builtinPath) ? parseModulesBuiltin(readFileSync(builtinPath, 'utf8')) : new Set(),
    options: new Map(),
  };
  const softPath = path.join(modulesDir, 'modules.softdep');
  const softLines: string[] = existsSync(softPath) ? readFileSync(softPath, 'utf8').split('\n') : [];
  const confLines: string[] = [];
  for (const dir of modprobeDirs) {
    if (!existsSync(dir)) continue;
    for (const f of readdirSync(dir).filter((n) => n.endsWith('.conf')).sort()) {
      try {
        confLines.push(...readFileSync(path.join(dir, f), 'utf8').split('\n'));
      } catch {
        /* an unreadable config file is skipped, as modprobe does */
      }
    }
  }
  const softLinesText = [...softLines, ...confLines].join('\n');
  index.softdeps = parseSoftdeps(softLinesText);
  for (const line of [...softLines, ...confLines]) {
    const words = line.replace(/#.*/, '').trim().split(/\s+/);
    if (words[0] === 'options' && words.length > 2) {
      const name = moduleKey(words[1]);
      const prev = index.options.get(name);
      const opts = words.slice(2).join(' ');
      index.options.set(name, prev ? `${prev} ${opts}` : opts);
    }
  }
  return index;
}

/** The canonical names of the modules (not built in) that an alias or name resolves to, like `modprobe -R`. */
export function resolveName(index: KernelModuleIndex, nameOrAlias: string): string[] {
  const key = moduleKey(nameOrAlias);
  if (index.files.has(key)) return [key];
  return matchModalias(aliasTable(index), nameOrAlias).filter((m) => index.files.has(m));
}

const aliasTables = new WeakMap<KernelModuleIndex, InitramfsManifest>();
/** All of the kernel's aliases in the manifest's shape, so the init's bucketed matcher serves here too. */
function aliasTable(index: KernelModuleIndex): InitramfsManifest {
  let table = aliasTables.get(index);
  if (!table) {
    const grouped = new Map<string, string[]>();
    for (const [pattern, mod] of index.aliases) {
      const list = grouped.get(pattern);
      if (list) list.push(mod);
      else grouped.set(pattern, [mod]);
    }
    table = {
      version: MANIFEST_VERSION,
      kernelRelease: index.release,
      build: { generator: '', sourceDateEpoch: 0, compression: 'none', modulesDir: index.dir, addedModules: [] },
      modules: {},
      aliases: [...grouped.entries()],
      builtin: [],
      preload: [],
      filesystems: {},
      tools: { busybox: '' },
    };
    aliasTables.set(index, table);
  }
  return table;
}

/**
 * A module's hard dependencies in load order (each dependency after its own dependencies),
 * from modules.dep's transitive lists. Lists are walked from their end, as modprobe loads
 * them, so the order matches `modprobe --show-depends` where the graph allows.
 */
export function hardDepsInLoadOrder(index: KernelModuleIndex, name: string): string[] {
  return depsInLoadOrder(index.depList, name);
}
