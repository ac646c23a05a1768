/**
 * Waiting at boot for devices to appear: a block device matching a spec (the root, an
 * image's host partition), rescanning after every uevent and loading the modules new
 * devices ask for, until rd.timeout= passes (forever with rootwait). Giving up is a
 * BootFailure that lists every block device seen.
 */
import { isSysError, POLLIN } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';
import { describeDevices } from './devices.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import { parseUevent } from './modules.ts';

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
    const devices = log.timings.counted('device-scans', () => ctx.devices.scan());
    if (ctx.stack?.onDevices(devices)) continue; // LUKS opened or LVs made: look again
    // a device that cannot be opened yet is no match: its filesystem is still unknown
    const matches = devices.filter((d) => !d.notReady && deviceMatches(spec, d));
    if (matches.length > 0) {
      // the members of one multi-device btrfs share its UUID: any of them mounts it (btrfs.ts)
      const oneBtrfs = matches.every((d) => d.fsType === 'btrfs' && d.uuid === matches[0]!.uuid);
      if (matches.length > 1 && !oneBtrfs) log.warn(`${formatDeviceSpec(spec)} matches ${matches.map((d) => d.path).join(', ')}; using ${matches[0]!.path}`);
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
          (ctx.stack?.notes() ?? []).map((n) => `${n}\n`).join('') +
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
  const revents = ctx.log.timings.counted('uevent-waits', () => sys.poll([{ fd: ctx.ueventFd, events: POLLIN }], Math.max(0, Math.round(ms))));
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
