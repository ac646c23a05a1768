/**
 * Adds directories and files to a freshly made exFAT image (mkfs.exfat), for test disks:
 * exfatprogs cannot add files without mounting. Deliberately small: every file and new
 * directory gets one contiguous run of clusters with a FAT chain written too, names are
 * assumed unique, and the root directory grows through its FAT chain when it fills up.
 * Checked against fsck.exfat and the Linux exfat driver by the harness's tests.
 *
 * Layout (exFAT specification, section numbers in brackets):
 *   boot sector [3.1]: FatOffset@0x50, ClusterHeapOffset@0x58, ClusterCount@0x5C,
 *   FirstClusterOfRootDirectory@0x60, BytesPerSectorShift@0x6C, SectorsPerClusterShift@0x6D.
 *   Directory entry sets [6.3, 7.4, 7.6, 7.7]: File 0x85, Stream Extension 0xC0, File Name 0xC1.
 */
import fs from 'node:fs';

const ENTRY = 32;
const FAT_EOC = 0xffffffff;

interface Volume {
  fd: number;
  bytesPerSector: number;
  clusterSize: number;
  fatOffset: number;
  heapOffset: number;
  clusterCount: number;
  rootCluster: number;
  bitmap: Uint8Array;
  bitmapCluster: number;
  upcase: Uint16Array;
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  const n = fs.readSync(fd, b, 0, length, offset);
  if (n !== length) throw new Error(`exFAT image: short read at ${offset} (${n} of ${length} bytes)`);
  return b;
}

function clusterOffset(v: Volume, cluster: number): number {
  if (cluster < 2 || cluster >= v.clusterCount + 2) throw new Error(`exFAT image: cluster ${cluster} out of range`);
  return v.heapOffset + (cluster - 2) * v.clusterSize;
}

function readFat(v: Volume, cluster: number): number {
  return readAt(v.fd, v.fatOffset + cluster * 4, 4).readUInt32LE(0);
}

function writeFat(v: Volume, cluster: number, next: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(next >>> 0, 0);
  fs.writeSync(v.fd, b, 0, 4, v.fatOffset + cluster * 4);
}

function chainOf(v: Volume, first: number): number[] {
  const chain: number[] = [];
  for (let c = first; c >= 2 && c < v.clusterCount + 2; c = readFat(v, c)) {
    if (chain.length > v.clusterCount) throw new Error('exFAT image: FAT chain loops');
    chain.push(c);
  }
  return chain;
}

function openVolume(fd: number): Volume {
  const boot = readAt(fd, 0, 512);
  if (boot.toString('latin1', 3, 11) !== 'EXFAT   ') throw new Error('Not an exFAT image (no "EXFAT   " signature).');
  const bytesPerSector = 1 << boot[0x6c]!;
  const clusterSize = bytesPerSector << boot[0x6d]!;
  const v: Volume = {
    fd,
    bytesPerSector,
    clusterSize,
    fatOffset: boot.readUInt32LE(0x50) * bytesPerSector,
    heapOffset: boot.readUInt32LE(0x58) * bytesPerSector,
    clusterCount: boot.readUInt32LE(0x5c),
    rootCluster: boot.readUInt32LE(0x60),
    bitmap: new Uint8Array(0),
    bitmapCluster: 0,
    upcase: new Uint16Array(0),
  };
  // The root directory holds the allocation bitmap (0x81) and up-case table (0x82) entries.
  const root = readChain(v, v.rootCluster);
  for (let at = 0; at < root.length && root[at] !== 0; at += ENTRY) {
    const type = root[at]!;
    const first = root.readUInt32LE(at + 20);
    const length = Number(root.readBigUInt64LE(at + 24));
    if (type === 0x81) {
      v.bitmapCluster = first;
      v.bitmap = new Uint8Array(readAt(fd, clusterOffset(v, first), length));
    } else if (type === 0x82) {
      v.upcase = expandUpcase(readAt(fd, clusterOffset(v, first), length));
    }
  }
  if (!v.bitmapCluster) throw new Error('exFAT image: no allocation bitmap entry in the root directory.');
  return v;
}

function readChain(v: Volume, first: number): Buffer {
  return Buffer.concat(chainOf(v, first).map((c) => readAt(v.fd, clusterOffset(v, c), v.clusterSize)));
}

/** The up-case table is stored compressed: 0xFFFF, N means "the next N characters map to themselves" [7.2.5.1]. */
function expandUpcase(raw: Buffer): Uint16Array {
  const table = new Uint16Array(0x10000);
  for (let i = 0; i < table.length; i++) table[i] = i;
  let ch = 0;
  for (let i = 0; i + 1 < raw.length && ch < 0x10000; i += 2) {
    const u = raw.readUInt16LE(i);
    if (u === 0xffff && i + 3 < raw.length) {
      ch += raw.readUInt16LE(i + 2);
      i += 2;
    } else {
      table[ch++] = u;
    }
  }
  return table;
}

function allocate(v: Volume, count: number): number {
  let run = 0;
  for (let i = 0; i < v.clusterCount; i++) {
    const used = (v.bitmap[i >> 3]! >> (i & 7)) & 1;
    run = used ? 0 : run + 1;
    if (run === count) {
      const start = i - count + 1;
      for (let j = start; j <= i; j++) v.bitmap[j >> 3]! |= 1 << (j & 7);
      for (let j = 0; j < count; j++) writeFat(v, start + 2 + j, j === count - 1 ? FAT_EOC : start + 3 + j);
      return start + 2;
    }
  }
  throw new Error(`exFAT image full: no run of ${count} free clusters.`);
}

function checksum16(bytes: Uint8Array, skip?: [number, number]): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (skip && (i === skip[0] || i === skip[1])) continue;
    sum = (((sum & 1) ? 0x8000 : 0) + (sum >> 1) + bytes[i]!) & 0xffff;
  }
  return sum;
}

function dosTimestamp(date: Date): number {
  return (
    ((date.getUTCFullYear() - 1980) << 25) | ((date.getUTCMonth() + 1) << 21) | (date.getUTCDate() << 16) |
    (date.getUTCHours() << 11) | (date.getUTCMinutes() << 5) | (date.getUTCSeconds() >> 1)
  ) >>> 0;
}

/** The entry set of one file or directory [6.3]. */
function entrySet(v: Volume, name: string, isDir: boolean, firstCluster: number, length: number, when: Date): Buffer {
  const units: number[] = [];
  for (let i = 0; i < name.length; i++) units.push(name.charCodeAt(i));
  if (units.length === 0 || units.length > 255) throw new Error(`exFAT name "${name}" must have 1 to 255 UTF-16 characters.`);
  const nameEntries = Math.ceil(units.length / 15);
  const set = Buffer.alloc(ENTRY * (2 + nameEntries));
  const ts = dosTimestamp(when);
  set[0] = 0x85;
  set[1] = 1 + nameEntries;
  set.writeUInt16LE(isDir ? 0x10 : 0x20, 4);
  set.writeUInt32LE(ts, 8);
  set.writeUInt32LE(ts, 12);
  set.writeUInt32LE(ts, 16);
  set[22] = set[23] = set[24] = 0x80; // UTC offsets valid, +0
  const s = ENTRY;
  set[s] = 0xc0;
  set[s + 1] = 0x01; // AllocationPossible; the FAT chain is valid (NoFatChain clear)
  set[s + 3] = units.length;
  const upcased = new Uint8Array(units.length * 2);
  units.forEach((u, i) => {
    const up = v.upcase[u]!;
    upcased[2 * i] = up & 0xff;
    upcased[2 * i + 1] = up >> 8;
  });
  set.writeUInt16LE(checksum16(upcased), s + 4);
  set.writeBigUInt64LE(BigInt(length), s + 8);
  set.writeUInt32LE(length > 0 ? firstCluster : 0, s + 20);
  set.writeBigUInt64LE(BigInt(length), s + 24);
  for (let n = 0; n < nameEntries; n++) {
    const e = ENTRY * (2 + n);
    set[e] = 0xc1;
    for (let k = 0; k < 15; k++) {
      const u = units[n * 15 + k];
      if (u !== undefined) set.writeUInt16LE(u, e + 2 + 2 * k);
    }
  }
  set.writeUInt16LE(checksum16(set, [2, 3]), 2);
  return set;
}

interface DirNode {
  children: Map<string, DirNode | Uint8Array>;
  cluster?: number;
  size?: number;
}

/**
 * Adds `files` (absolute path → bytes) and `dirs` (absolute paths, parents before children)
 * to the exFAT image. The image must not contain these names already.
 */
export function writeExfatFiles(image: string, files: Record<string, Uint8Array>, dirs: string[] = []): void {
  const when = process.env.SOURCE_DATE_EPOCH ? new Date(Number(process.env.SOURCE_DATE_EPOCH) * 1000) : new Date();
  const fd = fs.openSync(image, 'r+');
  try {
    const v = openVolume(fd);
    const root: DirNode = { children: new Map() };
    const dirAt = (p: string): DirNode => {
      let node = root;
      for (const part of p.split('/').filter(Boolean)) {
        let next = node.children.get(part);
        if (next === undefined) {
          next = { children: new Map() };
          node.children.set(part, next);
        }
        if (next instanceof Uint8Array) throw new Error(`exFAT: ${p} is both a file and a directory.`);
        node = next;
      }
      return node;
    };
    for (const d of dirs) dirAt(d);
    for (const [p, bytes] of Object.entries(files)) {
      const parts = p.split('/').filter(Boolean);
      const leaf = parts.pop();
      if (!leaf) throw new Error(`exFAT: "${p}" names no file.`);
      dirAt(parts.join('/')).children.set(leaf, bytes);
    }
    const setBytes = (node: DirNode): number => {
      let n = 0;
      for (const name of node.children.keys()) n += ENTRY * (2 + Math.ceil(name.length / 15));
      return n;
    };
    // Allocate and write depth first: a directory's size is known from its children.
    const writeDir = (node: DirNode, isRoot: boolean): void => {
      const sets: Buffer[] = [];
      for (const [name, child] of node.children) {
        if (child instanceof Uint8Array) {
          let first = 0;
          if (child.length > 0) {
            first = allocate(v, Math.ceil(child.length / v.clusterSize));
            fs.writeSync(fd, child, 0, child.length, clusterOffset(v, first));
          }
          sets.push(entrySet(v, name, false, first, child.length, when));
        } else {
          // +1 entry keeps an end-of-directory marker inside the allocation
          const size = Math.max(1, Math.ceil((setBytes(child) + ENTRY) / v.clusterSize)) * v.clusterSize;
          child.cluster = allocate(v, size / v.clusterSize);
          child.size = size;
          fs.writeSync(fd, Buffer.alloc(size), 0, size, clusterOffset(v, child.cluster));
          writeDir(child, false);
          sets.push(entrySet(v, name, true, child.cluster, size, when));
        }
      }
      const body = Buffer.concat(sets);
      if (isRoot) appendToRoot(v, body);
      else fs.writeSync(fd, body, 0, body.length, clusterOffset(v, node.cluster!));
    };
    writeDir(root, true);
    fs.writeSync(fd, v.bitmap, 0, v.bitmap.length, clusterOffset(v, v.bitmapCluster));
  } finally {
    fs.closeSync(fd);
  }
}

/** Appends entry sets after the root directory's last entry, growing its FAT chain if needed. */
function appendToRoot(v: Volume, body: Buffer): void {
  const chain = chainOf(v, v.rootCluster);
  const content = readChain(v, v.rootCluster);
  let end = 0;
  while (end < content.length && content[end] !== 0) end += ENTRY;
  const needed = end + body.length + ENTRY - content.length;
  if (needed > 0) {
    const more = Math.ceil(needed / v.clusterSize);
    const first = allocate(v, more);
    fs.writeSync(v.fd, Buffer.alloc(more * v.clusterSize), 0, more * v.clusterSize, clusterOffset(v, first));
    writeFat(v, chain[chain.length - 1]!, first);
    for (let i = 0; i < more; i++) chain.push(first + i);
  }
  // Write entry by entry: the chain's clusters need not be adjacent.
  for (let i = 0; i < body.length; i += ENTRY) {
    const pos = end + i;
    const cluster = chain[Math.floor(pos / v.clusterSize)]!;
    fs.writeSync(v.fd, body, i, ENTRY, clusterOffset(v, cluster) + (pos % v.clusterSize));
  }
}
