/**
 * Seeded fuzzer over every registered image format (FORMAT_READERS): small valid images
 * made by qemu-img are mutated in their headers and tables (the ranges each layer reports
 * as metadata, the first and last sectors, anywhere), sometimes with checksums fixed up
 * so the mutation reaches the tables behind them, sometimes truncated. Every case must
 * end in a map that validates or a FormatError — never another exception, a hang (the
 * test's timeout), or a big allocation (reads over 256 MiB are refused by the reader
 * and the process's RSS is watched).
 *
 * A failure names the format, seed and case number; FUZZ_SEED=n FUZZ_CASES=n override,
 * FUZZ_VERBOSE=1 prints how many cases mapped and how many were refused.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FormatError, isFormatError, type BlockReader } from '../../src/formats/block-reader.ts';
import { openImage, type ChainHost } from '../../src/formats/chain.ts';
import { crc32c } from '../../src/formats/crc.ts';
import { FORMAT_READERS } from '../../src/formats/detect.ts';
import { validateMap, type MetadataRange } from '../../src/formats/extent-ops.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { vhdChecksum } from '../../src/formats/vhd.ts';
import { parseVhdxRegionTable } from '../../src/formats/vhdx.ts';
import { cleanupTmpDirs, makeTmpDir, prng, qemuImg, qemuIo } from '../kit/oracle.ts';

const SEED = Number(process.env['FUZZ_SEED'] ?? 20261122);
const CASES = Number(process.env['FUZZ_CASES'] ?? 1500);
const MAX_READ = 256 * 1024 * 1024;
const RSS_LIMIT = 768 * 1024 * 1024;

interface Seed {
  name: string;
  bytes: Uint8Array;
  /** other files of the image (VMDK extents), by base name */
  siblings: Map<string, Uint8Array>;
}

/** How to make small valid images of a format with qemu-img/qemu-io; formats without an entry get a plain `qemu-img create`. */
const RECIPES: Record<string, { create: string[]; fmt: string; writes: string[] }[]> = {
  vhd: [
    { create: ['-f', 'vpc', '-o', 'subformat=dynamic'], fmt: 'vpc', writes: ['write -P 0x11 0 64k', 'write -P 0x22 2047k 4k', 'write -P 0x33 5M 1M'] },
    { create: ['-f', 'vpc', '-o', 'subformat=fixed'], fmt: 'vpc', writes: ['write -P 0x11 0 64k'] },
  ],
  vhdx: [
    { create: ['-f', 'vhdx', '-o', 'block_size=1M,log_size=1M'], fmt: 'vhdx', writes: ['write -P 0x11 0 64k', 'write -P 0x22 1023k 4k', 'write -z 3M 1M'] },
  ],
  qcow2: [
    { create: ['-f', 'qcow2', '-o', 'cluster_size=4096'], fmt: 'qcow2', writes: ['write -P 0x11 0 64k', 'write -z 1M 64k', 'write -c -P 0x44 2M 64k'] },
    { create: ['-f', 'qcow2', '-o', 'compat=0.10,cluster_size=65536'], fmt: 'qcow2', writes: ['write -P 0x11 0 64k', 'write -P 0x22 3M 4k'] },
  ],
  qcow: [
    // qemu-io writes one compressed qcow cluster (4 KiB) per command
    { create: ['-f', 'qcow'], fmt: 'qcow', writes: ['write -P 0x11 0 64k', 'write -P 0x22 1023k 4k', 'write -c -P 0x44 2M 4k', 'write -c -P 0x45 5M 4k'] },
  ],
  vdi: [
    { create: ['-f', 'vdi'], fmt: 'vdi', writes: ['write -P 0x11 0 64k', 'write -P 0x22 1023k 4k'] },
  ],
  vmdk: [
    { create: ['-f', 'vmdk'], fmt: 'vmdk', writes: ['write -P 0x11 0 64k', 'write -P 0x22 1023k 4k'] },
    { create: ['-f', 'vmdk', '-o', 'subformat=streamOptimized'], fmt: 'vmdk', writes: ['write -P 0x11 0 64k'] },
  ],
};

function buildSeeds(format: string, dir: string): Seed[] {
  const recipes = RECIPES[format] ?? [{ create: ['-f', format], fmt: format, writes: ['write -P 0x11 0 64k'] }];
  return recipes.map((r, i) => {
    const sub = path.join(dir, `${format}-${i}`);
    fs.mkdirSync(sub);
    const p = path.join(sub, `seed.${format}`);
    qemuImg('create', '-q', ...r.create, p, '8M');
    if (r.writes.length) qemuIo(p, r.fmt, r.writes);
    const siblings = new Map<string, Uint8Array>();
    for (const n of fs.readdirSync(sub)) if (n !== path.basename(p)) siblings.set(n, new Uint8Array(fs.readFileSync(path.join(sub, n))));
    return { name: `${format}#${i} (${r.create.join(' ')})`, bytes: new Uint8Array(fs.readFileSync(p)), siblings };
  });
}

class NotFound extends Error {
  code = 'ENOENT';
}

function memReader(name: string, bytes: Uint8Array): BlockReader {
  return {
    name,
    size: bytes.length,
    read(offset: number, length: number): Uint8Array {
      if (length > MAX_READ) throw new Error(`fuzz: a ${length}-byte read: the reader asked for a huge allocation`);
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > bytes.length) {
        throw new FormatError(`${name}: read of ${length} at ${offset} past the end (${bytes.length})`, 'offset', offset);
      }
      return bytes.slice(offset, offset + length);
    },
  };
}

function host(main: Uint8Array, seed: Seed): ChainHost {
  return {
    openFile(p: string) {
      if (p === '/fuzz/image') return memReader(p, main);
      const sib = seed.siblings.get(path.basename(p));
      if (sib) return memReader(p, sib);
      throw new NotFound(`${p}: not found`);
    },
  };
}

/** Recomputes the checksums a mutation would otherwise trip over, so it reaches deeper tables. */
function fixChecksums(format: string, b: Uint8Array, set: (off: number, v: number) => void): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const put32 = (at: number, v: number, le: boolean) => {
    for (let i = 0; i < 4; i++) set(le ? at + i : at + 3 - i, (v >>> (8 * i)) & 0xff);
  };
  if (format === 'vhd') {
    for (const at of [0, b.length - 512]) {
      if (at < 0 || at + 512 > b.length) continue;
      if (String.fromCharCode(...b.subarray(at, at + 8)) !== 'conectix') continue;
      put32(at + 64, vhdChecksum(b.subarray(at, at + 512), 64), false);
      const dataOffset = Number(dv.getBigUint64(at + 16));
      if (dataOffset + 1024 <= b.length && String.fromCharCode(...b.subarray(dataOffset, dataOffset + 8)) === 'cxsparse') {
        put32(dataOffset + 36, vhdChecksum(b.subarray(dataOffset, dataOffset + 1024), 36), false);
      }
    }
  } else if (format === 'vhdx') {
    const fix = (at: number, len: number) => {
      if (at + len > b.length) return;
      put32(at + 4, 0, true);
      put32(at + 4, crc32c(b.subarray(at, at + len)), true);
    };
    fix(64 * 1024, 4096);
    fix(128 * 1024, 4096);
    fix(192 * 1024, 64 * 1024);
    fix(256 * 1024, 64 * 1024);
  }
}

const INTERESTING32 = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x200, 0x1000, 0x7fff, 0x8000, 0xffff, 0x10000, 0x100000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

/** Where a format keeps its fields, beyond the ranges the reader reports (VHDX regions hold mostly padding). */
function hotRanges(format: string, b: Uint8Array): MetadataRange[] {
  if (format !== 'vhdx') return [];
  const KiB = 1024;
  const out: MetadataRange[] = [
    { file: 0, offset: 64 * KiB, length: 80, what: 'header 1' },
    { file: 0, offset: 128 * KiB, length: 80, what: 'header 2' },
    { file: 0, offset: 192 * KiB, length: 80, what: 'region table 1' },
    { file: 0, offset: 256 * KiB, length: 80, what: 'region table 2' },
  ];
  const regions = parseVhdxRegionTable(b.subarray(192 * KiB, 256 * KiB), 'seed') ?? [];
  for (const r of regions) {
    out.push({ file: 0, offset: r.offset, length: 256, what: `region ${r.guid} start` });
    if (r.guid === '8b7ca206-4790-4b9a-b8fe-575f050f886e') {
      out.push({ file: 0, offset: r.offset + 64 * KiB, length: 64, what: 'metadata items' });
      out.push({ file: 0, offset: r.offset, length: 32 + 8 * 32, what: 'metadata table' });
    }
  }
  return out;
}

function metadataOf(seed: Seed, format: string): MetadataRange[] {
  try {
    const img = openImage('/fuzz/image', host(seed.bytes, seed));
    return [...(img.layers[0]!.layer.metadata ?? []).filter((m) => m.file === 0), ...hotRanges(format, seed.bytes)];
  } catch (e) {
    throw new Error(`fuzz: the unmutated ${format} seed ${seed.name} does not open: ${String(e)}`);
  }
}

describe('fuzz: mutated images end in a valid map or a FormatError', () => {
  let dir: string;
  beforeAll(() => { dir = makeTmpDir(); });
  afterAll(cleanupTmpDirs);

  const formats = FORMAT_READERS.map((r) => r.format).filter((f) => f !== 'raw' && f !== 'vdisk-json');
  it.each(formats)('%s', async (format) => {
    const seeds = buildSeeds(format, dir);
    let hash = SEED;
    for (const ch of format) hash = Math.imul(hash ^ ch.charCodeAt(0), 0x9e3779b1) >>> 0;
    const rnd = prng(hash);
    const int = (n: number) => Math.floor(rnd() * n);
    const outcomes = { mapped: 0, refused: 0 };
    const baseRss = process.memoryUsage.rss();
    const perSeed = Math.ceil(CASES / seeds.length);
    for (const seed of seeds) {
      const meta = metadataOf(seed, format);
      const size = seed.bytes.length;
      const work = seed.bytes.slice();
      for (let c = 0; c < perSeed; c++) {
        // let the test runner's messages through during long runs (npm run fuzz)
        if (c % 500 === 499) await new Promise((done) => setImmediate(done));
        const changed: [number, number][] = [];
        const set = (off: number, v: number) => {
          if (off < 0 || off >= size) return;
          changed.push([off, work[off]!]);
          work[off] = v & 0xff;
        };
        const where = (): number => {
          const k = rnd();
          if (k < 0.45 && meta.length) {
            const m = meta[int(meta.length)]!;
            // mostly the first bytes of a structure: that is where the fields are
            return m.offset + (rnd() < 0.7 ? int(Math.min(m.length, 256)) : int(m.length));
          }
          if (k < 0.65) return int(Math.min(size, 4096));
          if (k < 0.8) return size - 1 - int(Math.min(size, 1024));
          return int(size);
        };
        const mutations = 1 + int(rnd() < 0.7 ? 3 : 16);
        const log: string[] = [];
        for (let m = 0; m < mutations; m++) {
          const at = where();
          const kind = int(4);
          if (kind === 0) { set(at, work[at]! ^ (1 << int(8))); log.push(`flip ${at}`); }
          else if (kind === 1) { const v = int(256); set(at, v); log.push(`byte ${at}=${v}`); }
          else {
            const v = rnd() < 0.5 ? INTERESTING32[int(INTERESTING32.length)]! : int(size);
            const le = rnd() < 0.5;
            const width = kind === 2 ? 4 : 8;
            for (let i = 0; i < width; i++) {
              const byte = i < 4 ? (v >>> (8 * i)) & 0xff : 0;
              set(le ? at + i : at + width - 1 - i, byte);
            }
            log.push(`u${width * 8}${le ? 'le' : 'be'} ${at}=${v}`);
          }
        }
        const fixed = rnd() < 0.5;
        if (fixed) {
          fixChecksums(format, work, set);
          log.push('checksums fixed');
        }
        let image: Uint8Array = work;
        if (rnd() < 0.08) {
          const cut = int(size);
          image = work.subarray(0, cut);
          log.push(`truncated to ${cut}`);
        }
        const label = `${format} seed ${seed.name}, case ${c} (FUZZ_SEED=${SEED}): ${log.join(', ')}`;
        try {
          const img = openImage('/fuzz/image', host(image, seed));
          validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
          // read a few ranges through the map, including unmappable ones
          for (let r = 0; r < 3 && img.map.size > 0; r++) {
            const len = Math.min(img.map.size, 1 + int(65536));
            readMapped(img, int(img.map.size - len + 1), len);
          }
          outcomes.mapped++;
        } catch (e) {
          if (!isFormatError(e)) {
            throw new Error(`${label}: threw ${(e as Error)?.stack ?? String(e)}`);
          }
          outcomes.refused++;
        }
        const rss = process.memoryUsage.rss();
        if (rss - baseRss > RSS_LIMIT) throw new Error(`${label}: RSS grew by ${rss - baseRss} bytes`);
        for (let i = changed.length - 1; i >= 0; i--) work[changed[i]![0]] = changed[i]![1];
      }
      // the seed itself is restored exactly after every case
      expect(Buffer.from(work).equals(Buffer.from(seed.bytes))).toBe(true);
    }
    if (process.env['FUZZ_VERBOSE']) process.stderr.write(`fuzz ${format}: ${outcomes.mapped} mapped, ${outcomes.refused} refused\n`);
    expect(outcomes.mapped + outcomes.refused).toBe(perSeed * seeds.length);
    // both outcomes happen: the mutations reach the tables without killing every image
    expect(outcomes.refused).toBeGreaterThan(0);
    expect(outcomes.mapped).toBeGreaterThan(0);
  });
});
