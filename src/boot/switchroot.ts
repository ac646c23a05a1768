/**
 * switch_root: hand the machine to the root filesystem mounted at `newRoot`.
 * Order matters and every step is a point of no return once the initramfs is deleted.
 */
import { isSysError, MS, S, type Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import { isDirectory, mkdirs } from './fsutil.ts';
import { MOVED_AT_SWITCH } from './mounts.ts';

const RAMFS_MAGIC = 0x858458f6;
const TMPFS_MAGIC = 0x01021994;

export const INIT_ENV = ['HOME=/', 'TERM=linux', 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'];

/**
 * Moves the API filesystems into the new root. Best-effort per mount: a mount that
 * cannot be moved is reported, not fatal — the guest's init remounts what it needs,
 * and failing here would leave the machine with no root at all.
 */
export function moveApiMounts(sys: Sys, newRoot: string, log: ConsoleLog): void {
  for (const dir of MOVED_AT_SWITCH) {
    const target = `${newRoot}${dir}`;
    try {
      if (!isDirectory(sys, target)) mkdirs(sys, target);
      sys.mount(dir, target, '', MS.MOVE, '');
    } catch (e) {
      log.warn(`could not move ${dir} into the new root (${(e as Error).message}); the guest's init must mount it itself`);
    }
  }
}

/**
 * Deletes the initramfs contents to free its memory. Invariants:
 * - only when / is the initramfs (ramfs or tmpfs): never on a disk filesystem;
 * - never descends into another filesystem (st_dev differs), so the new root, moved
 *   API mounts and anything mounted below are untouched.
 * Every name is unlinked first, without a stat: unlink(2) removes the name only (a symlink,
 * never its target), fails with EISDIR on a directory and EBUSY on a mount point, so a
 * file costs one call; only directories are looked at (lstat: same filesystem?) before
 * the walk goes in. The initramfs is mostly files and busybox's applet links: this halves
 * the calls, each of which costs the interpreter more than the kernel.
 * Best-effort: a file that cannot be removed only costs memory.
 */
export function deleteInitramfs(sys: Sys, log: ConsoleLog): void {
  const fsType = sys.statfs('/').type >>> 0;
  if (fsType !== RAMFS_MAGIC && fsType !== TMPFS_MAGIC) {
    log.warn(`/ is not the initramfs (filesystem magic 0x${fsType.toString(16)}); its contents are left in place`);
    return;
  }
  const rootDev = sys.lstat('/');
  let failed = 0;
  const walk = (dir: string): void => {
    let names: string[];
    try { names = sys.readdir(dir); } catch { failed++; return; }
    for (const name of names) {
      const path = dir === '/' ? `/${name}` : `${dir}/${name}`;
      try {
        sys.unlink(path);
        continue;
      } catch (e) {
        if (!isSysError(e, 'EISDIR') && !isSysError(e, 'EPERM')) { failed++; continue; }
      }
      let st;
      try { st = sys.lstat(path); } catch { failed++; continue; }
      if (st.devMajor !== rootDev.devMajor || st.devMinor !== rootDev.devMinor) continue;
      if ((st.mode & S.IFMT) !== S.IFDIR) { failed++; continue; }
      walk(path);
      try { sys.rmdir(path); } catch { failed++; }
    }
  };
  walk('/');
  if (failed) log.debug(`${failed} initramfs entries could not be removed`);
}

/**
 * Moves `newRoot` onto /, enters it and executes `init`. Returns only by throwing.
 * `beforeExec` runs last, when nothing but the execve is left (the timing summary).
 */
export function switchRoot(sys: Sys, newRoot: string, init: string, args: string[], log: ConsoleLog, beforeExec?: () => void): never {
  log.timed('switch-prep', () => {
    log.timed('move-mounts', () => moveApiMounts(sys, newRoot, log));
    sys.chdir(newRoot);
    log.timed('delete-initramfs', () => deleteInitramfs(sys, log));
    sys.mount('.', '/', '', MS.MOVE, '');
    sys.chroot('.');
    sys.chdir('/');
  });
  beforeExec?.();
  return sys.execve(init, [init, ...args], INIT_ENV);
}
