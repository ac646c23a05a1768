/**
 * What the host filesystem readers (ntfs.ts, exfat.ts, fat.ts) share, below all three
 * and importing none of them: the HostFs contract, a found file as HostFile with its
 * extents on the partition, reading a file through those extents, and the path, name,
 * extent and table helpers each reader uses. hostfs.ts picks the reader for a partition.
 *
 * Everything read from the partition is untrusted: every offset and size is checked
 * before use.
 */
import { type BlockReader, FormatError } from './block-reader.ts';

export interface HostFile {
  /** the path as found on the volume (the volume's own spelling of each name) */
  path: string;
  /** size in bytes */
  size: number;
  /**
   * What the file is on this volume, whatever name reached it: "ntfs:MFT record" (hard
   * links and case variants are one record), "fat:first cluster" for a file with clusters.
   * The chain resolver identifies an image set's files by it (ChainHost.fileId).
   */
  id?: string;
  /** extents in file order, covering [0, size) without gaps */
  extents: FileExtent[];
  /**
   * The bytes the filesystem allocates a hole in at once, when more than a cluster: an
   * NTFS sparse file's compression unit (16 clusters). Filling holes rewrites whole units.
   */
  allocationUnit?: number;
  /**
   * NTFS resident data: a small file whose bytes live inside its MFT record. It has no
   * clusters of its own, so `extents` is empty and nothing can be mapped onto the
   * partition; readFile and hostFileReader still read it.
   */
  resident?: Uint8Array;
}

export type FileExtent =
  | { kind: 'data'; fileOffset: number; length: number; deviceOffset: number } // bytes, relative to the partition start
  | { kind: 'hole'; fileOffset: number; length: number } // sparse run: reads zero, has no clusters
  | { kind: 'uninitialized'; fileOffset: number; length: number; deviceOffset?: number }; // past the initialized size / valid data length: reads zero, never write in place

export interface HostDirEntry {
  name: string;
  isDir: boolean;
  size: number;
}

export interface HostFs {
  type: 'ntfs' | 'exfat' | 'vfat';
  label?: string;
  clusterSize: number;
  /** dirty / hibernated state: why writing is unsafe, or null */
  writeBlocker(): string | null;
  /**
   * Why writing through a filesystem driver is unsafe when writing only inside a file's own
   * clusters is not (NTFS left dirty by a Linux driver), or null. Optional.
   */
  driverWriteBlocker?(): string | null;
  /** the console's warning for a write allowed on such a volume, or null. Optional. */
  writeWarning?(): string | null;
  /** FormatError "not found" naming the path and the last directory that did exist, listing a few near names */
  lookup(path: string): HostFile;
  readdir(path: string): HostDirEntry[];
  readFile(file: HostFile, offset: number, length: number): Uint8Array;
  /**
   * Proves that every cluster of `files` belongs to that file alone (no other file, system
   * structure or other file of the list claims it); FormatError naming the cluster, the
   * other owner and the remedy otherwise. Readers that cannot tell leave it out.
   */
  proveOwnership?(files: readonly HostFile[]): void;
}

/** Reads a file through its extents (holes and uninitialized ranges as zeros). */
export function hostFileReader(fs: HostFs, file: HostFile): BlockReader {
  return {
    name: file.path,
    size: file.size,
    read: (offset: number, length: number) => fs.readFile(file, offset, length),
  };
}

// ---- helpers shared by the three readers -------------------------------------------

/** Splits a host path on `/` and `\`; empty components and `.` are dropped, `..` goes up. */
export function splitHostPath(path: string): string[] {
  const parts: string[] = [];
  for (const p of path.split(/[\\/]+/)) {
    if (p === '' || p === '.') continue;
    if (p === '..') { parts.pop(); continue; }
    parts.push(p);
  }
  return parts;
}

export function joinHostPath(parts: string[]): string {
  return '/' + parts.join('/');
}

/**
 * Reads `length` bytes at `offset` of a file from its extents. Shared by the readers;
 * every data extent was bounds-checked against the partition when it was built.
 */
export function readThroughExtents(partition: BlockReader, file: HostFile, offset: number, length: number): Uint8Array {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > file.size) {
    throw new FormatError(`${file.path}: read of ${length} bytes at offset ${offset} is past the end of the file (${file.size} bytes)`, 'offset', offset);
  }
  if (file.resident) return new Uint8Array(file.resident.subarray(offset, offset + length));
  const out = new Uint8Array(length);
  const ex = file.extents;
  // binary search for the extent holding `offset`
  let lo = 0;
  let hi = ex.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ex[mid]!.fileOffset <= offset) lo = mid; else hi = mid - 1;
  }
  let pos = offset;
  const end = offset + length;
  for (let i = lo; i < ex.length && pos < end; i++) {
    const e = ex[i]!;
    const eEnd = e.fileOffset + e.length;
    if (eEnd <= pos) continue;
    const n = Math.min(end, eEnd) - pos;
    if (e.kind === 'data') {
      out.set(partition.read(e.deviceOffset + (pos - e.fileOffset), n), pos - offset);
    }
    pos += n;
  }
  if (pos < end) {
    throw new FormatError(`${file.path}: the file's extents end at ${pos}, before its size ${file.size}`, 'extents', pos);
  }
  return out;
}

/** Appends an extent, merging it with the previous one when both are contiguous on both sides. */
export function pushExtent(list: FileExtent[], e: FileExtent): void {
  if (e.length <= 0) return;
  const last = list[list.length - 1];
  if (last && last.kind === e.kind && last.fileOffset + last.length === e.fileOffset) {
    if (last.kind === 'hole') { last.length += e.length; return; }
    const lastDev = (last as { deviceOffset?: number }).deviceOffset;
    const eDev = (e as { deviceOffset?: number }).deviceOffset;
    if (lastDev === undefined && eDev === undefined) { last.length += e.length; return; }
    if (lastDev !== undefined && eDev !== undefined && lastDev + last.length === eDev) { last.length += e.length; return; }
  }
  list.push({ ...e });
}

/** Up to `max` names that look like `wanted` (case, a typo, a prefix), closest first. */
export function nearNames(wanted: string, names: string[], max = 5): string[] {
  const w = wanted.toLowerCase();
  const scored: { name: string; d: number }[] = [];
  for (const name of names) {
    const n = name.toLowerCase();
    let d: number;
    if (n === w) d = 0;
    else if (n.startsWith(w) || w.startsWith(n) || (w.length >= 3 && n.includes(w))) d = 1;
    else {
      if (Math.abs(n.length - w.length) > 4 || n.length > 128 || w.length > 128) continue;
      d = 1 + editDistance(w, n);
      if (d - 1 > Math.max(2, Math.floor(w.length / 3))) continue;
    }
    scored.push({ name, d });
  }
  scored.sort((a, b) => a.d - b.d || (a.name < b.name ? -1 : 1));
  return scored.slice(0, max).map((s) => s.name);
}

function editDistance(a: string, b: string): number {
  let prev = new Array<number>(b.length + 1);
  for (let j = 0; j <= b.length; j++) prev[j] = j;
  for (let i = 1; i <= a.length; i++) {
    const cur = new Array<number>(b.length + 1);
    cur[0] = i;
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/**
 * The "not found" error every reader throws: the path, the last directory that did
 * exist, and a few names there that look like the missing one.
 */
export function notFoundError(volume: string, path: string, lastDir: string, missing: string, siblings: string[]): FormatError {
  const near = nearNames(missing, siblings);
  const hint = near.length ? `; names there that look close: ${near.map((n) => `"${n}"`).join(', ')}` : siblings.length ? '' : ` (the directory is empty)`;
  return new FormatError(`${volume}: ${path} not found: ${lastDir} has no "${missing}"${hint}`, 'path', path);
}

/** A safe 64-bit little-endian read: a Number, or FormatError when it exceeds 2^53. */
export function u64(view: DataView, off: number, what: string): number {
  const v = view.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new FormatError(`${what} is ${v}, beyond what vdboot can address (2^53 bytes): the filesystem is damaged`, what, v);
  }
  return Number(v);
}

export function viewOf(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Simple case folding for FAT long names (Windows compares them case-insensitively). */
export function upcaseChar(c: number): number {
  if (c < 0x61) return c;
  if (c <= 0x7a) return c - 32;
  if (c < 0x80) return c;
  const s = String.fromCharCode(c).toUpperCase();
  return s.length === 1 ? s.charCodeAt(0) : c;
}

/**
 * Reads a table (a FAT) through a small cache of 64 KiB pages: following a chain of a
 * large file touches each page once instead of issuing a read per cluster, and a FAT of
 * hundreds of MiB is never loaded whole.
 */
export class TablePages {
  private readonly pages = new Map<number, Uint8Array>();
  constructor(
    private readonly reader: BlockReader,
    private readonly base: number,
    readonly length: number,
    private readonly pageSize = 65536,
    private readonly maxPages = 256,
  ) {}

  private page(p: number): Uint8Array {
    let page = this.pages.get(p);
    if (!page) {
      if (this.pages.size >= this.maxPages) this.pages.clear();
      const start = p * this.pageSize;
      page = this.reader.read(this.base + start, Math.min(this.pageSize, this.length - start));
      this.pages.set(p, page);
    }
    return page;
  }

  byte(off: number): number {
    if (off < 0 || off >= this.length) throw new FormatError(`${this.reader.name}: table read at ${off} is outside the table (${this.length} bytes)`, 'offset', off);
    const p = Math.floor(off / this.pageSize);
    return this.page(p)[off - p * this.pageSize]!;
  }

  u16(off: number): number {
    return this.byte(off) | (this.byte(off + 1) << 8);
  }

  u32(off: number): number {
    // One page lookup for an aligned entry (FAT32 and exFAT entries are): the chain walk of
    // a large file reads thousands of them, and each lookup counts on QuickJS.
    const p = Math.floor(off / this.pageSize);
    const at = off - p * this.pageSize;
    if (off >= 0 && off + 4 <= this.length && at + 4 <= this.pageSize) {
      const page = this.page(p);
      return (page[at]! | (page[at + 1]! << 8) | (page[at + 2]! << 16) | (page[at + 3]! << 24)) >>> 0;
    }
    return (this.byte(off) | (this.byte(off + 1) << 8) | (this.byte(off + 2) << 16) | (this.byte(off + 3) << 24)) >>> 0;
  }
}
