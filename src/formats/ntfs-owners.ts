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
 *       Scans whole records of `chunk` (fixups applied in place where a record is in use). A record that is in use but torn or malformed is a conflict of its own
 *       (`damaged`): what it claims cannot be known, so ownership is not proven.
 */
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
 * numbered `firstRecord`). Returns the first conflict, or null. The fixups of in-use
 * records are applied to `chunk` in place (the caller's own buffer, read for this).
 *
 * Written for the interpreter: bytes read by index (no DataView calls), no object per
 * record or run; a run outside every target range costs two comparisons.
 */
export function scanMftChunk(chunk: Uint8Array, firstRecord: number, recordSize: number, targets: ClusterTargets): ClusterConflict | null {
  const nTargets = targets.starts.length;
  if (nTargets === 0) return null;
  const lowest = targets.starts[0]!;
  const highest = targets.ends[nTargets - 1]!;
  const b = chunk;
  const count = Math.floor(b.length / recordSize);
  const strides = recordSize / FIXUP_STRIDE;
  for (let i = 0, at = 0; i < count; i++, at += recordSize) {
    const no = firstRecord + i;
    // "FILE", in use; anything else (free, never used, a "BAAD" record) is looked at no further
    if (b[at] !== 0x46 || b[at + 1] !== 0x49 || b[at + 2] !== 0x4c || b[at + 3] !== 0x45) {
      if (b[at] === 0x42 && b[at + 1] === 0x41 && b[at + 2] === 0x41 && b[at + 3] === 0x44) return { kind: 'damaged', record: no, why: 'is marked bad (BAAD)' };
      continue;
    }
    if (!(b[at + 0x16]! & MFT_RECORD_IN_USE)) continue;
    const usaOfs = b[at + 4]! | (b[at + 5]! << 8);
    const usaCount = b[at + 6]! | (b[at + 7]! << 8);
    if (usaCount !== strides + 1 || usaOfs % 2 !== 0 || usaOfs < 8 || usaOfs + usaCount * 2 > recordSize) {
      return { kind: 'damaged', record: no, why: `has an update sequence array that does not fit (offset ${usaOfs}, ${usaCount} entries)` };
    }
    const u = at + usaOfs;
    for (let s = 1; s <= strides; s++) {
      const e = at + s * FIXUP_STRIDE - 2;
      if (b[e] !== b[u] || b[e + 1] !== b[u + 1]) return { kind: 'damaged', record: no, why: 'is torn (update sequence mismatch)' };
      b[e] = b[u + 2 * s]!;
      b[e + 1] = b[u + 2 * s + 1]!;
    }
    const base = (b[at + 0x20]! | (b[at + 0x21]! << 8) | (b[at + 0x22]! << 16)) + b[at + 0x23]! * 0x1000000 + (b[at + 0x24]! | (b[at + 0x25]! << 8)) * 0x100000000;
    const owner = base !== 0 ? base : no;
    const inUse = Math.min((b[at + 0x18]! | (b[at + 0x19]! << 8) | (b[at + 0x1a]! << 16)) + b[at + 0x1b]! * 0x1000000, recordSize);
    let pos = b[at + 0x14]! | (b[at + 0x15]! << 8);
    for (;;) {
      if (pos < 0x18 || pos + 4 > inUse) return { kind: 'damaged', record: no, why: 'has attributes past its bytes in use' };
      const q = at + pos;
      if (b[q] === 0xff && b[q + 1] === 0xff && b[q + 2] === 0xff && b[q + 3] === 0xff) break;
      if (pos + 16 > inUse) return { kind: 'damaged', record: no, why: `has an attribute cut short at ${pos}` };
      const len = (b[q + 4]! | (b[q + 5]! << 8) | (b[q + 6]! << 16)) + b[q + 7]! * 0x1000000;
      if (len < 24 || (len & 7) !== 0 || pos + len > inUse) return { kind: 'damaged', record: no, why: `has an attribute of length ${len} at ${pos} that does not fit` };
      if (b[q + 8] !== 0) {
        const type = (b[q]! | (b[q + 1]! << 8) | (b[q + 2]! << 16)) + b[q + 3]! * 0x1000000;
        if (len < 0x40) return { kind: 'damaged', record: no, why: `has a non-resident attribute 0x${type.toString(16)} of only ${len} bytes` };
        const ownData = type === AT_DATA && b[q + 9] === 0; // the unnamed $DATA: the file itself
        let p = q + (b[q + 0x20]! | (b[q + 0x21]! << 8));
        const end = q + len;
        let lcn = 0;
        while (p < end) {
          const header = b[p]!;
          if (header === 0) break;
          const lenSize = header & 0x0f;
          const ofsSize = header >> 4;
          if (lenSize === 0 || lenSize > 8 || ofsSize > 8 || p + 1 + lenSize + ofsSize > end) {
            return { kind: 'damaged', record: no, why: `has a malformed runlist in attribute 0x${type.toString(16)}` };
          }
          if (ofsSize > 0) {
            let length = 0;
            for (let k = p + lenSize; k > p; k--) length = length * 256 + b[k]!;
            const o = p + 1 + lenSize;
            let delta = 0;
            for (let k = o + ofsSize - 1; k >= o; k--) delta = delta * 256 + b[k]!;
            if (b[o + ofsSize - 1]! & 0x80) delta -= 2 ** (8 * ofsSize);
            lcn += delta;
            if (length > 0 && lcn + length > lowest && lcn < highest) {
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
