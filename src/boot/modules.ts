/**
 * Kernel modules at boot, from the manifest mkinitramfs precomputed (no kmod text is
 * parsed here): coldplug (every device's modalias on every bus), hotplug (MODALIAS of
 * uevents for devices that appear later, such as USB disks), and loading by name
 * (filesystems, which the kernel would otherwise ask modprobe for).
 */
import { findModule, isBuiltin, loadOrder, loadWaves, matchModalias, moduleForFilesystem, type InitramfsManifest, type ManifestModule } from '../formats/manifest.ts';
import { isSysError, MFD, MODULE_INIT, O, type Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import { readTextOr } from './fsutil.ts';

export interface LoadReport {
  loaded: string[];
  failed: { name: string; error: string }[];
}

/** A Sys that can fork (the static host can; the fake kernel cannot). */
interface ForkingSys extends Sys {
  fork(): number;
  _exit(code: number): never;
  nice?(value: number): void;
}

function canFork(sys: Sys): sys is ForkingSys {
  return typeof (sys as Partial<ForkingSys>).fork === 'function' && typeof (sys as Partial<ForkingSys>)._exit === 'function';
}

/** A module's file ready for finit_module: the fd to load and the flags to load it with. */
export interface ModuleFile {
  fd: number;
  flags: number;
}

/** The program the manifest names to decompress `mod` at boot, or undefined (plain, or the kernel decompresses it). */
export function moduleDecompressor(manifest: InitramfsManifest, mod: ManifestModule): string[] | undefined {
  if (!mod.compression) return undefined;
  const argv = manifest.decompressors?.[mod.compression];
  return argv && argv.length > 0 ? argv : undefined;
}

/**
 * Opens `mod` for finit_module; the caller closes the fd.
 *  - a plain .ko: the file, flags 0;
 *  - a compressed one the kernel decompresses (CONFIG_MODULE_DECOMPRESS): the file as it
 *    is, with MODULE_INIT_COMPRESSED_FILE;
 *  - otherwise the manifest's program (busybox xzcat) decompresses it natively, file on its
 *    stdin, a memfd on its stdout; never in the interpreter. The kernel refuses to load a
 *    file someone holds open for writing (ETXTBSY), so the memfd is reopened read-only
 *    through /proc/self/fd and the writable fd closed before the load.
 */
export function openModuleFile(sys: Sys, manifest: InitramfsManifest, mod: ManifestModule): ModuleFile {
  const argv = moduleDecompressor(manifest, mod);
  if (!argv) {
    const fd = sys.open(mod.path, O.RDONLY | O.CLOEXEC);
    return { fd, flags: mod.compression ? MODULE_INIT.COMPRESSED_FILE : 0 };
  }
  const source = sys.open(mod.path, O.RDONLY | O.CLOEXEC);
  let memfd = -1;
  try {
    memfd = sys.memfdCreate(mod.name, MFD.CLOEXEC);
    const pid = sys.spawn(argv[0]!, argv, [], { stdio: [source, memfd, 2] });
    const r = sys.waitpid(pid, 0);
    if (r.exitCode !== 0) throw new Error(`${argv.join(' ')} could not decompress ${mod.path} (${r.termSignal ? `killed by signal ${r.termSignal}` : `exit status ${r.exitCode}`})`);
    return { fd: sys.open(`/proc/self/fd/${memfd}`, O.RDONLY | O.CLOEXEC), flags: 0 };
  } finally {
    sys.close(source);
    if (memfd >= 0) sys.close(memfd);
  }
}

export class ModuleLoader {
  /** canonical names loaded (or found loaded) so far */
  readonly loaded = new Set<string>();
  readonly failed = new Map<string, string>();
  private readonly seenAliases = new Set<string>();

  constructor(private readonly sys: Sys, private readonly manifest: InitramfsManifest, private readonly log: ConsoleLog) {}

  /** How many modules may load at once: the online CPUs (1 when unknown). */
  private parallelism(): number {
    if (!canFork(this.sys)) return 1;
    const online = readTextOr(this.sys, '/sys/devices/system/cpu/online') ?? '0';
    let cpus = 0;
    for (const range of online.split(',')) {
      const [a, b] = range.split('-').map(Number);
      if (a !== undefined && Number.isFinite(a)) cpus += b !== undefined && Number.isFinite(b) ? b - a + 1 : 1;
    }
    return Math.max(1, Math.min(cpus, 8));
  }

  /**
   * Loads `names` and their dependencies: wave by wave (every module's dependencies in an
   * earlier wave), the modules of one wave in parallel child processes when there are
   * several CPUs. Children only call finit_module and exit; the parent then loads the
   * wave again in order, which costs an EEXIST per module already loaded and learns the
   * errno of any that failed. Failures are reported, never thrown.
   */
  load(names: readonly string[]): LoadReport {
    const workers = this.parallelism();
    if (workers < 2) return this.loadSequential(loadOrder(this.manifest, names));
    const report: LoadReport = { loaded: [], failed: [] };
    for (const wave of loadWaves(this.manifest, names)) {
      const todo = wave.filter((n) => !this.loaded.has(n) && !this.failed.has(n));
      if (todo.length > 1) this.loadInChildren(todo, workers);
      const r = this.loadSequential(todo);
      report.loaded.push(...r.loaded);
      report.failed.push(...r.failed);
    }
    return report;
  }

  private loadInChildren(wave: string[], workers: number): void {
    const sys = this.sys as ForkingSys;
    const pids: number[] = [];
    for (let w = 0; w < Math.min(workers, wave.length); w++) {
      let pid: number;
      try {
        pid = sys.fork();
      } catch {
        break; // the parent loads what is left
      }
      if (pid === 0) {
        for (let i = w; i < wave.length; i += workers) {
          try {
            const mod = this.manifest.modules[wave[i]!]!;
            const file = openModuleFile(sys, this.manifest, mod);
            sys.finitModule(file.fd, mod.options, file.flags);
          } catch { /* the parent's pass reports it */ }
        }
        sys._exit(0);
      }
      pids.push(pid);
    }
    for (const pid of pids) {
      try { sys.waitpid(pid, 0); } catch { /* already reaped */ }
    }
  }

  private loadSequential(order: readonly string[]): LoadReport {
    const report: LoadReport = { loaded: [], failed: [] };
    for (const name of order) {
      if (this.loaded.has(name) || this.failed.has(name)) continue;
      const mod = this.manifest.modules[name]!;
      if (mod.deps.some((d) => this.failed.has(d))) {
        const dep = mod.deps.find((d) => this.failed.has(d))!;
        this.failed.set(name, `its dependency ${dep} failed`);
        report.failed.push({ name, error: `its dependency ${dep} failed` });
        continue;
      }
      try {
        // A module a parallel child (or the coldplug child) already loaded is not read (nor
        // decompressed) a second time just to learn EEXIST.
        if ((moduleDecompressor(this.manifest, mod) || this.backgroundNames.has(name)) && this.isLoadedInKernel(name)) {
          this.loaded.add(name);
          report.loaded.push(name);
          continue;
        }
        // Counted in the boot timings whether it loads or fails: a failure costs time too.
        this.log.timings.counted('modules', () => {
          const file = openModuleFile(this.sys, this.manifest, mod);
          try {
            this.sys.finitModule(file.fd, mod.options, file.flags);
          } finally {
            this.sys.close(file.fd);
          }
        });
        this.loaded.add(name);
        report.loaded.push(name);
        this.log.debug(`loaded module ${name}`);
      } catch (e) {
        if (isSysError(e, 'EEXIST')) {
          // Loaded already: by a parallel child, or by the kernel itself.
          this.loaded.add(name);
          report.loaded.push(name);
          continue;
        }
        const error = isSysError(e) ? e.code : (e as Error).message;
        this.failed.set(name, error);
        report.failed.push({ name, error });
      }
    }
    return report;
  }

  /**
   * Whether the kernel has the module loaded and initialised: /sys/module/NAME/initstate
   * says "live". One still "coming" (another process loads it) is loaded again: the kernel
   * makes that load wait for the first and answer EEXIST, so nothing uses the module
   * (a filesystem for mount) before its init has run.
   */
  private isLoadedInKernel(name: string): boolean {
    return readTextOr(this.sys, `/sys/module/${name}/initstate`) === 'live';
  }

  /** Modules for one device modalias (each alias handled once). */
  modulesForAlias(modalias: string): string[] {
    if (this.seenAliases.has(modalias)) return [];
    this.seenAliases.add(modalias);
    const found = matchModalias(this.manifest, modalias);
    if (found.length === 0) this.warnIfLeftOut(modalias);
    return found.filter((m) => !this.loaded.has(m));
  }

  private leftOutTable: InitramfsManifest | undefined;

  /**
   * An initramfs built --hostonly on another machine may lack this device's storage driver:
   * when the device matches a driver the universal set has and this image left out, the
   * console names the device and the module, so a root that never appears is explained.
   */
  private warnIfLeftOut(modalias: string): void {
    const hostonly = this.manifest.build.hostonly;
    if (!hostonly || !Array.isArray(hostonly.leftOut) || hostonly.leftOut.length === 0) return;
    this.leftOutTable ??= { ...this.manifest, modules: {}, aliases: hostonly.leftOut, aliasIndex: undefined };
    const needed = matchModalias(this.leftOutTable, modalias);
    if (needed.length === 0) return;
    const built = Object.entries(hostonly.storage).map(([d, m]) => `${d}: ${m.join(', ') || 'built-in'}`).join('; ');
    this.log.warn(`no driver in this initramfs for the storage device ${modalias}: it needs ${needed.join(', ')}, which --hostonly left out (built for ${built || 'a machine without disks'}); build the initramfs without --hostonly, or with --add-module ${needed[0]}`);
  }

  /** Every modalias of every device on every bus now (the coldplug pass). */
  coldplugAliases(): string[] {
    const aliases: string[] = [];
    let buses: string[] = [];
    try { buses = this.sys.readdir('/sys/bus'); } catch { return aliases; }
    for (const bus of buses) {
      let devices: string[] = [];
      try { devices = this.sys.readdir(`/sys/bus/${bus}/devices`); } catch { continue; }
      for (const dev of devices) {
        const alias = readTextOr(this.sys, `/sys/bus/${bus}/devices/${dev}/modalias`);
        if (alias) aliases.push(alias);
      }
    }
    return aliases;
  }

  /**
   * The modules the present devices need, storage first: NVMe, AHCI, SCSI and virtio
   * block/SCSI controllers, then legacy storage (IDE, RAID), then USB host controllers
   * and USB disks, then everything else (keyboards, …). The root is usually reachable
   * long before the last of them has loaded.
   */
  coldplugModules(afterStorage: readonly string[] = []): string[] {
    const tiers: Set<string>[] = [new Set(), new Set(), new Set(), new Set()];
    const t0 = this.sys.monotonicMs();
    const aliases = this.coldplugAliases();
    const t1 = this.sys.monotonicMs();
    for (const alias of aliases) {
      const tier = storageTier(alias);
      for (const m of this.modulesForAlias(alias)) tiers[tier]!.add(m);
    }
    const out: string[] = [];
    tiers.forEach((t, i) => {
      for (const m of [...t].sort()) if (!out.includes(m)) out.push(m);
      if (i === 0) for (const m of afterStorage) if (!out.includes(m)) out.push(m);
    });
    this.log.debug(`coldplug: ${aliases.length} device aliases read in ${((t1 - t0) / 1000).toFixed(3)} s, matched to ${out.length - afterStorage.length} modules in ${((this.sys.monotonicMs() - t1) / 1000).toFixed(3)} s`);
    return out;
  }

  /** Loads what the present devices need, now; returns the report. */
  coldplug(): LoadReport {
    return this.load(this.coldplugModules());
  }

  /** The child process loading coldplug modules, while the init goes on (-1: none). */
  private background = -1;
  /** every module the coldplug child was asked to load, dependencies included */
  private backgroundNames = new Set<string>();

  /**
   * The modules of the root's likely filesystems (rootfstype=, or the type recorded at
   * build time): the coldplug pass loads them right after the storage drivers, while the
   * init waits for the root device (as a shell initramfs's insmod lines would), instead of
   * after the device appeared. Built-in and unknown types add nothing.
   */
  private rootFilesystemModules(fsTypes: readonly string[]): string[] {
    const out: string[] = [];
    for (const t of fsTypes) {
      const mod = moduleForFilesystem(this.manifest, t);
      if (mod && !isBuiltin(this.manifest, mod) && findModule(this.manifest, mod) && !out.includes(mod)) out.push(mod);
    }
    return out;
  }

  /**
   * Starts loading the coldplug modules in a child process, in storage-first order (then
   * the root's filesystem, `rootFsTypes`), and returns at once: the init meanwhile waits
   * for the root device, loading what uevents ask for (the disk's own driver once its
   * controller is up). Without fork (the fake kernel) the modules are loaded here and now.
   * Returns how many modules were asked for.
   */
  startColdplug(rootFsTypes: readonly string[] = []): number {
    const rootFs = this.rootFilesystemModules(rootFsTypes);
    const names = this.coldplugModules(rootFs);
    if (!canFork(this.sys) || names.length === 0) {
      this.reportFailures(this.load(names));
      return names.length;
    }
    const sys = this.sys;
    let pid: number;
    try {
      pid = sys.fork();
    } catch {
      this.reportFailures(this.load(names));
      return names.length;
    }
    if (pid === 0) {
      try {
        // Lowest priority: the init's own work (the root's driver, its filesystem) goes
        // first, and this child uses the time the init spends waiting on devices.
        try { sys.nice?.(19); } catch { /* keeps the default priority */ }
        this.reportFailures(this.loadSequential(loadOrder(this.manifest, names)));
      } catch { /* the parent goes on regardless */ }
      sys._exit(0);
    }
    this.background = pid;
    this.backgroundNames = new Set(loadOrder(this.manifest, names));
    return names.length;
  }

  /** True while the coldplug child still runs. */
  coldplugRunning(): boolean {
    if (this.background < 0) return false;
    try {
      const r = this.sys.waitpid(this.background, 1 /* WNOHANG */);
      if (r.pid === 0) return true;
    } catch { /* reaped elsewhere */ }
    this.background = -1;
    return false;
  }

  /** Waits for the coldplug child (before giving up on a device: it may still bring it). */
  finishColdplug(): void {
    if (this.background < 0) return;
    try { this.sys.waitpid(this.background, 0); } catch { /* reaped elsewhere */ }
    this.background = -1;
  }

  /**
   * Before switch_root or kexec: the remaining coldplug modules are left to the booted
   * system (its udev loads them for the same devices). The child is killed, so it does not
   * outlive the initramfs it reads modules from; the kernel finishes or cleanly abandons a
   * finit_module the signal interrupts, never leaving half a module.
   * With `wait: false` (switch_root) the child is not waited for: a finit_module in
   * progress (an IDE controller's probe under emulation: 70–90 ms) ends in the booted
   * system's time instead of delaying its init; the killed child then exits, and PID 1 —
   * the guest's init by then — reaps it like any orphan. Nothing it holds is needed: the
   * module file it may still read stays readable until it closes it, even once deleted.
   */
  stopColdplug(opts: { wait?: boolean } = {}): void {
    if (this.background < 0) return;
    try { this.sys.kill(this.background, 9); } catch { /* already gone */ }
    if (opts.wait === false) {
      try { this.sys.waitpid(this.background, 1 /* WNOHANG */); } catch { /* reaped elsewhere */ }
      this.background = -1;
      return;
    }
    this.finishColdplug();
  }

  /** The module a filesystem type needs before mount(2): loads it; false when unknown. */
  loadFilesystem(fstype: string): boolean {
    const mod = moduleForFilesystem(this.manifest, fstype);
    if (mod === undefined) return false;
    if (mod === '' || isBuiltin(this.manifest, mod)) return true;
    if (!findModule(this.manifest, mod)) return false;
    const r = this.load([mod]);
    this.reportFailures(r);
    return !this.failed.has(mod);
  }

  /**
   * ENODEV means the module found nothing to drive (a CPU-feature module such as
   * crc32c_intel on a processor without the feature, a driver for absent hardware):
   * normal, and only shown with rd.vdboot.debug. Anything else is a warning.
   */
  /**
   * The modules of `names` an initramfs built --hostonly left out (neither in it nor built
   * into the kernel): `what` cannot work without them, so the caller stops with this text.
   * Universal images carry them all; undefined when nothing is missing.
   */
  hostonlyMissing(names: readonly string[], what: string): string | undefined {
    const h = this.manifest.build.hostonly;
    if (!h) return undefined;
    const missing = names.filter((n) => !isBuiltin(this.manifest, n) && !findModule(this.manifest, n));
    if (!missing.length) return undefined;
    return `${what} needs the kernel module${missing.length > 1 ? 's' : ''} ${missing.join(', ')}, which this initramfs does not have: it was built with --hostonly for ${h.root ? `the root ${h.root}` : 'a machine whose root is not an image file'}. ` +
      `Build it again with --hostonly --root set to this boot's root (e.g. --root vdisk:HOST:PATH), or with --add-module ${missing[0]}, or without --hostonly.`;
  }

  reportFailures(report: LoadReport): void {
    for (const f of report.failed) {
      if (f.error === 'ENODEV') this.log.debug(`module ${f.name}: no device for it (ENODEV)`);
      else this.log.warn(`module ${f.name} did not load: ${f.error}`);
    }
  }
}

/**
 * How early a device's driver loads: 0 modern storage (PCI class 01 subclass 00 SCSI,
 * 06 SATA/AHCI, 07 SAS, 08 NVMe; virtio block and SCSI; NVMe/MMC/SCSI buses), 1 other
 * storage (IDE, RAID, …), 2 USB host controllers and USB mass storage, 3 the rest.
 */
export function storageTier(modalias: string): number {
  if (/^virtio:d0000000[28]v/.test(modalias) || /^(nvme|mmc|scsi):/.test(modalias)) return 0;
  const pci = /^pci:.*bc([0-9A-F]{2})sc([0-9A-F]{2})/.exec(modalias);
  if (pci) {
    if (pci[1] === '01') return ['00', '06', '07', '08'].includes(pci[2]!) ? 0 : 1;
    if (pci[1] === '0C' && pci[2] === '03') return 2;
    return 3;
  }
  if (/^usb:.*ic08isc06/.test(modalias)) return 2;
  return 3;
}

/** The KEY=VALUE fields of one kernel uevent message ("add@/devices/…\0ACTION=add\0…"). */
export function parseUevent(bytes: Uint8Array): Record<string, string> {
  const fields: Record<string, string> = {};
  let start = 0;
  for (let i = 0; i <= bytes.length; i++) {
    if (i === bytes.length || bytes[i] === 0) {
      if (i > start) {
        let s = '';
        for (let k = start; k < i; k++) s += String.fromCharCode(bytes[k]!);
        const eq = s.indexOf('=');
        if (eq > 0) fields[s.slice(0, eq)] = s.slice(eq + 1);
      }
      start = i + 1;
    }
  }
  return fields;
}
