/**
 * vdboot's PID 1: early mounts, the plan from the kernel command line, modules, the
 * root device, mount, switch_root. Every failure ends on the console with what failed,
 * why and what to try, then the rescue shell; PID 1 never returns.
 */
import { MANIFEST_PATH, validateManifest, type InitramfsManifest } from '../formats/manifest.ts';
import { isSysError, POLLIN, S, SysError, type Sys } from '../sys/sys.ts';
import { ConsoleLog } from './console.ts';
import { DeviceScanner, describeDevices } from './devices.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import { mkdirs, readText } from './fsutil.ts';
import { ModuleLoader, parseUevent } from './modules.ts';
import { mountEarly, mountOptions } from './mounts.ts';
import { DEFAULT_INITS, PlanError, planBoot, type BootPlan } from './plan.ts';
import { breakShell, failureShell } from './rescue.ts';
import { switchRoot } from './switchroot.ts';
import { setupVdisks } from './vdisk-exec.ts';
import { unpackTmpfsRoot } from './tmpfs-root.ts';
import { installShutdown, takeDownInPlace } from './shutdown.ts';

export const NEW_ROOT = '/root';

/** A failure the person at the console can act on: the message is the whole story. */
export class BootFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BootFailure';
  }
}

export interface InitContext {
  sys: Sys;
  log: ConsoleLog;
  plan: BootPlan;
  manifest: InitramfsManifest;
  modules: ModuleLoader;
  devices: DeviceScanner;
  /** the NETLINK uevent socket, or -1 when the kernel gave none */
  ueventFd: number;
}

export function runInit(sys: Sys, kernelArgs: string[] = []): never {
  const log = new ConsoleLog(sys);
  let shell = true;
  try {
    const t0 = sys.uptimeSec();
    for (const p of mountEarly(sys)) log.warn(p);
    const plan = planBoot(readText(sys, '/proc/cmdline'), kernelArgs);
    shell = plan.shell;
    log.quiet = plan.quiet;
    log.debugOn = plan.debug;
    log.info(`vdboot started at ${t0.toFixed(2)} s of uptime; root=${describeRoot(plan)}`);
    for (const w of plan.warnings) log.warn(w);
    const ctx = prepare(sys, log, plan);
    const { init } = mountRoot(ctx);
    if (plan.breakAt.includes('pre-switch')) breakShell(sys, log, 'pre-switch');
    installShutdown(sys, log, ctx.manifest.tools.busybox);
    if (ctx.ueventFd >= 0) sys.close(ctx.ueventFd);
    ctx.modules.stopColdplug();
    log.info(`starting ${init}${plan.initArgs.length ? ` ${plan.initArgs.join(' ')}` : ''} (vdboot took ${(sys.uptimeSec() - t0).toFixed(2)} s)`);
    return switchRoot(sys, NEW_ROOT, init, plan.initArgs, log);
  } catch (e) {
    log.error(explain(e));
    return failureShell(sys, log, shell, () => takeDownInPlace(sys, log, [NEW_ROOT]));
  }
}

function describeRoot(plan: BootPlan): string {
  const r = plan.root;
  switch (r.kind) {
    case 'block': return formatDeviceSpec(r.device);
    case 'vdisk': return `vdisk:${r.host ? `${formatDeviceSpec(r.host)}:` : ''}${r.path}`;
    case 'tmpfs': return `tmpfs:${formatDeviceSpec(r.host)}:${r.path}`;
  }
}

function explain(e: unknown): string {
  if (e instanceof BootFailure || e instanceof PlanError) return e.message;
  const err = e as Error;
  if (err && (err.name === 'FormatError' || err.name === 'SysError')) return err.message;
  return `vdboot hit an internal error — please report it with this text:\n${err?.stack ?? String(e)}`;
}

/** Manifest, uevents, modules: everything before looking for the root. */
function prepare(sys: Sys, log: ConsoleLog, plan: BootPlan): InitContext {
  const manifest = readManifest(sys);
  log.debug(`manifest read: ${Object.keys(manifest.modules).length} modules, ${manifest.aliases.length} aliases`);
  let ueventFd = -1;
  try {
    ueventFd = sys.ueventSocket();
  } catch (e) {
    log.warn(`no uevent socket (${(e as Error).message}): devices that appear later are found by polling only`);
  }
  const modules = new ModuleLoader(sys, manifest, log);
  // A plain root needs none of the preloaded drivers (device-mapper, loop): each costs
  // boot time, and the image paths load what they use themselves.
  const plainRoot = plan.root.kind === 'block' && plan.vdisk.attach.length === 0;
  if (!plainRoot) {
    log.step('preload', () => modules.load(manifest.preload), (r) => {
      modules.reportFailures(r);
      return `loaded ${r.loaded.length} device-mapper and loop modules${r.failed.length ? `, ${r.failed.length} failed` : ''}`;
    });
  }
  log.step('coldplug', () => modules.startColdplug(), (n) => `loading ${n} modules for the devices present`);
  if (plan.rootDelaySec > 0) {
    log.info(`rootdelay=${plan.rootDelaySec}: waiting`);
    sys.sleepMs(plan.rootDelaySec * 1000);
  }
  return { sys, log, plan, manifest, modules, devices: new DeviceScanner(sys, log), ueventFd };
}

function readManifest(sys: Sys): InitramfsManifest {
  let value: unknown;
  try {
    value = JSON.parse(readText(sys, MANIFEST_PATH));
  } catch (e) {
    throw new BootFailure(`The initramfs has no readable manifest at ${MANIFEST_PATH} (${(e as Error).message}). Rebuild it with "vdboot mkinitramfs".`);
  }
  const problems = validateManifest(value);
  if (problems.length) throw new BootFailure(`The initramfs manifest ${MANIFEST_PATH} is damaged: ${problems.slice(0, 5).join('; ')}. Rebuild it with "vdboot mkinitramfs".`);
  return value as InitramfsManifest;
}

/**
 * Waits for a block device matching `spec`: scans now, then after every uevent (loading
 * the modules new devices ask for), until `timeoutSec` passes (forever with rootwait).
 */
export function waitForDevice(ctx: InitContext, spec: DeviceSpec, what: string): BlockDeviceInfo {
  const { sys, log, plan } = ctx;
  const start = sys.monotonicMs();
  const deadline = plan.rootWait ? Infinity : start + plan.timeoutSec * 1000;
  let nextNote = start + 5000;
  for (;;) {
    const devices = ctx.devices.scan();
    const matches = devices.filter((d) => deviceMatches(spec, d));
    if (matches.length > 0) {
      if (matches.length > 1) log.warn(`${formatDeviceSpec(spec)} matches ${matches.map((d) => d.path).join(', ')}; using ${matches[0]!.path}`);
      log.info(`found ${what} ${formatDeviceSpec(spec)} at ${matches[0]!.path} (${matches[0]!.fsType ?? 'no filesystem'}) after ${((sys.monotonicMs() - start) / 1000).toFixed(2)} s`);
      return matches[0]!;
    }
    const now = sys.monotonicMs();
    if (now >= deadline) {
      if (ctx.modules.coldplugRunning()) {
        // Drivers are still loading: let them finish and look once more before giving up.
        log.info(`the ${what} is not there yet; waiting for the remaining drivers to load`);
        ctx.modules.finishColdplug();
        waitForUevents(ctx, 0);
        continue;
      }
      throw new BootFailure(
        `The ${what} ${formatDeviceSpec(spec)} did not appear within ${plan.timeoutSec} s.\n` +
          `Block devices seen:\n${describeDevices(devices)}\n` +
          `No device has ${specFieldName(spec)}. Check the spelling on the kernel command line (edit the boot entry), ` +
          `that the disk is attached, or wait longer with rd.timeout=SECONDS or rootwait.`,
      );
    }
    if (now >= nextNote) {
      log.info(`still waiting for ${what} ${formatDeviceSpec(spec)} (${Math.round((now - start) / 1000)} s)`);
      nextNote = now + 5000;
    }
    waitForUevents(ctx, Math.min(500, deadline - now));
  }
}

function specFieldName(spec: DeviceSpec): string {
  switch (spec.by) {
    case 'path': return `the name ${spec.value}`;
    case 'uuid': return `UUID ${spec.value}`;
    case 'label': return `the label "${spec.value}"`;
    case 'partuuid': return `PARTUUID ${spec.value}`;
    case 'partlabel': return `the partition name "${spec.value}"`;
  }
}

/** Sleeps up to `ms` on the uevent socket; loads modules for devices that were added. */
export function waitForUevents(ctx: InitContext, ms: number): void {
  const { sys, modules } = ctx;
  if (ctx.ueventFd < 0) {
    sys.sleepMs(ms);
    const wanted = new Set<string>();
    for (const alias of modules.coldplugAliases()) for (const m of modules.modulesForAlias(alias)) wanted.add(m);
    if (wanted.size) modules.reportFailures(modules.load([...wanted]));
    return;
  }
  const revents = sys.poll([{ fd: ctx.ueventFd, events: POLLIN }], Math.max(0, Math.round(ms)));
  if (!(revents[0]! & POLLIN)) return;
  const buf = new Uint8Array(16384);
  const wanted = new Set<string>();
  // Drain every queued message without blocking.
  for (;;) {
    let n: number;
    try {
      n = sys.read(ctx.ueventFd, buf);
    } catch (e) {
      if (isSysError(e, 'EAGAIN') || isSysError(e, 'EWOULDBLOCK')) break;
      if (isSysError(e, 'ENOBUFS')) continue; // messages were lost: the next scan of /sys finds the devices anyway
      throw e;
    }
    if (n <= 0) break;
    const ev = parseUevent(buf.subarray(0, n));
    if (ev.ACTION === 'add' && ev.MODALIAS) for (const m of modules.modulesForAlias(ev.MODALIAS)) wanted.add(m);
    if (!(sys.poll([{ fd: ctx.ueventFd, events: POLLIN }], 0)[0]! & POLLIN)) break;
  }
  if (wanted.size) modules.reportFailures(modules.load([...wanted].sort()));
}

/** Finds and mounts the root on NEW_ROOT; returns the init to execute. */
function mountRoot(ctx: InitContext): { init: string } {
  const { sys, log, plan } = ctx;
  if (plan.breakAt.includes('pre-mount')) breakShell(sys, log, 'pre-mount');
  if (plan.root.kind === 'tmpfs') {
    if (plan.vdisk.attach.length) setupVdisks(ctx);
    unpackTmpfsRoot(ctx, plan.root, NEW_ROOT);
    return { init: chooseInit(sys, NEW_ROOT, plan) };
  }
  const images = plan.root.kind === 'vdisk' || plan.vdisk.attach.length ? setupVdisks(ctx) : undefined;
  const dev = plan.root.kind === 'vdisk' ? images!.root! : waitForDevice(ctx, plan.root.device, 'root device');
  mountDevice(ctx, dev, NEW_ROOT, plan.rootFsType, plan.readOnly, plan.rootFlags);
  return { init: chooseInit(sys, NEW_ROOT, plan) };
}

/** Mounts `dev` on `target` with the probed or the given filesystem type(s). */
export function mountDevice(ctx: InitContext, dev: BlockDeviceInfo, target: string, fsTypes: string | undefined, readOnly: boolean, flagsText: string): string {
  const { sys, log, modules } = ctx;
  const candidates = fsTypes ? fsTypes.split(',').filter(Boolean) : dev.fsType ? [dev.fsType] : [];
  if (candidates.length === 0) {
    throw new BootFailure(`${dev.path} holds no filesystem vdboot recognises. If it is one, name it with rootfstype=TYPE; if the wrong device was picked, list the devices with "blkid" in the rescue shell.`);
  }
  mkdirs(sys, target);
  const { flags, data } = mountOptions(readOnly, flagsText);
  const errors: string[] = [];
  for (const fstype of candidates) {
    if (!modules.loadFilesystem(fstype)) log.debug(`no module known for filesystem ${fstype}; trying the kernel as it is`);
    try {
      log.step('mount', () => sys.mount(dev.path, target, fstype, flags, data), () => `mounted ${dev.path} (${fstype}, ${readOnly ? 'ro' : 'rw'}${data ? `, ${data}` : ''}) on ${target}`);
      return fstype;
    } catch (e) {
      errors.push(`${fstype}: ${isSysError(e) ? e.code : (e as Error).message}`);
    }
  }
  const hint = errors.some((x) => x.endsWith('ENODEV'))
    ? 'The kernel does not know that filesystem type: its module is not in the initramfs (vdboot mkinitramfs --add-module NAME).'
    : errors.some((x) => x.endsWith('EINVAL'))
      ? 'EINVAL usually means wrong rootflags= or a damaged filesystem: check rootflags, or run fsck from the rescue shell.'
      : 'Run fsck from the rescue shell, or check rootfstype= and rootflags=.';
  throw new BootFailure(`Could not mount ${dev.path} on ${target} (${errors.join('; ')}). ${hint}`);
}

/**
 * The init to execute: init= when given, else the first of the kernel's defaults that
 * the root holds. Symlinks are followed inside the new root, since an absolute link
 * such as /sbin/init -> /lib/systemd/systemd means the new root's /lib, not ours.
 */
export function chooseInit(sys: Sys, root: string, plan: BootPlan): string {
  const candidates = plan.init ? [plan.init] : DEFAULT_INITS;
  const problems: string[] = [];
  for (const c of candidates) {
    const problem = checkExecutable(sys, root, c);
    if (!problem) return c;
    problems.push(`${c}: ${problem}`);
  }
  throw new BootFailure(
    `The root filesystem has no init to start (${problems.join('; ')}). ` +
      (plan.init ? 'Check init= on the kernel command line.' : 'Is this the right partition? Name the init with init=/path, or pick another root=.'),
  );
}

function checkExecutable(sys: Sys, root: string, path: string): string | undefined {
  let resolved: string;
  try {
    resolved = resolveInRoot(sys, root, path);
  } catch (e) {
    return isSysError(e, 'ENOENT') ? 'not found' : isSysError(e, 'ELOOP') ? 'too many levels of symbolic links' : (e as Error).message;
  }
  const st = sys.lstat(`${root}${resolved}`);
  if ((st.mode & S.IFMT) !== S.IFREG) return 'not a regular file';
  if ((st.mode & 0o111) === 0) return 'not executable';
  return undefined;
}

/**
 * Resolves `path` as the new root will see it: every symlink on the way, absolute
 * ones relative to `root`, never escaping it through "..". Returns the path inside root.
 */
export function resolveInRoot(sys: Sys, root: string, path: string): string {
  const todo = path.split('/').filter((c) => c !== '' && c !== '.');
  const done: string[] = [];
  let hops = 0;
  while (todo.length) {
    const c = todo.shift()!;
    if (c === '..') {
      done.pop();
      continue;
    }
    const full = `${root}/${[...done, c].join('/')}`;
    const st = sys.lstat(full);
    if ((st.mode & S.IFMT) === S.IFLNK) {
      if (++hops > 40) throw new SysError('ELOOP', 40, `resolve ${path} in ${root}`);
      const target = sys.readlink(full);
      if (target.startsWith('/')) done.length = 0;
      todo.unshift(...target.split('/').filter((x) => x !== '' && x !== '.'));
      continue;
    }
    done.push(c);
  }
  return `/${done.join('/')}`;
}
