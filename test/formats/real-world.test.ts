/**
 * Images made by Virtual PC, Hyper-V, Disk2vhd, Windows and fuzzers
 * (test/data/real-world/README.md says what each must do).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { readerFor } from '../../src/formats/detect.ts';
import { summarizeMap, validateMap } from '../../src/formats/extent-ops.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { vhdChecksum } from '../../src/formats/vhd.ts';
import { cleanupTmpDirs, expectSameBytes, expectSameBytesAsQemu, makeTmpDir, qemuImg, qemuIo, qemuRaw, readWholeImage } from '../kit/oracle.ts';
import { REAL_WORLD_DIR, realWorld } from '../kit/data.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(() => { dir = makeTmpDir(); });
afterAll(cleanupTmpDirs);

function open(name: string) {
  return openHostImage(realWorld(name, dir));
}

/** Expects a FormatError matching `re`. */
function expectFormatError(p: string, re: RegExp): FormatErrorLike {
  let err: unknown;
  try {
    openHostImage(p).close();
  } catch (e) {
    err = e;
  }
  expect(isFormatError(err), `${p}: ${String(err)}`).toBe(true);
  expect((err as Error).message).toMatch(re);
  return err as FormatErrorLike;
}
type FormatErrorLike = Error & { field?: string };

describe('real-world VHD', () => {
  it('Virtual PC dynamic VHD: size from CHS geometry, 136,363,130,880 bytes, empty BAT', () => {
    const img = open('virtualpc-dynamic.vhd.bz2');
    try {
      expect(img.map.size).toBe(136_363_130_880);
      expect(img.layers[0]!.layer.subformat).toBe('dynamic');
      expect(img.map.extents).toEqual([{ kind: 'zero', start: 0, length: 136_363_130_880, why: 'unallocated' }]);
    } finally {
      img.close();
    }
  });

  it('Hyper-V 2012 R2 dynamic VHD: size is current_size, 136,365,211,648 bytes, empty BAT', () => {
    const img = open('hyperv2012r2-dynamic.vhd.bz2');
    try {
      expect(img.map.size).toBe(136_365_211_648);
      expect(img.map.extents).toEqual([{ kind: 'zero', start: 0, length: 136_365_211_648, why: 'unallocated' }]);
    } finally {
      img.close();
    }
  });

  it('Disk2vhd dynamic VHD: 263,454,720 bytes, 126 allocated blocks, the last cut at the disk end; bytes equal qemu', () => {
    const p = realWorld('d2v-zerofilled.vhd.bz2', dir);
    const img = openHostImage(p);
    try {
      expect(img.map.size).toBe(263_454_720);
      expect(img.layers[0]!.layer.details['allocated blocks']).toBe(126);
      validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
      const last = img.map.extents[img.map.extents.length - 1]!;
      expect(last.kind).toBe('data');
      expect(last.start + last.length).toBe(263_454_720);
      expect(last.length).toBeLessThan(2 * MiB);
      expectSameBytesAsQemu(img, p);
    } finally {
      img.close();
    }
  });

  it('ext2.vhd holds the same 4 MiB ext2 volume as ext2.qcow2 (qemu reads the qcow2)', () => {
    const img = open('ext2.vhd.xz');
    try {
      const ours = Buffer.from(readMapped(img, 0, 4 * MiB));
      expectSameBytes(ours, qemuRaw(realWorld('ext2.qcow2.xz', dir)), 'ext2.vhd vs ext2.qcow2');
      expect(ours.readUInt16LE(1024 + 56)).toBe(0xef53); // ext2 magic
    } finally {
      img.close();
    }
  });

  it('image.vhd (wrong footer checksum): a FormatError naming the checksum', () => {
    expectFormatError(realWorld('image.vhd.xz', dir), /footer checksum/);
  });

  it('image-differential.vhd (bad checksums, no locators): a FormatError', () => {
    expectFormatError(realWorld('image-differential.vhd.xz', dir), /checksum|parent/);
  });

  it('fat-differential.vhd without its parent: the error names the missing fat-parent.vhd', () => {
    expectFormatError(realWorld('fat-differential.vhd.xz', dir), /fat-parent\.vhd/);
  });

  it('fat-differential.vhd over a parent with its UUID: block 0 is 18 sectors of the child, the rest the parent', () => {
    const child = realWorld('fat-differential.vhd.xz', dir);
    const c = fs.readFileSync(child);
    const footer = c.subarray(c.length - 512);
    const size = Number(footer.readBigUInt64BE(48));
    const header = c.subarray(Number(footer.readBigUInt64BE(16)), Number(footer.readBigUInt64BE(16)) + 1024);
    const parentUuid = header.subarray(40, 56);
    // a parent made by qemu, given the UUID the child expects
    const parent = path.join(dir, 'fat-parent.vhd');
    qemuImg('create', '-q', '-f', 'vpc', '-o', 'force_size=on', parent, String(size));
    qemuIo(parent, 'vpc', ['write -P 0x5a 0 1M', 'write -P 0x6b 3M 1M']);
    const p = fs.readFileSync(parent);
    const parentRaw = qemuRaw(parent);
    for (const at of [0, p.length - 512]) {
      parentUuid.copy(p, at + 68);
      p.writeUInt32BE(vhdChecksum(p.subarray(at, at + 512), 64), at + 64);
    }
    fs.writeFileSync(parent, p);

    // expected: the parent, with the child's sectors whose bitmap bit is set (MSB first)
    const expected = Buffer.from(parentRaw);
    const bat = Number(header.readBigUInt64BE(16));
    const blockSize = header.readUInt32BE(32);
    const bitmapSize = Math.ceil(blockSize / 512 / 8 / 512) * 512;
    let childSectors = 0;
    for (let k = 0; k * blockSize < size; k++) {
      const e = c.readUInt32BE(bat + 4 * k);
      if (e === 0xffffffff) continue;
      for (let s = 0; s < blockSize / 512 && k * blockSize + s * 512 < size; s++) {
        if ((c[e * 512 + (s >> 3)]! >> (7 - (s & 7))) & 1) {
          c.copy(expected, k * blockSize + s * 512, e * 512 + bitmapSize + s * 512, e * 512 + bitmapSize + s * 512 + 512);
          childSectors++;
        }
      }
    }
    expect(childSectors).toBe(18);

    const img = openHostImage(child);
    try {
      expect(img.layers.map((l) => path.basename(l.path))).toEqual(['fat-differential.vhd', 'fat-parent.vhd']);
      validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
      expectSameBytes(readWholeImage(img), expected, child);
      const s = summarizeMap(img.map);
      expect(s.dataBytesByFile[img.layers[0]!.fileIndex[0]!]).toBe(18 * 512);
    } finally {
      img.close();
      fs.rmSync(parent);
    }
  });
});

describe('real-world VHDX', () => {
  it('Hyper-V dynamic VHDX: 1 GiB, 32 MiB blocks, 4 KiB physical sectors, 3 present + 29 zero blocks, 0xa5 then 0x96', () => {
    const p = realWorld('iotest-dynamic-1G.vhdx.bz2', dir);
    const img = openHostImage(p);
    try {
      const d = img.layers[0]!.layer.details;
      expect(img.map.size).toBe(1024 * MiB);
      expect(d['block size']).toBe(32 * MiB);
      expect(d['physical sector size']).toBe(4096);
      expect(d['blocks fully present']).toBe(3);
      expect(d['blocks zero']).toBe(29);
      // qemu-io checks the same patterns (read -P fails on a mismatch), so both readers agree
      const ranges: [number, number, number][] = [[0, 33 * MiB, 0xa5], [33 * MiB, 33 * MiB, 0x96], [66 * MiB, 958 * MiB, 0]];
      qemuIo(p, 'vhdx', ranges.map(([off, len, b]) => `read -P 0x${b.toString(16)} ${off} ${len}`));
      for (const [off, len, b] of ranges) {
        for (let pos = off; pos < off + len; pos += 32 * MiB) {
          const chunk = readMapped(img, pos, Math.min(32 * MiB, off + len - pos));
          const same = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length).equals(Buffer.alloc(chunk.length, b));
          expect(same, `bytes at ${pos}.. are 0x${b.toString(16)}`).toBe(true);
        }
      }
    } finally {
      img.close();
    }
  });

  it('Disk2vhd VHDX with two headers of the same sequence number: all 128 blocks present, bytes equal qemu', () => {
    const p = realWorld('test-disk2vhd.vhdx.bz2', dir);
    const img = openHostImage(p);
    try {
      expect(img.map.size).toBe(256 * MiB);
      expect(img.layers[0]!.layer.details['blocks fully present']).toBe(128);
      expect(img.map.extents.every((e) => e.kind === 'data')).toBe(true);
      expectSameBytesAsQemu(img, p);
    } finally {
      img.close();
    }
  });

  it('VHDX whose log needs replaying: read through its log, never as-is (test/formats/vhdx-log.test.ts compares it with qemu\'s replay)', () => {
    const img = openHostImage(realWorld('iotest-dirtylog-10G-4M.vhdx.bz2', dir));
    try {
      expect(img.layers[0]!.layer.details.log).toMatch(/^1 entry .* replayed in memory$/);
      expect(img.layers[0]!.layer.logReplay!.writes.length).toBe(1);
    } finally {
      img.close();
    }
  });
});

describe('fuzzer-made images fail quickly with a FormatError', () => {
  it('afl5.img', () => {
    const err = expectFormatError(realWorld('afl5.img.bz2', dir), /./);
    expect(err.message.length).toBeGreaterThan(20);
  });

  it.skipIf(!readerFor('vmdk'))('afl9.vmdk (needs the VMDK reader registered)', () => {
    const err = expectFormatError(realWorld('afl9.vmdk.bz2', dir), /./);
    expect(err.message.length).toBeGreaterThan(20);
  });
});

describe('every real-world sample that opens gives a valid map', () => {
  const names = fs.readdirSync(REAL_WORLD_DIR).filter((n) => /\.(bz2|xz)$/.test(n));
  it.each(names)('%s', (name) => {
    const p = realWorld(name, dir);
    try {
      const img = openHostImage(p);
      try {
        validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
      } finally {
        img.close();
      }
    } catch (e) {
      expect(isFormatError(e), String(e)).toBe(true);
    }
  });
});
