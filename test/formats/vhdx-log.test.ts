/**
 * The VHDX log (src/formats/vhdx-log.ts): a file left as a crash leaves it — data written,
 * the BAT update only in the log — is read through the log, replayed for a read-write boot,
 * and expanded with its log written first. The oracle is qemu: `qemu-img check -r all`
 * replays the log of a copy, then `qemu-img convert -O raw`.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { prepareExpansion } from '../../src/formats/expand/index.ts';
import { vhdxHeaderRenewal } from '../../src/formats/expand/vhdx.ts';
import { parseVhdxHeader, vhdxFormat } from '../../src/formats/vhdx.ts';
import { fileOf, qemuCheck } from '../expand/helpers.ts';
import { cleanupTmpDirs, makeTmpDir, qemuImg, qemuIo, readWholeImage } from '../kit/oracle.ts';
import { realWorld } from '../kit/data.ts';
import { openHostImage } from '../../src/sys/host-image.ts';
import { currentHeader, fixHeaderCrc, vhdxLayout, writeLogEntry } from './vhdx-patch.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;
const LOG_GUID = Buffer.from('8f3a5c1e0b2d4e6f9a7c3b1d5e2f4a6c', 'hex');

/** qemu's reading after its own replay of the log (on a copy). */
function replayedByQemu(p: string): Buffer {
  const dir = path.dirname(p);
  const copy = path.join(dir, `qemu-replayed-${path.basename(p)}`);
  fs.copyFileSync(p, copy);
  const r = spawnSync('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', copy], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img check -r all: ${r.stdout}${r.stderr}`);
  const raw = path.join(dir, `qemu-replayed-${path.basename(p)}.raw`);
  execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', copy, raw]);
  return fs.readFileSync(raw);
}

/** qemu opens it read-only only when no log needs replaying. */
function qemuSeesNoLog(p: string): boolean {
  return spawnSync('qemu-img', ['info', '-f', 'vhdx', p], { encoding: 'utf8' }).status === 0;
}

/** After the log was written out: qemu opens the file read-only (no log left) and its check passes. */
function expectLogWrittenOut(p: string): void {
  expect(qemuSeesNoLog(p)).toBe(true);
  const c = qemuCheck(p, 'vhdx');
  expect(c.code, c.out).toBe(0);
}

function ourBytes(p: string): Buffer {
  const img = openHostImage(p);
  try {
    return readWholeImage(img);
  } finally {
    img.close();
  }
}

/**
 * A 16 MiB dynamic VHDX (1 MiB blocks) with blocks 0–1 written, then block 5 written too, but
 * its BAT sector put back as it was before that write and the new one left in the log: what a
 * crash between the log write and the BAT write leaves. Returns the file and the two BAT sectors.
 */
function crashed(dir: string, name = 'crashed.vhdx') {
  const p = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', p, String(16 * MiB));
  qemuIo(p, 'vhdx', ['write -P 0x11 0 2M']);
  const { batOffset } = vhdxLayout(fs.readFileSync(p));
  const batBefore = fs.readFileSync(p).subarray(batOffset, batOffset + 4096);
  qemuIo(p, 'vhdx', ['write -P 0x22 5M 1M']);
  const b = fs.readFileSync(p);
  const batAfter = Buffer.from(b.subarray(batOffset, batOffset + 4096));
  expect(batAfter.equals(batBefore)).toBe(false);
  batBefore.copy(b, batOffset);
  writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 7n, writes: [{ offset: batOffset, data: batAfter }] });
  fs.writeFileSync(p, b);
  return { p, batOffset, batBefore, batAfter };
}

describe('VHDX log: reading through it', () => {
  it('a crash after the data and the log but before the BAT: read through the log, the block is there, as qemu reads it after its replay; the file is not written', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const before = fs.readFileSync(p);
    expect(qemuSeesNoLog(p)).toBe(false);
    const expected = replayedByQemu(p);
    expect(expected.subarray(5 * MiB, 6 * MiB).every((x) => x === 0x22)).toBe(true);
    expect(ourBytes(p).equals(expected)).toBe(true);
    const img = openHostImage(p);
    try {
      expect(img.layers[0]!.layer.details.log).toMatch(/1 entry \(sequence 7–7\), 1 write replayed in memory/);
    } finally {
      img.close();
    }
    expect(fs.readFileSync(p).equals(before)).toBe(true);
  });

  it('two entries from the tail to the head are replayed in order; an older entry elsewhere in the log is not', () => {
    const dir = makeTmpDir();
    const { p, batOffset, batBefore, batAfter } = crashed(dir);
    const b = fs.readFileSync(p);
    // a stale entry of an earlier sequence that would wipe the BAT, far from the active one
    writeLogEntry(b, LOG_GUID, { at: 512 * 1024, tail: 512 * 1024, sequence: 3n, zeros: [{ offset: batOffset, length: 4096 }] });
    // the active sequence: 8 writes garbage over the BAT sector, 9 (the head, tail at 8's place) writes the real one
    const garbage = Buffer.alloc(4096, 0xee);
    const len = writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, writes: [{ offset: batOffset, data: garbage }] });
    writeLogEntry(b, LOG_GUID, { at: len, tail: 0, sequence: 9n, writes: [{ offset: batOffset, data: batAfter }] });
    batBefore.copy(b, batOffset);
    fs.writeFileSync(p, b);
    expect(ourBytes(p).equals(replayedByQemu(p))).toBe(true);
  });

  it('a sequence that wraps around the end of the log is followed from its tail', () => {
    const dir = makeTmpDir();
    const { p, batOffset, batAfter } = crashed(dir);
    const b = fs.readFileSync(p);
    const logLength = currentHeader(b).logLength;
    const first = logLength - 4096; // 2 sectors: its data sector lies at the start of the log
    const len = writeLogEntry(b, LOG_GUID, { at: first, tail: first, sequence: 20n, writes: [{ offset: batOffset, data: Buffer.alloc(4096, 0xee) }] });
    writeLogEntry(b, LOG_GUID, { at: (first + len) % logLength, tail: first, sequence: 21n, writes: [{ offset: batOffset, data: batAfter }] });
    fs.writeFileSync(p, b);
    const ours = ourBytes(p);
    expect(ours.subarray(5 * MiB, 6 * MiB).every((x) => x === 0x22)).toBe(true);
    expect(ours.equals(replayedByQemu(p))).toBe(true);
  });

  it('an entry whose checksum fails is no entry: nothing to replay, the file read as it is, as qemu reads it', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const b = fs.readFileSync(p);
    const h = currentHeader(b);
    b[h.logOffset + 4096 + 100]! ^= 0xff; // inside the entry's data sector
    fs.writeFileSync(p, b);
    const ours = ourBytes(p);
    expect(ours.subarray(5 * MiB, 6 * MiB).every((x) => x === 0)).toBe(true);
    const raw = path.join(dir, 'as-is.raw');
    execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', p, raw]);
    expect(ours.equals(fs.readFileSync(raw))).toBe(true);
  });

  it('refused, naming what is wrong: a broken sequence, a write into the headers, past the file, or onto the disk\'s data', () => {
    const dir = makeTmpDir();
    const open = (b: Buffer, name: string) => {
      const f = path.join(dir, name);
      fs.writeFileSync(f, b);
      return () => openHostImage(f).close();
    };
    const base = crashed(dir);
    const clean = fs.readFileSync(base.p);
    const h = currentHeader(clean);
    // the head's tail names a place with no entry
    let b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 4 * 4096, tail: 12 * 4096, sequence: 30n, writes: [{ offset: base.batOffset, data: base.batAfter }] });
    expect(open(b, 'tail.vhdx')).toThrow(/active sequence is broken .*log offset 49152/);
    b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, writes: [{ offset: h.offset, data: Buffer.alloc(4096) }] });
    expect(open(b, 'headers.vhdx')).toThrow(/into the file headers/);
    b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, zeros: [{ offset: b.length - 4096, length: 8192 }] });
    expect(open(b, 'past.vhdx')).toThrow(/past the end of the/);
    b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, writes: [{ offset: h.logOffset, data: Buffer.alloc(4096) }] });
    expect(open(b, 'intolog.vhdx')).toThrow(/into the log itself/);
    // block 0's data: its BAT entry says where
    const entry0 = clean.readUInt32LE(base.batOffset);
    const block0 = (entry0 >>> 20) * MiB;
    b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, writes: [{ offset: block0, data: Buffer.alloc(4096, 0x99) }] });
    expect(open(b, 'data.vhdx')).toThrow(/hold the disk's data/);
    b = Buffer.from(clean);
    writeLogEntry(b, LOG_GUID, { at: 0, tail: 0, sequence: 8n, writes: [{ offset: base.batOffset, data: base.batAfter }], flushedFileOffset: b.length + MiB });
    expect(open(b, 'flushed.vhdx')).toThrow(/truncated or damaged/);
  });

  it('the Hyper-V-era sample with a log: read through it, its map is that of the copy qemu replayed', () => {
    const dir = makeTmpDir();
    const p = realWorld('iotest-dirtylog-10G-4M.vhdx.bz2', dir);
    const copy = path.join(dir, 'replayed.vhdx');
    fs.copyFileSync(p, copy);
    execFileSync('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', copy]);
    // its one log entry rewrites a BAT sector: damaged in the file, the log restores it
    const img = openHostImage(p);
    const replayed = openHostImage(copy);
    try {
      const w = img.layers[0]!.layer.logReplay!.writes;
      expect(w.length).toBe(1);
      expect(img.map.extents).toEqual(replayed.map.extents);
      const damaged = fs.readFileSync(p);
      damaged.fill(0, w[0]!.offset, w[0]!.offset + 4096);
      const d = path.join(dir, 'damaged.vhdx');
      fs.writeFileSync(d, damaged);
      const di = openHostImage(d);
      try {
        expect(di.map.extents).toEqual(replayed.map.extents);
      } finally {
        di.close();
      }
    } finally {
      img.close();
      replayed.close();
    }
  });
});

describe('VHDX log: writing it out', () => {
  it('a read-write boot\'s writes: the log\'s updates, then headers that name no log; qemu then opens it read-only, check passes, it reads the same', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const expected = replayedByQemu(p);
    const f = fileOf(p);
    try {
      const layer = vhdxFormat.open(f, { path: p, openFile: () => { throw new Error('no parent'); } });
      const writes = vhdxHeaderRenewal(f, p, layer.logReplay?.writes ?? []);
      expect(writes.length).toBe(3);
      for (const w of writes) {
        f.write(w.offset, w.bytes);
        f.sync();
      }
    } finally {
      f.close();
    }
    expectLogWrittenOut(p);
    const b = fs.readFileSync(p);
    for (const o of [64 * 1024, 128 * 1024]) expect(parseVhdxHeader(b.subarray(o, o + 4096), o, p)!.logGuid).toBe('00000000-0000-0000-0000-000000000000');
    expect(ourBytes(p).equals(expected)).toBe(true);
  });

  it('expansion in place writes the log first: no log afterwards, every block allocated, the same bytes', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const expected = replayedByQemu(p);
    const f = fileOf(p);
    try {
      const prepared = prepareExpansion(f, p);
      expect(prepared.plan.blocks).toBe(16 - 3);
      expect(prepared.run(f, { dataWillChange: true })).toBe('done');
    } finally {
      f.close();
    }
    expectLogWrittenOut(p);
    const img = openHostImage(p);
    try {
      expect(img.map.extents.every((e) => e.kind === 'data')).toBe(true);
      expect(readWholeImage(img).equals(expected)).toBe(true);
    } finally {
      img.close();
    }
  });
});

describe('VHDX log: bounded work on a crafted log', () => {
  it('a log of would-be entries (every sector "loge", the whole log long, checksums wrong) is refused quickly, not searched for minutes', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const b = fs.readFileSync(p);
    const h = currentHeader(b);
    for (let at = 0; at < h.logLength; at += 4096) {
      const o = h.logOffset + at;
      b.fill(0, o, o + 4096);
      b.write('loge', o, 'latin1');
      b.writeUInt32LE(h.logLength, o + 8);
      b.writeBigUInt64LE(1n, o + 16);
      LOG_GUID.copy(b, o + 32);
    }
    fs.writeFileSync(p, b);
    const t0 = Date.now();
    expect(() => openHostImage(p).close()).toThrow(/more overlapping would-be entries than a log can/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('a log over 32 MiB is refused before it is read; a log GUID with no log region is no log, as qemu reads it', () => {
    const dir = makeTmpDir();
    const { p } = crashed(dir);
    const b = fs.readFileSync(p);
    const h = currentHeader(b);
    b.writeUInt32LE(64 * MiB, h.offset + 68);
    fixHeaderCrc(b, h.offset);
    const big = path.join(dir, 'big-log.vhdx');
    fs.writeFileSync(big, b);
    expect(() => openHostImage(big).close()).toThrow(/more than the 32 MiB vdboot replays/);
    b.writeUInt32LE(0, h.offset + 68);
    fixHeaderCrc(b, h.offset);
    const none = path.join(dir, 'no-log.vhdx');
    fs.writeFileSync(none, b);
    const img = openHostImage(none);
    try {
      expect(img.layers[0]!.layer.details.log).toBe('no valid entries');
    } finally {
      img.close();
    }
  });
});
