/** QCOW version 1 (`qemu-img create -f qcow`): read through vdboot's map against qemu-img convert. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { detectFormat } from '../../src/formats/detect.ts';
import { qcowFormat } from '../../src/formats/qcow.ts';
import { main, type CliIO } from '../../src/cli/main.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { openHostImage } from '../../src/sys/host-image.ts';
import { be32, checkAgainstQemu, expectSameBytes, makeTmpDir, patchFile, qemuImgIn, qemuIoIn, qemuRaw, readWholeImage } from '../kit/oracle.ts';
import { expectFormatError, openLayer } from '../kit/format.ts';

let dir: string;
beforeAll(() => { dir = makeTmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

const layerOf = (file: string) => openLayer((r, ctx) => qcowFormat.open(r, ctx), file);


/** A source disk whose content compresses (runs and a pattern) but is not all zero. */
function compressibleRaw(name: string, size: number): string {
  const f = path.join(dir, name);
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i >> 12) % 3 === 0 ? 0 : (i * 7 + (i >> 9)) & 0xff;
  bytes.fill(0xee, size >> 1, (size >> 1) + 70000);
  fs.writeFileSync(f, bytes);
  return f;
}

/**
 * qemu-img convert -c -O qcow. qemu 7.2 ends it with a zero-length compressed write that
 * its qcow driver refuses, so it exits 1 with no message after writing every cluster: the
 * exit status is not trusted, the result is (qemu-img compare against the source throws
 * when they differ).
 */
function convertCompressed(src: string, out: string): void {
  try { qemuImgIn(dir, 'convert', '-c', '-O', 'qcow', src, out); } catch { /* checked below */ }
  qemuImgIn(dir, 'compare', '-f', 'raw', '-F', 'qcow', src, out);
}

async function vdbootCat(image: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let err = '';
  const io: CliIO = { stdout: () => {}, stderr: (t) => { err += t; }, stdoutBytes: async (b) => { chunks.push(Buffer.from(b)); } };
  const code = await main(['cat', image], io);
  expect(code, err).toBe(0);
  return Buffer.concat(chunks);
}

describe('qcow (version 1) against qemu-img', () => {
  it('detected by content as qcow, not qcow2', () => {
    const f = path.join(dir, 'detect.qcow');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', f, '1M');
    const r = openFileReader(f);
    try { expect(detectFormat(r).format).toBe('qcow'); } finally { r.close(); }
  });

  // [cluster_bits, l2_bits]: qemu makes 4 KiB clusters (12, 9), and 512-byte ones (9, 12)
  // for an image with a backing file; 64 KiB clusters (16, 13) are the largest it reads.
  for (const [bits, l2Bits] of [[9, 12], [12, 9], [16, 13]] as const) {
    const cs = 2 ** bits;
    it(`cluster_size ${cs} written by qemu-io across clusters and L2 tables: vdboot cat equals qemu-img convert -O raw`, async () => {
      const f = path.join(dir, `w${cs}.qcow`);
      // qemu-img has no cluster_size option for qcow: patch a fresh image's header instead
      // (no cluster is allocated yet, and the L1 table it made is long enough for an L1
      // span of 2 MiB or more; qemu-io then writes with the new geometry).
      qemuImgIn(dir, 'create', '-q', '-f', 'qcow', f, '6M');
      patchFile(f, 32, [bits, l2Bits]);
      qemuIoIn(dir, f, [
        'write -P 0x11 0 3k',
        `write -P 0x22 ${cs - 512} ${cs + 1024}`,
        'write -P 0x33 1M 64k',
        'write -P 0x44 5000k 123k',
        `write -z ${2 * cs} ${cs}`,
      ]);
      const img = checkAgainstQemu(f);
      const layer = img.layers[0]!.layer;
      expect(layer.format).toBe('qcow');
      expect(layer.details.clusterSize).toBe(cs);
      expect(img.map.extents.some((e) => e.kind === 'data')).toBe(true);
      expect(img.map.extents.some((e) => e.kind === 'zero')).toBe(true);
      expectSameBytes(await vdbootCat(f), qemuRaw(f), `vdboot cat ${path.basename(f)}`);
    });
  }

  it('compressed by qemu-img convert -c -O qcow: clusters are unmappable and read back through readUnmappable', async () => {
    const src = compressibleRaw('comp-src.raw', 3 << 20);
    const f = path.join(dir, 'comp.qcow');
    convertCompressed(src, f);
    qemuIoIn(dir, f, ['write -P 0xb1 1M 64k']);
    const img = checkAgainstQemu(f);
    const unmappable = img.map.extents.filter((e) => e.kind === 'unmappable');
    expect(unmappable.length).toBeGreaterThan(0);
    expect(unmappable.every((e) => e.kind === 'unmappable' && /compressed qcow cluster/.test(e.reason))).toBe(true);
    expect(Number(img.layers[0]!.layer.details.compressedClusters)).toBeGreaterThan(0);
    expectSameBytes(await vdbootCat(f), qemuRaw(f), 'vdboot cat comp.qcow');
  });

  it('with a backing file (qcow over qcow over raw): overlays show through to the base', async () => {
    fs.writeFileSync(path.join(dir, 'base.raw'), new Uint8Array(2 << 20).fill(0x5a));
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', '-b', 'base.raw', '-F', 'raw', path.join(dir, 'mid.qcow'));
    qemuIoIn(dir, path.join(dir, 'mid.qcow'), ['write -P 0xd1 60k 10k', 'write -P 0xd4 1M 64k']);
    const top = path.join(dir, 'top.qcow');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', '-b', 'mid.qcow', '-F', 'qcow', top, '3M');
    qemuIoIn(dir, top, ['write -P 0xd2 62k 4k', 'write -P 0xd3 2500k 4k']);
    const img = checkAgainstQemu(top, { rawDepths: [2] });
    expect(img.layers.map((l) => l.layer.format)).toEqual(['qcow', 'qcow', 'raw']);
    expect(img.layers[0]!.layer.details.backingFile).toBe('mid.qcow');
    expectSameBytes(await vdbootCat(top), qemuRaw(top), 'vdboot cat top.qcow');
  });

  it('a backing file outside the image folder is refused (confinement)', () => {
    const sub = path.join(dir, 'sub');
    fs.mkdirSync(sub, { recursive: true });
    fs.writeFileSync(path.join(dir, 'outside.raw'), new Uint8Array(1 << 20));
    const top = path.join(sub, 'escape.qcow');
    qemuImgIn(sub, 'create', '-q', '-f', 'qcow', '-b', '../outside.raw', '-F', 'raw', top);
    let err: unknown;
    try { openHostImage(top).close(); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect(String(err)).toMatch(/outside that folder/);
  });
});

describe('qcow (version 1) damaged or unsupported images', () => {
  function fresh(name: string, size = '4M'): string {
    const f = path.join(dir, name);
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', f, size);
    qemuIoIn(dir, f, ['write -P 0x11 0 128k']);
    return f;
  }

  it('an AES-encrypted image made by qemu-img is refused naming the encryption', () => {
    const f = path.join(dir, 'aes.qcow');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', '--object', 'secret,id=s0,data=secret', '-o', 'encrypt.format=aes,encrypt.key-secret=s0', f, '1M');
    expectFormatError(() => layerOf(f), /encrypted \(crypt_method 1: AES/);
    expectFormatError(() => openHostImage(f), /encrypted/);
  });

  it('cluster_bits out of range is refused naming the value', () => {
    const f = fresh('cbits.qcow');
    patchFile(f, 32, [17]);
    expectFormatError(() => layerOf(f), /cluster_bits 17 is out of range/);
    patchFile(f, 32, [8]);
    expectFormatError(() => layerOf(f), /cluster_bits 8 is out of range/);
  });

  it('l2_bits out of range is refused', () => {
    const f = fresh('l2bits.qcow');
    patchFile(f, 33, [14]);
    expectFormatError(() => layerOf(f), /l2_bits 14 is out of range/);
  });

  it('a huge virtual size needs an L1 table past the end of the file: refused quickly', () => {
    const f = fresh('huge.qcow');
    patchFile(f, 24, [0, 0x10, 0, 0, 0, 0, 0, 0]); // 2^52 bytes
    expectFormatError(() => layerOf(f), /L1 table .* past the end of the file/);
    patchFile(f, 24, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    expectFormatError(() => layerOf(f), /size = \d+ is too large/);
  });

  it('the L1 table offset past the end of the file is refused', () => {
    const f = fresh('l1eof.qcow');
    patchFile(f, 40, [0, 0, 0, 0, 0x10, 0, 0, 0]);
    expectFormatError(() => layerOf(f), /L1 table .* past the end of the file/);
  });

  it('an L1 entry pointing past the end of the file is refused', () => {
    const f = fresh('l2eof.qcow');
    const l1Off = Number(new DataView(new Uint8Array(fs.readFileSync(f)).buffer).getBigUint64(40));
    patchFile(f, l1Off, [0, 0, 0, 0, ...be32(0x7fff0000)]);
    expectFormatError(() => layerOf(f), /L2 table at offset \d+, past the end/);
  });

  it('a data cluster past the end of the file and a data cluster inside the L1 table are refused', () => {
    const f = fresh('data.qcow');
    const bytes = new Uint8Array(fs.readFileSync(f));
    const dv = new DataView(bytes.buffer);
    const l1Off = Number(dv.getBigUint64(40));
    const l2Off = Number(dv.getBigUint64(l1Off));
    patchFile(f, l2Off, [0, 0, 0, 0x10, 0, 0, 0, 0]);
    expectFormatError(() => layerOf(f), /maps to offset \d+, past the end of the file/);
    patchFile(f, l2Off, [0, 0, 0, 0, 0, 0, 0, 0]);
    patchFile(f, l2Off + 8, [0, 0, 0, 0, 0, 0, 0, 0]); // guest cluster 1 -> offset 0 would be "unallocated"
    patchFile(f, l2Off + 16, [0, 0, 0, 0, ...be32(l2Off)]); // guest cluster 2 -> the L2 table itself
    let err: unknown;
    try { openHostImage(f).close(); } catch (e) { err = e; }
    expect(isFormatError(err), String(err)).toBe(true);
    expect(String(err)).toMatch(/L2 table/);
  });

  it('two L1 entries sharing one L2 table are refused', () => {
    const f = path.join(dir, 'shared.qcow');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow', f, '8M');
    qemuIoIn(dir, f, ['write -P 0x11 0 4k']);
    const l1Off = Number(new DataView(new Uint8Array(fs.readFileSync(f)).buffer).getBigUint64(40));
    patchFile(f, l1Off + 8, new Uint8Array(fs.readFileSync(f)).subarray(l1Off, l1Off + 8));
    expectFormatError(() => layerOf(f), /already uses/);
  });

  it('a compressed cluster running past the end of the file is refused', () => {
    const src = compressibleRaw('trunc-src.raw', 1 << 20);
    const f = path.join(dir, 'trunc.qcow');
    convertCompressed(src, f);
    fs.truncateSync(f, fs.statSync(f).size - 100);
    expectFormatError(() => layerOf(f), /compressed cluster .* not inside the file/);
  });

  it('a header shorter than 48 bytes is refused', () => {
    const f = path.join(dir, 'short.qcow');
    fs.writeFileSync(f, new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1, 0, 0]));
    expectFormatError(() => layerOf(f), /too small/);
  });
});
