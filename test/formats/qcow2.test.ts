import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { qcow2Format } from '../../src/formats/qcow2.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { be32, checkAgainstQemu, expectSameBytes, makeTmpDir, patchFile, qemuImgIn, qemuIoIn, qemuRaw, readWholeImage, run } from '../kit/oracle.ts';
import { expectFormatError, openLayer } from '../kit/format.ts';
import { realWorld } from '../kit/data.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

let dir: string;
beforeAll(() => { dir = makeTmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/** Writes of patterns, zeroes and discards that cross cluster and L2 boundaries. */
function scribble(file: string, cs: number): void {
  qemuIoIn(dir, file, [
    'write -P 0x11 0 3k',
    `write -P 0x22 ${cs - 512} ${cs + 1024}`,
    `write -P 0x33 ${5 * cs} ${3 * cs}`,
    `write -z ${6 * cs} ${cs}`,
    `discard ${7 * cs} ${cs}`,
    'write -P 0x44 1M 64k',
    'write -z 1536k 256k',
    'write -P 0x55 3000k 100k',
    'discard 3072k 16k',
  ]);
}

const layerOf = (file: string) => openLayer((r, ctx) => qcow2Format.open(r, ctx), file);


describe('qcow2 reader against qemu-img', () => {
  for (const compat of ['0.10', '1.1']) {
    for (const cs of [512, 4096, 65536, 2097152]) {
      it(`compat=${compat} cluster_size=${cs}: patterns, zero writes and discards read as qemu-img convert, map as qemu-img map`, () => {
        const f = path.join(dir, `c${compat}-${cs}.qcow2`);
        qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', `compat=${compat},cluster_size=${cs}`, f, String(Math.max(4 << 20, 9 * cs)));
        scribble(f, cs);
        const img = checkAgainstQemu(f);
        expect(img.layers[0]!.layer.details.clusterSize).toBe(cs);
        expect(img.layers[0]!.layer.subformat).toBe(compat === '0.10' ? 'v2' : 'v3');
      });
    }
  }

  for (const opts of ['refcount_bits=1', 'refcount_bits=64', 'lazy_refcounts=on']) {
    it(`${opts}: refcount layout does not change the map (refcount blocks count as metadata)`, () => {
      const f = path.join(dir, `${opts.replace(/\W/g, '-')}.qcow2`);
      qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', `${opts},cluster_size=4k`, f, '4M');
      scribble(f, 4096);
      const img = checkAgainstQemu(f);
      expect(img.layers[0]!.layer.metadata!.some((m) => m.what === 'refcount block')).toBe(true);
    });
  }

  it('extended_l2=on: subcluster runs (allocated, zero, unallocated) map like qemu-img map', () => {
    const f = path.join(dir, 'ext.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', f, '4M');
    qemuIoIn(dir, f, ['write -P 0x61 2k 2k', 'write -P 0x62 9k 7k', 'write -z 20k 4k', 'write -P 0x63 62k 6k', 'discard 66k 2k', 'write -P 0x64 1M 1k']);
    const img = checkAgainstQemu(f);
    expect(img.layers[0]!.layer.details.extendedL2).toBe(true);
    expect(img.map.extents.some((e) => e.kind === 'data' && e.length === 2048)).toBe(true);
  });

  it('extended_l2 over a backing file: unallocated subclusters come from the parent', () => {
    const base = path.join(dir, 'extbase.qcow2');
    const top = path.join(dir, 'exttop.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuIoIn(dir, base, ['write -P 0x71 0 1M']);
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'extbase.qcow2', '-F', 'qcow2', top);
    qemuIoIn(dir, top, ['write -P 0x72 4k 2k', 'write -z 70k 4k', 'write -P 0x73 200k 10k']);
    checkAgainstQemu(top);
  });

  for (const prealloc of ['metadata', 'falloc', 'full']) {
    it(`preallocation=${prealloc}: preallocated clusters map as data (or zero) where qemu-img map says`, () => {
      const f = path.join(dir, `pre-${prealloc}.qcow2`);
      qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', `preallocation=${prealloc}`, f, '3M');
      qemuIoIn(dir, f, ['write -P 0x81 100k 200k', 'write -z 1M 64k']);
      checkAgainstQemu(f);
    });
  }

  it('external data file: data extents point into the data file at the offsets qemu-img map gives', () => {
    const f = path.join(dir, 'ext-data.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=ext-data.bin', f, '4M');
    qemuIoIn(dir, f, ['write -P 0x91 60k 10k', 'write -P 0x92 2M 128k', 'write -z 3M 64k']);
    const img = checkAgainstQemu(f);
    expect(img.map.files.map((n) => path.basename(n))).toEqual(['ext-data.qcow2', 'ext-data.bin']);
    expect(img.map.extents.filter((e) => e.kind === 'data').every((e) => e.kind === 'data' && e.file === 1)).toBe(true);
  });

  it('data_file_raw=on: data extents point into the raw data file at the guest offset', () => {
    const f = path.join(dir, 'raw-data.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'data_file=raw-data.bin,data_file_raw=on', f, '4M');
    qemuIoIn(dir, f, ['write -P 0xa1 60k 10k', 'write -z 3M 64k']);
    const img = checkAgainstQemu(f);
    const data = img.map.extents.filter((e) => e.kind === 'data');
    expect(data.length).toBeGreaterThan(0);
    expect(data.every((e) => e.kind === 'data' && e.file === 1 && e.offset === e.start)).toBe(true);
  });

  for (const [ct, extra] of [['zlib', ''], ['zstd', ''], ['zlib', ',extended_l2=on'], ['zstd', ',cluster_size=4k']] as const) {
    it(`compression_type=${ct}${extra} (qemu-img convert -c): compressed clusters are unmappable and read back through readUnmappable`, () => {
      const src = path.join(dir, `src-${ct}${extra}.raw`);
      const bytes = new Uint8Array(3 << 20);
      for (let i = 0; i < bytes.length; i++) bytes[i] = (i >> 12) % 3 === 0 ? 0 : (i * 7 + (i >> 9)) & 0xff;
      bytes.fill(0xee, 2 << 20, (2 << 20) + 70000);
      fs.writeFileSync(src, bytes);
      const f = path.join(dir, `comp-${ct}${extra}.qcow2`);
      qemuImgIn(dir, 'convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ct}${extra}`, src, f);
      qemuIoIn(dir, f, ['write -P 0xb1 1M 64k']);
      const img = checkAgainstQemu(f);
      const unmappable = img.map.extents.filter((e) => e.kind === 'unmappable');
      expect(unmappable.length).toBeGreaterThan(0);
      expect(unmappable.every((e) => e.kind === 'unmappable' && e.reason.startsWith(ct))).toBe(true);
    });
  }

  it('persistent dirty bitmaps (qemu-img bitmap --add): their directory, tables and data count as metadata', () => {
    const f = path.join(dir, 'bitmaps.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', f, '4M');
    qemuIoIn(dir, f, ['write -P 0xf1 0 1M']);
    qemuImgIn(dir, 'bitmap', '--add', f, 'b0');
    qemuImgIn(dir, 'bitmap', '--add', '-g', '64k', f, 'b1');
    qemuIoIn(dir, f, ['write -P 0xf2 2M 64k']);
    const img = checkAgainstQemu(f);
    const what = img.layers[0]!.layer.metadata!.map((m) => m.what);
    expect(what).toContain('bitmap directory');
    expect(what.filter((w) => /^bitmap \d+ table$/.test(w)).length).toBe(2);
    expect(what.some((w) => /^bitmap \d+ data$/.test(w))).toBe(true);
  });

  it('internal snapshots are ignored: the active L1 is the disk', () => {
    const f = path.join(dir, 'snap.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', f, '2M');
    qemuIoIn(dir, f, ['write -P 0xc1 0 1M']);
    qemuImgIn(dir, 'snapshot', '-c', 'first', f);
    qemuIoIn(dir, f, ['write -P 0xc2 64k 64k', 'discard 512k 128k']);
    const img = checkAgainstQemu(f);
    expect(img.layers[0]!.layer.details.snapshots).toBe(1);
  });

  it('a backing file named by an absolute path from another machine is found by its name next to the overlay', () => {
    const base = path.join(dir, 'moved-base.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', base, '2M');
    qemuIoIn(dir, base, ['write -P 0xe1 0 2M']);
    const top = path.join(dir, 'moved-top.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-b', 'moved-base.qcow2', '-F', 'qcow2', top);
    qemuIoIn(dir, top, ['write -P 0xe2 1M 64k']);
    const expected = qemuRaw(top);
    qemuImgIn(dir, 'rebase', '-u', '-b', '/var/lib/libvirt/images/moved-base.qcow2', '-F', 'qcow2', top);
    const img = openHostImage(top);
    try {
      expect(img.layers[0]!.layer.parent?.paths).toEqual(['/var/lib/libvirt/images/moved-base.qcow2', 'moved-base.qcow2']);
      expectSameBytes(readWholeImage(img), expected, 'overlay over its moved backing file');
    } finally {
      img.close();
    }
  });

  it('backing chain qcow2 -> qcow2 -> raw (with -F): overlays show through to the base', () => {
    const base = path.join(dir, 'chain-base.raw');
    fs.writeFileSync(base, new Uint8Array(2 << 20).fill(0x5a));
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-b', 'chain-base.raw', '-F', 'raw', path.join(dir, 'chain-mid.qcow2'));
    qemuIoIn(dir, path.join(dir, 'chain-mid.qcow2'), ['write -P 0xd1 60k 10k', 'write -z 1M 64k']);
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'chain-mid.qcow2', '-F', 'qcow2', path.join(dir, 'chain-top.qcow2'), '3M');
    qemuIoIn(dir, path.join(dir, 'chain-top.qcow2'), ['write -P 0xd2 62k 4k', 'discard 1M 4k', 'write -P 0xd3 2500k 4k']);
    const img = checkAgainstQemu(path.join(dir, 'chain-top.qcow2'), { rawDepths: [2] });
    expect(img.layers.map((l) => l.layer.format)).toEqual(['qcow2', 'qcow2', 'raw']);
    expect(img.layers[0]!.layer.parent?.format).toBe('qcow2');
  });
});

describe('qcow2 real-world images', () => {
  for (const name of ['ext2.qcow2.xz', 'windows_volume.qcow2.xz']) {
    it(`${name} reads as qemu-img convert and maps as qemu-img map`, () => {
      const f = realWorld(name, dir);
      checkAgainstQemu(f);
    });
  }
});

describe('qcow2 damaged or unsupported images', () => {
  function fresh(name: string, opts = 'compat=1.1'): string {
    const f = path.join(dir, name);
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', opts, f, '4M');
    qemuIoIn(dir, f, ['write -P 0x11 0 128k']);
    return f;
  }

  it('encryption (crypt_method 1) is refused with a message naming it', () => {
    const f = fresh('enc.qcow2');
    patchFile(f, 32, be32(1));
    expectFormatError(() => layerOf(f), /encrypted.*crypt_method 1.*AES/);
  });

  it('LUKS-encrypted image made by qemu-img is refused naming LUKS', () => {
    const f = path.join(dir, 'luks.qcow2');
    // qemu-img times its PBKDF with the thread's CPU clock; on a coarse clock the first
    // measurement can read 0 ms and it gives up ("Unable to get accurate CPU usage"): retry.
    for (let attempt = 1; ; attempt++) {
      try {
        qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=secret', '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', f, '1M');
        break;
      } catch (e) {
        if (attempt >= 20 || !/accurate CPU usage/.test(String((e as Error).message))) throw e;
      }
    }
    expectFormatError(() => layerOf(f), /encrypted.*LUKS/);
  });

  it('unknown incompatible feature bits are refused, naming the bits', () => {
    const f = fresh('incompat.qcow2');
    patchFile(f, 72, [0, 0, 0, 0, 0, 0, 0x01, 0x20]); // bits 8 and 5
    expectFormatError(() => layerOf(f), /bit 5.*bit 8|bit 8.*bit 5/);
  });

  it('an image left dirty by a crash (lazy_refcounts, qemu-io abort) reads as qemu-img convert and reports dirty', () => {
    const f = path.join(dir, 'dirty.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k', f, '4M');
    expect(() => run('qemu-io', ['-c', 'write -P 0x5a 8k 20k', '-c', 'abort', f], { cwd: dir })).toThrow();
    const img = checkAgainstQemu(f);
    expect(img.layers[0]!.layer.details.dirty).toBe(true);
    expect(img.map.extents.some((e) => e.kind === 'data')).toBe(true);
    expect(layerOf(fresh('clean.qcow2')).details.dirty).toBe(false);
  });

  it('the corrupt bit is refused, naming qemu-img check', () => {
    const f = fresh('corrupt.qcow2');
    patchFile(f, 79, [0x02]);
    expectFormatError(() => layerOf(f), /corrupt.*qemu-img check/);
  });

  it('an L1 size claiming 2^31 entries fails quickly without allocating', () => {
    const f = fresh('l1.qcow2');
    patchFile(f, 24, [0, 0, 0x40, 0, 0, 0, 0, 0]); // size 2^46
    patchFile(f, 36, be32(0x7fffffff));
    expectFormatError(() => layerOf(f), /L1 table .* past the end/);
  });

  it('a virtual size larger than the L1 table covers is refused', () => {
    const f = fresh('small-l1.qcow2');
    patchFile(f, 24, [0, 0, 0x40, 0, 0, 0, 0, 0]);
    expectFormatError(() => layerOf(f), /too few/);
  });

  it('an L2 entry pointing at the L1 table is refused by the chain resolver as metadata overlap', () => {
    const f = fresh('overlap.qcow2');
    const r = openFileReader(f);
    const hdr = r.read(0, 104);
    r.close();
    const dv = new DataView(hdr.buffer, hdr.byteOffset);
    const l1Off = Number(dv.getBigUint64(40));
    const r2 = openFileReader(f);
    const l2Off = Number(new DataView(r2.read(l1Off, 8).buffer).getBigUint64(0) & 0x00fffffffffffe00n);
    r2.close();
    patchFile(f, l2Off, [0x80, 0, 0, 0, ...be32(l1Off)]);
    let err: unknown;
    try { openHostImage(f).close(); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect(String(err)).toMatch(/L1 table/);
  });

  it('two L1 entries sharing one L2 table are refused (a small file cannot describe a huge disk)', () => {
    const f = path.join(dir, 'shared-l2.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '8M');
    qemuIoIn(dir, f, ['write -P 0x11 0 4k']);
    const hdr = new DataView(new Uint8Array(fs.readFileSync(f)).buffer);
    const l1Off = Number(hdr.getBigUint64(40));
    const l1 = new Uint8Array(fs.readFileSync(f)).subarray(l1Off, l1Off + 8);
    patchFile(f, l1Off + 8, l1);
    expectFormatError(() => layerOf(f), /L2 table .* already uses/);
  });

  it('a truncated image names the L2 table past the end', () => {
    const f = fresh('trunc.qcow2');
    const size = fs.statSync(f).size;
    fs.truncateSync(f, size - 128 * 1024);
    expectFormatError(() => layerOf(f), /past the end/);
  });

  it('a backing_fmt naming a format vdboot cannot read is refused', () => {
    const f = path.join(dir, 'bfmt.qcow2');
    fs.writeFileSync(path.join(dir, 'bfmt-base.raw'), new Uint8Array(1 << 20));
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-b', 'bfmt-base.raw', '-F', 'raw', f);
    const bytes = fs.readFileSync(f);
    const at = bytes.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    patchFile(f, at + 8, Buffer.from('vvf'));
    expectFormatError(() => layerOf(f), /format "vvf"/);
  });
});
