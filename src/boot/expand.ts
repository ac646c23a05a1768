/**
 * Expanding a dynamic image in place at boot (DESIGN §3), as Windows does for native
 * VHD boot: the planner found blocks the image leaves unallocated and threw
 * ExpansionNeeded (expand-plan.ts); here the host filesystem is mounted by a driver that
 * writes it (ntfs3 or ntfs-3g for NTFS, the kernel's exfat / vfat, or the kernel-mounted
 * host of ext4 and others), the free space is checked read-only first, then every absent
 * block is allocated and zero-filled through the driver (src/formats/expand), progress
 * on the console, fsync, and the host is unmounted again so the boot plans once more
 * from the device: the now fully allocated image takes the direct path.
 *
 * First, in the same read-write mount, the image file's holes on the host are filled
 * (src/formats/expand/fill.ts): whole allocation units rewritten with their own bytes, so
 * the expansion never writes into a hole and the file maps directly afterwards. A sparse
 * NTFS file is written through ntfs-3g only (ntfs3 loses data in partly allocated
 * compression units). The boot then checks the filled units on the partition before it
 * maps anything (vdisk-exec.ts).
 *
 * Nothing is written before the expansion is known to fit: a missing writable driver,
 * too little room or a FAT32 file limit stops the boot with the sizes and the
 * alternatives. A data phase that fails is rolled back (the file truncated to its former
 * size). A host that stays mounted read-write afterwards stops the boot: vdboot never
 * maps a partition under a writing driver.
 */
import { isFormatError, FormatError } from '../formats/block-reader.ts';
import { isDataPhaseFailed } from '../formats/expand/common.ts';
import { EXPAND_REMEDIES, prepareExpansion, type ExpandFile, type ExpansionPlan } from '../formats/expand/index.ts';
import { runFill, type FillCheck } from '../formats/expand/fill.ts';
import { isSysError, MS, O, type Sys } from '../sys/sys.ts';
import { preadExact } from './blockdev.ts';
import { humanSize } from './devices.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import type { ExpansionNeeded } from './expand-plan.ts';
import { exists, mkdirs, readFileBytes } from './fsutil.ts';
import { BootFailure, type InitContext } from './context.ts';

/** Where a host vdboot reads itself is mounted while its image is expanded. */
export const EXPAND_MOUNT = '/run/vdboot/expand';
/** BLKFLSBUF (linux/fs.h): write back and drop the device's cached pages. */
const BLKFLSBUF = 0x1261;

/** The image's host, as the boot has it when the planner asks for an expansion. */
export interface ExpandTarget {
  /** the host partition */
  device: BlockDeviceInfo;
  /** "/dev/sda2 (ntfs, LABEL=Windows)" */
  description: string;
  /** the image's path on the host filesystem */
  path: string;
  /**
   * A host the kernel has mounted already (read-only) for vdboot to read it (ext4, xfs…):
   * its directory and how to make it writable and read-only again (makeReadOnly also
   * tells the boot the host is read-only again, so a later loop path remounts it).
   */
  kernelMount?: { dir: string; makeWritable(): void; makeReadOnly(): void };
}

function bytes(n: number): string {
  return `${humanSize(n)}${n >= 1024 ? ` (${n} bytes)` : ''}`;
}

/** A file opened through the host filesystem's driver, as the expanders write it. */
export function sysExpandFile(sys: Sys, path: string, writable: boolean): ExpandFile & { close(): void } {
  const fd = sys.open(path, (writable ? O.RDWR : O.RDONLY) | O.CLOEXEC);
  let size = sys.stat(path).size;
  return {
    name: path,
    get size() { return size; },
    read: (offset: number, length: number): Uint8Array =>
      preadExact(sys, fd, path, size, offset, length, (at) => `the file ended at ${at} while reading`),
    write(offset: number, data: Uint8Array): void {
      let done = 0;
      while (done < data.length) {
        const n = sys.pwrite(fd, done === 0 ? data : data.subarray(done), offset + done);
        if (n <= 0) throw new Error(`${path}: short write at ${offset + done}`);
        done += n;
      }
      size = Math.max(size, offset + data.length);
    },
    sync: () => sys.fsync(fd),
    truncate(n: number) {
      sys.truncate(fd, n);
      size = n;
    },
    close: () => sys.close(fd),
  };
}

/** Progress lines at most every 2 s: bytes, rate, time left. */
function progressReporter(ctx: InitContext, path: string): (done: number, total: number) => void {
  const { sys, log } = ctx;
  const t0 = sys.monotonicMs();
  let last = t0;
  return (done, total) => {
    const now = sys.monotonicMs();
    if (now - last < 2000 && done < total) return;
    last = now;
    const secs = (now - t0) / 1000;
    const rate = secs > 0 ? done / secs : 0;
    const left = rate > 0 ? Math.ceil((total - done) / rate) : 0;
    log.info(`expanding ${path}: ${humanSize(done)} of ${humanSize(total)} (${Math.floor((done / total) * 100)}%), ${humanSize(rate)}/s${done < total ? `, about ${left} s left` : ''}`);
  };
}

/** How this initramfs writes the host's filesystem: kernel types to try, or ntfs-3g. */
function writableDriver(ctx: InitContext, fsType: string | undefined): { kernel: string[]; ntfs3g?: string } | string {
  const fs = ctx.manifest.filesystems;
  if (fsType === 'ntfs') {
    const kernel = 'ntfs3' in fs ? ['ntfs3'] : [];
    const ntfs3g = ctx.manifest.tools.ntfs3g;
    if (!kernel.length && !ntfs3g) return 'this initramfs has no NTFS driver that writes (the kernel has no ntfs3 module here, and ntfs-3g is not included: build it with "vdboot mkinitramfs --with ntfs-3g")';
    return { kernel, ...(ntfs3g ? { ntfs3g } : {}) };
  }
  if (fsType === 'vfat' || fsType === 'exfat') return { kernel: [fsType] };
  return `vdboot has no driver to write ${fsType ?? 'this'} filesystem`;
}

interface Mounted {
  dir: string;
  /** the driver that reads and writes the file, for messages: "ntfs3", "ntfs-3g", "the kernel's ext4" */
  driver: string;
  /** unmounts it; throws BootFailure when the host stays mounted (the boot must not map it then) */
  release(): void;
}

/** Mounts a host vdboot reads itself on EXPAND_MOUNT, read-only or read-write, with a writing driver. */
function mountForExpansion(ctx: InitContext, t: ExpandTarget, driver: { kernel: string[]; ntfs3g?: string }, writable: boolean): Mounted {
  const { sys, log } = ctx;
  mkdirs(sys, EXPAND_MOUNT);
  const errors: string[] = [];
  for (const type of driver.kernel) {
    ctx.modules.loadFilesystem(type);
    try {
      sys.mount(t.device.path, EXPAND_MOUNT, type, writable ? 0 : MS.RDONLY, '');
      log.info(`mounted ${t.device.path} (${type}, ${writable ? 'rw' : 'ro'}) on ${EXPAND_MOUNT} to expand ${t.path}`);
      return { dir: EXPAND_MOUNT, driver: type, release: () => unmount(ctx, t, undefined) };
    } catch (e) {
      errors.push(`${type}: ${isSysError(e) ? e.code : (e as Error).message}`);
    }
  }
  if (driver.ntfs3g) {
    ctx.modules.reportFailures(ctx.modules.load(['fuse']));
    // A distinct argv[0], so its daemon is found and waited for after the unmount.
    const pid = sys.spawn(driver.ntfs3g, ['@ntfs-3g-expand', '-o', writable ? 'rw' : 'ro', t.device.path, EXPAND_MOUNT], []);
    const r = sys.waitpid(pid, 0);
    if (r.exitCode === 0) {
      const daemon = findDaemon(sys);
      log.info(`mounted ${t.device.path} with ntfs-3g (${writable ? 'rw' : 'ro'}) on ${EXPAND_MOUNT} to expand ${t.path}`);
      return { dir: EXPAND_MOUNT, driver: 'ntfs-3g', release: () => unmount(ctx, t, daemon) };
    }
    errors.push(`ntfs-3g: exit ${r.exitCode}`);
  }
  throw new BootFailure(
    `${t.path} needs expanding in place, but ${t.description} could not be mounted ${writable ? 'read-write' : 'read-only'} (${errors.join('; ')}). Nothing was written. Instead: ${EXPAND_REMEDIES}.`,
  );
}

function findDaemon(sys: Sys): number | undefined {
  let names: string[] = [];
  try { names = sys.readdir('/proc'); } catch { return undefined; }
  for (const n of names) {
    if (!/^\d+$/.test(n)) continue;
    try {
      const b = readFileBytes(sys, `/proc/${n}/cmdline`, 4096);
      const end = b.indexOf(0);
      if (String.fromCharCode(...b.subarray(0, end < 0 ? b.length : end)) === '@ntfs-3g-expand') return Number(n);
    } catch { /* gone */ }
  }
  return undefined;
}

/** What the boot says when the host stays mounted (or its writer running) after the expansion: it stops. */
function stillMounted(t: ExpandTarget, dir: string, what: string): BootFailure {
  return new BootFailure(
    `${what}. vdboot will not map ${t.device.path} while ${dir} (${t.description}, mounted to expand ${t.path}) may still hold unwritten changes, so the boot stops here. ` +
      `From the rescue shell, unmount it ("umount ${dir}"; "sync"), then reboot.`,
  );
}

/**
 * Unmounts EXPAND_MOUNT, waits for an ntfs-3g daemon to finish writing and exit, and
 * drops the device's cached pages. Throws BootFailure when the mount or the daemon stays.
 */
function unmount(ctx: InitContext, t: ExpandTarget, daemon: number | undefined): void {
  const { sys } = ctx;
  try {
    sys.umount2(EXPAND_MOUNT, 0);
  } catch (e) {
    throw stillMounted(t, EXPAND_MOUNT, `${EXPAND_MOUNT} could not be unmounted (${isSysError(e) ? e.code : (e as Error).message})`);
  }
  if (daemon !== undefined) {
    // The daemon's parent exited at once, so it is PID 1's child: reap it (a zombie still shows in /proc).
    const gone = (): boolean => {
      try {
        return sys.waitpid(daemon, 1 /* WNOHANG */).pid === daemon;
      } catch {
        return !exists(sys, `/proc/${daemon}`);
      }
    };
    const deadline = sys.monotonicMs() + 120_000;
    let done = gone();
    while (!done && sys.monotonicMs() < deadline) {
      sys.sleepMs(50);
      done = gone();
    }
    if (!done) throw stillMounted(t, EXPAND_MOUNT, `ntfs-3g (pid ${daemon}), which wrote ${t.device.path} for the expansion, is still running 120 s after ${EXPAND_MOUNT} was unmounted`);
  }
  sys.sync();
  dropDeviceCache(sys, t.device.path);
}

/**
 * Writes back and drops a device's cached pages, so the next reads come from the disk:
 * a filesystem driver writes file data around the device's own page cache.
 */
export function dropDeviceCache(sys: Sys, path: string): void {
  try {
    const fd = sys.open(path, O.RDONLY | O.CLOEXEC);
    try { sys.ioctlInt(fd, BLKFLSBUF, 0); } finally { sys.close(fd); }
  } catch { /* best effort: reads may then come from pages cached before the write */ }
}

/** Free bytes the unprivileged user could use, as statfs(2) of the mounted host reports them. */
function freeBytes(sys: Sys, dir: string): number {
  const s = sys.statfs(dir);
  return s.blocksAvailable * s.blockSize;
}

/** Room the host filesystem needs beyond the file's growth (its own records of the new clusters). */
function margin(grow: number): number {
  return Math.max(1 << 20, Math.ceil(grow / 512));
}

/** FAT32 keeps a file's size in 32 bits. */
const FAT_MAX_FILE = 0xffffffff;

/** Why opening or reading the image through the host's driver failed, as a refusal's reason. */
function openFailure(mount: Mounted, t: ExpandTarget, e: unknown): string {
  const code = isSysError(e) ? e.code : (e as Error).message;
  const hint = code === 'ENOENT' ? `: the driver does not find the file (check the path's upper and lower case)`
    : code === 'EACCES' || code === 'EPERM' ? ': the driver does not allow it (a read-only or hibernated Windows volume, or file permissions)'
      : '';
  return `${mount.driver} could not open or read ${mount.dir}${t.path} (${code})${hint}`;
}

function refuse(t: ExpandTarget, reason: string): never {
  throw refusal(t, reason);
}

function refusal(t: ExpandTarget, reason: string): BootFailure {
  return new BootFailure(`${t.path} on ${t.description} cannot be mapped read-write as it is (blocks of the dynamic image are not allocated), and vdboot cannot expand it in place: ${reason}. Nothing was written. Instead: ${EXPAND_REMEDIES}.`);
}

/** What expandInPlace did: the expansion carried out (if any), and the fill checks to verify from the partition. */
export interface InPlaceResult {
  expansion?: ExpansionPlan;
  fills: { name: string; checks: FillCheck[] }[];
}

/**
 * Fills the image file's holes (fill.ts) and expands the image in place (see the file
 * comment), in that order: the expansion may write where holes were. Returns what was
 * done; throws BootFailure (nothing written) when it cannot be done.
 */
export function expandInPlace(ctx: InitContext, need: ExpansionNeeded, t: ExpandTarget): InPlaceResult {
  const { sys, log } = ctx;
  let mount: Mounted;
  let driver: { kernel: string[]; ntfs3g?: string } | undefined;
  if (t.kernelMount) {
    mount = { dir: t.kernelMount.dir, driver: `the kernel's ${t.device.fsType ?? 'filesystem'} driver`, release: () => undefined };
  } else {
    const d = writableDriver(ctx, t.device.fsType);
    if (typeof d === 'string') refuse(t, d);
    driver = d;
    // ntfs3 (6.12) loses the data of a sparse file's partly allocated compression units
    // when it writes into their holes, and fails (EIO, volume marked dirty) filling a
    // fragmented one: a sparse NTFS file is filled and expanded through ntfs-3g only.
    if (t.device.fsType === 'ntfs' && need.fills.length) {
      if (!d.ntfs3g) {
        refuse(t, `${need.fills.map((f) => f.name).join(', ')} is a sparse file (${humanSize(need.fills.reduce((n, f) => n + f.zeroBytes, 0))} in holes), and filling a sparse NTFS file needs ntfs-3g: the kernel's ntfs3 loses data written into a sparse file's holes. Build the initramfs with ntfs-3g ("vdboot mkinitramfs --with ntfs-3g"; it is included by default when the build machine has ntfs-3g), or copy the image whole on another machine (Windows: copy; Linux: cp --sparse=never)`);
      }
      driver = { kernel: [], ntfs3g: d.ntfs3g };
    }
    mount = mountForExpansion(ctx, t, driver, false);
  }
  const fills = need.fills;
  const fillZeros = fills.reduce((n, f) => n + f.zeroBytes, 0);

  // 1. Read-only: the expansion's sizes from the file as the driver sees it, and the room.
  let plan: ExpansionPlan | undefined;
  try {
    if (need.expansion) {
      const file = sysExpandFile(sys, `${mount.dir}${t.path}`, false);
      try {
        plan = prepareExpansion(file, t.path).plan;
      } finally {
        file.close();
      }
    }
    for (const f of fills) {
      const file = sysExpandFile(sys, `${mount.dir}${f.name}`, false);
      try {
        const end = f.ranges[f.ranges.length - 1]!;
        if (end.offset + end.length > file.size) refuse(t, `${mount.driver} sees ${f.name} as ${bytes(file.size)}, shorter than vdboot reads it on the partition (${bytes(end.offset + end.length)}): the host filesystem may be damaged; check it with chkdsk /f on Windows`);
      } finally {
        file.close();
      }
    }
    const grow = plan ? plan.newFileSize - plan.fileSize : 0;
    if (plan && t.device.fsType === 'vfat' && plan.newFileSize > FAT_MAX_FILE) {
      refuse(t, `it would grow to ${bytes(plan.newFileSize)}, but ${t.description} is FAT32, where a file holds at most 4 GiB − 1 byte (${FAT_MAX_FILE} bytes). Put the image on an exFAT or NTFS partition, or use a preallocated image`);
    }
    const need_ = grow + fillZeros;
    const free = freeBytes(sys, mount.dir);
    if (free < need_ + margin(need_)) {
      const what = [
        ...(fillZeros ? [`its ${bytes(fillZeros)} of holes need clusters`] : []),
        ...(plan ? [`it would grow by ${bytes(grow)} (${plan.blocks} absent block${plan.blocks === 1 ? '' : 's'} of ${humanSize(plan.blockSize)}, to ${bytes(plan.newFileSize)})`] : []),
      ].join(' and ');
      refuse(t, `${what}, but the host has only ${bytes(free)} free. Free ${humanSize(need_ + margin(need_) - free)} or more on it (or compact the image elsewhere)`);
    }
    for (const f of fills) {
      log.info(`filling ${f.name}'s holes in place: ${humanSize(f.zeroBytes)} of the file lie in holes or past its initialized size; ${f.ranges.length} range${f.ranges.length === 1 ? '' : 's'} (${humanSize(f.writeBytes)}) rewritten through ${mount.driver} in whole units of ${humanSize(f.unit)}; ${t.description} has ${humanSize(free)} free`);
    }
    if (plan) log.info(`expanding ${t.path} in place: ${plan.blocks} absent block${plan.blocks === 1 ? '' : 's'} of ${humanSize(plan.blockSize)} (${humanSize(need.unallocated)} of the virtual disk) allocated and zero-filled, the file grows from ${humanSize(plan.fileSize)} to ${humanSize(plan.newFileSize)}; ${t.description} has ${humanSize(free)} free`);
  } catch (e) {
    const err = isFormatError(e) ? refusal(t, (e as Error).message) : isSysError(e) ? refusal(t, openFailure(mount, t, e)) : e;
    try {
      mount.release();
    } catch (u) {
      // the host stays mounted: the boot stops with both reasons
      throw new BootFailure(`${(err as Error).message}\n${(u as Error).message}`);
    }
    throw err;
  }

  // 2. Read-write: the fills, then the expansion itself.
  if (t.kernelMount) t.kernelMount.makeWritable();
  else {
    mount.release();
    mount = mountForExpansion(ctx, t, driver!, true);
  }
  const t0 = sys.monotonicMs();
  let failure: unknown;
  const done: InPlaceResult = { fills: [] };
  try {
    const open = (name: string): ReturnType<typeof sysExpandFile> => {
      try {
        return sysExpandFile(sys, `${mount.dir}${name}`, true);
      } catch (e) {
        if (!isSysError(e)) throw e;
        refuse(t, openFailure(mount, t, e));
      }
    };
    for (const f of fills) {
      const file = open(f.name);
      try {
        // Each write puts back the bytes read there: a failure half-way leaves the file reading as before.
        const checks = runFill(file, f, progressReporter(ctx, `${f.name} (filling holes)`));
        done.fills.push({ name: f.name, checks });
      } catch (e) {
        throw new BootFailure(`Filling the holes of ${f.name} on ${t.description} failed: ${isSysError(e) ? `${e.call}: ${e.code}` : (e as Error).message}. Each write put back the bytes it read, so the image reads as before; the boot stops here. Instead: ${EXPAND_REMEDIES}.`);
      } finally {
        file.close();
      }
    }
    if (plan) {
      const file = open(t.path);
      try {
        const prepared = prepareExpansion(file, t.path);
        prepared.run(file, { progress: progressReporter(ctx, t.path), dataWillChange: true, random: (n) => randomBytes(sys, n) });
        file.sync();
        plan = prepared.plan;
        done.expansion = plan;
      } finally {
        file.close();
      }
    }
  } catch (e) {
    failure = e instanceof BootFailure ? e : expansionFailed(t, plan!, e);
  }
  // The host goes back to read-only (or unmounted) whatever happened; if it cannot, the boot stops here.
  try {
    if (t.kernelMount) t.kernelMount.makeReadOnly();
    else mount.release();
  } catch (u) {
    const after = u instanceof BootFailure ? u
      : stillMounted(t, mount.dir, `${mount.dir} could not be made read-only again after the expansion (${isSysError(u) ? u.code : (u as Error).message})`);
    throw failure ? new BootFailure(`${(failure as Error).message}\n${after.message}`) : after;
  }
  if (failure) throw failure;
  const secs = (sys.monotonicMs() - t0) / 1000;
  const written = (plan?.writeBytes ?? 0) + fills.reduce((n, f) => n + f.writeBytes, 0);
  log.info(`${plan ? `expanded ${t.path}` : `filled the holes of ${t.path}`}: ${humanSize(written)} written in ${secs.toFixed(1)} s (${humanSize(secs > 0 ? written / secs : 0)}/s); planning it again`);
  return done;
}

/** The boot's message for an expansion that failed while writing. */
function expansionFailed(t: ExpandTarget, plan: ExpansionPlan, e: unknown): BootFailure {
  const cause = isDataPhaseFailed(e) ? e.failure : e;
  const msg = isSysError(cause) ? `${cause.call}: ${cause.code}` : (cause as Error).message;
  const state = !isDataPhaseFailed(e)
    ? 'The expansion writes zero-filled blocks before the tables that point at them, so the image still reads as before'
    : e.rollbackError === undefined
      ? `The expansion was rolled back: ${t.path} was truncated to its former ${bytes(e.fileSize)}, and reads as before`
      : `Rolling the expansion back failed too, but nothing points at the new blocks yet, so the image still reads as before; ${t.path} may keep up to ${bytes(plan.newFileSize - plan.fileSize)} of unused space at its end`;
  return new BootFailure(`Expanding ${t.path} on ${t.description} failed: ${msg}. ${state}; the boot stops here. Instead: ${EXPAND_REMEDIES}.`);
}

function randomBytes(sys: Sys, n: number): Uint8Array {
  const out = new Uint8Array(n);
  try {
    const fd = sys.open('/dev/urandom', O.RDONLY | O.CLOEXEC);
    try { sys.read(fd, out); } finally { sys.close(fd); }
  } catch {
    for (let i = 0; i < n; i++) out[i] = Math.floor(Math.random() * 256);
  }
  return out;
}
