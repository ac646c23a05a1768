/**
 * FAT12/16/32 read by vdboot itself (USB sticks, EFI system partitions): path → the
 * file's clusters on the partition. Long names (VFAT LFN) and 8.3 names, compared
 * case-insensitively as Windows does. Nothing here writes; everything read from the
 * volume is bounds-checked.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import {
  type FileExtent, type HostDirEntry, type HostFile, type HostFs,
  joinHostPath, notFoundError, pushExtent, readThroughExtents, splitHostPath, TablePages, upcaseChar, viewOf,
} from './host-volume.ts';

const ATTR_VOLUME_ID = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_LFN = 0x0f;
/** The ownership proof reads at most this many directory entries (a volume with more is refused, not checked). */
const MAX_PROOF_ENTRIES = 4_000_000;

/** Code page 437, bytes 0x80..0xFF: how DOS and Windows (en-US) store 8.3 names. */
const CP437_HIGH =
  'ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀' +
  'αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u00a0';

export function isFatBootSector(b: Uint8Array): boolean {
  if (b.length < 512 || b[510] !== 0x55 || b[511] !== 0xaa) return false;
  if (!(b[0] === 0xeb || b[0] === 0xe9)) return false;
  const v = viewOf(b);
  const bps = v.getUint16(11, true);
  const spc = b[13]!;
  return [512, 1024, 2048, 4096].includes(bps) && spc > 0 && (spc & (spc - 1)) === 0 &&
    v.getUint16(14, true) > 0 && b[16]! > 0 && b[16]! <= 4;
}

interface DirEntry {
  name: string;
  shortName: string;
  attr: number;
  firstCluster: number;
  size: number;
}

export class FatVolume implements HostFs {
  readonly type = 'vfat' as const;
  readonly clusterSize: number;
  label?: string;
  /** 12, 16 or 32 */
  readonly fatBits: 12 | 16 | 32;
  private readonly bytesPerSector: number;
  private readonly fatOffset: number;
  private readonly fatSize: number;
  private readonly rootDirOffset: number;
  private readonly rootDirBytes: number;
  private readonly rootCluster: number;
  private readonly dataOffset: number;
  private readonly clusterCount: number;
  private readonly bootDirty: boolean;
  private fat: TablePages | null = null;
  private readonly volumeName: string;

  constructor(private readonly partition: BlockReader) {
    const name = (this.volumeName = partition.name);
    const b = partition.read(0, 512);
    const v = viewOf(b);
    this.bytesPerSector = v.getUint16(11, true);
    const spc = b[13]!;
    this.clusterSize = this.bytesPerSector * spc;
    const reserved = v.getUint16(14, true);
    const numFats = b[16]!;
    const rootEntries = v.getUint16(17, true);
    const total16 = v.getUint16(19, true);
    const fat16Size = v.getUint16(22, true);
    const total32 = v.getUint32(32, true);
    const totalSectors = total16 || total32;
    const fatSectors = fat16Size || v.getUint32(36, true);
    if (!totalSectors || !fatSectors) {
      throw new FormatError(`${name}: FAT boot sector gives ${totalSectors} sectors and a FAT of ${fatSectors} sectors: the boot sector is damaged`, 'total_sectors', totalSectors);
    }
    this.rootDirBytes = rootEntries * 32;
    const rootDirSectors = Math.ceil(this.rootDirBytes / this.bytesPerSector);
    const firstData = reserved + numFats * fatSectors + rootDirSectors;
    if (firstData >= totalSectors) {
      throw new FormatError(`${name}: FAT boot sector puts the data area (sector ${firstData}) past the end of the volume (${totalSectors} sectors): the boot sector is damaged`, 'reserved_sectors', reserved);
    }
    const clusters = Math.floor((totalSectors - firstData) / spc);
    this.fatBits = clusters < 4085 ? 12 : clusters < 65525 ? 16 : 32;
    if (this.fatBits === 32 && (fat16Size !== 0 || rootEntries !== 0)) {
      throw new FormatError(`${name}: FAT32-sized volume (${clusters} clusters) with a FAT12/16 layout: the boot sector is damaged`, 'fat_size', fat16Size);
    }
    this.fatSize = fatSectors * this.bytesPerSector;
    // FAT32 may turn mirroring off (extended flags bit 7) and name the one FAT in use
    const extFlags = v.getUint16(40, true);
    const activeFat = total16 === 0 && fat16Size === 0 && extFlags & 0x80 ? extFlags & 0x0f : 0;
    if (activeFat >= numFats) {
      throw new FormatError(`${name}: FAT32 boot sector names FAT ${activeFat} as active, but there are only ${numFats}: the boot sector is damaged`, 'ext_flags', extFlags);
    }
    this.fatOffset = (reserved + activeFat * fatSectors) * this.bytesPerSector;
    this.rootDirOffset = (reserved + numFats * fatSectors) * this.bytesPerSector;
    this.dataOffset = firstData * this.bytesPerSector;
    this.clusterCount = clusters;
    const fatEntriesNeeded = Math.ceil(((clusters + 2) * this.fatBits) / 8);
    if (fatEntriesNeeded > this.fatSize) {
      throw new FormatError(`${name}: the FAT (${this.fatSize} bytes) is too small for ${clusters} clusters: the boot sector is damaged`, 'fat_size', this.fatSize);
    }
    const volumeBytes = this.dataOffset + clusters * this.clusterSize;
    if (volumeBytes > partition.size) {
      throw new FormatError(`${name}: FAT volume needs ${volumeBytes} bytes, the partition has ${partition.size}: the partition is truncated`, 'total_sectors', totalSectors);
    }
    if (this.fatBits === 32) {
      this.rootCluster = v.getUint32(44, true);
      this.bootDirty = (b[0x41]! & 1) !== 0;
    } else {
      this.rootCluster = 0;
      this.bootDirty = (b[0x25]! & 1) !== 0;
    }
    const labelEntry = this.readDir(null).find((e) => e.attr & ATTR_VOLUME_ID);
    if (labelEntry) this.label = labelEntry.shortName.trimEnd();
  }

  private fatEntry(cluster: number): number {
    // the FAT's bytes for clusters 0..clusterCount+1 (FAT12 may need one byte more for the last pair)
    this.fat ??= new TablePages(this.partition, this.fatOffset, Math.min(this.fatSize, Math.ceil(((this.clusterCount + 2) * this.fatBits) / 8) + 1));
    const f = this.fat;
    if (this.fatBits === 32) return f.u32(cluster * 4) & 0x0fffffff;
    if (this.fatBits === 16) return f.u16(cluster * 2);
    const w = f.u16(cluster + (cluster >> 1));
    return cluster & 1 ? w >> 4 : w & 0xfff;
  }

  private isEnd(e: number): boolean {
    return this.fatBits === 32 ? e >= 0x0ffffff8 : this.fatBits === 16 ? e >= 0xfff8 : e >= 0xff8;
  }

  /** The cluster chain from `first`, checked: in range, no loops, no free or bad clusters. */
  private chain(first: number, what: string, maxClusters = this.clusterCount): number[] {
    const out: number[] = [];
    let c = first;
    for (;;) {
      if (c < 2 || c >= this.clusterCount + 2) {
        throw new FormatError(`${this.volumeName}: ${what}: cluster chain reaches cluster ${c}, outside the volume (2..${this.clusterCount + 1}): the FAT is damaged; run fsck.vfat or chkdsk`, 'cluster', c);
      }
      out.push(c);
      if (out.length > maxClusters) {
        throw new FormatError(`${this.volumeName}: ${what}: cluster chain is longer than the file (${maxClusters} clusters) or loops: the FAT is damaged; run fsck.vfat or chkdsk`, 'cluster', c);
      }
      const next = this.fatEntry(c);
      if (this.isEnd(next)) return out;
      if (next === 0 || next === (this.fatBits === 32 ? 0x0ffffff7 : this.fatBits === 16 ? 0xfff7 : 0xff7)) {
        throw new FormatError(`${this.volumeName}: ${what}: cluster chain runs into a ${next === 0 ? 'free' : 'bad'} cluster after ${c}: the FAT is damaged; run fsck.vfat or chkdsk`, 'cluster', next);
      }
      c = next;
    }
  }

  /**
   * Cross-links: no other cluster chain joins the chains of `files`. One pass over the
   * whole FAT: an entry X -> C where C is a cluster of a target file is legal only when X is
   * C's predecessor in that file's own chain (and nothing may point at a chain's first
   * cluster). Another file's chain that joins this one (what chkdsk calls cross-linked)
   * is refused, naming both clusters. Then every directory of the volume is read once
   * (walkForOwnership): another entry whose first cluster lies inside a target's chain
   * (at its start or in its middle, which no FAT entry shows) is refused too.
   */
  proveOwnership(files: readonly HostFile[]): void {
    // the targets' runs of consecutive clusters, each with the cluster before it in its chain
    const runs: { start: number; end: number; before: number; path: string }[] = [];
    const seenIds = new Set<string>();
    for (const f of files) {
      if (f.id !== undefined) {
        if (seenIds.has(f.id)) continue; // one file under two names: its clusters once
        seenIds.add(f.id);
      }
      let before = -1;
      for (const e of f.extents) {
        if (e.kind !== 'data' || e.length <= 0) continue;
        const start = (e.deviceOffset - this.dataOffset) / this.clusterSize + 2;
        const end = start + Math.ceil(e.length / this.clusterSize);
        runs.push({ start, end, before, path: f.path });
        before = end - 1;
      }
    }
    if (!runs.length) return;
    runs.sort((a, b) => a.start - b.start);
    for (let i = 1; i < runs.length; i++) {
      if (runs[i]!.start < runs[i - 1]!.end) {
        throw new FormatError(`${this.volumeName}: ${runs[i]!.path}: its cluster ${runs[i]!.start} also belongs to ${runs[i - 1]!.path}: two files are cross-linked; run fsck.vfat or chkdsk /f before booting from it`, 'cluster', runs[i]!.start);
      }
    }
    const starts = new Float64Array(runs.map((r) => r.start));
    const last = this.clusterCount + 1;
    const lowest = starts[0]!;
    const highest = runs[runs.length - 1]!.end;
    // FAT16/32: the table read 1 MiB at a time and decoded in place; FAT12 through fatEntry
    const width = this.fatBits === 32 ? 4 : this.fatBits === 16 ? 2 : 0;
    const perChunk = 1 << 18;
    let chunk: Uint8Array | null = null;
    let chunkFirst = 0;
    for (let x = 2; x <= last; x++) {
      let c: number;
      if (width) {
        if (!chunk || x >= chunkFirst + perChunk) {
          chunkFirst = x;
          chunk = this.partition.read(this.fatOffset + x * width, Math.min(perChunk, last + 1 - x) * width);
        }
        const o = (x - chunkFirst) * width;
        c = width === 4 ? (chunk[o]! | (chunk[o + 1]! << 8) | (chunk[o + 2]! << 16)) + (chunk[o + 3]! & 0x0f) * 0x1000000 : chunk[o]! | (chunk[o + 1]! << 8);
      } else c = this.fatEntry(x);
      if (c < lowest || c >= highest) continue;
      // the run holding c
      let lo = 0;
      let hi = runs.length - 1;
      let k = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >>> 1;
        if (starts[mid]! <= c) { k = mid; lo = mid + 1; } else hi = mid - 1;
      }
      if (k < 0) continue;
      const r = runs[k]!;
      if (c >= r.end) continue;
      if (c === r.start ? x === r.before : x === c - 1) continue;
      throw new FormatError(
        `${this.volumeName}: ${r.path}: its cluster ${c} is also reached from cluster ${x}, which is not the cluster before it in the file: another file's chain joins this one (a cross-link), ` +
          `and mapping it would read and write that file's bytes. Run fsck.vfat or chkdsk /f before booting from it.`,
        'cluster', c,
      );
    }
    this.walkForOwnership(runs, starts);
  }

  /**
   * Every directory entry of the volume, breadth first from the root, at most
   * MAX_PROOF_ENTRIES entries, each directory once (a directory named twice is damage):
   * an entry whose first cluster lies in a target run is another claim on the target's
   * clusters, except the target's own entry (exactly one per target: a second entry
   * starting at the same cluster is a cross-link too). "." and ".." are checked, not
   * followed.
   */
  private walkForOwnership(runs: readonly { start: number; end: number; before: number; path: string }[], starts: Float64Array): void {
    // each target's first cluster: the start of its first run in chain order (no cluster before it)
    const firsts = new Set<number>(runs.filter((r) => r.before === -1).map((r) => r.start));
    const ownSeen = new Set<number>();
    const dirsSeen = new Set<number>();
    if (this.fatBits === 32) dirsSeen.add(this.rootCluster);
    const queue: { cluster: number | null; path: string }[] = [{ cluster: null, path: '' }];
    let entries = 0;
    for (let qi = 0; qi < queue.length; qi++) {
      const d = queue[qi]!;
      for (const e of this.readDir(d.cluster, d.path || '/')) {
        if (e.attr & ATTR_VOLUME_ID && !(e.attr & ATTR_DIRECTORY)) continue;
        if (++entries > MAX_PROOF_ENTRIES) {
          throw new FormatError(`${this.volumeName}: the volume holds more than ${MAX_PROOF_ENTRIES} directory entries; vdboot does not prove the image's clusters its own on a volume that large. Map it through the loop path (rd.vdisk.map=loop).`, 'entries', entries);
        }
        const c = e.firstCluster;
        if (c < 2) continue;
        const dot = e.name === '.' || e.name === '..';
        const isDir = (e.attr & ATTR_DIRECTORY) !== 0;
        // the run holding c, if any
        let lo = 0;
        let hi = starts.length - 1;
        let k = -1;
        while (lo <= hi) {
          const mid = (lo + hi) >>> 1;
          if (starts[mid]! <= c) { k = mid; lo = mid + 1; } else hi = mid - 1;
        }
        if (k >= 0 && c < runs[k]!.end) {
          if (!dot && !isDir && firsts.has(c) && !ownSeen.has(c)) {
            ownSeen.add(c);
            continue;
          }
          throw new FormatError(
            `${this.volumeName}: ${runs[k]!.path}: its cluster ${c} is also the first cluster of ${d.path}/${e.name}${isDir ? ' (a directory)' : ''}: two directory entries claim the same clusters (a cross-link), ` +
              `and mapping it would read and write that other ${isDir ? 'directory' : 'file'}'s bytes. Run fsck.vfat or chkdsk /f before booting from it.`,
            'cluster', c,
          );
        }
        if (isDir && !dot) {
          if (dirsSeen.has(c)) throw new FormatError(`${this.volumeName}: the directory ${d.path}/${e.name} is named twice in the tree (cluster ${c}): the filesystem is damaged; run fsck.vfat or chkdsk /f`, 'cluster', c);
          dirsSeen.add(c);
          queue.push({ cluster: c, path: `${d.path}/${e.name}` });
        }
      }
    }
  }

  private clusterOffset(c: number): number {
    return this.dataOffset + (c - 2) * this.clusterSize;
  }

  /** Raw bytes of a directory: the fixed root (FAT12/16) or a cluster chain. */
  private dirBytes(firstCluster: number | null, what: string): Uint8Array {
    if (firstCluster === null && this.fatBits !== 32) return this.partition.read(this.rootDirOffset, this.rootDirBytes);
    const first = firstCluster ?? this.rootCluster;
    // a directory holds at most 65536 entries of 32 bytes
    const chain = this.chain(first, what, Math.ceil((65536 * 32) / this.clusterSize));
    const out = new Uint8Array(chain.length * this.clusterSize);
    chain.forEach((c, i) => out.set(this.partition.read(this.clusterOffset(c), this.clusterSize), i * this.clusterSize));
    return out;
  }

  private readDir(firstCluster: number | null, what = '/'): DirEntry[] {
    const b = this.dirBytes(firstCluster, what);
    const v = viewOf(b);
    const out: DirEntry[] = [];
    let lfn: string[] = [];
    let lfnSum = -1;
    let lfnNext = 0;
    for (let pos = 0; pos + 32 <= b.length; pos += 32) {
      const first = b[pos]!;
      if (first === 0) break;
      if (first === 0xe5) { lfn = []; continue; }
      const attr = b[pos + 11]!;
      if ((attr & 0x3f) === ATTR_LFN) {
        const ord = first & 0x1f;
        if (first & 0x40) { lfn = []; lfnNext = ord; lfnSum = b[pos + 13]!; }
        if (ord !== lfnNext || ord === 0 || b[pos + 13] !== lfnSum) { lfn = []; lfnNext = -1; continue; }
        let part = '';
        for (const [o, n] of [[1, 5], [14, 6], [28, 2]] as const) {
          for (let i = 0; i < n; i++) {
            const c = v.getUint16(pos + o + i * 2, true);
            if (c === 0 || c === 0xffff) { i = n; continue; }
            part += String.fromCharCode(c);
          }
        }
        lfn[ord - 1] = part;
        lfnNext = ord - 1;
        continue;
      }
      const raw = b.subarray(pos, pos + 11);
      let sum = 0;
      for (let i = 0; i < 11; i++) sum = ((((sum & 1) << 7) | (sum >> 1)) + raw[i]!) & 0xff;
      const caseFlags = b[pos + 12]!;
      const shortName = decodeShortName(raw, caseFlags, attr & ATTR_VOLUME_ID ? 'label' : 'file');
      const longName = lfnNext === 0 && lfnSum === sum && lfn.length ? lfn.join('') : '';
      lfn = [];
      lfnNext = -1;
      const firstCluster = (this.fatBits === 32 ? v.getUint16(pos + 20, true) * 65536 : 0) + v.getUint16(pos + 26, true);
      out.push({ name: longName || shortName, shortName, attr, firstCluster, size: v.getUint32(pos + 28, true) });
    }
    return out;
  }

  private static sameName(a: string, b: string): boolean {
    if (a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (upcaseChar(a.charCodeAt(i)) !== upcaseChar(b.charCodeAt(i))) return false;
    return true;
  }

  private resolve(path: string): { entry: DirEntry | null; parts: string[] } {
    const wanted = splitHostPath(path);
    let dir: number | null = null; // null: the root
    let entry: DirEntry | null = null;
    const found: string[] = [];
    for (const part of wanted) {
      const here = joinHostPath(found);
      if (entry && !(entry.attr & ATTR_DIRECTORY)) throw new FormatError(`${this.volumeName}: ${path} not found: ${here} is a file, not a directory`, 'path', path);
      const entries: DirEntry[] = this.readDir(dir, here).filter((e) => !(e.attr & ATTR_VOLUME_ID) && e.name !== '.' && e.name !== '..');
      const e: DirEntry | undefined = entries.find((x) => FatVolume.sameName(x.name, part)) ?? entries.find((x) => FatVolume.sameName(x.shortName, part));
      if (!e) throw notFoundError(`${this.volumeName} (FAT${this.fatBits}${this.label ? ` "${this.label}"` : ''})`, path, here, part, entries.map((x) => x.name));
      entry = e;
      found.push(e.name);
      dir = e.attr & ATTR_DIRECTORY ? (e.firstCluster === 0 ? null : e.firstCluster) : -1;
    }
    return { entry, parts: found };
  }

  writeBlocker(): string | null {
    let dirty = this.bootDirty;
    if (this.fatBits !== 12) {
      const e1 = this.fatEntry(1);
      // the "clean shutdown" bit of FAT entry 1: cleared while mounted
      if (this.fatBits === 16 ? !(e1 & 0x8000) : !(e1 & 0x08000000)) dirty = true;
    }
    if (!dirty) return null;
    return `FAT volume ${this.label ? `"${this.label}" ` : ''}(${this.volumeName}) was not unmounted cleanly: check it first (fsck.vfat -a on Linux, chkdsk /f on Windows), or eject it safely next time, then try again.`;
  }

  lookup(path: string): HostFile {
    const { entry, parts } = this.resolve(path);
    const p = joinHostPath(parts);
    if (!entry || entry.attr & ATTR_DIRECTORY) throw new FormatError(`${this.volumeName}: ${p} is a directory, not a file`, 'path', path);
    const extents: FileExtent[] = [];
    if (entry.size > 0) {
      const n = Math.ceil(entry.size / this.clusterSize);
      const chain = this.chain(entry.firstCluster, p, n);
      if (chain.length < n) {
        throw new FormatError(`${this.volumeName}: ${p}: its cluster chain holds ${chain.length * this.clusterSize} bytes, the file is ${entry.size}: the FAT is damaged; run fsck.vfat or chkdsk`, 'size', entry.size);
      }
      // One extent per run of consecutive clusters, built without an object per cluster.
      let runStart = 0;
      for (let i = 1; i <= chain.length; i++) {
        if (i < chain.length && chain[i] === chain[i - 1]! + 1) continue;
        const fileOffset = runStart * this.clusterSize;
        const length = Math.min((i - runStart) * this.clusterSize, entry.size - fileOffset);
        pushExtent(extents, { kind: 'data', fileOffset, length, deviceOffset: this.clusterOffset(chain[runStart]!) });
        runStart = i;
      }
    }
    // a file with clusters is its first cluster (two entries sharing one are one file, or cross-linked)
    return { path: p, size: entry.size, extents, ...(entry.size > 0 && entry.firstCluster >= 2 ? { id: `fat:${entry.firstCluster}` } : {}) };
  }

  readdir(path: string): HostDirEntry[] {
    const { entry, parts } = this.resolve(path);
    if (entry && !(entry.attr & ATTR_DIRECTORY)) throw new FormatError(`${this.volumeName}: ${joinHostPath(parts)} is a file, not a directory`, 'path', path);
    const first = entry && entry.firstCluster !== 0 ? entry.firstCluster : null;
    return this.readDir(first, joinHostPath(parts))
      .filter((e) => !(e.attr & ATTR_VOLUME_ID) && e.name !== '.' && e.name !== '..')
      .map((e) => ({ name: e.name, isDir: (e.attr & ATTR_DIRECTORY) !== 0, size: e.attr & ATTR_DIRECTORY ? 0 : e.size }));
  }

  readFile(file: HostFile, offset: number, length: number): Uint8Array {
    return readThroughExtents(this.partition, file, offset, length);
  }
}

function decodeShortName(raw: Uint8Array, caseFlags: number, kind: 'label' | 'file'): string {
  const ch = (b: number, lower: boolean): string => {
    const c = b < 0x80 ? String.fromCharCode(b) : CP437_HIGH[b - 0x80]!;
    return lower ? c.toLowerCase() : c;
  };
  const first = raw[0] === 0x05 ? 0xe5 : raw[0]!;
  if (kind === 'label') {
    let s = ch(first, false);
    for (let i = 1; i < 11; i++) s += ch(raw[i]!, false);
    return s;
  }
  let base = ch(first, (caseFlags & 0x08) !== 0);
  for (let i = 1; i < 8; i++) base += ch(raw[i]!, (caseFlags & 0x08) !== 0);
  let ext = '';
  for (let i = 8; i < 11; i++) ext += ch(raw[i]!, (caseFlags & 0x10) !== 0);
  base = base.trimEnd();
  ext = ext.trimEnd();
  return ext ? `${base}.${ext}` : base;
}

export function openFat(partition: BlockReader): FatVolume {
  return new FatVolume(partition);
}
