import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { openVmdk, vmdkFormat } from '../../src/formats/vmdk.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { checkAgainstQemu, expectSameBytes, le32, makeTmpDir, patchFile, qemuImgIn, qemuIoIn, qemuRaw, readWholeImage } from '../kit/oracle.ts';
import { expectFormatError, openLayer } from '../kit/format.ts';
import { realWorld } from '../kit/data.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

let dir: string;
beforeAll(() => { dir = makeTmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

const MiB = 1 << 20;

const layerOf = (file: string) => openLayer(openVmdk, file);


/** Patterns, zero writes and discards across 64 KiB grain and 32 MiB grain-table boundaries. */
const WRITES = [
  'write -P 0x11 0 3k',
  'write -P 0x22 65024 2048',
  'write -P 0x33 200k 300k',
  'write -z 256k 64k',
  'discard 384k 64k',
  'write -P 0x44 4000k 100k',
];

function newVmdk(name: string, opts: string, size: string, writes = WRITES): string {
  const f = path.join(dir, name);
  qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-o', opts, f, size);
  if (writes.length) qemuIoIn(dir, f, writes, 'vmdk');
  return f;
}

function patterned(bytes: number, seed: number): Uint8Array {
  const b = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (i >> 12) % 4 === 1 ? 0 : ((i * 13) ^ (i >> 8) ^ seed) & 0xff;
  return b;
}

describe('VMDK reader against qemu-img', () => {
  for (const sub of ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    it(`subformat=${sub}: patterns, zero writes and discards read as qemu-img convert, map as qemu-img map`, () => {
      const f = newVmdk(`${sub}.vmdk`, `subformat=${sub}`, '5M');
      const img = checkAgainstQemu(f);
      expect(img.layers[0]!.layer.subformat).toBe(sub);
    });
  }

  for (const sub of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    it(`subformat=${sub} over 4 GiB: three extent files, writes across the 2 GiB file boundary`, () => {
      const f = newVmdk(`big-${sub}.vmdk`, `subformat=${sub}`, '4100M', ['write -P 0x51 0 64k', 'write -P 0x52 2047M 2M', 'write -P 0x53 4097M 1M']);
      const img = checkAgainstQemu(f);
      expect(img.layers[0]!.layer.files.length).toBe(4);
    });
  }

  for (const prealloc of ['falloc', 'full']) {
    it(`preallocation=${prealloc}: the preallocated file reads and maps as qemu-img says`, () => {
      const f = newVmdk(`pre-${prealloc}.vmdk`, `preallocation=${prealloc}`, '3M', WRITES.slice(0, 3));
      const img = checkAgainstQemu(f);
      expect(img.map.extents.some((e) => e.kind === 'data')).toBe(true);
    });
  }

  it('zeroed_grain=on: zero writes become zeroed grain entries, mapped as zero', () => {
    const f = newVmdk('zg.vmdk', 'zeroed_grain=on', '5M', [...WRITES, 'write -P 0x66 1M 128k', 'write -z 1M 128k']);
    const img = checkAgainstQemu(f);
    expect(img.map.extents.some((e) => e.kind === 'zero' && e.why === 'zeroed' && e.start === MiB)).toBe(true);
    expect(img.layers[0]!.layer.details.zeroGrains).toBeGreaterThan(0);
  });

  for (const adapter of ['ide', 'lsilogic', 'buslogic', 'legacyESX']) {
    it(`adapter_type=${adapter}: the descriptor's adapter does not change the map`, () => {
      const f = newVmdk(`ad-${adapter}.vmdk`, `adapter_type=${adapter}`, '3M', WRITES.slice(0, 3));
      checkAgainstQemu(f);
    });
  }

  it('an odd size (not a multiple of the grain): the last grain is cut at the disk end', () => {
    const f = newVmdk('odd.vmdk', 'subformat=monolithicSparse', '1000k', ['write -P 0x71 960k 40k']);
    checkAgainstQemu(f);
  });

  it('streamOptimized (qemu-img convert): compressed grains are unmappable and read back by inflating', () => {
    const src = path.join(dir, 'so-src.raw');
    fs.writeFileSync(src, patterned(3 * MiB + 4096, 5));
    const f = path.join(dir, 'so.vmdk');
    qemuImgIn(dir, 'convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, f);
    const img = checkAgainstQemu(f);
    expect(img.layers[0]!.layer.subformat).toBe('streamOptimized');
    const u = img.map.extents.filter((e) => e.kind === 'unmappable');
    expect(u.length).toBeGreaterThan(0);
    expect(u.every((e) => e.kind === 'unmappable' && /compressed grain/.test(e.reason))).toBe(true);
  });

  it('delta chain by parentFileNameHint: unallocated grains come from the parent', () => {
    const base = newVmdk('chain-base.vmdk', 'subformat=monolithicSparse', '4M', ['write -P 0x81 0 4M']);
    const top = path.join(dir, 'chain-top.vmdk');
    qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-b', path.basename(base), '-F', 'vmdk', top);
    qemuIoIn(dir, top, ['write -P 0x82 60k 10k', 'write -P 0x83 3M 64k'], 'vmdk');
    const img = checkAgainstQemu(top);
    expect(img.layers.length).toBe(2);
    expect(img.layers[0]!.layer.parent?.paths).toEqual(['chain-base.vmdk']);
  });

  it('a parentFileNameHint written on Windows (C:\\VMs\\base.vmdk) finds the parent by its name next to the child', () => {
    const base = newVmdk('win-base.vmdk', 'subformat=monolithicSparse', '2M', ['write -P 0x84 0 2M']);
    const top = path.join(dir, 'win-top.vmdk');
    qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-b', path.basename(base), '-F', 'vmdk', top);
    qemuIoIn(dir, top, ['write -P 0x85 64k 64k'], 'vmdk');
    const expected = qemuRaw(top);
    const bytes = fs.readFileSync(top);
    const at = bytes.indexOf(Buffer.from('parentFileNameHint="win-base.vmdk"'));
    expect(at).toBeGreaterThan(0);
    patchFile(top, at, Buffer.from('parentFileNameHint="C:\\VMs\\win-base.vmdk"\n'));
    const img = openHostImage(top);
    try {
      expect(img.layers[0]!.layer.parent?.paths).toEqual(['win-base.vmdk']);
      expectSameBytes(readWholeImage(img), expected, 'child over the parent found by base name');
    } finally {
      img.close();
    }
  });

  it('a parent whose CID no longer matches the child\'s parentCID is refused, naming the CID', () => {
    const base = newVmdk('cid-base.vmdk', 'subformat=monolithicSparse', '1M', ['write -P 0x81 0 1M']);
    const top = path.join(dir, 'cid-top.vmdk');
    qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-b', path.basename(base), '-F', 'vmdk', top);
    const bytes = fs.readFileSync(base);
    const at = bytes.indexOf(Buffer.from('CID='));
    patchFile(base, at + 4, Buffer.from('0badc1d0'));
    let err: unknown;
    try { openHostImage(top).close(); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect(String(err)).toMatch(/parentCID/);
  });

  it('a hand-written descriptor mixing FLAT (with offset), SPARSE and VMFS extents reads as qemu-img does', () => {
    const d = path.join(dir, 'mixed');
    fs.mkdirSync(d);
    fs.writeFileSync(path.join(d, 'a.bin'), patterned(2 * MiB, 1));
    qemuImgIn(d, 'create', '-q', '-f', 'vmdk', 'b.vmdk', '1M');
    qemuIoIn(d, 'b.vmdk', ['write -P 0x91 64k 64k'], 'vmdk');
    fs.writeFileSync(path.join(d, 'c.bin'), patterned(MiB, 3));
    fs.writeFileSync(path.join(d, 'mixed.vmdk'), [
      '# Disk DescriptorFile', 'version=1', 'CID=12345678', 'parentCID=ffffffff', 'createType="vmfs"', '',
      '# Extent description',
      'RW 2048 FLAT "a.bin" 1024',
      'RW 2048 SPARSE "b.vmdk"',
      'RW 2048 VMFS "c.bin"',
      '',
    ].join('\n'));
    const img = checkAgainstQemu(path.join(d, 'mixed.vmdk'));
    expect(img.map.extents[0]).toMatchObject({ kind: 'data', start: 0, length: MiB, offset: 1024 * 512 });
    expect(img.layers[0]!.layer.id).toBe('12345678');
  });

  it('a ZERO extent reads as zeros between data extents', () => {
    const d = path.join(dir, 'zero-ext');
    fs.mkdirSync(d);
    const a = patterned(MiB, 7);
    fs.writeFileSync(path.join(d, 'a.bin'), a);
    fs.writeFileSync(path.join(d, 'z.vmdk'), [
      '# Disk DescriptorFile', 'version=1', 'CID=fffffffe', 'parentCID=ffffffff', 'createType="monolithicFlat"',
      'RW 1024 FLAT "a.bin" 0', 'RW 4096 ZERO', 'RDONLY 1024 FLAT "a.bin" 1024', '',
    ].join('\n'));
    const img = openHostImage(path.join(d, 'z.vmdk'));
    try {
      const expected = new Uint8Array(3 * MiB);
      expected.set(a.subarray(0, MiB / 2), 0);
      expected.set(a.subarray(MiB / 2), MiB / 2 + 2 * MiB);
      expectSameBytes(readWholeImage(img), expected, 'FLAT + ZERO + FLAT');
      expect(img.map.extents[1]).toEqual({ kind: 'zero', start: MiB / 2, length: 2 * MiB, why: 'zeroed' });
    } finally {
      img.close();
    }
  });

  it('VMFSSPARSE (COWD) extents through a descriptor read as qemu-img does', () => {
    const d = path.join(dir, 'cowd');
    fs.mkdirSync(d);
    const f = path.join(d, 'disk-delta.vmdk');
    fs.writeFileSync(f, buildCowd(8192, 8, [[0, 0xa1], [3, 0xa2], [4, 0xa3], [700, 0xa4], [1023, 0xa5]]));
    fs.writeFileSync(path.join(d, 'disk.vmdk'), [
      '# Disk DescriptorFile', 'version=1', 'CID=aaaabbbb', 'parentCID=ffffffff', 'createType="vmfsSparse"',
      'RW 8192 VMFSSPARSE "disk-delta.vmdk"', '',
    ].join('\n'));
    const img = checkAgainstQemu(path.join(d, 'disk.vmdk'));
    expect(img.map.extents.filter((e) => e.kind === 'data').length).toBe(4);
  });

  it('SESPARSE extents (allocated, zero and unallocated grains) read as qemu-img does', () => {
    const d = path.join(dir, 'sesparse');
    fs.mkdirSync(d);
    fs.writeFileSync(path.join(d, 'disk-sesparse.vmdk'), buildSeSparse(8192, [[0, 0xb1], [1, 0xb2], [9, 0xb3], [1000, 0xb4]], [5, 6]));
    fs.writeFileSync(path.join(d, 'disk.vmdk'), [
      '# Disk DescriptorFile', 'version=1', 'CID=ccccdddd', 'parentCID=ffffffff', 'createType="seSparse"',
      'RW 8192 SESPARSE "disk-sesparse.vmdk"', '',
    ].join('\n'));
    const img = checkAgainstQemu(path.join(d, 'disk.vmdk'));
    expect(img.map.extents.some((e) => e.kind === 'zero' && e.why === 'zeroed')).toBe(true);
  });
});

/** A COWD (ESX vmfsSparse) extent: header, one grain directory, grain tables, grains [index, byte]. */
function buildCowd(sectors: number, grainSectors: number, grains: [number, number][]): Uint8Array {
  const grainBytes = grainSectors * 512;
  const gtSpan = 4096 * grainSectors;
  const gdEntries = Math.ceil(sectors / gtSpan);
  const gdSector = 4;
  const gtSector = gdSector + Math.ceil((gdEntries * 4) / 512);
  const gtSectors = 32; // 4096 entries * 4 bytes
  const dataSector = gtSector + gdEntries * gtSectors;
  const out = new Uint8Array((dataSector + grains.length * grainSectors) * 512);
  const dv = new DataView(out.buffer);
  out.set([0x43, 0x4f, 0x57, 0x44]); // "COWD"
  dv.setUint32(4, 1, true);
  dv.setUint32(8, 3, true);
  dv.setUint32(12, sectors, true);
  dv.setUint32(16, grainSectors, true);
  dv.setUint32(20, gdSector, true);
  dv.setUint32(24, gdEntries, true);
  dv.setUint32(28, out.length / 512, true);
  for (let i = 0; i < gdEntries; i++) dv.setUint32(gdSector * 512 + i * 4, gtSector + i * gtSectors, true);
  grains.forEach(([g, byte], k) => {
    const s = dataSector + k * grainSectors;
    const gi = Math.floor(g / 4096);
    dv.setUint32((gtSector + gi * gtSectors) * 512 + (g % 4096) * 4, s, true);
    out.fill(byte, s * 512, s * 512 + grainBytes);
  });
  return out;
}

/** An ESXi seSparse extent with 4 KiB grains: grains [index, byte] allocated, `zeros` marked zero. */
function buildSeSparse(sectors: number, grains: [number, number][], zeros: number[]): Uint8Array {
  const gdSector = 2;
  const gtSector = 3;
  const gtSectors = 64; // 4096 entries, 16 MiB each
  const gts = Math.ceil(sectors / (4096 * 8));
  const grainsSector = gtSector + gts * gtSectors;
  const out = new Uint8Array((grainsSector + grains.length * 8) * 512);
  const dv = new DataView(out.buffer);
  const q = (i: number, v: bigint) => dv.setBigUint64(i * 8, v, true);
  q(0, 0xcafebaben); q(1, 0x200000001n); q(2, BigInt(sectors)); q(3, 8n); q(4, 64n);
  q(10, 1n); q(11, 1n); // volatile header
  q(16, BigInt(gdSector)); q(17, 1n);
  q(18, BigInt(gtSector)); q(19, BigInt(gts * gtSectors));
  q(24, BigInt(grainsSector)); q(25, BigInt(grains.length * 8));
  dv.setBigUint64(512, 0xcafecafen, true);
  for (let i = 0; i < gts; i++) dv.setBigUint64(gdSector * 512 + i * 8, 0x1000000000000000n | BigInt(i), true);
  const gte = (g: number) => (gtSector * 512) + Math.floor(g / 4096) * gtSectors * 512 + (g % 4096) * 8;
  grains.forEach(([g, byte], k) => {
    const n = BigInt(k);
    dv.setBigUint64(gte(g), 0x3000000000000000n | ((n & 0xfffn) << 48n) | (n >> 12n), true);
    out.fill(byte, (grainsSector + k * 8) * 512, (grainsSector + (k + 1) * 8) * 512);
  });
  for (const z of zeros) dv.setBigUint64(gte(z), 0x2000000000000000n, true);
  return out;
}

describe('VMDK real-world images', () => {
  it('iotest-version3.vmdk (16 GiB streamOptimized, grain directory in the footer): compressed grains unmappable, readable, equal to qemu-img convert', () => {
    const f = realWorld('iotest-version3.vmdk.bz2', dir);
    const img = checkAgainstQemu(f);
    expect(img.map.size).toBe(16 * 1024 * MiB);
    expect(img.map.extents.some((e) => e.kind === 'unmappable')).toBe(true);
    expect(img.map.extents.some((e) => e.kind === 'data')).toBe(false);
  });

  it('ext2.vmdk reads as qemu-img convert', () => {
    const f = realWorld('ext2.vmdk.xz', dir);
    checkAgainstQemu(f);
  });

  it('afl9.vmdk (fuzzed header) fails quickly with a FormatError naming the grain directory', () => {
    const f = realWorld('afl9.vmdk.bz2', dir);
    expectFormatError(() => layerOf(f), /grain|capacity|descriptor/);
  });
});

describe('VMDK damaged images', () => {
  it('a missing extent file is an error naming it', () => {
    const f = newVmdk('missing.vmdk', 'subformat=monolithicFlat', '1M', []);
    fs.rmSync(path.join(dir, 'missing-flat.vmdk'));
    let err: unknown;
    try { layerOf(f); } catch (e) { err = e; }
    expect(String(err)).toMatch(/missing-flat\.vmdk/);
  });

  it('a flat extent shorter than the descriptor says is refused', () => {
    const f = newVmdk('short.vmdk', 'subformat=monolithicFlat', '1M', []);
    fs.truncateSync(path.join(dir, 'short-flat.vmdk'), 4096);
    expectFormatError(() => layerOf(f), /has only 4096 bytes/);
  });

  it('a grain entry pointing at the grain directory is refused by the chain resolver (metadata overlap)', () => {
    const f = newVmdk('overlap.vmdk', 'subformat=monolithicSparse', '1M', ['write -P 1 0 64k']);
    const head = new DataView(new Uint8Array(fs.readFileSync(f)).buffer);
    const gdSector = Number(head.getBigUint64(56, true));
    const gtSector = new DataView(new Uint8Array(fs.readFileSync(f)).buffer).getUint32(gdSector * 512, true);
    patchFile(f, gtSector * 512, le32(gdSector));
    let err: unknown;
    try { openHostImage(f).close(); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect(String(err)).toMatch(/grain directory/);
  });

  it('two grain directory entries sharing one grain table are refused', () => {
    const f = newVmdk('shared-gt.vmdk', 'subformat=monolithicSparse', '64M', ['write -P 1 0 64k']);
    const bytes = new Uint8Array(fs.readFileSync(f));
    const gdSector = Number(new DataView(bytes.buffer).getBigUint64(56, true));
    patchFile(f, gdSector * 512 + 4, bytes.subarray(gdSector * 512, gdSector * 512 + 4));
    expectFormatError(() => layerOf(f), /grain table .* already uses/);
  });

  it('a sparse extent file listed twice in a descriptor is refused', () => {
    const d = path.join(dir, 'twice');
    fs.mkdirSync(d);
    qemuImgIn(d, 'create', '-q', '-f', 'vmdk', 's.vmdk', '1M');
    fs.writeFileSync(path.join(d, 't.vmdk'), '# Disk DescriptorFile\nversion=1\ncreateType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "s.vmdk"\nRW 2048 SPARSE "s.vmdk"\n');
    expectFormatError(() => layerOf(path.join(d, 't.vmdk')), /already uses/);
  });

  it('a capacity of 2^50 sectors fails quickly without a large allocation', () => {
    const f = newVmdk('cap.vmdk', 'subformat=monolithicSparse', '1M', []);
    patchFile(f, 12, [0, 0, 0, 0, 0, 0, 4, 0]);
    expectFormatError(() => layerOf(f), /grain directory .* past the end|too large/);
  });

  it('a raw device mapping extent (VMFSRDM) is refused naming it, before any file is opened', () => {
    const d = path.join(dir, 'rdm');
    fs.mkdirSync(d);
    fs.writeFileSync(path.join(d, 'r.vmdk'), '# Disk DescriptorFile\nversion=1\ncreateType="vmfsRawDeviceMap"\nRW 2048 VMFSRDM "r-rdm.vmdk"\n');
    expectFormatError(() => layerOf(path.join(d, 'r.vmdk')), /raw device mapping \(VMFSRDM\)/);
  });

  it('a NOACCESS extent is refused naming it', () => {
    const d = path.join(dir, 'noaccess');
    fs.mkdirSync(d);
    fs.writeFileSync(path.join(d, 'a.bin'), new Uint8Array(4096));
    fs.writeFileSync(path.join(d, 'n.vmdk'), '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nNOACCESS 8 FLAT "a.bin" 0\n');
    expectFormatError(() => layerOf(path.join(d, 'n.vmdk')), /NOACCESS/);
  });

  it('probe: text descriptors and sparse magics are VMDK, other text is not', () => {
    const enc = (s: string) => new Uint8Array(Buffer.from(s));
    const dummy = openFileReader(newVmdk('probe.vmdk', 'subformat=monolithicSparse', '1M', []));
    try {
      expect(vmdkFormat.probe(enc('# Disk DescriptorFile\nversion=1\n'), dummy)).toBe(true);
      expect(vmdkFormat.probe(enc('KDMV'), dummy)).toBe(true);
      expect(vmdkFormat.probe(enc('hello world, not a disk\n'), dummy)).toBe(false);
    } finally {
      dummy.close();
    }
  });
});

describe('qcow2 over other formats', () => {
  for (const [fmt, opts] of [['vmdk', 'subformat=monolithicSparse'], ['vdi', 'static=off'], ['vmdk', 'subformat=streamOptimized']] as const) {
    it(`a qcow2 overlay over a ${fmt} (${opts}) backing file with -F ${fmt} reads as qemu-img convert`, () => {
      const base = path.join(dir, `over-${opts.replace(/\W/g, '')}.${fmt}`);
      const src = path.join(dir, `over-src-${fmt}.raw`);
      fs.writeFileSync(src, patterned(3 * MiB, 9));
      qemuImgIn(dir, 'convert', '-O', fmt, '-o', opts, src, base);
      const top = `${base}.qcow2`;
      qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-b', path.basename(base), '-F', fmt, top);
      qemuIoIn(dir, top, ['write -P 0xc1 1M 64k', 'write -z 2M 4k']);
      const img = checkAgainstQemu(top);
      expect(img.layers.map((l) => l.layer.format)).toEqual(['qcow2', fmt]);
      expect(img.layers[0]!.layer.parent?.format).toBe(fmt);
      const again = openHostImage(top);
      try {
        expectSameBytes(readWholeImage(again).subarray(0, MiB), qemuRaw(base).subarray(0, MiB), 'first MiB from the backing file');
      } finally {
        again.close();
      }
    });
  }
});
