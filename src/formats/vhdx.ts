/**
 * VHDX (Hyper-V): fixed, dynamic and differencing images, per MS-VHDX.
 *
 * Layout (little-endian): the first MiB holds the file identifier ("vhdxfile"), two
 * 4 KiB headers at 64 and 128 KiB (CRC-32C; the valid one with the highest sequence
 * number is current) and two copies of the region table at 192 and 256 KiB (CRC-32C),
 * which locates the BAT and metadata regions. Metadata items give the block size,
 * logical/physical sector size, virtual size, HasParent and the parent locator.
 *
 * The BAT interleaves payload entries with sector-bitmap entries: after every
 * `chunkRatio` payload entries (chunkRatio = 2^23 × logical sector size / block size)
 * comes one sector-bitmap entry. Each 64-bit entry: state in bits 0–2, file offset in
 * MiB in bits 20–63. Payload states: NOT_PRESENT 0, UNDEFINED 1, ZERO 2, UNMAPPED 3,
 * FULLY_PRESENT 6, PARTIALLY_PRESENT 7 (differencing only: a sector bitmap bit set,
 * least significant bit first, means the sector is in this file, clear means parent).
 *
 * A header whose LogGuid is not zero has log entries that must be replayed before the
 * BAT and metadata can be trusted (vhdx-log.ts): they are laid over the file in memory to
 * read it, and the layer carries them (`logReplay`) for a writer to write first. A log that
 * rewrites bytes of the disk's data, rather than metadata, is refused.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { crc32c } from './crc.ts';
import { appendExtent, type LayerMetadata, type MetadataRange } from './extent-ops.ts';
import type { FormatReader, ImageLayer, OpenContext, ParentRef } from './image.ts';
import type { LayerExtent } from './extent-map.ts';
import { utf16leDecode } from './text.ts';
import { readVhdxLog, replayedReader, type VhdxLogReplay } from './vhdx-log.ts';

const KiB = 1024;
const MiB = 1024 * 1024;
const HEADER_OFFSETS = [64 * KiB, 128 * KiB];
const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB];
const HEADER_SIZE = 4 * KiB;
const REGION_TABLE_SIZE = 64 * KiB;
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB; // 64 TiB, the format's limit
const MAX_METADATA_ITEM = MiB;

export const GUID_BAT = '2dc27766-f623-4200-9d64-115e9bfd4a08';
export const GUID_METADATA = '8b7ca206-4790-4b9a-b8fe-575f050f886e';
export const GUID_FILE_PARAMETERS = 'caa16737-fa36-4d43-b3b6-33f0aa44e76b';
export const GUID_VIRTUAL_DISK_SIZE = '2fa54224-cd1b-4876-b211-5dbed83bf4b8';
export const GUID_VIRTUAL_DISK_ID = 'beca12ab-b2e6-4523-93ef-c309e000c746';
export const GUID_LOGICAL_SECTOR_SIZE = '8141bf1d-a96f-4709-ba47-f233a8faab5f';
export const GUID_PHYSICAL_SECTOR_SIZE = 'cda348c7-445d-4471-9cc9-e9885251c556';
const GUID_PARENT_LOCATOR = 'a8d35f2d-b30b-454d-abf7-d3d84834ab0c';
const GUID_VHDX_PARENT_LOCATOR_TYPE = 'b04aefb7-d19e-4a81-b789-25b8e9445913';
const ZERO_GUID = '00000000-0000-0000-0000-000000000000';

const STATE_NAMES: Record<number, string> = {
  0: 'not present', 1: 'undefined', 2: 'zero', 3: 'unmapped', 5: 'unmapped', 6: 'fully present', 7: 'partially present',
};

export interface VhdxHeader {
  offset: number;
  sequence: bigint;
  fileWriteGuid: string;
  dataWriteGuid: string;
  logGuid: string;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

export interface VhdxRegion {
  guid: string;
  offset: number;
  length: number;
  required: boolean;
}

export interface VhdxMetadataItem {
  guid: string;
  offset: number;
  length: number;
  isUser: boolean;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

/** A GUID as stored by Windows: the first three fields little-endian. */
export function msGuid(b: Uint8Array, at = 0): string {
  const h = (i: number) => b[at + i]!.toString(16).padStart(2, '0');
  const s = (...idx: number[]) => idx.map(h).join('');
  return `${s(3, 2, 1, 0)}-${s(5, 4)}-${s(7, 6)}-${s(8, 9)}-${s(10, 11, 12, 13, 14, 15)}`;
}

function ascii(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return s;
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Little-endian 32-bit words of `b` (length a multiple of 4), as a Uint32Array. */
function wordsLE(b: Uint8Array): Uint32Array {
  const aligned = b.byteOffset % 4 === 0 ? b : b.slice();
  const w = new Uint32Array(aligned.buffer, aligned.byteOffset, aligned.length >>> 2);
  if (LITTLE_ENDIAN_HOST) return w;
  const dv = view(aligned);
  const out = new Uint32Array(w.length);
  for (let i = 0; i < out.length; i++) out[i] = dv.getUint32(i * 4, true);
  return out;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function safe64(dv: DataView, off: number, name: string, field: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${name}: VHDX ${field} ${v} is too large`, field, v);
  return Number(v);
}

/** CRC-32C of a structure with its 4-byte checksum field at offset 4 taken as zero. */
function structCrc(b: Uint8Array): number {
  return crc32c(b.subarray(8), crc32c(ZERO4, crc32c(b.subarray(0, 4))));
}
const ZERO4 = new Uint8Array(4);

/** Parses one header; returns undefined when its signature or checksum is wrong. */
export function parseVhdxHeader(b: Uint8Array, offset: number, name: string): VhdxHeader | undefined {
  if (ascii(b.subarray(0, 4)) !== 'head') return undefined;
  const dv = view(b);
  if (dv.getUint32(4, true) !== structCrc(b)) return undefined;
  return {
    offset,
    sequence: dv.getBigUint64(8, true),
    fileWriteGuid: msGuid(b, 16),
    dataWriteGuid: msGuid(b, 32),
    logGuid: msGuid(b, 48),
    logVersion: dv.getUint16(64, true),
    version: dv.getUint16(66, true),
    logLength: dv.getUint32(68, true),
    logOffset: safe64(dv, 72, name, 'header.log_offset'),
  };
}

/** Parses a region table; undefined when its signature or checksum is wrong. */
export function parseVhdxRegionTable(b: Uint8Array, name: string): VhdxRegion[] | undefined {
  if (ascii(b.subarray(0, 4)) !== 'regi') return undefined;
  const dv = view(b);
  if (dv.getUint32(4, true) !== structCrc(b)) return undefined;
  const count = dv.getUint32(8, true);
  if (count > 2047) throw new FormatError(`${name}: the VHDX region table claims ${count} entries (at most 2047)`, 'region_table.entry_count', count);
  const out: VhdxRegion[] = [];
  for (let i = 0; i < count; i++) {
    const o = 16 + i * 32;
    out.push({
      guid: msGuid(b, o),
      offset: safe64(dv, o + 16, name, 'region.file_offset'),
      length: dv.getUint32(o + 24, true),
      required: (dv.getUint32(o + 28, true) & 1) === 1,
    });
  }
  return out;
}

export function parseVhdxMetadataTable(b: Uint8Array, name: string): VhdxMetadataItem[] {
  if (ascii(b.subarray(0, 8)) !== 'metadata') {
    throw new FormatError(`${name}: the VHDX metadata region has no "metadata" signature`, 'metadata.signature');
  }
  const dv = view(b);
  const count = dv.getUint16(10, true);
  if (count > 2047) throw new FormatError(`${name}: the VHDX metadata table claims ${count} entries (at most 2047)`, 'metadata.entry_count', count);
  const out: VhdxMetadataItem[] = [];
  for (let i = 0; i < count; i++) {
    const o = 32 + i * 32;
    const flags = dv.getUint32(o + 24, true);
    out.push({
      guid: msGuid(b, o),
      offset: dv.getUint32(o + 16, true),
      length: dv.getUint32(o + 20, true),
      isUser: (flags & 1) !== 0,
      isVirtualDisk: (flags & 2) !== 0,
      isRequired: (flags & 4) !== 0,
    });
  }
  return out;
}

/** Parent locator key/value pairs (UTF-16LE strings), e.g. parent_linkage, relative_path. */
export function parseVhdxParentLocator(b: Uint8Array, name: string): { type: string; entries: Record<string, string> } {
  if (b.length < 20) throw new FormatError(`${name}: the VHDX parent locator is ${b.length} bytes, too short`, 'parent_locator');
  const dv = view(b);
  const type = msGuid(b, 0);
  const count = dv.getUint16(18, true);
  if (20 + count * 12 > b.length) throw new FormatError(`${name}: the VHDX parent locator claims ${count} entries, more than fit in it`, 'parent_locator.count', count);
  const entries: Record<string, string> = {};
  for (let i = 0; i < count; i++) {
    const o = 20 + i * 12;
    const ko = dv.getUint32(o, true);
    const vo = dv.getUint32(o + 4, true);
    const kl = dv.getUint16(o + 8, true);
    const vl = dv.getUint16(o + 10, true);
    if (ko + kl > b.length || vo + vl > b.length) {
      throw new FormatError(`${name}: VHDX parent locator entry ${i} points outside the locator`, 'parent_locator.entry', i);
    }
    entries[utf16leDecode(b.subarray(ko, ko + kl))] = utf16leDecode(b.subarray(vo, vo + vl));
  }
  return { type, entries };
}

function refuseLog(name: string, h: VhdxHeader, why: string): never {
  throw new FormatError(
    `${name}: this VHDX has a log that must be replayed first (log GUID ${h.logGuid}; it was not closed cleanly), and vdboot cannot replay it: ${why}. ` +
      'Open it once in Hyper-V (or mount it in Windows), or run "qemu-img check -r all" on a copy, then try again',
    'header.log_guid', h.logGuid,
  );
}

function openVhdx(fileAsItIs: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  const name = ctx.path;
  let file = fileAsItIs;
  if (file.size < MiB) throw new FormatError(`${name}: ${file.size} bytes is too small for a VHDX (its headers alone take 1 MiB)`, 'size', file.size);
  const creator = utf16leDecode(file.read(8, 512)).replace(/\0.*$/s, '');

  // Headers: the valid one with the highest sequence number is current.
  const headers = HEADER_OFFSETS.map((o) => parseVhdxHeader(file.read(o, HEADER_SIZE), o, name)).filter((h): h is VhdxHeader => h !== undefined);
  if (headers.length === 0) {
    throw new FormatError(`${name}: neither VHDX header (at 64 KiB and 128 KiB) has a valid signature and CRC-32C; the image is damaged`, 'header');
  }
  const header = headers.reduce((a, b) => (b.sequence > a.sequence ? b : a));
  if (header.version !== 1) throw new FormatError(`${name}: VHDX header version ${header.version} is not 1`, 'header.version', header.version);
  let replay: VhdxLogReplay | undefined;
  if (header.logGuid !== ZERO_GUID) {
    if (header.logVersion !== 0) refuseLog(name, header, `its log version is ${header.logVersion}, not 0`);
    replay = readVhdxLog(file, header.logOffset, header.logLength, file.read(header.offset + 48, 16), name);
    file = replayedReader(file, replay.writes);
  }

  let regions: VhdxRegion[] | undefined;
  for (const o of REGION_TABLE_OFFSETS) {
    regions = parseVhdxRegionTable(file.read(o, REGION_TABLE_SIZE), name);
    if (regions) break;
  }
  if (!regions) throw new FormatError(`${name}: neither VHDX region table (at 192 KiB and 256 KiB) has a valid signature and CRC-32C`, 'region_table');
  const region = (guid: string, what: string): VhdxRegion => {
    const r = regions!.filter((x) => x.guid === guid);
    if (r.length !== 1) throw new FormatError(`${name}: the VHDX region table has ${r.length} ${what} regions (expected 1)`, 'region_table', what);
    const x = r[0]!;
    if (x.offset < MiB || x.offset % MiB !== 0 || x.length % MiB !== 0 || x.length === 0 || x.offset + x.length > file.size) {
      throw new FormatError(
        `${name}: the VHDX ${what} region (${x.length} bytes at ${x.offset}) is misaligned or outside the ${file.size}-byte file`,
        'region.file_offset', x.offset,
      );
    }
    return x;
  };
  for (const r of regions) {
    if (r.required && r.guid !== GUID_BAT && r.guid !== GUID_METADATA) {
      throw new FormatError(`${name}: the VHDX needs a region vdboot does not know (${r.guid}); it may come from a newer Hyper-V`, 'region.guid', r.guid);
    }
  }
  const batRegion = region(GUID_BAT, 'BAT');
  const metaRegion = region(GUID_METADATA, 'metadata');

  // Metadata
  const table = parseVhdxMetadataTable(file.read(metaRegion.offset, Math.min(64 * KiB, metaRegion.length)), name);
  const item = (guid: string): Uint8Array | undefined => {
    const it = table.find((x) => x.guid === guid);
    if (!it) return undefined;
    if (it.length > MAX_METADATA_ITEM || it.offset < 64 * KiB || it.offset + it.length > metaRegion.length) {
      throw new FormatError(`${name}: VHDX metadata item ${guid} (${it.length} bytes at ${it.offset}) lies outside the metadata region`, 'metadata.offset', it.offset);
    }
    return file.read(metaRegion.offset + it.offset, it.length);
  };
  const known = [GUID_FILE_PARAMETERS, GUID_VIRTUAL_DISK_SIZE, GUID_VIRTUAL_DISK_ID, GUID_LOGICAL_SECTOR_SIZE, GUID_PHYSICAL_SECTOR_SIZE, GUID_PARENT_LOCATOR];
  for (const it of table) {
    if (it.isRequired && !known.includes(it.guid)) {
      throw new FormatError(`${name}: the VHDX needs a metadata item vdboot does not know (${it.guid})`, 'metadata.guid', it.guid);
    }
  }
  const need = (guid: string, what: string, min: number): DataView => {
    const b = item(guid);
    if (!b || b.length < min) throw new FormatError(`${name}: the VHDX metadata has no ${what}`, 'metadata', what);
    return view(b);
  };
  const fp = need(GUID_FILE_PARAMETERS, 'file parameters', 8);
  const blockSize = fp.getUint32(0, true);
  const fpFlags = fp.getUint32(4, true);
  const hasParent = (fpFlags & 2) !== 0;
  const leaveAllocated = (fpFlags & 1) !== 0;
  const vsDv = need(GUID_VIRTUAL_DISK_SIZE, 'virtual disk size', 8);
  const size = safe64(vsDv, 0, name, 'virtual_disk_size');
  const lss = need(GUID_LOGICAL_SECTOR_SIZE, 'logical sector size', 4).getUint32(0, true);
  const pss = need(GUID_PHYSICAL_SECTOR_SIZE, 'physical sector size', 4).getUint32(0, true);
  const diskIdBytes = item(GUID_VIRTUAL_DISK_ID);
  const diskId = diskIdBytes && diskIdBytes.length >= 16 ? msGuid(diskIdBytes) : undefined;

  if (blockSize < MiB || blockSize > 256 * MiB || (blockSize & (blockSize - 1)) !== 0) {
    throw new FormatError(`${name}: VHDX block size ${blockSize} is not a power of two between 1 MiB and 256 MiB`, 'block_size', blockSize);
  }
  if (lss !== 512 && lss !== 4096) throw new FormatError(`${name}: VHDX logical sector size ${lss} is neither 512 nor 4096`, 'logical_sector_size', lss);
  if (pss !== 512 && pss !== 4096) throw new FormatError(`${name}: VHDX physical sector size ${pss} is neither 512 nor 4096`, 'physical_sector_size', pss);
  if (size === 0 || size % lss !== 0 || size > MAX_VIRTUAL_SIZE) {
    throw new FormatError(`${name}: VHDX virtual size ${size} is zero, not a multiple of the ${lss}-byte sector, or over 64 TiB`, 'virtual_disk_size', size);
  }

  const chunkRatio = (2 ** 23 * lss) / blockSize;
  const dataBlocks = Math.ceil(size / blockSize);
  const bitmapBlocks = Math.ceil(dataBlocks / chunkRatio);
  const totalEntries = hasParent ? bitmapBlocks * (chunkRatio + 1) : dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
  if (totalEntries * 8 > batRegion.length) {
    throw new FormatError(
      `${name}: the VHDX BAT region (${batRegion.length} bytes) is too small for ${totalEntries} entries (${size} bytes in ${blockSize}-byte blocks)`,
      'bat.length', batRegion.length,
    );
  }

  const metadata: MetadataRange[] = [
    { file: 0, offset: 0, length: MiB, what: 'headers and region tables' },
    { file: 0, offset: batRegion.offset, length: batRegion.length, what: 'BAT' },
    { file: 0, offset: metaRegion.offset, length: metaRegion.length, what: 'metadata region' },
  ];
  if (header.logLength > 0) metadata.push({ file: 0, offset: header.logOffset, length: header.logLength, what: 'log' });

  // Parent
  let parent: ParentRef | undefined;
  const details: Record<string, string | number | boolean> = {
    creator,
    'block size': blockSize,
    'logical sector size': lss,
    'physical sector size': pss,
    'header sequence': header.sequence.toString(),
    'data write guid': header.dataWriteGuid,
  };
  if (diskId) details['virtual disk id'] = diskId;
  if (leaveAllocated) details['leave blocks allocated'] = true;
  if (hasParent) {
    const loc = item(GUID_PARENT_LOCATOR);
    if (!loc) throw new FormatError(`${name}: a differencing VHDX without a parent locator`, 'parent_locator');
    const { type, entries } = parseVhdxParentLocator(loc, name);
    if (type !== GUID_VHDX_PARENT_LOCATOR_TYPE) throw new FormatError(`${name}: VHDX parent locator type ${type} is unknown`, 'parent_locator.type', type);
    const linkage = (entries['parent_linkage'] ?? '').replace(/[{}]/g, '').toLowerCase();
    const linkage2 = (entries['parent_linkage2'] ?? '').replace(/[{}]/g, '').toLowerCase();
    const paths: string[] = [];
    const rel = entries['relative_path'];
    if (rel) paths.push(rel.replace(/\\/g, '/'));
    for (const k of ['absolute_win32_path', 'volume_path']) {
      const v = entries[k];
      if (v) {
        const posix = v.replace(/\\/g, '/');
        paths.push(posix.slice(posix.lastIndexOf('/') + 1));
      }
    }
    details['parent linkage'] = linkage;
    for (const [k, v] of Object.entries(entries)) if (k.endsWith('path')) details[`parent ${k.replace('_', ' ')}`] = v;
    parent = {
      paths: paths.filter((p, i) => p !== '' && paths.indexOf(p) === i),
      verify(p: ImageLayer) {
        if (p.format !== 'vhdx') throw new FormatError(`${name}: its parent must be a VHDX, but ${p.files[0]} is ${p.format}`, 'parent.format', p.format);
        if (p.id !== linkage && (linkage2 === '' || p.id !== linkage2)) {
          throw new FormatError(
            `${name}: ${p.files[0]} is not its parent: the child expects parent data write GUID ${linkage}, the file has ${p.id ?? 'none'} (the parent was modified after the child was made?)`,
            'parent_linkage', linkage,
          );
        }
        if (p.size !== size) {
          throw new FormatError(`${name}: its parent ${p.files[0]} is ${p.size} bytes, the child ${size}`, 'parent.size', p.size);
        }
      },
    };
  }

  // BAT, read in slices so a large table never needs one big allocation.
  const extents: LayerExtent[] = [];
  const counts = [0, 0, 0, 0, 0, 0, 0, 0];
  const sectorsPerBlock = blockSize / lss;
  const bitmapBytesPerBlock = sectorsPerBlock / 8;
  const SLICE_ENTRIES = 128 * 1024;
  let sliceStart = -1;
  // the slice as 32-bit words, little-endian (converted once on a big-endian host)
  let words: Uint32Array = new Uint32Array(0);
  // entry(i) sets entryState/entryOffset (no object per entry: a BAT can have millions)
  let entryState = 0;
  let entryOffset = 0;
  const entry = (i: number): void => {
    if (sliceStart < 0 || i < sliceStart || i >= sliceStart + SLICE_ENTRIES) {
      sliceStart = i - (i % SLICE_ENTRIES);
      const n = Math.min(SLICE_ENTRIES, totalEntries - sliceStart);
      words = wordsLE(file.read(batRegion.offset + sliceStart * 8, n * 8));
    }
    const lo = words[(i - sliceStart) * 2]!;
    const hi = words[(i - sliceStart) * 2 + 1]!;
    entryState = lo & 7;
    entryOffset = ((lo >>> 20) + hi * 4096) * MiB;
  };
  const bitmapOffsets = new Map<number, number>();
  const chunkBitmap = (chunk: number, block: number): number => {
    let off = bitmapOffsets.get(chunk);
    if (off === undefined) {
      entry(chunk * (chunkRatio + 1) + chunkRatio);
      if (entryState !== 6) {
        throw new FormatError(`${name}: VHDX block ${block} is partially present but its chunk's sector bitmap (state ${entryState}) is not`, 'bat.sector_bitmap', entryState);
      }
      if (!Number.isSafeInteger(entryOffset) || entryOffset < MiB || entryOffset + MiB > file.size) {
        throw new FormatError(`${name}: VHDX sector bitmap of chunk ${chunk} at ${entryOffset} is outside the ${file.size}-byte file`, 'bat.sector_bitmap', entryOffset);
      }
      off = entryOffset;
      bitmapOffsets.set(chunk, off);
      metadata.push({ file: 0, offset: off, length: MiB, what: `sector bitmap of chunk ${chunk}` });
    }
    return off;
  };
  const absent = (start: number, length: number): LayerExtent =>
    hasParent ? { kind: 'parent', start, length } : { kind: 'zero', start, length, why: 'unallocated' };

  for (let b = 0; b < dataBlocks; b++) {
    const start = b * blockSize;
    const len = Math.min(blockSize, size - start);
    entry(b + Math.floor(b / chunkRatio));
    const state = entryState;
    const blockOffset = entryOffset;
    counts[state]!++;
    switch (state) {
      case 0: // NOT_PRESENT: the parent's, or zeros
        appendExtent(extents, absent(start, len));
        break;
      case 1: // UNDEFINED: content undefined; zeros, as qemu reads it
        appendExtent(extents, { kind: 'zero', start, length: len, why: 'unallocated' });
        break;
      case 2: // ZERO
        appendExtent(extents, { kind: 'zero', start, length: len, why: 'zeroed' });
        break;
      case 3: // UNMAPPED
      case 5: // UNMAPPED in the 0.95 draft
        appendExtent(extents, { kind: 'zero', start, length: len, why: 'unallocated' });
        break;
      case 6: { // FULLY_PRESENT
        if (blockOffset < MiB) throw new FormatError(`${name}: VHDX block ${b} is at file offset ${blockOffset}, inside the headers`, 'bat.offset', blockOffset);
        const last = extents[extents.length - 1];
        // the common case of consecutive blocks, extended without a new object
        if (last !== undefined && last.kind === 'data' && last.offset + last.length === blockOffset && last.start + last.length === start) last.length += len;
        else extents.push({ kind: 'data', start, length: len, file: 0, offset: blockOffset });
        break;
      }
      case 7: { // PARTIALLY_PRESENT
        if (!hasParent) throw new FormatError(`${name}: VHDX block ${b} is partially present, but the image is not differencing`, 'bat.state', state);
        if (blockOffset < MiB) throw new FormatError(`${name}: VHDX block ${b} is at file offset ${blockOffset}, inside the headers`, 'bat.offset', blockOffset);
        const chunk = Math.floor(b / chunkRatio);
        const bmOff = chunkBitmap(chunk, b) + (b % chunkRatio) * bitmapBytesPerBlock;
        const sectors = len / lss;
        const bm = file.read(bmOff, Math.ceil(sectors / 8));
        let s = 0;
        while (s < sectors) {
          const present = ((bm[s >> 3]! >> (s & 7)) & 1) === 1;
          let t = s + 1;
          while (t < sectors) {
            if ((t & 7) === 0 && t + 8 <= sectors && bm[t >> 3] === (present ? 0xff : 0)) { t += 8; continue; }
            if ((((bm[t >> 3]! >> (t & 7)) & 1) === 1) !== present) break;
            t++;
          }
          const vs = start + s * lss;
          const vl = (t - s) * lss;
          appendExtent(extents, present ? { kind: 'data', start: vs, length: vl, file: 0, offset: blockOffset + s * lss } : absent(vs, vl));
          s = t;
        }
        break;
      }
      default:
        throw new FormatError(`${name}: VHDX BAT entry of block ${b} has an unknown state ${state}`, 'bat.state', state);
    }
  }
  counts.forEach((n, state) => {
    if (n > 0) details[`blocks ${STATE_NAMES[state]}`] = (Number(details[`blocks ${STATE_NAMES[state]}`]) || 0) + n;
  });

  if (replay) {
    // Read through the replay, the data extents point into the file as it is: the log must not rewrite them.
    // (the file ranges sorted once, each write looked up by binary search: a log may hold thousands)
    const ranges = extents.flatMap((e) => (e.kind === 'data' && e.file === 0 ? [[e.offset, e.offset + e.length] as const] : [])).sort((a, b) => a[0] - b[0]);
    const reach: number[] = []; // the furthest end among ranges[0..i]
    for (const [i, r] of ranges.entries()) reach.push(Math.max(r[1], i ? reach[i - 1]! : 0));
    for (const w of replay.writes) {
      // the last range starting before the write's end; some range up to it reaching past the write's start overlaps
      let lo = 0;
      let hi = ranges.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (ranges[mid]![0] < w.offset + w.length) lo = mid + 1;
        else hi = mid;
      }
      if (lo > 0 && reach[lo - 1]! > w.offset) refuseLog(name, header, `it rewrites ${w.length} bytes at file offset ${w.offset}, which hold the disk's data (vdboot replays updates of the image's tables only)`);
    }
    details.log = replay.entries ? `${replay.entries} entr${replay.entries === 1 ? 'y' : 'ies'} (sequence ${replay.first}–${replay.last}), ${replay.writes.length} write${replay.writes.length === 1 ? '' : 's'} replayed in memory` : 'no valid entries';
  }

  return {
    format: 'vhdx',
    subformat: hasParent ? 'differencing' : leaveAllocated ? 'fixed' : 'dynamic',
    size,
    files: [ctx.path],
    id: header.dataWriteGuid,
    extents,
    ...(parent ? { parent } : {}),
    details,
    metadata,
    ...(replay ? { logReplay: { entries: replay.entries, writes: replay.writes } } : {}),
  };
}

export const vhdxFormat: FormatReader = {
  format: 'vhdx',
  probe(head: Uint8Array): boolean {
    return head.length >= 8 && ascii(head.subarray(0, 8)) === 'vhdxfile';
  },
  open: openVhdx,
};
