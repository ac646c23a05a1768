/**
 * Shared helpers for the image-format tests: temp dirs, qemu-img/qemu-io, the oracle
 * comparisons (our bytes vs `qemu-img convert -O raw`, our map vs `qemu-img map`), and
 * decompressing the real-world samples.
 *
 *   makeTmpDir(): string                        removed by cleanupTmpDirs() (call in afterAll)
 *   run(cmd, args, opts?): Buffer               execFileSync with stderr in the error
 *   qemuImg(...args): string
 *   qemuIo(image, fmt, cmds: string[]): void    one qemu-io run with -c per command
 *   qemuRaw(image): Buffer                      qemu-img convert -O raw, read back
 *   qemuMap(image): QemuMapEntry[]              qemu-img map --output=json
 *   qemuVirtualSize(image): number
 *   openTestImage(path): OpenedImage & {close}  openImage over Node files
 *   readWholeImage(img): Buffer                 our bytes, through the map
 *   expectSameBytesAsQemu(path)                 asserts cat == convert (first difference named)
 *   expectMapAgreesWithQemu(img, path)          asserts the map agrees with qemu-img map
 *   expectMatchesQemu(path)                     both, plus validateMap; returns the image (closed)
 *   realWorld(name, dir): string                decompresses a sample from testdata/real-world
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'vitest';
import { openImage } from '../../src/formats/chain.ts';
import type { OpenedImage } from '../../src/formats/image.ts';
import { validateMap } from '../../src/formats/extent-ops.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';

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

/** Runs qemu-io commands (write -P, write -z, discard…) on an image in one process. */
export function qemuIo(image: string, fmt: string, cmds: string[]): string {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  const out = run('qemu-io', args).toString();
  if (/error|failed/i.test(out)) throw new Error(`qemu-io on ${image}: ${out}`);
  return out;
}

export function qemuRaw(image: string): Buffer {
  const out = path.join(makeTmpDir(), 'oracle.raw');
  run('qemu-img', ['convert', '-O', 'raw', image, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(path.dirname(out), { recursive: true, force: true });
  return b;
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export function qemuMap(image: string): QemuMapEntry[] {
  return JSON.parse(qemuImg('map', '--output=json', image)) as QemuMapEntry[];
}

export function qemuVirtualSize(image: string): number {
  return (JSON.parse(qemuImg('info', '--output=json', image)) as { 'virtual-size': number })['virtual-size'];
}

export function openTestImage(p: string): OpenedImage & { close(): void } {
  const host = nodeChainHost();
  try {
    return Object.assign(openImage(p, host), { close: () => host.close() });
  } catch (e) {
    host.close();
    throw e;
  }
}

export function readWholeImage(img: OpenedImage): Buffer {
  const out = Buffer.alloc(img.map.size);
  const chunk = 16 * 1024 * 1024;
  for (let pos = 0; pos < img.map.size; pos += chunk) {
    const n = Math.min(chunk, img.map.size - pos);
    out.set(readMapped(img, pos, n), pos);
  }
  return out;
}

function firstDifference(a: Buffer, b: Buffer): number {
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

export function expectSameBytes(ours: Buffer, oracle: Buffer, what: string): void {
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
  const img = openTestImage(p);
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

export const REAL_WORLD_DIR = '/work/shared/testdata/real-world';

/** Decompresses testdata/real-world/NAME (.bz2 or .xz) into dir once; returns the path. */
export function realWorld(name: string, dir: string): string {
  const src = path.join(REAL_WORLD_DIR, name);
  const out = path.join(dir, name.replace(/\.(bz2|xz)$/, ''));
  if (fs.existsSync(out)) return out;
  const tool = name.endsWith('.bz2') ? 'bzip2' : 'xz';
  fs.writeFileSync(out, run(tool, ['-dc', src]));
  return out;
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
