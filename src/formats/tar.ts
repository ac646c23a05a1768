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
import { archivePath, plainPath, type ReaderOptions, type ArchiveEntry, type ArchiveEntryType, type ArchiveReader, StreamCursor, type Xattr } from './archive-stream.ts';
import { utf8Decode } from './text.ts';

const BLOCK = 512;
const NO_XATTRS: Xattr[] = [];
const NO_BYTES = new Uint8Array(0);
/** Bodies of pax and GNU long-name headers are read whole: bound them. */
const MAX_META_BODY = 1 << 20;

/** True when `block` (512 bytes) is a tar header: its checksum is right. */
export function isTarHeader(block: Uint8Array): boolean {
  if (block.length < BLOCK) return false;
  const at = wordsAt(block);
  const stored = storedChecksum(block, at);
  return stored !== undefined && checksumMatches(block, at, byteSum(viewWords, at), stored);
}

/*
 * Headers are read as 32-bit words where they can be: QuickJS runs few, costly
 * interpreter steps, and one word read with a mask or two does the work of four byte
 * reads. Field offsets 100-156 are multiples of four, so the numbers are whole words.
 * The word arithmetic assumes a little-endian machine (every target of vdboot); on
 * another, the byte-wise parsers below do all the work.
 */
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
/** The words of the buffer the last header came from (readers reuse one buffer), made once per buffer. */
let viewOf: ArrayBufferLike | undefined;
let viewWords: Int32Array = new Int32Array(0);
let viewBytes = 0;

/** Index in `viewWords` of the block's first word (the block is copied when it is not aligned). */
function wordsAt(b: Uint8Array): number {
  const off = b.byteOffset;
  if (off % 4 !== 0) {
    const copy = new Uint8Array(BLOCK);
    copy.set(b.subarray(0, BLOCK));
    viewOf = copy.buffer;
    viewWords = new Int32Array(copy.buffer);
    viewBytes = BLOCK;
    return 0;
  }
  const buffer = b.buffer;
  if (buffer !== viewOf || off + BLOCK > viewBytes) {
    viewOf = buffer;
    viewBytes = buffer.byteLength & ~3;
    viewWords = new Int32Array(buffer, 0, viewBytes >>> 2);
  }
  return off >>> 2;
}

/**
 * The sum of the 512 bytes from word `at`, exact. The words are copied and sorted
 * (natively), so the zero words, most of a header, sit together and are skipped; of the
 * others, E sums bytes 0 and 2 (masked, S0 + 2^16 S2) and U the words shifted down a
 * byte (S1 + 2^8 S2 + 2^16 S3). Each lane's total is at most 128 * 255 < 2^15, so both
 * stay below 2^31 and the four byte sums come apart again. Any byte order.
 */
function byteSum(w: Int32Array, at: number): number {
  const t = w.slice(at, at + BLOCK / 4).sort();
  let zerosFrom = t.indexOf(0);
  let zerosTo = BLOCK / 4;
  if (zerosFrom < 0) zerosFrom = BLOCK / 4;
  else zerosTo = t.lastIndexOf(0) + 1;
  const M = 0x00ff00ff;
  let e = 0;
  let u = 0;
  // The words before the zeros, then those after, four at a time.
  let k = 0;
  for (let end = zerosFrom; ; end = BLOCK / 4) {
    for (; k + 4 <= end; k += 4) {
      const x0 = t[k]!, x1 = t[k + 1]!, x2 = t[k + 2]!, x3 = t[k + 3]!;
      e += (x0 & M) + (x1 & M) + (x2 & M) + (x3 & M);
      u += (x0 >>> 8) + (x1 >>> 8) + (x2 >>> 8) + (x3 >>> 8);
    }
    for (; k < end; k += 1) {
      const x = t[k]!;
      e += x & M;
      u += x >>> 8;
    }
    if (end === BLOCK / 4) break;
    k = zerosTo;
  }
  const s2 = e >>> 16;
  const odd = u - s2 * 256;
  return (e & 0xffff) + s2 + (odd & 0xffff) + (odd >>> 16);
}

/**
 * The header checksum: the sum of its bytes with the checksum field (148/8) read as
 * spaces, unsigned (POSIX) or, from some old writers, signed.
 */
function checksumMatches(b: Uint8Array, at: number, sum: number, stored: number): boolean {
  const M = 0x00ff00ff;
  const c0 = viewWords[at + 37]!;
  const c1 = viewWords[at + 38]!;
  const f = (c0 & M) + ((c0 >>> 8) & M) + (c1 & M) + ((c1 >>> 8) & M);
  if (sum - (f & 0xffff) - (f >>> 16) + 8 * 0x20 === stored) return true;
  return headerSums(b).signed === stored;
}

/** The checksum field: "dddddd\0 " (most writers) or "ddddddd\0" read from its words, else byte by byte. */
function storedChecksum(b: Uint8Array, at: number): number | undefined {
  if (LITTLE_ENDIAN) {
    const w0 = viewWords[at + 37]!;
    const w1 = viewWords[at + 38]!;
    if ((w0 & DIGITS_MASK) === DIGITS) {
      if ((w1 & 0xf8f8) === 0x3030 && w1 >>> 16 === 0x2000) return octalWord(w0) * 64 + octalWord((w1 & 0xffff) << 16 | 0x3030);
      if ((w1 & 0xf8f8f8) === 0x303030 && w1 >>> 24 === 0) return octalWord(w0) * 512 + octalWord((w1 & 0xffffff) << 8 | 0x30);
    }
  }
  return parseOctal(b, 148, 8);
}

/** Masks a word's bytes to their top five bits: octal digits "0"-"7" read 0x30 each. */
const DIGITS_MASK = 0xf8f8f8f8 | 0;
const DIGITS = 0x30303030;

/** Four octal digits (checked by the caller), the first in the lowest byte, as a number. */
function octalWord(w: number): number {
  const x = w - DIGITS;
  return ((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24);
}

/** Numbers of the last header read by `fastNumbers`. */
let fMode = 0;
let fUid = 0;
let fGid = 0;
let fSize = 0;
let fMtime = 0;

/**
 * mode, uid, gid (7 digits and a NUL or space each), size and mtime (11 digits and a
 * NUL or space) from the words of the header at word `at`, as GNU tar, busybox, Go and
 * most writers make them; false for any other spelling, which the byte-wise parser reads.
 */
function fastNumbers(at: number): boolean {
  const w = viewWords;
  const a0 = w[at + 25]!, a1 = w[at + 26]!, b0 = w[at + 27]!, b1 = w[at + 28]!, c0 = w[at + 29]!, c1 = w[at + 30]!;
  const d0 = w[at + 31]!, d1 = w[at + 32]!, d2 = w[at + 33]!, e0 = w[at + 34]!, e1 = w[at + 35]!, e2 = w[at + 36]!;
  const D = DIGITS_MASK;
  if (
    (a0 & D) !== DIGITS || (b0 & D) !== DIGITS || (c0 & D) !== DIGITS || (d0 & D) !== DIGITS || (d1 & D) !== DIGITS || (e0 & D) !== DIGITS || (e1 & D) !== DIGITS ||
    (a1 & 0xf8f8f8) !== 0x303030 || (b1 & 0xf8f8f8) !== 0x303030 || (c1 & 0xf8f8f8) !== 0x303030 || (d2 & 0xf8f8f8) !== 0x303030 || (e2 & 0xf8f8f8) !== 0x303030
  ) return false;
  // The last byte of each field: a NUL or a space.
  if (((a1 >>> 24) | (b1 >>> 24) | (c1 >>> 24) | (d2 >>> 24) | (e2 >>> 24) | 0x20) !== 0x20) return false;
  // Four digits each (see octalWord), written out: a call costs more than the arithmetic.
  let x = a0 - DIGITS;
  let y = ((a1 << 8) | 0x30) - DIGITS;
  fMode = (((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24)) * 512 + (((y & 7) << 9) | ((y >>> 2) & 0x1c0) | ((y >>> 13) & 0x38) | (y >>> 24));
  x = b0 - DIGITS;
  y = ((b1 << 8) | 0x30) - DIGITS;
  fUid = (((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24)) * 512 + (((y & 7) << 9) | ((y >>> 2) & 0x1c0) | ((y >>> 13) & 0x38) | (y >>> 24));
  x = c0 - DIGITS;
  y = ((c1 << 8) | 0x30) - DIGITS;
  fGid = (((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24)) * 512 + (((y & 7) << 9) | ((y >>> 2) & 0x1c0) | ((y >>> 13) & 0x38) | (y >>> 24));
  x = d0 - DIGITS;
  y = d1 - DIGITS;
  let z = ((d2 << 8) | 0x30) - DIGITS;
  fSize = ((((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24)) * 4096 + (((y & 7) << 9) | ((y >>> 2) & 0x1c0) | ((y >>> 13) & 0x38) | (y >>> 24))) * 512 + (((z & 7) << 9) | ((z >>> 2) & 0x1c0) | ((z >>> 13) & 0x38) | (z >>> 24));
  x = e0 - DIGITS;
  y = e1 - DIGITS;
  z = ((e2 << 8) | 0x30) - DIGITS;
  fMtime = ((((x & 7) << 9) | ((x >>> 2) & 0x1c0) | ((x >>> 13) & 0x38) | (x >>> 24)) * 4096 + (((y & 7) << 9) | ((y >>> 2) & 0x1c0) | ((y >>> 13) & 0x38) | (y >>> 24))) * 512 + (((z & 7) << 9) | ((z >>> 2) & 0x1c0) | ((z >>> 13) & 0x38) | (z >>> 24));
  return true;
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
  const end = off + len;
  let i = off;
  let c = b[i]!;
  while ((c === 0x20 || c === 0) && i < end) c = b[++i]!;
  let v = 0;
  while (c >= 0x30 && c <= 0x37 && i < end) {
    v = v * 8 + c - 0x30;
    c = b[++i]!;
  }
  while (i < end) {
    if (c !== 0x20 && c !== 0) return undefined;
    c = b[++i]!;
  }
  return v;
}

const NON_ASCII = /[\x80-\xff]/;
const HIGH_BITS = 0x80808080 | 0;

/** A NUL-terminated text field: the end found natively, ASCII read without the UTF-8 decoder. */
function textField(b: Uint8Array, off: number, len: number): string {
  let end = b.indexOf(0, off);
  if (end < 0 || end > off + len) end = off + len;
  const bytes = b.subarray(off, end);
  const s = String.fromCharCode.apply(null, bytes as unknown as number[]);
  return NON_ASCII.test(s) ? utf8Decode(bytes) : s;
}

/** What nameField saw in the name it returned: a plain path (see plainPath), one ending in "/". */
let namePlain = false;
let nameSlash = false;

/**
 * The name field (0/100) of the header at word `at` of the word view: as textField, with
 * the ASCII test done on whole words (a regular expression costs more per byte in QuickJS),
 * the "./" of "tar -C ROOT ." left out, and plainPath's test done on the bytes (each string
 * method call is a property lookup and a native call).
 */
function nameField(b: Uint8Array, at: number, decode: ((bytes: Uint8Array) => string) | undefined): string {
  let end = b.indexOf(0);
  if (end < 0 || end > 100) end = 100;
  const start = end >= 2 && b[0] === 0x2e && b[1] === 0x2f ? 2 : 0;
  const bytes = b.subarray(start, end);
  let s: string;
  let high = 0;
  if (decode !== undefined) {
    // The host's decoder: one native call. An ASCII name comes back as long as its bytes
    // and without U+FFFD; any other goes through utf8Decode below, as without the host.
    s = decode(bytes);
    if (s.length !== end - start || s.indexOf('\ufffd') >= 0) high = HIGH_BITS;
  } else {
    s = String.fromCharCode.apply(null, bytes as unknown as number[]);
    const w = viewWords;
    for (let k = at, last = at + ((end + 3) >>> 2); k < last; k += 1) high |= w[k]!;
  }
  // Bytes after the NUL in the last word may count too: they only send the name through the decoder.
  if ((high & HIGH_BITS) !== 0) {
    namePlain = false;
    nameSlash = false;
    return utf8Decode(bytes);
  }
  const first = b[start];
  nameSlash = end > 0 && b[end - 1] === 0x2f;
  namePlain = end > start && first !== 0x2e && first !== 0x2f && !nameSlash && s.indexOf('/.') < 0 && s.indexOf('//') < 0;
  return s;
}

/** A pax record's value as text. */
function paxText(pax: Map<string, Uint8Array>, key: string): string | undefined {
  const v = pax.get(key);
  return v === undefined ? undefined : utf8Decode(v);
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
  /** globalPax.size !== 0, as a field (a Map's size is a getter call) */
  private hasGlobalPax = false;
  private done = false;

  private reused: ArchiveEntry | undefined;

  /** ReaderOptions.byteSum and utf8Decode, read once */
  private readonly nativeSum: ((bytes: Uint8Array) => number) | undefined;
  private readonly nativeDecode: ((bytes: Uint8Array) => string) | undefined;

  /** `name`: how the console names the archive, e.g. "/images/root.tar.gz". */
  constructor(private readonly cursor: StreamCursor, private readonly name: string, private readonly opts: ReaderOptions = {}) {
    this.nativeSum = opts.byteSum;
    this.nativeDecode = opts.utf8Decode;
  }

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
      const got = block.length;
      if (got === 0 && firstOffset === at) {
        // Some writers stop without the two zero blocks; an end exactly between members is accepted.
        this.done = true;
        return null;
      }
      if (got < BLOCK) throw this.truncated(longName ?? '(next header)', at, BLOCK, got);
      const words = wordsAt(block);
      const sum = this.nativeSum !== undefined ? this.nativeSum(block) : byteSum(viewWords, words);
      if (sum === 0) {
        if (firstOffset !== at) throw new FormatError(`${this.name}: an extended header at byte ${firstOffset} is followed by an end-of-archive block at byte ${at}`, 'header', at);
        this.done = true;
        return null;
      }
      const stored = storedChecksum(block, words);
      if (stored === undefined || !checksumMatches(block, words, sum, stored)) {
        const sums = headerSums(block);
        throw new FormatError(
          `${this.name}: the tar header at byte ${at} is damaged (checksum ${stored === undefined ? 'unreadable' : stored} ≠ ${sums.unsigned})` +
            `${this.lastName ? `; the last good entry was "${this.lastName}"` : ''}. The archive is corrupt: copy it again.`,
          'chksum', at,
        );
      }
      const fast = LITTLE_ENDIAN && fastNumbers(words);
      const typeByte = block[156]!;
      const size = fast ? fSize : this.number(block, 124, 12, 'size', at);
      if (typeByte === 0x78 || typeByte === 0x67 || typeByte === 0x4c || typeByte === 0x4b) {
        const flag = String.fromCharCode(typeByte);
        if (size > MAX_META_BODY) throw new FormatError(`${this.name}: the extended header at byte ${at} claims ${size} bytes (at most ${MAX_META_BODY}); the archive is corrupt`, 'size', size);
        const body = this.cursor.take(size);
        if (body.length < size) throw this.truncated('(extended header)', at, size, body.length);
        const copy = body.slice();
        this.cursor.skip(pad(size));
        if (flag === 'x') for (const [k, v] of parsePaxRecords(copy, `${this.name}: pax header at byte ${at}`)) (pax ??= new Map()).set(k, v);
        else if (flag === 'g') for (const [k, v] of parsePaxRecords(copy, `${this.name}: global pax header at byte ${at}`)) {
          this.globalPax.set(k, v);
          this.hasGlobalPax = true;
        }
        else if (flag === 'L') longName = cstr(copy, 0, copy.length);
        else longLink = cstr(copy, 0, copy.length);
        continue;
      }
      // Taken before anything else reads a header through the shared word view.
      const mode = fast ? fMode : -1;
      const uid = fast ? fUid : -1;
      const gid = fast ? fGid : -1;
      const mtime = fast ? fMtime : -1;
      // "ustar\0" (POSIX: the prefix field extends the name); GNU's "ustar  " has no prefix.
      const ustar = LITTLE_ENDIAN
        ? viewWords[words + 64]! >>> 8 === 0x747375 && (viewWords[words + 65]! & 0xffffff) === 0x7261
        : block[257] === 0x75 && block[258] === 0x73 && block[259] === 0x74 && block[260] === 0x61 && block[261] === 0x72 && block[262] === 0;
      const fromName = longName === undefined && !(ustar && block[345] !== 0);
      const base = fromName ? nameField(block, words, this.nativeDecode) : longName ?? `${textField(block, 345, 155)}/${textField(block, 0, 100)}`;
      if (this.hasGlobalPax) {
        const merged = new Map(this.globalPax);
        if (pax) for (const [k, v] of pax) merged.set(k, v);
        pax = merged;
      }
      const px = pax !== undefined && pax.size > 0 ? pax : undefined;
      const rawPath = px ? paxText(px, 'path') ?? base : base;
      if (px) for (const k of px.keys()) {
        if (k.startsWith('GNU.sparse.')) throw this.sparse(rawPath, at);
      }
      // The common types first, without making a string of the type byte.
      let type: ArchiveEntryType | undefined =
        typeByte === 0x30 || typeByte === 0 ? ((rawPath === base && fromName ? nameSlash : rawPath.charCodeAt(rawPath.length - 1) === 0x2f) ? 'dir' : 'file') // old archives mark directories only by a trailing slash
          : typeByte === 0x35 ? 'dir'
            : typeByte === 0x32 ? 'symlink'
              : undefined;
      const flag = type === undefined ? String.fromCharCode(typeByte) : '';
      if (type === undefined) {
        if (flag === 'S') throw this.sparse(rawPath, at);
        if (flag === 'M') {
          throw new FormatError(`${this.name}: entry "${rawPath}" at byte ${at} continues from another volume of a multi-volume archive; make one archive instead`, 'typeflag', flag);
        }
        type = TYPES[flag];
      }
      let bodySize = size;
      const paxSize = px ? paxText(px, 'size') : undefined;
      if (paxSize !== undefined) {
        const v = paxInt(paxSize);
        if (v === undefined || v < 0) throw new FormatError(`${this.what(rawPath, at)}: pax size "${paxSize}" is not a byte count`, 'size', paxSize);
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
        throw new FormatError(`${this.what(rawPath, at)} has type '${printable(flag)}', which vdboot does not unpack (regular files, directories, links, devices and FIFOs only)`, 'typeflag', flag);
      }
      const path = fromName && namePlain && rawPath === base ? rawPath : plainPath(rawPath) ?? archivePath(rawPath);
      let mtimeSec: number;
      let mtimeNsec = 0;
      const paxMtime = px ? paxText(px, 'mtime') : undefined;
      if (paxMtime === undefined) mtimeSec = mtime >= 0 ? mtime : this.number(block, 136, 12, 'mtime', at, true);
      else {
        const t = paxTime(paxMtime);
        if (!t) throw new FormatError(`${this.what(rawPath, at)}: pax mtime "${paxMtime}" is not a time`, 'mtime', paxMtime);
        mtimeSec = t.sec;
        mtimeNsec = t.nsec;
      }
      let linkTarget = '';
      if (type === 'symlink' || type === 'hardlink') {
        const rawLink = (px ? paxText(px, 'linkpath') : undefined) ?? longLink ?? textField(block, 157, 100);
        if (type === 'symlink') {
          if (rawLink === '') throw new FormatError(`${this.what(rawPath, at)}: a symbolic link with an empty target`, 'linkname', '');
          linkTarget = rawLink;
        } else {
          linkTarget = archivePath(rawLink);
          if (linkTarget === '' || linkTarget === path) throw new FormatError(`${this.what(rawPath, at)}: a hard link to "${rawLink}", which is not another member`, 'linkname', rawLink);
        }
      }
      let xattrs: Xattr[] = NO_XATTRS;
      if (px) {
        const found = new Map<string, Uint8Array>();
        for (const [k, v] of px) {
          if (k.startsWith('SCHILY.xattr.')) found.set(k.slice('SCHILY.xattr.'.length), v);
        }
        for (const [k, v] of px) {
          if (k.startsWith('LIBARCHIVE.xattr.')) {
            const value = base64Decode(utf8Decode(v));
            if (!value) throw new FormatError(`${this.what(rawPath, at)}: extended attribute ${k} is not base64`, 'pax', k);
            found.set(percentDecode(k.slice('LIBARCHIVE.xattr.'.length)), value);
          }
        }
        if (found.size) xattrs = [...found].map(([name, value]): Xattr => ({ name, value }));
      }
      const device = type === 'char' || type === 'block';
      const perm = (mode >= 0 ? mode : this.number(block, 100, 8, 'mode', at)) & 0o7777;
      const owner = px ? this.paxNumber(px, 'uid', block, 108, 8, rawPath, at) : uid >= 0 ? uid : this.number(block, 108, 8, 'uid', at);
      const group = px ? this.paxNumber(px, 'gid', block, 116, 8, rawPath, at) : gid >= 0 ? gid : this.number(block, 116, 8, 'gid', at);
      const devMajor = device ? this.paxNumber(px, 'SCHILY.devmajor', block, 329, 8, rawPath, at) : 0;
      const devMinor = device ? this.paxNumber(px, 'SCHILY.devminor', block, 337, 8, rawPath, at) : 0;
      const bytes = type === 'file' || type === 'hardlink' ? bodySize : 0;
      let entry = this.reused;
      if (entry !== undefined) {
        entry.path = path;
        entry.type = type;
        entry.perm = perm;
        entry.uid = owner;
        entry.gid = group;
        entry.mtimeSec = mtimeSec;
        entry.mtimeNsec = mtimeNsec;
        entry.size = bytes;
        entry.linkTarget = linkTarget;
        entry.devMajor = devMajor;
        entry.devMinor = devMinor;
        entry.xattrs = xattrs;
        entry.offset = firstOffset;
      } else {
        entry = { path, type, perm, uid: owner, gid: group, mtimeSec, mtimeNsec, size: bytes, linkTarget, devMajor, devMinor, xattrs, offset: firstOffset };
        if (this.opts.reuseEntry) this.reused = entry;
      }
      // Directories, links, devices and FIFOs carry no data; a size there is ignored, as GNU tar and libarchive do.
      this.remaining = bytes;
      this.padding = (BLOCK - (bytes % BLOCK)) % BLOCK;
      this.current = entry;
      this.lastName = path;
      return entry;
    }
  }

  private lastName = '';

  /** How messages name an entry. */
  private what(rawPath: string, at: number): string {
    return `${this.name}: entry "${rawPath}" at byte ${at}`;
  }

  /** A number from the pax record `key` when there is one, else from the header field. */
  private paxNumber(px: Map<string, Uint8Array> | undefined, key: string, block: Uint8Array, off: number, len: number, rawPath: string, at: number): number {
    const t = px ? paxText(px, key) : undefined;
    if (t === undefined) return this.number(block, off, len, key.replace('SCHILY.', ''), at);
    const v = paxInt(t);
    if (v === undefined || v < 0) throw new FormatError(`${this.what(rawPath, at)}: pax ${key} "${t}" is not a number`, key, t);
    return v;
  }

  body(max: number): Uint8Array {
    const left = this.remaining;
    if (left === 0) return NO_BYTES;
    const out = this.cursor.some(max < left ? max : left);
    if (out.length === 0) throw this.truncated(this.current!.path, this.cursor.offset, left, 0, this.current!.offset);
    this.remaining = left - out.length;
    return out;
  }

  bodyTo(fd: number, max: number): number {
    if (this.remaining === 0) return 0;
    const k = this.cursor.sendTo(fd, max < this.remaining ? max : this.remaining);
    this.remaining -= k;
    return k;
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
