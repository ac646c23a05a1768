/**
 * The NTFS ownership scan on hand-built MFT records: who claims a cluster, counted by
 * file (an extension record for its base record), every attribute, and records that
 * cannot be read leave the proof open.
 */
import { describe, expect, it } from 'vitest';
import { makeClusterTargets, scanMftChunk, type ClusterTargets } from '../../src/formats/ntfs-owners.ts';

const RECORD = 1024;

interface RunAttr { type: number; name?: string; runs: [lcn: number, length: number][] }

/** One in-use FILE record with the given non-resident attributes (one run each), fixups applied as on disk. */
function record(opts: { base?: number; attrs: RunAttr[]; usn?: number; tornAt?: number }): Uint8Array {
  const b = new Uint8Array(RECORD);
  const v = new DataView(b.buffer);
  b.set([0x46, 0x49, 0x4c, 0x45]);
  v.setUint16(4, 0x30, true);
  v.setUint16(6, 3, true);
  v.setUint16(0x14, 0x38, true);
  v.setUint16(0x16, 1, true);
  v.setUint32(0x20, opts.base ?? 0, true);
  let pos = 0x38;
  for (const a of opts.attrs) {
    const nameLen = a.name?.length ?? 0;
    const len = (0x40 + nameLen * 2 + a.runs.length * 9 + 1 + 7) & ~7;
    v.setUint32(pos, a.type, true);
    v.setUint32(pos + 4, len, true);
    b[pos + 8] = 1;
    b[pos + 9] = nameLen;
    v.setUint16(pos + 0x0a, 0x40, true);
    for (let i = 0; i < nameLen; i++) v.setUint16(pos + 0x40 + 2 * i, a.name!.charCodeAt(i), true);
    v.setUint16(pos + 0x20, 0x40 + nameLen * 2, true);
    let p = pos + 0x40 + nameLen * 2;
    let prev = 0;
    for (const [lcn, length] of a.runs) {
      b[p] = 0x44; // 4-byte length, 4-byte offset
      v.setUint32(p + 1, length, true);
      v.setInt32(p + 5, lcn - prev, true);
      prev = lcn;
      p += 9;
    }
    pos += len;
  }
  v.setUint32(pos, 0xffffffff, true);
  v.setUint32(0x18, pos + 8, true);
  const usn = opts.usn ?? 7;
  v.setUint16(0x30, usn, true);
  for (let s = 1; s <= 2; s++) {
    v.setUint16(0x30 + 2 * s, v.getUint16(s * 512 - 2, true), true);
    v.setUint16(s * 512 - 2, s === opts.tornAt ? usn + 1 : usn, true);
  }
  return b;
}

function chunk(...records: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(records.length * RECORD);
  records.forEach((r, i) => out.set(r, i * RECORD));
  return out;
}

// the image: MFT record 40, clusters 1000..1099 and 5000..5009
const targets = makeClusterTargets([{ lcn: 1000, length: 100, record: 40 }, { lcn: 5000, length: 10, record: 40 }]) as ClusterTargets;
const free = new Uint8Array(RECORD);

describe('NTFS ownership scan', () => {
  it('the image\'s own $DATA, in its base record or an extension record, and other files elsewhere: no conflict', () => {
    const mft = chunk(
      record({ attrs: [{ type: 0x80, runs: [[10, 4]] }] }), // record 0: $MFT elsewhere
      free,
      record({ attrs: [{ type: 0x80, runs: [[1000, 100]] }] }), // record 2 stands for the image here
      record({ base: 2, attrs: [{ type: 0x80, runs: [[5000, 10]] }] }),
      record({ attrs: [{ type: 0x80, runs: [[1100, 50], [4990, 10]] }] }),
    );
    const own = makeClusterTargets([{ lcn: 1000, length: 100, record: 2 }, { lcn: 5000, length: 10, record: 2 }]) as ClusterTargets;
    expect(scanMftChunk(mft, 0, RECORD, own)).toBeNull();
  });

  it('another file\'s run into the image is a conflict naming that file\'s record and the first shared cluster', () => {
    const mft = chunk(free, record({ attrs: [{ type: 0x80, runs: [[1090, 20]] }] }));
    expect(scanMftChunk(mft, 70, RECORD, targets)).toEqual({ kind: 'claimed', lcn: 1090, target: 40, owner: 71, attrType: 0x80 });
  });

  it('an extension record claims for its base record; a directory\'s $INDEX_ALLOCATION counts too', () => {
    expect(scanMftChunk(chunk(record({ base: 12, attrs: [{ type: 0x80, runs: [[5005, 1]] }] })), 90, RECORD, targets)).toMatchObject({ owner: 12, lcn: 5005 });
    expect(scanMftChunk(chunk(record({ attrs: [{ type: 0xa0, name: '$I30', runs: [[999, 2]] }] })), 5, RECORD, targets)).toMatchObject({ owner: 5, lcn: 1000, attrType: 0xa0 });
  });

  it('a named stream of the image\'s own record on its clusters is a conflict too (only the unnamed $DATA is the image)', () => {
    const mft = chunk(record({ attrs: [{ type: 0x80, runs: [[1000, 100]] }, { type: 0x80, name: 'ads', runs: [[1050, 1]] }] }));
    expect(scanMftChunk(mft, 40, RECORD, targets)).toMatchObject({ kind: 'claimed', owner: 40, target: 40, lcn: 1050 });
  });

  it('a torn record in use leaves the proof open; a free record is not read', () => {
    expect(scanMftChunk(chunk(record({ attrs: [], tornAt: 2 })), 300, RECORD, targets)).toEqual({ kind: 'damaged', record: 300, why: 'is torn (update sequence mismatch)' });
    const notInUse = record({ attrs: [{ type: 0x80, runs: [[1000, 1]] }] });
    notInUse[0x16] = 0;
    expect(scanMftChunk(chunk(notInUse), 0, RECORD, targets)).toBeNull();
  });

  it('two target files sharing a cluster conflict before any record is read', () => {
    expect(makeClusterTargets([{ lcn: 10, length: 5, record: 40 }, { lcn: 14, length: 5, record: 41 }])).toMatchObject({ kind: 'claimed', lcn: 14 });
  });

  it('a run whose bytes cross a sector end is read with that sector\'s fixup applied', () => {
    // 60 runs of 9 bytes: the runlist crosses byte 510, where the record holds its update sequence number
    const runs: [number, number][] = Array.from({ length: 60 }, (_, k) => [20000 + k * 10, 5]);
    // run 43's header is at byte 507: its 4-byte length is at 508..511, across the sector end
    // at 510, whose bytes on disk hold the update sequence number (7) instead of the length's
    runs[43] = [900, 3];
    const r = record({ attrs: [{ type: 0x80, runs }] });
    expect(scanMftChunk(chunk(r), 7, RECORD, targets)).toBeNull(); // 900..902: not the image's
    expect(scanMftChunk(unaligned(chunk(r)), 7, RECORD, targets)).toBeNull();
    runs[43] = [1095, 3];
    const hit = record({ attrs: [{ type: 0x80, runs }] });
    expect(scanMftChunk(chunk(hit), 7, RECORD, targets)).toMatchObject({ kind: 'claimed', owner: 7, lcn: 1095 });
    // the same record scanned from an unaligned buffer goes through the byte-by-byte reader
    expect(scanMftChunk(unaligned(chunk(hit)), 7, RECORD, targets)).toMatchObject({ kind: 'claimed', owner: 7, lcn: 1095 });
  });

  it('the word-reading scan and the byte-by-byte reader agree on 3,000 seeded mutations of a chunk', () => {
    const long: [number, number][] = Array.from({ length: 60 }, (_, k) => [20000 + k * 7, 3]);
    const base = chunk(
      record({ attrs: [{ type: 0x80, runs: [[10, 4]] }] }),
      free,
      record({ attrs: [{ type: 0x80, runs: [[1000, 100]] }] }),
      record({ base: 2, attrs: [{ type: 0x80, runs: [[5000, 10]] }] }),
      record({ attrs: [{ type: 0xa0, name: '$I30', runs: [[3000, 2], [800, 1]] }, { type: 0x80, runs: [[1100, 50], [4990, 10]] }] }),
      record({ attrs: [{ type: 0x80, runs: long }] }),
    );
    const own = makeClusterTargets([{ lcn: 1000, length: 100, record: 2 }, { lcn: 5000, length: 10, record: 2 }]) as ClusterTargets;
    let x = 12345;
    const rnd = (n: number) => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) % n);
    let conflicts = 0;
    for (let i = 0; i < 3000; i++) {
      const m = base.slice();
      for (let k = 1 + rnd(4); k > 0; k--) {
        const rec = rnd(6) * RECORD;
        m[rec + rnd(RECORD)] = rnd(4) === 0 ? 0xff : rnd(256);
      }
      const fast = scanMftChunk(m.slice(), 0, RECORD, own);
      const slow = scanMftChunk(unaligned(m), 0, RECORD, own);
      expect(fast, `mutation ${i}`).toEqual(slow);
      if (fast) conflicts++;
    }
    // the mutations reach both outcomes
    expect(conflicts).toBeGreaterThan(100);
    expect(conflicts).toBeLessThan(2900);
  });
});

/** A copy of `b` at an odd byte offset of its buffer: scanMftChunk then reads it byte by byte. */
function unaligned(b: Uint8Array): Uint8Array {
  const buf = new Uint8Array(b.length + 1);
  buf.set(b, 1);
  return buf.subarray(1);
}
