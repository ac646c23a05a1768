/**
 * The ExtentMap algebra (DESIGN §3): merge, validate, slice, compose with a file's
 * physical extents, turn into device-mapper table lines, summarize.
 *
 * API (all pure, engine-neutral; every function returns new arrays):
 *
 *   mergeExtents<T extends LayerExtent>(extents: readonly T[]): T[]
 *       Joins neighbours that are contiguous on both sides (same kind; data: same file
 *       and offset continues; zero: same `why`; unmappable: same reason). Drops
 *       zero-length extents. Input must be sorted.
 *   isMerged(extents): boolean          true when mergeExtents would change nothing
 *   appendExtent<T extends LayerExtent>(out: T[], e: T): T[]
 *       The same while building a list: extends out's last extent in place when e
 *       continues it, else pushes e (a fresh object the list then owns).
 *
 *   validateExtents(what: string, size: number, extents: readonly LayerExtent[],
 *                   opts?: ValidateOptions): void
 *   validateMap(map: ExtentMap, opts?: ValidateOptions): void
 *       Throws FormatError unless the list is sorted, gap-free, covers [0, size), every
 *       data extent lies inside its file (opts.fileSizes[file]), overlaps no other data
 *       extent (two virtual ranges on the same file bytes) and none of opts.metadata
 *       (the layer's own headers/tables). `what` names the image in messages.
 *
 *   sliceExtents<T extends LayerExtent>(extents: readonly T[], start: number, length: number): T[]
 *   sliceMap(map: ExtentMap, start: number, length: number): ExtentMap
 *       The part [start, start+length) rebased to 0 (a partition's range of a disk map).
 *       Binary search, so slicing a million-extent map is cheap.
 *
 *   composeMap(map: ExtentMap, layouts: readonly (FileLayout | null)[]): ExtentMap
 *       map ∘ file extents: for every files[i] with a layout, each data extent is
 *       re-expressed on layouts[i].device; file holes and NTFS "past initialized size"
 *       become zero{why:'uninitialized'}. `null` keeps files[i] as it is (e.g. a file
 *       reached through a loop device). Result files[] = the devices/files used.
 *
 *   validateComposed(what, composed: ExtentMap, layouts, metadata): void
 *       The composed map checked once more on the devices: no two virtual ranges on the
 *       same device bytes, none on a layer's metadata (file ranges, by map file index,
 *       translated through `layouts` into device ranges). Catches two files of a set that
 *       share bytes on the host, whatever the chain resolver knew of their identity.
 *
 *   dmTable(map: ExtentMap, opts?: DmTableOptions): string[]
 *       device-mapper lines "start_sector num_sectors linear DEV offset_sector" and
 *       "start num zero" (512-byte sectors). Refuses (FormatError) unaligned extents,
 *       unmappable extents, and any zero extent when opts.writable.
 *
 *   summarizeMap(map: ExtentMap): MapSummary   counts and bytes per kind / why / file.
 *
 *   findExtent(extents, offset): number        index of the extent holding `offset` (-1 if none).
 */
import { FormatError } from './block-reader.ts';
import type { Extent, ExtentMap, LayerExtent } from './extent-map.ts';

/** A byte range of one of the layer's files that holds the format's own structures. */
export interface MetadataRange {
  /** index into the layer's files[] */
  file: number;
  offset: number;
  length: number;
  /** e.g. "BAT", "footer", "block 12 sector bitmap" */
  what: string;
}

/**
 * A format reader may return its metadata ranges with the layer, so the chain resolver
 * can check that no data extent points into them: `return {...layer, metadata}`.
 */
export interface LayerMetadata {
  metadata?: MetadataRange[];
}

export interface ValidateOptions {
  /** size in bytes of each file data extents point into, by index */
  fileSizes?: readonly number[];
  metadata?: readonly MetadataRange[];
  /** names of files, for messages */
  files?: readonly string[];
}

/** One piece of a host file on a device, as a host filesystem reader reports it. */
export type FileExtent =
  | { kind: 'data'; fileOffset: number; length: number; deviceOffset: number }
  /** a sparse file's hole, or NTFS bytes past the initialized size: read as zeros */
  | { kind: 'hole' | 'uninitialized'; fileOffset: number; length: number };

export interface FileLayout {
  /** the device path the file's data lies on, e.g. /dev/sda2 */
  device: string;
  /** sorted by fileOffset, gap-free, covering at least the bytes the map uses */
  extents: readonly FileExtent[];
  /** the file's size, when known (filling its holes stops there) */
  size?: number;
  /** the bytes its filesystem allocates a hole in at once (HostFile.allocationUnit) */
  allocationUnit?: number;
}

export interface DmTableOptions {
  /** refuse zero extents: writes to dm-zero vanish, and format-zero ranges need table updates */
  writable?: boolean;
  /** device path per file index, when files[] holds names that are not device paths */
  devices?: readonly string[];
}

export interface MapSummary {
  size: number;
  extents: number;
  dataExtents: number;
  dataBytes: number;
  zeroBytes: number;
  unmappableBytes: number;
  zeroBytesByWhy: Record<string, number>;
  dataBytesByFile: number[];
}

function sameRun(a: LayerExtent, b: LayerExtent): boolean {
  if (a.kind !== b.kind || a.start + a.length !== b.start) return false;
  switch (a.kind) {
    case 'data': {
      const d = b as typeof a;
      return a.file === d.file && a.offset + a.length === d.offset;
    }
    case 'zero':
      return a.why === (b as typeof a).why;
    case 'unmappable':
      return a.reason === (b as typeof a).reason;
    case 'parent':
      return true;
  }
}

/**
 * Appends `e` to a list being built in order, extending the last extent in place when
 * `e` continues it (the last extent must be owned by the list). Returns the list.
 */
export function appendExtent<T extends LayerExtent>(out: T[], e: T): T[] {
  if (e.length <= 0) return out;
  const last = out[out.length - 1];
  if (last !== undefined && sameRun(last, e)) last.length += e.length;
  else out.push(e);
  return out;
}

/** True when no two neighbours could be merged (and none is empty). */
export function isMerged(extents: readonly LayerExtent[]): boolean {
  for (let i = 0; i < extents.length; i++) {
    if (extents[i]!.length <= 0 || (i > 0 && sameRun(extents[i - 1]!, extents[i]!))) return false;
  }
  return true;
}

export function mergeExtents<T extends LayerExtent>(extents: readonly T[]): T[] {
  const out: T[] = [];
  let last: T | undefined;
  for (const e of extents) {
    if (e.length <= 0) continue;
    if (last !== undefined && sameRun(last, e)) {
      last.length += e.length;
    } else {
      last = { ...e };
      out.push(last);
    }
  }
  return out;
}

/** Index of the extent containing `offset`, by binary search; -1 when none does. */
export function findExtent(extents: readonly LayerExtent[], offset: number): number {
  let lo = 0;
  let hi = extents.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const e = extents[mid]!;
    if (offset < e.start) hi = mid - 1;
    else if (offset >= e.start + e.length) lo = mid + 1;
    else return mid;
  }
  return -1;
}

function describe(e: LayerExtent): string {
  return e.kind === 'data'
    ? `data extent at virtual ${e.start} (+${e.length}) -> file ${e.file} offset ${e.offset}`
    : `${e.kind} extent at virtual ${e.start} (+${e.length})`;
}

export function validateExtents(
  what: string,
  size: number,
  extents: readonly LayerExtent[],
  opts: ValidateOptions = {},
): void {
  if (!Number.isSafeInteger(size) || size < 0) throw new FormatError(`${what}: virtual size ${size} is not a valid size`, 'size', size);
  let pos = 0;
  for (const e of extents) {
    if (!Number.isSafeInteger(e.start) || !Number.isSafeInteger(e.length) || e.length <= 0) {
      throw new FormatError(`${what}: ${describe(e)} has an invalid position or length`, 'extent', e.start);
    }
    if (e.start !== pos) {
      throw new FormatError(`${what}: the map is not contiguous: ${describe(e)} should start at ${pos}`, 'extent', e.start);
    }
    pos += e.length;
    if (e.kind === 'data') {
      const fileName = opts.files?.[e.file] ?? `file ${e.file}`;
      if (!Number.isSafeInteger(e.offset) || e.offset < 0 || !Number.isInteger(e.file) || e.file < 0) {
        throw new FormatError(`${what}: ${describe(e)} has an invalid file or offset`, 'offset', e.offset);
      }
      const fileSize = opts.fileSizes?.[e.file];
      if (opts.fileSizes && fileSize === undefined) {
        throw new FormatError(`${what}: ${describe(e)} names a file the image does not have`, 'file', e.file);
      }
      if (fileSize !== undefined && e.offset + e.length > fileSize) {
        throw new FormatError(
          `${what}: ${describe(e)} ends at byte ${e.offset + e.length} of ${fileName}, which has only ${fileSize} bytes: the image is truncated or its tables are damaged`,
          'offset', e.offset,
        );
      }
    }
  }
  if (pos !== size) {
    throw new FormatError(`${what}: the map covers ${pos} bytes, the virtual size is ${size}`, 'size', size);
  }
  checkMetadataOverlap(what, extents, opts.metadata ?? [], opts.files);
}

/**
 * No two data extents on the same bytes of a file, none on the layer's metadata.
 *
 * Fast check first, with numbers only (a million extents take seconds to sort as objects
 * in QuickJS): per file, sort the starts and the ends of the data extents separately
 * (native typed-array sorts); the extents are disjoint exactly when every sorted end is at
 * or before the next sorted start, and then a metadata range [a, b) overlaps data when
 * the last extent starting before b ends after a. Only when something is wrong does the
 * slow path find the extents to name in the message.
 */
function checkMetadataOverlap(
  what: string,
  extents: readonly LayerExtent[],
  metadata: readonly MetadataRange[],
  files: readonly string[] | undefined,
): void {
  const perFile = new Map<number, number>();
  for (const e of extents) if (e.kind === 'data') perFile.set(e.file, (perFile.get(e.file) ?? 0) + 1);
  for (const [file, n] of perFile) {
    const starts = new Float64Array(n);
    const ends = new Float64Array(n);
    let k = 0;
    for (const e of extents) {
      if (e.kind === 'data' && e.file === file) {
        starts[k] = e.offset;
        ends[k++] = e.offset + e.length;
      }
    }
    starts.sort();
    ends.sort();
    for (let i = 0; i + 1 < n; i++) if (ends[i]! > starts[i + 1]!) return explainOverlap(what, extents, metadata, files);
    for (const m of metadata) {
      if (m.file !== file || m.length <= 0) continue;
      // last extent starting before the range's end
      let lo = 0;
      let hi = n - 1;
      let found = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >>> 1;
        if (starts[mid]! < m.offset + m.length) { found = mid; lo = mid + 1; } else hi = mid - 1;
      }
      if (found >= 0 && ends[found]! > m.offset) return explainOverlap(what, extents, metadata, files);
    }
  }
}

/** The slow path of checkMetadataOverlap: sorts the extents as objects to name the culprits. */
function explainOverlap(
  what: string,
  extents: readonly LayerExtent[],
  metadata: readonly MetadataRange[],
  files: readonly string[] | undefined,
): void {
  const data: { file: number; offset: number; length: number; start: number }[] = [];
  for (const e of extents) if (e.kind === 'data') data.push(e);
  const byPos = (a: { file: number; offset: number }, b: { file: number; offset: number }) => a.file - b.file || a.offset - b.offset;
  data.sort(byPos);
  for (let i = 1; i < data.length; i++) {
    const a = data[i - 1]!;
    const b = data[i]!;
    if (a.file === b.file && a.offset + a.length > b.offset) {
      throw new FormatError(
        `${what}: virtual bytes ${a.start}..${a.start + a.length} and ${b.start}..${b.start + b.length} are mapped onto the same bytes of ${files?.[a.file] ?? `file ${a.file}`} (from ${b.offset}): the tables are damaged; refusing it, since writing one range would change the other`,
        'offset', b.offset,
      );
    }
  }
  const meta = metadata.filter((m) => m.length > 0).sort(byPos);
  let j = 0;
  for (const d of data) {
    while (j < meta.length && (meta[j]!.file < d.file || (meta[j]!.file === d.file && meta[j]!.offset + meta[j]!.length <= d.offset))) j++;
    // meta[j..] end after d starts (same file) or lie in later files; metadata ranges may overlap each other, so look ahead
    for (let k = j; k < meta.length; k++) {
      const m = meta[k]!;
      if (m.file !== d.file || m.offset >= d.offset + d.length) break;
      if (m.offset + m.length > d.offset) {
        throw new FormatError(
          `${what}: virtual bytes ${d.start}..${d.start + d.length} are mapped onto the image's own ${m.what} (${files?.[m.file] ?? `file ${m.file}`} bytes ${m.offset}..${m.offset + m.length}): the tables are damaged; refusing it, since a boot would expose or overwrite that data`,
          'offset', d.offset,
        );
      }
    }
  }
  throw new FormatError(`${what}: data ranges overlap each other or the image's own tables`, 'offset');
}

export function validateMap(map: ExtentMap, opts: ValidateOptions = {}): void {
  validateExtents(map.files[0] ?? 'image', map.size, map.extents, { files: map.files, ...opts });
  for (const e of map.extents) {
    if (e.kind === 'data' && (e.file >= map.files.length)) {
      throw new FormatError(`${map.files[0] ?? 'image'}: ${describe(e)} names a file the map does not list`, 'file', e.file);
    }
  }
}

export function sliceExtents<T extends LayerExtent>(extents: readonly T[], start: number, length: number): T[] {
  const out: T[] = [];
  if (length <= 0) return out;
  const end = start + length;
  let i = findExtent(extents, start);
  if (i < 0) return out;
  for (; i < extents.length; i++) {
    const e = extents[i]!;
    if (e.start >= end) break;
    const s = Math.max(e.start, start);
    const t = Math.min(e.start + e.length, end);
    const piece = { ...e, start: s - start, length: t - s };
    if (piece.kind === 'data') piece.offset = (e as { offset: number }).offset + (s - e.start);
    out.push(piece);
  }
  return out;
}

export function sliceMap(map: ExtentMap, start: number, length: number): ExtentMap {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > map.size) {
    throw new FormatError(`range ${start}..${start + length} lies outside the ${map.size}-byte disk`, 'range', start);
  }
  return { size: length, files: map.files.slice(), extents: sliceExtents(map.extents, start, length) };
}

/** Index of the file extent containing fileOffset (binary search on fileOffset). */
function findFileExtent(extents: readonly FileExtent[], offset: number): number {
  let lo = 0;
  let hi = extents.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const e = extents[mid]!;
    if (offset < e.fileOffset) hi = mid - 1;
    else if (offset >= e.fileOffset + e.length) lo = mid + 1;
    else return mid;
  }
  return -1;
}

export function composeMap(map: ExtentMap, layouts: readonly (FileLayout | null)[]): ExtentMap {
  const files: string[] = [];
  const index = new Map<string, number>();
  const fileIndex = (name: string): number => {
    let i = index.get(name);
    if (i === undefined) {
      i = files.length;
      files.push(name);
      index.set(name, i);
    }
    return i;
  };
  const out: Extent[] = [];
  for (const e of map.extents) {
    if (e.kind !== 'data') {
      out.push({ ...e });
      continue;
    }
    const layout = layouts[e.file];
    if (!layout) {
      out.push({ ...e, file: fileIndex(map.files[e.file] ?? `file ${e.file}`) });
      continue;
    }
    const dev = fileIndex(layout.device);
    let pos = e.offset;
    const end = e.offset + e.length;
    let i = findFileExtent(layout.extents, pos);
    while (pos < end) {
      const f = i >= 0 ? layout.extents[i] : undefined;
      if (!f || f.fileOffset > pos || f.fileOffset + f.length <= pos) {
        throw new FormatError(
          `${map.files[e.file]}: byte ${pos} of the file is not covered by its extents on ${layout.device}; the host filesystem's allocation information is incomplete`,
          'fileOffset', pos,
        );
      }
      const take = Math.min(end, f.fileOffset + f.length) - pos;
      const vstart = e.start + (pos - e.offset);
      if (f.kind === 'data') out.push({ kind: 'data', start: vstart, length: take, file: dev, offset: f.deviceOffset + (pos - f.fileOffset) });
      else out.push({ kind: 'zero', start: vstart, length: take, why: 'uninitialized' });
      pos += take;
      i++;
    }
  }
  return { size: map.size, files, extents: mergeExtents(out) };
}

export function validateComposed(
  what: string,
  composed: ExtentMap,
  layouts: readonly (FileLayout | null)[],
  metadata: readonly MetadataRange[],
): void {
  const deviceIndex = new Map<string, number>(composed.files.map((f, i) => [f, i]));
  const onDevice: MetadataRange[] = [];
  for (const m of metadata) {
    const layout = layouts[m.file];
    if (!layout || m.length <= 0) continue;
    const dev = deviceIndex.get(layout.device);
    if (dev === undefined) continue;
    const end = m.offset + m.length;
    for (let i = Math.max(0, findFileExtent(layout.extents, m.offset)); i < layout.extents.length; i++) {
      const f = layout.extents[i]!;
      if (f.fileOffset >= end) break;
      if (f.kind === 'hole' || (f as { deviceOffset?: number }).deviceOffset === undefined) continue;
      const s = Math.max(m.offset, f.fileOffset);
      const t = Math.min(end, f.fileOffset + f.length);
      if (s < t) onDevice.push({ file: dev, offset: (f as { deviceOffset: number }).deviceOffset + (s - f.fileOffset), length: t - s, what: m.what });
    }
  }
  validateExtents(what, composed.size, composed.extents, { metadata: onDevice, files: composed.files });
}

const SECTOR = 512;

export function dmTable(map: ExtentMap, opts: DmTableOptions = {}): string[] {
  const lines: string[] = [];
  for (const e of isMerged(map.extents) ? map.extents : mergeExtents(map.extents)) {
    if (e.start % SECTOR !== 0 || e.length % SECTOR !== 0 || (e.kind === 'data' && e.offset % SECTOR !== 0)) {
      throw new FormatError(
        `${describe(e)} is not aligned to 512-byte sectors, so device-mapper cannot map it; use the loop or nbd path instead`,
        'extent', e.start,
      );
    }
    const s = e.start / SECTOR;
    const n = e.length / SECTOR;
    if (e.kind === 'data') {
      const dev = opts.devices?.[e.file] ?? map.files[e.file];
      if (dev === undefined) throw new FormatError(`${describe(e)} names a file the map does not list`, 'file', e.file);
      lines.push(`${s} ${n} linear ${dev} ${e.offset / SECTOR}`);
    } else if (e.kind === 'zero') {
      if (opts.writable) {
        throw new FormatError(
          `virtual bytes ${e.start}..${e.start + e.length} are ${e.why === 'unallocated' ? 'not allocated in the image' : e.why === 'zeroed' ? 'marked as zeros in the image tables' : 'uninitialized in the host file'}; a read-write mapping would lose writes there. Use rd.vdisk.mode=snapshot, rd.vdisk.map=nbd, or a preallocated image`,
          'extent', e.start,
        );
      }
      lines.push(`${s} ${n} zero`);
    } else {
      throw new FormatError(
        `virtual bytes ${e.start}..${e.start + e.length} cannot be mapped by device-mapper (${e.reason}); use rd.vdisk.map=nbd or convert the image`,
        'extent', e.start,
      );
    }
  }
  return lines;
}

export function summarizeMap(map: ExtentMap): MapSummary {
  const s: MapSummary = {
    size: map.size,
    extents: map.extents.length,
    dataExtents: 0,
    dataBytes: 0,
    zeroBytes: 0,
    unmappableBytes: 0,
    zeroBytesByWhy: {},
    dataBytesByFile: map.files.map(() => 0),
  };
  for (const e of map.extents) {
    if (e.kind === 'data') {
      s.dataExtents++;
      s.dataBytes += e.length;
      s.dataBytesByFile[e.file] = (s.dataBytesByFile[e.file] ?? 0) + e.length;
    } else if (e.kind === 'zero') {
      s.zeroBytes += e.length;
      s.zeroBytesByWhy[e.why] = (s.zeroBytesByWhy[e.why] ?? 0) + e.length;
    } else {
      s.unmappableBytes += e.length;
    }
  }
  return s;
}
