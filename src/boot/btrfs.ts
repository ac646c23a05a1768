/**
 * A btrfs root that spans several devices (a disk added to Fedora's btrfs, a raid1 pair), or
 * such a btrfs holding the image or the root archive (the host filesystem).
 * The kernel's btrfs mounts such a filesystem only when every member is registered with it,
 * and only the device named in mount(2) registers itself. So before mounting, every device
 * the scan found with the root's fsid is handed to BTRFS_IOC_DEVICES_READY on
 * /dev/btrfs-control, which registers it and answers whether the filesystem now has all its
 * members. While members are missing vdboot waits for devices (uevents) until rd.timeout=
 * (forever with rootwait), then stops naming the members found, the count the superblock
 * wants, and what to try. With rootflags=degraded it mounts with the members that are there.
 * A single-device btrfs needs none of this.
 */
import { readBtrfsSuperblock, type BtrfsSuperblock } from '../formats/btrfs.ts';
import { utf8Encode } from '../formats/text.ts';
import { isSysError, O, S, type Sys } from '../sys/sys.ts';
import { openBlockReader } from './blockdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import { waitForUevents } from './devwait.ts';

const BTRFS_CONTROL = '/dev/btrfs-control';
/** misc device 10:234 (MISC_DYNAMIC_MINOR is not used for btrfs-control) */
const BTRFS_CONTROL_DEV = [10, 234] as const;
/** _IOR(0x94, 39, struct btrfs_ioctl_vol_args): { __s64 fd; char name[4088]; } = 4096 bytes */
export const BTRFS_IOC_DEVICES_READY = ((2 << 30) | (4096 << 16) | (0x94 << 8) | 39) >>> 0;
const VOL_ARGS_SIZE = 4096;
const VOL_ARGS_NAME = 8;

/** The superblock of `dev`, or undefined when it cannot be read (the mount reports it then). */
function superblockOf(sys: Sys, dev: BlockDeviceInfo): BtrfsSuperblock | undefined {
  try {
    const reader = openBlockReader(sys, dev.path, dev.size);
    try {
      return readBtrfsSuperblock(reader);
    } finally {
      reader.close();
    }
  } catch {
    return undefined;
  }
}

/** Opens /dev/btrfs-control, making the node when devtmpfs has not (yet). */
function openControl(sys: Sys): number {
  try {
    return sys.open(BTRFS_CONTROL, O.RDWR | O.CLOEXEC);
  } catch (e) {
    if (!isSysError(e, 'ENOENT')) throw e;
    sys.mknod(BTRFS_CONTROL, S.IFCHR | 0o600, BTRFS_CONTROL_DEV[0], BTRFS_CONTROL_DEV[1]);
    return sys.open(BTRFS_CONTROL, O.RDWR | O.CLOEXEC);
  }
}

/** Registers `path` with the kernel's btrfs; true when its filesystem now has every member. */
export function btrfsDevicesReady(sys: Sys, controlFd: number, path: string): boolean {
  const name = utf8Encode(path);
  if (name.length >= VOL_ARGS_SIZE - VOL_ARGS_NAME) throw new BootFailure(`The device path ${path} is too long for BTRFS_IOC_DEVICES_READY.`);
  const args = new ArrayBuffer(VOL_ARGS_SIZE);
  new Uint8Array(args, VOL_ARGS_NAME).set(name);
  // 0: every member known; 1: some are missing
  return sys.ioctl(controlFd, BTRFS_IOC_DEVICES_READY, args) === 0;
}

function describeFs(sb: BtrfsSuperblock): string {
  return `btrfs UUID=${sb.fsid}${sb.label ? ` ("${sb.label}")` : ''}`;
}

/**
 * Before mounting a btrfs `root`: every member of its filesystem registered with the kernel,
 * waiting for missing ones (see the file's comment). Returns at once for a single device.
 */
export function readyBtrfsRoot(ctx: InitContext, root: BlockDeviceInfo): void {
  readyBtrfs(ctx, root, { what: 'root', degraded: ctx.plan.rootFlags.split(',').includes('degraded') });
}

/**
 * Before the kernel mounts a btrfs that holds an image or a root archive (a host
 * filesystem, e.g. a two-disk btrfs holding /VMs/x.vhdx): its members registered as for a
 * root. A host is mounted without rootflags=, so it is never mounted degraded.
 */
export function readyBtrfsHost(ctx: InitContext, host: BlockDeviceInfo, what: string): void {
  readyBtrfs(ctx, host, { what, degraded: false });
}

function readyBtrfs(ctx: InitContext, target: BlockDeviceInfo, opts: { what: string; degraded: boolean }): void {
  const { sys, log, plan } = ctx;
  if (target.fsType !== 'btrfs') return;
  const sb = superblockOf(sys, target);
  if (!sb || sb.numDevices === 1) return;
  // the control device comes with the btrfs module
  if (!ctx.modules.loadFilesystem('btrfs')) log.debug('no btrfs module known; trying the kernel as it is');
  let fd: number;
  try {
    fd = openControl(sys);
  } catch (e) {
    log.warn(`${describeFs(sb)} spans ${sb.numDevices} devices, but ${BTRFS_CONTROL} could not be opened (${(e as Error).message}): mounting ${target.path} without registering the others`);
    return;
  }
  try {
    const start = sys.monotonicMs();
    const deadline = plan.rootWait ? Infinity : start + plan.timeoutSec * 1000;
    let nextNote = start;
    for (;;) {
      const found: string[] = [];
      let ready = false;
      for (const d of ctx.devices.scan()) {
        if (d.notReady || d.fsType !== 'btrfs' || d.uuid !== target.uuid) continue;
        const member = superblockOf(sys, d);
        if (!member || member.fsid !== sb.fsid) continue;
        ready = btrfsDevicesReady(sys, fd, d.path);
        found.push(`${d.path} (devid ${member.devid})`);
      }
      const have = `${found.length} of its ${sb.numDevices} devices: ${found.join(', ') || 'none'}`;
      if (ready) {
        log.info(`${describeFs(sb)}: all ${sb.numDevices} devices registered with the kernel (${found.join(', ')})`);
        return;
      }
      if (opts.degraded) {
        log.warn(`${describeFs(sb)} has ${have}; mounting degraded, as rootflags=degraded asks`);
        return;
      }
      const now = sys.monotonicMs();
      if (now >= deadline) {
        const remedy = opts.what === 'root'
          ? 'or, when the data is mirrored (raid1, raid10, raid5/6), mount without the missing device with rootflags=degraded (add it to the existing rootflags= with a comma).'
          : 'or copy the file onto a filesystem whose devices are all attached.';
        throw new BootFailure(
          `The ${opts.what} ${describeFs(sb)} spans ${sb.numDevices} devices, and after ${plan.timeoutSec} s vdboot has found ${have}.\n` +
            'Attach the missing disk (its driver may be missing from the initramfs: vdboot mkinitramfs --add-module NAME), ' +
            `wait longer with rd.timeout=SECONDS or rootwait, ${remedy}`,
        );
      }
      if (now >= nextNote) {
        log.info(`${describeFs(sb)} has ${have}; waiting for the others`);
        nextNote = now + 5000;
      }
      waitForUevents(ctx, Math.min(500, deadline - now));
    }
  } finally {
    sys.close(fd);
  }
}
