/**
 * Enough of the Sys port over Node's fs to run vdboot's unpacker on the build machine
 * (as root): device nodes through mknod(1), xattrs through setfattr(1).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { SysError, type Stat } from '../../src/sys/sys.ts';
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

export function nodeUnpackSys(opts: { umask?: boolean } = {}): UnpackSys {
  const unsupported = (name: string) => () => {
    throw new Error(`node test Sys: ${name} is not implemented`);
  };
  const sys: Partial<UnpackSys> = {
    open: (p, flags, mode) => wrap(`open ${p}`, () => fs.openSync(p, flags, mode)),
    close: (fd) => fs.closeSync(fd),
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
    utimensat: (p, sec, nsec) => wrap(`utimensat ${p}`, () => fs.lutimesSync(p, sec + nsec / 1e9, sec + nsec / 1e9)),
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
