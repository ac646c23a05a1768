/**
 * The test kit's image oracle: temporary folders, qemu-img and qemu-io to build images,
 * and the comparisons that hold vdboot's readers to qemu (our bytes vs `qemu-img convert
 * -O raw`, our map vs `qemu-img map`). Images are opened as the host commands open them,
 * with src/sys/host-image.ts's openHostImage.
 *
 *   makeTmpDir(): string                         removed by cleanupTmpDirs() (call in afterAll)
 *   run(cmd, args, opts?): Buffer                execFileSync with stderr in the error
 *   qemuImg(...args): string                     qemuImgIn(dir, ...args) runs it in `dir`
 *   qemuIo(image, fmt, cmds): string             one qemu-io run with -c per command
 *   qemuIoIn(dir, file, cmds, fmt?): void        the same in `dir`, format probed unless given
 *   qemuRaw(file, fmt?): Buffer                  qemu-img convert -O raw, read back
 *   qemuMap(file, fmt?): QemuMapEntry[]          qemu-img map --output=json
 *   qemuVirtualSize(file): number
 *   readWholeImage(img): Buffer                  our bytes, through the map
 *   expectSameBytes(ours, oracle, what)          equal, or the first differing byte named
 *   expectSameBytesAsQemu(img, path)             our bytes == convert, 16 MiB at a time
 *   expectMapAgreesWithQemu(img, path)           data where qemu has data at that offset, zero where it says zero
 *   expectMatchesQemu(path)                      both, plus validateMap; returns the image (closed)
 *   expectMapMatchesQemu(img, qmap, opts?)       the map range by range, layer depth and present/why too
 *   checkAgainstQemu(file, opts?)                expectMapMatchesQemu plus the bytes (sampled above 64 MiB)
 *   patchFile(file, offset, bytes), be32(v), le32(v), prng(seed)
 *
 * Qemu runs from the image's folder where it may matter: it opens a relative data_file
 * name from the working directory.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'vitest';
import type { Extent } from '../../src/formats/extent-map.ts';
import { validateMap } from '../../src/formats/extent-ops.ts';
import type { OpenedImage } from '../../src/formats/image.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

const tmpDirs: string[] = [];

export function makeTmpDir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
  tmpDirs.push(d);
  return d;
}

export function cleanupTmpDirs(): void {
  for (const d of tmpDirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
}

export function run(cmd: string, args: string[], opts: { input?: Buffer | string; cwd?: string } = {}): Buffer {
  try {
    return execFileSync(cmd, args, { input: opts.input, cwd: opts.cwd, maxBuffer: 1 << 30, stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${err.stderr?.toString() || err.message}`);
  }
}

export function qemuImg(...args: string[]): string {
  return run('qemu-img', args).toString();
}

/** qemu-img with arguments, in `dir` (relative names are relative to it). */
export function qemuImgIn(dir: string, ...args: string[]): string {
  return run('qemu-img', args, { cwd: dir }).toString();
}

/** Runs qemu-io commands (write -P, write -z, discard…) on an image in one process. */
export function qemuIo(image: string, fmt: string, cmds: string[]): string {
  return qemuIoIn(undefined, image, cmds, fmt);
}

/** qemu-io commands (e.g. "write -P 0x11 0 64k") on an image, in `dir`. */
export function qemuIoIn(dir: string | undefined, file: string, cmds: string[], fmt?: string): string {
  const args: string[] = [];
  if (fmt) args.push('-f', fmt);
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const out = run('qemu-io', args, { cwd: dir }).toString();
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')} on ${file}: ${out}`);
  return out;
}

/** The virtual disk as qemu-img convert -O raw reads it. */
export function qemuRaw(file: string, fmt?: string): Buffer {
  const image = path.resolve(file);
  const dir = makeTmpDir();
  const out = path.join(dir, 'oracle.raw');
  try {
    run('qemu-img', ['convert', ...(fmt ? ['-f', fmt] : []), '-O', 'raw', image, out], { cwd: path.dirname(image) });
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  compressed?: boolean;
}

export function qemuMap(file: string, fmt?: string): QemuMapEntry[] {
  const image = path.resolve(file);
  return JSON.parse(run('qemu-img', ['map', '--output=json', ...(fmt ? ['-f', fmt] : []), image], { cwd: path.dirname(image) }).toString()) as QemuMapEntry[];
}

export function qemuVirtualSize(image: string): number {
  return (JSON.parse(qemuImg('info', '--output=json', image)) as { 'virtual-size': number })['virtual-size'];
}

/** Reads the whole virtual disk through the map. */
export function readWholeImage(img: OpenedImage): Buffer {
  const out = Buffer.alloc(img.map.size);
  const chunk = 16 * 1024 * 1024;
  for (let pos = 0; pos < img.map.size; pos += chunk) {
    const n = Math.min(chunk, img.map.size - pos);
    out.set(readMapped(img, pos, n), pos);
  }
  return out;
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** The first byte where a and b differ (-1 when equal), found 64 KiB at a time. */
function firstDifference(ua: Uint8Array, ub: Uint8Array): number {
  const a = asBuffer(ua);
  const b = asBuffer(ub);
  const n = Math.min(a.length, b.length);
  const step = 65536;
  for (let i = 0; i < n; i += step) {
    const m = Math.min(step, n - i);
    if (a.compare(b, i, i + m, i, i + m) !== 0) {
      for (let j = i; j < i + m; j++) if (a[j] !== b[j]) return j;
    }
  }
  return a.length === b.length ? -1 : n;
}

/** Equal bytes; on a difference the first differing byte is named (not a megabyte diff). */
export function expectSameBytes(ours: Uint8Array, oracle: Uint8Array, what: string): void {
  expect(ours.length, `${what}: size`).toBe(oracle.length);
  const d = firstDifference(ours, oracle);
  expect(d, `${what}: first differing byte (ours 0x${ours[d]?.toString(16)}, qemu 0x${oracle[d]?.toString(16)})`).toBe(-1);
}

/** Compares our bytes with qemu-img convert's, 16 MiB at a time (for images of any size). */
export function expectSameBytesAsQemu(img: OpenedImage, p: string): void {
  const dir = makeTmpDir();
  const out = path.join(dir, 'oracle.raw');
  run('qemu-img', ['convert', '-O', 'raw', p, out]);
  const fd = fs.openSync(out, 'r');
  try {
    expect(fs.fstatSync(fd).size, `${p}: size`).toBe(img.map.size);
    const chunk = 16 * 1024 * 1024;
    const theirs = Buffer.alloc(chunk);
    for (let pos = 0; pos < img.map.size; pos += chunk) {
      const n = Math.min(chunk, img.map.size - pos);
      fs.readSync(fd, theirs, 0, n, pos);
      const ours = Buffer.from(readMapped(img, pos, n));
      if (ours.compare(theirs, 0, n) !== 0) {
        const d = firstDifference(ours, theirs.subarray(0, n));
        expect.fail(`${p}: byte ${pos + d} differs (ours 0x${ours[d]?.toString(16)}, qemu 0x${theirs[d]?.toString(16)})`);
      }
    }
  } finally {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Where qemu reports data at a file offset of the image at chain depth d, the map must say
 * data at that offset of that layer's file; where qemu reports zero with no data, the map must say
 * zero. (qemu's VHDX driver reports everything as data without offsets: nothing to check.)
 */
export function expectMapAgreesWithQemu(img: OpenedImage, p: string): void {
  const entries = qemuMap(p);
  for (const q of entries) {
    // any file of that layer (qcow2 with an external data file reports offsets in that file)
    const layerFiles = img.layers[q.depth]?.fileIndex;
    const end = q.start + q.length;
    for (const e of img.map.extents) {
      if (e.start + e.length <= q.start || e.start >= end) continue;
      const s = Math.max(e.start, q.start);
      const where = `${p}: qemu-img map entry ${JSON.stringify(q)} vs our ${JSON.stringify(e)}`;
      if (q.data && q.offset !== undefined && layerFiles !== undefined) {
        expect(e.kind, where).toBe('data');
        if (e.kind === 'data') {
          expect(layerFiles.includes(e.file), where).toBe(true);
          expect(e.offset + (s - e.start), where).toBe(q.offset + (s - q.start));
        }
      } else if (!q.data && q.zero && q.offset === undefined) {
        expect(e.kind, where).toBe('zero');
      }
    }
  }
}

/** Opens with vdboot, validates the map, compares bytes and map with qemu. */
export function expectMatchesQemu(p: string): OpenedImage {
  const img = openHostImage(p);
  try {
    validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
    expect(img.map.size).toBe(qemuVirtualSize(p));
    expectSameBytesAsQemu(img, p);
    expectMapAgreesWithQemu(img, p);
    return img;
  } finally {
    img.close();
  }
}

export interface MapCompareOptions {
  /** layer depths whose files are raw: qemu reports a raw file's holes as zero, vdboot maps them as data */
  rawDepths?: number[];
  /** compare zero extents' `why` with qemu's "present" (false for formats whose qemu driver reports every range present) */
  checkPresent?: boolean;
}

/**
 * Checks the resolved map against `qemu-img map`: data at the same offset (and layer
 * depth), zero where qemu says zero (present ⇔ the format marked it zero rather than
 * unallocated), unmappable where qemu says data without an offset (compressed).
 */
export function expectMapMatchesQemu(img: OpenedImage, qmap: QemuMapEntry[], opts: MapCompareOptions = {}): void {
  const layerOfFile = new Map<number, number>();
  img.layers.forEach((l, depth) => l.fileIndex.forEach((g) => { if (!layerOfFile.has(g)) layerOfFile.set(g, depth); }));
  const cuts = new Set<number>([0, img.map.size]);
  for (const e of img.map.extents) cuts.add(e.start);
  for (const q of qmap) cuts.add(q.start);
  const points = [...cuts].filter((c) => c <= img.map.size).sort((a, b) => a - b);
  let ei = 0, qi = 0;
  const problems: string[] = [];
  for (let k = 0; k + 1 < points.length && problems.length < 5; k++) {
    const s = points[k]!;
    while (ei < img.map.extents.length && img.map.extents[ei]!.start + img.map.extents[ei]!.length <= s) ei++;
    while (qi < qmap.length && qmap[qi]!.start + qmap[qi]!.length <= s) qi++;
    const e: Extent | undefined = img.map.extents[ei];
    const q = qmap[qi];
    if (!e || !q) { problems.push(`at ${s}: vdboot ${e?.kind ?? 'nothing'}, qemu ${q ? JSON.stringify(q) : 'nothing'}`); continue; }
    const say = () => `at ${s}: vdboot ${JSON.stringify(e)}, qemu ${JSON.stringify(q)}`;
    if (e.kind === 'data') {
      const depth = layerOfFile.get(e.file) ?? -1;
      if (opts.rawDepths?.includes(depth)) continue;
      if (!q.data || q.offset !== e.offset + (s - e.start) || q.depth !== depth) problems.push(say());
    } else if (e.kind === 'zero') {
      if (!q.zero || q.data) problems.push(say());
      else if (opts.checkPresent !== false && img.layers.length === 1 && q.present !== undefined && q.present !== (e.why === 'zeroed')) problems.push(`${say()} (present vs why)`);
    } else if (e.kind === 'unmappable') {
      if (!q.data || q.offset !== undefined) problems.push(say());
    }
  }
  expect(problems, 'map differs from qemu-img map').toEqual([]);
}

/**
 * The full check: bytes through the map equal qemu-img convert, and the map agrees
 * with qemu-img map. Disks up to 64 MiB are compared whole; larger (sparse) ones in
 * every range qemu says holds data or vdboot cannot map, and at both ends of vdboot's
 * data extents — elsewhere both say zero (the map comparison checks that) or vdboot
 * maps a raw file's hole, which reads as zeros on both sides.
 */
export function checkAgainstQemu(file: string, opts: MapCompareOptions & { fmt?: string } = {}): OpenedImage {
  const img = openHostImage(file);
  try {
    const qmap = qemuMap(file, opts.fmt);
    expectMapMatchesQemu(img, qmap, opts);
    const what = `${path.basename(file)} read through the map vs qemu-img convert`;
    if (img.map.size <= 64 << 20) {
      expectSameBytes(readWholeImage(img), qemuRaw(file, opts.fmt), what);
    } else {
      // Everything qemu says holds data, everything vdboot cannot map, and both ends of
      // each vdboot data extent (a flat file's holes read as zero on both sides).
      const ranges: [number, number][] = [];
      const probe = 64 << 10;
      for (const e of img.map.extents) {
        const end = e.start + e.length;
        if (e.kind === 'unmappable') ranges.push([e.start, end]);
        else if (e.kind === 'data') ranges.push([e.start, Math.min(end, e.start + probe)], [Math.max(e.start, end - probe), end]);
      }
      for (const q of qmap) if (q.data && !q.zero) ranges.push([q.start, q.start + q.length]);
      ranges.sort((x, y) => x[0] - y[0]);
      const dir = makeTmpDir();
      const out = path.join(dir, 'oracle.raw');
      const args = ['convert', ...(opts.fmt ? ['-f', opts.fmt] : []), '-O', 'raw', file, out];
      run('qemu-img', args, { cwd: path.dirname(file) });
      const fd = fs.openSync(out, 'r');
      try {
        expect(fs.fstatSync(fd).size, `${what}: size`).toBe(img.map.size);
        let done = 0;
        for (const [s0, e0] of ranges) {
          for (let p = Math.max(s0, done); p < e0; p += 16 << 20) {
            const n = Math.min(16 << 20, e0 - p);
            const want = new Uint8Array(n);
            fs.readSync(fd, want, 0, n, p);
            expectSameBytes(readMapped(img, p, n), want, `${what} at ${p}`);
          }
          done = Math.max(done, e0);
        }
      } finally {
        fs.closeSync(fd);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
    return img;
  } finally {
    img.close();
  }
}

/** Overwrites bytes of a file in place (to damage a header in a test). */
export function patchFile(file: string, offset: number, bytes: number[] | Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function be32(v: number): number[] {
  return [(v >>> 24) & 255, (v >>> 16) & 255, (v >>> 8) & 255, v & 255];
}

export function le32(v: number): number[] {
  return [v & 255, (v >>> 8) & 255, (v >>> 16) & 255, (v >>> 24) & 255];
}

/** A deterministic PRNG (mulberry32) for fuzzing and patterns. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
