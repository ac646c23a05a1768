/**
 * VMDK (VMware virtual disk) as LayerExtents.
 *
 * A VMDK is a text descriptor plus extents. The descriptor is either a small text
 * file (monolithicFlat, twoGbMaxExtentSparse/Flat, vmfs…) whose extent lines name
 * other files, opened through ctx.openFile, or embedded in a hosted sparse file
 * (monolithicSparse, streamOptimized) that is itself the only extent.
 *
 * Extent kinds: FLAT / VMFS (the bytes at an offset of a file), ZERO, SPARSE (hosted
 * sparse "KDMV": grain directory → grain tables → grains; zeroed-grain entries;
 * redundant tables; streamOptimized's compressed grains with markers and a footer),
 * VMFSSPARSE ("COWD"), SESPARSE (ESXi 6.5+). Compressed grains are `unmappable`
 * (readable through readUnmappable); a delta's missing grains are `parent` extents.
 * The parent is found by parentFileNameHint and checked by CID (the child's
 * parentCID must equal the parent's CID).
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import type { LayerMetadata, MetadataRange } from './extent-ops.ts';
import type { FormatReader, ImageLayer, OpenContext, ParentRef } from './image.ts';
import type { LayerExtent } from './extent-map.ts';
import { inflateZlib } from './inflate.ts';
import { utf8Decode } from './text.ts';

const SECTOR = 512;
const KDMV = 0x564d444b; // "KDMV" read little-endian
const COWD = 0x44574f43; // "COWD" read little-endian
const GD_AT_END = 0xffffffffffffffffn;
const FLAG_RGD = 1 << 1;
const FLAG_ZERO_GRAIN = 1 << 2;
const FLAG_MARKERS = 1 << 17;
const GTE_ZEROED = 1;
const MARKER_FOOTER = 3;
const MARKER_EOS = 0;
/** Largest descriptor vdboot reads (qemu's limit too). */
const MAX_DESCRIPTOR = (1 << 20) - 1;
const NO_PARENT_CID = 'ffffffff';

export interface VmdkDescriptor {
  version?: string;
  cid?: string;
  parentCid?: string;
  createType?: string;
  parentFileNameHint?: string;
  extents: VmdkExtentLine[];
}

export interface VmdkExtentLine {
  access: 'RW' | 'RDONLY' | 'NOACCESS';
  sectors: number;
  type: string;
  file?: string;
  offset?: number;
  line: number;
}

/** Hosted sparse extent header ("KDMV"), as in VMware's Virtual Disk Format 1.1. */
export interface SparseHeader {
  version: number;
  flags: number;
  capacity: number;
  grainSize: number;
  descriptorOffset: number;
  descriptorSize: number;
  numGTEsPerGT: number;
  rgdOffset: number;
  gdOffset: number;
  /** gdOffset is GD_AT_END in the header (streamOptimized): the footer holds the real one */
  gdAtEnd: boolean;
  overHead: number;
  compressAlgorithm: number;
}

function fail(file: BlockReader, msg: string, field: string, value: string | number | bigint): never {
  throw new FormatError(`${file.name}: VMDK ${msg}`, field, value);
}

function u64le(dv: DataView, at: number, file: BlockReader, field: string): number {
  const v = dv.getBigUint64(at, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(file, `field ${field} = ${v} is too large`, field, v);
  return Number(v);
}

/** Parses a "KDMV" header; `b` starts at the magic and holds at least 79 bytes. */
export function parseSparseHeader(b: Uint8Array, file: BlockReader): SparseHeader {
  if (b.length < 79) fail(file, `sparse header truncated (${b.length} bytes)`, 'header', b.length);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (dv.getUint32(0, true) !== KDMV) fail(file, 'sparse extent has no KDMV magic', 'magic', dv.getUint32(0, true));
  const gdRaw = dv.getBigUint64(56, true);
  const h: SparseHeader = {
    version: dv.getUint32(4, true),
    flags: dv.getUint32(8, true),
    capacity: u64le(dv, 12, file, 'capacity'),
    grainSize: u64le(dv, 20, file, 'grainSize'),
    descriptorOffset: u64le(dv, 28, file, 'descriptorOffset'),
    descriptorSize: u64le(dv, 36, file, 'descriptorSize'),
    numGTEsPerGT: dv.getUint32(44, true),
    rgdOffset: u64le(dv, 48, file, 'rgdOffset'),
    gdOffset: gdRaw === GD_AT_END ? 0 : u64le(dv, 56, file, 'gdOffset'),
    gdAtEnd: gdRaw === GD_AT_END,
    overHead: u64le(dv, 64, file, 'overHead'),
    compressAlgorithm: dv.getUint16(77, true),
  };
  if (h.version < 1 || h.version > 3) fail(file, `sparse extent version ${h.version} is not supported (1 to 3)`, 'version', h.version);
  return h;
}

/** Parses descriptor text (embedded or a separate file). */
export function parseDescriptor(text: string, file: BlockReader): VmdkDescriptor {
  const d: VmdkDescriptor = { extents: [] };
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const ext = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/.exec(line);
    if (ext) {
      const sectors = Number(ext[2]);
      if (!Number.isSafeInteger(sectors * SECTOR)) fail(file, `extent line ${i + 1} has a size of ${ext[2]} sectors, too large`, 'extent.sectors', ext[2]!);
      const e: VmdkExtentLine = { access: ext[1] as VmdkExtentLine['access'], sectors, type: ext[3]!.toUpperCase(), line: i + 1 };
      if (ext[4] !== undefined) e.file = ext[4];
      if (ext[5] !== undefined) {
        e.offset = Number(ext[5]);
        if (!Number.isSafeInteger(e.offset * SECTOR)) fail(file, `extent line ${i + 1} has offset ${ext[5]}, too large`, 'extent.offset', ext[5]);
      }
      d.extents.push(e);
      continue;
    }
    const kv = /^([A-Za-z0-9_.]+)\s*=\s*"?([^"]*)"?\s*$/.exec(line);
    if (!kv) continue;
    const key = kv[1]!.toLowerCase();
    const value = kv[2]!.trim();
    if (key === 'version') d.version = value;
    else if (key === 'cid') d.cid = normalizeCid(value);
    else if (key === 'parentcid') d.parentCid = normalizeCid(value);
    else if (key === 'createtype') d.createType = value;
    else if (key === 'parentfilenamehint') d.parentFileNameHint = value;
  }
  return d;
}

/** A CID as 8 lowercase hex digits (qemu writes it without leading zeros). */
function normalizeCid(value: string): string {
  return /^[0-9a-fA-F]{1,8}$/.test(value) ? value.toLowerCase().padStart(8, '0') : value.toLowerCase();
}

function looksLikeDescriptor(head: Uint8Array): boolean {
  // qemu pads a rewritten descriptor file with NULs: the text ends at the first one.
  let n = Math.min(head.length, 1024);
  const nul = head.subarray(0, n).indexOf(0);
  if (nul >= 0) n = nul;
  if (n < 8) return false;
  const text = utf8Decode(head.subarray(0, n));
  return /#\s*Disk DescriptorFile/i.test(text) || (/^\s*createType\s*=/im.test(text) && /^\s*(RW|RDONLY)\s+\d+\s+[A-Z]+/m.test(text));
}

export function probeVmdk(head: Uint8Array): boolean {
  if (head.length < 4) return false;
  const magic = head[0]! | (head[1]! << 8) | (head[2]! << 16) | (head[3]! * 2 ** 24);
  if (magic === KDMV || magic === COWD) return true;
  return looksLikeDescriptor(head);
}

/** What a layer's extents are built from while walking the extents. */
interface Builder {
  extents: LayerExtent[];
  metadata: MetadataRange[];
  compressed: CompressedGrain[];
  hasParent: boolean;
  allocatedGrains: number;
  zeroGrains: number;
}

interface CompressedGrain {
  start: number;
  length: number;
  reader: BlockReader;
  /** byte offset of the grain (its marker, when the extent has markers) */
  offset: number;
  markers: boolean;
  grainBytes: number;
}

function push(b: Builder, e: LayerExtent): void {
  const last = b.extents[b.extents.length - 1];
  if (last && last.kind === e.kind && last.start + last.length === e.start) {
    if (e.kind === 'data' && last.kind === 'data') {
      if (last.file === e.file && last.offset + last.length === e.offset) { last.length += e.length; return; }
    } else if (e.kind === 'zero' && last.kind === 'zero') {
      if (last.why === e.why) { last.length += e.length; return; }
    } else if (e.kind === 'unmappable' && last.kind === 'unmappable') {
      if (last.reason === e.reason) { last.length += e.length; return; }
    } else if (e.kind === 'parent') {
      last.length += e.length;
      return;
    }
  }
  b.extents.push(e);
}

function unallocated(b: Builder, start: number, length: number): void {
  push(b, b.hasParent ? { kind: 'parent', start, length } : { kind: 'zero', start, length, why: 'unallocated' });
}

/** The decoded meaning of one grain table entry. */
type Grain = { kind: 'unallocated' } | { kind: 'zero' } | { kind: 'data'; offset: number };
const UNALLOCATED: Grain = { kind: 'unallocated' };
const ZERO: Grain = { kind: 'zero' };

interface GrainTables {
  /** byte offset and entry count of the grain directory */
  gdOffset: number;
  gdEntries: number;
  /** bytes per directory and table entry: 4, or 8 for SESPARSE */
  entryBytes: 4 | 8;
  gtEntries: number;
  grainBytes: number;
  /** a directory entry → the byte offset of its grain table, 0 when absent */
  gdEntry(lo: number, hi: number, index: number): number;
  gtEntry(lo: number, hi: number): Grain;
  /** entries are 32-bit sector numbers (0 unallocated; 1 zeroed when the extent has zeroed grains) */
  sectorEntries: boolean;
  compressed: boolean;
  markers: boolean;
  what: string;
}

/** Walks a grain directory and its tables over [start, start+length) of the virtual disk. */
function mapGrains(b: Builder, reader: BlockReader, fileIndex: number, start: number, length: number, t: GrainTables): void {
  const gtSpan = t.gtEntries * t.grainBytes;
  const needed = Math.ceil(length / gtSpan);
  if (needed > t.gdEntries) {
    fail(reader, `${t.what} grain directory has ${t.gdEntries} entries, too few for its ${length} bytes (needs ${needed})`, 'gd.entries', t.gdEntries);
  }
  const gdBytes = needed * t.entryBytes;
  if (t.gdOffset + gdBytes > reader.size) {
    fail(reader, `${t.what} grain directory (${needed} entries at offset ${t.gdOffset}) is past the end of the file (${reader.size} bytes)`, 'gdOffset', t.gdOffset);
  }
  b.metadata.push({ file: fileIndex, offset: t.gdOffset, length: t.gdEntries * t.entryBytes, what: `${t.what} grain directory` });
  const gtBytes = t.gtEntries * t.entryBytes;
  const reason = 'streamOptimized compressed grain';
  const chunkEntries = 65536;
  // the pending run of whole data grains, counted in grains (a byte count past 2^31 would be boxed)
  let runStart = 0, runOff = 0, runCount = 0;
  const seenGt = new Set<number>();
  for (let first = 0; first < needed; first += chunkEntries) {
    const n = Math.min(chunkEntries, needed - first);
    const gd = reader.read(t.gdOffset + first * t.entryBytes, n * t.entryBytes);
    const gdv = new DataView(gd.buffer, gd.byteOffset, gd.byteLength);
    for (let i = 0; i < n; i++) {
      const gi = first + i;
      const lo = gdv.getUint32(i * t.entryBytes, true);
      const hi = t.entryBytes === 8 ? gdv.getUint32(i * 8 + 4, true) : 0;
      const base = start + gi * gtSpan;
      const span = Math.min(gtSpan, start + length - base);
      const gtOffset = t.gdEntry(lo, hi, gi);
      if (gtOffset === 0) {
        if (runCount > 0) { push(b, { kind: 'data', start: runStart, length: runCount * t.grainBytes, file: fileIndex, offset: runOff }); runCount = 0; }
        unallocated(b, base, span);
        continue;
      }
      if (gtOffset + gtBytes > reader.size) {
        fail(reader, `${t.what} grain table ${gi} at offset ${gtOffset} is past the end of the file (${reader.size} bytes)`, 'gd.entry', gtOffset);
      }
      // A grain table used twice would let a small file describe an enormous disk (and
      // is corruption anyway): refuse it, which also bounds the work by the file size.
      if (seenGt.has(gtOffset)) fail(reader, `${t.what} grain directory entry ${gi} points to the grain table at offset ${gtOffset}, which an earlier entry already uses`, 'gd.entry', gtOffset);
      seenGt.add(gtOffset);
      b.metadata.push({ file: fileIndex, offset: gtOffset, length: gtBytes, what: `${t.what} grain table ${gi}` });
      const gt = reader.read(gtOffset, gtBytes);
      const gtv = new DataView(gt.buffer, gt.byteOffset, gt.byteLength);
      const grains = Math.ceil(span / t.grainBytes);
      for (let j = 0; j < grains; j++) {
        const gs = base + j * t.grainBytes;
        const glen = Math.min(t.grainBytes, start + length - gs);
        const elo = gtv.getUint32(j * t.entryBytes, true);
        // The common case, a hosted or COWD grain by sector number: no allocation per grain.
        if (t.sectorEntries && elo > 1 && !t.compressed && glen === t.grainBytes) {
          const off = elo * SECTOR;
          if (off + glen > reader.size) {
            fail(reader, `${t.what} grain for virtual offset ${gs} is at offset ${off}, past the end of the file (${reader.size} bytes)`, 'gt.entry', off);
          }
          b.allocatedGrains++;
          if (runCount > 0 && gs === runStart + runCount * t.grainBytes && off === runOff + runCount * t.grainBytes) { runCount++; continue; }
          if (runCount > 0) { push(b, { kind: 'data', start: runStart, length: runCount * t.grainBytes, file: fileIndex, offset: runOff }); runCount = 0; }
          runStart = gs; runOff = off; runCount = 1;
          continue;
        }
        if (runCount > 0) { push(b, { kind: 'data', start: runStart, length: runCount * t.grainBytes, file: fileIndex, offset: runOff }); runCount = 0; }
        const ehi = t.entryBytes === 8 ? gtv.getUint32(j * 8 + 4, true) : 0;
        const g = elo === 0 && ehi === 0 ? UNALLOCATED : t.gtEntry(elo, ehi);
        if (g.kind === 'unallocated') unallocated(b, gs, glen);
        else if (g.kind === 'zero') { b.zeroGrains++; push(b, { kind: 'zero', start: gs, length: glen, why: 'zeroed' }); }
        else if (t.compressed) {
          if (g.offset >= reader.size) fail(reader, `${t.what} compressed grain for virtual offset ${gs} is at offset ${g.offset}, past the end of the file`, 'gt.entry', g.offset);
          b.allocatedGrains++;
          b.compressed.push({ start: gs, length: glen, reader, offset: g.offset, markers: t.markers, grainBytes: t.grainBytes });
          push(b, { kind: 'unmappable', start: gs, length: glen, reason });
        } else {
          if (g.offset + glen > reader.size) {
            fail(reader, `${t.what} grain for virtual offset ${gs} is at offset ${g.offset}, past the end of the file (${reader.size} bytes)`, 'gt.entry', g.offset);
          }
          b.allocatedGrains++;
          push(b, { kind: 'data', start: gs, length: glen, file: fileIndex, offset: g.offset });
        }
      }
    }
  }
  if (runCount > 0) push(b, { kind: 'data', start: runStart, length: runCount * t.grainBytes, file: fileIndex, offset: runOff });
}

/** Maps a hosted sparse ("KDMV") extent. Returns its header. */
function mapSparseExtent(b: Builder, reader: BlockReader, fileIndex: number, start: number, length: number, what: string): SparseHeader {
  const head = reader.read(0, Math.min(reader.size, SECTOR));
  let h = parseSparseHeader(head, reader);
  b.metadata.push({ file: fileIndex, offset: 0, length: SECTOR, what: `${what} header` });
  if (h.descriptorOffset > 0 && h.descriptorSize > 0) {
    b.metadata.push({ file: fileIndex, offset: h.descriptorOffset * SECTOR, length: h.descriptorSize * SECTOR, what: `${what} embedded descriptor` });
  }
  if (h.gdAtEnd) {
    // streamOptimized: the footer (marker, header, end-of-stream marker) holds the real header.
    if (reader.size < 1536 + SECTOR) fail(reader, 'streamOptimized footer is missing (file too small)', 'footer', reader.size);
    const tail = reader.read(reader.size - 1536, 1536);
    const tv = new DataView(tail.buffer, tail.byteOffset, tail.byteLength);
    if (tv.getUint32(8, true) !== 0 || tv.getUint32(12, true) !== MARKER_FOOTER || tv.getUint32(512, true) !== KDMV ||
        tv.getBigUint64(1024, true) !== 0n || tv.getUint32(1032, true) !== 0 || tv.getUint32(1036, true) !== MARKER_EOS) {
      fail(reader, 'streamOptimized footer is invalid (the header says the grain directory is at the end, but no footer and end-of-stream marker are there): the file may be truncated', 'footer', reader.size - 1536);
    }
    h = parseSparseHeader(tail.subarray(512, 1024), reader);
    if (h.gdAtEnd) fail(reader, 'streamOptimized footer also puts the grain directory at the end', 'footer.gdOffset', 'GD_AT_END');
    b.metadata.push({ file: fileIndex, offset: reader.size - 1536, length: 1536, what: `${what} footer` });
  }
  if (h.numGTEsPerGT < 1 || h.numGTEsPerGT > 512) fail(reader, `numGTEsPerGT ${h.numGTEsPerGT} is out of range (1..512)`, 'numGTEsPerGT', h.numGTEsPerGT);
  if (h.grainSize < 1 || h.grainSize > 65536) fail(reader, `grainSize ${h.grainSize} sectors is out of range (1..65536)`, 'grainSize', h.grainSize);
  if (h.compressAlgorithm > 1) fail(reader, `compressAlgorithm ${h.compressAlgorithm} is unknown (0 none, 1 deflate)`, 'compressAlgorithm', h.compressAlgorithm);
  if (h.overHead * SECTOR > reader.size) fail(reader, `file is truncated: the header says its metadata takes ${h.overHead} sectors, the file has ${reader.size} bytes`, 'overHead', h.overHead);
  if (h.capacity * SECTOR < length) fail(reader, `sparse extent capacity ${h.capacity} sectors is smaller than the ${length / SECTOR} sectors the descriptor gives it`, 'capacity', h.capacity);
  const grainBytes = h.grainSize * SECTOR;
  const gtSpanSectors = h.numGTEsPerGT * h.grainSize;
  const gdEntries = Math.ceil(h.capacity / gtSpanSectors);
  const zeroGrain = (h.flags & FLAG_ZERO_GRAIN) !== 0;
  const compressed = h.compressAlgorithm === 1;
  const markers = (h.flags & FLAG_MARKERS) !== 0;
  const sectorsToBytes = (s: number) => s * SECTOR;
  mapGrains(b, reader, fileIndex, start, length, {
    gdOffset: h.gdOffset * SECTOR,
    gdEntries,
    entryBytes: 4,
    gtEntries: h.numGTEsPerGT,
    grainBytes,
    gdEntry: (lo) => sectorsToBytes(lo),
    gtEntry: (lo) => (zeroGrain && lo === GTE_ZEROED ? ZERO : { kind: 'data', offset: sectorsToBytes(lo) }),
    sectorEntries: true,
    compressed,
    markers,
    what,
  });
  // The redundant grain directory and its tables are metadata too.
  if ((h.flags & FLAG_RGD) !== 0 && h.rgdOffset > 0) {
    const rgdOffset = h.rgdOffset * SECTOR;
    const needed = Math.ceil(length / (h.numGTEsPerGT * grainBytes));
    if (rgdOffset + needed * 4 > reader.size) fail(reader, `${what} redundant grain directory at offset ${rgdOffset} is past the end of the file`, 'rgdOffset', h.rgdOffset);
    b.metadata.push({ file: fileIndex, offset: rgdOffset, length: gdEntries * 4, what: `${what} redundant grain directory` });
    const rgd = reader.read(rgdOffset, needed * 4);
    const rv = new DataView(rgd.buffer, rgd.byteOffset, rgd.byteLength);
    for (let i = 0; i < needed; i++) {
      const s = rv.getUint32(i * 4, true);
      if (s !== 0) b.metadata.push({ file: fileIndex, offset: s * SECTOR, length: h.numGTEsPerGT * 4, what: `${what} redundant grain table ${i}` });
    }
  }
  return h;
}

/** Maps an ESX "COWD" sparse extent (VMFSSPARSE). */
function mapCowdExtent(b: Builder, reader: BlockReader, fileIndex: number, start: number, length: number, what: string): void {
  if (reader.size < 2048) fail(reader, `VMFSSPARSE extent is too small (${reader.size} bytes)`, 'file.size', reader.size);
  const head = reader.read(0, 2048);
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (dv.getUint32(0, true) !== COWD) fail(reader, 'VMFSSPARSE extent has no COWD magic', 'magic', dv.getUint32(0, true));
  const diskSectors = dv.getUint32(12, true);
  const granularity = dv.getUint32(16, true);
  const gdSector = dv.getUint32(20, true);
  const gdEntries = dv.getUint32(24, true);
  if (granularity < 1 || granularity > 65536) fail(reader, `COWD granularity ${granularity} sectors is out of range`, 'granularity', granularity);
  if (diskSectors * SECTOR < length) fail(reader, `COWD extent holds ${diskSectors} sectors, fewer than the descriptor's ${length / SECTOR}`, 'numSectors', diskSectors);
  b.metadata.push({ file: fileIndex, offset: 0, length: 2048, what: `${what} header` });
  mapGrains(b, reader, fileIndex, start, length, {
    gdOffset: gdSector * SECTOR,
    gdEntries,
    entryBytes: 4,
    gtEntries: 4096,
    grainBytes: granularity * SECTOR,
    gdEntry: (lo) => lo * SECTOR,
    gtEntry: (lo) => ({ kind: 'data', offset: lo * SECTOR }),
    sectorEntries: true,
    compressed: false,
    markers: false,
    what,
  });
}

/** Maps an ESXi space-efficient sparse extent (SESPARSE). */
function mapSeSparseExtent(b: Builder, reader: BlockReader, fileIndex: number, start: number, length: number, what: string): void {
  if (reader.size < SECTOR) fail(reader, `SESPARSE extent is too small (${reader.size} bytes)`, 'file.size', reader.size);
  const head = reader.read(0, SECTOR);
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const q = (i: number, field: string) => u64le(dv, i * 8, reader, `SESPARSE ${field}`);
  if (dv.getBigUint64(0, true) !== 0xcafebaben) fail(reader, `SESPARSE const header magic 0x${dv.getBigUint64(0, true).toString(16)} is wrong`, 'magic', dv.getBigUint64(0, true));
  if (dv.getBigUint64(8, true) !== 0x0000000200000001n) fail(reader, `SESPARSE version 0x${dv.getBigUint64(8, true).toString(16)} is not supported`, 'version', dv.getBigUint64(8, true));
  const capacity = q(2, 'capacity');
  const grainSize = q(3, 'grain_size');
  const gtSize = q(4, 'grain_table_size');
  if (grainSize !== 8) fail(reader, `SESPARSE grain size ${grainSize} sectors is not supported (8)`, 'grain_size', grainSize);
  if (gtSize !== 64) fail(reader, `SESPARSE grain table size ${gtSize} sectors is not supported (64)`, 'grain_table_size', gtSize);
  if (dv.getBigUint64(40, true) !== 0n) fail(reader, `SESPARSE flags 0x${dv.getBigUint64(40, true).toString(16)} are not supported`, 'flags', dv.getBigUint64(40, true));
  const volatileOffset = q(10, 'volatile_header_offset');
  const gdOffset = q(16, 'grain_dir_offset');
  const gdSize = q(17, 'grain_dir_size');
  const gtOffset = q(18, 'grain_tables_offset');
  const grainsOffset = q(24, 'grains_offset');
  for (let i = 6; i <= 9; i++) if (dv.getBigUint64(i * 8, true) !== 0n) fail(reader, `SESPARSE reserved field ${i - 5} is not zero`, 'reserved', i - 5);
  if (capacity * SECTOR < length) fail(reader, `SESPARSE capacity ${capacity} sectors is smaller than the descriptor's ${length / SECTOR}`, 'capacity', capacity);
  if (volatileOffset * SECTOR + SECTOR > reader.size) fail(reader, 'SESPARSE volatile header is past the end of the file', 'volatile_header_offset', volatileOffset);
  const vol = reader.read(volatileOffset * SECTOR, SECTOR);
  const vv = new DataView(vol.buffer, vol.byteOffset, vol.byteLength);
  if (vv.getBigUint64(0, true) !== 0xcafecafen) fail(reader, 'SESPARSE volatile header magic is wrong', 'volatile.magic', vv.getBigUint64(0, true));
  if (vv.getBigUint64(24, true) !== 0n) {
    fail(reader, 'SESPARSE image needs its journal replayed (it was not closed cleanly); vdboot cannot replay it: open it once in ESXi', 'replay_journal', vv.getBigUint64(24, true));
  }
  b.metadata.push({ file: fileIndex, offset: 0, length: SECTOR, what: `${what} const header` });
  b.metadata.push({ file: fileIndex, offset: volatileOffset * SECTOR, length: SECTOR, what: `${what} volatile header` });
  const gtBytes = gtSize * SECTOR;
  const grainBytes = grainSize * SECTOR;
  mapGrains(b, reader, fileIndex, start, length, {
    gdOffset: gdOffset * SECTOR,
    gdEntries: (gdSize * SECTOR) / 8,
    entryBytes: 8,
    gtEntries: gtBytes / 8,
    grainBytes,
    gdEntry: (lo, hi, i) => {
      if (hi !== 0x10000000) fail(reader, `SESPARSE grain directory entry ${i} (0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}) is invalid`, 'gd.entry', hi);
      return gtOffset * SECTOR + lo * gtBytes;
    },
    gtEntry: (lo, hi) => {
      const type = hi >>> 28;
      if (type === 1 || type === 2) return ZERO;
      if (type === 3) {
        // grain number: bits 48..59 are its low 12 bits, bits 0..47 the rest
        const grain = ((hi >>> 16) & 0xfff) + (((hi & 0xffff) * 2 ** 32 + lo) * 4096);
        return { kind: 'data', offset: grainsOffset * SECTOR + grain * grainBytes };
      }
      return fail(reader, `SESPARSE grain table entry 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} has an invalid type`, 'gt.entry', hi);
    },
    sectorEntries: false,
    compressed: false,
    markers: false,
    what,
  });
}

function readDescriptorText(reader: BlockReader, offset: number, length: number): string {
  const n = Math.min(length, MAX_DESCRIPTOR, Math.max(0, reader.size - offset));
  const bytes = reader.read(offset, n);
  let end = bytes.indexOf(0);
  if (end < 0) end = bytes.length;
  return utf8Decode(bytes.subarray(0, end));
}

export function openVmdk(file: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  if (file.size < 4) fail(file, `file is too small (${file.size} bytes)`, 'file.size', file.size);
  const head = file.read(0, Math.min(file.size, SECTOR));
  const magic = new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(0, true);
  const files = [ctx.path];
  let desc: VmdkDescriptor;
  let subformat: string;
  const b: Builder = { extents: [], metadata: [], compressed: [], hasParent: false, allocatedGrains: 0, zeroGrains: 0 };
  let size = 0;
  const details: Record<string, string | number | boolean> = {};
  const readers = new Map<number, BlockReader>();

  const parentOf = (d: VmdkDescriptor): boolean =>
    d.parentCid !== undefined && d.parentCid !== NO_PARENT_CID && d.parentFileNameHint !== undefined && d.parentFileNameHint !== '';

  if (magic === KDMV && !(headCapacity(head) === 0 && headDescOffset(head) > 0)) {
    // A hosted sparse file: it is the only extent, its embedded descriptor gives CID and parent.
    const h0 = parseSparseHeader(head, file);
    desc = h0.descriptorOffset > 0 && h0.descriptorSize > 0
      ? parseDescriptor(readDescriptorText(file, h0.descriptorOffset * SECTOR, h0.descriptorSize * SECTOR), file)
      : { extents: [] };
    b.hasParent = parentOf(desc);
    size = h0.capacity * SECTOR;
    if (!Number.isSafeInteger(size)) fail(file, `capacity ${h0.capacity} sectors is too large`, 'capacity', h0.capacity);
    const h = mapSparseExtent(b, file, 0, 0, size, 'sparse extent');
    subformat = h.compressAlgorithm === 1 ? 'streamOptimized' : desc.createType ?? 'monolithicSparse';
    details.grainSize = h.grainSize * SECTOR;
    details.version = h.version;
    details.zeroedGrains = (h.flags & FLAG_ZERO_GRAIN) !== 0;
    details.redundantGrainTables = (h.flags & FLAG_RGD) !== 0;
  } else if (magic === COWD) {
    desc = { extents: [] };
    const cap = new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(12, true);
    size = cap * SECTOR;
    mapCowdExtent(b, file, 0, 0, size, 'VMFSSPARSE extent');
    subformat = 'vmfsSparse';
  } else {
    const text = magic === KDMV
      ? readDescriptorText(file, headDescOffset(head) * SECTOR, MAX_DESCRIPTOR)
      : readDescriptorText(file, 0, file.size);
    if (magic !== KDMV && !looksLikeDescriptor(head)) fail(file, 'is neither a VMDK descriptor nor a sparse extent', 'magic', magic);
    desc = parseDescriptor(text, file);
    if (desc.extents.length === 0) fail(file, 'descriptor lists no extents', 'extents', 0);
    b.hasParent = parentOf(desc);
    subformat = desc.createType ?? 'unknown';
    const opened = new Map<string, number>();
    let grainSize: number | undefined;
    for (const e of desc.extents) {
      const len = e.sectors * SECTOR;
      const what = `extent "${e.file ?? e.type}" (descriptor line ${e.line})`;
      if (e.access === 'NOACCESS') fail(file, `${what} is NOACCESS: vdboot cannot read a disk with an inaccessible extent`, 'extent.access', e.access);
      if (len === 0) continue;
      if (!Number.isSafeInteger(size + len)) fail(file, 'extents add up to more than vdboot can address', 'extent.sectors', e.sectors);
      if (e.type === 'ZERO') {
        push(b, { kind: 'zero', start: size, length: len, why: 'zeroed' });
        size += len;
        continue;
      }
      if (e.type === 'VMFSRDM' || e.type === 'VMFSRAW') {
        fail(file, `${what} is a raw device mapping (${e.type}), which vdboot cannot follow`, 'extent.type', e.type);
      }
      if (!['FLAT', 'VMFS', 'SPARSE', 'VMFSSPARSE', 'SESPARSE'].includes(e.type)) fail(file, `${what} has unknown type ${e.type}`, 'extent.type', e.type);
      if (e.file === undefined || e.file === '') fail(file, `${what} of type ${e.type} names no file`, 'extent.file', e.type);
      let fi = opened.get(e.file);
      let reader: BlockReader;
      if (fi !== undefined && e.type !== 'FLAT' && e.type !== 'VMFS') {
        fail(file, `${what} uses a sparse extent file that an earlier extent line already uses`, 'extent.file', e.file);
      }
      if (fi === undefined) {
        reader = ctx.openFile(e.file);
        fi = files.length;
        files.push(e.file);
        opened.set(e.file, fi);
        readers.set(fi, reader);
      } else {
        reader = readers.get(fi)!;
      }
      if (e.type === 'FLAT' || e.type === 'VMFS') {
        const off = (e.offset ?? 0) * SECTOR;
        if (off + len > reader.size) {
          fail(file, `${what} needs bytes ${off}..${off + len} of ${e.file}, which has only ${reader.size} bytes`, 'extent.sectors', e.sectors);
        }
        push(b, { kind: 'data', start: size, length: len, file: fi, offset: off });
      } else if (e.type === 'SPARSE' || e.type === 'VMFSSPARSE') {
        const mb = reader.size >= 4 ? reader.read(0, 4) : undefined;
        const m = mb ? mb[0]! | (mb[1]! << 8) | (mb[2]! << 16) | (mb[3]! * 2 ** 24) : 0;
        if (m === COWD) mapCowdExtent(b, reader, fi, size, len, what);
        else {
          const h = mapSparseExtent(b, reader, fi, size, len, what);
          grainSize ??= h.grainSize * SECTOR;
          if (h.compressAlgorithm === 1) subformat = 'streamOptimized';
        }
      } else {
        mapSeSparseExtent(b, reader, fi, size, len, what);
      }
      size += len;
    }
    if (grainSize !== undefined) details.grainSize = grainSize;
    details.extents = desc.extents.length;
  }
  if (desc.cid !== undefined) details.cid = desc.cid;
  details.allocatedGrains = b.allocatedGrains;
  details.zeroGrains = b.zeroGrains;
  details.compressedGrains = b.compressed.length;

  const layer: ImageLayer & LayerMetadata = {
    format: 'vmdk',
    subformat,
    size,
    files,
    extents: b.extents,
    metadata: b.metadata,
    details,
  };
  if (desc.cid !== undefined) layer.id = desc.cid;
  if (b.hasParent) {
    const parentCid = desc.parentCid!;
    details.parentCid = parentCid;
    details.parentFileNameHint = desc.parentFileNameHint!;
    const ref: ParentRef = {
      paths: parentCandidates(desc.parentFileNameHint!),
      verify(parent: ImageLayer): void {
        if (parent.format === 'vmdk' && parent.id !== parentCid) {
          throw new FormatError(
            `${file.name}: its parent ${parent.files[0] ?? ''} has CID ${parent.id ?? '(none)'}, but the child expects parentCID ${parentCid}: the parent was changed after the child was made`,
            'parentCID', parentCid,
          );
        }
      },
    };
    layer.parent = ref;
  }
  if (b.compressed.length > 0) layer.readUnmappable = compressedReader(file, size, b.compressed);
  return layer;

  function headCapacity(h: Uint8Array): number {
    return h.length >= 20 ? Number(new DataView(h.buffer, h.byteOffset, h.byteLength).getBigUint64(12, true)) : -1;
  }
  function headDescOffset(h: Uint8Array): number {
    if (h.length < 36) return 0;
    const v = new DataView(h.buffer, h.byteOffset, h.byteLength).getBigUint64(28, true);
    return v > BigInt(Number.MAX_SAFE_INTEGER) / BigInt(SECTOR) ? 0 : Number(v);
  }
}

function compressedReader(file: BlockReader, size: number, grains: CompressedGrain[]): (start: number, length: number) => Uint8Array {
  let cachedStart = -1;
  let cached: Uint8Array | undefined;
  const find = (pos: number): CompressedGrain | undefined => {
    let lo = 0, hi = grains.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const g = grains[mid]!;
      if (pos < g.start) hi = mid - 1;
      else if (pos >= g.start + g.length) lo = mid + 1;
      else return g;
    }
    return undefined;
  };
  const decode = (g: CompressedGrain): Uint8Array => {
    if (g.start === cachedStart && cached) return cached;
    const what = `${g.reader.name}: compressed grain at virtual offset ${g.start}`;
    let data: Uint8Array;
    if (g.markers) {
      if (g.offset + 12 > g.reader.size) throw new FormatError(`${what}: its marker is past the end of the file`, 'grain.offset', g.offset);
      const m = g.reader.read(g.offset, 12);
      const len = new DataView(m.buffer, m.byteOffset, 12).getUint32(8, true);
      if (len === 0 || len > 2 * g.grainBytes + 1024 || g.offset + 12 + len > g.reader.size) {
        throw new FormatError(`${what}: marker gives ${len} compressed bytes, which do not fit (grain ${g.grainBytes} bytes, file ${g.reader.size} bytes)`, 'grain.size', len);
      }
      data = g.reader.read(g.offset + 12, len);
    } else {
      data = g.reader.read(g.offset, Math.min(2 * g.grainBytes, g.reader.size - g.offset));
    }
    let out = inflateZlib(data, g.grainBytes, what);
    if (out.length < g.grainBytes) { const full = new Uint8Array(g.grainBytes); full.set(out); out = full; }
    cachedStart = g.start;
    cached = out;
    return out;
  };
  return (start: number, length: number): Uint8Array => {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > size) {
      throw new FormatError(`${file.name}: read of ${length} bytes at ${start} is outside the ${size}-byte disk`, 'offset', start);
    }
    const out = new Uint8Array(length);
    let p = start;
    while (p < start + length) {
      const g = find(p);
      if (!g) throw new FormatError(`${file.name}: virtual offset ${p} is not a compressed grain`, 'offset', p);
      const n = Math.min(g.start + g.length, start + length) - p;
      out.set(decode(g).subarray(p - g.start, p - g.start + n), p - start);
      p += n;
    }
    return out;
  };
}


/**
 * Where to look for a parent the image names: the name as written, then (for a path
 * written on another machine, e.g. `C:\\VMs\\base.vmdk` or `/var/lib/libvirt/images/base.qcow2`)
 * its last component next to the child.
 */
function parentCandidates(name: string): string[] {
  const base = name.slice(Math.max(name.lastIndexOf('/'), name.lastIndexOf('\\')) + 1);
  const asWritten = /^[A-Za-z]:[\\/]/.test(name) || name.includes('\\') ? [] : [name];
  return base !== '' && base !== name ? [...asWritten, base] : [name];
}

export const vmdkFormat: FormatReader = {
  format: 'vmdk',
  probe: (head) => probeVmdk(head),
  open: openVmdk,
};
