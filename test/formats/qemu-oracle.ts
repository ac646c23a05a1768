/**
 * Test helpers for the VDI, VMDK and QCOW2 readers: build images with qemu-img/qemu-io,
 * open them through the chain resolver, and compare with qemu-img as the oracle
 * (`convert -O raw` for the bytes, `map --output=json` for allocation).
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { openImage } from '../../src/formats/chain.ts';
import type { OpenedImage } from '../../src/formats/image.ts';
import type { Extent } from '../../src/formats/extent-map.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';

export function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
}

export function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** qemu-img with arguments, in `dir`. */
export function qemuImg(dir: string, ...args: string[]): string {
  return run('qemu-img', args, dir);
}

/** qemu-io commands (e.g. "write -P 0x11 0 64k") on an image. */
export function qemuIo(dir: string, file: string, cmds: string[], fmt?: string): void {
  const args: string[] = [];
  if (fmt) args.push('-f', fmt);
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const out = run('qemu-io', args, dir);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}: ${out}`);
}

/** Opens an image through the chain resolver; close() releases its files. */
export function openChain(file: string): OpenedImage & { close(): void } {
  const host = nodeChainHost();
  try {
    const img = openImage(file, host);
    return Object.assign(img, { close: () => host.close() });
  } catch (e) {
    host.close();
    throw e;
  }
}

/** Reads the whole virtual disk through the map. */
export function readAll(img: OpenedImage): Uint8Array {
  const out = new Uint8Array(img.map.size);
  const chunk = 16 << 20;
  for (let p = 0; p < img.map.size; p += chunk) {
    out.set(readMapped(img, p, Math.min(chunk, img.map.size - p)), p);
  }
  return out;
}

export function qemuRaw(file: string, fmt?: string): Uint8Array {
  const dir = tempDir();
  const out = path.join(dir, 'oracle.raw');
  const args = ['convert'];
  if (fmt) args.push('-f', fmt);
  args.push('-O', 'raw', file, out);
  // from the image's directory: qemu opens a relative data_file name from the working directory
  run('qemu-img', args, path.dirname(file));
  const bytes = new Uint8Array(fs.readFileSync(out));
  fs.rmSync(dir, { recursive: true, force: true });
  return bytes;
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
  const args = ['map', '--output=json'];
  if (fmt) args.push('-f', fmt);
  args.push(file);
  return JSON.parse(run('qemu-img', args, path.dirname(file))) as QemuMapEntry[];
}

/** First differing byte, for a readable failure instead of a megabyte diff. */
export function expectSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  expect(actual.length, `${what}: size`).toBe(expected.length);
  let i = 0;
  const n = actual.length;
  // compare 8 bytes at a time where aligned
  const a32 = actual.byteOffset % 4 === 0 ? new Uint32Array(actual.buffer, actual.byteOffset, n >> 2) : undefined;
  const e32 = expected.byteOffset % 4 === 0 ? new Uint32Array(expected.buffer, expected.byteOffset, n >> 2) : undefined;
  if (a32 && e32) {
    let w = 0;
    while (w < a32.length && a32[w] === e32[w]) w++;
    i = w * 4;
  }
  while (i < n && actual[i] === expected[i]) i++;
  expect(i === n ? 'equal' : `first difference at byte ${i}: ${actual[i]} vs ${expected[i]}`, what).toBe('equal');
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
  const img = openChain(file);
  try {
    const qmap = qemuMap(file, opts.fmt);
    expectMapMatchesQemu(img, qmap, opts);
    const what = `${path.basename(file)} read through the map vs qemu-img convert`;
    if (img.map.size <= 64 << 20) {
      expectSameBytes(readAll(img), qemuRaw(file, opts.fmt), what);
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
      const dir = tempDir();
      const out = path.join(dir, 'oracle.raw');
      const args = ['convert', ...(opts.fmt ? ['-f', opts.fmt] : []), '-O', 'raw', file, out];
      run('qemu-img', args, path.dirname(file));
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

export const REAL_WORLD = fileURLToPath(new URL('../../../shared/testdata/real-world/', import.meta.url));

/** Decompresses a real-world sample (.bz2 / .xz) into `dir`; returns the path. */
export function realWorld(dir: string, name: string): string {
  const src = path.join(REAL_WORLD, name);
  const out = path.join(dir, name.replace(/\.(bz2|xz)$/, ''));
  const tool = name.endsWith('.bz2') ? 'bzip2' : 'xz';
  fs.writeFileSync(out, execFileSync(tool, ['-dc', src], { maxBuffer: 1 << 30 }));
  return out;
}
