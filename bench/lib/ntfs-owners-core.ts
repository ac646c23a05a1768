/**
 * The synthetic $MFT of bench/ntfs-owners.ts and its scan, engine-neutral so the same code
 * runs on Node and, bundled, inside QuickJS.
 */
import { makeClusterTargets, scanMftChunk, type ClusterTargets } from '../../src/formats/ntfs-owners.ts';

export const RECORD = 1024;
const PER_CHUNK = 1024;

/** One 1 MiB chunk of 1,024 in-use records (fixups applied as on disk), runs spread over `clusters`. */
export function syntheticMftChunk(seed: number, clusters: number): Uint8Array {
  const b = new Uint8Array(RECORD * PER_CHUNK);
  const v = new DataView(b.buffer);
  let x = seed >>> 0 || 1;
  const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32);
  for (let i = 0; i < PER_CHUNK; i++) {
    const at = i * RECORD;
    b.set([0x46, 0x49, 0x4c, 0x45], at);
    v.setUint16(at + 4, 0x30, true); // USA offset
    v.setUint16(at + 6, 3, true); // USA count: 1 + 2 strides
    const dir = i % 8 === 0;
    v.setUint16(at + 0x16, dir ? 3 : 1, true);
    v.setUint16(at + 0x14, 0x38, true);
    let pos = at + 0x38;
    const attr = (type: number, len: number, nonResident: boolean) => {
      v.setUint32(pos, type, true);
      v.setUint32(pos + 4, len, true);
      b[pos + 8] = nonResident ? 1 : 0;
      const start = pos;
      pos += len;
      return start;
    };
    attr(0x10, 0x60, false);
    const fn = attr(0x30, 0x68 + 24, false);
    b[fn + 0x18 + 0x40] = 12;
    const runs = (start: number, n: number) => {
      v.setUint16(start + 0x20, 0x40, true);
      let p = start + 0x40;
      let prev = 0;
      for (let k = 0; k < n; k++) {
        const lcn = Math.floor(rnd() * (clusters - 4096));
        const delta = lcn - prev;
        prev = lcn;
        b[p] = 0x41; // 1-byte length, 4-byte offset
        b[p + 1] = 1 + Math.floor(rnd() * 200);
        v.setInt32(p + 2, delta, true);
        p += 6;
      }
    };
    if (dir) runs(attr(0xa0, 0x48, true), 1);
    const kind = rnd();
    if (kind < 0.2) attr(0x80, 0x30, false);
    else {
      const n = kind < 0.3 ? 3 : 1;
      runs(attr(0x80, (0x40 + n * 6 + 1 + 7) & ~7, true), n);
    }
    v.setUint32(pos, 0xffffffff, true);
    v.setUint32(at + 0x18, pos + 8 - at, true);
    // fixups: the last two bytes of each 512-byte stride hold the USN, the array the originals
    const usn = 1 + (i & 0x7fff);
    v.setUint16(at + 0x30, usn, true);
    for (let s = 1; s <= 2; s++) {
      v.setUint16(at + 0x30 + 2 * s, v.getUint16(at + s * 512 - 2, true), true);
      v.setUint16(at + s * 512 - 2, usn, true);
    }
  }
  return b;
}

/** An image file in `fragments` pieces, placed where no synthetic run is (past every run). */
export function imageTargets(fragments: number, clusters: number): ClusterTargets {
  const t = makeClusterTargets(Array.from({ length: fragments }, (_, k) => ({ lcn: clusters + k * 4096, length: 2048, record: 100 })));
  if ('kind' in t) throw new Error('targets overlap');
  return t;
}

/**
 * Scans `records` records (the four synthetic chunks over and over). `bytewise`: through the
 * byte-by-byte reader (each chunk copied to an unaligned buffer, which sends it there), the
 * reference the word-reading scan is measured against.
 */
export function scanAll(records: number, clusters: number, fragments: number, bytewise = false): { ms: number; conflicts: number } {
  const chunks = [syntheticMftChunk(1, clusters), syntheticMftChunk(2, clusters), syntheticMftChunk(3, clusters), syntheticMftChunk(4, clusters)];
  const targets = imageTargets(fragments, clusters);
  const t0 = Date.now();
  let conflicts = 0;
  for (let first = 0; first < records; first += PER_CHUNK) {
    // a fresh buffer per chunk, as a read gives: the scan applies fixups in place
    const src = chunks[(first / PER_CHUNK) & 3]!;
    let chunk: Uint8Array;
    if (bytewise) {
      const buf = new Uint8Array(src.length + 1);
      buf.set(src, 1);
      chunk = buf.subarray(1);
    } else chunk = src.slice();
    if (scanMftChunk(chunk, first, RECORD, targets)) conflicts++;
  }
  return { ms: Date.now() - t0, conflicts };
}

