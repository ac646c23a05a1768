import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { currentHeader, fixHeaderCrc, makeDifferencing, vhdxLayout } from './vhdx-patch.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { cleanupTmpDirs, expectMatchesQemu, expectSameBytes, makeTmpDir, qemuImg, qemuIo, qemuRaw, readWholeImage } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

afterAll(cleanupTmpDirs);

const KiB = 1024;
const MiB = 1024 * 1024;

interface Write { kind: 'P' | 'z'; off: number; len: number; pattern?: number }

function qemuIoCommands(writes: Write[]): string[] {
  return writes.map((w) => (w.kind === 'P' ? `write -P 0x${w.pattern!.toString(16)} ${w.off} ${w.len}` : `write -z ${w.off} ${w.len}`));
}

function vhdx(dir: string, name: string, size: number, opts: string[], writes: Write[]): string {
  const p = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'vhdx', ...(opts.length ? ['-o', opts.join(',')] : []), p, String(size));
  if (writes.length) qemuIo(p, 'vhdx', qemuIoCommands(writes));
  return p;
}

/** Writes crossing block boundaries for a given block size. */
function boundaryWrites(bs: number, size: number): Write[] {
  const w: Write[] = [
    { kind: 'P', off: 0, len: 4 * KiB, pattern: 0xa1 },
    { kind: 'P', off: bs - 2 * KiB, len: 4 * KiB, pattern: 0xb2 }, // straddles blocks 0|1
    { kind: 'z', off: 3 * bs - 512, len: 1024 }, // zeroes straddling 2|3
    { kind: 'P', off: 5 * bs + bs / 2, len: bs, pattern: 0xc3 }, // half of 5, half of 6
  ];
  return w.filter((x) => x.off + x.len <= size);
}

function touchedBlocks(writes: Write[], bs: number): Set<number> {
  const s = new Set<number>();
  for (const w of writes) for (let b = Math.floor(w.off / bs); b * bs < w.off + w.len; b++) s.add(b);
  return s;
}

describe('VHDX read by vdboot matches qemu-img', () => {
  const dir = makeTmpDir();
  const cases: { name: string; size: number; opts: string[]; bs: number }[] = [
    { name: 'default options', size: 40 * MiB, opts: [], bs: 0 },
    { name: 'block_size=1M', size: 24 * MiB, opts: ['block_size=1M'], bs: MiB },
    { name: 'block_size=1M, block_state_zero=off', size: 24 * MiB, opts: ['block_size=1M', 'block_state_zero=off'], bs: MiB },
    { name: 'block_size=32M', size: 200 * MiB, opts: ['block_size=32M'], bs: 32 * MiB },
    { name: 'block_size=256M (disk not a multiple of the block)', size: 300 * MiB, opts: ['block_size=256M'], bs: 256 * MiB },
    { name: 'log_size=4M', size: 24 * MiB, opts: ['log_size=4M', 'block_size=2M'], bs: 2 * MiB },
    { name: 'subformat=fixed', size: 16 * MiB, opts: ['subformat=fixed', 'block_size=1M'], bs: MiB },
  ];
  for (const c of cases) {
    it(`dynamic/fixed VHDX, ${c.name}: bytes agree with qemu; data exactly where blocks were written`, () => {
      const bs = c.bs || 8 * MiB;
      const writes = boundaryWrites(bs, c.size);
      const p = vhdx(dir, `${c.name.replace(/\W+/g, '_')}.vhdx`, c.size, c.opts, writes);
      const img = expectMatchesQemu(p);
      const layer = img.layers[0]!.layer;
      const blockSize = Number(layer.details['block size']);
      if (c.bs) expect(blockSize).toBe(c.bs);
      // qemu-img map reports VHDX as all data without offsets, so check allocation against the writes
      const touched = touchedBlocks(writes, blockSize);
      for (const e of img.map.extents) {
        for (let b = Math.floor(e.start / blockSize); b * blockSize < e.start + e.length; b++) {
          expect(e.kind === 'data', `block ${b} (${JSON.stringify(e)})`).toBe(touched.has(b));
        }
      }
    });
  }

  it('fixed VHDX with block_state_zero=off: every block present, merged into one data extent', () => {
    const p = vhdx(dir, 'fixed-full.vhdx', 16 * MiB, ['subformat=fixed', 'block_size=1M', 'block_state_zero=off'], [{ kind: 'P', off: MiB - 512, len: 1024, pattern: 0x77 }]);
    const img = expectMatchesQemu(p);
    expect(img.layers[0]!.layer.subformat).toBe('fixed');
    expect(img.map.extents).toHaveLength(1);
    expect(img.map.extents[0]!.kind).toBe('data');
  });

  it('4096-byte logical sectors: the same bytes (metadata item patched from 512 to 4096)', () => {
    const p = vhdx(dir, 'lss4k.vhdx', 24 * MiB, ['block_size=1M'], boundaryWrites(MiB, 24 * MiB));
    const before = qemuRaw(p);
    const b = fs.readFileSync(p);
    const { metaOffset, items } = vhdxLayout(b);
    const lss = items.find((i) => i.guid === '8141bf1d-a96f-4709-ba47-f233a8faab5f')!;
    b.writeUInt32LE(4096, metaOffset + lss.offset);
    fs.writeFileSync(p, b);
    // qemu refuses to open the patched image, so the oracle is its raw output from before the patch
    const img = openHostImage(p);
    try {
      expect(img.layers[0]!.layer.details['logical sector size']).toBe(4096);
      expectSameBytes(readWholeImage(img), before, p);
    } finally {
      img.close();
    }
  });
});

describe('VHDX larger than one chunk (sector-bitmap entries interleaved in the BAT)', () => {
  it('blocks after the first chunk (4 GiB with 512-byte sectors) are found past the bitmap entry', () => {
    const dir = makeTmpDir();
    const p = path.join(dir, 'big.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', p, '6G');
    qemuIo(p, 'vhdx', ['write -P 0x11 0 1M', 'write -P 0x22 4095M 2M', 'write -P 0x33 5G 512k']);
    const img = openHostImage(p);
    try {
      const data = img.map.extents.filter((e) => e.kind === 'data').map((e) => [e.start / MiB, e.length / MiB]);
      expect(data).toEqual([[0, 1], [4095, 2], [5120, 1]]);
      // the bytes around the chunk boundary and at 5 GiB: qemu-io checks the same patterns (read -P fails on a mismatch)
      const ranges: [number, number, number][] = [[0, MiB, 0x11], [4094 * MiB, MiB, 0], [4095 * MiB, 2 * MiB, 0x22], [4097 * MiB, MiB, 0], [5 * 1024 * MiB, 512 * 1024, 0x33], [5 * 1024 * MiB + 512 * 1024, 512 * 1024, 0]];
      qemuIo(p, 'vhdx', ranges.map(([off, len, b]) => `read -P 0x${b.toString(16)} ${off} ${len}`));
      for (const [off, len, b] of ranges) {
        expectSameBytes(Buffer.from(readMapped(img, off, len)), Buffer.alloc(len, b), `${p} at ${off}`);
      }
    } finally {
      img.close();
    }
  });
});

describe('differencing VHDX', () => {
  const dir = makeTmpDir();
  const size = 16 * MiB;
  const parentPath = vhdx(dir, 'parent.vhdx', size, ['block_size=1M'], [{ kind: 'P', off: 0, len: size, pattern: 0x11 }]);
  const childPath = vhdx(dir, 'child.vhdx', size, ['block_size=1M', 'block_state_zero=off'], [
    { kind: 'P', off: 0, len: 6 * MiB, pattern: 0x22 },
  ]);
  const parentRaw = qemuRaw(parentPath);
  const childRaw = qemuRaw(childPath);
  const parentGuid = currentHeader(fs.readFileSync(parentPath)).dataWriteGuid;
  // block 0 full, 1 not present (parent), 2 partially present, 3 zero, 4 unmapped, 5 full, 6 undefined, 7.. parent
  const states = new Map([[1, 0], [2, 7], [3, 2], [4, 3], [6, 1]]);
  const present = (blk: number, s: number) => blk === 2 && (s < 1000 || (s >= 1500 && s % 3 === 0));
  makeDifferencing(childPath, parentGuid, 'parent.vhdx', states, present);

  function expected(): Buffer {
    const out = Buffer.from(parentRaw);
    for (let blk = 0; blk < 16; blk++) {
      const at = blk * MiB;
      if (blk === 0 || blk === 5) childRaw.copy(out, at, at, at + MiB);
      else if (blk === 3 || blk === 4 || blk === 6) out.fill(0, at, at + MiB);
      else if (blk === 2) for (let s = 0; s < 2048; s++) if (present(2, s)) childRaw.copy(out, at + s * 512, at + s * 512, at + s * 512 + 512);
    }
    return out;
  }

  it('partially present blocks map sector run by sector run to the child or the parent', () => {
    const img = openHostImage(childPath);
    try {
      expect(img.layers.map((l) => path.basename(l.path))).toEqual(['child.vhdx', 'parent.vhdx']);
      expect(img.layers[0]!.layer.subformat).toBe('differencing');
      expectSameBytes(readWholeImage(img), expected(), childPath);
      // block 2: runs alternate between the two files
      const inBlock2 = img.map.extents.filter((e) => e.start >= 2 * MiB && e.start < 3 * MiB && e.kind === 'data');
      const files = new Set(inBlock2.map((e) => (e.kind === 'data' ? img.map.files[e.file] : '')));
      expect(files.size).toBe(2);
      expect(img.map.extents.filter((e) => e.start >= 3 * MiB && e.start < 5 * MiB).every((e) => e.kind === 'zero')).toBe(true);
    } finally {
      img.close();
    }
  });

  it('a parent modified after the child was made is refused by its data write GUID', () => {
    const copyDir = makeTmpDir();
    fs.copyFileSync(childPath, path.join(copyDir, 'child.vhdx'));
    fs.copyFileSync(parentPath, path.join(copyDir, 'parent.vhdx'));
    qemuIo(path.join(copyDir, 'parent.vhdx'), 'vhdx', ['write -P 0x33 0 512']);
    let err: unknown;
    try {
      openHostImage(path.join(copyDir, 'child.vhdx')).close();
    } catch (e) {
      err = e;
    }
    expect(isFormatError(err)).toBe(true);
    expect((err as Error).message).toMatch(/not its parent/);
  });

  it('a missing parent is named in the error', () => {
    const copyDir = makeTmpDir();
    fs.copyFileSync(childPath, path.join(copyDir, 'child.vhdx'));
    expect(() => openHostImage(path.join(copyDir, 'child.vhdx'))).toThrow(/parent.vhdx/);
  });
});

describe('VHDX headers', () => {
  const dir = makeTmpDir();

  function expectRefused(p: string, re: RegExp): void {
    let err: unknown;
    try {
      openHostImage(p).close();
    } catch (e) {
      err = e;
    }
    expect(isFormatError(err), String(err)).toBe(true);
    expect((err as Error).message).toMatch(re);
  }

  it('a header with a bad CRC-32C is skipped; the other header is used', () => {
    const p = vhdx(dir, 'h1.vhdx', 8 * MiB, ['block_size=1M'], [{ kind: 'P', off: 0, len: MiB, pattern: 0x42 }]);
    const b = fs.readFileSync(p);
    const cur = currentHeader(b);
    b[cur.offset + 100] ^= 0xff; // inside the header, not fixing the CRC
    fs.writeFileSync(p, b);
    const img = openHostImage(p);
    try {
      expect(img.layers[0]!.layer.details['header sequence']).not.toBe(cur.sequence.toString());
      expectSameBytes(readWholeImage(img), qemuRaw(p), p);
    } finally {
      img.close();
    }
  });

  it('the valid header with the highest sequence number wins', () => {
    const p = vhdx(dir, 'h2.vhdx', 8 * MiB, ['block_size=1M'], []);
    const b = fs.readFileSync(p);
    const cur = currentHeader(b);
    const other = cur.offset === 64 * KiB ? 128 * KiB : 64 * KiB;
    b.writeBigUInt64LE(cur.sequence + 5n, other + 8);
    b.fill(0xab, other + 32, other + 48); // a distinguishable DataWriteGuid
    fixHeaderCrc(b, other);
    fs.writeFileSync(p, b);
    const img = openHostImage(p);
    expect(img.layers[0]!.layer.details['header sequence']).toBe((cur.sequence + 5n).toString());
    expect(img.layers[0]!.layer.id).toBe('abababab-abab-abab-abab-abababababab');
    img.close();
  });

  it('both headers damaged: refused, naming the headers', () => {
    const p = vhdx(dir, 'h3.vhdx', 8 * MiB, [], []);
    const b = fs.readFileSync(p);
    b[64 * KiB + 100] ^= 1;
    b[128 * KiB + 100] ^= 1;
    fs.writeFileSync(p, b);
    expectRefused(p, /neither VHDX header/);
  });

  it('a header whose log GUID is set but whose log holds no entry of it: nothing to replay, read as qemu reads it', () => {
    const p = vhdx(dir, 'log.vhdx', 8 * MiB, ['block_size=1M'], [{ kind: 'P', off: MiB, len: MiB, pattern: 0x5d }]);
    const b = fs.readFileSync(p);
    const cur = currentHeader(b);
    b.fill(0x5c, cur.offset + 48, cur.offset + 64);
    fixHeaderCrc(b, cur.offset);
    fs.writeFileSync(p, b);
    const img = openHostImage(p);
    try {
      expect(img.layers[0]!.layer.details.log).toBe('no valid entries');
      expectSameBytes(readWholeImage(img), qemuRaw(p), p);
    } finally {
      img.close();
    }
  });

  it('a log of a version other than 0 is refused with the replay advice', () => {
    const p = vhdx(dir, 'logv1.vhdx', 8 * MiB, [], []);
    const b = fs.readFileSync(p);
    const cur = currentHeader(b);
    b.fill(0x5c, cur.offset + 48, cur.offset + 64);
    b.writeUInt16LE(1, cur.offset + 64);
    fixHeaderCrc(b, cur.offset);
    fs.writeFileSync(p, b);
    expectRefused(p, /log that must be replayed.*log version is 1.*qemu-img check -r all/s);
  });

  it('a BAT entry pointing into the metadata region is refused', () => {
    const p = vhdx(dir, 'batmeta.vhdx', 8 * MiB, ['block_size=1M'], [{ kind: 'P', off: 0, len: MiB, pattern: 0x42 }]);
    const b = fs.readFileSync(p);
    const { batOffset, metaOffset } = vhdxLayout(b);
    b.writeUInt32LE(6 | ((metaOffset / MiB) << 20), batOffset);
    fs.writeFileSync(p, b);
    expectRefused(p, /metadata region/);
  });
});
