/**
 * Node glue for the engine-neutral image writers: a raw disk file as a SparseSource
 * (its non-zero 64 KiB chunks found by reading it), and an output file as an ImageSink.
 */
import { closeSync, ftruncateSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { ByteRange, ImageIdentity, ImageSink, SparseSource } from '../src/formats/writers/sparse.ts';

export const SCAN_CHUNK = 64 * 1024;

/**
 * The ranges of a file the host filesystem has allocated (its holes left out), from
 * `qemu-img map`, which asks with SEEK_DATA/SEEK_HOLE (Node cannot); aligned out to
 * `chunk`. The whole file when qemu-img is missing or fails: then the scan reads the holes
 * too (about 3 s per GiB here), which is slow for a large, mostly empty disk but correct.
 */
export function hostAllocatedRanges(path: string, size: number, chunk = SCAN_CHUNK): ByteRange[] {
  const whole = [{ start: 0, length: size }];
  const r = spawnSync('qemu-img', ['map', '--output=json', '-f', 'raw', path], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  if (r.error || r.status !== 0) return whole;
  let entries: { start: number; length: number; data: boolean }[];
  try {
    entries = JSON.parse(r.stdout);
  } catch {
    return whole;
  }
  const out: ByteRange[] = [];
  for (const e of entries) {
    if (!e.data) continue;
    const start = Math.floor(e.start / chunk) * chunk;
    const end = Math.min(size, Math.ceil((e.start + e.length) / chunk) * chunk);
    const last = out[out.length - 1];
    if (last && start <= last.start + last.length) last.length = Math.max(last.length, end - last.start);
    else out.push({ start, length: end - start });
  }
  return out;
}

/** The ranges of a file that hold non-zero bytes, at `chunk` granularity, adjacent chunks merged; only `within` is read. */
export function dataRanges(fd: number, size: number, chunk = SCAN_CHUNK, within: readonly ByteRange[] = [{ start: 0, length: size }]): ByteRange[] {
  const ranges: ByteRange[] = [];
  const bufSize = 64 * chunk;
  const buf = Buffer.alloc(bufSize);
  const zero = Buffer.alloc(chunk);
  for (const w of within) scan(w.start, Math.min(size, w.start + w.length));
  return ranges;

  function scan(from: number, to: number): void {
    for (let at = from; at < to; at += bufSize) {
      const n = Math.min(bufSize, to - at);
      let got = 0;
      while (got < n) {
        const r = readSync(fd, buf, got, n - got, at + got);
        if (r === 0) throw new Error(`short read at ${at + got}`);
        got += r;
      }
      for (let o = 0; o < n; o += chunk) {
        const len = Math.min(chunk, n - o);
        const piece = buf.subarray(o, o + len);
        if (len === chunk ? piece.equals(zero) : piece.equals(zero.subarray(0, len))) continue;
        const start = at + o;
        const last = ranges[ranges.length - 1];
        if (last && last.start + last.length === start) last.length += len;
        else ranges.push({ start, length: len });
      }
    }
  }
}

export interface RawFileSource extends SparseSource {
  close(): void;
}

export function openRawSource(path: string, ranges?: ByteRange[]): RawFileSource {
  const fd = openSync(path, 'r');
  const size = fstatSync(fd).size;
  const found = ranges ?? dataRanges(fd, size, SCAN_CHUNK, hostAllocatedRanges(path, size));
  return {
    size,
    ranges: found,
    read(offset: number, length: number): Uint8Array {
      const b = Buffer.alloc(length);
      let got = 0;
      while (got < length) {
        const r = readSync(fd, b, got, length - got, offset + got);
        if (r === 0) break; // past the end of a file: zeros
        got += r;
      }
      return b;
    },
    close: () => closeSync(fd),
  };
}

export interface FileSink extends ImageSink {
  close(): void;
}

/** A sink over a new (truncated) file: unwritten ranges stay holes in the host file. */
export function openFileSink(path: string): FileSink {
  const fd = openSync(path, 'w');
  return {
    write(offset: number, bytes: Uint8Array): void {
      let done = 0;
      while (done < bytes.length) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
    },
    setSize: (size: number) => ftruncateSync(fd, size),
    close: () => closeSync(fd),
  };
}

export function randomIdentity(time = Math.floor(Date.now() / 1000)): ImageIdentity {
  return { uuid: randomBytes(16), uuid2: randomBytes(16), time };
}
