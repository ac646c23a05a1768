/**
 * Reading a virtual disk's bytes through its ExtentMap: the same map device-mapper
 * would get, so `vdboot cat` checks the map.
 *
 *   readMapped(src: MapSource, start: number, length: number): Uint8Array
 *   streamMapped(src: MapSource, start?: number, length?: number, chunk?: number): Generator<Uint8Array>
 *   mappedReader(src: MapSource, name?: string): BlockReader   the virtual disk as a BlockReader
 *
 * MapSource is what openImage returns (OpenedImage fits it): the map, a BlockReader per
 * map file, and readUnmappable for unmappable ranges. Like any BlockReader's, the bytes
 * returned may be the underlying reader's own: copy them before modifying them.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import type { ExtentMap } from './extent-map.ts';
import { findExtent } from './extent-ops.ts';

export interface MapSource {
  map: ExtentMap;
  readers: readonly BlockReader[];
  readUnmappable?(start: number, length: number): Uint8Array;
}

/** Largest single read: callers stream bigger ranges in chunks. */
export const MAX_READ = 256 * 1024 * 1024;

export function readMapped(src: MapSource, start: number, length: number): Uint8Array {
  checkRange(src, start, length);
  const { map } = src;
  const end = start + length;
  const i = findExtent(map.extents, start);
  const first = i >= 0 ? map.extents[i] : undefined;
  if (first?.kind === 'data' && first.start + first.length >= end && src.readers[first.file]) {
    // one data extent holds it all: the file's bytes as they are, no copy
    return src.readers[first.file]!.read(first.offset + (start - first.start), length);
  }
  const out = new Uint8Array(length);
  fill(src, start, out, false);
  return out;
}

/** Reads `out.length` virtual bytes at `start` into `out` (holes are zeroed: `out` may hold old bytes). */
export function readMappedInto(src: MapSource, start: number, out: Uint8Array): void {
  checkRange(src, start, out.length);
  fill(src, start, out, true);
}

function checkRange(src: MapSource, start: number, length: number): void {
  const { map } = src;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > map.size) {
    throw new FormatError(`read of ${length} bytes at ${start} is outside the ${map.size}-byte disk`, 'offset', start);
  }
  if (length > MAX_READ) throw new FormatError(`read of ${length} bytes at once is too large; read in chunks`, 'length', length);
}

function fill(src: MapSource, start: number, out: Uint8Array, zeroHoles: boolean): void {
  const { map } = src;
  const end = start + out.length;
  let pos = start;
  let i = findExtent(map.extents, pos);
  while (pos < end) {
    const e = i >= 0 ? map.extents[i] : undefined;
    if (!e) throw new FormatError(`the map has no extent at virtual offset ${pos}`, 'offset', pos);
    const take = Math.min(end, e.start + e.length) - pos;
    const dst = pos - start;
    if (e.kind === 'data') {
      const r = src.readers[e.file];
      if (!r) throw new FormatError(`the map names file ${e.file}, which is not open`, 'file', e.file);
      if (r.readInto) r.readInto(e.offset + (pos - e.start), out.subarray(dst, dst + take));
      else out.set(r.read(e.offset + (pos - e.start), take), dst);
    } else if (e.kind === 'unmappable') {
      if (!src.readUnmappable) throw new FormatError(`virtual bytes ${pos}..${pos + take} cannot be read here (${e.reason})`, 'offset', pos);
      out.set(src.readUnmappable(pos, take), dst);
    } else if (zeroHoles) {
      out.fill(0, dst, dst + take);
    }
    pos += take;
    i++;
  }
}

/**
 * The virtual disk in chunks. Each yielded chunk is the same buffer refilled: use (write)
 * it before asking for the next one.
 */
export function* streamMapped(src: MapSource, start = 0, length = src.map.size - start, chunk = 16 * 1024 * 1024): Generator<Uint8Array> {
  const end = start + length;
  const buf = new Uint8Array(Math.min(chunk, Math.max(0, length)));
  for (let pos = start; pos < end; pos += chunk) {
    const out = buf.subarray(0, Math.min(chunk, end - pos));
    readMappedInto(src, pos, out);
    yield out;
  }
}

export function mappedReader(src: MapSource, name = src.map.files[0] ?? 'image'): BlockReader {
  return { name, size: src.map.size, read: (offset, length) => readMapped(src, offset, length) };
}
