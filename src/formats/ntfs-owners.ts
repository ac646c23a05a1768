/**
 * Who owns a cluster on NTFS: the proof, before a file is mapped onto the partition, that
 * no other file (nor a system file: $MFT, $LogFile, $Bitmap, $Boot, …, nor any other
 * attribute of the file itself) claims any of its clusters. $Bitmap only says a cluster is
 * in use, not by whom, so a runlist edited to point at another file's clusters (a
 * cross-link) passes it. The proof reads every MFT record once: each in-use record's
 * non-resident attributes (every type: $DATA, $INDEX_ALLOCATION, $BITMAP, an
 * $ATTRIBUTE_LIST's own clusters, …; extension records count for their base record) and
 * tests their runs against the target files' cluster ranges.
 *
 * Cost: one sequential read of the $MFT (1 KiB per record) and a scan that decodes
 * mapping pairs in place, with no object per record or run; a run is tested with one
 * binary search over the targets' ranges. Numbers: `npm run bench -- ntfs-owners`.
 *
 *   ClusterTargets: the target files' cluster ranges, sorted (makeClusterTargets)
 *   scanMftChunk(chunk, firstRecord, recordSize, targets): ClusterConflict | null
 *       Scans whole records of `chunk` (fixups applied to a copy only where a record is
 *       in use). A record that is in use but torn or malformed is a conflict of its own
 *       (`damaged`): what it claims cannot be known, so ownership is not proven.
 */
import { viewOf } from './host-volume.ts';

export interface ClusterRange {
  lcn: number;
  length: number;
  /** the MFT record (base record) of the file the range belongs to */
  record: number;
}

export interface ClusterTargets {
  starts: Float64Array;
  ends: Float64Array;
  records: Float64Array;
}

export type ClusterConflict =
  | { kind: 'claimed'; lcn: number; target: number; owner: number; attrType: number }
  | { kind: 'damaged'; record: number; why: string };

const AT_DATA = 0x80;
const AT_END = 0xffffffff;
const MFT_RECORD_IN_USE = 0x0001;
const FIXUP_STRIDE = 512;

/**
 * The ranges sorted by cluster; two ranges sharing a cluster are a conflict already
 * (two target files cross-linked with each other), returned instead.
 */
export function makeClusterTargets(ranges: readonly ClusterRange[]): ClusterTargets | ClusterConflict {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => a.lcn - b.lcn);
  const n = sorted.length;
  const t: ClusterTargets = { starts: new Float64Array(n), ends: new Float64Array(n), records: new Float64Array(n) };
  for (let i = 0; i < n; i++) {
    const r = sorted[i]!;
    if (i > 0 && r.lcn < t.ends[i - 1]!) return { kind: 'claimed', lcn: r.lcn, target: r.record, owner: t.records[i - 1]!, attrType: AT_DATA };
    t.starts[i] = r.lcn;
    t.ends[i] = r.lcn + r.length;
    t.records[i] = r.record;
  }
  return t;
}

/** The first cluster of [lcn, lcn+length) that a target range holds and that is not `owner`'s own $DATA, as a conflict; null when none. */
function testRun(t: ClusterTargets, lcn: number, length: number, owner: number, ownData: boolean, attrType: number): ClusterConflict | null {
  const end = lcn + length;
  // last target starting before the run's end; the ranges are disjoint and sorted, so their ends rise too
  let lo = 0;
  let hi = t.starts.length - 1;
  let k = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    if (t.starts[mid]! < end) { k = mid; lo = mid + 1; } else hi = mid - 1;
  }
  let hit: ClusterConflict | null = null;
  for (; k >= 0 && t.ends[k]! > lcn; k--) {
    if (ownData && t.records[k] === owner) continue;
    hit = { kind: 'claimed', lcn: Math.max(lcn, t.starts[k]!), target: t.records[k]!, owner, attrType };
  }
  return hit;
}

/**
 * Scans the records in `chunk` (a whole number of `recordSize`-byte records, the first one
 * numbered `firstRecord`). Returns the first conflict, or null. `chunk` is not modified.
 */
export function scanMftChunk(chunk: Uint8Array, firstRecord: number, recordSize: number, targets: ClusterTargets): ClusterConflict | null {
  if (targets.starts.length === 0) return null;
  const v = viewOf(chunk);
  const count = Math.floor(chunk.length / recordSize);
  const rec = new Uint8Array(recordSize);
  const rv = viewOf(rec);
  for (let i = 0; i < count; i++) {
    const at = i * recordSize;
    const no = firstRecord + i;
    // "FILE", in use; anything else (free, never used, "BAAD" of a record not in use) claims nothing
    if (chunk[at] !== 0x46 || chunk[at + 1] !== 0x49 || chunk[at + 2] !== 0x4c || chunk[at + 3] !== 0x45) {
      if (chunk[at] === 0x42 && chunk[at + 1] === 0x41 && chunk[at + 2] === 0x41 && chunk[at + 3] === 0x44) return { kind: 'damaged', record: no, why: 'is marked bad (BAAD)' };
      continue;
    }
    if (!(v.getUint16(at + 0x16, true) & MFT_RECORD_IN_USE)) continue;
    rec.set(chunk.subarray(at, at + recordSize));
    // fixups
    const usaOfs = rv.getUint16(4, true);
    const usaCount = rv.getUint16(6, true);
    if (usaCount !== recordSize / FIXUP_STRIDE + 1 || usaOfs % 2 !== 0 || usaOfs < 8 || usaOfs + usaCount * 2 > recordSize) {
      return { kind: 'damaged', record: no, why: `has an update sequence array that does not fit (offset ${usaOfs}, ${usaCount} entries)` };
    }
    const usn = rv.getUint16(usaOfs, true);
    for (let s = 1; s < usaCount; s++) {
      const e = s * FIXUP_STRIDE - 2;
      if (rv.getUint16(e, true) !== usn) return { kind: 'damaged', record: no, why: 'is torn (update sequence mismatch)' };
      rv.setUint16(e, rv.getUint16(usaOfs + s * 2, true), true);
    }
    const base = rv.getUint32(0x20, true) + rv.getUint16(0x24, true) * 2 ** 32;
    const owner = base !== 0 ? base : no;
    const firstAttr = rv.getUint16(0x14, true);
    const inUse = Math.min(rv.getUint32(0x18, true), recordSize);
    let pos = firstAttr;
    for (;;) {
      if (pos < 0x18 || pos + 4 > inUse) return { kind: 'damaged', record: no, why: 'has attributes past its bytes in use' };
      const type = rv.getUint32(pos, true);
      if (type === AT_END) break;
      if (pos + 16 > inUse) return { kind: 'damaged', record: no, why: `has an attribute cut short at ${pos}` };
      const len = rv.getUint32(pos + 4, true);
      if (len < 24 || len % 8 !== 0 || pos + len > inUse) return { kind: 'damaged', record: no, why: `has an attribute 0x${type.toString(16)} of length ${len} that does not fit` };
      if (rec[pos + 8] !== 0) {
        if (len < 0x40) return { kind: 'damaged', record: no, why: `has a non-resident attribute 0x${type.toString(16)} of only ${len} bytes` };
        const ownData = type === AT_DATA && rec[pos + 9] === 0; // the unnamed $DATA: the file itself
        let p = pos + rv.getUint16(pos + 0x20, true);
        const end = pos + len;
        let lcn = 0;
        while (p < end) {
          const header = rec[p]!;
          if (header === 0) break;
          const lenSize = header & 0x0f;
          const ofsSize = header >> 4;
          if (lenSize === 0 || lenSize > 8 || ofsSize > 8 || p + 1 + lenSize + ofsSize > end) {
            return { kind: 'damaged', record: no, why: `has a malformed runlist in attribute 0x${type.toString(16)}` };
          }
          let length = 0;
          for (let b = lenSize - 1; b >= 0; b--) length = length * 256 + rec[p + 1 + b]!;
          if (ofsSize > 0) {
            let delta = 0;
            for (let b = ofsSize - 1; b >= 0; b--) delta = delta * 256 + rec[p + 1 + lenSize + b]!;
            if (rec[p + lenSize + ofsSize]! & 0x80) delta -= 2 ** (8 * ofsSize);
            lcn += delta;
            if (length > 0 && lcn >= 0) {
              const hit = testRun(targets, lcn, length, owner, ownData, type);
              if (hit) return hit;
            }
          }
          p += 1 + lenSize + ofsSize;
        }
      }
      pos += len;
    }
  }
  return null;
}
