/**
 * vdiskload: attach an image as a disk on a running system, with the same static binary
 * as /init (main.ts runs this when argv[0] is "vdiskload", or for "init vdiskload …").
 * The image is planned exactly as at boot (vdisk.ts's planVdisk), through the mounted
 * filesystem that holds it (host-mount.ts), and put on the kernel: loop devices,
 * qemu-nbd, device-mapper devices /dev/mapper/NAME and NAMEpK carrying vdboot's dm uuids
 * (VDBOOT-NAME, VDBOOT-NAME-partK) and the udev flags that let udev's dm rules make the
 * /dev/disk/by-* links. A record in /run/vdboot/attached/NAME.json says what to take
 * down at `vdiskload -d`, in order.
 *
 * The host is mounted and may change while the image is attached. The direct path
 * (device-mapper straight onto the host partition's sectors) is taken only where nothing
 * can move the file's blocks: a read-only mount, or a file vdiskload makes immutable
 * (FS_IMMUTABLE_FL) for the time it is attached and restores at detach. Anywhere else the
 * loop path reads through the mounted filesystem, and `--map direct` is refused naming
 * the reason. An image attached already (by vdiskload or at boot) is not attached again
 * when either would be read-write.
 *
 * Every failure is one line for the person at the terminal; what was made before it is
 * taken down again. Nothing is written to the image unless the mode is rw.
 */
import { FormatError, isFormatError } from '../formats/block-reader.ts';
import { EXPAND_REMEDIES, prepareExpansion } from '../formats/expand/index.ts';
import { runFill } from '../formats/expand/fill.ts';
import { utf8Encode } from '../formats/text.ts';
import { isSysError, O, type Sys } from '../sys/sys.ts';
import { ATTACHED_DIR, formatList, imageRecord, isRecord, listEntries, parseRecord, type AttachedImage, type VdbootDmDevice } from './attached.ts';
import { humanSize } from './devices.ts';
import { DeviceMapper, DM_UDEV, type DmTarget } from './dm.ts';
import { isExpansionNeeded, type ExpansionNeeded } from './expand-plan.ts';
import { sysExpandFile } from './expand.ts';
import { FIEMAP_DIRECT_FS, kernelImageHost } from './fiemap.ts';
import { exists, mkdirs, readTextOr, writeText } from './fsutil.ts';
import { locateFile, type LocatedFile } from './host-mount.ts';
import type { ImageHost, ImageRequest } from './image-host.ts';
import { attachLoop, detachLoop } from './loop.ts';
import { DM_UUID_PREFIX, formatName, planVdisk, type VdiskPlan } from './vdisk.ts';
import { disconnectNbd, STATE_DIR, STATE_PATH } from './vdisk-exec.ts';
import { parseVdiskloadArgs, UsageError, VDISKLOAD_USAGE, type VdiskloadCommand } from './vdiskload-args.ts';

/** FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h) and the immutable flag. */
export const FS_IOC_GETFLAGS = 0x80086601;
export const FS_IOC_SETFLAGS = 0x40086602;
export const FS_IMMUTABLE_FL = 0x00000010;

export interface VdiskloadIO {
  out(text: string): void;
  err(text: string): void;
}

export function sysIO(sys: Sys): VdiskloadIO {
  const write = (fd: number, t: string): void => {
    const b = utf8Encode(t);
    let done = 0;
    while (done < b.length) {
      const n = sys.write(fd, b.subarray(done));
      if (n <= 0) return;
      done += n;
    }
  };
  return { out: (t) => write(1, t), err: (t) => write(2, t) };
}

/** An error for the person at the terminal: the message is the whole story. */
export class VdiskloadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VdiskloadError';
  }
}

/** Runs one vdiskload command; returns the exit status (0 done, 1 failed, 2 usage). */
export function runVdiskload(sys: Sys, args: readonly string[], io: VdiskloadIO = sysIO(sys)): number {
  let cmd: VdiskloadCommand;
  try {
    cmd = parseVdiskloadArgs(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    io.err(`vdiskload: ${e.message}\n${VDISKLOAD_USAGE}\n`);
    return 2;
  }
  try {
    switch (cmd.action) {
      case 'help': io.out(`${VDISKLOAD_USAGE}\n`); return 0;
      case 'list': list(sys, io, cmd.json); return 0;
      case 'detach': detach(sys, io, cmd.target); return 0;
      case 'attach': attach(sys, io, cmd); return 0;
    }
  } catch (e) {
    const msg = e instanceof VdiskloadError || isFormatError(e) ? (e as Error).message
      : isSysError(e) ? `${e.message} (unexpected; nothing is left attached)` : `internal error: ${(e as Error).stack ?? String(e)}`;
    io.err(`vdiskload: ${msg.replace(/rd\.vdisk\.map=/g, '--map ').replace(/rd\.vdisk\.mode=ro/g, '--ro').replace(/rd\.vdisk\.mode=snapshot/g, '--snapshot')}\n`);
    return 1;
  }
}

// --- what vdboot has attached ------------------------------------------------------------

/** dm devices whose uuid begins with VDBOOT-, from sysfs. */
export function vdbootDmDevices(sys: Sys): VdbootDmDevice[] {
  const out: VdbootDmDevice[] = [];
  let entries: string[] = [];
  try { entries = sys.readdir('/sys/class/block'); } catch { /* no sysfs */ }
  for (const e of entries) {
    if (!/^dm-\d+$/.test(e)) continue;
    const uuid = (readTextOr(sys, `/sys/class/block/${e}/dm/uuid`) ?? '').trim();
    const name = (readTextOr(sys, `/sys/class/block/${e}/dm/name`) ?? '').trim();
    if (!name) continue;
    const size = Number((readTextOr(sys, `/sys/class/block/${e}/size`) ?? '0').trim()) * 512;
    const ro = (readTextOr(sys, `/sys/class/block/${e}/ro`) ?? '0').trim() === '1';
    out.push({ name, uuid, size, readOnly: ro });
  }
  return out;
}

/** Every record: the boot's (state.json) and vdiskload's, skipping any whose devices are gone. */
export function attachedRecords(sys: Sys): AttachedImage[] {
  const live = new Set(vdbootDmDevices(sys).map((d) => d.name));
  const out: AttachedImage[] = [];
  const state = readTextOr(sys, STATE_PATH);
  if (state) {
    try {
      const images = (JSON.parse(state) as { images?: unknown[] }).images ?? [];
      for (const r of images) if (isRecord(r) && live.has(r.name)) out.push(r);
    } catch { /* unreadable: the devices are listed by uuid */ }
  }
  let names: string[] = [];
  try { names = sys.readdir(ATTACHED_DIR); } catch { /* none yet */ }
  for (const n of names.sort()) {
    if (!n.endsWith('.json')) continue;
    const r = parseRecord(readTextOr(sys, `${ATTACHED_DIR}/${n}`) ?? '');
    if (r && live.has(r.name)) out.push(r);
  }
  return out;
}

function list(sys: Sys, io: VdiskloadIO, json: boolean): void {
  const entries = listEntries(attachedRecords(sys), vdbootDmDevices(sys).filter((d) => d.uuid.startsWith(DM_UUID_PREFIX)));
  io.out(json ? `${JSON.stringify(entries, null, 2)}\n` : formatList(entries));
}

// --- refusals before anything is made ------------------------------------------------------

/** Not root: one line, what to do. */
function requireRoot(sys: Sys): void {
  const status = readTextOr(sys, '/proc/self/status') ?? '';
  const uid = /^Uid:\s+\d+\s+(\d+)/m.exec(status)?.[1];
  if (uid !== undefined && uid !== '0') throw new VdiskloadError('device-mapper and loop devices need root: run it as root (sudo vdiskload …)');
}

function requireDeviceMapper(dm: DeviceMapper): void {
  try {
    dm.version();
  } catch (e) {
    const code = isSysError(e) ? e.code : (e as Error).message;
    throw new VdiskloadError(`device-mapper is not available (/dev/mapper/control: ${code}): load it with "modprobe dm_mod"${code === 'EACCES' || code === 'EPERM' ? ', as root' : ''}, then try again`);
  }
}

/** Why `loc` may not be attached in `mode` next to what is attached already, or undefined. */
export function conflictWith(records: readonly AttachedImage[], loc: { path: string; fileId: string; inMount: string; mountDir: string }, mode: string): string | undefined {
  for (const r of records) {
    const same = r.by === 'vdiskload'
      ? r.fileId === loc.fileId || r.image === loc.path
      // the boot records the path on its host, which the booted system sees at /run/vdboot/host
      : loc.mountDir === '/run/vdboot/host' && r.image.toLowerCase() === loc.inMount.toLowerCase();
    if (!same) continue;
    if (mode === 'rw' || r.mode === 'rw') {
      const what = r.by === 'boot' ? `${r.name === 'vdisk0' ? 'the image this system booted from' : 'attached at boot'} as /dev/mapper/${r.name}` : `attached as /dev/mapper/${r.name}`;
      return `${loc.path} is ${what} (${r.mode}); it is not attached twice when either would write it. Use /dev/mapper/${r.name}, or detach it first (vdiskload -d ${r.name})`;
    }
  }
  return undefined;
}

/** Loop devices backed by the file: an image attached by losetup is busy too. */
function loopsOf(sys: Sys, fileId: string): string[] {
  const out: string[] = [];
  let entries: string[] = [];
  try { entries = sys.readdir('/sys/class/block'); } catch { return out; }
  for (const e of entries) {
    if (!/^loop\d+$/.test(e)) continue;
    const backing = (readTextOr(sys, `/sys/class/block/${e}/loop/backing_file`) ?? '').trim();
    if (!backing) continue;
    try {
      const st = sys.stat(backing.replace(/ \(deleted\)$/, ''));
      if (`${st.devMajor}:${st.devMinor}:${st.ino}` === fileId) out.push(`/dev/${e}`);
    } catch { /* gone */ }
  }
  return out;
}

function freeName(taken: ReadonlySet<string>): string {
  for (let i = 0; ; i++) if (!taken.has(`vdisk${i}`)) return `vdisk${i}`;
}

// --- holding the file still ------------------------------------------------------------------

function getFlags(sys: Sys, fd: number): number {
  const buf = new ArrayBuffer(8);
  sys.ioctl(fd, FS_IOC_GETFLAGS, buf);
  return new DataView(buf).getUint32(0, true);
}

function setFlags(sys: Sys, fd: number, flags: number): void {
  const buf = new ArrayBuffer(8);
  new DataView(buf).setUint32(0, flags >>> 0, true);
  sys.ioctl(fd, FS_IOC_SETFLAGS, buf);
}

/**
 * Makes `path` immutable (no write, truncate, rename or block move through the
 * filesystem) and returns true when vdiskload set the flag (false when it was set
 * already: then it stays set at detach). Throws the errno when the filesystem refuses.
 */
export function makeImmutable(sys: Sys, path: string): boolean {
  const fd = sys.open(path, O.RDONLY | O.NONBLOCK | O.CLOEXEC);
  try {
    const flags = getFlags(sys, fd);
    if (flags & FS_IMMUTABLE_FL) return false;
    setFlags(sys, fd, flags | FS_IMMUTABLE_FL);
    return true;
  } finally {
    sys.close(fd);
  }
}

/** Clears the immutable flag vdiskload set (best effort: says so when it cannot). */
export function clearImmutable(sys: Sys, path: string): void {
  const fd = sys.open(path, O.RDONLY | O.NONBLOCK | O.CLOEXEC);
  try {
    setFlags(sys, fd, getFlags(sys, fd) & ~FS_IMMUTABLE_FL);
  } finally {
    sys.close(fd);
  }
}

// --- attach ------------------------------------------------------------------------------------

/** What was made so far, taken down in reverse if a later step fails. */
class Made {
  dm: string[] = [];
  loops: string[] = [];
  nbd?: string;
  immutable: string[] = [];
  cowFile?: string;
  constructor(private readonly sys: Sys, private readonly dmc: DeviceMapper) {}

  takeDown(report: (m: string) => void): void {
    const attempt = (what: string, fn: () => void): void => {
      try { fn(); } catch (e) { report(`while taking down: ${what}: ${(e as Error).message}`); }
    };
    for (const name of [...this.dm].reverse()) attempt(`removing /dev/mapper/${name}`, () => removeDm(this.sys, this.dmc, name));
    if (this.nbd) attempt(`disconnecting ${this.nbd}`, () => disconnectNbd(this.sys, this.nbd!));
    for (const l of [...this.loops].reverse()) attempt(`detaching ${l}`, () => detachLoop(this.sys, l));
    for (const f of this.immutable) attempt(`clearing the immutable flag of ${f}`, () => clearImmutable(this.sys, f));
    this.dm = []; this.loops = []; this.immutable = []; delete this.nbd;
  }
}

/** Removes a dm device, retrying briefly while udev's blkid still holds it open. */
function removeDm(sys: Sys, dm: DeviceMapper, name: string): void {
  for (let i = 0; ; i++) {
    try {
      dm.remove(name);
      return;
    } catch (e) {
      if (!isSysError(e, 'EBUSY') || i >= 20) throw e;
      sys.sleepMs(100);
    }
  }
}

/** The qemu-nbd of this system, if it has one. */
function findQemuNbd(sys: Sys): string | undefined {
  for (const d of ['/usr/bin', '/usr/sbin', '/bin', '/sbin', '/usr/local/bin', '/usr/local/sbin']) {
    if (exists(sys, `${d}/qemu-nbd`)) return `${d}/qemu-nbd`;
  }
  return undefined;
}

function connectNbd(sys: Sys, tool: string, file: string, format: string, readOnly: boolean): string {
  if (readTextOr(sys, '/sys/class/block/nbd0/size') === undefined) throw new VdiskloadError('the nbd path needs the kernel\'s nbd driver: load it with "modprobe nbd", then try again');
  for (let i = 0; i < 64; i++) {
    if (readTextOr(sys, `/sys/class/block/nbd${i}/size`) === undefined) break;
    if (readTextOr(sys, `/sys/class/block/nbd${i}/pid`) !== undefined) continue;
    const dev = `/dev/nbd${i}`;
    // Its server socket in /run, as at boot: its default directory, /var/lock, is missing on small systems.
    mkdirs(sys, STATE_DIR);
    const socket = `${STATE_DIR}/nbd${i}.sock`;
    const pid = sys.spawn(tool, ['qemu-nbd', '--fork', '--connect', dev, '--socket', socket, '--format', format, ...(readOnly ? ['--read-only'] : []), file], []);
    const r = sys.waitpid(pid, 0);
    if (r.exitCode !== 0) throw new VdiskloadError(`qemu-nbd could not serve ${file} on ${dev} (exit ${r.exitCode}); its message is above`);
    return dev;
  }
  throw new VdiskloadError('no free nbd device: detach one (qemu-nbd -d /dev/nbdN), or load nbd with more devices (modprobe nbd nbds_max=32)');
}

/** A sparse file in /run (RAM) on a loop device: the snapshot's copy-on-write store. */
function makeCow(sys: Sys, made: Made, name: string, size: number): string {
  mkdirs(sys, ATTACHED_DIR);
  const file = `${ATTACHED_DIR}/${name}.cow`;
  const fd = sys.open(file, O.RDWR | O.CREAT | O.TRUNC | O.CLOEXEC, 0o600);
  try { sys.truncate(fd, size); } finally { sys.close(fd); }
  try {
    const dev = attachLoop(sys, file, { readOnly: false });
    made.loops.push(dev);
    return dev;
  } finally {
    // the loop holds the file: unlinked now, its RAM is freed when the loop goes
    try { sys.unlink(file); } catch { /* harmless */ }
  }
}

function substitute(targets: DmTarget[], loops: string[], cow: string | undefined, nbd: string | undefined): DmTarget[] {
  return targets.map((t) => ({
    ...t,
    params: t.params.replace(/\$LOOP(\d+)/g, (_, i: string) => loops[Number(i)] ?? `$LOOP${i}`).replace(/\$COW/g, cow ?? '$COW').replace(/\$NBD/g, nbd ?? '$NBD'),
  }));
}

/** Creates a dm device for udev (the flags that let its rules run) and waits briefly for udev's node, making it when udev does not. */
function createDm(sys: Sys, dm: DeviceMapper, name: string, uuid: string, targets: DmTarget[], readOnly: boolean): void {
  const udev = exists(sys, '/run/udev/control');
  const made = dm.create(name, uuid, targets, readOnly, { udevFlags: DM_UDEV.PRIMARY_SOURCE | DM_UDEV.DISABLE_LIBRARY_FALLBACK, makeNode: !udev });
  if (!udev) return;
  for (let i = 0; i < 50 && !exists(sys, made.path); i++) sys.sleepMs(100);
  if (!exists(sys, made.path)) {
    try { sys.mkdir('/dev/mapper', 0o755); } catch { /* exists */ }
    try { sys.mknod(made.path, 0o060600, made.major, made.minor); } catch { /* udev made it meanwhile */ }
  }
}

/** The planner's view of the mounted host, with direct mapping only where the file is held still. */
function mountedImageHost(sys: Sys, loc: LocatedFile, mode: string, map: string, held: Made): { host: ImageHost; close(): void } {
  const m = loc.mount;
  const dir = m.dir === '/' ? '' : m.dir;
  // Direct tables point at the partition under vdhost; a partition mounted by itself is
  // held exclusively by its filesystem, and device-mapper cannot open it.
  const device = loc.under ?? loc.device ?? { name: '', path: m.source, major: 0, minor: 0, size: 0 };
  const description = `${loc.under ? `${loc.under.path} through ${m.source}` : m.source} (${m.fsType}, mounted at ${m.dir}${m.readOnly ? ', read-only' : ''})`;
  const k = kernelImageHost(sys, dir, device, m.fsType, description, loc.inMount, mode === 'rw');
  const layout = (p: string) => {
    if (!loc.device) throw new FormatError(`${m.fsType} on ${m.source} is not a block device vdboot can map onto`, 'host', m.source);
    if (!loc.under) {
      throw new FormatError(
        `${m.source} is mounted at ${m.dir}, and a mounted partition is held by its filesystem alone: device-mapper cannot map onto it ` +
          '(it can under vdboot\'s own host mount, /run/vdboot/host, which goes through /dev/mapper/vdhost)',
        'host', m.source,
      );
    }
    if (!FIEMAP_DIRECT_FS.has(m.fsType)) throw new FormatError(`vdboot maps files of ${m.fsType} through the mounted filesystem (it maps ext2/3/4, xfs and btrfs files directly)`, 'fstype', m.fsType);
    if (map === 'loop') throw new FormatError('the loop path was asked for', 'map', 'loop');
    if (!m.readOnly) {
      // On a read-write mount the filesystem may move the file's blocks (defragmentation,
      // a rewrite, a truncate): only an immutable file keeps them where the table points.
      const full = `${dir}${p}`;
      try {
        if (makeImmutable(sys, full)) held.immutable.push(full);
      } catch (e) {
        const code = isSysError(e) ? e.code : (e as Error).message;
        throw new FormatError(`${full} is on ${description}, mounted read-write, and could not be made immutable for the time it is attached (FS_IOC_SETFLAGS: ${code}), so ${m.fsType} could move its blocks under the mapping`, 'immutable', full);
      }
    }
    return k.host.layout(p);
  };
  return { host: { ...k.host, layout }, close: () => k.close() };
}

/**
 * A dynamic image for a rw attach: filled and expanded in place through the mounted
 * filesystem, as the boot does (expand.ts), then planned again. Refused on a read-only
 * mount, or when the host has no room.
 */
function expandThroughMount(sys: Sys, io: VdiskloadIO, loc: LocatedFile, need: ExpansionNeeded): void {
  const m = loc.mount;
  const dir = m.dir === '/' ? '' : m.dir;
  if (m.readOnly) throw new VdiskloadError(`${need.message.replace(/ At boot, vdboot first .*$/s, '')} ${m.dir} is mounted read-only, so vdiskload cannot expand it in place. Attach it with --snapshot or --ro, or remount ${m.dir} read-write first.`);
  let grow = need.fills.reduce((n, f) => n + f.zeroBytes, 0);
  if (need.expansion) grow += need.expansion.newFileSize - need.expansion.fileSize;
  const st = sys.statfs(m.dir);
  const free = st.blocksAvailable * st.blockSize;
  if (free < grow + Math.max(1 << 20, Math.ceil(grow / 512))) {
    throw new VdiskloadError(`${loc.path} must grow by ${humanSize(grow)} to be attached read-write (its absent blocks allocated), but ${m.dir} has only ${humanSize(free)} free. Free some room, or instead: ${EXPAND_REMEDIES.replace(/rd\.vdisk\.mode=/g, '--')}`);
  }
  for (const f of need.fills) {
    const file = sysExpandFile(sys, `${dir}${f.name}`, true);
    try {
      io.err(`vdiskload: filling the holes of ${dir}${f.name} (${humanSize(f.zeroBytes)}) through ${m.fsType}\n`);
      runFill(file, f, () => undefined);
      file.sync();
    } finally {
      file.close();
    }
  }
  if (need.expansion) {
    const file = sysExpandFile(sys, loc.path, true);
    try {
      const prepared = prepareExpansion(file, loc.inMount);
      io.err(`vdiskload: expanding ${loc.path} in place: ${prepared.plan.blocks} absent block${prepared.plan.blocks === 1 ? '' : 's'} of ${humanSize(prepared.plan.blockSize)} allocated, the file grows from ${humanSize(prepared.plan.fileSize)} to ${humanSize(prepared.plan.newFileSize)}\n`);
      prepared.run(file, { progress: () => undefined, dataWillChange: true, random: (n) => randomBytes(sys, n) });
      file.sync();
    } finally {
      file.close();
    }
  }
}

function randomBytes(sys: Sys, n: number): Uint8Array {
  const out = new Uint8Array(n);
  const fd = sys.open('/dev/urandom', O.RDONLY | O.CLOEXEC);
  try { sys.read(fd, out); } finally { sys.close(fd); }
  return out;
}

function attach(sys: Sys, io: VdiskloadIO, cmd: Extract<VdiskloadCommand, { action: 'attach' }>): void {
  requireRoot(sys);
  const dm = new DeviceMapper(sys);
  requireDeviceMapper(dm);
  const loc = locateFile(sys, cmd.image);

  const devices = vdbootDmDevices(sys);
  const taken = new Set(devices.map((d) => d.name));
  const name = cmd.name ?? freeName(new Set([...taken, ...devices.map((d) => d.name.replace(/p\d+$/, ''))]));
  if (taken.has(name) || exists(sys, `/dev/mapper/${name}`) || exists(sys, `${ATTACHED_DIR}/${name}.json`)) {
    throw new VdiskloadError(`the name ${name} is taken (/dev/mapper/${name} exists): choose another with --name NAME, or detach it first (vdiskload -d ${name})`);
  }
  const records = attachedRecords(sys);
  const conflict = conflictWith(records, { path: loc.path, fileId: loc.fileId, inMount: loc.inMount, mountDir: loc.mount.dir }, cmd.mode);
  if (conflict) throw new VdiskloadError(conflict);
  if (cmd.mode === 'rw') {
    const loops = loopsOf(sys, loc.fileId);
    if (loops.length) throw new VdiskloadError(`${loc.path} is busy: ${loops.join(', ')} ${loops.length === 1 ? 'is' : 'are'} attached to it (losetup -l); detach ${loops.length === 1 ? 'it' : 'them'} first (losetup -d), or attach it with --snapshot or --ro`);
  }

  const qemuNbd = findQemuNbd(sys);
  const made = new Made(sys, dm);
  const report = (m: string): void => io.err(`vdiskload: ${m}\n`);
  let vp!: VdiskPlan;
  try {
    // --map direct where the host cannot allow it is refused before anything is written
    // (an expansion would come first otherwise).
    if (cmd.map === 'direct') {
      const h = mountedImageHost(sys, loc, cmd.mode, cmd.map, made);
      try {
        h.host.layout(loc.inMount);
      } catch (e) {
        if (!isFormatError(e)) throw e;
        throw new VdiskloadError(`--map direct: ${loc.path} cannot be mapped directly: ${(e as Error).message}. Use --map auto or loop.`);
      } finally {
        h.close();
      }
    }
    // 1. Plan (reads only, except the immutable flag of files a direct path would map).
    // the host's disk and its sector size: an expansion between rounds changes neither
    const disk = loc.under ? (readTextOr(sys, `/sys/class/block/${loc.under.name}/partition`) !== undefined ? sys.readlink(`/sys/class/block/${loc.under.name}`).split('/').slice(-2)[0]! : loc.under.name) : undefined;
    const logical = Number(readTextOr(sys, `/sys/class/block/${disk ?? '-'}/queue/logical_block_size`) ?? '512');
    for (let round = 0; ; round++) {
      const h = mountedImageHost(sys, loc, cmd.mode, cmd.map, made);
      const req: ImageRequest = { index: 0, name, path: loc.inMount, mode: cmd.mode, map: cmd.map, expand: true, nbd: qemuNbd !== undefined };
      try {
        vp = planVdisk(req, { ...h.host, ...(disk ? { logicalBlockSize: logical > 0 ? logical : 512 } : {}) });
        break;
      } catch (e) {
        // an expansion can leave holes of the file to fill (and the reverse): a few rounds at most
        if (!isExpansionNeeded(e) || round >= 3) throw e;
        // the file is written through the filesystem: not while it is immutable
        made.takeDown(report);
        expandThroughMount(sys, io, loc, e);
      } finally {
        h.close();
      }
    }
    if (vp.path !== 'direct') made.takeDown(report); // nothing maps the host's sectors: the file may move
    // Every device name the plan makes (NAME, NAMEpK, NAME-cow…) must be free, checked before anything is made.
    const liveNames = new Set(vdbootDmDevices(sys).map((d) => d.name));
    for (const d of vp.devices) {
      if (liveNames.has(d.name) || exists(sys, `/dev/mapper/${d.name}`)) {
        throw new VdiskloadError(`the name ${d.name} (for ${d.name === name ? 'the disk' : 'a device of this image'}) is taken: /dev/mapper/${d.name} exists. Choose another name with --name NAME`);
      }
    }
    const dir = loc.mount.dir === '/' ? '' : loc.mount.dir;

    // 2. Execute.
    if ((vp.loops.length || vp.cowBytes !== undefined) && !exists(sys, '/dev/loop-control')) {
      throw new VdiskloadError(`the ${vp.path} path${vp.cowBytes !== undefined ? ' and the snapshot\'s RAM store' : ''} need${vp.cowBytes !== undefined ? '' : 's'} loop devices, and /dev/loop-control is missing: load the driver with "modprobe loop", then try again`);
    }
    const loops: string[] = [];
    for (const l of vp.loops) {
      const dev = attachLoop(sys, `${dir}${l.file}`, { readOnly: l.readOnly, directIo: false });
      made.loops.push(dev);
      loops[l.index] = dev;
    }
    const cow = vp.cowBytes !== undefined ? makeCow(sys, made, name, vp.cowBytes) : undefined;
    if (vp.nbd) {
      made.nbd = connectNbd(sys, qemuNbd!, `${dir}${vp.nbd.file}`, vp.nbd.format, vp.nbd.readOnly);
    }
    for (const d of vp.devices) {
      try {
        createDm(sys, dm, d.name, d.uuid, substitute(d.targets, loops, cow, made.nbd), d.readOnly);
      } catch (e) {
        if (!isSysError(e, 'EBUSY') && !isSysError(e, 'EEXIST')) throw e;
        throw new VdiskloadError(`device-mapper refused /dev/mapper/${d.name}: a device with its name or its uuid ${d.uuid} exists (dmsetup info -c shows them); what was made for ${name} before it has been taken down`);
      }
      made.dm.push(d.name);
    }
    const hu = vp.headerUpdate;
    if (hu) {
      const target = hu.on === 'device' ? hu.path : `${dir}${hu.path}`;
      const fd = sys.open(target, O.RDWR | O.CLOEXEC);
      try {
        for (const w of hu.writes) {
          if (sys.pwrite(fd, w.bytes, w.offset) !== w.bytes.length) throw new VdiskloadError(`writing ${hu.what} to ${target} at ${w.offset} was cut short`);
          sys.fsync(fd);
        }
      } finally {
        sys.close(fd);
      }
    }
    const rec = imageRecord(vp, 'vdiskload', { image: loc.path, loops: made.loops, ...(made.nbd ? { nbd: made.nbd } : {}), immutable: made.immutable, fileId: loc.fileId });
    mkdirs(sys, ATTACHED_DIR);
    writeText(sys, `${ATTACHED_DIR}/${name}.json`, `${JSON.stringify(rec)}\n`);
  } catch (e) {
    made.takeDown(report);
    throw e;
  }

  io.out(`${name}: ${loc.path} (${vp.chain.map(formatName).join(' → ')}, ${humanSize(vp.size)}, ${vp.mode}) on ${vp.host}\n`);
  io.out(`  data path: ${vp.why}\n`);
  if (made.immutable.length) io.out(`  held still: ${made.immutable.join(', ')} immutable until "vdiskload -d ${name}"\n`);
  io.out(`  /dev/mapper/${name}\n`);
  for (const p of vp.partitions) {
    io.out(`  /dev/mapper/${p.name}${p.fsType ? ` ${p.fsType}` : ''}${p.label ? ` LABEL="${p.label}"` : ''}${p.uuid ? ` UUID=${p.uuid}` : ''}\n`);
  }
  for (const w of vp.warnings) io.err(`vdiskload: warning: ${w}\n`);
}

// --- detach ------------------------------------------------------------------------------------

function detach(sys: Sys, io: VdiskloadIO, target: string): void {
  requireRoot(sys);
  const dm = new DeviceMapper(sys);
  requireDeviceMapper(dm);
  const records = attachedRecords(sys);
  let rec = records.find((r) => r.name === target);
  if (!rec) {
    let full: string | undefined;
    try { full = locateFile(sys, target).path; } catch { /* not a file */ }
    rec = records.find((r) => r.image === target || (full !== undefined && r.image === full));
  }
  const report = (m: string): void => io.err(`vdiskload: ${m}\n`);
  if (!rec) {
    // vdboot devices with no record (made at boot before records existed): by dm uuid
    const devs = vdbootDmDevices(sys).filter((d) => d.uuid === `${DM_UUID_PREFIX}${target}` || d.uuid.startsWith(`${DM_UUID_PREFIX}${target}-`));
    if (!devs.length) throw new VdiskloadError(`nothing is attached as ${target}: "vdiskload -l" lists what is`);
    const rank = (uuid: string): number => (/-part\d+$/.test(uuid) ? 0 : uuid.endsWith('-base') ? 2 : 1);
    // What lies under them is read from sysfs before they go: afterwards the links are gone.
    const under = backingDevices(sys, new Set(devs.map((d) => d.name)));
    for (const d of devs.sort((a, b) => rank(a.uuid) - rank(b.uuid))) takeDownDm(sys, dm, d.name);
    const freed: string[] = [];
    const kept: string[] = [];
    for (const b of under) {
      // only a device nothing else holds any more: another dm device may share a loop (vdhost, a second image)
      const held = holders(sys, b.dev);
      if (held.length) { kept.push(`/dev/${b.dev} (held by ${held.join(', ')})`); continue; }
      try {
        if (b.dev.startsWith('nbd')) disconnectNbd(sys, `/dev/${b.dev}`);
        else detachLoop(sys, `/dev/${b.dev}`);
        freed.push(`/dev/${b.dev}${b.file ? ` (${b.file})` : ''}`);
      } catch (e) {
        report(`${b.dev.startsWith('nbd') ? 'disconnecting' : 'detaching'} /dev/${b.dev}: ${(e as Error).message}`);
        kept.push(`/dev/${b.dev}`);
      }
    }
    io.out(`${target}: removed ${devs.map((d) => `/dev/mapper/${d.name}`).join(', ')}${freed.length ? `, ${freed.join(', ')}` : ''} (made at boot, no record: found by their dm uuids and sysfs)\n`);
    if (kept.length) io.out(`  left in place: ${kept.join(', ')}\n`);
    return;
  }
  for (const name of [...rec.devices].reverse()) takeDownDm(sys, dm, name);
  const errors: string[] = [];
  if (rec.nbd) try { disconnectNbd(sys, rec.nbd); } catch (e) { errors.push(`disconnecting ${rec.nbd}: ${(e as Error).message}`); }
  for (const l of [...rec.loops].reverse()) try { detachLoop(sys, l); } catch (e) { errors.push(`detaching ${l}: ${(e as Error).message}`); }
  for (const f of rec.immutable ?? []) try { clearImmutable(sys, f); } catch (e) { errors.push(`clearing the immutable flag of ${f}: ${(e as Error).message} (chattr -i ${f})`); }
  if (rec.by === 'vdiskload') try { sys.unlink(`${ATTACHED_DIR}/${rec.name}.json`); } catch { /* gone */ }
  for (const e of errors) report(e);
  io.out(`${rec.name}: detached ${rec.image}${rec.mode === 'snapshot' ? ' (its snapshot\'s writes are dropped)' : ''}\n`);
  if (errors.length) throw new VdiskloadError(`${rec.name}: ${errors.length} step${errors.length === 1 ? '' : 's'} of the detach failed (above)`);
}

/** sysfs's kernel name (dm-N) of each dm device, by its dm name. */
function dmKernelNames(sys: Sys): Map<string, string> {
  const out = new Map<string, string>();
  let entries: string[] = [];
  try { entries = sys.readdir('/sys/class/block'); } catch { /* no sysfs */ }
  for (const e of entries) {
    if (!/^dm-\d+$/.test(e)) continue;
    const name = (readTextOr(sys, `/sys/class/block/${e}/dm/name`) ?? '').trim();
    if (name) out.set(name, e);
  }
  return out;
}

function holders(sys: Sys, dev: string): string[] {
  try { return sys.readdir(`/sys/class/block/${dev}/holders`).filter((n) => n !== '.' && n !== '..'); } catch { return []; }
}

/** The loop and nbd devices under the named dm devices (their slaves in sysfs), with a loop's backing file. */
function backingDevices(sys: Sys, names: ReadonlySet<string>): { dev: string; file?: string }[] {
  const kernel = dmKernelNames(sys);
  const seen = new Set<string>();
  const out: { dev: string; file?: string }[] = [];
  for (const n of names) {
    const k = kernel.get(n);
    if (!k) continue;
    let slaves: string[] = [];
    try { slaves = sys.readdir(`/sys/class/block/${k}/slaves`); } catch { /* none */ }
    for (const s of slaves) {
      if (!/^(loop|nbd)\d+$/.test(s) || seen.has(s)) continue;
      seen.add(s);
      const file = readTextOr(sys, `/sys/class/block/${s}/loop/backing_file`)?.trim();
      out.push({ dev: s, ...(file ? { file } : {}) });
    }
  }
  return out;
}

/** Removes one dm device; a device in use is named with what to do. */
function takeDownDm(sys: Sys, dm: DeviceMapper, name: string): void {
  try {
    removeDm(sys, dm, name);
  } catch (e) {
    if (isSysError(e, 'ENXIO')) return; // gone already
    if (isSysError(e, 'EBUSY')) throw new VdiskloadError(`/dev/mapper/${name} is in use (mounted, or open by a program): unmount it first (umount /dev/mapper/${name}); nothing after it was taken down`);
    throw e;
  }
}
