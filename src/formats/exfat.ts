/**
 * exFAT read by vdboot itself (large USB sticks and SD cards): path → the file's
 * clusters on the partition. Files are contiguous (NoFatChain) or FAT-chained; names
 * compare through the volume's own up-case table; bytes past the valid data length
 * read as zeros (`uninitialized`, like NTFS past its initialized size). Nothing here
 * writes; everything read from the volume is bounds-checked.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import {
  type FileExtent, type HostDirEntry, type HostFile, type HostFs,
  joinHostPath, notFoundError, pushExtent, readThroughExtents, splitHostPath, TablePages, u64, viewOf,
} from './host-volume.ts';

const ENTRY_BITMAP = 0x81;
const ENTRY_UPCASE = 0x82;
const ENTRY_LABEL = 0x83;
const ENTRY_FILE = 0x85;
const ENTRY_STREAM = 0xc0;
const ENTRY_NAME = 0xc1;

const ATTR_DIRECTORY = 0x10;
const FLAG_NO_FAT_CHAIN = 0x02;
const VOLUME_DIRTY = 0x02;

/** A directory of more than 256 MiB is not something a real exFAT volume holds. */
const MAX_DIR_BYTES = 256 * 1024 * 1024;

export function isExfatBootSector(b: Uint8Array): boolean {
  return b.length >= 512 && String.fromCharCode(...b.subarray(3, 11)) === 'EXFAT   ';
}

/** A stream the root directory names for the volume itself (allocation bitmap, up-case table). */
interface SystemStream {
  what: string;
  first: number;
  length: number;
}

/** The ownership proof reads at most this many directory entries (a volume with more is refused, not checked). */
const MAX_PROOF_ENTRIES = 4_000_000;

interface DirEntry {
  name: string;
  attributes: number;
  noFatChain: boolean;
  firstCluster: number;
  validDataLength: number;
  dataLength: number;
}

export class ExfatVolume implements HostFs {
  readonly type = 'exfat' as const;
  readonly clusterSize: number;
  label?: string;
  private readonly sectorSize: number;
  private readonly fatOffset: number;
  private readonly heapOffset: number;
  private readonly clusterCount: number;
  private readonly rootCluster: number;
  private readonly volumeFlags: number;
  private upcaseTable: Uint16Array;
  private fat: TablePages | null = null;
  private readonly volumeName: string;

  constructor(private readonly partition: BlockReader) {
    const name = (this.volumeName = partition.name);
    const b = partition.read(0, 512);
    const v = viewOf(b);
    const sectorShift = b[108]!;
    const clusterShift = b[109]!;
    if (sectorShift < 9 || sectorShift > 12 || clusterShift > 25 - sectorShift) {
      throw new FormatError(`${name}: exFAT boot sector gives sector shift ${sectorShift} and cluster shift ${clusterShift}: the boot sector is damaged; run fsck.exfat or chkdsk`, 'bytes_per_sector_shift', sectorShift);
    }
    this.sectorSize = 2 ** sectorShift;
    this.clusterSize = this.sectorSize * 2 ** clusterShift;
    this.verifyBootChecksum();
    const volumeLength = u64(v, 72, 'exFAT volume length');
    this.fatOffset = v.getUint32(80, true) * this.sectorSize;
    const fatLength = v.getUint32(84, true) * this.sectorSize;
    this.heapOffset = v.getUint32(88, true) * this.sectorSize;
    this.clusterCount = v.getUint32(92, true);
    this.rootCluster = v.getUint32(96, true);
    this.volumeFlags = v.getUint16(106, true);
    if (fatLength < (this.clusterCount + 2) * 4) {
      throw new FormatError(`${name}: exFAT FAT (${fatLength} bytes) is too small for ${this.clusterCount} clusters: the boot sector is damaged`, 'fat_length', fatLength);
    }
    const end = this.heapOffset + this.clusterCount * this.clusterSize;
    if (end > partition.size || end > volumeLength * this.sectorSize) {
      throw new FormatError(`${name}: exFAT cluster heap ends at byte ${end}, past the end of the partition (${Math.min(partition.size, volumeLength * this.sectorSize)} bytes): the partition is truncated or the boot sector damaged`, 'cluster_count', this.clusterCount);
    }
    this.upcaseTable = new Uint16Array(0);
    const root = this.readDirEntries(this.rootCluster, false, 0, '/', true);
    this.upcaseTable = root.upcase ?? identityUpcase();
    this.label = root.label;
  }

  /** The boot region's checksum (sector 11) over sectors 0..10: a half-written boot region is refused. */
  private verifyBootChecksum(): void {
    const ss = this.sectorSize;
    const region = this.partition.read(0, 12 * ss);
    let sum = 0;
    for (let i = 0; i < 11 * ss; i++) {
      if (i === 106 || i === 107 || i === 112) continue;
      sum = (((sum & 1) ? 0x80000000 : 0) + (sum >>> 1) + region[i]!) >>> 0;
    }
    const v = viewOf(region);
    for (let o = 11 * ss; o < 12 * ss; o += 4) {
      if (v.getUint32(o, true) !== sum) {
        throw new FormatError(`${this.volumeName}: exFAT boot region checksum does not match (0x${v.getUint32(o, true).toString(16)} stored, 0x${sum.toString(16)} computed): the boot region is damaged; run fsck.exfat or chkdsk`, 'boot_checksum', v.getUint32(o, true));
      }
    }
  }

  private fatEntry(c: number): number {
    this.fat ??= new TablePages(this.partition, this.fatOffset, (this.clusterCount + 2) * 4);
    return this.fat.u32(c * 4);
  }

  private checkCluster(c: number, what: string): void {
    if (c < 2 || c >= this.clusterCount + 2) {
      throw new FormatError(`${this.volumeName}: ${what}: cluster ${c} is outside the volume (2..${this.clusterCount + 1}): the filesystem is damaged; run fsck.exfat or chkdsk`, 'cluster', c);
    }
  }

  /** The clusters of a stream as (first cluster, count) runs. */
  private runs(first: number, noFatChain: boolean, bytes: number, what: string): { cluster: number; count: number }[] {
    const n = Math.ceil(bytes / this.clusterSize);
    if (n === 0) return [];
    this.checkCluster(first, what);
    if (noFatChain) {
      this.checkCluster(first + n - 1, what);
      return [{ cluster: first, count: n }];
    }
    const out: { cluster: number; count: number }[] = [];
    let c = first;
    for (let i = 0; i < n; i++) {
      this.checkCluster(c, what);
      const last = out[out.length - 1];
      if (last && last.cluster + last.count === c) last.count++;
      else out.push({ cluster: c, count: 1 });
      if (i === n - 1) break;
      const next = this.fatEntry(c);
      if (next === 0xffffffff || next === 0xfffffff7 || next === 0) {
        throw new FormatError(`${this.volumeName}: ${what}: cluster chain ends after ${i + 1} of ${n} clusters (FAT entry 0x${next.toString(16)} at cluster ${c}): the filesystem is damaged; run fsck.exfat or chkdsk`, 'cluster', c);
      }
      c = next;
    }
    return out;
  }

  private clusterOffset(c: number): number {
    return this.heapOffset + (c - 2) * this.clusterSize;
  }

  /** Reads a directory's bytes; the root has no length, so its FAT chain is followed to its end. */
  private dirBytes(first: number, noFatChain: boolean, length: number, what: string, isRoot: boolean): Uint8Array {
    if (isRoot) {
      const chunks: Uint8Array[] = [];
      let c = first;
      const seen = new Set<number>();
      for (;;) {
        this.checkCluster(c, what);
        if (seen.has(c) || seen.size * this.clusterSize >= MAX_DIR_BYTES) throw new FormatError(`${this.volumeName}: the root directory's cluster chain loops: the filesystem is damaged; run fsck.exfat or chkdsk`, 'cluster', c);
        seen.add(c);
        chunks.push(this.partition.read(this.clusterOffset(c), this.clusterSize));
        const next = this.fatEntry(c);
        if (next === 0xffffffff) break;
        c = next;
      }
      const out = new Uint8Array(chunks.length * this.clusterSize);
      chunks.forEach((ch, i) => out.set(ch, i * this.clusterSize));
      return out;
    }
    if (length > MAX_DIR_BYTES) throw new FormatError(`${this.volumeName}: ${what}: directory of ${length} bytes is larger than exFAT allows`, 'data_length', length);
    const out = new Uint8Array(length);
    let pos = 0;
    for (const r of this.runs(first, noFatChain, length, what)) {
      const n = Math.min(r.count * this.clusterSize, length - pos);
      out.set(this.partition.read(this.clusterOffset(r.cluster), n), pos);
      pos += n;
    }
    return out;
  }

  private readDirEntries(first: number, noFatChain: boolean, length: number, what: string, isRoot: boolean):
    { entries: DirEntry[]; upcase?: Uint16Array; label?: string; system: SystemStream[] } {
    const b = this.dirBytes(first, noFatChain, length, what, isRoot);
    const v = viewOf(b);
    const entries: DirEntry[] = [];
    let upcase: Uint16Array | undefined;
    let label: string | undefined;
    const system: SystemStream[] = [];
    for (let pos = 0; pos + 32 <= b.length; pos += 32) {
      const type = b[pos]!;
      if (type === 0) break;
      if (!(type & 0x80)) continue;
      if (isRoot && type === ENTRY_UPCASE) {
        upcase = this.loadUpcase(v.getUint32(pos + 4, true), v.getUint32(pos + 20, true), u64(v, pos + 24, 'exFAT up-case table length'));
        system.push({ what: 'the up-case table', first: v.getUint32(pos + 20, true), length: u64(v, pos + 24, 'exFAT up-case table length') });
      } else if (isRoot && type === ENTRY_LABEL) {
        const n = Math.min(11, b[pos + 1]!);
        let s = '';
        for (let i = 0; i < n; i++) s += String.fromCharCode(v.getUint16(pos + 2 + i * 2, true));
        label = s;
      } else if (type === ENTRY_FILE) {
        const secondary = b[pos + 1]!;
        if (secondary < 2 || secondary > 18 || pos + (secondary + 1) * 32 > b.length) {
          throw new FormatError(`${this.volumeName}: ${what}: file entry at byte ${pos} claims ${secondary} secondary entries: the directory is damaged; run fsck.exfat or chkdsk`, 'secondary_count', secondary);
        }
        const set = b.subarray(pos, pos + (secondary + 1) * 32);
        let sum = 0;
        for (let i = 0; i < set.length; i++) {
          if (i === 2 || i === 3) continue;
          sum = (((sum & 1) ? 0x8000 : 0) + (sum >> 1) + set[i]!) & 0xffff;
        }
        if (sum !== v.getUint16(pos + 2, true)) {
          throw new FormatError(`${this.volumeName}: ${what}: directory entry set at byte ${pos} fails its checksum: the directory is damaged; run fsck.exfat or chkdsk`, 'set_checksum', v.getUint16(pos + 2, true));
        }
        const s = pos + 32;
        if (b[s] !== ENTRY_STREAM) throw new FormatError(`${this.volumeName}: ${what}: file entry at byte ${pos} lacks its stream extension: the directory is damaged`, 'entry_type', b[s]!);
        const nameLen = b[s + 3]!;
        let name = '';
        for (let k = 2; k <= secondary && name.length < nameLen; k++) {
          const o = pos + k * 32;
          if (b[o] !== ENTRY_NAME) break;
          for (let i = 0; i < 15 && name.length < nameLen; i++) name += String.fromCharCode(v.getUint16(o + 2 + i * 2, true));
        }
        if (name.length !== nameLen) throw new FormatError(`${this.volumeName}: ${what}: file entry at byte ${pos} has a name shorter than its length ${nameLen}: the directory is damaged`, 'name_length', nameLen);
        const validDataLength = u64(v, s + 8, 'exFAT valid data length');
        const dataLength = u64(v, s + 24, 'exFAT data length');
        if (validDataLength > dataLength) throw new FormatError(`${this.volumeName}: ${what}/${name}: valid data length ${validDataLength} exceeds the data length ${dataLength}: the directory is damaged`, 'valid_data_length', validDataLength);
        entries.push({
          name,
          attributes: v.getUint16(pos + 4, true),
          noFatChain: (b[s + 1]! & FLAG_NO_FAT_CHAIN) !== 0,
          firstCluster: v.getUint32(s + 20, true),
          validDataLength,
          dataLength,
        });
        pos += secondary * 32;
      } else if (isRoot && type === ENTRY_BITMAP) {
        // the allocation bitmap (the first one: a TexFAT volume's second is not used by Windows): not needed for reading
        if (!system.some((x) => x.what === 'the allocation bitmap')) system.push({ what: 'the allocation bitmap', first: v.getUint32(pos + 20, true), length: u64(v, pos + 24, 'exFAT allocation bitmap length') });
      }
    }
    return { entries, upcase, label, system };
  }

  private loadUpcase(checksum: number, first: number, length: number): Uint16Array {
    if (length > 65536 * 2 * 2 || length < 2) throw new FormatError(`${this.volumeName}: exFAT up-case table of ${length} bytes is invalid`, 'upcase_length', length);
    let bytes = new Uint8Array(length);
    let pos = 0;
    for (const r of this.runs(first, false, length, 'up-case table')) {
      const n = Math.min(r.count * this.clusterSize, length - pos);
      bytes.set(this.partition.read(this.clusterOffset(r.cluster), n), pos);
      pos += n;
    }
    let sum = 0;
    for (let i = 0; i < length; i++) sum = (((sum & 1) ? 0x80000000 : 0) + (sum >>> 1) + bytes[i]!) >>> 0;
    if (sum !== checksum) throw new FormatError(`${this.volumeName}: exFAT up-case table fails its checksum: the filesystem is damaged; run fsck.exfat or chkdsk`, 'upcase_checksum', checksum);
    bytes = bytes.subarray(0, length & ~1);
    const table = identityUpcase();
    // compressed form: 0xFFFF followed by a count of characters that map to themselves
    let ch = 0;
    for (let i = 0; i + 1 < bytes.length && ch < 65536; i += 2) {
      const u = bytes[i]! | (bytes[i + 1]! << 8);
      if (u === 0xffff && i + 3 < bytes.length) {
        ch += bytes[i + 2]! | (bytes[i + 3]! << 8);
        i += 2;
        continue;
      }
      table[ch++] = u;
    }
    return table;
  }

  private sameName(a: string, b: string): boolean {
    if (a.length !== b.length) return false;
    const up = this.upcaseTable;
    for (let i = 0; i < a.length; i++) if (up[a.charCodeAt(i)] !== up[b.charCodeAt(i)]) return false;
    return true;
  }

  private listDir(e: DirEntry | null, what: string): DirEntry[] {
    if (!e) return this.readDirEntries(this.rootCluster, false, 0, what, true).entries;
    if (e.dataLength === 0) return [];
    return this.readDirEntries(e.firstCluster, e.noFatChain, e.dataLength, what, false).entries;
  }

  private resolve(path: string): { entry: DirEntry | null; parts: string[] } {
    let entry: DirEntry | null = null;
    const found: string[] = [];
    for (const part of splitHostPath(path)) {
      const here = joinHostPath(found);
      if (entry && !(entry.attributes & ATTR_DIRECTORY)) throw new FormatError(`${this.volumeName}: ${path} not found: ${here} is a file, not a directory`, 'path', path);
      const entries = this.listDir(entry, here);
      const e = entries.find((x) => this.sameName(x.name, part));
      if (!e) throw notFoundError(`${this.volumeName} (exFAT${this.label ? ` "${this.label}"` : ''})`, path, here, part, entries.map((x) => x.name));
      entry = e;
      found.push(e.name);
    }
    return { entry, parts: found };
  }

  writeBlocker(): string | null {
    if (!(this.volumeFlags & VOLUME_DIRTY)) return null;
    return `exFAT volume ${this.label ? `"${this.label}" ` : ''}(${this.volumeName}) is marked dirty: it was not ejected cleanly. Check it first (fsck.exfat on Linux, chkdsk /f on Windows), then try again.`;
  }

  lookup(path: string): HostFile {
    const { entry, parts } = this.resolve(path);
    const p = joinHostPath(parts);
    if (!entry || entry.attributes & ATTR_DIRECTORY) throw new FormatError(`${this.volumeName}: ${p} is a directory, not a file`, 'path', path);
    const extents: FileExtent[] = [];
    const size = entry.dataLength;
    const valid = entry.validDataLength;
    let off = 0;
    for (const r of this.runs(entry.firstCluster, entry.noFatChain, size, p)) {
      const len = Math.min(r.count * this.clusterSize, size - off);
      const dev = this.clusterOffset(r.cluster);
      const initEnd = Math.max(off, Math.min(off + len, valid));
      pushExtent(extents, { kind: 'data', fileOffset: off, length: initEnd - off, deviceOffset: dev });
      pushExtent(extents, { kind: 'uninitialized', fileOffset: initEnd, length: off + len - initEnd, deviceOffset: dev + (initEnd - off) });
      off += len;
    }
    return { path: p, size, extents, ...(size > 0 && entry.firstCluster >= 2 ? { id: `exfat:${entry.firstCluster}` } : {}) };
  }

  /**
   * Proves that every cluster of `files` belongs to that file and to nothing else before
   * they are mapped: the allocation bitmap marks each one in use; no two of the files share
   * one; and no other claim on the volume reaches one — the allocation bitmap's, the up-case
   * table's and every directory's own clusters, and every other file's, found by walking
   * the whole directory tree once (a contiguous NoFatChain file is one range; a chained one
   * is followed through the FAT, at most clusterCount steps in all; exactly one directory
   * entry may start at a file's first cluster). A FAT-table pass like FAT32's would not do:
   * the FAT entries of NoFatChain files are undefined and may point anywhere. A cross-link
   * is refused naming the cluster and the other owner, with fsck.exfat / chkdsk /f as the
   * remedy; a volume with more than MAX_PROOF_ENTRIES entries is refused, not checked.
   */
  proveOwnership(files: readonly HostFile[]): void {
    const cs = this.clusterSize;
    // the targets' cluster ranges [start, end), one list per file (two names of one file count once)
    const runs: { start: number; end: number; path: string; first: number }[] = [];
    const firsts = new Map<number, string>();
    const seenIds = new Set<string>();
    for (const f of files) {
      if (f.id !== undefined) {
        if (seenIds.has(f.id)) continue;
        seenIds.add(f.id);
      }
      let first = -1;
      for (const e of f.extents) {
        const dev = (e as { deviceOffset?: number }).deviceOffset;
        if (e.kind === 'hole' || e.length <= 0 || dev === undefined) continue;
        const start = Math.floor((dev - this.heapOffset) / cs) + 2;
        const end = Math.floor((dev + e.length - 1 - this.heapOffset) / cs) + 3;
        if (first < 0) first = start;
        const last = runs[runs.length - 1];
        if (last && last.path === f.path && last.end >= start && last.start <= start) last.end = Math.max(last.end, end);
        else runs.push({ start, end, path: f.path, first });
      }
      if (first >= 0) firsts.set(first, f.path);
    }
    if (!runs.length) return;
    runs.sort((a, b) => a.start - b.start);
    const fail = (path: string, c: number, other: string): never => {
      throw new FormatError(
        `${this.volumeName}: ${path}: its cluster ${c} also belongs to ${other}: the files are cross-linked, and mapping it would read and write that other data. ` +
          'Run fsck.exfat or chkdsk /f before booting from it.',
        'cluster', c,
      );
    };
    for (let i = 1; i < runs.length; i++) if (runs[i]!.start < runs[i - 1]!.end) fail(runs[i]!.path, runs[i]!.start, runs[i - 1]!.path);
    const starts = runs.map((r) => r.start);
    /** The target run holding a cluster of [start, start + count), if any: [run, cluster]. */
    const hit = (start: number, count: number): [typeof runs[number], number] | undefined => {
      // the last run starting before the range ends; runs are disjoint and sorted, so only it can reach into the range
      let lo = 0;
      let hi = runs.length - 1;
      let k = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >>> 1;
        if (starts[mid]! < start + count) { k = mid; lo = mid + 1; } else hi = mid - 1;
      }
      if (k < 0 || runs[k]!.end <= start) return undefined;
      return [runs[k]!, Math.max(runs[k]!.start, start)];
    };
    let steps = 0;
    const claim = (first: number, noFatChain: boolean, bytes: number, owner: string, isRoot = false): void => {
      if (first < 2 || bytes <= 0 && !isRoot) return;
      if (isRoot || !noFatChain) {
        // a FAT chain, to its end for the root (which has no length), else for its clusters
        const n = isRoot ? this.clusterCount : Math.ceil(bytes / cs);
        let c = first;
        for (let i = 0; i < n; i++) {
          this.checkCluster(c, owner);
          if (++steps > this.clusterCount + 2) throw new FormatError(`${this.volumeName}: the cluster chains of the volume are longer than the volume (at ${owner}): a chain loops; run fsck.exfat or chkdsk /f`, 'cluster', c);
          const h = hit(c, 1);
          if (h) fail(h[0].path, h[1], owner);
          const next = this.fatEntry(c);
          if (next === 0xffffffff || (isRoot && (next < 2 || next >= this.clusterCount + 2))) break;
          if (i === n - 1) break;
          if (next === 0xfffffff7 || next === 0) throw new FormatError(`${this.volumeName}: ${owner}: cluster chain ends early (FAT entry 0x${next.toString(16)} at cluster ${c}): the filesystem is damaged; run fsck.exfat or chkdsk /f`, 'cluster', c);
          c = next;
        }
        return;
      }
      const n = Math.ceil(bytes / cs);
      this.checkCluster(first + n - 1, owner);
      const h = hit(first, n);
      if (h) fail(h[0].path, h[1], owner);
    };

    // the volume's own structures, named by the root directory
    const root = this.readDirEntries(this.rootCluster, false, 0, '/', true);
    claim(this.rootCluster, false, 0, 'the root directory', true);
    let bitmap: SystemStream | undefined;
    for (const x of root.system) {
      claim(x.first, false, x.length, x.what);
      if (x.what === 'the allocation bitmap') bitmap = x;
    }
    // every target cluster is marked in use (a free one could be given to a new file by the next writer)
    if (!bitmap) throw new FormatError(`${this.volumeName}: the root directory names no allocation bitmap: the filesystem is damaged; run fsck.exfat or chkdsk /f`, 'bitmap', 0);
    const need = Math.ceil(this.clusterCount / 8);
    if (bitmap.length < need) throw new FormatError(`${this.volumeName}: the allocation bitmap (${bitmap.length} bytes) is smaller than the volume's ${this.clusterCount} clusters need: the filesystem is damaged`, 'bitmap', bitmap.length);
    const bits = this.dirBytes(bitmap.first, false, need, 'the allocation bitmap', false);
    for (const r of runs) {
      for (let c = r.start; c < r.end; c++) {
        const i = c - 2;
        // eight clusters at a time where a whole byte of the bitmap is theirs and all set
        if ((i & 7) === 0 && c + 8 <= r.end && bits[i >> 3] === 0xff) {
          c += 7;
          continue;
        }
        if (((bits[i >> 3]! >> (i & 7)) & 1) === 0) {
          throw new FormatError(`${this.volumeName}: ${r.path}: its cluster ${c} is marked free in the allocation bitmap, so the next writer may give it to another file: the filesystem is damaged. Run fsck.exfat or chkdsk /f before booting from it.`, 'cluster', c);
        }
      }
    }
    // every file and directory of the volume, breadth first; the root's entries as read
    // above, the others by walkEntries (no names decoded unless a message needs one)
    const ownSeen = new Set<number>();
    const dirsSeen = new Set<number>([this.rootCluster]);
    const queue: { first: number; noFatChain: boolean; length: number; path: string }[] = [];
    let entries = 0;
    const visit = (attributes: number, noFatChain: boolean, first: number, length: number, owner: () => string): void => {
      if (++entries > MAX_PROOF_ENTRIES) {
        throw new FormatError(`${this.volumeName}: the volume holds more than ${MAX_PROOF_ENTRIES} directory entries; vdboot does not prove the image's clusters its own on a volume that large. Map it through the loop path (rd.vdisk.map=loop).`, 'entries', entries);
      }
      if (first < 2 || length === 0) return;
      const isDir = (attributes & ATTR_DIRECTORY) !== 0;
      if (!isDir && firsts.has(first) && !ownSeen.has(first)) {
        ownSeen.add(first); // the target's own entry (one only: a second one is a cross-link)
        return;
      }
      if (noFatChain && !isDir) {
        // contiguous: one range, tested without a closure or a string (the common case)
        const n = Math.ceil(length / cs);
        if (first + n - 1 >= this.clusterCount + 2) this.checkCluster(first + n - 1, owner());
        const h = hit(first, n);
        if (h) fail(h[0].path, h[1], owner());
      } else claim(first, noFatChain, length, owner());
      if (isDir) {
        const p = owner();
        if (dirsSeen.has(first)) throw new FormatError(`${this.volumeName}: the directory ${p} is named twice in the tree (cluster ${first}): the filesystem is damaged; run fsck.exfat or chkdsk /f`, 'cluster', first);
        dirsSeen.add(first);
        queue.push({ first, noFatChain, length, path: p });
      }
    };
    for (const e of root.entries) visit(e.attributes, e.noFatChain, e.firstCluster, e.dataLength, () => `/${e.name}`);
    for (let qi = 0; qi < queue.length; qi++) {
      const d = queue[qi]!;
      queue[qi] = undefined as never; // read once; let the walk forget it
      this.walkEntries(this.dirBytes(d.first, d.noFatChain, d.length, d.path, false), d.path, visit);
    }
  }

  /**
   * The file entry sets of one directory's bytes, for the ownership proof: for each, its
   * attributes, stream flags, first cluster and data length, read in place; its name only
   * when `visit` asks for it (a message). Checksums are not verified here: an entry set
   * with a bad checksum still has its claim tested, which can only refuse more.
   */
  private walkEntries(b: Uint8Array, dirPath: string, visit: (attributes: number, noFatChain: boolean, first: number, length: number, owner: () => string) => void): void {
    for (let pos = 0; pos + 32 <= b.length; pos += 32) {
      const type = b[pos]!;
      if (type === 0) break;
      if (type !== ENTRY_FILE) continue;
      const secondary = b[pos + 1]!;
      if (secondary < 2 || secondary > 18 || pos + (secondary + 1) * 32 > b.length) {
        throw new FormatError(`${this.volumeName}: ${dirPath}: file entry at byte ${pos} claims ${secondary} secondary entries: the directory is damaged; run fsck.exfat or chkdsk`, 'secondary_count', secondary);
      }
      const s = pos + 32;
      if (b[s] !== ENTRY_STREAM) throw new FormatError(`${this.volumeName}: ${dirPath}: file entry at byte ${pos} lacks its stream extension: the directory is damaged`, 'entry_type', b[s]!);
      const first = (b[s + 20]! | (b[s + 21]! << 8) | (b[s + 22]! << 16)) + b[s + 23]! * 0x1000000;
      const low = (b[s + 24]! | (b[s + 25]! << 8) | (b[s + 26]! << 16)) + b[s + 27]! * 0x1000000;
      const high = (b[s + 28]! | (b[s + 29]! << 8) | (b[s + 30]! << 16)) + b[s + 31]! * 0x1000000;
      if (high >= 0x200000) throw new FormatError(`${this.volumeName}: ${dirPath}: file entry at byte ${pos} has a data length beyond what vdboot can address (2^53 bytes): the filesystem is damaged`, 'data_length', high);
      const at = pos;
      visit(b[pos + 4]! | (b[pos + 5]! << 8), (b[s + 1]! & FLAG_NO_FAT_CHAIN) !== 0, first, high === 0 ? low : low + high * 0x100000000, () => `${dirPath}/${entrySetName(b, at, secondary)}`);
      pos += secondary * 32;
    }
  }

  readdir(path: string): HostDirEntry[] {
    const { entry, parts } = this.resolve(path);
    if (entry && !(entry.attributes & ATTR_DIRECTORY)) throw new FormatError(`${this.volumeName}: ${joinHostPath(parts)} is a file, not a directory`, 'path', path);
    return this.listDir(entry, joinHostPath(parts)).map((e) => ({
      name: e.name,
      isDir: (e.attributes & ATTR_DIRECTORY) !== 0,
      size: e.attributes & ATTR_DIRECTORY ? 0 : e.dataLength,
    }));
  }

  readFile(file: HostFile, offset: number, length: number): Uint8Array {
    return readThroughExtents(this.partition, file, offset, length);
  }
}

/** The name of the file entry set at `pos` of `b` (as far as its name entries hold it). */
function entrySetName(b: Uint8Array, pos: number, secondary: number): string {
  const nameLen = b[pos + 32 + 3]!;
  let name = '';
  for (let k = 2; k <= secondary && name.length < nameLen; k++) {
    const o = pos + k * 32;
    if (b[o] !== ENTRY_NAME) break;
    for (let i = 0; i < 15 && name.length < nameLen; i++) name += String.fromCharCode(b[o + 2 + i * 2]! | (b[o + 3 + i * 2]! << 8));
  }
  return name;
}

function identityUpcase(): Uint16Array {
  const t = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = i;
  return t;
}

export function openExfat(partition: BlockReader): ExfatVolume {
  return new ExfatVolume(partition);
}
