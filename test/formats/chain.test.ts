import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReader, FormatError, isFormatError } from '../../src/formats/block-reader.ts';
import { openImage, type ChainHost } from '../../src/formats/chain.ts';
import { FORMAT_READERS, readerFor } from '../../src/formats/detect.ts';
import type { FormatReader, ImageFormat, ImageLayer } from '../../src/formats/image.ts';
import type { LayerExtent } from '../../src/formats/extent-map.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { vhdChecksum } from '../../src/formats/vhd.ts';
import { cleanupTmpDirs, expectMatchesQemu, expectSameBytes, makeTmpDir, qemuImg, qemuIo, qemuMap, qemuRaw, readWholeImage } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;

function vpc(p: string, writes: string[]): string {
  qemuImg('create', '-q', '-f', 'vpc', '-o', 'force_size=on', p, String(16 * MiB));
  if (writes.length) qemuIo(p, 'vpc', writes);
  return p;
}

function uuidOf(p: string): Buffer {
  const b = fs.readFileSync(p);
  return Buffer.from(b.subarray(b.length - 512 + 68, b.length - 512 + 84));
}

/**
 * Turns a qemu-made dynamic VHD into a differencing one naming `parentName` (by the
 * header's parent-name field; no locators) and expecting `parentUuid`.
 */
function makeDifferencing(p: string, parentUuid: Buffer, parentName: string, ownUuid?: Buffer): void {
  const b = fs.readFileSync(p);
  const headerAt = Number(b.readBigUInt64BE(16));
  for (const at of [0, b.length - 512]) {
    b.writeUInt32BE(4, at + 60);
    if (ownUuid) ownUuid.copy(b, at + 68);
    b.writeUInt32BE(vhdChecksum(b.subarray(at, at + 512), 64), at + 64);
  }
  parentUuid.copy(b, headerAt + 40);
  b.fill(0, headerAt + 64, headerAt + 576);
  for (let i = 0; i < parentName.length; i++) b.writeUInt16BE(parentName.charCodeAt(i), headerAt + 64 + 2 * i);
  b.writeUInt32BE(vhdChecksum(b.subarray(headerAt, headerAt + 1024), 36), headerAt + 36);
  fs.writeFileSync(p, b);
}

function refusal(p: string): Error {
  try {
    openHostImage(p).close();
  } catch (e) {
    expect(isFormatError(e), String(e)).toBe(true);
    return e as Error;
  }
  throw new Error(`${p} opened`);
}

describe('chains of differencing VHDs', () => {
  const dir = makeTmpDir();
  const base = vpc(path.join(dir, 'base.vhd'), ['write -P 0x11 0 16M']);
  const mid = vpc(path.join(dir, 'mid.vhd'), ['write -P 0x22 2M 4M', 'write -P 0x23 12M 1k']);
  const top = vpc(path.join(dir, 'top.vhd'), ['write -P 0x33 4M 4M', 'write -P 0x34 15M 512']);
  // what each layer holds as a standalone dynamic image: its bytes and its allocated blocks
  const layers = [top, mid, base].map((p) => ({
    raw: qemuRaw(p),
    allocated: new Set(qemuMap(p).filter((e) => e.data).flatMap((e) => Array.from({ length: e.length / BLOCK }, (_, i) => e.start / BLOCK + i))),
  }));
  makeDifferencing(mid, uuidOf(base), 'base.vhd');
  makeDifferencing(top, uuidOf(mid), 'mid.vhd');

  it('a three-level chain reads each block from the nearest layer that holds it', () => {
    const expected = Buffer.alloc(16 * MiB);
    for (let b = 0; b < 8; b++) {
      const from = layers.find((l) => l.allocated.has(b));
      if (from) from.raw.copy(expected, b * BLOCK, b * BLOCK, (b + 1) * BLOCK);
    }
    const img = openHostImage(top);
    try {
      expect(img.layers.map((l) => path.basename(l.path))).toEqual(['top.vhd', 'mid.vhd', 'base.vhd']);
      expect(img.map.files.map((f) => path.basename(f))).toEqual(['top.vhd', 'mid.vhd', 'base.vhd']);
      expectSameBytes(readWholeImage(img), expected, top);
      // block 2 (4-6 MiB) from top, block 1 from mid, block 0 from base
      const fileAt = (off: number) => img.map.extents.find((e) => e.start <= off && off < e.start + e.length);
      expect([fileAt(0), fileAt(2 * MiB), fileAt(4 * MiB)].map((e) => (e?.kind === 'data' ? path.basename(img.map.files[e.file]!) : e?.kind))).toEqual(['base.vhd', 'mid.vhd', 'top.vhd']);
    } finally {
      img.close();
    }
  });

  it('a parent whose UUID differs from the one the child expects is refused, naming both', () => {
    const d = makeTmpDir();
    fs.copyFileSync(top, path.join(d, 'top.vhd'));
    fs.copyFileSync(base, path.join(d, 'mid.vhd')); // the wrong file under the right name
    expect(refusal(path.join(d, 'top.vhd')).message).toMatch(/not its parent.*expects parent UUID/s);
  });

  it('an image that is its own parent is a loop', () => {
    const d = makeTmpDir();
    const self = vpc(path.join(d, 'self.vhd'), ['write -P 0x44 0 4k']);
    makeDifferencing(self, uuidOf(self), 'self.vhd');
    expect(refusal(self).message).toMatch(/loops/);
  });

  it('two images that name each other are a loop', () => {
    const d = makeTmpDir();
    const a = vpc(path.join(d, 'a.vhd'), []);
    const b = vpc(path.join(d, 'b.vhd'), []);
    const ua = uuidOf(a);
    const ub = uuidOf(b);
    makeDifferencing(a, ub, 'b.vhd');
    makeDifferencing(b, ua, 'a.vhd');
    expect(refusal(a).message).toMatch(/loops.*a\.vhd -> .*b\.vhd -> .*a\.vhd/s);
  });

  it('a chain deeper than 64 images is refused', () => {
    const d = makeTmpDir();
    const proto = vpc(path.join(d, 'proto.vhd'), []);
    const n = 66;
    const uuid = (i: number) => { const u = Buffer.alloc(16, 0x5a); u.writeUInt32BE(i, 0); return u; };
    for (let i = 0; i < n; i++) {
      const p = path.join(d, `d${i}.vhd`);
      fs.copyFileSync(proto, p);
      if (i < n - 1) makeDifferencing(p, uuid(i + 1), `d${i + 1}.vhd`, uuid(i));
    }
    expect(refusal(path.join(d, 'd0.vhd')).message).toMatch(/deeper than 64/);
  });
});

describe.skipIf(!readerFor('qcow2'))('qcow2 overlays on VHD and VHDX parents (qemu-img create -b -F)', () => {
  const dir = makeTmpDir();
  for (const [fmt, ext, opts] of [['vpc', 'vhd', 'force_size=on'], ['vhdx', 'vhdx', 'block_size=1M']] as const) {
    it(`qcow2 over ${ext}, and qcow2 over that: bytes and map agree with qemu`, () => {
      const base = path.join(dir, `base.${ext}`);
      qemuImg('create', '-q', '-f', fmt, '-o', opts, base, String(8 * MiB));
      qemuIo(base, fmt, ['write -P 0x11 0 8M']);
      const mid = path.join(dir, `mid-${ext}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', `base.${ext}`, '-F', fmt, mid);
      qemuIo(mid, 'qcow2', ['write -P 0x22 1M 64k', 'write -z 3M 128k', 'discard 5M 64k']);
      const top = path.join(dir, `top-${ext}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', path.basename(mid), '-F', 'qcow2', top);
      qemuIo(top, 'qcow2', ['write -P 0x33 1M 4k', 'write -P 0x34 7M 1M']);
      const img = expectMatchesQemu(top);
      expect(img.layers.map((l) => l.layer.format)).toEqual(['qcow2', 'qcow2', ext]);
    });
  }
});

describe('chain resolver with in-memory layers', () => {
  // A toy format: "TOY<n>" names layer n; each layer's extents are given below.
  const layers: Record<string, { size: number; extents: LayerExtent[]; parent?: string[]; parentFormat?: ImageFormat }> = {
    '/m/child-of-decoy': { size: 1024, extents: [{ kind: 'parent', start: 0, length: 1024 }], parent: ['decoy', 'base'] },
    '/m/decoy': { size: 4096, extents: [{ kind: 'zero', start: 0, length: 4096, why: 'zeroed' }] },
    '/m/top': {
      size: 8192,
      extents: [
        { kind: 'data', start: 0, length: 512, file: 0, offset: 512 },
        { kind: 'data', start: 512, length: 512, file: 0, offset: 1024 }, // continues the first: merged
        { kind: 'parent', start: 1024, length: 7168 },
      ],
      parent: ['base'],
    },
    '/m/base': {
      size: 4096, // smaller than the child: the child's tail reads as zeros
      extents: [
        { kind: 'unmappable', start: 0, length: 2048, reason: 'toy-compressed' },
        { kind: 'data', start: 2048, length: 1024, file: 0, offset: 0 },
        { kind: 'data', start: 3072, length: 1024, file: 0, offset: 1024 },
      ],
    },
  };
  const toy: FormatReader = {
    format: 'raw',
    probe: (head) => head[0] === 0x54,
    open(file, ctx): ImageLayer {
      const l = layers[ctx.path]!;
      return {
        format: 'raw', subformat: 'toy', size: l.size, files: [ctx.path], extents: l.extents.map((e) => ({ ...e })), details: {},
        ...(l.parent ? {
          parent: {
            paths: l.parent,
            ...(l.parentFormat ? { format: l.parentFormat } : {}),
            verify: (p: ImageLayer) => { if (p.files[0]!.endsWith('decoy')) throw new FormatError('the decoy is not the parent', 'parent'); },
          },
        } : {}),
        readUnmappable: (start, length) => new Uint8Array(length).fill(0xc0 + start / 512),
      };
    },
  };
  const fileBytes = (p: string) => { const b = new Uint8Array(4096).fill(p.endsWith('top') ? 0x70 : 0xb0); b[0] = 0x54; return b; };
  const host: ChainHost = { openFile: (p) => bytesReader(p, fileBytes(p)), readers: [toy] };

  it('composes the child over a smaller parent: merged, parent ranges sliced, the tail zero', () => {
    const img = openImage('/m/top', host);
    expect(img.map.files).toEqual(['/m/top', '/m/base']);
    expect(img.map.extents).toEqual([
      { kind: 'data', start: 0, length: 1024, file: 0, offset: 512 },
      { kind: 'unmappable', start: 1024, length: 1024, reason: 'toy-compressed' },
      { kind: 'data', start: 2048, length: 2048, file: 1, offset: 0 },
      { kind: 'zero', start: 4096, length: 4096, why: 'unallocated' },
    ]);
  });

  it("reads unmappable ranges through the layer that holds them (the parent's readUnmappable)", () => {
    const img = openImage('/m/top', host);
    const bytes = readMapped(img, 512, 2048);
    expect(bytes[0]).toBe(0x70); // child data
    expect(bytes[512]).toBe(0xc0 + 1024 / 512); // parent's unmappable, read at virtual 1024
    expect(bytes[1537]).toBe(0xb0); // parent data at 2049 (file byte 1; byte 0 is the toy signature)
  });

  it('a candidate that fails verify() is skipped, and its file is not among the map files', () => {
    const img = openImage('/m/child-of-decoy', host);
    expect(img.map.files).toEqual(['/m/child-of-decoy', '/m/base']);
    expect(img.readers.map((r) => r.name)).toEqual(['/m/child-of-decoy', '/m/base']);
    expect(img.map.extents[0]).toMatchObject({ kind: 'unmappable', start: 0, length: 1024 });
  });

  it('a parent whose content is not the format the child names is refused', () => {
    layers['/m/top']!.parentFormat = 'vhdx';
    try {
      expect(() => openImage('/m/top', { ...host, readers: [toy, ...FORMAT_READERS] })).toThrow(/says it is vhdx/);
    } finally {
      delete layers['/m/top']!.parentFormat;
    }
  });
});
