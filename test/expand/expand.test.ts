import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { DataPhaseFailed } from '../../src/formats/expand/common.ts';
import { prepareExpansion } from '../../src/formats/expand/index.ts';
import { vhdFormat } from '../../src/formats/vhd.ts';
import { parseVhdxHeader } from '../../src/formats/vhdx.ts';
import { crc32c } from '../../src/formats/crc.ts';
import { fileOf, makeImage, QEMU_FMT, qemuCheck, qemuRaw, sha, tmpDir, unallocatedBytes } from './helpers.ts';
import { REAL_WORLD_DIR } from '../kit/data.ts';

const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const MiB = 1 << 20;

/** Scattered writes: inside a block, across a block boundary, near the end. */
function writesFor(sizeMiB: number): [number, number, number][] {
  return [[0, 4096, 0x11], [3 * MiB - 512, 8192, 0x22], [5 * MiB + 12345 - (12345 % 512), 65536, 0x33], [(sizeMiB - 1) * MiB, MiB, 0x44]];
}

function expand(img: string, opts: Parameters<ReturnType<typeof prepareExpansion>['run']>[1] = {}) {
  const f = fileOf(img);
  try {
    const prepared = prepareExpansion(f, img);
    const reached = prepared.run(f, opts);
    return { plan: prepared.plan, reached, size: f.size };
  } finally {
    f.close();
  }
}

function checkOk(img: string, format: string): void {
  const c = qemuCheck(img, QEMU_FMT[format]!);
  // qemu-img has no check for VHD (exit 63): the VHD tests read the image back through qemu and vdboot instead.
  if (format === 'vhd') {
    expect(c.code, c.out).toBe(63);
    const f = fileOf(img, true);
    try {
      expect(vhdFormat.open(f, { path: img, openFile: () => { throw new Error('no parent'); } }).subformat).toBe('dynamic');
    } finally {
      f.close();
    }
  } else expect(c.code, c.out).toBe(0);
}

const CASES: { format: 'vhd' | 'vdi' | 'vhdx' | 'vmdk'; sizeMiB: number; options?: string[] }[] = [
  { format: 'vmdk', sizeMiB: 24 },
  { format: 'vhd', sizeMiB: 24 },
  { format: 'vdi', sizeMiB: 24 },
  { format: 'vhdx', sizeMiB: 24, options: ['block_size=1M'] },
  { format: 'vhdx', sizeMiB: 40 },
];

describe.each(CASES)('expanding a dynamic $format in place ($sizeMiB MiB $options)', ({ format, sizeMiB, options }) => {
  const qf = QEMU_FMT[format]!;

  it('allocates every block, keeps the virtual disk byte-identical, and qemu-img check accepts it', () => {
    const img = makeImage(dir, format, sizeMiB, writesFor(sizeMiB), options);
    const before = qemuRaw(img, qf);
    expect(unallocatedBytes(img, qf)).toBeGreaterThan(0);
    const oldSize = fs.statSync(img).size;
    let last = 0;
    const r = expand(img, { progress: (done, total) => { expect(done).toBeGreaterThan(last); expect(done).toBeLessThanOrEqual(total); last = done; } });
    expect(r.reached).toBe('done');
    expect(r.plan.blocks).toBeGreaterThan(0);
    expect(last).toBe(r.plan.writeBytes);
    expect(fs.statSync(img).size).toBe(r.plan.newFileSize);
    expect(r.plan.newFileSize).toBeGreaterThan(oldSize);
    checkOk(img, format);
    expect(qemuRaw(img, qf).equals(before)).toBe(true);
    expect(unallocatedBytes(img, qf)).toBe(0);
    // a second expansion finds nothing to do and writes nothing
    const f = fileOf(img);
    const again = prepareExpansion(f, img);
    expect(again.plan.blocks).toBe(0);
    again.run(f, {});
    expect(f.writes).toBe(0);
    f.close();
    if (format === 'vhd') {
      // the footer moved to the end and matches the copy at offset 0
      const b = fs.readFileSync(img);
      expect(b.subarray(b.length - 512).equals(b.subarray(0, 512))).toBe(true);
    }
  });

  it('a crash after the data phase leaves an image that checks and reads the same; expanding again completes it', () => {
    const img = makeImage(dir, format, sizeMiB, writesFor(sizeMiB), options);
    const before = qemuRaw(img, qf);
    const unalloc = unallocatedBytes(img, qf);
    expect(expand(img, { stopAfter: 'data' }).reached).toBe('data');
    checkOk(img, format);
    expect(qemuRaw(img, qf).equals(before)).toBe(true);
    expect(unallocatedBytes(img, qf)).toBe(unalloc);
    expect(expand(img).reached).toBe('done');
    checkOk(img, format);
    expect(qemuRaw(img, qf).equals(before)).toBe(true);
    expect(unallocatedBytes(img, qf)).toBe(0);
  });

  it('a data phase that fails half-way (no room) is rolled back: the file is truncated to its former size, the image checks and reads the same', () => {
    const img = makeImage(dir, format, sizeMiB, writesFor(sizeMiB), options);
    const before = qemuRaw(img, qf);
    const unalloc = unallocatedBytes(img, qf);
    const oldBytes = fs.readFileSync(img);
    const f = fileOf(img);
    const prepared = prepareExpansion(f, img);
    // the host runs out of room after a few MiB of the new blocks
    let budget = 3 * MiB;
    const full: typeof f = Object.create(f, {
      write: { value: (offset: number, bytes: Uint8Array) => {
        if (offset + bytes.length > prepared.plan.fileSize) {
          budget -= bytes.length;
          if (budget < 0) throw Object.assign(new Error(`write ${offset}: ENOSPC`), { code: 'ENOSPC' });
        }
        f.write(offset, bytes);
      } },
    });
    let err: unknown;
    try {
      prepared.run(full, {});
    } catch (e) {
      err = e;
    } finally {
      f.close();
    }
    expect(err).toBeInstanceOf(DataPhaseFailed);
    expect((err as DataPhaseFailed).rollbackError).toBeUndefined();
    expect((err as Error).message).toMatch(/ENOSPC; rolled back: the file was truncated to its former \d+ bytes/);
    expect(fs.statSync(img).size).toBe(oldBytes.length);
    checkOk(img, format);
    expect(qemuRaw(img, qf).equals(before)).toBe(true);
    expect(unallocatedBytes(img, qf)).toBe(unalloc);
    // VHDX renewed its headers before the data phase; the other formats are byte-identical (VHD's footer is back at the end)
    if (format !== 'vhdx') expect(fs.readFileSync(img).equals(oldBytes)).toBe(true);
    expect(expand(img).reached).toBe('done');
    expect(qemuRaw(img, qf).equals(before)).toBe(true);
    expect(unallocatedBytes(img, qf)).toBe(0);
  });
});

describe('VHDX headers', () => {
  it('both headers are rewritten with higher sequence numbers and a new FileWriteGuid; DataWriteGuid changes only when the data will', () => {
    const img = makeImage(dir, 'vhdx', 16, writesFor(16), ['block_size=1M']);
    const heads = () => {
      const b = fs.readFileSync(img);
      return [64 * 1024, 128 * 1024].map((o) => parseVhdxHeader(new Uint8Array(b.subarray(o, o + 4096)), o, img)!);
    };
    const h0 = heads();
    const cur0 = h0.reduce((a, h) => (h.sequence > a.sequence ? h : a));
    const seq0 = cur0.sequence;
    expect(expand(img, { stopAfter: 'header' }).reached).toBe('header');
    const h1 = heads();
    expect(h1.map((h) => h.sequence).sort()).toEqual([seq0 + 1n, seq0 + 2n]);
    expect(h1[0]!.fileWriteGuid).toBe(h1[1]!.fileWriteGuid);
    expect(h0.map((h) => h.fileWriteGuid)).not.toContain(h1[0]!.fileWriteGuid);
    expect(h1.map((h) => h.dataWriteGuid)).toEqual([cur0.dataWriteGuid, cur0.dataWriteGuid]);
    checkOk(img, 'vhdx');
    expand(img, { dataWillChange: true });
    const h2 = heads();
    expect(h2[0]!.dataWriteGuid).not.toBe(cur0.dataWriteGuid);
    expect(h2[0]!.dataWriteGuid).toBe(h2[1]!.dataWriteGuid);
    checkOk(img, 'vhdx');
    expect(unallocatedBytes(img, 'vhdx')).toBe(0);
  });
});

describe('a fixed VHDX whose all-zero blocks are marked ZERO (qemu-img convert -o subformat=fixed)', () => {
  it('is expanded where its blocks already have space: the file does not grow, every block becomes present, the data reads the same', () => {
    const raw = path.join(dir, 'zero-holes.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 40 * MiB);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', `write -P 0x6b ${30 * MiB} 2M`, raw], { stdio: 'ignore' });
    const img = path.join(dir, 'fixed-zero.vhdx');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vhdx', '-o', 'subformat=fixed,block_size=8M', raw, img]);
    const before = qemuRaw(img, 'vhdx');
    const size = fs.statSync(img).size;
    expect(unallocatedBytes(img, 'vhdx')).toBeGreaterThan(0); // the ZERO blocks
    const r = expand(img, { dataWillChange: true });
    expect(r.reached).toBe('done');
    expect(r.plan.newFileSize).toBe(size);
    expect(fs.statSync(img).size).toBe(size);
    checkOk(img, 'vhdx');
    expect(unallocatedBytes(img, 'vhdx')).toBe(0);
    expect(qemuRaw(img, 'vhdx').equals(before)).toBe(true);
    expect(expand(img).plan.blocks).toBe(0);
  });
});

describe('expansion refuses cleanly, writing nothing', () => {
  const realWorld = REAL_WORLD_DIR;
  const unpack = (name: string): string => {
    const out = path.join(dir, name.replace(/\.(bz2|xz)$/, ''));
    execFileSync('sh', ['-c', `${name.endsWith('.xz') ? 'xz' : 'bzip2'} -dc '${realWorld}/${name}' > '${out}'`]);
    return out;
  };
  const refusal = (img: string): string => {
    const f = fileOf(img, true);
    try {
      prepareExpansion(f, img);
    } catch (e) {
      expect((e as Error).name).toBe('FormatError');
      return (e as Error).message;
    } finally {
      f.close();
    }
    throw new Error('expected a refusal');
  };

  it('a differencing VHD: its absent blocks are the parent\'s; the message names commit and snapshot', () => {
    const img = unpack('fat-differential.vhd.xz');
    const h = sha(img);
    const msg = refuse(img);
    expect(msg).toMatch(/differencing VHD/);
    expect(msg).toMatch(/qemu-img commit/);
    expect(msg).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(sha(img)).toBe(h);
    function refuse(p: string) { return refusal(p); }
  });

  it('a VHDX whose log is broken, a QCOW2, a truncated VHD and a VHD whose BAT points past the end', () => {
    // the sample's one log entry, with its tail pointing where no entry is: a log vdboot will not guess through
    const log = unpack('iotest-dirtylog-10G-4M.vhdx.bz2');
    const lb = fs.readFileSync(log);
    const lh = [64 * 1024, 128 * 1024].map((o) => parseVhdxHeader(lb.subarray(o, o + 4096), o, log)!).reduce((a, b) => (b.sequence > a.sequence ? b : a));
    let entryAt = -1;
    for (let at = 0; at < lh.logLength; at += 4096) if (lb.toString('latin1', lh.logOffset + at, lh.logOffset + at + 4) === 'loge') entryAt = at;
    expect(entryAt).toBeGreaterThanOrEqual(0);
    lb.writeUInt32LE((entryAt + 8 * 4096) % lh.logLength, lh.logOffset + entryAt + 12);
    lb.writeUInt32LE(0, lh.logOffset + entryAt + 4);
    lb.writeUInt32LE(crc32c(lb.subarray(lh.logOffset + entryAt, lh.logOffset + entryAt + lb.readUInt32LE(lh.logOffset + entryAt + 8))), lh.logOffset + entryAt + 4);
    fs.writeFileSync(log, lb);
    expect(refusal(log)).toMatch(/active sequence is broken/);
    const q = path.join(dir, 'x.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', q, '16M']);
    const qm = refusal(q);
    expect(qm).toMatch(/preallocation=metadata/);
    expect(qm).toMatch(/rd\.vdisk\.map=nbd/);
    const vhd = makeImage(dir, 'vhd', 8, [[0, 4096, 0x55]]);
    const bytes = fs.readFileSync(vhd);
    const cut = path.join(dir, 'cut.vhd');
    fs.writeFileSync(cut, bytes.subarray(0, 1536 + 100));
    expect(() => prepareExpansion(bytesReader(cut, new Uint8Array(fs.readFileSync(cut))), cut)).toThrow(/VHD|truncated|past the end/);
    // BAT entry 0 → far past the end of the file
    const bad = Buffer.from(bytes);
    const tableOffset = Number(bad.readBigUInt64BE(512 + 16));
    bad.writeUInt32BE(0x00ffff00, tableOffset);
    const badPath = path.join(dir, 'bad.vhd');
    fs.writeFileSync(badPath, bad);
    const h = sha(badPath);
    expect(refusal(badPath)).toMatch(/past the end/);
    expect(sha(badPath)).toBe(h);
  });

  it('split, streamOptimized and delta VMDKs are refused, naming what vdboot expands', () => {
    const so = path.join(dir, 'so.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=streamOptimized', so, '16M']);
    expect(refusal(so)).toMatch(/monolithicSparse|compressed/);
    const split = path.join(dir, 'split.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', split, '16M']);
    const f = fileOf(split, true);
    try {
      expect(() => prepareExpansion(f, split)).toThrow(/several files|monolithicSparse/);
    } finally {
      f.close();
    }
    const base = path.join(dir, 'base.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', base, '16M']);
    const delta = path.join(dir, 'delta.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', '-F', 'vmdk', '-b', base, delta]);
    const fd = fileOf(delta, true);
    try {
      expect(() => prepareExpansion(fd, delta)).toThrow(/delta|parent|several files/);
    } finally {
      fd.close();
    }
  });

  it('a VDI whose header miscounts its allocated blocks is refused with the repair to run', () => {
    const img = makeImage(dir, 'vdi', 8, [[0, 4096, 0x66], [3 * MiB, 4096, 0x67]]);
    const b = fs.readFileSync(img);
    b.writeUInt32LE(b.readUInt32LE(0x184) + 1, 0x184);
    fs.writeFileSync(img, b);
    expect(refusal(img)).toMatch(/qemu-img check -r all/);
  });
});

describe('real-world images', () => {
  it('empty dynamic VHDs from Virtual PC and Hyper-V 2012 R2 (136 GB): the plan counts every block and the growth, without writing', () => {
    for (const name of ['virtualpc-dynamic.vhd', 'hyperv2012r2-dynamic.vhd']) {
      const out = path.join(dir, name);
      execFileSync('sh', ['-c', `bzip2 -dc '${REAL_WORLD_DIR}/${name}.bz2' > '${out}'`]);
      const f = fileOf(out, true);
      try {
        const layer = vhdFormat.open(f, { path: out, openFile: () => { throw new Error('no parent'); } });
        const p = prepareExpansion(f, out).plan;
        expect(p.blockSize).toBe(2 * MiB);
        expect(p.blocks).toBe(Math.ceil(layer.size / p.blockSize));
        expect(p.writeBytes).toBe(p.blocks * (p.blockSize + 512));
        // the blocks start at the end of the image's structures (at the latest where the footer was), the footer after them
        const table = Number(fs.readFileSync(out).readBigUInt64BE(512 + 16));
        const start = p.newFileSize - 512 - p.writeBytes;
        expect(start).toBeGreaterThanOrEqual(table + p.blocks * 4);
        expect(start).toBeLessThanOrEqual(p.fileSize - 512);
      } finally {
        f.close();
      }
    }
  });

  it('a Disk2vhd VHD whose last block lies partly beyond the disk expands to the same bytes', () => {
    const out = path.join(dir, 'd2v.vhd');
    execFileSync('sh', ['-c', `bzip2 -dc '${REAL_WORLD_DIR}/d2v-zerofilled.vhd.bz2' > '${out}'`]);
    const before = qemuRaw(out, 'vpc');
    const r = expand(out);
    expect(r.reached).toBe('done');
    expect(qemuRaw(out, 'vpc').equals(before)).toBe(true);
    expect(unallocatedBytes(out, 'vpc')).toBe(0);
  });
});

describe('VHD sector bitmaps', () => {
  /** The virtual disk as vdboot's reader sees it: a clear bitmap bit of a dynamic VHD reads as zeros. */
  function vdbootRaw(img: string): Buffer {
    const f = fileOf(img, true);
    try {
      const layer = vhdFormat.open(f, { path: img, openFile: () => { throw new Error('no parent'); } });
      const out = Buffer.alloc(layer.size);
      for (const e of layer.extents) if (e.kind === 'data') out.set(f.read(e.offset, e.length), e.start);
      return out;
    } finally {
      f.close();
    }
  }

  it('an allocated block whose bitmap marks sectors absent: those sectors are zero-filled, then every bit is set, so every reader sees what vdboot saw', () => {
    const img = makeImage(dir, 'vhd', 8, [[0, 2 * MiB, 0x5a]]);
    const b = fs.readFileSync(img);
    const tableOffset = Number(b.readBigUInt64BE(512 + 16));
    const block0 = b.readUInt32BE(tableOffset) * 512;
    // sectors 8..23 of block 0 marked absent: bitmap bytes 1 and 2 cleared (data 0x5a stays behind them)
    b[block0 + 1] = 0;
    b[block0 + 2] = 0;
    fs.writeFileSync(img, b);
    const seen = vdbootRaw(img);
    expect(seen.subarray(8 * 512, 24 * 512).every((x) => x === 0)).toBe(true);
    expect(qemuRaw(img, 'vpc').equals(seen)).toBe(false); // qemu ignores a dynamic VHD's bitmaps
    const r = expand(img);
    expect(r.plan.partialBlocks).toBe(1);
    const after = fs.readFileSync(img);
    expect(after.subarray(block0, block0 + 512).every((x) => x === 0xff)).toBe(true);
    expect(vdbootRaw(img).equals(seen)).toBe(true);
    expect(qemuRaw(img, 'vpc').equals(seen)).toBe(true);
  });

  it('several partially written blocks with several absent runs each (bitmaps read again while expanding): every absent sector, and only those, is zero-filled', () => {
    const img = makeImage(dir, 'vhd', 12, [[0, 6 * MiB, 0x6b]]);
    const b = fs.readFileSync(img);
    const tableOffset = Number(b.readBigUInt64BE(512 + 16));
    // block 0: sectors 0..7 and 40..47 absent; block 2: sectors 3, 9..10 (inside bytes) and the block's last 8
    const bm = (k: number) => b.readUInt32BE(tableOffset + 4 * k) * 512;
    b[bm(0)] = 0;
    b[bm(0) + 5] = 0;
    b[bm(2)] = 0xef; // sector 3 clear
    b[bm(2) + 1] = 0x9f; // sectors 9, 10 clear
    b[bm(2) + 511] = 0;
    fs.writeFileSync(img, b);
    const seen = vdbootRaw(img);
    const absent = 8 + 8 + 1 + 2 + 8;
    const f = fileOf(img, true);
    const plan = prepareExpansion(f, img).plan;
    f.close();
    expect(plan.partialBlocks).toBe(2);
    expect(plan.writeBytes - plan.blocks * (plan.blockSize + 512)).toBe(absent * 512);
    expect(expand(img).reached).toBe('done');
    expect(vdbootRaw(img).equals(seen)).toBe(true);
    expect(qemuRaw(img, 'vpc').equals(seen)).toBe(true);
    // the data behind set bits is untouched: sector 2 of block 2 still holds the pattern
    expect(seen[2 * 2 * MiB + 2 * 512]).toBe(0x6b);
  });
});
