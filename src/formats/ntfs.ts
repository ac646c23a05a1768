/**
 * NTFS, read by vdboot itself: path → physical extents of a file's unnamed $DATA.
 *
 * What is read: the boot sector; $MFT through its own $DATA runlist (which may be
 * fragmented and may spill into an $ATTRIBUTE_LIST); MFT records and index buffers with
 * their update-sequence fixups verified; directories through the $I30 index
 * ($INDEX_ROOT + $INDEX_ALLOCATION, a B+ tree collated with the volume's $UpCase);
 * runlists with sparse runs; the initialized size; $Volume's flags and hiberfil.sys for
 * the write blocker. Compressed and encrypted files are refused with what to do.
 *
 * Nothing here writes. Everything read from the volume is untrusted and bounds-checked.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import {
  type FileExtent, type HostDirEntry, type HostFile, type HostFs,
  joinHostPath, notFoundError, pushExtent, readThroughExtents, splitHostPath, u64, viewOf,
} from './host-volume.ts';
import { utf16leDecode } from './text.ts';
import { makeClusterTargets, scanMftChunk, type ClusterConflict, type ClusterRange } from './ntfs-owners.ts';

const AT_STANDARD_INFORMATION = 0x10;
const AT_ATTRIBUTE_LIST = 0x20;
const AT_FILE_NAME = 0x30;
const AT_VOLUME_NAME = 0x60;
const AT_VOLUME_INFORMATION = 0x70;
const AT_DATA = 0x80;
const AT_INDEX_ROOT = 0x90;
const AT_INDEX_ALLOCATION = 0xa0;
const AT_REPARSE_POINT = 0xc0;
const AT_END = 0xffffffff;

const ATTR_COMPRESSED = 0x0001;
const ATTR_ENCRYPTED = 0x4000;

const FILE_ATTR_COMPRESSED = 0x0800;
const FILE_ATTR_ENCRYPTED = 0x4000;

const MFT_RECORD_IN_USE = 0x0001;
const MFT_RECORD_IS_DIRECTORY = 0x0002;

const FILE_NAME_DOS = 2;

const IO_REPARSE_TAG_MOUNT_POINT = 0xa0000003;
const IO_REPARSE_TAG_SYMLINK = 0xa000000c;
const IO_REPARSE_TAG_DEDUP = 0x80000013;
const IO_REPARSE_TAG_WOF = 0x80000017;

const VOLUME_IS_DIRTY = 0x0001;

const REC_MFT = 0;
const REC_VOLUME = 3;
const REC_ROOT = 5;
const REC_BITMAP = 6;
const REC_UPCASE = 10;

/** NTFS fixups always protect 512-byte strides, whatever the sector size. */
const FIXUP_STRIDE = 512;

/**
 * The most MFT records the ownership proof reads (4 GiB of $MFT at 1 KiB a record): a
 * volume with more files is refused rather than checked for minutes.
 */
export const MAX_OWNERSHIP_RECORDS = 4 * 1024 * 1024;
/** The ownership pass reads the $MFT in pieces of this size (a multiple of every record size). */
const OWNERSHIP_CHUNK = 4 * 1024 * 1024;

/** The most fragments vdboot follows in one attribute (a corrupt runlist must not exhaust memory). */
const MAX_RUNS = 4_000_000;

export function isNtfsBootSector(b: Uint8Array): boolean {
  return b.length >= 512 && b[3] === 0x4e && b[4] === 0x54 && b[5] === 0x46 && b[6] === 0x53 &&
    b[7] === 0x20 && b[8] === 0x20 && b[9] === 0x20 && b[10] === 0x20;
}

export interface NtfsBootSector {
  bytesPerSector: number;
  clusterSize: number;
  totalSectors: number;
  mftLcn: number;
  mftMirrLcn: number;
  mftRecordSize: number;
  indexRecordSize: number;
}

/** A run of a non-resident attribute: `lcn` null for a sparse run. */
export interface NtfsRun {
  vcn: number;
  length: number;
  lcn: number | null;
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

export function parseNtfsBootSector(b: Uint8Array, partitionName: string): NtfsBootSector {
  const v = viewOf(b);
  const bytesPerSector = v.getUint16(0x0b, true);
  if (!isPow2(bytesPerSector) || bytesPerSector < 256 || bytesPerSector > 4096) {
    throw new FormatError(`${partitionName}: NTFS boot sector says ${bytesPerSector} bytes per sector (expected 256..4096, a power of two): the boot sector is damaged; chkdsk on Windows can repair it from its backup`, 'bytes_per_sector', bytesPerSector);
  }
  const spcRaw = b[0x0d]!;
  // Values above 0x80 encode 2^(256 - value) sectors (clusters of 128 KiB and more).
  const sectorsPerCluster = spcRaw <= 0x80 ? spcRaw : 2 ** (256 - spcRaw);
  const clusterSize = sectorsPerCluster * bytesPerSector;
  if (!isPow2(sectorsPerCluster) || clusterSize > 2 * 1024 * 1024) {
    throw new FormatError(`${partitionName}: NTFS boot sector has an invalid sectors-per-cluster byte 0x${spcRaw.toString(16)}: the boot sector is damaged`, 'sectors_per_cluster', spcRaw);
  }
  const totalSectors = u64(v, 0x28, 'NTFS total sectors');
  const mftLcn = u64(v, 0x30, 'NTFS $MFT cluster');
  const mftMirrLcn = u64(v, 0x38, 'NTFS $MFTMirr cluster');
  const recSize = (raw: number): number => {
    const s = raw > 127 ? raw - 256 : raw;
    if (s > 0) return s * clusterSize;
    if (s < -31 || s === 0) return 0;
    return 2 ** -s;
  };
  const mftRecordSize = recSize(b[0x40]!);
  const indexRecordSize = recSize(b[0x44]!);
  if (!isPow2(mftRecordSize) || mftRecordSize < 256 || mftRecordSize > 65536 || mftRecordSize % FIXUP_STRIDE !== 0 && mftRecordSize > FIXUP_STRIDE) {
    throw new FormatError(`${partitionName}: NTFS boot sector gives an MFT record size of ${mftRecordSize} bytes (byte 0x${b[0x40]!.toString(16)}): the boot sector is damaged`, 'clusters_per_mft_record', b[0x40]!);
  }
  if (!isPow2(indexRecordSize) || indexRecordSize < 512 || indexRecordSize > 65536 * 4) {
    throw new FormatError(`${partitionName}: NTFS boot sector gives an index record size of ${indexRecordSize} bytes (byte 0x${b[0x44]!.toString(16)}): the boot sector is damaged`, 'clusters_per_index_record', b[0x44]!);
  }
  return { bytesPerSector, clusterSize, totalSectors, mftLcn, mftMirrLcn, mftRecordSize, indexRecordSize };
}

/**
 * Applies and verifies the update sequence fixups of a FILE or INDX record in place.
 * A torn record (a sector written without the others) is an error: its contents
 * cannot be trusted.
 */
export function applyFixups(rec: Uint8Array, what: string): void {
  const v = viewOf(rec);
  const usaOfs = v.getUint16(4, true);
  const usaCount = v.getUint16(6, true);
  const strides = Math.floor(rec.length / FIXUP_STRIDE);
  if (usaCount !== strides + 1 || usaOfs % 2 !== 0 || usaOfs + usaCount * 2 > rec.length || usaOfs < 8) {
    throw new FormatError(`${what}: update sequence array (offset ${usaOfs}, ${usaCount} entries) does not fit a ${rec.length}-byte record: the record is damaged; run chkdsk on Windows`, 'usa', usaCount);
  }
  const usn = v.getUint16(usaOfs, true);
  for (let i = 1; i < usaCount; i++) {
    const end = i * FIXUP_STRIDE - 2;
    if (v.getUint16(end, true) !== usn) {
      throw new FormatError(`${what} is torn: sector ${i - 1} of the record was not written with the rest (update sequence mismatch); run chkdsk on Windows before using this volume`, 'usn', v.getUint16(end, true));
    }
    v.setUint16(end, v.getUint16(usaOfs + i * 2, true), true);
  }
}

/** Decodes a runlist (mapping pairs) into runs, starting at `startVcn`. */
export function parseRunlist(b: Uint8Array, start: number, end: number, startVcn: number, what: string): NtfsRun[] {
  const runs: NtfsRun[] = [];
  let pos = start;
  let vcn = startVcn;
  let lcn = 0;
  while (pos < end) {
    const header = b[pos]!;
    if (header === 0) return runs;
    const lenSize = header & 0x0f;
    const ofsSize = header >> 4;
    if (lenSize === 0 || lenSize > 8 || ofsSize > 8 || pos + 1 + lenSize + ofsSize > end) {
      throw new FormatError(`${what}: runlist entry at byte ${pos} (header 0x${header.toString(16)}) is malformed: the MFT record is damaged; run chkdsk on Windows`, 'runlist', header);
    }
    let length = 0;
    for (let i = lenSize - 1; i >= 0; i--) length = length * 256 + b[pos + 1 + i]!;
    if (length <= 0 || !Number.isSafeInteger(length) || length > 2 ** 48) {
      throw new FormatError(`${what}: runlist has a run of ${length} clusters: the MFT record is damaged`, 'run_length', length);
    }
    if (ofsSize === 0) {
      runs.push({ vcn, length, lcn: null });
    } else {
      let delta = 0;
      for (let i = ofsSize - 1; i >= 0; i--) delta = delta * 256 + b[pos + 1 + lenSize + i]!;
      if (b[pos + lenSize + ofsSize]! & 0x80) delta -= 2 ** (8 * ofsSize);
      lcn += delta;
      if (lcn < 0 || !Number.isSafeInteger(lcn)) {
        throw new FormatError(`${what}: runlist points to cluster ${lcn}: the MFT record is damaged`, 'lcn', lcn);
      }
      runs.push({ vcn, length, lcn });
    }
    vcn += length;
    if (runs.length > MAX_RUNS) throw new FormatError(`${what}: runlist has more than ${MAX_RUNS} runs`, 'runlist', runs.length);
    pos += 1 + lenSize + ofsSize;
  }
  throw new FormatError(`${what}: runlist is not terminated within its attribute: the MFT record is damaged`, 'runlist', end);
}

interface Attr {
  type: number;
  name: string;
  flags: number;
  id: number;
  nonResident: boolean;
  /** resident value */
  value?: Uint8Array;
  lowVcn: number;
  highVcn: number;
  allocatedSize: number;
  dataSize: number;
  initializedSize: number;
  compressionUnit: number;
  runs?: NtfsRun[];
}

interface MftRecord {
  no: number;
  seq: number;
  flags: number;
  baseRef: number;
  attrs: Attr[];
}

/** The attribute of interest, gathered across $ATTRIBUTE_LIST extension records. */
interface FullAttr {
  type: number;
  name: string;
  flags: number;
  nonResident: boolean;
  value?: Uint8Array;
  allocatedSize: number;
  dataSize: number;
  initializedSize: number;
  /** log2 of the clusters per compression unit (0: neither sparse nor compressed) */
  compressionUnit: number;
  runs: NtfsRun[];
}

interface IndexEntry {
  ref: number;
  seq: number;
  name: string;
  namespace: number;
  isDir: boolean;
  size: number;
}

export class NtfsVolume implements HostFs {
  readonly type = 'ntfs' as const;
  readonly clusterSize: number;
  label?: string;
  readonly boot: NtfsBootSector;
  private readonly totalClusters: number;
  private mftRuns: NtfsRun[] = [];
  private mftSize = 0;
  private upcaseTable: Uint16Array | null = null;
  private volumeFlags = 0;
  private readonly volumeName: string;

  constructor(private readonly partition: BlockReader) {
    this.volumeName = partition.name;
    this.boot = parseNtfsBootSector(partition.read(0, 512), partition.name);
    this.clusterSize = this.boot.clusterSize;
    const sectors = Math.min(this.boot.totalSectors + 1, Math.floor(partition.size / this.boot.bytesPerSector));
    this.totalClusters = Math.floor((sectors * this.boot.bytesPerSector) / this.clusterSize);
    if (this.boot.mftLcn >= this.totalClusters) {
      throw new FormatError(`${this.volumeName}: NTFS $MFT is said to start at cluster ${this.boot.mftLcn}, past the end of the partition (${this.totalClusters} clusters): the partition is truncated or the boot sector damaged`, 'mft_lcn', this.boot.mftLcn);
    }
    this.loadMft();
    this.loadVolumeInfo();
  }

  // ---- MFT --------------------------------------------------------------------------

  private loadMft(): void {
    const size = this.boot.mftRecordSize;
    // a copy: fixups are applied in place, and a reader may hand out a view of its buffer
    const raw = new Uint8Array(this.partition.read(this.boot.mftLcn * this.clusterSize, size));
    const rec0 = this.parseRecord(raw, REC_MFT);
    const data = rec0.attrs.find((a) => a.type === AT_DATA && a.name === '' && a.lowVcn === 0);
    if (!data || !data.nonResident || !data.runs) {
      throw new FormatError(`${this.volumeName}: the $MFT record has no non-resident $DATA: the volume is damaged; run chkdsk on Windows`, '$MFT', 0);
    }
    this.mftRuns = data.runs.slice();
    this.mftSize = data.initializedSize;
    this.checkRuns(this.mftRuns, '$MFT');
    const list = rec0.attrs.find((a) => a.type === AT_ATTRIBUTE_LIST);
    if (list) {
      // A fragmented $MFT: its runlist continues in extension records, which the part
      // of the runlist already known must reach (Windows keeps them low in the $MFT).
      const entries = this.parseAttributeList(this.readAttrValue(list, '$MFT $ATTRIBUTE_LIST'), '$MFT');
      const exts = entries.filter((e) => e.type === AT_DATA && e.name === '' && e.lowVcn > 0).sort((a, b) => a.lowVcn - b.lowVcn);
      for (const e of exts) {
        const rec = this.readRecord(e.ref);
        const a = rec.attrs.find((x) => x.type === AT_DATA && x.name === '' && x.lowVcn === e.lowVcn);
        if (!a || !a.runs) throw new FormatError(`${this.volumeName}: $MFT extension record ${e.ref} lacks the $DATA part starting at VCN ${e.lowVcn}: the volume is damaged`, '$MFT', e.ref);
        const last = this.mftRuns[this.mftRuns.length - 1]!;
        if (a.lowVcn !== last.vcn + last.length) throw new FormatError(`${this.volumeName}: $MFT runlist parts do not join (VCN ${a.lowVcn} after ${last.vcn + last.length}): the volume is damaged`, '$MFT', a.lowVcn);
        this.checkRuns(a.runs, '$MFT');
        this.mftRuns.push(...a.runs);
      }
    }
    const covered = this.mftRuns.length ? (this.mftRuns[this.mftRuns.length - 1]!.vcn + this.mftRuns[this.mftRuns.length - 1]!.length) * this.clusterSize : 0;
    if (covered < this.mftSize) {
      throw new FormatError(`${this.volumeName}: $MFT runlist covers ${covered} bytes but $MFT holds ${this.mftSize}: the volume is damaged`, '$MFT', covered);
    }
  }

  private checkRuns(runs: NtfsRun[], what: string): void {
    for (const r of runs) {
      if (r.lcn !== null && r.lcn + r.length > this.totalClusters) {
        throw new FormatError(`${this.volumeName}: ${what} points to clusters ${r.lcn}..${r.lcn + r.length - 1}, past the end of the partition (${this.totalClusters} clusters): the runlist is damaged or the partition truncated`, 'lcn', r.lcn);
      }
    }
  }

  /** Reads and parses MFT record `no` (fixups verified). */
  private readRecord(no: number): MftRecord {
    const size = this.boot.mftRecordSize;
    if (!Number.isSafeInteger(no) || no < 0 || (no + 1) * size > this.mftSize) {
      throw new FormatError(`${this.volumeName}: MFT record ${no} is beyond the end of $MFT (${Math.floor(this.mftSize / size)} records): a directory entry or attribute list is damaged; run chkdsk on Windows`, 'mft_record', no);
    }
    const raw = this.readRuns(this.mftRuns, no * size, size, this.mftSize, '$MFT');
    return this.parseRecord(raw, no);
  }

  private parseRecord(raw: Uint8Array, no: number): MftRecord {
    const what = `${this.volumeName}: MFT record ${no}`;
    const sig = String.fromCharCode(raw[0]!, raw[1]!, raw[2]!, raw[3]!);
    if (sig === 'BAAD') throw new FormatError(`${what} is marked bad (BAAD) by chkdsk: run chkdsk on Windows`, 'signature', sig);
    if (sig !== 'FILE') throw new FormatError(`${what} has signature "${sig}" instead of "FILE": the MFT is damaged; run chkdsk on Windows`, 'signature', sig);
    applyFixups(raw, what);
    const v = viewOf(raw);
    const seq = v.getUint16(0x10, true);
    const firstAttr = v.getUint16(0x14, true);
    const flags = v.getUint16(0x16, true);
    const bytesInUse = v.getUint32(0x18, true);
    const baseRef = Number(v.getBigUint64(0x20, true) & 0xffffffffffffn);
    if (bytesInUse > raw.length || firstAttr < 0x18 || firstAttr >= bytesInUse) {
      throw new FormatError(`${what}: header says ${bytesInUse} bytes in use, attributes at ${firstAttr}, in a ${raw.length}-byte record: the record is damaged`, 'bytes_in_use', bytesInUse);
    }
    const attrs: Attr[] = [];
    let pos = firstAttr;
    for (;;) {
      if (pos + 4 > bytesInUse) throw new FormatError(`${what}: attributes run past the bytes in use (${bytesInUse}) without an end marker: the record is damaged`, 'attribute', pos);
      const type = v.getUint32(pos, true);
      if (type === AT_END) break;
      if (pos + 16 > bytesInUse) throw new FormatError(`${what}: attribute at ${pos} is cut short`, 'attribute', pos);
      const len = v.getUint32(pos + 4, true);
      if (len < 24 || len % 8 !== 0 || pos + len > bytesInUse) {
        throw new FormatError(`${what}: attribute 0x${type.toString(16)} at ${pos} has length ${len}, which does not fit the record: the record is damaged`, 'attribute_length', len);
      }
      attrs.push(this.parseAttr(raw.subarray(pos, pos + len), type, what));
      pos += len;
    }
    return { no, seq, flags, baseRef, attrs };
  }

  private parseAttr(a: Uint8Array, type: number, what: string): Attr {
    const v = viewOf(a);
    const nonResident = a[8] !== 0;
    const nameLen = a[9]!;
    const nameOfs = v.getUint16(0x0a, true);
    const flags = v.getUint16(0x0c, true);
    const id = v.getUint16(0x0e, true);
    if (nameLen && nameOfs + nameLen * 2 > a.length) throw new FormatError(`${what}: attribute 0x${type.toString(16)} name lies outside it`, 'name_offset', nameOfs);
    const name = nameLen ? utf16leDecode(a.subarray(nameOfs, nameOfs + nameLen * 2)) : '';
    if (!nonResident) {
      const valueLen = v.getUint32(0x10, true);
      const valueOfs = v.getUint16(0x14, true);
      if (valueOfs + valueLen > a.length) {
        throw new FormatError(`${what}: resident attribute 0x${type.toString(16)} value (${valueLen} bytes at ${valueOfs}) does not fit the attribute (${a.length} bytes): the record is damaged`, 'value_length', valueLen);
      }
      const value = new Uint8Array(a.subarray(valueOfs, valueOfs + valueLen));
      return { type, name, flags, id, nonResident, value, lowVcn: 0, highVcn: 0, allocatedSize: valueLen, dataSize: valueLen, initializedSize: valueLen, compressionUnit: 0 };
    }
    if (a.length < 0x40) throw new FormatError(`${what}: non-resident attribute 0x${type.toString(16)} is only ${a.length} bytes`, 'attribute_length', a.length);
    const lowVcn = u64(v, 0x10, 'attribute lowest VCN');
    const highVcnBig = v.getBigInt64(0x18, true);
    const highVcn = highVcnBig < 0n ? -1 : u64(v, 0x18, 'attribute highest VCN');
    const mpOfs = v.getUint16(0x20, true);
    const compressionUnit = v.getUint16(0x22, true);
    let allocatedSize = 0, dataSize = 0, initializedSize = 0;
    if (lowVcn === 0) {
      allocatedSize = u64(v, 0x28, 'attribute allocated size');
      dataSize = u64(v, 0x30, 'attribute data size');
      initializedSize = u64(v, 0x38, 'attribute initialized size');
      if (dataSize > allocatedSize && !(flags & ATTR_COMPRESSED)) {
        throw new FormatError(`${what}: attribute 0x${type.toString(16)} data size ${dataSize} exceeds its allocated size ${allocatedSize}: the record is damaged`, 'data_size', dataSize);
      }
      if (initializedSize > dataSize) initializedSize = dataSize;
    }
    if (mpOfs < 0x40 || mpOfs >= a.length) throw new FormatError(`${what}: attribute 0x${type.toString(16)} runlist offset ${mpOfs} lies outside it`, 'mapping_pairs_offset', mpOfs);
    const runs = parseRunlist(a, mpOfs, a.length, lowVcn, `${what} attribute 0x${type.toString(16)}`);
    const end = runs.length ? runs[runs.length - 1]!.vcn + runs[runs.length - 1]!.length : lowVcn;
    if (highVcn >= 0 && end !== highVcn + 1 && !(flags & ATTR_COMPRESSED)) {
      throw new FormatError(`${what}: attribute 0x${type.toString(16)} runlist ends at VCN ${end - 1}, its header says ${highVcn}: the record is damaged`, 'highest_vcn', highVcn);
    }
    return { type, name, flags, id, nonResident, lowVcn, highVcn, allocatedSize, dataSize, initializedSize, compressionUnit, runs };
  }

  /**
   * Reads bytes of a non-resident stream through its runs. Bytes past `initialized`
   * and sparse runs read as zeros.
   */
  private readRuns(runs: NtfsRun[], offset: number, length: number, initialized: number, what: string): Uint8Array {
    const out = new Uint8Array(length);
    const cs = this.clusterSize;
    let pos = offset;
    const end = offset + length;
    let i = findRun(runs, Math.floor(offset / cs));
    for (; i < runs.length && pos < end; i++) {
      const r = runs[i]!;
      const rStart = r.vcn * cs;
      const rEnd = (r.vcn + r.length) * cs;
      if (rEnd <= pos) continue;
      if (rStart > pos) break;
      const n = Math.min(end, rEnd) - pos;
      if (r.lcn !== null) {
        const readEnd = Math.min(pos + n, initialized);
        if (readEnd > pos) {
          if (r.lcn + r.length > this.totalClusters) throw new FormatError(`${this.volumeName}: ${what} points past the end of the partition (cluster ${r.lcn + r.length - 1})`, 'lcn', r.lcn);
          out.set(this.partition.read(r.lcn * cs + (pos - rStart), readEnd - pos), pos - offset);
        }
      }
      pos += n;
    }
    if (pos < end) throw new FormatError(`${this.volumeName}: ${what}: no cluster holds byte ${pos} (the runlist is too short): the volume is damaged; run chkdsk on Windows`, 'runlist', pos);
    return out;
  }

  /** Hints the partition's reader that the stream bytes [offset, offset+length) of `runs` are read next (prefetch). */
  private prefetchRuns(runs: NtfsRun[], offset: number, length: number): void {
    if (!this.partition.prefetch) return;
    const cs = this.clusterSize;
    const end = offset + length;
    for (let i = findRun(runs, Math.floor(offset / cs)); i < runs.length; i++) {
      const r = runs[i]!;
      const rStart = r.vcn * cs;
      if (rStart >= end) break;
      const from = Math.max(offset, rStart);
      const to = Math.min(end, (r.vcn + r.length) * cs);
      if (r.lcn !== null && to > from && r.lcn + r.length <= this.totalClusters) this.partition.prefetch(r.lcn * cs + (from - rStart), to - from);
    }
  }

  private readAttrValue(a: Attr | FullAttr, what: string, limit = 64 * 1024 * 1024): Uint8Array {
    if (!a.nonResident) return a.value!;
    if (a.dataSize > limit) throw new FormatError(`${this.volumeName}: ${what} is ${a.dataSize} bytes, more than vdboot reads into memory (${limit}): the volume is damaged or unusual`, 'data_size', a.dataSize);
    const runs = (a as FullAttr).runs ?? (a as Attr).runs ?? [];
    this.checkRuns(runs, what);
    return this.readRuns(runs, 0, a.dataSize, a.initializedSize, what);
  }

  private parseAttributeList(b: Uint8Array, what: string): { type: number; name: string; lowVcn: number; ref: number; id: number }[] {
    const v = viewOf(b);
    const out: { type: number; name: string; lowVcn: number; ref: number; id: number }[] = [];
    let pos = 0;
    while (pos + 0x1a <= b.length) {
      const type = v.getUint32(pos, true);
      const len = v.getUint16(pos + 4, true);
      if (type === 0 || type === AT_END) break;
      const nameLen = b[pos + 6]!;
      const nameOfs = b[pos + 7]!;
      if (len < 0x1a || pos + len > b.length || nameOfs + nameLen * 2 > len) {
        throw new FormatError(`${this.volumeName}: ${what}: $ATTRIBUTE_LIST entry at ${pos} has length ${len}: the list is damaged; run chkdsk on Windows`, 'attribute_list', len);
      }
      out.push({
        type,
        name: nameLen ? utf16leDecode(b.subarray(pos + nameOfs, pos + nameOfs + nameLen * 2)) : '',
        lowVcn: u64(v, pos + 8, 'attribute list VCN'),
        ref: Number(v.getBigUint64(pos + 0x10, true) & 0xffffffffffffn),
        id: v.getUint16(pos + 0x18, true),
      });
      pos += len;
    }
    return out;
  }

  /**
   * The attribute `type`/`name` of a file, with its runlist gathered from every
   * extension record its $ATTRIBUTE_LIST names (a file in thousands of fragments).
   */
  private getAttr(rec: MftRecord, type: number, name: string, what: string): FullAttr | null {
    const listAttr = rec.attrs.find((a) => a.type === AT_ATTRIBUTE_LIST);
    let parts: Attr[];
    if (!listAttr) {
      parts = rec.attrs.filter((a) => a.type === type && a.name === name);
    } else {
      const entries = this.parseAttributeList(this.readAttrValue(listAttr, `${what} $ATTRIBUTE_LIST`), what)
        .filter((e) => e.type === type && e.name === name);
      parts = [];
      const cache = new Map<number, MftRecord>([[rec.no, rec]]);
      for (const e of entries) {
        let r = cache.get(e.ref);
        if (!r) {
          if (cache.size > 100_000) throw new FormatError(`${this.volumeName}: ${what}: $ATTRIBUTE_LIST names more than 100000 records`, 'attribute_list', cache.size);
          r = this.readRecord(e.ref);
          if (r.no !== rec.no && r.baseRef !== rec.no) {
            throw new FormatError(`${this.volumeName}: ${what}: $ATTRIBUTE_LIST names record ${e.ref}, which belongs to record ${r.baseRef}: the volume is damaged; run chkdsk on Windows`, 'attribute_list', e.ref);
          }
          cache.set(e.ref, r);
        }
        const a = r.attrs.find((x) => x.type === type && x.name === name && x.id === e.id) ??
          r.attrs.find((x) => x.type === type && x.name === name && x.lowVcn === e.lowVcn);
        if (!a) throw new FormatError(`${this.volumeName}: ${what}: $ATTRIBUTE_LIST names an attribute 0x${type.toString(16)} in record ${e.ref} that is not there: the volume is damaged; run chkdsk on Windows`, 'attribute_list', e.ref);
        if (!parts.includes(a)) parts.push(a);
      }
    }
    if (parts.length === 0) return null;
    parts.sort((a, b) => a.lowVcn - b.lowVcn);
    const first = parts[0]!;
    if (!first.nonResident) {
      return { type, name, flags: first.flags, nonResident: false, value: first.value, allocatedSize: first.dataSize, dataSize: first.dataSize, initializedSize: first.dataSize, compressionUnit: 0, runs: [] };
    }
    if (first.lowVcn !== 0) throw new FormatError(`${this.volumeName}: ${what}: attribute 0x${type.toString(16)} has no part starting at VCN 0: the volume is damaged`, 'lowest_vcn', first.lowVcn);
    const runs: NtfsRun[] = [];
    let next = 0;
    for (const p of parts) {
      if (!p.nonResident || !p.runs) throw new FormatError(`${this.volumeName}: ${what}: attribute 0x${type.toString(16)} mixes resident and non-resident parts`, 'attribute', p.id);
      if (p.lowVcn !== next) {
        throw new FormatError(`${this.volumeName}: ${what}: attribute 0x${type.toString(16)} runlist parts do not join (a part starts at VCN ${p.lowVcn}, expected ${next}): the volume is damaged; run chkdsk on Windows`, 'lowest_vcn', p.lowVcn);
      }
      for (const r of p.runs) runs.push(r);
      const last = p.runs[p.runs.length - 1];
      next = last ? last.vcn + last.length : next;
      if (runs.length > MAX_RUNS) throw new FormatError(`${this.volumeName}: ${what}: more than ${MAX_RUNS} fragments`, 'runlist', runs.length);
    }
    this.checkRuns(runs, what);
    return { type, name, flags: first.flags, nonResident: true, allocatedSize: first.allocatedSize, dataSize: first.dataSize, initializedSize: first.initializedSize, compressionUnit: first.compressionUnit, runs };
  }

  // ---- volume state -----------------------------------------------------------------

  private loadVolumeInfo(): void {
    const rec = this.readRecord(REC_VOLUME);
    const name = this.getAttr(rec, AT_VOLUME_NAME, '', '$Volume');
    if (name && !name.nonResident && name.value && name.value.length) this.label = utf16leDecode(name.value);
    const info = this.getAttr(rec, AT_VOLUME_INFORMATION, '', '$Volume');
    if (info && !info.nonResident && info.value && info.value.length >= 12) {
      this.volumeFlags = viewOf(info.value).getUint16(0x0a, true);
    }
  }

  writeBlocker(): string | null {
    const name = this.label ? `NTFS volume "${this.label}" (${this.volumeName})` : `NTFS volume ${this.volumeName}`;
    const hib = this.hibernationSignature();
    if (hib) {
      return `${name} belongs to a Windows that is hibernated or was shut down with Fast Startup on (hiberfil.sys starts with "${hib}"): ` +
        `writing to it now would corrupt it when Windows resumes. Start Windows and shut it down fully ` +
        `(hold Shift while clicking Shut down), or turn hibernation and Fast Startup off for good with "powercfg /h off" in an administrator prompt.`;
    }
    if ((this.volumeFlags & VOLUME_IS_DIRTY) && !this.dirtyByLinuxDriver()) {
      return `${name} is marked dirty: Windows did not close it cleanly, or it is hibernated (Fast Startup), or it needs chkdsk. ` +
        `Start Windows and shut it down fully (hold Shift while clicking Shut down; "powercfg /h off" turns Fast Startup off), ` +
        `or run "chkdsk /f" on it, then try again.`;
    }
    return null;
  }

  /**
   * The dirty flag with an empty $LogFile (every byte 0xFF) and no hibernation: the state
   * ntfs3 and ntfs-3g leave when the power goes while they have the volume mounted
   * read-write (vdboot's expansion, hole filling and loop path use them). They keep no NTFS
   * journal and empty it when they mount; Windows always leaves its restart area ("RSTR")
   * there, so a volume Windows marked for chkdsk, or did not close, is not taken for this.
   */
  private dirtyByLinuxDriver(): boolean {
    if (!(this.volumeFlags & VOLUME_IS_DIRTY) || this.hibernationSignature()) return false;
    return this.logFileState() === 'empty';
  }

  /** The first page of $LogFile: 'empty' (all 0xFF), 'restart' (Windows' restart area), or 'other'. */
  logFileState(): 'empty' | 'restart' | 'other' {
    let f: HostFile;
    try {
      f = this.lookup('/$LogFile');
    } catch {
      return 'other';
    }
    if (f.size < 4096) return 'other';
    const page = this.readFile(f, 0, 4096);
    if (page.every((b) => b === 0xff)) return 'empty';
    return String.fromCharCode(page[0]!, page[1]!, page[2]!, page[3]!) === 'RSTR' ? 'restart' : 'other';
  }

  driverWriteBlocker(): string | null {
    if (!this.dirtyByLinuxDriver()) return null;
    const name = this.label ? `NTFS volume "${this.label}" (${this.volumeName})` : `NTFS volume ${this.volumeName}`;
    return `${name} is marked dirty by a Linux NTFS driver that did not unmount it (a power cut while vdboot or another Linux system wrote to it): ` +
      `its journal is empty, so writing inside the image's own clusters is safe, but writing through a driver again is not until it is checked. ` +
      `Run "chkdsk /f" on it from Windows (or "ntfsfix -d" on Linux), then try again.`;
  }

  writeWarning(): string | null {
    if (!this.dirtyByLinuxDriver()) return null;
    const name = this.label ? `NTFS volume "${this.label}" (${this.volumeName})` : `NTFS volume ${this.volumeName}`;
    return `${name} is marked dirty by a Linux NTFS driver that did not unmount it (a power cut while it was written); ` +
      `its journal is empty and the image's clusters are proven its own, so this boot writes only inside the image (the direct path). Run "chkdsk /f" on it from Windows when you can.`;
  }

  private hibernationSignature(): string | null {
    let f: HostFile;
    try {
      f = this.lookup('/hiberfil.sys');
    } catch {
      return null;
    }
    if (f.size < 4) return null;
    const head = this.readFile(f, 0, 4);
    const sig = String.fromCharCode(head[0]!, head[1]!, head[2]!, head[3]!);
    return sig === 'hibr' || sig === 'HIBR' || sig === 'wake' || sig === 'WAKE' ? sig : null;
  }

  // ---- names ------------------------------------------------------------------------

  private upcase(): Uint16Array {
    if (this.upcaseTable) return this.upcaseTable;
    const rec = this.readRecord(REC_UPCASE);
    const data = this.getAttr(rec, AT_DATA, '', '$UpCase');
    const table = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) table[i] = i;
    if (data && data.dataSize >= 2) {
      const bytes = this.readAttrValue(data, '$UpCase', 131072 * 2);
      const n = Math.min(65536, Math.floor(bytes.length / 2));
      for (let i = 0; i < n; i++) table[i] = bytes[2 * i]! | (bytes[2 * i + 1]! << 8);
    }
    this.upcaseTable = table;
    return table;
  }

  /** NTFS file name collation: code units compared after the $UpCase table. */
  private compareNames(a: string, b: string): number {
    const up = this.upcase();
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i++) {
      const x = up[a.charCodeAt(i)]!;
      const y = up[b.charCodeAt(i)]!;
      if (x !== y) return x < y ? -1 : 1;
    }
    return a.length - b.length;
  }

  // ---- directories ------------------------------------------------------------------

  private parseIndexEntries(b: Uint8Array, hdrOfs: number, what: string, onEntry: (e: IndexEntry | null, childVcn: number | null) => boolean): void {
    const v = viewOf(b);
    if (hdrOfs + 16 > b.length) throw new FormatError(`${what}: index header is cut short`, 'index_header', hdrOfs);
    const first = hdrOfs + v.getUint32(hdrOfs, true);
    const total = hdrOfs + v.getUint32(hdrOfs + 4, true);
    if (first < hdrOfs + 16 || total > b.length || first > total) {
      throw new FormatError(`${what}: index entries (${first}..${total}) do not fit the ${b.length}-byte index: the directory is damaged; run chkdsk on Windows`, 'index_header', total);
    }
    let pos = first;
    for (let count = 0; ; count++) {
      if (pos + 16 > total) throw new FormatError(`${what}: index entries end without a last entry: the directory is damaged; run chkdsk on Windows`, 'index_entry', pos);
      const len = v.getUint16(pos + 8, true);
      const keyLen = v.getUint16(pos + 10, true);
      const flags = v.getUint16(pos + 12, true);
      if (len < 16 || len % 8 !== 0 || pos + len > total || 16 + keyLen > len) {
        throw new FormatError(`${what}: index entry at ${pos} has length ${len}: the directory is damaged; run chkdsk on Windows`, 'index_entry_length', len);
      }
      let childVcn: number | null = null;
      if (flags & 1) {
        if (len < 24) throw new FormatError(`${what}: index entry at ${pos} is too short for its child pointer`, 'index_entry_length', len);
        childVcn = u64(v, pos + len - 8, 'index child VCN');
      }
      const isLast = (flags & 2) !== 0;
      let entry: IndexEntry | null = null;
      if (!isLast) {
        if (keyLen < 0x42) throw new FormatError(`${what}: index entry at ${pos} has a ${keyLen}-byte key, too short for a file name`, 'key_length', keyLen);
        const k = pos + 16;
        const nameLen = b[k + 0x40]!;
        if (0x42 + nameLen * 2 > keyLen) throw new FormatError(`${what}: index entry at ${pos}: file name of ${nameLen} characters overruns its key`, 'name_length', nameLen);
        const ref = v.getBigUint64(pos, true);
        entry = {
          ref: Number(ref & 0xffffffffffffn),
          seq: Number(ref >> 48n),
          name: utf16leDecode(b.subarray(k + 0x42, k + 0x42 + nameLen * 2)),
          namespace: b[k + 0x41]!,
          isDir: (v.getUint32(k + 0x38, true) & 0x10000000) !== 0,
          size: Number(v.getBigUint64(k + 0x30, true) & 0x1fffffffffffffn),
        };
      }
      if (!onEntry(entry, childVcn) || isLast) return;
      pos += len;
      if (count > 100_000) throw new FormatError(`${what}: too many index entries in one node`, 'index_entry', count);
    }
  }

  private dirIndex(rec: MftRecord, what: string): { root: Uint8Array; alloc: FullAttr | null; blockSize: number } {
    const rootAttr = this.getAttr(rec, AT_INDEX_ROOT, '$I30', what);
    if (!rootAttr || rootAttr.nonResident || !rootAttr.value) {
      throw new FormatError(`${this.volumeName}: ${what} is a directory without an $I30 index root: the volume is damaged; run chkdsk on Windows`, '$INDEX_ROOT', rec.no);
    }
    const root = rootAttr.value;
    if (root.length < 0x20) throw new FormatError(`${this.volumeName}: ${what}: $INDEX_ROOT is only ${root.length} bytes`, '$INDEX_ROOT', root.length);
    const blockSize = viewOf(root).getUint32(8, true);
    if (!isPow2(blockSize) || blockSize < 512 || blockSize > 256 * 1024) {
      throw new FormatError(`${this.volumeName}: ${what}: index block size ${blockSize} is invalid`, 'index_block_size', blockSize);
    }
    const alloc = this.getAttr(rec, AT_INDEX_ALLOCATION, '$I30', what);
    return { root, alloc, blockSize };
  }

  private readIndexBlock(alloc: FullAttr, vcn: number, blockSize: number, what: string): Uint8Array {
    const vcnSize = blockSize >= this.clusterSize ? this.clusterSize : 512;
    const offset = vcn * vcnSize;
    if (offset + blockSize > alloc.dataSize) {
      throw new FormatError(`${this.volumeName}: ${what}: index block at VCN ${vcn} lies past the end of the index (${alloc.dataSize} bytes): the directory is damaged; run chkdsk on Windows`, 'index_vcn', vcn);
    }
    const b = this.readRuns(alloc.runs, offset, blockSize, alloc.initializedSize, `${what} $INDEX_ALLOCATION`);
    const sig = String.fromCharCode(b[0]!, b[1]!, b[2]!, b[3]!);
    if (sig !== 'INDX') throw new FormatError(`${this.volumeName}: ${what}: index block at VCN ${vcn} has signature "${sig}" instead of "INDX": the directory is damaged; run chkdsk on Windows`, 'signature', sig);
    applyFixups(b, `${this.volumeName}: ${what} index block at VCN ${vcn}`);
    return b;
  }

  /** Walks the $I30 B+ tree by collation; returns the entry named `name`, or null. */
  private findInDir(rec: MftRecord, name: string, what: string): IndexEntry | null {
    const { root, alloc, blockSize } = this.dirIndex(rec, what);
    let node = root;
    let hdr = 0x10;
    const seen = new Set<number>();
    for (let depth = 0; depth < 64; depth++) {
      let found: IndexEntry | null = null;
      let child: number | null = null;
      this.parseIndexEntries(node, hdr, `${this.volumeName}: ${what} index`, (e, childVcn) => {
        if (e === null) { child = childVcn; return false; }
        const c = this.compareNames(name, e.name);
        if (c === 0) { found = e; return false; }
        if (c < 0) { child = childVcn; return false; }
        return true;
      });
      if (found) return found;
      if (child === null) return null;
      if (!alloc) throw new FormatError(`${this.volumeName}: ${what}: the index points to a child block but has no $INDEX_ALLOCATION: the directory is damaged`, '$INDEX_ALLOCATION', rec.no);
      if (seen.has(child)) throw new FormatError(`${this.volumeName}: ${what}: the index tree loops (block ${child} visited twice): the directory is damaged; run chkdsk on Windows`, 'index_vcn', child);
      seen.add(child);
      node = this.readIndexBlock(alloc, child, blockSize, what);
      hdr = 0x18;
    }
    throw new FormatError(`${this.volumeName}: ${what}: the index tree is deeper than 64 levels: the directory is damaged`, 'index_depth', 64);
  }

  /** Every entry of a directory (DOS 8.3 duplicates left out). */
  private listDir(rec: MftRecord, what: string): IndexEntry[] {
    const { root, alloc, blockSize } = this.dirIndex(rec, what);
    const out: IndexEntry[] = [];
    const seen = new Set<number>();
    const visit = (node: Uint8Array, hdr: number, depth: number): void => {
      if (depth > 64) throw new FormatError(`${this.volumeName}: ${what}: the index tree is deeper than 64 levels: the directory is damaged`, 'index_depth', depth);
      const children: number[] = [];
      const entries: (IndexEntry | null)[] = [];
      this.parseIndexEntries(node, hdr, `${this.volumeName}: ${what} index`, (e, childVcn) => {
        entries.push(e);
        children.push(childVcn ?? -1);
        return true;
      });
      for (let i = 0; i < entries.length; i++) {
        const c = children[i]!;
        if (c >= 0) {
          if (!alloc) throw new FormatError(`${this.volumeName}: ${what}: the index points to a child block but has no $INDEX_ALLOCATION`, '$INDEX_ALLOCATION', rec.no);
          if (seen.has(c)) throw new FormatError(`${this.volumeName}: ${what}: the index tree loops (block ${c} visited twice): the directory is damaged; run chkdsk on Windows`, 'index_vcn', c);
          seen.add(c);
          visit(this.readIndexBlock(alloc, c, blockSize, what), 0x18, depth + 1);
        }
        const e = entries[i];
        if (e && e.namespace !== FILE_NAME_DOS && e.ref !== rec.no) out.push(e);
      }
    };
    visit(root, 0x10, 0);
    return out;
  }

  private readEntryRecord(e: IndexEntry, path: string): MftRecord {
    const rec = this.readRecord(e.ref);
    if (!(rec.flags & MFT_RECORD_IN_USE) || (e.seq !== 0 && rec.seq !== e.seq)) {
      throw new FormatError(`${this.volumeName}: ${path}: the directory entry points to MFT record ${e.ref} (sequence ${e.seq}), which now holds ${rec.flags & MFT_RECORD_IN_USE ? `sequence ${rec.seq}` : 'no file'}: the directory is stale; run chkdsk on Windows`, 'mft_reference', e.ref);
    }
    return rec;
  }

  /** Resolves a path to its MFT record and its on-disk spelling. */
  private resolve(path: string): { rec: MftRecord; parts: string[] } {
    const wanted = splitHostPath(path);
    let rec = this.readRecord(REC_ROOT);
    const found: string[] = [];
    for (const part of wanted) {
      const here = joinHostPath(found);
      if (!(rec.flags & MFT_RECORD_IS_DIRECTORY)) {
        throw new FormatError(`${this.volumeName}: ${path} not found: ${here} is a file, not a directory`, 'path', path);
      }
      let e = this.findInDir(rec, part, here);
      let all: IndexEntry[] = [];
      if (!e) {
        // The B+ tree walk trusts the index's order. An index sorted by another up-case
        // table than this volume's (an older Windows, another driver) could hide a name
        // from it, so a miss is confirmed by reading every entry.
        try { all = this.listDir(rec, here); } catch { /* the error names the path anyway */ }
        e = all.find((x) => this.compareNames(part, x.name) === 0) ?? null;
      }
      if (!e) {
        throw notFoundError(`${this.volumeName} (NTFS${this.label ? ` "${this.label}"` : ''})`, path, here, part, all.map((x) => x.name));
      }
      rec = this.readEntryRecord(e, joinHostPath([...found, e.name]));
      // the name as the directory spells it; a DOS 8.3 match keeps the long name out of reach, so keep what was typed
      found.push(e.namespace === FILE_NAME_DOS ? part : e.name);
      if (rec.flags & MFT_RECORD_IS_DIRECTORY || found.length < wanted.length) {
        // a junction or directory symlink: its own index is empty, its target elsewhere
        const rp = this.reparsePoint(rec, joinHostPath(found));
        if (rp) {
          const kind = rp.tag === IO_REPARSE_TAG_MOUNT_POINT ? 'a junction' : rp.tag === IO_REPARSE_TAG_SYMLINK ? 'a symbolic link' : `a reparse point (tag 0x${rp.tag.toString(16)})`;
          throw new FormatError(`${this.volumeName}: ${joinHostPath(found)} is ${kind}${rp.target ? ` to "${rp.target}"` : ''}: vdboot does not follow links; give the path where the file really is`, 'path', path);
        }
      }
    }
    return { rec, parts: found };
  }

  /** The record's reparse tag and, for junctions and symbolic links, the target as Windows prints it. */
  private reparsePoint(rec: MftRecord, what: string): { tag: number; target?: string } | null {
    const a = this.getAttr(rec, AT_REPARSE_POINT, '', what);
    if (!a) return null;
    const b = this.readAttrValue(a, `${what} $REPARSE_POINT`, 65536);
    if (b.length < 8) return { tag: 0 };
    const v = viewOf(b);
    const tag = v.getUint32(0, true);
    let target: string | undefined;
    if (tag === IO_REPARSE_TAG_MOUNT_POINT || tag === IO_REPARSE_TAG_SYMLINK) {
      const base = tag === IO_REPARSE_TAG_SYMLINK ? 20 : 16;
      if (b.length >= base) {
        const name = (ofs: number, len: number): string | undefined =>
          base + ofs + len <= b.length && len > 0 ? utf16leDecode(b.subarray(base + ofs, base + ofs + len)) : undefined;
        target = name(v.getUint16(12, true), v.getUint16(14, true)) ?? name(v.getUint16(8, true), v.getUint16(10, true))?.replace(/^\\\?\?\\/, '');
      }
    }
    return { tag, target };
  }

  /** Why a file with this reparse tag cannot be mapped, and what to do, for the user. */
  private reparseRefusal(p: string, tag: number, target?: string): string {
    const win = `"${p.replace(/\//g, '\\')}"`;
    if (tag === IO_REPARSE_TAG_WOF) {
      return `${p} is compressed by Windows (compact /EXE or CompactOS): its clusters hold compressed data, not the file. On Windows run: compact /u /exe ${win}`;
    }
    if (tag === IO_REPARSE_TAG_DEDUP) {
      return `${p} is deduplicated (Windows Server Data Deduplication): its data lives in the volume's chunk store. Exclude its folder from deduplication and run Expand-DedupFile on it`;
    }
    if (((tag & 0xffff0fff) >>> 0) === 0x9000001a) {
      return `${p} is a OneDrive (cloud files) placeholder: its data may not be on this disk and OneDrive may rewrite it. Right-click it and choose "Always keep on this device", or better, move the image out of the OneDrive folder`;
    }
    if (tag === IO_REPARSE_TAG_SYMLINK || tag === IO_REPARSE_TAG_MOUNT_POINT) {
      return `${p} is a symbolic link${target ? ` to "${target}"` : ''}: vdboot does not follow links; give the path where the file really is`;
    }
    return `${p} is a reparse point (tag 0x${tag.toString(16)}), which vdboot cannot map: copy the image to a plain file`;
  }

  // ---- HostFs -----------------------------------------------------------------------

  lookup(path: string): HostFile {
    const { rec, parts } = this.resolve(path);
    const p = joinHostPath(parts);
    if (rec.flags & MFT_RECORD_IS_DIRECTORY) throw new FormatError(`${this.volumeName}: ${p} is a directory, not a file`, 'path', path);
    const si = rec.attrs.find((a) => a.type === AT_STANDARD_INFORMATION && !a.nonResident);
    const fileAttrs = si?.value && si.value.length >= 0x24 ? viewOf(si.value).getUint32(0x20, true) : 0;
    // Windows keeps some files' data outside their clusters (WOF compression,
    // deduplication, cloud placeholders): mapping their clusters would boot zeros
    const rp = this.reparsePoint(rec, p);
    if (rp) throw new FormatError(`${this.volumeName}: ${this.reparseRefusal(p, rp.tag, rp.target)}`, '$REPARSE_POINT', rp.tag);
    const data = this.getAttr(rec, AT_DATA, '', p);
    if (!data) throw new FormatError(`${this.volumeName}: ${p} has no data stream (it is a system index, not a file)`, '$DATA', rec.no);
    if ((data.flags & ATTR_ENCRYPTED) || (fileAttrs & FILE_ATTR_ENCRYPTED)) {
      throw new FormatError(`${this.volumeName}: ${p} is encrypted (EFS), so its clusters cannot be read or mapped. On Windows, open its Properties → Advanced and clear "Encrypt contents", or run: cipher /d "${p.replace(/\//g, '\\')}"`, '$DATA', 'encrypted');
    }
    if ((data.flags & ATTR_COMPRESSED) || ((fileAttrs & FILE_ATTR_COMPRESSED) && data.nonResident)) {
      throw new FormatError(`${this.volumeName}: ${p} is NTFS-compressed (perhaps because its folder has compression turned on), so its clusters cannot be mapped. On Windows run: compact /u "${p.replace(/\//g, '\\')}" (and "compact /u /s" on the folder to stop compressing new files)`, '$DATA', 'compressed');
    }
    if (!data.nonResident) {
      return { path: p, id: `ntfs:${rec.no}`, size: data.dataSize, extents: [], resident: new Uint8Array(data.value!) };
    }
    const extents = this.extentsOf(data, p);
    this.checkOwnClusters(data.runs.filter((r) => r.vcn * this.clusterSize < data.dataSize), p);
    // A sparse file's holes are allocated a compression unit at a time (2^unit clusters; 0: not sparse).
    const unit = data.compressionUnit > 0 ? this.clusterSize * 2 ** Math.min(data.compressionUnit, 31) : this.clusterSize;
    return { path: p, id: `ntfs:${rec.no}`, size: data.dataSize, extents, allocationUnit: unit };
  }

  /** $Bitmap's $DATA (MFT record 6), read on first use. */
  private bitmapData: FullAttr | null = null;

  /**
   * A file's clusters must be its own before they are mapped: no two of its runs may
   * share a cluster, and $Bitmap must mark every one of them in use. A damaged runlist
   * that points into free space or repeats clusters would otherwise map (and in rw mode
   * write) bytes that belong to nothing, or to another file. Reads only the bits of
   * $Bitmap that cover the file.
   */
  private checkOwnClusters(runs: NtfsRun[], p: string): void {
    const used: [number, number][] = [];
    for (const r of runs) if (r.lcn !== null && r.length > 0) used.push([r.lcn, r.length]);
    if (!used.length) return;
    used.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < used.length; i++) {
      const [prev, prevLen] = used[i - 1]!;
      const [lcn] = used[i]!;
      if (lcn < prev + prevLen) {
        throw new FormatError(`${this.volumeName}: ${p}: two parts of its runlist claim the same clusters (${lcn}..${Math.min(prev + prevLen, lcn + used[i]![1]) - 1}): the volume is damaged; run chkdsk /f on Windows before booting from this file`, 'lcn', lcn);
      }
    }
    if (!this.bitmapData) {
      const rec = this.readRecord(REC_BITMAP);
      const a = this.getAttr(rec, AT_DATA, '', '$Bitmap');
      if (!a) throw new FormatError(`${this.volumeName}: $Bitmap has no data: the volume is damaged; run chkdsk on Windows`, '$Bitmap', REC_BITMAP);
      this.bitmapData = a;
    }
    const bm = this.bitmapData;
    const chunkBits = 8 * 1024 * 1024; // one MiB of $Bitmap at a time
    for (const [lcn, length] of used) {
      for (let at = lcn; at < lcn + length; at += chunkBits) {
        const n = Math.min(chunkBits, lcn + length - at);
        const firstByte = Math.floor(at / 8);
        const lastByte = Math.floor((at + n - 1) / 8);
        if (lastByte >= bm.dataSize) {
          throw new FormatError(`${this.volumeName}: ${p}: its clusters ${at}..${at + n - 1} lie past the end of $Bitmap (${bm.dataSize * 8} clusters): the volume is damaged; run chkdsk on Windows`, 'lcn', at);
        }
        const bytes = bm.nonResident
          ? this.readRuns(bm.runs, firstByte, lastByte - firstByte + 1, bm.initializedSize, '$Bitmap')
          : bm.value!.subarray(firstByte, lastByte + 1);
        const free = firstClearBit(bytes, at - firstByte * 8, n);
        if (free >= 0) {
          const c = firstByte * 8 + free;
          throw new FormatError(
            `${this.volumeName}: ${p}: its cluster ${c} is marked free in $Bitmap, so the runlist does not match the volume's allocation: the volume is damaged ` +
              `(or was not shut down cleanly). Run chkdsk /f on Windows before booting from this file.`,
            'lcn', c,
          );
        }
      }
    }
  }

  private extentsOf(a: FullAttr, p: string): FileExtent[] {
    const cs = this.clusterSize;
    const out: FileExtent[] = [];
    const size = a.dataSize;
    const init = a.initializedSize;
    let covered = 0;
    for (const r of a.runs) {
      const start = r.vcn * cs;
      if (start >= size) break;
      const end = Math.min(size, (r.vcn + r.length) * cs);
      if (start !== covered) throw new FormatError(`${this.volumeName}: ${p}: runlist skips bytes ${covered}..${start}: the volume is damaged`, 'runlist', start);
      if (r.lcn === null) {
        pushExtent(out, { kind: 'hole', fileOffset: start, length: end - start });
      } else {
        const dev = r.lcn * cs;
        const initEnd = Math.max(start, Math.min(end, init));
        pushExtent(out, { kind: 'data', fileOffset: start, length: initEnd - start, deviceOffset: dev });
        pushExtent(out, { kind: 'uninitialized', fileOffset: initEnd, length: end - initEnd, deviceOffset: dev + (initEnd - start) });
      }
      covered = end;
    }
    if (covered < size) {
      throw new FormatError(`${this.volumeName}: ${p}: runlist covers ${covered} of the file's ${size} bytes: the volume is damaged; run chkdsk on Windows`, 'runlist', covered);
    }
    for (const e of out) {
      if (e.kind !== 'hole' && e.deviceOffset !== undefined && e.deviceOffset + e.length > this.partition.size) {
        throw new FormatError(`${this.volumeName}: ${p}: its clusters at byte ${e.deviceOffset} lie past the end of the partition (${this.partition.size} bytes): the partition is truncated or the runlist damaged`, 'lcn', e.deviceOffset);
      }
    }
    return out;
  }

  readdir(path: string): HostDirEntry[] {
    const { rec, parts } = this.resolve(path);
    const p = joinHostPath(parts);
    if (!(rec.flags & MFT_RECORD_IS_DIRECTORY)) throw new FormatError(`${this.volumeName}: ${p} is a file, not a directory`, 'path', path);
    // sizes come from the index entries, which Windows may update lazily
    return this.listDir(rec, p).map((e) => ({ name: e.name, isDir: e.isDir, size: e.isDir ? 0 : e.size }));
  }

  readFile(file: HostFile, offset: number, length: number): Uint8Array {
    return readThroughExtents(this.partition, file, offset, length);
  }

  /**
   * Cross-links: every cluster of `files` must be claimed by that file's unnamed $DATA
   * and by nothing else on the volume: not another file, not a system file (records 0–15,
   * $MFT's own runs among them), not another attribute of the same file, not another file
   * of the list. One pass over the whole $MFT, 1 MiB at a time (ntfs-owners.ts); at most
   * MAX_OWNERSHIP_RECORDS records. A record that is in use but damaged leaves ownership
   * unproven and is refused too. Files without clusters (resident) need nothing.
   */
  proveOwnership(files: readonly HostFile[]): void {
    const cs = this.clusterSize;
    const ranges: ClusterRange[] = [];
    const names = new Map<number, string>();
    for (const f of files) {
      const m = /^ntfs:(\d+)$/.exec(f.id ?? '');
      if (!m) throw new Error(`proveOwnership: ${f.path} was not found on this NTFS volume`);
      const record = Number(m[1]);
      names.set(record, f.path);
      for (const e of f.extents) {
        if (e.kind === 'hole' || e.deviceOffset === undefined || e.length <= 0) continue;
        const first = Math.floor(e.deviceOffset / cs);
        ranges.push({ lcn: first, length: Math.ceil((e.deviceOffset + e.length) / cs) - first, record });
      }
    }
    if (!ranges.length) return; // resident files have no clusters to prove
    const targets = makeClusterTargets(ranges);
    if ('kind' in targets) throw this.conflictError(targets, names);
    const size = this.boot.mftRecordSize;
    const records = Math.floor(this.mftSize / size);
    if (records > MAX_OWNERSHIP_RECORDS) {
      throw new FormatError(
        `${this.volumeName}: its $MFT holds ${records} records, more than the ${MAX_OWNERSHIP_RECORDS} vdboot reads to prove that ${files.map((f) => f.path).join(', ')} share no cluster with another file. ` +
          `Put the image on a partition with fewer files (a data partition of its own).`,
        '$MFT', records,
      );
    }
    // 4 MiB reads, the next one asked of the disk before this one is scanned: the read and
    // the scan overlap where the device reader can hint (fadvise at boot)
    const perChunk = Math.max(1, Math.floor(OWNERSHIP_CHUNK / size));
    for (let first = 0; first < records; first += perChunk) {
      const n = Math.min(perChunk, records - first);
      if (first + n < records) this.prefetchRuns(this.mftRuns, (first + n) * size, Math.min(perChunk, records - first - n) * size);
      const chunk = this.readRuns(this.mftRuns, first * size, n * size, this.mftSize, '$MFT');
      const hit = scanMftChunk(chunk, first, size, targets);
      if (hit) throw this.conflictError(hit, names);
    }
  }

  private conflictError(c: ClusterConflict, names: Map<number, string>): FormatError {
    const list = [...names.values()].join(', ');
    if (c.kind === 'damaged') {
      return new FormatError(
        `${this.volumeName}: MFT record ${c.record} ${c.why}, so vdboot cannot prove that the clusters of ${list} belong to no other file. ` +
          `The volume is damaged: run chkdsk /f on Windows before booting from it.`,
        'mft_record', c.record,
      );
    }
    const target = names.get(c.target) ?? `MFT record ${c.target}`;
    const owner = c.owner === c.target
      ? `another attribute (type 0x${c.attrType.toString(16)}) of the same file`
      : `${names.get(c.owner) ?? this.recordPath(c.owner)} (MFT record ${c.owner})`;
    return new FormatError(
      `${this.volumeName}: ${target}: its cluster ${c.lcn} also belongs to ${owner}: two files claim the same clusters (a cross-link), and mapping this one would read and write the other's bytes. ` +
        `The volume is damaged (or the runlist was edited): run chkdsk /f on Windows before booting from this file.`,
      'lcn', c.lcn,
    );
  }

  /** The path of an MFT record from its $FILE_NAME attributes, for messages ("/Windows/x.dll", "$MFT"); best effort. */
  private recordPath(no: number): string {
    const parts: string[] = [];
    let cur = no;
    try {
      for (let depth = 0; depth < 64 && cur !== REC_ROOT; depth++) {
        const rec = this.readRecord(cur);
        const names = rec.attrs.filter((a) => a.type === AT_FILE_NAME && !a.nonResident && a.value && a.value.length >= 0x42);
        const fn = names.find((a) => a.value![0x41] !== FILE_NAME_DOS) ?? names[0];
        if (!fn) break;
        const v = viewOf(fn.value!);
        const len = fn.value![0x40]!;
        parts.unshift(utf16leDecode(fn.value!.subarray(0x42, Math.min(fn.value!.length, 0x42 + len * 2))));
        cur = Number(v.getBigUint64(0, true) & 0xffffffffffffn);
      }
    } catch {
      // a damaged record: the name so far
    }
    return parts.length ? (no < 16 ? parts.join('/') : `/${parts.join('/')}`) : `MFT record ${no}`;
  }
}

/** The first bit in [from, from+count) of `bits` (LSB-first, as $Bitmap stores them) that is 0, or -1. */
export function firstClearBit(bits: Uint8Array, from: number, count: number): number {
  let i = from;
  const end = from + count;
  while (i < end && (i & 7) !== 0) {
    if (!(bits[i >> 3]! & (1 << (i & 7)))) return i;
    i++;
  }
  while (i + 8 <= end) {
    const b = bits[i >> 3]!;
    if (b !== 0xff) {
      for (let k = 0; k < 8; k++) if (!(b & (1 << k))) return i + k;
    }
    i += 8;
  }
  for (; i < end; i++) if (!(bits[i >> 3]! & (1 << (i & 7)))) return i;
  return -1;
}

function findRun(runs: NtfsRun[], vcn: number): number {
  let lo = 0;
  let hi = runs.length - 1;
  if (hi < 0) return 0;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (runs[mid]!.vcn <= vcn) lo = mid; else hi = mid - 1;
  }
  return lo;
}

export function openNtfs(partition: BlockReader): NtfsVolume {
  return new NtfsVolume(partition);
}
