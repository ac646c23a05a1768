/**
 * Root archives: what compression wraps them (recognised by content, never by name),
 * whether the stream inside is tar or newc cpio, what size the container declares for
 * the decompressed stream (for sizing the tmpfs before unpacking), and a streaming newc
 * reader that yields the same entries as the tar reader.
 *
 * Engine-neutral: Uint8Array only.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { Decompress as ZstdStream } from 'fzstd';
import { archivePath, type ArchiveEntry, type ReaderOptions, type ArchiveEntryType, type ArchiveReader, type ByteSource, StreamCursor } from './archive-stream.ts';
import { lz4Source } from './lz4.ts';
import { isTarHeader, TarReader } from './tar.ts';
import { utf8Decode } from './text.ts';

export type Compression = 'none' | 'gzip' | 'xz' | 'zstd' | 'bzip2' | 'lz4' | 'lzma';

/** The compression of a stream from its first bytes (at least 6 for xz). */
export function detectCompression(head: Uint8Array): Compression {
  const b = head;
  if (b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b) return 'gzip';
  if (b.length >= 6 && b[0] === 0xfd && b[1] === 0x37 && b[2] === 0x7a && b[3] === 0x58 && b[4] === 0x5a && b[5] === 0x00) return 'xz';
  if (b.length >= 4 && b[0] === 0x28 && b[1] === 0xb5 && b[2] === 0x2f && b[3] === 0xfd) return 'zstd';
  if (b.length >= 4 && b[0] === 0x42 && b[1] === 0x5a && b[2] === 0x68 && b[3]! >= 0x31 && b[3]! <= 0x39) return 'bzip2';
  if (b.length >= 4 && b[0] === 0x04 && b[1] === 0x22 && b[2] === 0x4d && b[3] === 0x18) return 'lz4';
  if (b.length >= 4 && b[0] === 0x02 && b[1] === 0x21 && b[2] === 0x4c && b[3] === 0x18) return 'lz4';
  // lzma-alone: properties byte (< 225), a power-of-two-ish dictionary size, then the size or -1.
  if (b.length >= 13 && b[0] === 0x5d && b[1] === 0 && b[2] === 0 && (b[5] === 0xff || b[12] === 0)) return 'lzma';
  return 'none';
}

export type ArchiveFormat = 'tar' | 'cpio';

/** tar or newc cpio, from the first 512 bytes of the decompressed stream; a message names what it is otherwise. */
export function detectArchiveFormat(head: Uint8Array, name: string): ArchiveFormat {
  const magic = head.length >= 6 ? String.fromCharCode(...head.subarray(0, 6)) : '';
  if (magic === '070701' || magic === '070702') return 'cpio';
  if (magic === '070707' || (head.length >= 2 && ((head[0] === 0xc7 && head[1] === 0x71) || (head[0] === 0x71 && head[1] === 0xc7)))) {
    throw new FormatError(`${name} is an old-format (odc/binary) cpio archive; vdboot unpacks newc cpio: recreate it with "cpio -o -H newc"`, 'magic', magic);
  }
  if (isTarHeader(head)) return 'tar';
  const inner = detectCompression(head);
  if (inner !== 'none') throw new FormatError(`${name} holds ${inner} data inside its compression (compressed twice?); vdboot expects a tar or newc cpio archive inside`, 'format', inner);
  if (head.length === 0) throw new FormatError(`${name} is empty (after decompression): no archive to unpack`, 'format', 0);
  throw new FormatError(
    `${name} is not a tar or newc cpio archive (first bytes ${hex(head.subarray(0, 8))}). ` +
      `Root archives are made with "tar -C ROOT -cpf", "docker export", or "cpio -o -H newc", optionally compressed with gzip, xz, zstd, bzip2 or lz4.`,
    'format', hex(head.subarray(0, 8)),
  );
}

function hex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(' ');
}

/** A reader for the archive at the cursor (tar or newc), after decompression. */
export function openArchive(cursor: StreamCursor, name: string, opts: ReaderOptions = {}): ArchiveReader {
  const format = detectArchiveFormat(cursor.peek(512), name);
  return format === 'tar' ? new TarReader(cursor, name, opts) : new NewcReader(cursor, name);
}

/**
 * What the container says about the size of the decompressed stream, read from the end
 * or the start of the compressed file without decompressing: gzip's ISIZE (modulo 4 GiB,
 * of the last member: a lower bound), xz's index, zstd's and lz4's frame content size
 * (first frame: a lower bound). Undefined when the format does not say (bzip2, lzma
 * without a size, zstd or lz4 written from a pipe).
 */
export function declaredStreamSize(file: BlockReader, compression: Compression): number | undefined {
  try {
    switch (compression) {
      case 'none':
        return file.size;
      case 'gzip': {
        if (file.size < 18) return undefined;
        const t = file.read(file.size - 4, 4);
        const isize = (t[0]! | (t[1]! << 8) | (t[2]! << 16) | (t[3]! << 24)) >>> 0;
        // Deflate expands at most ~1032:1; a larger ISIZE is no trailer (a truncated or padded file).
        return isize <= file.size * 1032 ? isize : undefined;
      }
      case 'xz':
        return xzIndexSize(file);
      case 'zstd': {
        const h = file.read(0, Math.min(18, file.size));
        const fhd = h[4]!;
        const fcsFlag = fhd >> 6;
        const single = (fhd >> 5) & 1;
        const fcsBytes = fcsFlag === 0 ? single : [1, 2, 4, 8][fcsFlag]!;
        if (fcsBytes === 0) return undefined;
        const at = 5 + (single ? 0 : 1) + [0, 1, 2, 4][fhd & 3]!;
        let v = 0;
        for (let i = fcsBytes - 1; i >= 0; i--) v = v * 256 + h[at + i]!;
        return fcsBytes === 2 ? v + 256 : v;
      }
      case 'lz4': {
        const h = file.read(0, Math.min(15, file.size));
        if (h[0] !== 0x04 || !(h[4]! & 0x08)) return undefined;
        let v = 0;
        for (let i = 7; i >= 0; i--) v = v * 256 + h[6 + i]!;
        return Number.isSafeInteger(v) ? v : undefined;
      }
      case 'lzma': {
        const h = file.read(0, 13);
        if (h[5] === 0xff) return undefined;
        let v = 0;
        for (let i = 7; i >= 0; i--) v = v * 256 + h[5 + i]!;
        return Number.isSafeInteger(v) ? v : undefined;
      }
      default:
        return undefined;
    }
  } catch {
    return undefined;
  }
}

/** The uncompressed size recorded in the index of the last xz stream in the file. */
function xzIndexSize(file: BlockReader): number | undefined {
  let end = file.size;
  // Stream padding: multiples of four zero bytes after the footer.
  while (end >= 12) {
    const t = file.read(end - 4, 4);
    if (t[0] || t[1] || t[2] || t[3]) break;
    end -= 4;
  }
  if (end < 24) return undefined;
  const footer = file.read(end - 12, 12);
  if (footer[10] !== 0x59 || footer[11] !== 0x5a) return undefined;
  const backward = ((footer[4]! | (footer[5]! << 8) | (footer[6]! << 16) | (footer[7]! << 24)) >>> 0) * 4 + 4;
  if (backward > end - 12 || backward > (16 << 20)) return undefined;
  const index = file.read(end - 12 - backward, backward);
  if (index[0] !== 0) return undefined;
  let p = 1;
  const varint = (): number => {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 9; i++) {
      const b = index[p++];
      if (b === undefined) throw new Error('index cut off');
      v += (b & 0x7f) * mul;
      if (!(b & 0x80)) return v;
      mul *= 128;
    }
    throw new Error('varint too long');
  };
  const records = varint();
  let total = 0;
  for (let i = 0; i < records; i++) {
    varint(); // unpadded size
    total += varint();
  }
  return Number.isSafeInteger(total) ? total : undefined;
}

const NEWC_HEADER = 110;
const TRAILER = 'TRAILER!!!';
/** Longest symlink target read into memory (PATH_MAX). */
const MAX_LINK = 4096;

/**
 * newc cpio ("070701", and "070702" whose checksums are not verified), streaming.
 * Hard links (same inode, nlink > 1) become 'hardlink' entries naming the first member
 * of their group; a later member may carry the data (GNU cpio puts it on the last), which
 * the unpacker writes into the shared inode, as the kernel does. Concatenated archives
 * (zero padding between them) are read through, as the kernel reads an initramfs.
 */
export class NewcReader implements ArchiveReader {
  readonly format = 'cpio' as const;
  private remaining = 0;
  private padding = 0;
  private current: ArchiveEntry | undefined;
  private inodes = new Map<string, string>();
  private done = false;

  constructor(private readonly cursor: StreamCursor, private readonly name: string) {}

  get offset(): number {
    return this.cursor.offset;
  }

  next(): ArchiveEntry | null {
    if (this.done) return null;
    this.finishBody();
    for (;;) {
      const at = this.cursor.offset;
      const h = this.cursor.take(NEWC_HEADER);
      if (h.length < NEWC_HEADER) throw this.truncated('(next header)', at, NEWC_HEADER, h.length);
      const magic = String.fromCharCode(...h.subarray(0, 6));
      if (magic !== '070701' && magic !== '070702') {
        throw new FormatError(`${this.name}: the cpio header at byte ${at} is damaged (magic "${magic.replace(/[^\x20-\x7e]/g, '?')}"); the archive is corrupt`, 'magic', at);
      }
      const f: number[] = [];
      for (let i = 0; i < 13; i++) {
        let v = 0;
        for (let j = 0; j < 8; j++) {
          const c = h[6 + i * 8 + j]!;
          const d = c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x61 && c <= 0x66 ? c - 0x57 : c >= 0x41 && c <= 0x46 ? c - 0x37 : -1;
          if (d < 0) throw new FormatError(`${this.name}: the cpio header at byte ${at} is damaged (field ${i} is not hexadecimal)`, 'header', at);
          v = v * 16 + d;
        }
        f.push(v);
      }
      const [ino, mode, uid, gid, nlink, mtime, filesize, devMajor, devMinor, rdevMajor, rdevMinor, namesize] = f as [number, number, number, number, number, number, number, number, number, number, number, number];
      if (namesize === 0 || namesize > MAX_LINK) throw new FormatError(`${this.name}: the cpio header at byte ${at} has a name of ${namesize} bytes`, 'namesize', namesize);
      const nameBytes = this.cursor.take(namesize);
      if (nameBytes.length < namesize) throw this.truncated('(name)', at, namesize, nameBytes.length);
      const rawName = utf8Decode(nameBytes.subarray(0, nameBytes[namesize - 1] === 0 ? namesize - 1 : namesize));
      this.cursor.skip(pad4(at + NEWC_HEADER + namesize));
      if (rawName === TRAILER) {
        this.cursor.skip(pad4(filesize) + filesize);
        // Another archive may follow after zero padding (as in a concatenated initramfs).
        for (;;) {
          const z = this.cursor.peek(4);
          if (z.length === 0) {
            this.done = true;
            return null;
          }
          if (z.length === 4 && z[0] === 0x30 && z[1] === 0x37) break;
          let zeros = 0;
          for (const b of z) if (b === 0) zeros++; else break;
          if (zeros === 0) {
            // Anything else after the trailer is not ours (e.g. a tar tail): stop here.
            this.done = true;
            return null;
          }
          this.cursor.skip(zeros);
        }
        continue;
      }
      const what = `${this.name}: entry "${rawName}" at byte ${at}`;
      const path = archivePath(rawName);
      let type = typeOf(mode);
      if (!type) throw new FormatError(`${what} has file type 0${(mode & 0o170000).toString(8)}, which vdboot does not unpack`, 'mode', mode);
      let size = filesize;
      let linkTarget = '';
      if (type === 'symlink') {
        if (filesize === 0 || filesize > MAX_LINK) throw new FormatError(`${what}: a symbolic link whose target is ${filesize} bytes`, 'filesize', filesize);
        const t = this.cursor.take(filesize);
        if (t.length < filesize) throw this.truncated(path, at, filesize, t.length);
        linkTarget = utf8Decode(t);
        this.cursor.skip(pad4(filesize));
        size = 0;
      } else if (type === 'file' && nlink > 1) {
        const key = `${devMajor}:${devMinor}:${ino}`;
        const first = this.inodes.get(key);
        if (first === undefined) this.inodes.set(key, path);
        else if (first !== path) {
          type = 'hardlink';
          linkTarget = first;
        }
      } else if (type !== 'file' && filesize > 0) {
        // Directories and nodes carry no data; skip whatever is there.
        this.cursor.skip(filesize + pad4(filesize));
        size = 0;
      }
      const entry: ArchiveEntry = {
        path,
        type,
        perm: mode & 0o7777,
        uid,
        gid,
        mtimeSec: mtime,
        mtimeNsec: 0,
        size: type === 'file' || type === 'hardlink' ? size : 0,
        linkTarget,
        devMajor: rdevMajor,
        devMinor: rdevMinor,
        xattrs: [],
        offset: at,
      };
      this.remaining = entry.size;
      this.padding = pad4(entry.size);
      this.current = entry;
      return entry;
    }
  }

  body(max: number): Uint8Array {
    if (this.remaining === 0) return new Uint8Array(0);
    const at = this.cursor.offset;
    const out = this.cursor.some(Math.min(max, this.remaining));
    if (out.length === 0) throw this.truncated(this.current!.path, at, this.remaining, 0, this.current!.offset);
    this.remaining -= out.length;
    return out;
  }

  bodyTo(fd: number, max: number): number {
    if (this.remaining === 0) return 0;
    const k = this.cursor.sendTo(fd, Math.min(max, this.remaining));
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
    if (this.padding) {
      this.cursor.skip(this.padding);
      this.padding = 0;
    }
  }

  private truncated(entry: string, at: number, wanted: number, got: number, headerAt?: number): FormatError {
    return new FormatError(
      `${this.name} is truncated: entry "${entry}"${headerAt === undefined ? '' : ` (header at byte ${headerAt})`} ends early: ` +
        `${wanted - got} of its bytes are missing after byte ${at + got}. Copy the archive again (was the copy complete?)`,
      'truncated', at + got,
    );
  }

}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function typeOf(mode: number): ArchiveEntryType | undefined {
  switch (mode & 0o170000) {
    case 0o100000: return 'file';
    case 0o040000: return 'dir';
    case 0o120000: return 'symlink';
    case 0o020000: return 'char';
    case 0o060000: return 'block';
    case 0o010000: return 'fifo';
    default: return undefined;
  }
}

/**
 * The decompressors that run inside vdboot itself (no external program): lz4 and zstd.
 * gzip, xz, bzip2 and lzma are decompressed by busybox at boot (see src/boot/unpack-source.ts).
 */
export function jsDecoderSource(compression: Compression, input: ByteSource, what: string): ByteSource | undefined {
  if (compression === 'lz4') return lz4Source(input, what);
  if (compression === 'zstd') return zstdSource(input, what);
  if (compression === 'none') return input;
  return undefined;
}

/** Streaming zstd through fzstd: compressed chunks in, decompressed chunks out. */
export function zstdSource(input: ByteSource, what: string): ByteSource {
  const queue: Uint8Array[] = [];
  const decoder = new ZstdStream((chunk: Uint8Array) => {
    if (chunk.length) queue.push(chunk.slice());
  });
  let ended = false;
  return {
    pull(): Uint8Array | null {
      while (queue.length === 0) {
        if (ended) return null;
        const next = input.pull();
        try {
          if (next === null) {
            ended = true;
            decoder.push(new Uint8Array(0), true);
          } else {
            decoder.push(next.slice());
          }
        } catch (e) {
          throw new FormatError(`${what}: corrupt or truncated zstd data (${e instanceof Error ? e.message : String(e)})`, 'zstd', String(e));
        }
      }
      return queue.shift()!;
    },
  };
}
