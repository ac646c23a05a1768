import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { validateMap } from '../../src/formats/extent-ops.ts';
import { vhdChecksum } from '../../src/formats/vhd.ts';
import { cleanupTmpDirs, expectMapAgreesWithQemu, expectMatchesQemu, expectSameBytes, expectSameBytesAsQemu, makeTmpDir, qemuImg, qemuIo, qemuRaw, qemuVirtualSize, readWholeImage } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;

/** Patterns, zeroes and discards that cross the 2 MiB block boundaries of qemu's VHDs (disks >= 12 MiB). */
const WRITES = [
  'write -P 0xa1 0 4k',
  'write -P 0xb2 1536k 1M', // ends inside block 1
  'write -P 0xc3 6143k 2k', // straddles the 6 MiB block boundary
  'write -z 2M 512', // zeroes inside an allocated block
  'write -P 0xd4 9M 512',
  'discard 9M 2M',
];

function vpc(dir: string, name: string, size: string, opts: string[] = [], writes = WRITES): string {
  const p = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'vpc', ...(opts.length ? ['-o', opts.join(',')] : []), p, size);
  if (writes.length) qemuIo(p, 'vpc', writes);
  return p;
}

describe('VHD read by vdboot matches qemu-img', () => {
  const dir = makeTmpDir();

  it('dynamic VHD (creator qemu, CHS size): bytes and map agree with qemu across block boundaries', () => {
    const img = expectMatchesQemu(vpc(dir, 'dyn.vhd', '12M'));
    expect(img.layers[0]!.layer.subformat).toBe('dynamic');
    expect(img.layers[0]!.layer.details['size rule']).toMatch(/CHS/);
    // unallocated blocks read as zero and are marked so (rw must not map them to dm-zero)
    expect(img.map.extents.some((e) => e.kind === 'zero' && e.why === 'unallocated')).toBe(true);
  });

  it('dynamic VHD with force_size (creator qem2): size is current_size, not CHS', () => {
    const p = vpc(dir, 'force.vhd', '10000384', ['force_size=on'], WRITES.slice(0, 4));
    const img = expectMatchesQemu(p);
    expect(img.map.size).toBe(10000384);
    expect(img.layers[0]!.layer.details['size rule']).toMatch(/current_size/);
  });

  it('dynamic VHD, size not a whole number of blocks: last partial block maps only up to the end', () => {
    const img = expectMatchesQemu(vpc(dir, 'odd.vhd', '5000k', [], ['write -P 0x5a 4M 904k']));
    const last = img.map.extents[img.map.extents.length - 1]!;
    expect(last.start + last.length).toBe(img.map.size);
  });

  it('empty dynamic VHD: the whole disk is one unallocated zero extent', () => {
    const img = expectMatchesQemu(vpc(dir, 'empty.vhd', '64M', [], []));
    expect(img.map.extents).toEqual([{ kind: 'zero', start: 0, length: img.map.size, why: 'unallocated' }]);
  });

  for (const force of [false, true]) {
    it(`fixed VHD${force ? ' with force_size' : ''}: one data extent at offset 0; qemu shows the footer as an extra sector`, () => {
      const p = vpc(dir, `fixed${force}.vhd`, '7M', ['subformat=fixed', ...(force ? ['force_size=on'] : [])], WRITES.slice(0, 4));
      const img = openHostImage(p);
      try {
        validateMap(img.map, { fileSizes: img.readers.map((r) => r.size) });
        expect(img.map.extents).toEqual([{ kind: 'data', start: 0, length: img.map.size, file: 0, offset: 0 }]);
        // qemu's vpc driver exposes a fixed image's footer as the disk's last 512 bytes
        const oracle = qemuRaw(p);
        expect(oracle.length).toBe(img.map.size + 512);
        expect(oracle.subarray(oracle.length - 512, oracle.length - 504).toString()).toBe('conectix');
        expectSameBytes(readWholeImage(img), oracle.subarray(0, img.map.size), p);
        expectMapAgreesWithQemu(img, p);
      } finally {
        img.close();
      }
    });
  }
});

describe('VHD damage is refused with a FormatError', () => {
  const dir = makeTmpDir();

  function damaged(name: string, patch: (b: Buffer) => void): string {
    const p = vpc(dir, name, '8M', [], ['write -P 0x11 0 3M']);
    const b = fs.readFileSync(p);
    patch(b);
    fs.writeFileSync(p, b);
    return p;
  }
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

  it('a wrong footer checksum (both copies) names the checksum', () => {
    const p = damaged('badsum.vhd', (b) => {
      b[b.length - 512 + 64] ^= 1;
      b[64] ^= 1;
    });
    expectRefused(p, /footer checksum/);
  });

  it('a damaged end footer falls back to the copy at offset 0', () => {
    const p = damaged('endbad.vhd', (b) => { b[b.length - 512 + 64] ^= 1; });
    const img = openHostImage(p);
    try {
      expectSameBytes(readWholeImage(img), qemuRaw(p), p);
    } finally {
      img.close();
    }
  });

  it('a wrong dynamic header checksum is refused', () => {
    expectRefused(damaged('dynsum.vhd', (b) => { b[512 + 36] ^= 1; }), /dynamic header checksum/);
  });

  it('two BAT entries pointing at the same block are refused (a write to one would change the other)', () => {
    const p = damaged('batsame.vhd', (b) => { b.writeUInt32BE(b.readUInt32BE(1536), 1536 + 4); });
    expectRefused(p, /same bytes/);
  });

  it('a BAT entry whose data would lie on the dynamic header and BAT is refused', () => {
    // block 0 -> sector 0: its bitmap is the footer copy (bits of "conectix"), its data the header and BAT
    const p = damaged('batmeta.vhd', (b) => { b.writeUInt32BE(0, 1536); });
    expectRefused(p, /own (dynamic header|BAT|footer)/);
  });

  it('a BAT entry past the end of the file is refused as truncated', () => {
    expectRefused(damaged('batpast.vhd', (b) => { b.writeUInt32BE(0x7fffff00, 1536); }), /truncated|past the end/);
  });

  it('a block size that is not a power of two is refused (header checksum fixed up)', () => {
    const p = damaged('bs.vhd', (b) => {
      b.writeUInt32BE(3 * MiB, 512 + 32);
      b.writeUInt32BE(vhdChecksum(b.subarray(512, 1536), 36), 512 + 36);
    });
    expectRefused(p, /block size/);
  });
});

describe('VHD size by creator application', () => {
  const dir = makeTmpDir();
  // current_size 10,000,384 bytes; the geometry written below, 287/4/17, covers 9,992,192 of them
  const proto = vpc(dir, 'proto.vhd', '10000384', ['force_size=on'], ['write -P 0x11 9M 512']);
  const GEOMETRY: [number, number, number] = [287, 4, 17];
  const CHS_BYTES = GEOMETRY[0] * GEOMETRY[1] * GEOMETRY[2] * 512;

  function withCreator(name: string, creator: string, geometry: [number, number, number] = GEOMETRY): string {
    const p = path.join(dir, name);
    const b = fs.readFileSync(proto);
    for (const at of [0, b.length - 512]) {
      b.write(creator, at + 28, 'latin1');
      b.writeUInt16BE(geometry[0], at + 56);
      b[at + 58] = geometry[1];
      b[at + 59] = geometry[2];
      b.writeUInt32BE(vhdChecksum(b.subarray(at, at + 512), 64), at + 64);
    }
    fs.writeFileSync(p, b);
    return p;
  }

  for (const [creator, rule] of [['vpc ', 'CHS'], ['qemu', 'CHS'], ['win ', 'current_size'], ['qem2', 'current_size'], ['d2v ', 'current_size'], ['CTXS', 'current_size'], ['tap\0', 'current_size']] as const) {
    it(`creator "${creator}" is sized by ${rule}, as qemu sizes it`, () => {
      const p = withCreator(`c-${creator.replace(/\W/g, '_')}.vhd`, creator);
      const img = openHostImage(p);
      try {
        expect(img.map.size).toBe(rule === 'CHS' ? CHS_BYTES : 10_000_384);
        expect(img.map.size).toBe(qemuVirtualSize(p));
        expectSameBytesAsQemu(img, p);
      } finally {
        img.close();
      }
    });
  }

  it('a CHS geometry at its maximum (65535/16/255) means current_size whatever the creator', () => {
    const img = openHostImage(withCreator('maxchs.vhd', 'vpc ', [65535, 16, 255]));
    expect(img.map.size).toBe(10_000_384);
    img.close();
  });

  it('Disk2vhd\'s "d2v\\0" creator is sized by current_size, as Windows mounts it', () => {
    const img = openHostImage(withCreator('d2vnul.vhd', 'd2v\0'));
    expect(img.map.size).toBe(10_000_384);
    img.close();
  });
});

