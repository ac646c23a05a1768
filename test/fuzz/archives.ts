/**
 * Fuzz target: root archives. GNU tar (ustar, GNU long names, pax) and GNU cpio newc
 * archives of a small tree holding every entry type, hard links, long names and a hostile
 * part (a symlink to a directory outside, then a file through it; "..", absolute names,
 * a hard link out), with their headers mutated — names, link names, type flags, sizes,
 * modes — and sometimes truncated, are unpacked by vdboot's unpacker into an in-memory
 * filesystem.
 *
 * The checker is that filesystem: it resolves every path the unpacker hands it as the
 * kernel would, and records a violation for any call that would create or change
 * something outside the root, pass through a symbolic link (any symbolic link: the root
 * starts empty, so each one came from the archive), follow one at the end of a path when
 * the call does (chmod, open without O_NOFOLLOW), or name ".." at all. The *at calls are
 * checked as the path of their directory descriptor joined with the name; openat2 with
 * RESOLVE_NO_SYMLINKS refuses a symbolic link on the way (ELOOP) as the kernel does. A case ends with
 * the archive unpacked or an UnpackError/FormatError, and no violation either way.
 */
import { execFileSync, execSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { bytesSource, StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { unpackArchive, UnpackError, type UnpackSys } from '../../src/boot/unpack.ts';
import { AT, O, RESOLVE, S, SysError, type Stat } from '../../src/sys/sys.ts';
import { CheckFailure, mutateBytes, type Rng, undoBytes } from './engine.ts';

const ROOT = '/sysroot';

const ERRNO: Record<string, number> = { EXDEV: 18, ENOENT: 2, EEXIST: 17, ENOTDIR: 20, EISDIR: 21, ENOTEMPTY: 39, EPERM: 1, ELOOP: 40, EBADF: 9, EINVAL: 22 };

interface Node {
  mode: number;
  target?: string;
  size: number;
  nlinkGroup?: object;
}

/** An in-memory filesystem that records every unsafe call instead of performing it. */
export class CheckingFs {
  readonly nodes = new Map<string, Node>();
  readonly violations: string[] = [];
  private fds = new Map<number, string>();
  private nextFd = 3;
  calls = 0;

  constructor() {
    this.nodes.set('/', { mode: S.IFDIR | 0o755, size: 0 });
    this.nodes.set(ROOT, { mode: S.IFDIR | 0o755, size: 0 });
    this.nodes.set('/dev', { mode: S.IFDIR | 0o755, size: 0 });
    this.nodes.set('/dev/vda', { mode: S.IFBLK | 0o660, size: 0 });
  }

  private fail(code: string, call: string): never {
    throw new SysError(code, ERRNO[code] ?? 5, call);
  }

  /**
   * The path with its directories checked as the kernel walks them: every one must exist,
   * be a directory and not a symbolic link (following one is a violation); "..", and a
   * path that leaves the root, are violations when `writes`.
   */
  private walk(p: string, call: string, writes: boolean, followLast: boolean): string {
    this.calls += 1;
    if (this.calls > 200_000) throw new CheckFailure(`more than 200000 filesystem calls: a loop?`);
    if (!p.startsWith('/')) this.violations.push(`${call}: relative path "${p}"`);
    const parts = p.split('/').filter((x) => x !== '' && x !== '.');
    if (parts.includes('..')) this.violations.push(`${call}: ".." in "${p}"`);
    const norm = `/${parts.join('/')}`;
    if (writes && norm !== ROOT && !norm.startsWith(`${ROOT}/`)) this.violations.push(`${call}: "${p}" is outside ${ROOT}`);
    let cur = '';
    for (let i = 0; i < parts.length; i++) {
      cur += `/${parts[i]}`;
      const n = this.nodes.get(cur);
      const last = i === parts.length - 1;
      if (!n) {
        if (last) return cur;
        this.fail('ENOENT', call);
      }
      if ((n.mode & S.IFMT) === S.IFLNK && (!last || followLast)) {
        this.violations.push(`${call}: "${p}" goes through the symbolic link ${cur} -> ${n.target}`);
        this.fail('ELOOP', call);
      }
      if (!last && (n.mode & S.IFMT) !== S.IFDIR) this.fail('ENOTDIR', call);
    }
    return norm;
  }

  private create(p: string, node: Node, call: string): void {
    const k = this.walk(p, call, true, false);
    if (this.nodes.has(k)) this.fail('EEXIST', call);
    this.nodes.set(k, node);
  }

  private existing(p: string, call: string, writes: boolean, follow: boolean): [string, Node] {
    const k = this.walk(p, call, writes, follow);
    const n = this.nodes.get(k);
    if (!n) this.fail('ENOENT', call);
    return [k, n];
  }

  sys(): UnpackSys {
    const stat = (n: Node): Stat => ({ mode: n.mode, size: n.size, rdevMajor: 0, rdevMinor: 0, devMajor: 0, devMinor: 0, ino: 1, nlink: 1, uid: 0, gid: 0, mtimeSec: 0 });
    const at = (dirfd: number, p: string): string => {
      if (dirfd === AT.FDCWD) return p;
      const dir = this.fds.get(dirfd) ?? this.fail('EBADF', `at fd ${dirfd}`);
      return `${dir}/${p}`;
    };
    const impl: Partial<UnpackSys> = {
      open: (p, flags, mode) => {
        const call = `open ${p}`;
        if ((flags & O.PATH) !== 0) {
          // a directory to resolve names from
          const [k, n] = this.existing(p, call, false, (flags & O.NOFOLLOW) === 0);
          if ((n.mode & S.IFMT) !== S.IFDIR) this.fail('ENOTDIR', call);
          const fd = this.nextFd++;
          this.fds.set(fd, k);
          return fd;
        }
        if ((flags & O.CREAT) !== 0) {
          if ((flags & O.EXCL) === 0) this.violations.push(`${call}: O_CREAT without O_EXCL could write through an existing name`);
          this.create(p, { mode: S.IFREG | (mode ?? 0), size: 0 }, call);
        } else {
          const [, n] = this.existing(p, call, (flags & 3) !== 0, (flags & O.NOFOLLOW) === 0);
          if ((n.mode & S.IFMT) === S.IFLNK) this.fail('ELOOP', call);
          if ((flags & 3) !== 0 && (n.mode & S.IFMT) !== S.IFREG) this.violations.push(`${call}: opened for writing, but it is not a regular file (mode ${n.mode.toString(8)})`);
        }
        const fd = this.nextFd++;
        this.fds.set(fd, this.walk(p, call, false, false));
        return fd;
      },
      close: (fd) => {
        if (!this.fds.delete(fd)) this.fail('EBADF', `close ${fd}`);
      },
      write: (fd, buf) => {
        const k = this.fds.get(fd);
        if (k === undefined) this.fail('EBADF', `write ${fd}`);
        const n = this.nodes.get(k);
        if (n) n.size += buf.length;
        return buf.length;
      },
      mkdir: (p, mode) => this.create(p, { mode: S.IFDIR | (mode & 0o7777), size: 0 }, `mkdir ${p}`),
      rmdir: (p) => {
        const [k, n] = this.existing(p, `rmdir ${p}`, true, false);
        if ((n.mode & S.IFMT) !== S.IFDIR) this.fail('ENOTDIR', `rmdir ${p}`);
        for (const other of this.nodes.keys()) if (other.startsWith(`${k}/`)) this.fail('ENOTEMPTY', `rmdir ${p}`);
        if (k === ROOT) this.violations.push(`rmdir ${p}: the root itself`);
        this.nodes.delete(k);
      },
      unlink: (p) => {
        const [k, n] = this.existing(p, `unlink ${p}`, true, false);
        if ((n.mode & S.IFMT) === S.IFDIR) this.fail('EISDIR', `unlink ${p}`);
        this.nodes.delete(k);
      },
      symlink: (t, p) => this.create(p, { mode: S.IFLNK | 0o777, target: t, size: t.length }, `symlink ${p}`),
      link: (t, p) => {
        const [, n] = this.existing(t, `link ${t}`, true, false);
        if ((n.mode & S.IFMT) === S.IFDIR) this.fail('EPERM', `link ${t}`);
        this.create(p, n, `link ${p}`);
      },
      mknod: (p, mode) => this.create(p, { mode, size: 0 }, `mknod ${p}`),
      chmod: (p, mode) => {
        const [, n] = this.existing(p, `chmod ${p}`, true, true);
        n.mode = (n.mode & S.IFMT) | (mode & 0o7777);
      },
      lchown: (p) => void this.existing(p, `lchown ${p}`, true, false),
      lstat: (p) => stat(this.existing(p, `lstat ${p}`, false, false)[1]),
      stat: (p) => stat(this.existing(p, `stat ${p}`, false, true)[1]),
      lsetxattr: (p) => void this.existing(p, `lsetxattr ${p}`, true, false),
      umask: () => 0o022,
      openat: (dirfd, p, flags, mode) => impl.open!(at(dirfd, p), flags, mode),
      openat2: (dirfd, p, flags, mode, resolve) => {
        const call = `openat2 ${p}`;
        const parts = p.split('/');
        if ((resolve & RESOLVE.BENEATH) !== 0 && (p.startsWith('/') || parts.includes('..'))) throw new SysError('EXDEV', 18, call);
        let cur = at(dirfd, '').replace(/\/$/, '');
        for (const part of parts) {
          cur = `${cur}/${part}`;
          const n = this.nodes.get(cur);
          if (!n) this.fail('ENOENT', call);
          if ((resolve & RESOLVE.NO_SYMLINKS) !== 0 && (n.mode & S.IFMT) === S.IFLNK) this.fail('ELOOP', call);
        }
        return impl.open!(cur, flags, mode);
      },
      mkdirat: (dirfd, p, mode) => impl.mkdir!(at(dirfd, p), mode),
      unlinkat: (dirfd, p, flags) => ((flags & AT.REMOVEDIR) !== 0 ? impl.rmdir!(at(dirfd, p)) : impl.unlink!(at(dirfd, p))),
      fchmodat: (dirfd, p, mode) => impl.chmod!(at(dirfd, p), mode),
      mknodat: (dirfd, p, mode, major, minor) => impl.mknod!(at(dirfd, p), mode, major, minor),
      fchownat: (dirfd, p, uid, gid, flags) => {
        if ((flags & AT.SYMLINK_NOFOLLOW) === 0) void this.existing(at(dirfd, p), `fchownat ${p}`, true, true);
        else impl.lchown!(at(dirfd, p), uid, gid);
      },
      symlinkat: (t, dirfd, p) => impl.symlink!(t, at(dirfd, p)),
      linkat: (od, op, nd, np) => impl.link!(at(od, op), at(nd, np)),
      fstatat: (dirfd, p, flags) => ((flags & AT.SYMLINK_NOFOLLOW) !== 0 ? impl.lstat!(at(dirfd, p)) : impl.stat!(at(dirfd, p))),
      utimensatAt: (dirfd, p, _s, _n, flags) => void this.existing(at(dirfd, p), `utimensat ${p}`, true, (flags & AT.SYMLINK_NOFOLLOW) === 0),
    };
    return new Proxy(impl as UnpackSys, {
      get: (t, k: string) => {
        if (k in t) return (t as unknown as Record<string, unknown>)[k];
        return () => {
          throw new CheckFailure(`the unpacker called ${k}, which the checking filesystem does not know`);
        };
      },
    });
  }
}

export interface ArchiveSeed {
  name: string;
  bytes: Uint8Array;
  /** where headers start (mutations go mostly there) */
  headers: [number, number][];
}

/** Small tar and cpio archives, made by GNU tar and GNU cpio from a tree with every entry type and a hostile part. */
export function buildArchiveSeeds(dir: string): ArchiveSeed[] {
  const src = path.join(dir, 'src');
  const outside = path.join(dir, 'outside');
  fs.mkdirSync(path.join(src, 'etc/deep/er'), { recursive: true });
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, 'vda'), 'disk');
  fs.writeFileSync(path.join(src, 'etc/hostname'), 'guest\n');
  fs.writeFileSync(path.join(src, 'etc/deep/er/big'), Buffer.alloc(3000, 0x41));
  fs.writeFileSync(path.join(src, `etc/${'long-name-'.repeat(12)}`), 'long\n');
  fs.symlinkSync('../etc/hostname', path.join(src, 'etc/link'));
  fs.linkSync(path.join(src, 'etc/hostname'), path.join(src, 'etc/hard'));
  execFileSync('mkfifo', [path.join(src, 'etc/fifo')]);
  execFileSync('mknod', [path.join(src, 'etc/null'), 'c', '1', '3']);
  fs.mkdirSync(path.join(src, 'data'));
  fs.symlinkSync(outside, path.join(src, 'data/dv'));
  fs.writeFileSync(path.join(src, 'esc'), 'x');
  const names = ['.', 'etc', 'etc/hostname', 'etc/deep', 'etc/deep/er', 'etc/deep/er/big', `etc/${'long-name-'.repeat(12)}`, 'etc/link', 'etc/hard', 'etc/fifo', 'etc/null', 'data', 'data/dv', 'data/dv/vda', 'esc'];
  const seeds: ArchiveSeed[] = [];
  const tarHeaders = (b: Uint8Array): [number, number][] => {
    // every 512-byte block that passes as a header (checksum field with octal digits)
    const out: [number, number][] = [];
    for (let at = 0; at + 512 <= b.length; at += 512) if (b[at + 257] === 0x75 && b[at + 258] === 0x73) out.push([at, 500]);
    return out;
  };
  for (const [fmt, extra] of [['gnu', ''], ['pax', ''], ['ustar', ''], ['gnu', "--transform='s,^esc$,../esc,' --transform='s,^etc/hard$,/abs/hard,'"]] as const) {
    const bytes = new Uint8Array(execSync(`tar -P --format=${fmt} ${extra} --no-recursion -cf - ${names.filter((n) => fmt !== 'ustar' || !n.includes('long-name')).join(' ')}`, { cwd: src, maxBuffer: 16 << 20 }));
    seeds.push({ name: `tar ${fmt}${extra ? ' hostile' : ''}`, bytes, headers: tarHeaders(bytes) });
  }
  const cpio = new Uint8Array(execSync('cpio --quiet -o -H newc', { cwd: src, input: [...names, '../src/esc', path.join(src, 'esc')].join('\n') + '\n', maxBuffer: 16 << 20 }));
  const cpioHeaders: [number, number][] = [];
  for (let at = cpio.indexOf(0x30); at >= 0 && at + 110 <= cpio.length; ) {
    cpioHeaders.push([at, 110 + 40]);
    const text = new TextDecoder().decode(cpio.subarray(at, at + 110));
    if (!text.startsWith('07070')) break;
    const fsize = parseInt(text.slice(54, 62), 16);
    const nsize = parseInt(text.slice(94, 102), 16);
    const pad4 = (n: number) => (4 - (n % 4)) % 4;
    const nameEnd = at + 110 + nsize;
    const dataAt = nameEnd + pad4(nameEnd);
    at = dataAt + fsize + pad4(fsize);
  }
  seeds.push({ name: 'cpio newc', bytes: cpio, headers: cpioHeaders });
  return seeds;
}

/** Rewrites a tar header's name or link name field with characters that make paths interesting. */
function mutateNames(r: Rng, b: Uint8Array, seed: ArchiveSeed, label: string[]): [number, number][] {
  const undo: [number, number][] = [];
  if (!seed.name.startsWith('tar') || seed.headers.length === 0) return undo;
  const [h] = r.pick(seed.headers);
  const field = r.chance(0.6) ? h : h + 157; // name, or linkname
  const piece = r.pick(['../', '/', './', '..', 'data/dv/', 'etc/link/', 'etc/fifo/', '/dev/', '\0', 'etc', 'x']);
  const at = field + r.int(90);
  for (let i = 0; i < piece.length && at + i < b.length; i++) {
    undo.push([at + i, b[at + i]!]);
    b[at + i] = piece.charCodeAt(i);
  }
  if (r.chance(0.3)) {
    undo.push([h + 156, b[h + 156]!]);
    b[h + 156] = r.pick([0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36]); // file, hard link, symlink, char, block, dir, fifo
  }
  // recompute the header checksum so the mutation gets past it
  for (let i = 0; i < 8; i++) undo.push([h + 148 + i, b[h + 148 + i]!]);
  b.fill(0x20, h + 148, h + 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += b[h + i]!;
  const text = sum.toString(8).padStart(6, '0');
  for (let i = 0; i < 6; i++) b[h + 148 + i] = text.charCodeAt(i);
  b[h + 154] = 0;
  label.push(`"${piece.replace('\0', '\\0')}" at ${at} (header ${h})`);
  return undo;
}

export function archiveCase(seeds: ArchiveSeed[], r: Rng, label: string[]): 'ok' | 'refused' {
  const seed = r.pick(seeds);
  label.push(seed.name);
  const b = seed.bytes;
  const undo = [...mutateNames(r, b, seed, label), ...(r.chance(0.5) ? mutateBytes(r, b, seed.headers, label) : [])];
  let bytes: Uint8Array = b;
  if (r.chance(0.05)) {
    bytes = b.subarray(0, r.int(b.length));
    label.push(`truncated to ${bytes.length}`);
  }
  const vfs = new CheckingFs();
  let outcome: 'ok' | 'refused' = 'ok';
  try {
    unpackArchive(vfs.sys(), openArchive(new StreamCursor(bytesSource(bytes, 1000)), 'fuzz'), ROOT);
  } catch (e) {
    if (e instanceof CheckFailure) throw e;
    if (!(e instanceof UnpackError) && !isFormatError(e)) throw e;
    if (e instanceof UnpackError && e.reason instanceof CheckFailure) throw e.reason;
    outcome = 'refused';
  } finally {
    undoBytes(b, undo);
  }
  if (vfs.violations.length) throw new CheckFailure(vfs.violations.slice(0, 3).join('\n'));
  return outcome;
}
