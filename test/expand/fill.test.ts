/**
 * Filling a host file's holes (src/formats/expand/fill.ts): the ranges are the file's holes
 * and uninitialized ranges widened to whole allocation units; running the fill rewrites
 * them with what the file reads there (the bytes do not change); the checks catch a unit
 * that reads back otherwise from the partition. The host is a real sparse file on this
 * machine's filesystem: its holes come from SEEK_HOLE, the oracle is the bytes before.
 */
import { closeSync, fstatSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReader } from '../../src/formats/block-reader.ts';
import type { FileExtent } from '../../src/formats/extent-ops.ts';
import { layoutReader, planFill, runFill, verifyFill } from '../../src/formats/expand/fill.ts';
import type { ExpandFile } from '../../src/formats/expand/index.ts';

const KiB = 1024;
const dir = mkdtempSync(join(tmpdir(), 'vdboot-fill-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function fileOf(path: string): ExpandFile & { close(): void; writes: { offset: number; length: number }[] } {
  const fd = openSync(path, 'r+');
  const writes: { offset: number; length: number }[] = [];
  return {
    name: path,
    get size() { return fstatSync(fd).size; },
    read(offset, length) {
      const b = Buffer.alloc(length);
      expect(readSync(fd, b, 0, length, offset)).toBe(length);
      return new Uint8Array(b);
    },
    write(offset, data) {
      writes.push({ offset, length: data.length });
      writeSync(fd, data, 0, data.length, offset);
    },
    sync() {},
    truncate(n) { ftruncateSync(fd, n); },
    close() { closeSync(fd); },
    writes,
  };
}

describe('filling a host file\'s holes', () => {
  it('planFill: holes and uninitialized ranges widened to whole units and merged; data alone needs nothing', () => {
    const ext: FileExtent[] = [
      { kind: 'data', fileOffset: 0, length: 4 * KiB, deviceOffset: 1 << 20 },
      { kind: 'hole', fileOffset: 4 * KiB, length: 60 * KiB }, // the rest of the first 64 KiB unit
      { kind: 'data', fileOffset: 64 * KiB, length: 4 * KiB, deviceOffset: 2 << 20 },
      { kind: 'hole', fileOffset: 68 * KiB, length: 4 * KiB }, // the same second unit: merged with the first
      { kind: 'data', fileOffset: 72 * KiB, length: 184 * KiB, deviceOffset: 3 << 20 },
      { kind: 'uninitialized', fileOffset: 256 * KiB, length: 100 * KiB },
    ];
    const p = planFill('/VMs/a.vhdx', 356 * KiB, ext, 64 * KiB)!;
    expect(p.unit).toBe(64 * KiB);
    expect(p.ranges).toEqual([{ offset: 0, length: 128 * KiB }, { offset: 256 * KiB, length: 100 * KiB }]);
    expect(p.zeroBytes).toBe(164 * KiB);
    expect(p.writeBytes).toBe(228 * KiB);
    expect(planFill('/VMs/b.vhdx', 8 * KiB, [{ kind: 'data', fileOffset: 0, length: 8 * KiB, deviceOffset: 0 }], 4096)).toBeNull();
    // a cluster smaller than a page is widened to a page; an absurd unit is refused
    expect(planFill('/c', 8 * KiB, [{ kind: 'hole', fileOffset: 512, length: 512 }], 512)!.ranges).toEqual([{ offset: 0, length: 4 * KiB }]);
    expect(() => planFill('/c', 8 * KiB, [{ kind: 'hole', fileOffset: 0, length: 8 * KiB }], 3 * KiB)).toThrow(/allocation unit of 3072 bytes/);
    expect(() => planFill('/c', 8 * KiB, [{ kind: 'hole', fileOffset: 0, length: 8 * KiB }], 64 << 20)).toThrow(/allocation unit/);
  });

  it('runFill rewrites a real sparse file\'s holes with the bytes it reads there, a whole unit per write; the file is no longer sparse and reads the same', () => {
    const path = join(dir, 'sparse.img');
    const size = 1024 * KiB;
    const fd = openSync(path, 'w');
    ftruncateSync(fd, size);
    // data at 0, 68 KiB and 900 KiB: partly allocated units with holes around them
    for (const at of [0, 68 * KiB, 900 * KiB]) writeSync(fd, Buffer.alloc(4 * KiB, at / KiB + 1), 0, 4 * KiB, at);
    closeSync(fd);
    const before = readFileSync(path);
    const blocksBefore = fstatBlocks(path);
    // the file's extents as the host reports them (data where written, holes elsewhere)
    const ext: FileExtent[] = [];
    let at = 0;
    for (const d of [0, 68 * KiB, 900 * KiB]) {
      if (d > at) ext.push({ kind: 'hole', fileOffset: at, length: d - at });
      ext.push({ kind: 'data', fileOffset: d, length: 4 * KiB, deviceOffset: d });
      at = d + 4 * KiB;
    }
    ext.push({ kind: 'hole', fileOffset: at, length: size - at });
    const plan = planFill(path, size, ext, 64 * KiB)!;
    const f = fileOf(path);
    const checks = runFill(f, plan);
    f.close();
    expect(readFileSync(path).equals(before)).toBe(true);
    expect(fstatBlocks(path)).toBeGreaterThanOrEqual(size / 512);
    expect(blocksBefore).toBeLessThan(size / 512);
    // every write covers whole units, the last one ends at the file's end
    for (const w of f.writes) {
      expect(w.offset % (64 * KiB)).toBe(0);
      expect(w.length % (64 * KiB) === 0 || w.offset + w.length === size).toBe(true);
    }
    // the checks: each range's first and last unit, and they pass against the file itself
    expect(checks.map((c) => c.offset)).toEqual([0, 960 * KiB]);
    const device = bytesReader('device', new Uint8Array(readFileSync(path)));
    const whole: FileExtent[] = [{ kind: 'data', fileOffset: 0, length: size, deviceOffset: 0 }];
    expect(verifyFill(path, checks, layoutReader(path, size, whole, device))).toEqual([]);
  });

  it('verifyFill names a unit whose data the driver did not keep, and a range that is still a hole', () => {
    const size = 256 * KiB;
    const data = new Uint8Array(size);
    data.fill(7, 0, 4 * KiB);
    const path = join(dir, 'lost.img');
    writeFileSync(path, data);
    const plan = planFill(path, size, [{ kind: 'data', fileOffset: 0, length: 4 * KiB, deviceOffset: 0 }, { kind: 'hole', fileOffset: 4 * KiB, length: size - 4 * KiB }], 64 * KiB)!;
    const f = fileOf(path);
    const checks = runFill(f, plan);
    f.close();
    // what 6.12's ntfs3 did: the unit got new clusters, and the old cluster's data is gone
    const lost = new Uint8Array(size);
    const bad = verifyFill(path, checks, layoutReader(path, size, [{ kind: 'data', fileOffset: 0, length: size, deviceOffset: 0 }], bytesReader('device', lost)));
    expect(bad).toEqual([`${path}: bytes 0..65536 on the partition differ from what was written there through the driver`]);
    const hole = verifyFill(path, checks, layoutReader(path, size, [{ kind: 'data', fileOffset: 0, length: 4 * KiB, deviceOffset: 0 }, { kind: 'hole', fileOffset: 4 * KiB, length: size - 4 * KiB }], bytesReader('device', data)));
    expect(hole[0]).toMatch(/bytes 0\.\.65536 cannot be read from the partition where the file's records place them \(.*bytes 4096\.\.65536 are still a hole/);
  });
});

/** st_blocks: the 512-byte units the file occupies on this machine's filesystem. */
function fstatBlocks(path: string): number {
  const fd = openSync(path, 'r');
  try {
    return fstatSync(fd).blocks;
  } finally {
    closeSync(fd);
  }
}
