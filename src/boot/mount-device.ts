/**
 * Mounting a found block device (the root, an image's or an archive's host partition)
 * with the probed or the given filesystem type(s), and choosing the init to start in the
 * mounted root. A mount that fails on every type is a BootFailure that says which error
 * each type met and what to try.
 */
import { isSysError, S, SysError, type Sys } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import { mkdirs, readTextOr } from './fsutil.ts';
import { mountOptions } from './mounts.ts';
import { DEFAULT_INITS, type BootPlan } from './plan.ts';

/**
 * The path a device is mounted by. A device-mapper device found by scanning is dm-N to the
 * kernel; it is mounted as /dev/mapper/NAME instead, as dracut and initramfs-tools do, so the
 * booted system's /proc/mounts, findmnt and grub-probe name it by its mapping
 * (/dev/mapper/ubuntu--vg-root), not by a number that changes from boot to boot. The node is
 * made when nothing (cryptsetup, lvm, vdboot's own device-mapper code) made it, and replaced
 * when it names other device numbers; when it cannot be made, dm-N is used.
 */
export function mountPathOf(sys: Sys, dev: BlockDeviceInfo): string {
  if (!dev.dmName || !/^dm-\d+$/.test(dev.name) || dev.path !== `/dev/${dev.name}` || dev.dmName.includes('/')) return dev.path;
  const mapped = `/dev/mapper/${dev.dmName}`;
  try {
    const st = sys.stat(mapped);
    if ((st.mode & S.IFMT) === S.IFBLK && st.rdevMajor === dev.major && st.rdevMinor === dev.minor) return mapped;
    sys.unlink(mapped);
  } catch (e) {
    if (!isSysError(e, 'ENOENT')) return dev.path;
  }
  try {
    mkdirs(sys, '/dev/mapper');
    sys.mknod(mapped, S.IFBLK | 0o600, dev.major, dev.minor);
    return mapped;
  } catch {
    return dev.path;
  }
}

/** Whether the kernel holds `dev` read-only (/sys/class/block/NAME/ro): a read-only image's devices, a write-protected card. */
export function deviceIsReadOnly(sys: Sys, dev: BlockDeviceInfo): boolean {
  return readTextOr(sys, `/sys/class/block/${dev.name}/ro`) === '1';
}

/** Mounts `dev` on `target` with the probed or the given filesystem type(s). */
export function mountDevice(ctx: InitContext, found: BlockDeviceInfo, target: string, fsTypes: string | undefined, readOnly: boolean, flagsText: string): string {
  const { sys, log, modules } = ctx;
  const dev = { ...found, path: mountPathOf(sys, found) };
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
