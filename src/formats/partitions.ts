/**
 * Partition tables: MBR (with extended/logical chains) and GPT (header and entry-array
 * CRCs, the backup header when the primary is damaged), at 512 and 4096-byte logical
 * sectors; and writers that produce the table bytes for a disk vdboot assembles itself.
 *
 * Partitions are numbered as Linux numbers them (sda1…): GPT by entry slot, MBR primaries
 * by slot 1–4, logical partitions from 5 in chain order. PARTUUIDs are what Linux and blkid
 * report: the GPT unique GUID in lowercase, or for MBR `SSSSSSSS-NN` (disk signature and
 * partition number, both hexadecimal).
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import { crc32 } from './crc.ts';
import { guidFromBytes, guidToBytes, NIL_GUID } from './guid.ts';
import { utf16leDecode, utf16leEncode } from './text.ts';

export type SectorSize = 512 | 4096;

export interface Partition {
  /** 1-based, as Linux numbers it (MBR logical partitions from 5) */
  number: number;
  /** byte offset on the disk */
  start: number;
  /** bytes */
  size: number;
  /** GPT: the type GUID in lowercase; MBR: the type byte in hexadecimal without leading zeros ('83', 'ef', '5') */
  type: string;
  /** GPT partition name (PARTLABEL) */
  name?: string;
  /** GPT: the unique partition GUID in lowercase; MBR: `SSSSSSSS-NN` */
  partuuid: string;
  /** MBR: boot indicator 0x80; GPT: the LegacyBIOSBootable attribute */
  bootable?: boolean;
  /** GPT attributes as sfdisk names them: RequiredPartition, NoBlockIOProtocol, LegacyBIOSBootable, GUID:N… */
  attributes?: string[];
  /** GPT attributes as a 16-digit hexadecimal number */
  attributeBits?: string;
  /** MBR: this is the extended partition that holds the logical ones (no filesystem of its own) */
  extended?: boolean;
}

export interface PartitionTable {
  kind: 'gpt' | 'mbr' | 'none';
  sectorSize: SectorSize;
  /** GPT disk GUID, lowercase */
  diskGuid?: string;
  /** MBR disk signature as 8 lowercase hexadecimal digits (the PTUUID blkid reports) */
  diskSignature?: string;
  /** GPT: the usable area, in bytes (first usable byte, one past the last usable byte) */
  firstUsable?: number;
  lastUsableEnd?: number;
  partitions: Partition[];
  /** Problems found and worked around (a damaged primary GPT, partitions past the end, …) */
  warnings: string[];
}

const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const GPT_SIGNATURE = 'EFI PART';
/** The largest GPT entry array vdboot reads: 128 entries of 128 bytes is the norm. */
const MAX_GPT_ENTRY_BYTES = 1 << 20;
/** More logical partitions than Linux supports means a looping or corrupt chain. */
const MAX_LOGICAL = 256;

function u16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function u32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function u64(b: Uint8Array, o: number): bigint {
  return BigInt(u32(b, o)) | (BigInt(u32(b, o + 4)) << 32n);
}
function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}
function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}
function ascii(b: Uint8Array, o: number, n: number): string {
  let s = '';
  for (let i = 0; i < n; i++) s += String.fromCharCode(b[o + i]!);
  return s;
}

/** A BlockReader for the bytes [start, start+size) of another reader: one partition. */
export function sliceReader(reader: BlockReader, start: number, size: number, name: string): BlockReader {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(size) || start < 0 || size < 0 || start + size > reader.size) {
    throw new FormatError(
      `${name}: the range of ${size} bytes at offset ${start} is not inside ${reader.name} (${reader.size} bytes): the partition table points past the end of the disk`,
      'partition', start,
    );
  }
  return {
    name,
    size,
    read(offset: number, length: number): Uint8Array {
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
        throw new FormatError(`${name}: read of ${length} bytes at offset ${offset} is past the end (${size} bytes)`, 'offset', offset);
      }
      return reader.read(start + offset, length);
    },
    prefetch(offset: number, length: number): void {
      if (offset >= 0 && length > 0 && offset < size) reader.prefetch?.(start + offset, Math.min(length, size - offset));
    },
  };
}

// ---------------------------------------------------------------------------------------
// Reading

interface MbrEntry {
  slot: number;
  bootIndicator: number;
  type: number;
  lbaStart: number;
  lbaCount: number;
}

function parseMbrEntries(sector: Uint8Array): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = 446 + 16 * i;
    out.push({ slot: i, bootIndicator: sector[o]!, type: sector[o + 4]!, lbaStart: u32(sector, o + 8), lbaCount: u32(sector, o + 12) });
  }
  return out;
}

function hasBootSignature(sector: Uint8Array): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

/**
 * A filesystem boot sector (FAT, NTFS, exFAT) also ends in 55 AA. Like libblkid, treat
 * the sector as a filesystem and not a partition table when it looks like one.
 */
function looksLikeFilesystemBootSector(s: Uint8Array): boolean {
  const oem = ascii(s, 3, 8);
  if (oem === 'NTFS    ' || oem === 'EXFAT   ') return true;
  const jump = s[0] === 0xeb || s[0] === 0xe9;
  if (!jump) return false;
  const bytesPerSector = u16(s, 11);
  const sectorsPerCluster = s[13]!;
  const validBps = bytesPerSector >= 512 && bytesPerSector <= 4096 && (bytesPerSector & (bytesPerSector - 1)) === 0;
  const validSpc = sectorsPerCluster > 0 && (sectorsPerCluster & (sectorsPerCluster - 1)) === 0;
  const fatName = ascii(s, 54, 3) === 'FAT' || ascii(s, 82, 3) === 'FAT';
  const media = s[21]!;
  return validBps && validSpc && (fatName || (media >= 0xf8 || media === 0xf0)) && s[16]! > 0 && u16(s, 14) > 0;
}

interface GptHeader {
  lba: bigint;
  alternateLba: bigint;
  firstUsable: bigint;
  lastUsable: bigint;
  diskGuid: string;
  entriesLba: bigint;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

type Attempt<T> = { ok: true; value: T } | { ok: false; why: string };

function readGptHeader(reader: BlockReader, lba: bigint, ss: number): Attempt<GptHeader> {
  const off = Number(lba) * ss;
  if (lba < 1n || off + ss > reader.size) return { ok: false, why: `LBA ${lba} is outside the disk` };
  const s = reader.read(off, ss);
  if (ascii(s, 0, 8) !== GPT_SIGNATURE) return { ok: false, why: `no "EFI PART" signature at LBA ${lba}` };
  const headerSize = u32(s, 12);
  if (headerSize < 92 || headerSize > ss) return { ok: false, why: `header size ${headerSize} is not between 92 and ${ss}` };
  const h = s.slice(0, headerSize);
  const storedCrc = u32(h, 16);
  h[16] = h[17] = h[18] = h[19] = 0;
  const crc = crc32(h);
  if (crc !== storedCrc) return { ok: false, why: `header CRC32 is 0x${hex8(storedCrc)} but the header sums to 0x${hex8(crc)}` };
  const myLba = u64(s, 24);
  if (myLba !== lba) return { ok: false, why: `the header at LBA ${lba} says it is at LBA ${myLba}` };
  const sectors = BigInt(Math.floor(reader.size / ss));
  const header: GptHeader = {
    lba,
    alternateLba: u64(s, 32),
    firstUsable: u64(s, 40),
    lastUsable: u64(s, 48),
    diskGuid: guidFromBytes(s, 56),
    entriesLba: u64(s, 72),
    entryCount: u32(s, 80),
    entrySize: u32(s, 84),
    entriesCrc: u32(s, 88),
  };
  if (header.entrySize < 128 || header.entrySize % 8 !== 0 || header.entrySize > 4096) {
    return { ok: false, why: `partition entry size ${header.entrySize} is not a multiple of 8 between 128 and 4096` };
  }
  if (header.entryCount * header.entrySize > MAX_GPT_ENTRY_BYTES) {
    return { ok: false, why: `${header.entryCount} entries of ${header.entrySize} bytes exceed the ${MAX_GPT_ENTRY_BYTES}-byte limit` };
  }
  const entryBytes = BigInt(header.entryCount * header.entrySize);
  if (header.entriesLba < 1n || header.entriesLba * BigInt(ss) + entryBytes > sectors * BigInt(ss)) {
    return { ok: false, why: `the entry array at LBA ${header.entriesLba} is outside the disk (${sectors} sectors)` };
  }
  if (header.firstUsable > header.lastUsable + 1n) {
    return { ok: false, why: `first usable LBA ${header.firstUsable} is after last usable LBA ${header.lastUsable}` };
  }
  return { ok: true, value: header };
}

const ATTRIBUTE_NAMES: Record<number, string> = { 0: 'RequiredPartition', 1: 'NoBlockIOProtocol', 2: 'LegacyBIOSBootable' };

function attributeNames(bits: bigint): string[] {
  const names: string[] = [];
  for (let bit = 0; bit < 3; bit++) if ((bits >> BigInt(bit)) & 1n) names.push(ATTRIBUTE_NAMES[bit]!);
  const guidBits: number[] = [];
  for (let bit = 48; bit < 64; bit++) if ((bits >> BigInt(bit)) & 1n) guidBits.push(bit);
  if (guidBits.length) names.push(`GUID:${guidBits.join(',')}`);
  return names;
}

/** sfdisk-style attribute names ("RequiredPartition", "GUID:60,63", "GUID:60") → bits. */
export function attributeBitsFromNames(names: string[]): bigint {
  let bits = 0n;
  for (const n of names) {
    const byName = Object.entries(ATTRIBUTE_NAMES).find(([, v]) => v === n);
    if (byName) { bits |= 1n << BigInt(byName[0]); continue; }
    const m = /^GUID:([0-9,]+)$/.exec(n);
    if (m) {
      for (const b of m[1]!.split(',')) {
        const bit = Number(b);
        if (!(bit >= 48 && bit <= 63)) throw new FormatError(`GPT attribute bit ${b} is not a type-specific bit (48–63)`, 'attributes', n);
        bits |= 1n << BigInt(bit);
      }
      continue;
    }
    if (/^[0-9]+$/.test(n) && Number(n) < 64) { bits |= 1n << BigInt(n); continue; }
    throw new FormatError(`unknown GPT attribute "${n}": use RequiredPartition, NoBlockIOProtocol, LegacyBIOSBootable or GUID:N (N from 48 to 63)`, 'attributes', n);
  }
  return bits;
}

function readGptEntries(reader: BlockReader, h: GptHeader, ss: number, warnings: string[]): Attempt<Partition[]> {
  const total = h.entryCount * h.entrySize;
  const bytes = reader.read(Number(h.entriesLba) * ss, total);
  const crc = crc32(bytes);
  if (crc !== h.entriesCrc) {
    return { ok: false, why: `the entry array CRC32 is 0x${hex8(h.entriesCrc)} but the entries sum to 0x${hex8(crc)}` };
  }
  const sectors = BigInt(Math.floor(reader.size / ss));
  const parts: Partition[] = [];
  for (let i = 0; i < h.entryCount; i++) {
    const e = bytes.subarray(i * h.entrySize, i * h.entrySize + 128);
    const type = guidFromBytes(e, 0);
    if (type === NIL_GUID) continue;
    const first = u64(e, 32);
    const last = u64(e, 40);
    if (last < first) {
      warnings.push(`GPT entry ${i + 1}: last LBA ${last} is before first LBA ${first}; the partition is ignored`);
      continue;
    }
    if (last >= sectors) {
      warnings.push(`GPT partition ${i + 1} ends at LBA ${last}, past the end of the disk (${sectors} sectors): it is truncated or the disk image is too short`);
    }
    const start = first * BigInt(ss);
    const size = (last - first + 1n) * BigInt(ss);
    if (start + size > BigInt(Number.MAX_SAFE_INTEGER)) {
      warnings.push(`GPT partition ${i + 1} lies beyond 8 PiB; it is ignored`);
      continue;
    }
    const attrs = u64(e, 48);
    let nameEnd = 56;
    while (nameEnd + 1 < 128 && (e[nameEnd] !== 0 || e[nameEnd + 1] !== 0)) nameEnd += 2;
    const p: Partition = {
      number: i + 1,
      start: Number(start),
      size: Number(size),
      type,
      partuuid: guidFromBytes(e, 16),
      name: utf16leDecode(e.subarray(56, nameEnd)),
    };
    if (attrs !== 0n) {
      p.attributes = attributeNames(attrs);
      p.attributeBits = attrs.toString(16).padStart(16, '0');
    }
    if (attrs & 4n) p.bootable = true;
    if (first < h.firstUsable || last > h.lastUsable) {
      warnings.push(`GPT partition ${i + 1} (LBA ${first}–${last}) lies outside the usable area (LBA ${h.firstUsable}–${h.lastUsable}): it overlaps the partition table`);
    }
    parts.push(p);
  }
  const byStart = parts.slice().sort((a, b) => a.start - b.start);
  for (let k = 1; k < byStart.length; k++) {
    const a = byStart[k - 1]!;
    const b = byStart[k]!;
    if (b.start < a.start + a.size) warnings.push(`GPT partitions ${a.number} and ${b.number} overlap: writing one changes the other`);
  }
  return { ok: true, value: parts };
}

function tryGpt(reader: BlockReader, lba: bigint, ss: number): Attempt<{ header: GptHeader; partitions: Partition[]; warnings: string[] }> {
  const h = readGptHeader(reader, lba, ss);
  if (!h.ok) return h;
  const warnings: string[] = [];
  const e = readGptEntries(reader, h.value, ss, warnings);
  if (!e.ok) return e;
  return { ok: true, value: { header: h.value, partitions: e.value, warnings } };
}

function hasGptSignature(reader: BlockReader, offset: number): boolean {
  if (offset < 0 || offset + 8 > reader.size) return false;
  return ascii(reader.read(offset, 8), 0, 8) === GPT_SIGNATURE;
}

/** Finds the logical sector size of a GPT disk: where the primary (or backup) header is. */
function detectSectorSize(reader: BlockReader, mbr: Uint8Array | undefined): SectorSize {
  if (hasGptSignature(reader, 512)) return 512;
  if (hasGptSignature(reader, 4096)) return 4096;
  const s512 = Math.floor(reader.size / 512) * 512 - 512;
  const s4096 = Math.floor(reader.size / 4096) * 4096 - 4096;
  if (hasGptSignature(reader, s512)) return 512;
  if (hasGptSignature(reader, s4096)) return 4096;
  // The protective MBR covers the disk in its own sectors.
  if (mbr) {
    const ee = parseMbrEntries(mbr).find((e) => e.type === 0xee);
    if (ee && ee.lbaCount !== 0xffffffff && Math.abs((ee.lbaCount + 1) * 4096 - reader.size) < 4096 * 2) return 4096;
  }
  return 512;
}

function parseGpt(reader: BlockReader, ss: SectorSize, warnings: string[]): PartitionTable | undefined {
  const lastLba = BigInt(Math.floor(reader.size / ss)) - 1n;
  const primary = tryGpt(reader, 1n, ss);
  let used: { header: GptHeader; partitions: Partition[]; warnings: string[] };
  if (primary.ok) {
    used = primary.value;
    const alt = used.header.alternateLba;
    const backup = alt <= lastLba ? readGptHeader(reader, alt, ss) : { ok: false as const, why: `LBA ${alt} is past the end of the disk (last LBA ${lastLba})` };
    if (!backup.ok) {
      warnings.push(`the backup GPT header is damaged or missing (${backup.why}); the primary is intact. Repair the backup with "sfdisk --relocate gpt-bak-std" or gdisk`);
    } else if (alt !== lastLba) {
      warnings.push(`the backup GPT header is at LBA ${alt}, not at the end of the disk (LBA ${lastLba}): the disk was resized`);
    }
  } else {
    const candidates: bigint[] = [lastLba];
    const primaryHeader = readGptHeader(reader, 1n, ss);
    if (primaryHeader.ok && primaryHeader.value.alternateLba !== lastLba) candidates.unshift(primaryHeader.value.alternateLba);
    let backup: Attempt<{ header: GptHeader; partitions: Partition[]; warnings: string[] }> = { ok: false, why: 'not tried' };
    for (const lba of candidates) {
      if (lba < 2n || lba > lastLba) continue;
      backup = tryGpt(reader, lba, ss);
      if (backup.ok) break;
    }
    if (!backup.ok) {
      warnings.push(`the disk has a protective MBR but no valid GPT: primary (${primary.why}), backup (${backup.why})`);
      return undefined;
    }
    used = backup.value;
    warnings.push(`the primary GPT is damaged (${primary.why}); using the backup GPT header at LBA ${used.header.lba}. Rewriting the table with sfdisk or gdisk repairs the primary`);
  }
  warnings.push(...used.warnings);
  return {
    kind: 'gpt',
    sectorSize: ss,
    diskGuid: used.header.diskGuid,
    firstUsable: Number(used.header.firstUsable) * ss,
    lastUsableEnd: (Number(used.header.lastUsable) + 1) * ss,
    partitions: used.partitions,
    warnings,
  };
}

function parseMbr(reader: BlockReader, mbr: Uint8Array, ss: SectorSize, warnings: string[]): PartitionTable {
  const sig = u32(mbr, 440);
  const diskSignature = hex8(sig);
  const sectors = Math.floor(reader.size / ss);
  const partitions: Partition[] = [];
  const partuuid = (n: number) => `${diskSignature}-${hex2(n)}`;
  const checkEnd = (n: number, startLba: number, count: number) => {
    if (startLba + count > sectors) {
      warnings.push(`MBR partition ${n} (sectors ${startLba}–${startLba + count - 1}) runs past the end of the disk (${sectors} sectors)`);
    }
  };
  const extendedSlots: MbrEntry[] = [];
  for (const e of parseMbrEntries(mbr)) {
    if (e.type === 0 || e.lbaCount === 0) continue;
    const n = e.slot + 1;
    const extended = MBR_EXTENDED_TYPES.has(e.type);
    const p: Partition = { number: n, start: e.lbaStart * ss, size: e.lbaCount * ss, type: e.type.toString(16), partuuid: partuuid(n) };
    if (e.bootIndicator === 0x80) p.bootable = true;
    if (extended) { p.extended = true; extendedSlots.push(e); }
    checkEnd(n, e.lbaStart, e.lbaCount);
    partitions.push(p);
  }
  let next = 5;
  for (const ext of extendedSlots) {
    const seen = new Set<number>();
    let ebr = ext.lbaStart;
    while (true) {
      if (seen.has(ebr)) { warnings.push(`the logical partition chain loops back to sector ${ebr}; stopped following it`); break; }
      if (seen.size >= MAX_LOGICAL) { warnings.push(`more than ${MAX_LOGICAL} logical partitions; stopped following the chain`); break; }
      seen.add(ebr);
      if ((ebr + 1) * ss > reader.size) { warnings.push(`the extended boot record at sector ${ebr} is past the end of the disk`); break; }
      const s = reader.read(ebr * ss, 512);
      if (!hasBootSignature(s)) { warnings.push(`the extended boot record at sector ${ebr} has no 55 AA signature; the logical partitions after it are ignored`); break; }
      const entries = parseMbrEntries(s);
      for (const e of entries) {
        if (e.type === 0 || e.lbaCount === 0 || MBR_EXTENDED_TYPES.has(e.type)) continue;
        const startLba = ebr + e.lbaStart;
        const p: Partition = { number: next, start: startLba * ss, size: e.lbaCount * ss, type: e.type.toString(16), partuuid: partuuid(next) };
        if (e.bootIndicator === 0x80) p.bootable = true;
        if (startLba + e.lbaCount > ext.lbaStart + ext.lbaCount) {
          warnings.push(`logical partition ${next} runs past the end of its extended partition`);
        }
        checkEnd(next, startLba, e.lbaCount);
        partitions.push(p);
        next++;
      }
      const link = entries.find((e) => MBR_EXTENDED_TYPES.has(e.type) && e.lbaCount !== 0);
      if (!link) break;
      ebr = ext.lbaStart + link.lbaStart;
    }
  }
  return { kind: 'mbr', sectorSize: ss, diskSignature, partitions, warnings };
}

/**
 * Reads the partition table of a disk. Reads only the sectors the tables occupy (a few
 * KiB at each end and the extended boot records), so it is cheap on a disk of any size.
 * Never throws on a malformed table: the problems are in `warnings` and what could be
 * trusted is in `partitions` (kind 'none' when nothing could).
 */
export function parsePartitionTable(reader: BlockReader, opts: { sectorSize?: SectorSize } = {}): PartitionTable {
  const warnings: string[] = [];
  const mbr = reader.size >= 512 ? reader.read(0, 512) : undefined;
  const ss: SectorSize = opts.sectorSize ?? detectSectorSize(reader, mbr);
  const none: PartitionTable = { kind: 'none', sectorSize: ss, partitions: [], warnings };
  if (!mbr || reader.size < ss * 2) return none;
  const mbrValid = hasBootSignature(mbr);
  const entries = parseMbrEntries(mbr);
  const protective = mbrValid && entries.some((e) => e.type === 0xee);
  if (protective || (!mbrValid && (hasGptSignature(reader, ss) || hasGptSignature(reader, Math.floor(reader.size / ss) * ss - ss)))) {
    if (!mbrValid) warnings.push('the disk has a GPT but no protective MBR (no 55 AA signature in sector 0)');
    const gpt = parseGpt(reader, ss, warnings);
    if (gpt) return gpt;
    if (!entries.some((e) => e.type !== 0 && e.type !== 0xee)) return none;
    warnings.push('using the hybrid MBR partitions instead');
    return parseMbr(reader, mbr, ss, warnings);
  }
  if (!mbrValid) return none;
  if (entries.some((e) => e.bootIndicator !== 0 && e.bootIndicator !== 0x80)) return none;
  if (looksLikeFilesystemBootSector(mbr)) return none;
  return parseMbr(reader, mbr, ss, warnings);
}

// ---------------------------------------------------------------------------------------
// Writing

export interface TableRegion {
  /** byte offset on the disk */
  offset: number;
  bytes: Uint8Array;
}

export interface GptPartitionSpec {
  /** bytes, a multiple of the sector size */
  start: number;
  size: number;
  /** type GUID */
  type: string;
  /** unique partition GUID */
  uuid: string;
  name?: string;
  /** sfdisk names: RequiredPartition, NoBlockIOProtocol, LegacyBIOSBootable, GUID:N */
  attributes?: string[];
}

export interface GptSpec {
  /** bytes, a multiple of the sector size */
  diskSize: number;
  sectorSize: SectorSize;
  diskGuid: string;
  /** entry i is partition i+1 */
  partitions: GptPartitionSpec[];
  /** entries in the array, default 128 */
  entryCount?: number;
}

export interface GptBytes {
  /** protective MBR, primary header and entry array, at offset 0 */
  head: Uint8Array;
  /** backup entry array and backup header, ending at the end of the disk */
  tail: Uint8Array;
  tailOffset: number;
  /** the same as [head, tail] */
  regions: TableRegion[];
  /** the first and one past the last byte partitions may use */
  firstUsable: number;
  lastUsableEnd: number;
}

function put32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff; b[o + 1] = (v >>> 8) & 0xff; b[o + 2] = (v >>> 16) & 0xff; b[o + 3] = (v >>> 24) & 0xff;
}
function put64(b: Uint8Array, o: number, v: bigint): void {
  put32(b, o, Number(v & 0xffffffffn));
  put32(b, o + 4, Number((v >> 32n) & 0xffffffffn));
}

function checkSectorMultiple(what: string, value: number, ss: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || value % ss !== 0) {
    throw new FormatError(`${what} (${value}) is not a multiple of the ${ss}-byte sector size`, what, value);
  }
}

/** CHS address for an MBR entry, as partitioning tools write it (255 heads, 63 sectors; 1023/254/63 beyond). */
function chs(lba: number): [number, number, number] {
  const c = Math.floor(lba / (255 * 63));
  if (c > 1023) return [0xfe, 0xff, 0xff];
  const h = Math.floor(lba / 63) % 255;
  const s = (lba % 63) + 1;
  return [h, s | ((c >> 2) & 0xc0), c & 0xff];
}

function putMbrEntry(b: Uint8Array, slot: number, boot: boolean, type: number, lba: number, count: number): void {
  const o = 446 + slot * 16;
  b[o] = boot ? 0x80 : 0;
  b.set(chs(lba), o + 1);
  b[o + 4] = type;
  b.set(chs(lba + count - 1), o + 5);
  put32(b, o + 8, lba);
  put32(b, o + 12, count);
}

/** Builds a GPT (protective MBR, primary and backup headers and entry arrays) for a disk of `diskSize` bytes. */
export function writeGpt(spec: GptSpec): GptBytes {
  const ss = spec.sectorSize;
  checkSectorMultiple('diskSize', spec.diskSize, ss);
  const entryCount = spec.entryCount ?? 128;
  if (!Number.isInteger(entryCount) || entryCount < spec.partitions.length || entryCount < 1 || entryCount * 128 > MAX_GPT_ENTRY_BYTES) {
    throw new FormatError(`a GPT entry array of ${entryCount} entries cannot hold ${spec.partitions.length} partitions`, 'entryCount', entryCount);
  }
  const entryBytes = Math.ceil((entryCount * 128) / ss) * ss;
  const entrySectors = entryBytes / ss;
  const sectors = spec.diskSize / ss;
  const lastLba = sectors - 1;
  const firstUsable = 2 + entrySectors;
  const lastUsable = lastLba - entrySectors - 1;
  if (lastUsable < firstUsable) throw new FormatError(`a disk of ${spec.diskSize} bytes is too small for a GPT`, 'diskSize', spec.diskSize);

  const entries = new Uint8Array(entryBytes);
  const sorted: [number, number][] = [];
  spec.partitions.forEach((p, i) => {
    checkSectorMultiple(`partition ${i + 1} start`, p.start, ss);
    checkSectorMultiple(`partition ${i + 1} size`, p.size, ss);
    const first = p.start / ss;
    const last = first + p.size / ss - 1;
    if (p.size === 0 || first < firstUsable || last > lastUsable) {
      throw new FormatError(
        `partition ${i + 1} (bytes ${p.start}–${p.start + p.size}) is outside the GPT usable area (bytes ${firstUsable * ss}–${(lastUsable + 1) * ss})`,
        'partition', i + 1,
      );
    }
    sorted.push([first, last]);
    const e = entries.subarray(i * 128, i * 128 + 128);
    e.set(guidToBytes(p.type), 0);
    e.set(guidToBytes(p.uuid), 16);
    put64(e, 32, BigInt(first));
    put64(e, 40, BigInt(last));
    put64(e, 48, attributeBitsFromNames(p.attributes ?? []));
    const name = utf16leEncode(p.name ?? '');
    if (name.length > 72) throw new FormatError(`GPT partition name "${p.name}" is longer than 36 UTF-16 code units`, 'name', p.name);
    e.set(name, 56);
  });
  sorted.sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i]![0] <= sorted[i - 1]![1]) throw new FormatError(`partitions overlap at sector ${sorted[i]![0]}`, 'partition', sorted[i]![0]);
  }
  const entriesCrc = crc32(entries.subarray(0, entryCount * 128));

  const header = (myLba: number, altLba: number, entriesLba: number): Uint8Array => {
    const h = new Uint8Array(ss);
    for (let i = 0; i < 8; i++) h[i] = GPT_SIGNATURE.charCodeAt(i);
    put32(h, 8, 0x00010000);
    put32(h, 12, 92);
    put64(h, 24, BigInt(myLba));
    put64(h, 32, BigInt(altLba));
    put64(h, 40, BigInt(firstUsable));
    put64(h, 48, BigInt(lastUsable));
    h.set(guidToBytes(spec.diskGuid), 56);
    put64(h, 72, BigInt(entriesLba));
    put32(h, 80, entryCount);
    put32(h, 84, 128);
    put32(h, 88, entriesCrc);
    put32(h, 16, crc32(h.subarray(0, 92)));
    return h;
  };

  const head = new Uint8Array((2 + entrySectors) * ss);
  putMbrEntry(head, 0, false, 0xee, 1, Math.min(sectors - 1, 0xffffffff));
  head[510] = 0x55; head[511] = 0xaa;
  // The protective entry's CHS is conventionally 0/0/2 .. max.
  head.set([0x00, 0x02, 0x00], 446 + 1);
  head.set([0xff, 0xff, 0xff], 446 + 5);
  head.set(header(1, lastLba, 2), ss);
  head.set(entries, 2 * ss);

  const tail = new Uint8Array((entrySectors + 1) * ss);
  tail.set(entries, 0);
  tail.set(header(lastLba, 1, lastLba - entrySectors), entryBytes);
  const tailOffset = (lastLba - entrySectors) * ss;
  return {
    head, tail, tailOffset,
    regions: [{ offset: 0, bytes: head }, { offset: tailOffset, bytes: tail }],
    firstUsable: firstUsable * ss,
    lastUsableEnd: (lastUsable + 1) * ss,
  };
}

export interface MbrPartitionSpec {
  /** bytes, a multiple of the sector size */
  start: number;
  size: number;
  /** the type byte, e.g. 0x83 */
  type: number;
  bootable?: boolean;
  /**
   * A logical partition inside the extended partition. Its extended boot record goes in
   * the sector just before `start`, which must be free.
   */
  logical?: boolean;
}

export interface MbrSpec {
  diskSize: number;
  sectorSize: SectorSize;
  /** the 32-bit disk signature (PTUUID) */
  diskSignature: number;
  /** primaries first (at most 4, or 3 when there are logical partitions), then logicals in disk order */
  partitions: MbrPartitionSpec[];
}

/**
 * Builds an MBR, and when there are logical partitions an extended partition (type 05)
 * with one extended boot record before each logical partition. Returns the sectors to
 * write; partitions are numbered 1… for primaries in order, then 5… for logicals.
 */
export function writeMbr(spec: MbrSpec): { regions: TableRegion[] } {
  const ss = spec.sectorSize;
  checkSectorMultiple('diskSize', spec.diskSize, ss);
  const sectors = spec.diskSize / ss;
  const primaries = spec.partitions.filter((p) => !p.logical);
  const logicals = spec.partitions.filter((p) => p.logical);
  const maxPrimary = logicals.length ? 3 : 4;
  if (primaries.length > maxPrimary) {
    throw new FormatError(`an MBR holds ${maxPrimary} primary partitions${logicals.length ? ' next to an extended partition' : ''}, not ${primaries.length}`, 'partitions', primaries.length);
  }
  const ranges: [number, number, string][] = [];
  spec.partitions.forEach((p, i) => {
    checkSectorMultiple(`partition ${i + 1} start`, p.start, ss);
    checkSectorMultiple(`partition ${i + 1} size`, p.size, ss);
    const lba = p.start / ss;
    const count = p.size / ss;
    const first = p.logical ? lba - 1 : lba;
    if (count === 0 || first < 1 || lba + count > sectors || lba + count > 0xffffffff || !(p.type > 0 && p.type < 256) || MBR_EXTENDED_TYPES.has(p.type) || p.type === 0xee) {
      throw new FormatError(`MBR partition ${i + 1} (sectors ${lba}+${count}, type ${p.type}) does not fit an MBR on a disk of ${sectors} sectors, or its type is invalid`, 'partition', i + 1);
    }
    ranges.push([first, lba + count - 1, `partition ${i + 1}`]);
  });
  const sorted = ranges.slice().sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i]![0] <= sorted[i - 1]![1]) throw new FormatError(`${sorted[i]![2]} overlaps ${sorted[i - 1]![2]} (or its extended boot record does)`, 'partition', sorted[i]![0]);
  }
  const regions: TableRegion[] = [];
  const mbr = new Uint8Array(ss);
  put32(mbr, 440, spec.diskSignature >>> 0);
  mbr[510] = 0x55; mbr[511] = 0xaa;
  primaries.forEach((p, slot) => putMbrEntry(mbr, slot, !!p.bootable, p.type, p.start / ss, p.size / ss));
  regions.push({ offset: 0, bytes: mbr });
  if (logicals.length) {
    for (let i = 1; i < logicals.length; i++) {
      if (logicals[i]!.start <= logicals[i - 1]!.start) throw new FormatError('logical partitions must be given in disk order', 'partitions', i);
    }
    const extStart = logicals[0]!.start / ss - 1;
    const last = logicals[logicals.length - 1]!;
    const extEnd = (last.start + last.size) / ss;
    for (const p of primaries) {
      const a = p.start / ss;
      const b = a + p.size / ss;
      if (a < extEnd && b > extStart) throw new FormatError(`primary partition at sector ${a} lies inside the extended partition (sectors ${extStart}–${extEnd - 1})`, 'partition', a);
    }
    putMbrEntry(mbr, primaries.length, false, 0x05, extStart, extEnd - extStart);
    logicals.forEach((p, i) => {
      const ebrLba = p.start / ss - 1;
      const ebr = new Uint8Array(ss);
      ebr[510] = 0x55; ebr[511] = 0xaa;
      putMbrEntry(ebr, 0, !!p.bootable, p.type, 1, p.size / ss);
      const nx = logicals[i + 1];
      if (nx) {
        const nextEbr = nx.start / ss - 1;
        putMbrEntry(ebr, 1, false, 0x05, nextEbr - extStart, nx.start / ss + nx.size / ss - nextEbr);
      }
      regions.push({ offset: ebrLba * ss, bytes: ebr });
    });
  }
  return { regions };
}
