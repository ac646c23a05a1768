/**
 * A synthetic exFAT volume for bench/ntfs-owners.ts's exFAT part, engine-neutral (it runs
 * on Node and, bundled, on the native QuickJS): a large volume (1 TiB at 128 KiB clusters,
 * as Windows formats it) with many small files in many directories and one big image
 * file, contiguous (NoFatChain) or FAT-chained in fragments. Only the metadata is stored;
 * the reader returns zeros for the rest of the cluster heap.
 *
 *   exfatModel({ files, perDir, imageBytes, fragments }): { reader, imagePath }
 */
import type { BlockReader } from '../../src/formats/block-reader.ts';

const SECTOR = 512;

export interface ExfatModelOptions {
  /** small files (one cluster each, NoFatChain) */
  files: number;
  /** files per directory (the directories are children of the root) */
  perDir: number;
  imageBytes: number;
  /** 1: one NoFatChain extent; more: a FAT chain in that many pieces */
  fragments: number;
  clusterShift?: number;
  volumeBytes?: number;
}

function entrySet(name: string, attributes: number, first: number, length: number, noFatChain: boolean): Uint8Array {
  const names = Math.ceil(name.length / 15);
  const set = new Uint8Array((2 + names) * 32);
  const v = new DataView(set.buffer);
  set[0] = 0x85;
  set[1] = 1 + names;
  v.setUint16(4, attributes, true);
  set[32] = 0xc0;
  set[33] = noFatChain ? 0x03 : 0x01;
  set[35] = name.length;
  v.setBigUint64(40, BigInt(length), true);
  v.setUint32(52, first, true);
  v.setBigUint64(56, BigInt(length), true);
  for (let k = 0; k < names; k++) {
    set[64 + k * 32] = 0xc1;
    for (let i = 0; i < 15 && k * 15 + i < name.length; i++) v.setUint16(64 + k * 32 + 2 + i * 2, name.charCodeAt(k * 15 + i), true);
  }
  let sum = 0;
  for (let i = 0; i < set.length; i++) {
    if (i === 2 || i === 3) continue;
    sum = (((sum & 1) ? 0x8000 : 0) + (sum >> 1) + set[i]!) & 0xffff;
  }
  v.setUint16(2, sum, true);
  return set;
}

export function exfatModel(o: ExfatModelOptions): { reader: BlockReader; imagePath: string } {
  const clusterShift = o.clusterShift ?? 8; // 128 KiB
  const cs = SECTOR << clusterShift;
  const volumeBytes = o.volumeBytes ?? 2 ** 40;
  const fatOffsetSectors = 2048;
  const heapOffsetSectors = 2048 * 64; // 64 MiB in
  const clusterCount = Math.floor((volumeBytes - heapOffsetSectors * SECTOR) / cs);
  const fatLengthSectors = Math.ceil(((clusterCount + 2) * 4) / SECTOR);
  if (fatOffsetSectors + fatLengthSectors > heapOffsetSectors) throw new Error('exfatModel: the FAT does not fit before the heap');
  const fat = new Uint8Array(fatLengthSectors * SECTOR);
  const fatv = new DataView(fat.buffer);
  const heap = new Map<number, Uint8Array>(); // cluster -> its bytes (metadata clusters only)
  const bitmap = new Uint8Array(Math.ceil(clusterCount / 8));
  let next = 2;
  const alloc = (n: number): number => {
    const first = next;
    for (let c = first; c < first + n; c++) bitmap[(c - 2) >> 3]! |= 1 << ((c - 2) & 7);
    next += n;
    return first;
  };
  const chain = (clusters: number[]): void => {
    for (let i = 0; i < clusters.length; i++) fatv.setUint32(clusters[i]! * 4, i + 1 < clusters.length ? clusters[i + 1]! : 0xffffffff, true);
  };
  const put = (first: number, bytes: Uint8Array, chained: number[] | null): void => {
    const n = Math.ceil(bytes.length / cs);
    for (let k = 0; k < n; k++) heap.set(chained ? chained[k]! : first + k, bytes.subarray(k * cs, (k + 1) * cs));
  };
  // the allocation bitmap's own clusters first, then the root (filled in at the end)
  const bitmapFirst = alloc(Math.ceil(bitmap.length / cs));
  chain(Array.from({ length: Math.ceil(bitmap.length / cs) }, (_, k) => bitmapFirst + k));
  const dirs = Math.ceil(o.files / o.perDir);
  const rootBytes = (2 + dirs * 3) * 32;
  const rootClusters = Math.ceil(rootBytes / cs);
  const rootFirst = alloc(rootClusters);
  const rootChain = Array.from({ length: rootClusters }, (_, k) => rootFirst + k);
  chain(rootChain);
  const root = new Uint8Array(rootClusters * cs);
  root[0] = 0x81;
  new DataView(root.buffer).setUint32(20, bitmapFirst, true);
  new DataView(root.buffer).setBigUint64(24, BigInt(bitmap.length), true);
  let rootPos = 32;
  // the image: contiguous, or in pieces with a free cluster between them, FAT-chained
  const imageClusters = Math.ceil(o.imageBytes / cs);
  let imageFirst: number;
  if (o.fragments <= 1) imageFirst = alloc(imageClusters);
  else {
    const list: number[] = [];
    const per = Math.ceil(imageClusters / o.fragments);
    for (let left = imageClusters; left > 0; left -= per) {
      const f = alloc(Math.min(per, left));
      for (let k = 0; k < Math.min(per, left); k++) list.push(f + k);
      next++; // a gap
    }
    imageFirst = list[0]!;
    chain(list);
  }
  const img = entrySet('image.vhdx', 0x20, imageFirst, o.imageBytes, o.fragments <= 1);
  root.set(img, rootPos);
  rootPos += img.length;
  // the directories and their files
  for (let d = 0; d < dirs; d++) {
    const n = Math.min(o.perDir, o.files - d * o.perDir);
    const bytes = new Uint8Array(Math.max(cs, Math.ceil((n * 96) / cs) * cs));
    let pos = 0;
    for (let f = 0; f < n; f++) {
      const set = entrySet(`file${f}.dat`, 0x20, alloc(1), 4096, true);
      bytes.set(set, pos);
      pos += set.length;
    }
    const dirClusters = bytes.length / cs;
    const first = alloc(dirClusters);
    put(first, bytes, null);
    const e = entrySet(`dir${d}`, 0x10, first, bytes.length, true);
    root.set(e, rootPos);
    rootPos += e.length;
  }
  put(bitmapFirst, bitmap, null);
  put(rootFirst, root, rootChain);
  // the boot region: sectors 0..10 and their checksum in sector 11
  const boot = new Uint8Array(12 * SECTOR);
  const bv = new DataView(boot.buffer);
  boot.set([0xeb, 0x76, 0x90, 0x45, 0x58, 0x46, 0x41, 0x54, 0x20, 0x20, 0x20], 0);
  bv.setBigUint64(72, BigInt(volumeBytes / SECTOR), true);
  bv.setUint32(80, fatOffsetSectors, true);
  bv.setUint32(84, fatLengthSectors, true);
  bv.setUint32(88, heapOffsetSectors, true);
  bv.setUint32(92, clusterCount, true);
  bv.setUint32(96, rootFirst, true);
  boot[108] = 9;
  boot[109] = clusterShift;
  boot[110] = 1;
  boot[510] = 0x55;
  boot[511] = 0xaa;
  let sum = 0;
  for (let i = 0; i < 11 * SECTOR; i++) {
    if (i === 106 || i === 107 || i === 112) continue;
    sum = (((sum & 1) ? 0x80000000 : 0) + (sum >>> 1) + boot[i]!) >>> 0;
  }
  for (let o2 = 11 * SECTOR; o2 < 12 * SECTOR; o2 += 4) bv.setUint32(o2, sum, true);
  const fatStart = fatOffsetSectors * SECTOR;
  const heapStart = heapOffsetSectors * SECTOR;
  const reader: BlockReader = {
    name: 'model-exfat',
    size: volumeBytes,
    read(offset: number, length: number): Uint8Array {
      if (offset < 0 || length < 0 || offset + length > volumeBytes) throw new Error(`model read of ${length} at ${offset} past the end`);
      // a read inside one stored cluster (a directory, the bitmap): its bytes as they are, as a pread would give them
      if (offset >= heapStart && length > 0) {
        const c = Math.floor((offset - heapStart) / cs) + 2;
        const at = heapStart + (c - 2) * cs;
        const b = heap.get(c);
        if (b && offset + length <= at + b.length) return b.slice(offset - at, offset - at + length);
      }
      const out = new Uint8Array(length);
      const copy = (src: Uint8Array, at: number) => {
        const from = Math.max(offset, at);
        const to = Math.min(offset + length, at + src.length);
        if (to > from) out.set(src.subarray(from - at, to - at), from - offset);
      };
      copy(boot, 0);
      copy(fat, fatStart);
      if (offset + length > heapStart) {
        const c0 = Math.max(2, Math.floor((offset - heapStart) / cs) + 2);
        const c1 = Math.floor((offset + length - 1 - heapStart) / cs) + 2;
        for (let c = c0; c <= c1; c++) {
          const b = heap.get(c);
          if (b) copy(b, heapStart + (c - 2) * cs);
        }
      }
      return out;
    },
  };
  return { reader, imagePath: '/image.vhdx' };
}

