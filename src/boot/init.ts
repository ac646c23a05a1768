/**
 * vdboot's PID 1: early mounts, the plan from the kernel command line, modules, the
 * root device, mount, the root's own kernel (kexec) when it should run instead, switch_root. Every failure ends on the console with what failed,
 * why and what to try, then the rescue shell; PID 1 never returns.
 *
 * This file only orchestrates: the steps live in files of their own (vdisk-exec.ts,
 * tmpfs-root.ts, mount-device.ts, …) that share context.ts and devwait.ts and never
 * import this one.
 */
import { MANIFEST_PATH, validateManifest, type InitramfsManifest } from '../formats/manifest.ts';
import type { Sys } from '../sys/sys.ts';
import { ConsoleLog } from './console.ts';
import { readyBtrfsRoot } from './btrfs.ts';
import { BootFailure, type InitContext } from './context.ts';
import { DeviceScanner } from './devices.ts';
import { waitForDevice } from './devwait.ts';
import { formatDeviceSpec } from './devspec.ts';
import { readText } from './fsutil.ts';
import { kexecRootKernel } from './kexec.ts';
import { ModuleLoader } from './modules.ts';
import { chooseInit, deviceIsReadOnly, mountDevice } from './mount-device.ts';
import { mountEarly } from './mounts.ts';
import { PlanError, planBoot, type BootPlan } from './plan.ts';
import { breakShell, failureShell } from './rescue.ts';
import { releaseToolImages } from './tool-images.ts';
import { switchRoot } from './switchroot.ts';
import { setupVdisks } from './vdisk-exec.ts';
import { findStackedRoot, StorageStack } from './stack.ts';
import { unpackTmpfsRoot } from './tmpfs-root.ts';
import { recordDmDevicesForUdev } from './udev-db.ts';
import { installShutdown, takeDownInPlace } from './shutdown.ts';
import { bringUpNetwork } from './net-up.ts';
import { formatNbdUrl } from '../formats/nbd.ts';

export const NEW_ROOT = '/root';

export function runInit(sys: Sys, kernelArgs: string[] = []): never {
  const log = new ConsoleLog(sys);
  const timed = <T>(label: string, fn: () => T): T => log.timed(label, fn);
  let shell = true;
  try {
    const t0 = sys.uptimeSec();
    for (const p of timed('early-mounts', () => mountEarly(sys))) log.warn(p);
    const plan = timed('cmdline', () => planBoot(readText(sys, '/proc/cmdline'), kernelArgs));
    shell = plan.shell;
    log.quiet = plan.quiet;
    log.debugOn = plan.debug;
    log.info(`vdboot started at ${t0.toFixed(2)} s of uptime; root=${describeRoot(plan)}`);
    for (const w of plan.warnings) log.warn(w);
    const ctx = prepare(sys, log, plan);
    const { init } = mountRoot(ctx);
    // returns unless it starts the root's own kernel
    timed('kexec-check', () => kexecRootKernel(ctx, NEW_ROOT));
    if (plan.breakAt.includes('pre-switch')) breakShell(sys, log, 'pre-switch');
    timed('tool-images', () => releaseToolImages(sys, log));
    timed('shutdown-handoff', () => installShutdown(sys, log, ctx.manifest.tools.busybox));
    timed('udev-db', () => recordDmDevicesForUdev(sys, log));
    if (ctx.ueventFd >= 0) sys.close(ctx.ueventFd);
    timed('stop-coldplug', () => ctx.modules.stopColdplug({ wait: false }));
    log.info(`starting ${init}${plan.initArgs.length ? ` ${plan.initArgs.join(' ')}` : ''} (vdboot took ${(sys.uptimeSec() - t0).toFixed(2)} s)`);
    return switchRoot(sys, NEW_ROOT, init, plan.initArgs, log, () => {
      // where vdboot's time went: t0 is the script's start; the kernel's "Run /init" line says when /init was executed
      if (log.debugOn) log.debug(`timings: script started at ${t0.toFixed(3)} s; ${log.timings.summary()}`);
    });
  } catch (e) {
    log.error(explain(e));
    return failureShell(sys, log, shell, () => takeDownInPlace(sys, log, [NEW_ROOT]));
  }
}

function describeRoot(plan: BootPlan): string {
  const r = plan.root;
  switch (r.kind) {
    case 'block': return formatDeviceSpec(r.device);
    case 'vdisk': return r.nbd ? `vdisk:${formatNbdUrl(r.nbd)}` : `vdisk:${r.host ? `${formatDeviceSpec(r.host)}:` : ''}${r.path}`;
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
  const manifest = log.timed('manifest', () => readManifest(sys));
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
  // The root's filesystem module loads with the storage drivers: rootfstype= names it, else
  // the manifest's type known at build time (a tmpfs root needs none).
  const rootFsTypes = plan.root.kind === 'tmpfs' ? [] : plan.rootFsType ? plan.rootFsType.split(',').filter(Boolean) : manifest.build.rootFsType ? [manifest.build.rootFsType] : [];
  log.step('coldplug', () => modules.startColdplug(rootFsTypes), (n) => `loading ${n} modules for the devices present${rootFsTypes.length ? ` and the root's filesystem (${rootFsTypes.join(', ')})` : ''}`);
  if (plan.rootDelaySec > 0) {
    log.info(`rootdelay=${plan.rootDelaySec}: waiting`);
    sys.sleepMs(plan.rootDelaySec * 1000);
  }
  const ctx: InitContext = { sys, log, plan, manifest, modules, devices: new DeviceScanner(sys, log), ueventFd };
  ctx.stack = new StorageStack(ctx);
  return ctx;
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

/** Finds and mounts the root on NEW_ROOT; returns the init to execute. */
function mountRoot(ctx: InitContext): { init: string } {
  const { sys, log, plan } = ctx;
  if (plan.breakAt.includes('pre-mount')) breakShell(sys, log, 'pre-mount');
  const root = plan.root;
  if (plan.net.need) {
    const why = root.kind === 'vdisk' && root.nbd ? `root=${describeRoot(plan)}` : plan.vdisk.attach.some((a) => a.nbd) ? 'rd.vdisk.attach=nbd://…' : 'rd.neednet=1';
    log.timed('network', () => bringUpNetwork(ctx, plan.net, why));
  }
  if (root.kind === 'tmpfs') {
    if (plan.vdisk.attach.length) log.timed('images', () => setupVdisks(ctx));
    log.timed('tmpfs-root', () => unpackTmpfsRoot(ctx, root, NEW_ROOT));
    return { init: chooseInit(sys, NEW_ROOT, plan) };
  }
  const images = plan.root.kind === 'vdisk' || plan.vdisk.attach.length ? log.timed('images', () => setupVdisks(ctx)) : undefined;
  const rootSpec = root.kind === 'block' ? root.device : undefined;
  const dev = rootSpec ? log.timed('root-device', () => waitForDevice(ctx, rootSpec, 'root device')) : images!.root ?? findStackedRoot(ctx, images!.rootDeferred!);
  ctx.stack?.resume(images?.plans);
  if (dev.fsType === 'btrfs') log.timed('btrfs-devices', () => readyBtrfsRoot(ctx, dev));
  let readOnly = plan.readOnly;
  if (!readOnly && deviceIsReadOnly(sys, dev)) {
    // as mount(8) does with a write-protected device; a read-write mount would fail (EACCES)
    const why = plan.vdisk.mode === 'ro' && plan.vdisk.attach.length ? ': rd.vdisk.mode=ro makes the attached images read-only' : '';
    log.warn(`the root ${dev.path} is on a read-only device${why}; it is mounted read-only despite rw`);
    readOnly = true;
  }
  log.timed('root-mount', () => mountDevice(ctx, dev, NEW_ROOT, plan.rootFsType, readOnly, plan.rootFlags));
  return { init: log.timed('choose-init', () => chooseInit(sys, NEW_ROOT, plan)) };
}
