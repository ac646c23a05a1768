/**
 * On a running system: where a file lies. Its full path without links (/proc/self/fd),
 * the mount that holds it (/proc/self/mountinfo: the longest mount point above it on the
 * file's own device), that mount's block device (/sys/dev/block), and whether it is
 * mounted read-only. vdiskload plans the image through this mount, as the boot plans
 * through /run/vdboot/host.
 */
import { FormatError } from '../formats/block-reader.ts';
import { isSysError, O, type Sys } from '../sys/sys.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import { readTextOr } from './fsutil.ts';

export interface MountEntry {
  /** "major:minor" of the filesystem (st_dev of its files) */
  dev: string;
  /** the mount point */
  dir: string;
  /** the directory of the filesystem mounted there ("/" unless a bind mount) */
  root: string;
  readOnly: boolean;
  fsType: string;
  source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Parses /proc/self/mountinfo (proc(5)); lines it cannot read are skipped. */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (f.length < 10 || sep < 0 || sep + 2 >= f.length) continue;
    const opts = f[5]!.split(',');
    out.push({ dev: f[2]!, root: unescapeMount(f[3]!), dir: unescapeMount(f[4]!), readOnly: opts.includes('ro'), fsType: f[sep + 1]!, source: unescapeMount(f[sep + 2]!) });
  }
  return out;
}

/** The mount holding `path` (a full path without links) on filesystem `dev`: the last-mounted, longest match. */
export function mountOf(mounts: readonly MountEntry[], path: string, dev: string): MountEntry | undefined {
  let best: MountEntry | undefined;
  for (const m of mounts) {
    const inside = m.dir === '/' || path === m.dir || path.startsWith(`${m.dir}/`);
    if (!inside || m.dev !== dev) continue;
    if (!best || m.dir.length >= best.dir.length) best = m;
  }
  return best;
}

export interface LocatedFile {
  /** the full path, links resolved */
  path: string;
  /** "major:minor:inode" */
  fileId: string;
  size: number;
  mount: MountEntry;
  /** the path below the mount point ("/VMs/a.vhdx") */
  inMount: string;
  /** the mount's block device, when it has one (not tmpfs, nfs, overlay) */
  device?: BlockDeviceInfo;
  /** the partition under the mount's device, when that is vdboot's vdhost */
  under?: BlockDeviceInfo;
}

/** The working directory (getcwd without the syscall). */
export function workingDir(sys: Sys): string {
  return sys.readlink('/proc/self/cwd');
}

/** Finds `given` (absolute or relative to the working directory) and the mount and device holding it. */
export function locateFile(sys: Sys, given: string): LocatedFile {
  const abs = given.startsWith('/') ? given : `${workingDir(sys).replace(/\/$/, '')}/${given}`;
  let fd: number;
  try {
    fd = sys.open(abs, O.RDONLY | O.CLOEXEC);
  } catch (e) {
    const code = isSysError(e) ? e.code : (e as Error).message;
    throw new FormatError(`${given}: cannot open it (${code})${code === 'ENOENT' ? ': no such file' : code === 'EACCES' ? ': permission denied' : ''}`, 'path', given);
  }
  let full: string;
  try {
    full = sys.readlink(`/proc/self/fd/${fd}`);
  } finally {
    sys.close(fd);
  }
  const st = sys.stat(full);
  if ((st.mode & 0o170000) !== 0o100000) throw new FormatError(`${given} is not a regular file (to attach a block device, use it directly)`, 'path', given);
  const dev = `${st.devMajor}:${st.devMinor}`;
  const mounts = parseMountinfo(readTextOr(sys, '/proc/self/mountinfo') ?? '');
  const mount = mountOf(mounts, full, dev);
  if (!mount) throw new FormatError(`${full}: no mount in /proc/self/mountinfo holds it (its filesystem is ${dev}); is /proc mounted?`, 'path', full);
  const inMount = mount.dir === '/' ? full : full.slice(mount.dir.length);
  const located: LocatedFile = { path: full, fileId: `${dev}:${st.ino}`, size: st.size, mount, inMount };
  const device = blockDeviceOf(sys, mount.source);
  if (device) {
    located.device = device;
    const under = vdhostPartition(sys, device);
    if (under) located.under = under;
  }
  return located;
}

/**
 * The partition under vdboot's vdhost (dm-linear over a whole partition from sector 0, dm
 * uuid VDBOOT-vdhost), when `device` is vdhost: a filesystem mounted through it leaves the
 * partition itself free for other device-mapper tables, which share vdhost's claim.
 */
export function vdhostPartition(sys: Sys, device: BlockDeviceInfo): BlockDeviceInfo | undefined {
  if (!/^dm-\d+$/.test(device.name)) return undefined;
  if ((readTextOr(sys, `/sys/class/block/${device.name}/dm/uuid`) ?? '').trim() !== 'VDBOOT-vdhost') return undefined;
  let slaves: string[];
  try { slaves = sys.readdir(`/sys/class/block/${device.name}/slaves`); } catch { return undefined; }
  if (slaves.length !== 1) return undefined;
  const part = blockDeviceOf(sys, `/dev/${slaves[0]!}`);
  return part && part.size === device.size ? part : undefined;
}

/** The block device a mount's source names, with its size from sysfs; undefined when it is not one. */
export function blockDeviceOf(sys: Sys, source: string): BlockDeviceInfo | undefined {
  if (!source.startsWith('/dev/')) return undefined;
  let st;
  try { st = sys.stat(source); } catch { return undefined; }
  if ((st.mode & 0o170000) !== 0o060000) return undefined;
  const major = st.rdevMajor, minor = st.rdevMinor;
  let name: string;
  try {
    const link = sys.readlink(`/sys/dev/block/${major}:${minor}`);
    name = link.slice(link.lastIndexOf('/') + 1);
  } catch {
    return undefined;
  }
  const sectors = Number((readTextOr(sys, `/sys/class/block/${name}/size`) ?? '').trim());
  if (!Number.isSafeInteger(sectors) || sectors <= 0) return undefined;
  return { name, path: source, major, minor, size: sectors * 512 };
}
