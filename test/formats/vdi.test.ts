import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openVdi, vdiFormat } from '../../src/formats/vdi.ts';
import { openImage } from '../../src/formats/chain.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { checkAgainstQemu, expectSameBytes, le32, makeTmpDir, patchFile, qemuImgIn, qemuIoIn, qemuRaw } from '../kit/oracle.ts';
import { expectFormatError, openLayer } from '../kit/format.ts';

let dir: string;
beforeAll(() => { dir = makeTmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

const MiB = 1 << 20;

const layerOf = (file: string, withListing = false) => openLayer(openVdi, file, { listing: withListing });

function le32At(file: string, offset: number): number {
  const r = openFileReader(file);
  try {
    return new DataView(r.read(offset, 4).buffer).getUint32(0, true);
  } finally {
    r.close();
  }
}

function newVdi(name: string, opts: string, size: string, writes: string[]): string {
  const f = path.join(dir, name);
  qemuImgIn(dir, 'create', '-q', '-f', 'vdi', '-o', opts, f, size);
  if (writes.length) qemuIoIn(dir, f, writes);
  return f;
}

const WRITES = [
  'write -P 0x11 0 3k',
  'write -P 0x22 1048064 2048', // across the block 0 / block 1 boundary
  'write -z 3M 64k',
  'write -P 0x33 3584k 1M', // across blocks 3 and 4
  'discard 3840k 512k', // qemu's VDI driver ignores discards: the blocks stay allocated
];

describe('VDI reader against qemu-img', () => {
  it('dynamic (static=off): written blocks map to data, the rest reads as zero, as qemu-img convert/map', () => {
    const f = newVdi('dyn.vdi', 'static=off', '6M', WRITES);
    const img = checkAgainstQemu(f, { checkPresent: false });
    const layer = img.layers[0]!.layer;
    expect(layer.subformat).toBe('dynamic');
    // blocks 0, 1, 3 and 4 hold written data; qemu's zero write to a free block allocates nothing
    expect(layer.details.allocatedBlocks).toBe(4);
    expect(img.map.extents.some((e) => e.kind === 'zero' && e.why === 'unallocated')).toBe(true);
  });

  it('fixed (static=on): every block is data, as qemu-img map says', () => {
    const f = newVdi('fixed.vdi', 'static=on', '5M', WRITES.slice(0, 2));
    const img = checkAgainstQemu(f, { checkPresent: false });
    expect(img.layers[0]!.layer.subformat).toBe('fixed');
    expect(img.map.extents.every((e) => e.kind === 'data')).toBe(true);
  });

  it('preallocation=full: every block is allocated, as qemu-img map says', () => {
    const f = newVdi('prefull.vdi', 'preallocation=full', '3M', WRITES.slice(0, 2));
    checkAgainstQemu(f, { checkPresent: false });
  });

  it('a size that is not a multiple of the block size: the last block is cut at the disk end', () => {
    const f = newVdi('odd.vdi', 'static=off', '2560k', ['write -P 0x44 2M 512k']);
    checkAgainstQemu(f, { checkPresent: false });
  });

  it('a zero block marker (0xfffffffe) reads as zeros, like qemu, and maps as zeroed', () => {
    const f = newVdi('zero-marker.vdi', 'static=off', '4M', ['write -P 0x55 0 4M']);
    const bmap = le32At(f, 0x154);
    patchFile(f, bmap + 4, le32(0xfffffffe));
    const img = checkAgainstQemu(f, { checkPresent: false });
    expect(img.map.extents.find((e) => e.start === MiB)).toMatchObject({ kind: 'zero', why: 'zeroed', length: MiB });
  });

  it("VirtualBox's header layout (Oracle pre-header text, 0x190-byte header with LCHS geometry) reads the same", () => {
    const f = newVdi('vbox.vdi', 'static=off', '3M', WRITES.slice(0, 2));
    patchFile(f, 0, Buffer.from('<<< Oracle VM VirtualBox Disk Image >>>\n\0\0\0\0\0\0'));
    patchFile(f, 0x48, le32(0x190));
    patchFile(f, 0x1c8, [...le32(0), ...le32(16), ...le32(63), ...le32(512)]);
    const img = checkAgainstQemu(f, { checkPresent: false });
    expect(img.layers[0]!.layer.details.version).toBe('1.1');
  });

  it('block_extra: each block\'s data starts after its extra bytes', () => {
    // Rebuild a qemu-made VDI with 512 bytes of per-block extra data (qemu cannot make these).
    const src = newVdi('extra-src.vdi', 'static=off', '5M', WRITES);
    const bytes = new Uint8Array(fs.readFileSync(src));
    const dv = new DataView(bytes.buffer);
    const offBmap = dv.getUint32(0x154, true);
    const offData = dv.getUint32(0x158, true);
    const nBlocks = dv.getUint32(0x180, true);
    const extra = 512;
    const allocated = Math.ceil((bytes.length - offData) / MiB);
    const out = new Uint8Array(offData + allocated * (MiB + extra));
    out.set(bytes.subarray(0, offData));
    new DataView(out.buffer).setUint32(0x17c, extra, true);
    for (let b = 0; b < allocated; b++) {
      const at = offData + b * (MiB + extra);
      out.fill(0xe5, at, at + extra);
      out.set(bytes.subarray(offData + b * MiB, offData + (b + 1) * MiB), at + extra);
    }
    const f = path.join(dir, 'extra.vdi');
    fs.writeFileSync(f, out);
    const layer = layerOf(f);
    expect(layer.details.blockExtra).toBe(extra);
    expect(nBlocks).toBe(5);
    expect(offBmap).toBeGreaterThan(0);
    const read = readLayer(f, layer, () => { throw new Error('no parent'); });
    expectSameBytes(read, qemuRaw(src), 'block_extra image vs qemu-img convert of the original');
  });
});

/** Reads a layer's virtual disk: data from the file, parent ranges from `parent(start, length)`. */
function readLayer(file: string, layer: ReturnType<typeof openVdi>, parent: (start: number, length: number) => Uint8Array): Uint8Array {
  const out = new Uint8Array(layer.size);
  const r = openFileReader(file);
  try {
    for (const e of layer.extents) {
      if (e.kind === 'data') out.set(r.read(e.offset, e.length), e.start);
      else if (e.kind === 'parent') out.set(parent(e.start, e.length), e.start);
    }
  } finally {
    r.close();
  }
  return out;
}

describe('VDI version 0 headers', () => {
  it('an old version 0.x image (block map right after the 348-byte header) reads like the same disk in 1.1 layout', () => {
    const src = newVdi('v1-src.vdi', 'static=off', '3M', WRITES.slice(0, 2));
    const bytes = new Uint8Array(fs.readFileSync(src));
    const dv = new DataView(bytes.buffer);
    const offBmap = dv.getUint32(0x154, true);
    const offData = dv.getUint32(0x158, true);
    const blocks = dv.getUint32(0x180, true);
    const dataBytes = bytes.length - offData;
    const bmapAt = 0x48 + 348;
    const out = new Uint8Array(bmapAt + blocks * 4 + dataBytes);
    out.set(bytes.subarray(0, 0x40));
    const o = new DataView(out.buffer);
    o.setUint32(0x40, 0xbeda107f, true);
    o.setUint32(0x44, 0x00000001, true); // version 0.1
    o.setUint32(0x48, 1, true); // type: normal
    o.setUint32(0x48 + 0x114, 512, true); // sector size
    o.setBigUint64(0x48 + 0x118, dv.getBigUint64(0x170, true), true); // disk size
    o.setUint32(0x48 + 0x120, dv.getUint32(0x178, true), true); // block size
    o.setUint32(0x48 + 0x124, blocks, true);
    o.setUint32(0x48 + 0x128, dv.getUint32(0x184, true), true);
    out.set(bytes.subarray(0x188, 0x198), 0x48 + 0x12c); // creation UUID
    out.set(bytes.subarray(offBmap, offBmap + blocks * 4), bmapAt);
    out.set(bytes.subarray(offData), bmapAt + blocks * 4);
    const f = path.join(dir, 'v0.vdi');
    fs.writeFileSync(f, out);
    const layer = layerOf(f);
    expect(layer.details.version).toBe('0.1');
    expect(layer.id).toBe(layerOf(src).id);
    expectSameBytes(readLayer(f, layer, () => { throw new Error('no parent'); }), qemuRaw(src), 'version 0 image vs qemu-img convert of the 1.1 original');
  });
});

describe('VDI differencing images', () => {
  function makeDiff(sub: string): { parent: string; child: string; expected: Uint8Array } {
    const d = path.join(dir, sub);
    fs.mkdirSync(d);
    const parent = path.join(d, 'base.vdi');
    qemuImgIn(d, 'create', '-q', '-f', 'vdi', parent, '4M');
    qemuIoIn(d, parent, ['write -P 0x61 0 4M']);
    const other = path.join(d, 'other.vdi');
    qemuImgIn(d, 'create', '-q', '-f', 'vdi', other, '4M');
    const child = path.join(d, 'snapshot.vdi');
    qemuImgIn(d, 'create', '-q', '-f', 'vdi', child, '4M');
    qemuIoIn(d, child, ['write -P 0x62 1M 1M', 'write -P 0x63 3M 4k']);
    // The oracle: blocks 1 and 3 from the child, blocks 0 and 2 from the parent.
    const p = qemuRaw(parent);
    const c = qemuRaw(child);
    const expected = p.slice();
    expected.set(c.subarray(MiB, 2 * MiB), MiB);
    expected.set(c.subarray(3 * MiB, 4 * MiB), 3 * MiB);
    // Make it a differencing image linked to the parent's UUID.
    const parentUuid = fs.readFileSync(parent).subarray(0x188, 0x198);
    patchFile(child, 0x4c, le32(4));
    patchFile(child, 0x1a8, parentUuid);
    return { parent, child, expected };
  }

  it('free blocks of a differencing image come from the parent found by UUID among the .vdi files beside it', () => {
    const { parent, child, expected } = makeDiff('diff1');
    const layer = layerOf(child, true);
    expect(layer.subformat).toBe('differencing');
    expect(layer.parent?.paths).toEqual(['base.vdi', 'other.vdi']);
    const parentLayer = layerOf(parent);
    expect(() => layer.parent!.verify!(parentLayer)).not.toThrow();
    expectFormatError(() => layer.parent!.verify!(layerOf(path.join(path.dirname(child), 'other.vdi'))), /UUID/);
    expect(layer.extents.filter((e) => e.kind === 'parent').map((e) => [e.start, e.length])).toEqual([[0, MiB], [2 * MiB, MiB]]);
    const parentBytes = qemuRaw(parent);
    expectSameBytes(readLayer(child, layer, (s, n) => parentBytes.subarray(s, s + n)), expected, 'differencing VDI over its parent');
  });

  it('the chain resolver finds the parent by UUID among the .vdi files beside it', () => {
    const { child, expected } = makeDiff('diff3');
    const host = nodeChainHost();
    try {
      const img = openImage(child, host);
      expect(img.layers.map((l) => path.basename(l.path))).toEqual(['snapshot.vdi', 'base.vdi']);
      expect(img.map.files.map((f) => path.basename(f))).toEqual(['snapshot.vdi', 'base.vdi']);
      expectSameBytes(readMapped(img, 0, img.map.size), expected, 'differencing VDI through openImage');
    } finally {
      host.close();
    }
  });

  it('without a directory listing the parent is still checked by UUID, but no path is offered', () => {
    const { child } = makeDiff('diff2');
    const layer = layerOf(child, false);
    expect(layer.parent?.paths).toEqual([]);
    expect(layer.details.parentUuid).toMatch(/^[0-9a-f-]{36}$/);
  });
});

describe('VDI damaged images', () => {
  it('a block map claiming 2^31 blocks fails quickly, naming the block map', () => {
    const f = newVdi('huge.vdi', 'static=off', '2M', ['write -P 1 0 4k']);
    patchFile(f, 0x170, [0, 0, 0, 0, 0, 0x80, 0, 0]);
    patchFile(f, 0x180, le32(0x80000000));
    expectFormatError(() => layerOf(f), /block map .* past the end/);
  });

  it('a block entry past the end of the file is refused', () => {
    const f = newVdi('badentry.vdi', 'static=off', '2M', ['write -P 1 0 4k']);
    patchFile(f, le32At(f, 0x154), le32(1000));
    expectFormatError(() => layerOf(f), /block 0 .* past the end/);
  });

  it('an unknown image type is refused naming it', () => {
    const f = newVdi('type.vdi', 'static=off', '1M', []);
    patchFile(f, 0x4c, le32(9));
    expectFormatError(() => layerOf(f), /image type 9/);
  });

  it('a disk size beyond its blocks is refused', () => {
    const f = newVdi('size.vdi', 'static=off', '1M', []);
    patchFile(f, 0x170, [0, 0, 0, 0, 1, 0, 0, 0]);
    expectFormatError(() => layerOf(f), /disk size/);
  });

  it('probe recognizes VDI by its signature only', () => {
    const f = newVdi('probe.vdi', 'static=off', '1M', []);
    const head = new Uint8Array(fs.readFileSync(f)).subarray(0, 512);
    expect(vdiFormat.probe(head, openFileReader(f))).toBe(true);
    head[0x40] ^= 1;
    expect(vdiFormat.probe(head, openFileReader(f))).toBe(false);
  });
});
