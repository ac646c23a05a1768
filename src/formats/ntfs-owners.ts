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

/** true where typed arrays are little-endian (every machine vdboot boots on; the fast scan's word reads need it) */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Scans the records in `chunk` (a whole number of `recordSize`-byte records, the first one
 * numbered `firstRecord`). Returns the first conflict, or null. Fixups are checked in
 * every in-use record (a torn one is `damaged`) and applied to `chunk` in place only where a
 * record's bytes in use reach the sector end they replace.
 *
 * Written for the interpreter (measured in bench/ntfs-owners.ts on the native QuickJS
 * host): header fields and attribute headers are read as 16/32-bit words from views of the
 * same buffer (one access instead of four bytes and three shifts), resident attributes are
 * stepped over by their length alone, runlists are decoded only in non-resident
 * attributes, a run outside every target range costs two comparisons, and no object is
 * made per record or run. A chunk that is not word-aligned, or a record whose first
 * attribute is not, goes through the byte-by-byte reader (scanRecordBytes), which accepts
 * the same records.
 */
export function scanMftChunk(chunk: Uint8Array, firstRecord: number, recordSize: number, targets: ClusterTargets): ClusterConflict | null {
  if (targets.starts.length === 0) return null;
  const count = Math.floor(chunk.length / recordSize);
  if (!LITTLE_ENDIAN || chunk.byteOffset % 4 !== 0 || recordSize % FIXUP_STRIDE !== 0) {
    for (let i = 0; i < count; i++) {
      const hit = scanRecordBytes(chunk, i * recordSize, firstRecord + i, recordSize, targets);
      if (hit) return hit;
    }
    return null;
  }
  const nTargets = targets.starts.length;
  const lowest = targets.starts[0]!;
  const highest = targets.ends[nTargets - 1]!;
  const b = chunk;
  const w16 = new Uint16Array(b.buffer, b.byteOffset, b.length >> 1);
  const w32 = new Uint32Array(b.buffer, b.byteOffset, b.length >> 2);
  const strides = recordSize / FIXUP_STRIDE;
  for (let i = 0, at = 0; i < count; i++, at += recordSize) {
    const sig = w32[at >> 2]!;
    // "FILE", in use; anything else (free, never used, a "BAAD" record) is looked at no further
    if (sig !== 0x454c4946) {
      if (sig === 0x44414142) return { kind: 'damaged', record: firstRecord + i, why: 'is marked bad (BAAD)' };
      continue;
    }
    const h = at >> 1;
    if (!(w16[h + 0x0b]! & MFT_RECORD_IN_USE)) continue;
    let pos = w16[h + 0x0a]!;
    if ((pos & 3) !== 0) {
      const hit = scanRecordBytes(b, at, firstRecord + i, recordSize, targets);
      if (hit) return hit;
      continue;
    }
    const no = firstRecord + i;
    const usaOfs = w16[h + 2]!;
    const usaCount = w16[h + 3]!;
    if (usaCount !== strides + 1 || usaOfs % 2 !== 0 || usaOfs < 8 || usaOfs + usaCount * 2 > recordSize) {
      return { kind: 'damaged', record: no, why: `has an update sequence array that does not fit (offset ${usaOfs}, ${usaCount} entries)` };
    }
    let inUse = w32[(at >> 2) + 6]!;
    if (inUse > recordSize) inUse = recordSize;
    const u = (at + usaOfs) >> 1;
    const usn = w16[u]!;
    for (let s = 1, e = h + 255; s <= strides; s++, e += 256) {
      if (w16[e] !== usn) return { kind: 'damaged', record: no, why: 'is torn (update sequence mismatch)' };
      // the sector's last two bytes are read below only when the bytes in use reach them
      if (e * 2 - at < inUse) w16[e] = w16[u + s]!;
    }
    const baseHigh = w16[h + 0x12]!;
    // (no float arithmetic in the common case: the interpreter's mixed int/float operations are its slow path)
    const base = baseHigh === 0 ? w32[(at >> 2) + 8]! : w32[(at >> 2) + 8]! + baseHigh * 0x100000000;
    const owner = base !== 0 ? base : no;
    for (;;) {
      if (pos < 0x18 || pos + 4 > inUse) return { kind: 'damaged', record: no, why: 'has attributes past its bytes in use' };
      const q = at + pos;
      const type = w32[q >> 2]!;
      if (type === 0xffffffff) break;
      if (pos + 16 > inUse) return { kind: 'damaged', record: no, why: `has an attribute cut short at ${pos}` };
      const len = w32[(q >> 2) + 1]!;
      if (len < 24 || (len & 7) !== 0 || pos + len > inUse) return { kind: 'damaged', record: no, why: `has an attribute of length ${len} at ${pos} that does not fit` };
      if (b[q + 8] !== 0) {
        if (len < 0x40) return { kind: 'damaged', record: no, why: `has a non-resident attribute 0x${type.toString(16)} of only ${len} bytes` };
        const ownData = type === AT_DATA && b[q + 9] === 0; // the unnamed $DATA: the file itself
        let p = q + w16[(q >> 1) + 0x10]!;
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
            let length = b[p + 1]!;
            if (lenSize > 1) {
              length = 0;
              for (let k = p + lenSize; k > p; k--) length = length * 256 + b[k]!;
            }
            const o = p + 1 + lenSize;
            let delta: number;
            // the common widths without a loop; the top byte's sign bit makes the delta negative
            if (ofsSize === 4) delta = (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24));
            else if (ofsSize === 3) delta = ((b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) << 8) >> 8;
            else if (ofsSize === 2) delta = ((b[o]! | (b[o + 1]! << 8)) << 16) >> 16;
            else if (ofsSize === 1) delta = (b[o]! << 24) >> 24;
            else {
              delta = 0;
              for (let k = o + ofsSize - 1; k >= o; k--) delta = delta * 256 + b[k]!;
              if (b[o + ofsSize - 1]! & 0x80) delta -= 2 ** (8 * ofsSize);
            }
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

/**
 * One record at `at` read byte by byte: the reference reader, used where word reads are not
 * possible (a big-endian host, an unaligned buffer or first attribute). Fixups of an in-use
 * record are applied in place.
 */
function scanRecordBytes(b: Uint8Array, at: number, no: number, recordSize: number, targets: ClusterTargets): ClusterConflict | null {
  const nTargets = targets.starts.length;
  const lowest = targets.starts[0]!;
  const highest = targets.ends[nTargets - 1]!;
  const strides = Math.floor(recordSize / FIXUP_STRIDE);
  if (b[at] !== 0x46 || b[at + 1] !== 0x49 || b[at + 2] !== 0x4c || b[at + 3] !== 0x45) {
    if (b[at] === 0x42 && b[at + 1] === 0x41 && b[at + 2] === 0x41 && b[at + 3] === 0x44) return { kind: 'damaged', record: no, why: 'is marked bad (BAAD)' };
    return null;
  }
  if (!(b[at + 0x16]! & MFT_RECORD_IN_USE)) return null;
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
      const ownData = type === AT_DATA && b[q + 9] === 0;
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
  return null;
}
