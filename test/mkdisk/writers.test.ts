/**
 * The image writers against qemu-img and vdboot's own readers: a raw disk with data
 * across block boundaries, in the last partial block and nowhere else, written in every
 * format, passes `qemu-img check`, has the raw disk's size, converts back to the same
 * bytes with qemu-img and reads back the same through vdboot, and allocates only the
 * blocks that hold data.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OUTPUT_FORMATS, writeImage, type OutputFormat } from '../../src/formats/writers/index.ts';
import { openFileSink, openRawSource, randomIdentity } from '../../mkdisk/image-file.ts';
import { cleanupTmpDirs, expectSameBytes, makeTmpDir, qemuImg, qemuIo, readWholeImage, run } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

const QEMU_FORMAT: Record<OutputFormat, string> = { raw: 'raw', vhd: 'vpc', 'vhd-fixed': 'vpc', vhdx: 'vhdx', vdi: 'vdi', vmdk: 'vmdk', qcow2: 'qcow2' };
const EXT: Record<OutputFormat, string> = { raw: 'img', vhd: 'vhd', 'vhd-fixed': 'vhd', vhdx: 'vhdx', vdi: 'vdi', vmdk: 'vmdk', qcow2: 'qcow2' };
const MiB = 1024 * 1024;

let dir: string;

beforeAll(() => {
  dir = makeTmpDir();
});
afterAll(() => cleanupTmpDirs());

/** A sparse raw disk of `size` bytes with qemu-io writes. */
function rawDisk(name: string, size: number, writes: string[]): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, size);
  if (writes.length) qemuIo(f, 'raw', writes);
  return f;
}

function writeAs(format: OutputFormat, rawFile: string, tag: string) {
  const src = openRawSource(rawFile);
  const out = path.join(dir, `${tag}-${format}.${EXT[format]}`);
  const sink = openFileSink(out);
  try {
    const result = writeImage(format, src, sink, { identity: randomIdentity(1_700_000_000), fileName: path.basename(out) });
    return { out, result, ranges: src.ranges };
  } finally {
    sink.close();
    src.close();
  }
}

function qemuBytes(image: string, format: OutputFormat): Buffer {
  const out = path.join(dir, `oracle-${path.basename(image)}.raw`);
  run('qemu-img', ['convert', '-f', QEMU_FORMAT[format], '-O', 'raw', image, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

// 70 MiB + 4 KiB: not a multiple of any format's block, so the last block is partial.
const SIZE = 70 * MiB + 4096;
const WRITES = [
  'write -P 0x11 0 4096',                 // the first sector (a partition table's place)
  `write -P 0x22 ${2 * MiB - 4096} 8192`, // across a 2 MiB (VHD/VHDX) and 1 MiB (VDI) boundary
  `write -P 0x33 ${33 * MiB} 300k`,       // several 64 KiB grains/clusters
  `write -P 0x44 ${SIZE - 4096} 4096`,    // the partial last block
];

describe.each(OUTPUT_FORMATS)('%s writer', (format) => {
  it(`${format}: qemu-img checks it, sees the same size and bytes, and vdboot reads the same bytes`, () => {
    const raw = rawDisk(`src-${format}.raw`, SIZE, WRITES);
    const want = fs.readFileSync(raw);
    const { out, result } = writeAs(format, raw, 'data');
    if (['vdi', 'vhdx', 'vmdk', 'qcow2'].includes(format)) {
      expect(qemuImg('check', '-f', QEMU_FORMAT[format], out)).toMatch(/No errors were found/);
    }
    const info = JSON.parse(qemuImg('info', '--output=json', '-f', QEMU_FORMAT[format], out)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(SIZE);
    expectSameBytes(qemuBytes(out, format), want, `${format} through qemu-img`);
    const img = openHostImage(out);
    try {
      expect(img.layers[0]!.layer.format).toBe(format === 'vhd-fixed' ? 'vhd' : format);
      expectSameBytes(readWholeImage(img), want, `${format} through vdboot`);
    } finally {
      img.close();
    }
    expect(fs.statSync(out).size).toBe(result.fileSize);
    if (!['raw', 'vhd-fixed'].includes(format)) {
      // Only blocks with data are in the file: four regions, each at most two blocks.
      expect(result.blocksWritten).toBeLessThanOrEqual(4 * 2 + Math.ceil(300 * 1024 / result.blockSize));
      expect(result.fileSize).toBeLessThan(SIZE / 2);
    }
  });

  it(`${format}: an all-zero disk gives a valid image with no data blocks`, () => {
    const raw = rawDisk(`empty-${format}.raw`, 8 * MiB, []);
    const { out, result } = writeAs(format, raw, 'empty');
    expect(result.blocksWritten).toBe(0);
    if (['vdi', 'vhdx', 'vmdk', 'qcow2'].includes(format)) {
      expect(qemuImg('check', '-f', QEMU_FORMAT[format], out)).toMatch(/No errors were found/);
    }
    const back = qemuBytes(out, format);
    expect(back.length).toBe(8 * MiB);
    expect(back.equals(Buffer.alloc(8 * MiB))).toBe(true);
    const img = openHostImage(out);
    try {
      // raw and fixed VHD map their (holed) data area; the dynamic formats have nothing allocated.
      const dynamic = !['raw', 'vhd-fixed'].includes(format);
      expect(img.map.extents.every((e) => e.kind === 'zero')).toBe(dynamic);
    } finally {
      img.close();
    }
  });
});

describe('the raw source', () => {
  it('finds the non-zero 64 KiB chunks of a 16 GiB sparse disk (holes skipped through qemu-img map, zeros written into the file dropped)', () => {
    const raw = rawDisk('large.raw', 16 * 1024 * MiB, ['write -P 7 4096 512', 'write -z 1M 1M', `write -P 9 ${16 * 1024 * MiB - 70000} 70000`]);
    // A written but all-zero range (qemu-io -z on a raw file may allocate it) never becomes data.
    const zeros = fs.openSync(raw, 'r+');
    fs.writeSync(zeros, Buffer.alloc(256 * 1024), 0, 256 * 1024, 8 * MiB);
    fs.closeSync(zeros);
    const src = openRawSource(raw);
    try {
      const end = 16 * 1024 * MiB;
      expect(src.ranges).toEqual([
        { start: 0, length: 65536 },
        { start: end - 2 * 65536, length: 2 * 65536 },
      ]);
    } finally {
      src.close();
    }
    fs.rmSync(raw);
  });
});

describe('progress', () => {
  it('writers report progress over the data blocks, rising to the total', () => {
    const raw = rawDisk('progress.raw', 16 * MiB, ['write -P 1 0 3M', `write -P 2 ${10 * MiB} 1M`]);
    const src = openRawSource(raw);
    const sink = openFileSink(path.join(dir, 'progress.qcow2'));
    const seen: [number, number][] = [];
    try {
      writeImage('qcow2', src, sink, { identity: randomIdentity(0), fileName: 'progress.qcow2', progress: (d, t) => seen.push([d, t]) });
    } finally {
      sink.close();
      src.close();
    }
    expect(seen.length).toBe(64); // 4 MiB of data in 64 KiB clusters
    expect(seen.every(([d], i) => i === 0 || d > seen[i - 1]![0])).toBe(true);
    expect(seen[seen.length - 1]).toEqual([4 * MiB, 4 * MiB]);
  });
});

describe('VHD size rule', () => {
  it('a VHD whose size is not a CHS product still has that size for qemu and vdboot (maximum geometry means current_size)', () => {
    // 70 MiB + 4 KiB has no exact CHS geometry: qemu would round it down if the geometry were the specification's.
    const raw = rawDisk('chs.raw', SIZE, []);
    const { out } = writeAs('vhd', raw, 'chs');
    const footer = fs.readFileSync(out).subarray(0, 512);
    expect([footer.readUInt16BE(56), footer[58], footer[59]]).toEqual([65535, 16, 255]);
    const img = openHostImage(out);
    try {
      expect(img.map.size).toBe(SIZE);
    } finally {
      img.close();
    }
  });

  it('a VHD of an exact CHS size keeps the specification geometry', () => {
    const size = 1024 * 16 * 63 * 512; // cylinders 1024, 16 heads, 63 sectors
    const raw = rawDisk('chs-exact.raw', size, ['write -P 0x5a 0 512']);
    const { out } = writeAs('vhd', raw, 'chs-exact');
    const footer = fs.readFileSync(out).subarray(0, 512);
    expect([footer.readUInt16BE(56), footer[58], footer[59]]).toEqual([1024, 16, 63]);
    expect(JSON.parse(qemuImg('info', '--output=json', '-f', 'vpc', out))['virtual-size']).toBe(size);
  });
});
