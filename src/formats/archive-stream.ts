/**
 * What the archive readers (tar.ts, the newc reader in archive.ts) share: a cursor over a
 * stream of byte chunks pulled one at a time (a pipe, a decompressor, a file read in
 * pieces), and the entry they produce. Nothing here holds the whole archive in memory.
 *
 * Engine-neutral: Uint8Array only.
 */

/**
 * Where the bytes come from. `pull` returns the next chunk (at least one byte), or null
 * at the end of the stream. A chunk stays valid only until the next pull.
 */
export interface ByteSource {
  pull(): Uint8Array | null;
  /**
   * Optional: writes the next bytes of the stream (those after everything pulled), at
   * most `max`, into the file descriptor `fd` without passing them through JavaScript
   * (sendfile, splice); returns how many (0 at the end of the stream).
   */
  sendTo?(fd: number, max: number): number;
}

export type ArchiveEntryType = 'file' | 'dir' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo';

export interface Xattr {
  name: string;
  value: Uint8Array;
}

/** One member of an archive, as the unpacker needs it. */
export interface ArchiveEntry {
  /**
   * Relative path with no leading "/" or "./" and no "." or empty components; "" is the root
   * itself. It may hold ".." components: the reader passes them on (so a consumer can name
   * and count the entry), and whoever creates files must refuse such an entry (hasDotDot).
   */
  path: string;
  type: ArchiveEntryType;
  /** Permission bits including setuid, setgid and sticky (mode & 0o7777). */
  perm: number;
  uid: number;
  gid: number;
  /** Modification time: whole seconds since the epoch, and nanoseconds. */
  mtimeSec: number;
  mtimeNsec: number;
  /** Bytes of body that follow (read them with the reader's `body`); hard links may carry some too. */
  size: number;
  /** A symlink's target as written, or a hard link's target as a normalised archive path. */
  linkTarget: string;
  devMajor: number;
  devMinor: number;
  xattrs: Xattr[];
  /** Byte offset in the (decompressed) stream where this entry's first header starts. */
  offset: number;
}

/**
 * QuickJS gives an object literal its shape one property at a time, and frees a shape
 * when no object has it any more: an entry made while the previous one is already gone
 * would build its thirteen shapes again. One object per step of ArchiveEntry's property
 * order (the readers write their literals in this order) keeps them all alive.
 */
const ENTRY_KEYS = ['path', 'type', 'perm', 'uid', 'gid', 'mtimeSec', 'mtimeNsec', 'size', 'linkTarget', 'devMajor', 'devMinor', 'xattrs', 'offset'] as const;
export const ENTRY_SHAPES: readonly object[] = ENTRY_KEYS.map((_, n) => {
  const o: Record<string, unknown> = {};
  for (const k of ENTRY_KEYS.slice(0, n + 1)) o[k] = 0;
  return o;
});

/** How a reader hands out entries. */
export interface ReaderOptions {
  /**
   * One entry object, refilled by every `next()` (valid until the next call), instead of
   * a new one each time: QuickJS builds a new object a property at a time, which costs
   * about as much as reading the header. For consumers that keep no entry (the unpacker).
   */
  reuseEntry?: boolean;
  /**
   * The sum of a block's bytes as unsigned numbers, from native code when the host has it
   * (the tar header checksum; summed here, it is a third of the work of reading a header).
   */
  byteSum?: (bytes: Uint8Array) => number;
  /** UTF-8 bytes as a string, from native code when the host has it (names; a call costs less than building the string here). */
  utf8Decode?: (bytes: Uint8Array) => string;
}

export interface ArchiveReader {
  readonly format: 'tar' | 'cpio';
  /** The next entry (its body unread), or null after the end marker. */
  next(): ArchiveEntry | null;
  /** Up to `max` bytes of the current entry's body; an empty array once it is all read. */
  body(max: number): Uint8Array;
  /**
   * Optional: moves up to `max` bytes of the current entry's body straight into the file
   * descriptor `fd` (kernel-side, see ByteSource.sendTo); 0 when nothing is left or the
   * bytes must come through `body` (they are already read into memory).
   */
  bodyTo?(fd: number, max: number): number;
  /** Bytes of the stream consumed so far. */
  readonly offset: number;
}

const EMPTY = new Uint8Array(0);

/** Sequential reads over a ByteSource, copying only when a read spans two chunks. */
export class StreamCursor {
  private chunk: Uint8Array = EMPTY;
  /** chunk.length, kept in a field: a typed array's length is a getter call in QuickJS. */
  private end = 0;
  private pos = 0;
  private consumed = 0;
  private ended = false;

  constructor(private readonly source: ByteSource) {}

  /** Bytes consumed so far. */
  get offset(): number {
    return this.consumed;
  }

  private fill(): boolean {
    while (this.pos >= this.end) {
      if (this.ended) return false;
      const next = this.source.pull();
      if (next === null) {
        this.ended = true;
        this.chunk = EMPTY;
        this.end = 0;
        this.pos = 0;
        return false;
      }
      this.chunk = next;
      this.end = next.length;
      this.pos = 0;
    }
    return true;
  }

  /** True when no byte is left. */
  atEnd(): boolean {
    return !this.fill();
  }

  /**
   * Exactly `n` bytes, or fewer only at the end of the stream (check `.length`). The
   * result may be a view into the current chunk: valid until the next call.
   */
  take(n: number): Uint8Array {
    if (n === 0) return EMPTY;
    if (!this.fill()) return EMPTY;
    const avail = this.end - this.pos;
    if (avail >= n) {
      const out = this.chunk.subarray(this.pos, this.pos + n);
      this.pos += n;
      this.consumed += n;
      return out;
    }
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n && this.fill()) {
      const room = this.end - this.pos;
      const k = n - got < room ? n - got : room;
      out.set(this.chunk.subarray(this.pos, this.pos + k), got);
      this.pos += k;
      got += k;
      this.consumed += k;
    }
    return got === n ? out : out.subarray(0, got);
  }

  /** Up to `max` bytes (at least one unless the stream ended): a view, valid until the next call. */
  some(max: number): Uint8Array {
    if (max <= 0 || !this.fill()) return EMPTY;
    const room = this.end - this.pos;
    const k = max < room ? max : room;
    const out = this.chunk.subarray(this.pos, this.pos + k);
    this.pos += k;
    this.consumed += k;
    return out;
  }

  /**
   * Moves up to `max` bytes into `fd` through the source's `sendTo` when nothing read is
   * left over in memory; returns how many (0: read them with `some` instead).
   */
  sendTo(fd: number, max: number): number {
    if (this.pos < this.end || this.ended || max <= 0) return 0;
    const send = this.source.sendTo;
    if (send === undefined) return 0;
    const k = send.call(this.source, fd, max);
    this.consumed += k;
    return k;
  }

  /** Skips `n` bytes; returns how many were skipped (fewer only at the end). */
  skip(n: number): number {
    let left = n;
    while (left > 0 && this.fill()) {
      const room = this.end - this.pos;
      const k = left < room ? left : room;
      this.pos += k;
      this.consumed += k;
      left -= k;
    }
    return n - left;
  }

  /** Looks at the next `n` bytes without consuming them (fewer at the end). */
  peek(n: number): Uint8Array {
    if (!this.fill()) return EMPTY;
    if (this.end - this.pos >= n) return this.chunk.subarray(this.pos, this.pos + n);
    // Gather into one chunk that holds the peeked bytes followed by the rest.
    const parts: Uint8Array[] = [this.chunk.slice(this.pos)];
    let have = parts[0]!.length;
    while (have < n) {
      const next = this.source.pull();
      if (next === null) {
        this.ended = true;
        break;
      }
      parts.push(next.slice());
      have += next.length;
    }
    const joined = new Uint8Array(have);
    let at = 0;
    for (const p of parts) {
      joined.set(p, at);
      at += p.length;
    }
    this.chunk = joined;
    this.end = have;
    this.pos = 0;
    return joined.subarray(0, Math.min(n, have));
  }
}

/** A ByteSource over a byte array, in chunks of `chunkSize` (tests, small archives). */
export function bytesSource(bytes: Uint8Array, chunkSize = 1 << 20): ByteSource {
  let at = 0;
  return {
    pull(): Uint8Array | null {
      if (at >= bytes.length) return null;
      const out = bytes.subarray(at, Math.min(bytes.length, at + chunkSize));
      at += out.length;
      return out;
    },
  };
}

/**
 * An archive member's path relative to the new root: "/" and "./" prefixes, empty and "."
 * components dropped (an absolute name lands inside the root, as GNU tar extracts it).
 * ".." components are kept: the entry is refused by the unpacker, which counts it, rather
 * than ending the whole unpack here.
 */
export function archivePath(raw: string): string {
  const plain = plainPath(raw);
  if (plain !== undefined) return plain;
  return raw.split('/').filter((x) => x !== '' && x !== '.').join('/');
}

/** Whether a path (as archivePath returns it) has a ".." component, i.e. could leave the root. */
export function hasDotDot(path: string): boolean {
  if (path.indexOf('..') < 0) return false; // one native search for nearly every name
  const parts = path.split('/');
  for (const x of parts) if (x === '..') return true;
  return false;
}

/**
 * The path when it needs nothing but the "./" of "tar -C ROOT ." taken off, proved by a
 * few native searches (no "//", no "/." that could start ".", ".." or a hidden name the
 * general case reads, no leading "." or "/", no trailing "/"); else undefined.
 */
export function plainPath(raw: string): string | undefined {
  const p = raw.charCodeAt(0) === 0x2e && raw.charCodeAt(1) === 0x2f ? raw.slice(2) : raw;
  const first = p.charCodeAt(0);
  if (p.length > 0 && first !== 0x2e && first !== 0x2f && p.charCodeAt(p.length - 1) !== 0x2f && p.indexOf('/.') < 0 && p.indexOf('//') < 0) return p;
  return undefined;
}

/** "12.3 MiB"-style sizes for console messages. */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} bytes`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}
