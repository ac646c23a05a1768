/**
 * Filling a host file's holes before a read-write boot (DESIGN §3): ranges of the image
 * file that its host filesystem stores as holes (a sparse file, as `cp` or a download
 * leaves it) or past its initialized size (NTFS, exFAT's valid data length) read as zeros
 * but have no place on the partition a direct mapping could write to. Rewriting them
 * through the host's own driver gives them one: the driver allocates and records them,
 * and the file then maps directly like any other.
 *
 * Why whole allocation units, and why rewritten rather than zero-filled: NTFS allocates
 * a sparse file in compression units (16 clusters), and Linux's ntfs3 (seen on 6.12), asked
 * to write into the hole part of a unit that is partly allocated, gives the unit new
 * clusters and does not carry over the clusters the unit already had: their data reads
 * as zeros afterwards (a guest's ext4 lost its journal superblock that way). So every
 * range is widened to whole units and written back with the bytes the driver reads there,
 * each unit in one write: whichever clusters the driver chooses, all of them get their
 * own data. Nothing else in the file changes.
 *
 * `fillChecks` records a CRC of the units at each range's two ends, where allocated data
 * and former holes meet; the boot reads them again from the partition, through the file's
 * new extents, before it maps anything (verifyFill), so a driver that put the bytes
 * elsewhere is caught before the guest writes a byte. Pure: an ExpandFile does the I/O.
 */
import { FormatError, type BlockReader } from '../block-reader.ts';
import { crc32 } from '../crc.ts';
import type { FileExtent } from '../extent-ops.ts';
import { type ExpandFile, MiB, Progress } from './common.ts';

/** A range of the file to rewrite, in bytes, on allocation-unit boundaries (the last may end at the file's end). */
export interface FillRange {
  offset: number;
  length: number;
}

export interface FillPlan {
  /** the file's name for messages */
  name: string;
  /** sorted, disjoint, merged */
  ranges: FillRange[];
  /** bytes rewritten in all */
  writeBytes: number;
  /** bytes that read as zeros now (holes and uninitialized ranges): what the host must find room for */
  zeroBytes: number;
  /** the allocation unit the ranges are widened to */
  unit: number;
}

/** One unit's CRC-32 after the fill, for verifyFill. */
export interface FillCheck {
  offset: number;
  length: number;
  crc: number;
}

/** The smallest unit ever used: a page, so a fill never writes part of one. */
const MIN_UNIT = 4096;
/** Units larger than this are not plausible for any host filesystem (NTFS: 16 clusters of at most 2 MiB). */
const MAX_UNIT = 32 * MiB;

/**
 * The ranges of a file of `size` bytes with these extents that read as zeros without
 * being stored (holes, uninitialized), widened to whole `unit`s and merged. Null when
 * there are none.
 */
export function planFill(name: string, size: number, extents: readonly FileExtent[], allocationUnit = MIN_UNIT): FillPlan | null {
  if (!Number.isSafeInteger(allocationUnit) || allocationUnit <= 0 || allocationUnit > MAX_UNIT || (allocationUnit & (allocationUnit - 1)) !== 0) {
    throw new FormatError(`${name}: its host filesystem reports an allocation unit of ${allocationUnit} bytes, which vdboot does not accept (a power of two up to ${MAX_UNIT})`, 'unit', allocationUnit);
  }
  const unit = Math.max(MIN_UNIT, allocationUnit);
  const ranges: FillRange[] = [];
  let zeroBytes = 0;
  for (const e of extents) {
    if (e.kind === 'data' || e.length <= 0) continue;
    const from = Math.max(0, Math.min(size, e.fileOffset));
    const to = Math.max(from, Math.min(size, e.fileOffset + e.length));
    if (to <= from) continue;
    zeroBytes += to - from;
    const start = Math.floor(from / unit) * unit;
    const end = Math.min(size, Math.ceil(to / unit) * unit);
    const last = ranges[ranges.length - 1];
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else ranges.push({ offset: start, length: end - start });
  }
  if (!ranges.length) return null;
  return { name, ranges, writeBytes: ranges.reduce((n, r) => n + r.length, 0), zeroBytes, unit };
}

/**
 * Rewrites every range of `plan` through `file` (the host's driver), a whole number of
 * units per write, then syncs. Returns the checks of each range's first and last unit.
 * A failure leaves the file reading as before: each write puts back the bytes read there.
 */
export function runFill(file: ExpandFile, plan: FillPlan, progress?: (done: number, total: number) => void): FillCheck[] {
  const p = new Progress(plan.writeBytes, progress);
  const chunk = Math.max(plan.unit, Math.floor(MiB / plan.unit) * plan.unit);
  const checks: FillCheck[] = [];
  for (const r of plan.ranges) {
    const end = r.offset + r.length;
    if (end > file.size) throw new FormatError(`${plan.name}: the range to fill ${r.offset}..${end} lies past the file's end (${file.size} bytes) as its driver sees it`, 'fill', r.offset);
    for (let at = r.offset; at < end; at += chunk) {
      const n = Math.min(chunk, end - at);
      const bytes = file.read(at, n);
      file.write(at, bytes);
      p.add(n);
      const firstUnit = at === r.offset;
      const lastUnit = at + n === end;
      if (firstUnit) checks.push({ offset: at, length: Math.min(plan.unit, n), crc: crc32(bytes.subarray(0, Math.min(plan.unit, n))) });
      if (lastUnit && (!firstUnit || n > plan.unit)) {
        const tail = n % plan.unit || Math.min(plan.unit, n);
        checks.push({ offset: at + n - tail, length: tail, crc: crc32(bytes.subarray(n - tail)) });
      }
    }
  }
  file.sync();
  return checks;
}

/**
 * Reads each checked unit again through `read` (the file's bytes as its new extents place
 * them on the partition) and returns what differs, as sentences for the console; empty
 * when every unit holds what the fill wrote.
 */
export function verifyFill(name: string, checks: readonly FillCheck[], read: BlockReader): string[] {
  const bad: string[] = [];
  for (const c of checks) {
    let got: number;
    try {
      got = crc32(read.read(c.offset, c.length));
    } catch (e) {
      bad.push(`${name}: bytes ${c.offset}..${c.offset + c.length} cannot be read from the partition where the file's records place them (${(e as Error).message})`);
      continue;
    }
    if (got !== c.crc) bad.push(`${name}: bytes ${c.offset}..${c.offset + c.length} on the partition differ from what was written there through the driver`);
  }
  return bad;
}

/**
 * A file's bytes read from `device` where its extents place them (what a direct mapping
 * will show); a range still in a hole or uninitialized is an error, not zeros.
 */
export function layoutReader(name: string, size: number, extents: readonly FileExtent[], device: BlockReader): BlockReader {
  return {
    name,
    size,
    read(offset: number, length: number): Uint8Array {
      if (offset < 0 || length < 0 || offset + length > size) throw new FormatError(`${name}: read ${offset}+${length} past its end (${size} bytes)`, 'offset', offset);
      const out = new Uint8Array(length);
      let pos = offset;
      for (const e of extents) {
        if (pos >= offset + length) break;
        const eEnd = e.fileOffset + e.length;
        if (eEnd <= pos) continue;
        if (e.fileOffset > pos) break;
        const n = Math.min(eEnd, offset + length) - pos;
        if (e.kind !== 'data') throw new FormatError(`${name}: bytes ${pos}..${pos + n} are still ${e.kind === 'hole' ? 'a hole' : 'past the initialized size'} on the partition`, 'fill', pos);
        out.set(device.read(e.deviceOffset + (pos - e.fileOffset), n), pos - offset);
        pos += n;
      }
      if (pos < offset + length) throw new FormatError(`${name}: its extents do not cover bytes ${pos}..${offset + length}`, 'fill', pos);
      return out;
    },
  };
}
