/**
 * newc cpio ("070701"), the format the kernel unpacks into the initramfs rootfs.
 *
 * The writer is deterministic: the same entries give the same bytes. Entries are sorted
 * by path component (so every directory comes before its children), missing parent
 * directories are added, inode numbers count up from 1 in output order, every mtime is the
 * one given (SOURCE_DATE_EPOCH, or 0), owners default to root. Hard links share one inode;
 * like GNU cpio, only the last entry of a link group carries the data (the kernel and
 * `cpio -i` both rebuild the links from that).
 *
 * The reader parses what the writer (or GNU cpio, or the kernel's own tools) produced; it is
 * for tests and for the init's self-check, and treats its input as untrusted.
 *
 * Engine-neutral: Uint8Array only.
 */
import { FormatError } from './block-reader.ts';
import { utf8Decode, utf8Encode } from './text.ts';

export const S_IFMT = 0o170000;
export const S_IFSOCK = 0o140000;
export const S_IFLNK = 0o120000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;
export const S_IFDIR = 0o040000;
export const S_IFCHR = 0o020000;
export const S_IFIFO = 0o010000;

/** One thing to put in the archive. Paths are relative to the root ("bin/sh"; a leading "/" is dropped). */
export type CpioInput =
  | { type: 'file'; path: string; data: Uint8Array; mode?: number; uid?: number; gid?: number }
  | { type: 'dir'; path: string; mode?: number; uid?: number; gid?: number }
  | { type: 'symlink'; path: string; target: string; uid?: number; gid?: number }
  /** A second name for the regular file at `target` (an archive path). */
  | { type: 'hardlink'; path: string; target: string }
  | { type: 'char' | 'block'; path: string; major: number; minor: number; mode?: number; uid?: number; gid?: number }
  | { type: 'fifo'; path: string; mode?: number; uid?: number; gid?: number }
  /**
   * A regular file whose body the caller copies in itself (cpioLayout only): `source` names
   * it for the caller (a path to copy from in the kernel, say), `size` is its length.
   */
  | { type: 'external'; path: string; source: string; size: number; mode?: number; uid?: number; gid?: number };

/** A piece of an archive laid out by cpioLayout: bytes as they are, or a body to copy from `source`. */
export type CpioPiece = Uint8Array | { source: string; size: number };

export interface CpioWriteOptions {
  /** Seconds since the epoch for every entry (SOURCE_DATE_EPOCH); default 0. */
  mtime?: number;
}

/** An entry as stored in (or read back from) the archive. */
export interface CpioEntry {
  name: string;
  ino: number;
  /** File type and permission bits, as st_mode. */
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  devMajor: number;
  devMinor: number;
  rdevMajor: number;
  rdevMinor: number;
  /** The file's body (regular files), the target (symlinks), else empty. */
  data: Uint8Array;
}

const TRAILER = 'TRAILER!!!';
const HEADER_SIZE = 110;
const MAX_U32 = 0xffffffff;

/** Normalises an archive path: no leading "/" or "./", no empty or "." components; rejects "..". */
export function cpioPath(path: string): string {
  const parts = path.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.some((p) => p === '..')) throw new FormatError(`cpio path "${path}" contains "..": archive paths must stay inside the root`, 'name', path);
  if (parts.length === 0) throw new FormatError(`cpio path "${path}" names the root itself; give a path inside it`, 'name', path);
  return parts.join('/');
}

/** Orders paths component by component, so a directory sorts before everything inside it. */
export function comparePaths(a: string, b: string): number {
  const pa = a.split('/');
  const pb = b.split('/');
  const n = Math.min(pa.length, pb.length);
  for (let i = 0; i < n; i++) {
    if (pa[i] !== pb[i]) return pa[i] < pb[i] ? -1 : 1;
  }
  return pa.length - pb.length;
}

interface Planned {
  name: string;
  nameBytes: Uint8Array;
  mode: number;
  uid: number;
  gid: number;
  rdevMajor: number;
  rdevMinor: number;
  data: Uint8Array;
  /** the body is not in `data` but copied from here by the caller (size `extSize`) */
  ext?: string;
  extSize: number;
  /** hard-link group key (the canonical path of the file), or "" */
  group: string;
  ino: number;
  nlink: number;
}

/** Builds a newc archive from `inputs`; see the file comment for the guarantees. */
export function writeCpio(inputs: readonly CpioInput[], options: CpioWriteOptions = {}): Uint8Array {
  const pieces = cpioLayout(inputs, options);
  let size = 0;
  for (const p of pieces) {
    if (!(p instanceof Uint8Array)) throw new FormatError(`cpio: "${p.source}" is an external body; writeCpio needs the bytes (use cpioLayout)`, 'source', p.source);
    size += p.length;
  }
  const out = new Uint8Array(size);
  let pos = 0;
  for (const p of pieces as Uint8Array[]) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/**
 * The same archive as writeCpio, as pieces in order: headers, names, padding and in-memory
 * bodies joined into byte runs, and each `external` file's body as `{ source, size }` for
 * the caller to copy (exactly `size` bytes; the padding after it is in the next run). An
 * archive of programs and modules is then written without their bytes passing through here.
 */
export function cpioLayout(inputs: readonly CpioInput[], options: CpioWriteOptions = {}): CpioPiece[] {
  const mtime = options.mtime ?? 0;
  if (!Number.isInteger(mtime) || mtime < 0 || mtime > MAX_U32) throw new FormatError(`cpio mtime ${mtime} is not a whole number of seconds between 0 and ${MAX_U32}`, 'mtime', mtime);

  const byPath = new Map<string, Planned>();
  const hardlinks: Array<{ path: string; target: string }> = [];
  const add = (p: Planned): void => {
    if (byPath.has(p.name)) throw new FormatError(`cpio: "${p.name}" is given twice`, 'name', p.name);
    byPath.set(p.name, p);
  };
  const base = (name: string, mode: number, uid = 0, gid = 0): Planned => ({
    name,
    nameBytes: utf8Encode(name),
    mode,
    uid,
    gid,
    rdevMajor: 0,
    rdevMinor: 0,
    data: new Uint8Array(0),
    extSize: 0,
    group: '',
    ino: 0,
    nlink: 1,
  });
  for (const input of inputs) {
    const name = cpioPath(input.path);
    switch (input.type) {
      case 'file': {
        const p = base(name, S_IFREG | ((input.mode ?? 0o644) & 0o7777), input.uid, input.gid);
        if (input.data.length > MAX_U32) throw new FormatError(`cpio: "${name}" is ${input.data.length} bytes; newc holds at most ${MAX_U32}`, 'filesize', input.data.length);
        p.data = input.data;
        add(p);
        break;
      }
      case 'external': {
        const p = base(name, S_IFREG | ((input.mode ?? 0o644) & 0o7777), input.uid, input.gid);
        if (!Number.isInteger(input.size) || input.size < 0 || input.size > MAX_U32) throw new FormatError(`cpio: "${name}" is ${input.size} bytes; newc holds at most ${MAX_U32}`, 'filesize', input.size);
        p.ext = input.source;
        p.extSize = input.size;
        add(p);
        break;
      }
      case 'dir':
        add(base(name, S_IFDIR | ((input.mode ?? 0o755) & 0o7777), input.uid, input.gid));
        break;
      case 'symlink': {
        const p = base(name, S_IFLNK | 0o777, input.uid, input.gid);
        if (input.target === '') throw new FormatError(`cpio: symlink "${name}" has an empty target`, 'target', name);
        p.data = utf8Encode(input.target);
        add(p);
        break;
      }
      case 'hardlink':
        hardlinks.push({ path: name, target: cpioPath(input.target) });
        break;
      case 'char':
      case 'block': {
        const p = base(name, (input.type === 'char' ? S_IFCHR : S_IFBLK) | ((input.mode ?? 0o600) & 0o7777), input.uid, input.gid);
        checkU32(input.major, 'rdevmajor', name);
        checkU32(input.minor, 'rdevminor', name);
        p.rdevMajor = input.major;
        p.rdevMinor = input.minor;
        add(p);
        break;
      }
      case 'fifo':
        add(base(name, S_IFIFO | ((input.mode ?? 0o644) & 0o7777), input.uid, input.gid));
        break;
    }
  }
  for (const link of hardlinks) {
    const target = byPath.get(link.target);
    if (!target || (target.mode & S_IFMT) !== S_IFREG) throw new FormatError(`cpio: hard link "${link.path}" points to "${link.target}", which is not a regular file in the archive`, 'target', link.target);
    target.group = target.name;
    const p = { ...target, name: link.path, nameBytes: utf8Encode(link.path) };
    add(p);
  }
  // Parents first: add the directories nobody named.
  for (const name of [...byPath.keys()]) {
    let slash = name.lastIndexOf('/');
    while (slash > 0) {
      const parent = name.slice(0, slash);
      const existing = byPath.get(parent);
      if (existing) {
        if ((existing.mode & S_IFMT) !== S_IFDIR) throw new FormatError(`cpio: "${name}" lies under "${parent}", which is not a directory`, 'name', name);
        break;
      }
      byPath.set(parent, base(parent, S_IFDIR | 0o755));
      slash = parent.lastIndexOf('/');
    }
  }

  // comparePaths's order, each name split once (the sort compares each many times).
  const keyed = [...byPath.values()].map((e) => ({ e, parts: e.name.split('/') }));
  keyed.sort((x, y) => {
    const pa = x.parts;
    const pb = y.parts;
    const n = Math.min(pa.length, pb.length);
    for (let i = 0; i < n; i++) if (pa[i] !== pb[i]) return pa[i]! < pb[i]! ? -1 : 1;
    return pa.length - pb.length;
  });
  const entries = keyed.map((k) => k.e);

  // Inodes in output order; link groups share the first member's; nlink counts names
  // (files, links) or 2 + subdirectories (directories).
  const groupIno = new Map<string, number>();
  const groupCount = new Map<string, number>();
  const groupLast = new Map<string, Planned>();
  const subdirs = new Map<string, number>();
  for (const e of entries) {
    if (e.group) {
      groupCount.set(e.group, (groupCount.get(e.group) ?? 0) + 1);
      groupLast.set(e.group, e);
    }
    if ((e.mode & S_IFMT) === S_IFDIR) {
      const slash = e.name.lastIndexOf('/');
      if (slash > 0) subdirs.set(e.name.slice(0, slash), (subdirs.get(e.name.slice(0, slash)) ?? 0) + 1);
    }
  }
  let nextIno = 1;
  for (const e of entries) {
    if (e.group) {
      let ino = groupIno.get(e.group);
      if (ino === undefined) groupIno.set(e.group, (ino = nextIno++));
      e.ino = ino;
      e.nlink = groupCount.get(e.group)!;
      if (groupLast.get(e.group) !== e) {
        e.data = new Uint8Array(0);
        delete e.ext;
        e.extSize = 0;
      }
    } else {
      e.ino = nextIno++;
      e.nlink = (e.mode & S_IFMT) === S_IFDIR ? 2 + (subdirs.get(e.name) ?? 0) : 1;
    }
  }

  const trailer = base(TRAILER, 0);
  trailer.nlink = 1;
  const all = [...entries, trailer];
  const sizeOf = (e: Planned): number => (e.ext === undefined ? e.data.length : e.extSize);
  const pad = (n: number): number => (4 - (n & 3)) & 3;
  // Byte runs between external bodies. Each entry starts with the padding after the body
  // before it (zeros), then its header and name padded to 4 bytes, then its body.
  const pieces: CpioPiece[] = [];
  let runStart = 0;
  let runSize = 0;
  const flush = (end: number): void => {
    const out = new Uint8Array(runSize);
    let pos = 0;
    for (let i = runStart; i < end; i++) {
      const e = all[i]!;
      if (i > 0) pos += pad(sizeOf(all[i - 1]!));
      const fields = [e.ino, e.mode, e.uid, e.gid, e.nlink, e === trailer ? 0 : mtime, sizeOf(e), 0, 0, e.rdevMajor, e.rdevMinor, e.nameBytes.length + 1, 0];
      const start = pos;
      pos = writeAscii(out, pos, '070701');
      for (const f of fields) pos = writeHex8(out, pos, f);
      out.set(e.nameBytes, pos);
      pos = start + align4(HEADER_SIZE + e.nameBytes.length + 1); // the NUL and the padding are already zero
      if (e.ext === undefined) {
        out.set(e.data, pos);
        pos += e.data.length;
      }
    }
    pieces.push(out);
  };
  for (let i = 0; i < all.length; i++) {
    const e = all[i]!;
    if (i > 0) runSize += pad(sizeOf(all[i - 1]!));
    runSize += align4(HEADER_SIZE + e.nameBytes.length + 1);
    if (e.ext !== undefined) {
      flush(i + 1);
      pieces.push({ source: e.ext, size: e.extSize });
      runStart = i + 1;
      runSize = 0;
    } else runSize += e.data.length;
  }
  flush(all.length);
  return pieces;
}

function checkU32(v: number, field: string, name: string): void {
  if (!Number.isInteger(v) || v < 0 || v > MAX_U32) throw new FormatError(`cpio: "${name}" has ${field} ${v}, not a 32-bit unsigned number`, field, v);
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

const HEX_DIGITS = [48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 65, 66, 67, 68, 69, 70]; // 0-9 A-F

/** `n` as 8 upper-case hex digits at `pos` (no string made: an archive has thousands of fields). */
function writeHex8(out: Uint8Array, pos: number, n: number): number {
  if (!Number.isInteger(n) || n < 0 || n > MAX_U32) throw new FormatError(`cpio field value ${n} does not fit in 8 hex digits`, 'header', n);
  for (let i = 7; i >= 0; i--) {
    out[pos + i] = HEX_DIGITS[n & 15]!;
    n = Math.floor(n / 16);
  }
  return pos + 8;
}

function writeAscii(out: Uint8Array, pos: number, s: string): number {
  for (let i = 0; i < s.length; i++) out[pos + i] = s.charCodeAt(i);
  return pos + s.length;
}

export interface CpioReadOptions {
  /**
   * After a trailer, skip zero padding and read the next archive (the kernel accepts
   * concatenated archives). Default true.
   */
  concatenated?: boolean;
}

/**
 * Parses newc archives ("070701"; "070702" with checksums is accepted, the sum is not
 * verified). Data of regular files and symlink targets are views into `bytes`.
 */
export function readCpio(bytes: Uint8Array, options: CpioReadOptions = {}): CpioEntry[] {
  const concatenated = options.concatenated ?? true;
  const entries: CpioEntry[] = [];
  let pos = 0;
  for (;;) {
    if (pos + HEADER_SIZE > bytes.length) throw new FormatError(`cpio archive ends at byte ${bytes.length} inside a header at ${pos} (no TRAILER!!!); the file is truncated`, 'header', pos);
    const magic = ascii(bytes, pos, 6);
    if (magic !== '070701' && magic !== '070702') throw new FormatError(`cpio header at byte ${pos} has magic "${printable(magic)}", not the newc "070701"; is the archive compressed or in another cpio format?`, 'magic', magic);
    const f: number[] = [];
    for (let i = 0; i < 13; i++) {
      const text = ascii(bytes, pos + 6 + i * 8, 8);
      if (!/^[0-9a-fA-F]{8}$/.test(text)) throw new FormatError(`cpio header at byte ${pos}: field ${i} is "${printable(text)}", not 8 hex digits`, 'header', pos);
      f.push(parseInt(text, 16));
    }
    const [ino, mode, uid, gid, nlink, mtime, filesize, devMajor, devMinor, rdevMajor, rdevMinor, namesize] = f;
    if (namesize === 0) throw new FormatError(`cpio header at byte ${pos} has a name size of 0`, 'namesize', 0);
    const nameStart = pos + HEADER_SIZE;
    if (nameStart + namesize > bytes.length) throw new FormatError(`cpio entry at byte ${pos}: its name (${namesize} bytes) runs past the end of the archive (${bytes.length} bytes)`, 'namesize', namesize);
    const name = utf8Decode(bytes.subarray(nameStart, nameStart + namesize - 1));
    const dataStart = align4(nameStart + namesize);
    if (dataStart + filesize > bytes.length) throw new FormatError(`cpio entry "${name}" claims ${filesize} bytes of data at byte ${dataStart}, past the end of the archive (${bytes.length} bytes)`, 'filesize', filesize);
    pos = align4(dataStart + filesize);
    if (name === TRAILER) {
      if (!concatenated) break;
      while (pos < bytes.length && bytes[pos] === 0) pos++;
      if (pos >= bytes.length) break;
      continue;
    }
    entries.push({ name, ino, mode, uid, gid, nlink, mtime, devMajor, devMinor, rdevMajor, rdevMinor, data: bytes.subarray(dataStart, dataStart + filesize) });
  }
  return entries;
}

function ascii(bytes: Uint8Array, pos: number, len: number): string {
  let s = '';
  for (let i = 0; i < len; i++) s += String.fromCharCode(bytes[pos + i]);
  return s;
}

function printable(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, '?');
}
