/**
 * What an image writer reads and where it writes, engine-neutral.
 *
 * A SparseSource is a raw disk with the list of its ranges that hold data (everything
 * else reads as zeros). A writer turns it into one container file through an ImageSink,
 * allocating only the blocks those ranges touch, so a mostly empty disk gives a small
 * dynamic image. Bytes the writer never writes are zeros: a sink over a fresh file (a
 * sparse file on the host) gives exactly that.
 */
import { FormatError } from '../block-reader.ts';

export interface ByteRange {
  start: number;
  length: number;
}

export interface SparseSource {
  /** the raw disk's size in bytes, a multiple of 512 */
  readonly size: number;
  /** sorted, non-overlapping ranges inside [0, size) that may hold non-zero bytes */
  readonly ranges: readonly ByteRange[];
  /** reads exactly `length` bytes at `offset` (inside [0, size)) */
  read(offset: number, length: number): Uint8Array;
}

export interface ImageSink {
  /** writes bytes at a byte offset of the output file; the file grows as needed */
  write(offset: number, bytes: Uint8Array): void;
  /** sets the output file's final length (zeros past the last write) */
  setSize(size: number): void;
}

/** Identity and time stamps a writer puts in its headers; the caller chooses them (random on the host, fixed in tests). */
export interface ImageIdentity {
  /** 16 random bytes: the disk's UUID/GUID (VHD, VHDX, VDI, VMDK CID from its first 4) */
  uuid: Uint8Array;
  /** another 16 random bytes for formats that need a second identifier (VHDX write GUIDs, VDI modify UUID) */
  uuid2: Uint8Array;
  /** seconds since 1970 */
  time: number;
}

/** Progress: bytes of the virtual disk done so far and the total (both count data blocks only). */
export type WriteProgress = (done: number, total: number) => void;

export interface WriteOptions {
  identity: ImageIdentity;
  progress?: WriteProgress;
}

export interface WriteResult {
  /** the output file's length in bytes */
  fileSize: number;
  /** data blocks (grains, clusters) written */
  blocksWritten: number;
  blockSize: number;
}

export function checkSource(src: SparseSource, format: string, maxSize: number): void {
  if (!Number.isSafeInteger(src.size) || src.size <= 0 || src.size % 512 !== 0) {
    throw new FormatError(`${format}: a disk of ${src.size} bytes cannot be written: the size must be a positive multiple of 512`, 'size', src.size);
  }
  if (src.size > maxSize) {
    throw new FormatError(`${format}: a disk of ${src.size} bytes is larger than the format allows (${maxSize} bytes); choose another format`, 'size', src.size);
  }
  let end = 0;
  for (const r of src.ranges) {
    if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.length) || r.start < end || r.length < 0 || r.start + r.length > src.size) {
      throw new FormatError(`${format}: the source's data ranges are not sorted inside the disk (range ${r.start}+${r.length})`, 'ranges', r.start);
    }
    end = r.start + r.length;
  }
}

/**
 * The indexes of the blocks of `blockSize` bytes that the source's ranges touch, ascending.
 */
export function touchedBlocks(ranges: readonly ByteRange[], blockSize: number): number[] {
  const out: number[] = [];
  for (const r of ranges) {
    if (r.length === 0) continue;
    const first = Math.floor(r.start / blockSize);
    const last = Math.floor((r.start + r.length - 1) / blockSize);
    for (let b = first; b <= last; b++) {
      if (out.length === 0 || out[out.length - 1]! < b) out.push(b);
    }
  }
  return out;
}

/** One block of the virtual disk, `blockSize` bytes long; the part past the disk's end is zeros. */
export function readBlock(src: SparseSource, index: number, blockSize: number): Uint8Array {
  const start = index * blockSize;
  const length = Math.min(blockSize, src.size - start);
  const bytes = src.read(start, length);
  if (length === blockSize) return bytes;
  const padded = new Uint8Array(blockSize);
  padded.set(bytes);
  return padded;
}

export function alignUp(value: number, to: number): number {
  return Math.ceil(value / to) * to;
}

// Little- and big-endian field writers for header buffers.
export function le16(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff; b[o + 1] = (v >>> 8) & 0xff;
}
export function le32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff; b[o + 1] = (v >>> 8) & 0xff; b[o + 2] = (v >>> 16) & 0xff; b[o + 3] = (v >>> 24) & 0xff;
}
export function le64(b: Uint8Array, o: number, v: number | bigint): void {
  const x = BigInt(v);
  le32(b, o, Number(x & 0xffffffffn));
  le32(b, o + 4, Number((x >> 32n) & 0xffffffffn));
}
export function be16(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 8) & 0xff; b[o + 1] = v & 0xff;
}
export function be32(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 24) & 0xff; b[o + 1] = (v >>> 16) & 0xff; b[o + 2] = (v >>> 8) & 0xff; b[o + 3] = v & 0xff;
}
export function be64(b: Uint8Array, o: number, v: number | bigint): void {
  const x = BigInt(v);
  be32(b, o, Number((x >> 32n) & 0xffffffffn));
  be32(b, o + 4, Number(x & 0xffffffffn));
}
export function ascii(b: Uint8Array, o: number, text: string): void {
  for (let i = 0; i < text.length; i++) b[o + i] = text.charCodeAt(i) & 0xff;
}

/** Writes the source's data blocks one after another, calling `place(index, bytes)` for each. */
export function eachDataBlock(
  src: SparseSource, blockSize: number, blocks: readonly number[], progress: WriteProgress | undefined,
  place: (index: number, bytes: Uint8Array, ordinal: number) => void,
): void {
  const total = blocks.length * blockSize;
  blocks.forEach((b, i) => {
    place(b, readBlock(src, b, blockSize), i);
    progress?.((i + 1) * blockSize, total);
  });
}
