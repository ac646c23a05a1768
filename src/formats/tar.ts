/**
 * A streaming tar reader: POSIX ustar, pax extended headers (path, linkpath, size, uid,
 * gid, mtime with fractions, SCHILY.devmajor/devminor, SCHILY.xattr.* and
 * LIBARCHIVE.xattr.* extended attributes, global 'g' headers), GNU tar's long names and
 * long link targets ('L'/'K') and base-256 numbers, old v7 headers. Entries come one at a
 * time with their bodies read in chunks, so an archive of any size passes through a small
 * buffer. GNU sparse members and multi-volume archives are refused with a message.
 *
 * Header layout (POSIX.1-2001 ustar): name 0/100, mode 100/8, uid 108/8, gid 116/8,
 * size 124/12, mtime 136/12, chksum 148/8, typeflag 156, linkname 157/100, magic 257/6,
 * version 263/2, uname 265/32, gname 297/32, devmajor 329/8, devminor 337/8,
 * prefix 345/155. The archive is untrusted: every number is range-checked.
 *
 * Engine-neutral: Uint8Array only.
 */
import { FormatError } from './block-reader.ts';
import { archivePath, type ArchiveEntry, type ArchiveEntryType, type ArchiveReader, StreamCursor, type Xattr } from './archive-stream.ts';
import { utf8Decode } from './text.ts';

const BLOCK = 512;
const NO_XATTRS: Xattr[] = [];
/** Bodies of pax and GNU long-name headers are read whole: bound them. */
const MAX_META_BODY = 1 << 20;

/** True when `block` (512 bytes) is a tar header: its checksum is right. */
export function isTarHeader(block: Uint8Array): boolean {
  if (block.length < BLOCK) return false;
  const stored = parseOctal(block, 148, 8);
  return stored !== undefined && checksumMatches(block, stored);
}

/**
 * The header checksum: the sum of its bytes with the checksum field read as spaces,
 * unsigned (POSIX) or, from some old writers, signed. Summed a word at a time, two bytes
 * per 16-bit lane: a byte loop costs a quarter of a millisecond per header in QuickJS.
 */
function checksumMatches(b: Uint8Array, stored: number): boolean {
  let words: Int32Array;
  if (b.byteOffset % 4 === 0) words = new Int32Array(b.buffer, b.byteOffset, BLOCK / 4);
  else {
    const copy = new Uint8Array(BLOCK);
    copy.set(b.subarray(0, BLOCK));
    words = new Int32Array(copy.buffer);
  }
  let lo = 0;
  let hi = 0;
  for (let i = 0; i < BLOCK / 4; i += 4) {
    const w0 = words[i]!;
    const w1 = words[i + 1]!;
    const w2 = words[i + 2]!;
    const w3 = words[i + 3]!;
    lo += (w0 & 0x00ff00ff) + (w1 & 0x00ff00ff) + (w2 & 0x00ff00ff) + (w3 & 0x00ff00ff);
    hi += ((w0 >> 8) & 0x00ff00ff) + ((w1 >> 8) & 0x00ff00ff) + ((w2 >> 8) & 0x00ff00ff) + ((w3 >> 8) & 0x00ff00ff);
  }
  let sum = (lo & 0xffff) + (lo >>> 16) + (hi & 0xffff) + (hi >>> 16);
  for (let i = 148; i < 156; i++) sum += 0x20 - b[i]!;
  if (sum === stored) return true;
  return headerSums(b).signed === stored;
}

function headerSums(b: Uint8Array): { unsigned: number; signed: number } {
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const v = i >= 148 && i < 156 ? 0x20 : b[i]!;
    unsigned += v;
    signed += v > 127 ? v - 256 : v;
  }
  return { unsigned, signed };
}

/** An octal field (spaces and NULs around the digits); undefined when it holds something else. */
function parseOctal(b: Uint8Array, off: number, len: number): number | undefined {
  let i = off;
  const end = off + len;
  let v = 0;
  while (i < end && (b[i] === 0x20 || b[i] === 0)) i++;
  for (; i < end; i++) {
    const c = b[i]!;
    if (c < 0x30 || c > 0x37) break;
    v = v * 8 + c - 0x30;
  }
  for (; i < end; i++) {
    const c = b[i]!;
    if (c !== 0x20 && c !== 0) return undefined;
  }
  return v;
}

function isZeroBlock(b: Uint8Array): boolean {
  for (let i = 0; i < BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

const NON_ASCII = /[\x80-\xff]/;

/** A NUL-terminated text field: the end found natively, ASCII read without the UTF-8 decoder. */
function textField(b: Uint8Array, off: number, len: number): string {
  let end = b.indexOf(0, off);
  if (end < 0 || end > off + len) end = off + len;
  const bytes = b.subarray(off, end);
  const s = String.fromCharCode.apply(null, bytes as unknown as number[]);
  return NON_ASCII.test(s) ? utf8Decode(bytes) : s;
}

function cstr(b: Uint8Array, off: number, len: number): string {
  let end = off;
  let ascii = true;
  while (end < off + len && b[end] !== 0) {
    if (b[end]! >= 0x80) ascii = false;
    end++;
  }
  const bytes = b.subarray(off, end);
  return ascii ? String.fromCharCode.apply(null, bytes as unknown as number[]) : utf8Decode(bytes);
}

/** Decimal text of a pax record; undefined when it is not a (safe) number. */
function paxInt(text: string): number | undefined {
  if (!/^-?\d{1,16}$/.test(text)) return undefined;
  const v = Number(text);
  return Number.isSafeInteger(v) ? v : undefined;
}

function paxTime(text: string): { sec: number; nsec: number } | undefined {
  const m = /^(-?)(\d{1,16})(?:\.(\d*))?$/.exec(text);
  if (!m) return undefined;
  let sec = Number(m[2]);
  let nsec = m[3] ? Number((m[3] + '000000000').slice(0, 9)) : 0;
  if (m[1]) {
    sec = -sec;
    if (nsec) {
      sec -= 1;
      nsec = 1e9 - nsec;
    }
  }
  return Number.isSafeInteger(sec) ? { sec, nsec } : undefined;
}

/** pax records "LEN KEY=VALUE\n": values stay bytes (xattr values are binary). */
export function parsePaxRecords(body: Uint8Array, what: string): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  let p = 0;
  while (p < body.length) {
    if (body[p] === 0) break; // NUL padding after the records
    let len = 0;
    let q = p;
    while (q < body.length && body[q]! >= 0x30 && body[q]! <= 0x39 && q - p < 10) len = len * 10 + (body[q++]! - 0x30);
    if (q === p || body[q] !== 0x20 || len <= q - p + 1 || p + len > body.length || body[p + len - 1] !== 0x0a) {
      throw new FormatError(`${what}: damaged pax record at byte ${p} of the extended header (length ${len})`, 'pax', p);
    }
    const rec = body.subarray(q + 1, p + len - 1);
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) throw new FormatError(`${what}: pax record at byte ${p} has no "key=value"`, 'pax', p);
    out.set(utf8Decode(rec.subarray(0, eq)), rec.subarray(eq + 1));
    p += len;
  }
  return out;
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
function base64Decode(text: string): Uint8Array | undefined {
  const clean = text.replace(/[=\s]/g, '');
  const out = new Uint8Array(Math.floor((clean.length * 3) / 4));
  let acc = 0;
  let bits = 0;
  let o = 0;
  for (const ch of clean) {
    const v = B64.indexOf(ch);
    if (v < 0) return undefined;
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (acc >> bits) & 0xff;
    }
  }
  return out.subarray(0, o);
}

function percentDecode(text: string): string {
  return text.replace(/%([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
}

const TYPES: Record<string, ArchiveEntryType> = {
  '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '3': 'char', '4': 'block', '5': 'dir', '6': 'fifo',
};

export class TarReader implements ArchiveReader {
  readonly format = 'tar' as const;
  private remaining = 0;
  private padding = 0;
  private current: ArchiveEntry | undefined;
  private globalPax = new Map<string, Uint8Array>();
  private done = false;

  /** `name`: how the console names the archive, e.g. "/images/root.tar.gz". */
  constructor(private readonly cursor: StreamCursor, private readonly name: string) {}

  get offset(): number {
    return this.cursor.offset;
  }

  next(): ArchiveEntry | null {
    if (this.done) return null;
    this.finishBody();
    let pax: Map<string, Uint8Array> | undefined;
    let longLink: string | undefined;
    let longName: string | undefined;
    let firstOffset = -1;
    for (;;) {
      const at = this.cursor.offset;
      if (firstOffset < 0) firstOffset = at;
      const block = this.cursor.take(BLOCK);
      if (block.length === 0 && firstOffset === at) {
        // Some writers stop without the two zero blocks; an end exactly between members is accepted.
        this.done = true;
        return null;
      }
      if (block.length < BLOCK) throw this.truncated(longName ?? '(next header)', at, BLOCK, block.length);
      if (isZeroBlock(block)) {
        if (firstOffset !== at) throw new FormatError(`${this.name}: an extended header at byte ${firstOffset} is followed by an end-of-archive block at byte ${at}`, 'header', at);
        this.done = true;
        return null;
      }
      const stored = parseOctal(block, 148, 8);
      if (stored === undefined || !checksumMatches(block, stored)) {
        const sums = headerSums(block);
        throw new FormatError(
          `${this.name}: the tar header at byte ${at} is damaged (checksum ${stored === undefined ? 'unreadable' : stored} ≠ ${sums.unsigned})` +
            `${this.lastName ? `; the last good entry was "${this.lastName}"` : ''}. The archive is corrupt: copy it again.`,
          'chksum', at,
        );
      }
      const flag = String.fromCharCode(block[156]!);
      const size = this.number(block, 124, 12, 'size', at);
      if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
        if (size > MAX_META_BODY) throw new FormatError(`${this.name}: the extended header at byte ${at} claims ${size} bytes (at most ${MAX_META_BODY}); the archive is corrupt`, 'size', size);
        const body = this.cursor.take(size);
        if (body.length < size) throw this.truncated('(extended header)', at, size, body.length);
        const copy = body.slice();
        this.cursor.skip(pad(size));
        if (flag === 'x') for (const [k, v] of parsePaxRecords(copy, `${this.name}: pax header at byte ${at}`)) (pax ??= new Map()).set(k, v);
        else if (flag === 'g') for (const [k, v] of parsePaxRecords(copy, `${this.name}: global pax header at byte ${at}`)) this.globalPax.set(k, v);
        else if (flag === 'L') longName = cstr(copy, 0, copy.length);
        else longLink = cstr(copy, 0, copy.length);
        continue;
      }
      // "ustar\0" (POSIX: the prefix field extends the name); GNU's "ustar  " has no prefix.
      const ustar = block[257] === 0x75 && block[258] === 0x73 && block[259] === 0x74 && block[260] === 0x61 && block[261] === 0x72 && block[262] === 0;
      const base = longName ?? (ustar && block[345] !== 0 ? `${textField(block, 345, 155)}/${textField(block, 0, 100)}` : textField(block, 0, 100));
      if (this.globalPax.size) {
        const merged = new Map(this.globalPax);
        if (pax) for (const [k, v] of pax) merged.set(k, v);
        pax = merged;
      }
      const hasPax = pax !== undefined && pax.size > 0;
      const text = (k: string): string | undefined => {
        const v = hasPax ? pax!.get(k) : undefined;
        return v === undefined ? undefined : utf8Decode(v);
      };
      const rawPath = hasPax ? text('path') ?? base : base;
      if (hasPax) for (const k of pax!.keys()) {
        if (k.startsWith('GNU.sparse.')) throw this.sparse(rawPath, at);
      }
      if (flag === 'S') throw this.sparse(rawPath, at);
      if (flag === 'M') {
        throw new FormatError(`${this.name}: entry "${rawPath}" at byte ${at} continues from another volume of a multi-volume archive; make one archive instead`, 'typeflag', flag);
      }
      let type: ArchiveEntryType | undefined = TYPES[flag];
      // Old archives mark directories only by a trailing slash.
      if (type === 'file' && (flag === '\0' || flag === '0') && rawPath.endsWith('/')) type = 'dir';
      // Built only for messages: string building per entry is measurable at boot.
      const what = (): string => `${this.name}: entry "${rawPath}" at byte ${at}`;
      let bodySize = size;
      const paxSize = text('size');
      if (paxSize !== undefined) {
        const v = paxInt(paxSize);
        if (v === undefined || v < 0) throw new FormatError(`${what()}: pax size "${paxSize}" is not a byte count`, 'size', paxSize);
        bodySize = v;
      }
      if (type === undefined) {
        if (flag === 'V' || flag === 'D' || flag === 'A' || flag === 'E' || flag === 'I' || flag === 'X') {
          // A volume label, a GNU dumpdir, or a vendor header: nothing to create; skip its data.
          this.skipUnknown(bodySize);
          pax = undefined;
          longName = longLink = undefined;
          firstOffset = -1;
          continue;
        }
        throw new FormatError(`${what()} has type '${printable(flag)}', which vdboot does not unpack (regular files, directories, links, devices and FIFOs only)`, 'typeflag', flag);
      }
      const path = archivePath(rawPath, what, at);
      const num = (key: string, off: number, len: number, field: string): number => {
        const t = text(key);
        if (t !== undefined) {
          const v = paxInt(t);
          if (v === undefined || v < 0) throw new FormatError(`${what()}: pax ${key} "${t}" is not a number`, key, t);
          return v;
        }
        return this.number(block, off, len, field, at);
      };
      let mtimeSec: number;
      let mtimeNsec = 0;
      const mtime = text('mtime');
      if (mtime === undefined) mtimeSec = this.number(block, 136, 12, 'mtime', at, true);
      else {
        const t = paxTime(mtime);
        if (!t) throw new FormatError(`${what()}: pax mtime "${mtime}" is not a time`, 'mtime', mtime);
        mtimeSec = t.sec;
        mtimeNsec = t.nsec;
      }
      let linkTarget = '';
      if (type === 'symlink' || type === 'hardlink') {
        const rawLink = text('linkpath') ?? longLink ?? textField(block, 157, 100);
        if (type === 'symlink') {
          if (rawLink === '') throw new FormatError(`${what()}: a symbolic link with an empty target`, 'linkname', '');
          linkTarget = rawLink;
        } else {
          linkTarget = archivePath(rawLink, () => `${what()} (hard link target)`, at);
          if (linkTarget === '' || linkTarget === path) throw new FormatError(`${what()}: a hard link to "${rawLink}", which is not another member`, 'linkname', rawLink);
        }
      }
      let xattrs: Xattr[] = NO_XATTRS;
      if (hasPax) {
        const found = new Map<string, Uint8Array>();
        for (const [k, v] of pax!) {
          if (k.startsWith('SCHILY.xattr.')) found.set(k.slice('SCHILY.xattr.'.length), v);
        }
        for (const [k, v] of pax!) {
          if (k.startsWith('LIBARCHIVE.xattr.')) {
            const value = base64Decode(utf8Decode(v));
            if (!value) throw new FormatError(`${what()}: extended attribute ${k} is not base64`, 'pax', k);
            found.set(percentDecode(k.slice('LIBARCHIVE.xattr.'.length)), value);
          }
        }
        if (found.size) xattrs = [...found].map(([name, value]): Xattr => ({ name, value }));
      }
      const device = type === 'char' || type === 'block';
      const entry: ArchiveEntry = {
        path,
        type,
        perm: this.number(block, 100, 8, 'mode', at) & 0o7777,
        uid: hasPax ? num('uid', 108, 8, 'uid') : this.number(block, 108, 8, 'uid', at),
        gid: hasPax ? num('gid', 116, 8, 'gid') : this.number(block, 116, 8, 'gid', at),
        mtimeSec,
        mtimeNsec,
        size: type === 'file' || type === 'hardlink' ? bodySize : 0,
        linkTarget,
        devMajor: device ? num('SCHILY.devmajor', 329, 8, 'devmajor') : 0,
        devMinor: device ? num('SCHILY.devminor', 337, 8, 'devminor') : 0,
        xattrs,
        offset: firstOffset,
      };
      // Directories, links, devices and FIFOs carry no data; a size there is ignored, as GNU tar and libarchive do.
      this.remaining = entry.size;
      this.padding = pad(entry.size);
      this.current = entry;
      this.lastName = path;
      return entry;
    }
  }

  private lastName = '';

  body(max: number): Uint8Array {
    if (this.remaining === 0) return new Uint8Array(0);
    const at = this.cursor.offset;
    const out = this.cursor.some(Math.min(max, this.remaining));
    if (out.length === 0) throw this.truncated(this.current!.path, at, this.remaining, 0, this.current!.offset);
    this.remaining -= out.length;
    return out;
  }

  private finishBody(): void {
    if (this.remaining > 0) {
      const at = this.cursor.offset;
      const n = this.cursor.skip(this.remaining);
      if (n < this.remaining) throw this.truncated(this.current!.path, at, this.remaining, n, this.current!.offset);
      this.remaining = 0;
    }
    if (this.padding > 0) {
      this.cursor.skip(this.padding);
      this.padding = 0;
    }
  }

  private skipUnknown(size: number): void {
    const at = this.cursor.offset;
    const n = this.cursor.skip(size);
    if (n < size) throw this.truncated('(skipped member)', at, size, n);
    this.cursor.skip(pad(size));
  }

  /** A numeric header field: octal, or GNU base-256 when the top bit of its first byte is set. */
  private number(b: Uint8Array, off: number, len: number, field: string, at: number, signed = false): number {
    const first = b[off]!;
    if (first & 0x80) {
      const negative = first === 0xff;
      if (negative && !signed) throw new FormatError(`${this.name}: header at byte ${at}: field ${field} is negative`, field, at);
      let v = BigInt(first & 0x7f) - (negative ? 128n : 0n);
      for (let i = 1; i < len; i++) v = (v << 8n) | BigInt(b[off + i]!);
      if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
        throw new FormatError(`${this.name}: header at byte ${at}: field ${field} (${v}) is out of range`, field, v);
      }
      return Number(v);
    }
    const v = parseOctal(b, off, len);
    if (v === undefined) {
      throw new FormatError(`${this.name}: header at byte ${at}${this.lastName ? ` (after "${this.lastName}")` : ''}: field ${field} is not an octal number; the archive is corrupt`, field, at);
    }
    return v;
  }

  private truncated(entry: string, at: number, wanted: number, got: number, headerAt?: number): FormatError {
    return new FormatError(
      `${this.name} is truncated: entry "${entry}"${headerAt === undefined ? '' : ` (header at byte ${headerAt})`} ends early: ` +
        `${wanted - got} of its bytes are missing after byte ${at + got}. Copy the archive again (was the copy complete?)`,
      'truncated', at + got,
    );
  }


  private sparse(path: string, at: number): FormatError {
    return new FormatError(
      `${this.name}: entry "${path}" at byte ${at} is a GNU sparse file, which vdboot does not unpack. Recreate the archive without --sparse (-S).`,
      'typeflag', 'S',
    );
  }
}

function pad(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

function printable(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
