/**
 * Enough of the Sys port over Node's fs to run vdboot's unpacker on the build machine
 * (as root): device nodes through mknod(1), xattrs through setfattr(1). Node has no *at
 * calls: a directory descriptor here is a number standing for the directory's path, and
 * openat2's RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS is an lstat of every component.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { AT, O, RESOLVE, SysError, type Stat } from '../../src/sys/sys.ts';
import type { UnpackSys } from '../../src/boot/unpack.ts';

function wrap<T>(call: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code) throw new SysError(err.code, -(err.errno ?? 0), call);
    throw e;
  }
}

function toStat(st: fs.Stats): Stat {
  return {
    mode: st.mode, size: st.size, rdevMajor: Math.floor(st.rdev / 256), rdevMinor: st.rdev % 256, devMajor: 0, devMinor: 0,
    ino: st.ino, nlink: st.nlink, uid: st.uid, gid: st.gid, mtimeSec: Math.floor(st.mtimeMs / 1000),
  };
}

function fail(code: string, errno: number, call: string): never {
  throw new SysError(code, errno, call);
}

export function nodeUnpackSys(opts: { umask?: boolean } = {}): UnpackSys {
  const unsupported = (name: string) => () => {
    throw new Error(`node test Sys: ${name} is not implemented`);
  };
  /** Directory "descriptors": their paths. */
  const dirFds = new Map<number, string>();
  let nextDirFd = 100_000;
  const at = (dirfd: number, p: string): string => {
    if (dirfd === AT.FDCWD || p.startsWith('/')) return p;
    const dir = dirFds.get(dirfd) ?? fail('EBADF', 9, `at ${dirfd}`);
    return p === '' ? dir : `${dir}/${p}`;
  };
  const openDir = (p: string): number => {
    if (!fs.statSync(p).isDirectory()) fail('ENOTDIR', 20, `open ${p}`);
    dirFds.set(nextDirFd, p);
    return nextDirFd++;
  };
  const open = (p: string, flags: number, mode?: number): number => wrap(`open ${p}`, () => ((flags & O.PATH) !== 0 ? openDir(p) : fs.openSync(p, flags, mode)));
  const sys: Partial<UnpackSys> = {
    open,
    close: (fd) => (dirFds.delete(fd) ? undefined : fs.closeSync(fd)),
    openat: (dirfd, p, flags, mode) => open(at(dirfd, p), flags, mode),
    openat2: (dirfd, p, flags, mode, resolve) => wrap(`openat2 ${p}`, () => {
      const parts = p.split('/');
      if ((resolve & RESOLVE.BENEATH) && (p.startsWith('/') || parts.includes('..'))) fail('EXDEV', 18, `openat2 ${p}`);
      let cur = at(dirfd, '');
      for (const part of parts) {
        cur = `${cur}/${part}`;
        if ((resolve & RESOLVE.NO_SYMLINKS) && fs.lstatSync(cur).isSymbolicLink()) fail('ELOOP', 40, `openat2 ${p}`);
      }
      return open(cur, flags, mode);
    }),
    mkdirat: (dirfd, p, mode) => wrap(`mkdirat ${p}`, () => fs.mkdirSync(at(dirfd, p), { mode })),
    unlinkat: (dirfd, p, flags) => wrap(`unlinkat ${p}`, () => ((flags & AT.REMOVEDIR) ? fs.rmdirSync(at(dirfd, p)) : fs.unlinkSync(at(dirfd, p)))),
    fchmodat: (dirfd, p, mode) => wrap(`fchmodat ${p}`, () => fs.chmodSync(at(dirfd, p), mode)),
    mknodat: (dirfd, p, mode, major, minor) => sys.mknod!(at(dirfd, p), mode, major, minor),
    fchownat: (dirfd, p, u, g, flags) => wrap(`fchownat ${p}`, () => ((flags & AT.SYMLINK_NOFOLLOW) ? fs.lchownSync(at(dirfd, p), u, g) : fs.chownSync(at(dirfd, p), u, g))),
    symlinkat: (t, dirfd, p) => wrap(`symlinkat ${p}`, () => fs.symlinkSync(t, at(dirfd, p))),
    // link(2) on Linux, like linkat without AT_SYMLINK_FOLLOW, links a symbolic link itself
    linkat: (od, op, nd, np) => wrap(`linkat ${op} at ${np}`, () => fs.linkSync(at(od, op), at(nd, np))),
    fstatat: (dirfd, p, flags) => wrap(`fstatat ${p}`, () => toStat((flags & AT.SYMLINK_NOFOLLOW) ? fs.lstatSync(at(dirfd, p)) : fs.statSync(at(dirfd, p)))),
    utimensatAt: (dirfd, p, sec, nsec, flags) => wrap(`utimensat ${p}`, () => {
      const t = sec + nsec / 1e9;
      if (flags & AT.SYMLINK_NOFOLLOW) fs.lutimesSync(at(dirfd, p), t, t);
      else fs.utimesSync(at(dirfd, p), t, t);
    }),
    write: (fd, buf) => wrap('write', () => fs.writeSync(fd, buf)),
    mkdir: (p, mode) => wrap(`mkdir ${p}`, () => fs.mkdirSync(p, { mode })),
    rmdir: (p) => wrap(`rmdir ${p}`, () => fs.rmdirSync(p)),
    unlink: (p) => wrap(`unlink ${p}`, () => fs.unlinkSync(p)),
    symlink: (t, p) => wrap(`symlink ${p}`, () => fs.symlinkSync(t, p)),
    link: (t, p) => wrap(`link ${t} at ${p}`, () => fs.linkSync(t, p)),
    mknod: (p, mode, major, minor) => wrap(`mknod ${p}`, () => {
      if (fs.existsSync(p) || (() => { try { fs.lstatSync(p); return true; } catch { return false; } })()) throw Object.assign(new Error('exists'), { code: 'EEXIST', errno: 17 });
      const kind = (mode & 0o170000) === 0o020000 ? 'c' : (mode & 0o170000) === 0o060000 ? 'b' : 'p';
      execFileSync('mknod', ['-m', (mode & 0o7777).toString(8), p, kind, ...(kind === 'p' ? [] : [String(major), String(minor)])]);
    }),
    chmod: (p, mode) => wrap(`chmod ${p}`, () => fs.chmodSync(p, mode)),
    lchown: (p, u, g) => wrap(`lchown ${p}`, () => fs.lchownSync(p, u, g)),
    lstat: (p) => wrap(`lstat ${p}`, () => toStat(fs.lstatSync(p))),
    stat: (p) => wrap(`stat ${p}`, () => toStat(fs.statSync(p))),
    lsetxattr: (p, name, value) => wrap(`lsetxattr ${p}`, () => {
      execFileSync('setfattr', ['-h', '-n', name, '-v', `0x${Buffer.from(value).toString('hex')}`, p]);
    }),
  };
  if (opts.umask) sys.umask = (mask) => process.umask(mask);
  return new Proxy(sys as UnpackSys, {
    // Optional calls the unpacker feature-tests must read as absent.
    get: (t, k: string) => (k in t ? (t as unknown as Record<string, unknown>)[k] : k === 'umask' ? undefined : unsupported(k)),
  });
}
