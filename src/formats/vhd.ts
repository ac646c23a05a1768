/**
 * VHD (Virtual PC / Hyper-V "vpc"): fixed, dynamic and differencing images.
 *
 * Layout (all fields big-endian):
 * - a 512-byte footer at the end of the file (and a copy at offset 0 of dynamic and
 *   differencing images), with a one's-complement checksum;
 * - dynamic/differencing: a 1024-byte dynamic header ("cxsparse") at footer.dataOffset,
 *   with its own checksum, the BAT (one 32-bit sector number per block, 0xFFFFFFFF =
 *   absent), and per allocated block a sector bitmap (1 bit per 512-byte sector, most
 *   significant bit first, padded to 512 bytes) followed by the block's data;
 * - differencing: parent UUID, parent name and parent locators (W2ku absolute, W2ru
 *   relative UTF-16LE Windows paths; MacX a file URL) in the dynamic header.
 *
 * Virtual size: Virtual PC (creator "vpc ") and older qemu ("qemu") show the disk as
 * cylinders × heads × sectors of the CHS geometry; Hyper-V ("win "), Disk2vhd ("d2v " or "d2v\0"),
 * qemu with force_size ("qem2"), XenServer ("tap\0"), XenConverter ("CTXS") and Azure ("wa\0\0") use the
 * footer's current_size; so does any image whose geometry is the maximum 65535/16/255,
 * where the geometry cannot express the size.
 *
 * Sector bitmaps: a set bit means the sector's data is in this file. In a differencing
 * image a clear bit means "read the parent", so a partially present block maps run by
 * run; in a dynamic image a clear bit reads as zeros.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import type { MetadataRange, LayerMetadata } from './extent-ops.ts';
import { mergeExtents } from './extent-ops.ts';
import type { FormatReader, ImageLayer, OpenContext, ParentRef } from './image.ts';
import type { LayerExtent } from './extent-map.ts';
import { utf16leDecode, utf8Decode } from './text.ts';

const SECTOR = 512;
const FOOTER_SIZE = 512;
const DYN_HEADER_SIZE = 1024;
const BAT_UNUSED = 0xffffffff;
const MAX_GEOMETRY_SECTORS = 65535 * 16 * 255;
/** The VHD format's own limit (about 2040 GiB). */
const MAX_SIZE = 0xff000000 * SECTOR;
/** Refuse BATs larger than this many entries (64 MiB of table). */
const MAX_BAT_ENTRIES = 1 << 24;

export const VHD_DISK_TYPES: Record<number, string> = { 2: 'fixed', 3: 'dynamic', 4: 'differencing' };

/** Creator applications whose images are sized by current_size, not CHS geometry. */
const SIZED_BY_CURRENT_SIZE = ['win ', 'qem2', 'd2v ', 'd2v\0', 'CTXS', 'tap\0', 'wa\0\0'];

export interface VhdFooter {
  features: number;
  version: number;
  /** null when 0xFFFFFFFFFFFFFFFF (fixed images) */
  dataOffset: number | null;
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSize: number;
  currentSize: number;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  diskType: number;
  checksum: number;
  computedChecksum: number;
  uuid: string;
  savedState: number;
}

export interface VhdParentLocator {
  platformCode: string;
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
}

export interface VhdDynamicHeader {
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  computedChecksum: number;
  parentUuid: string;
  parentTimestamp: number;
  parentName: string;
  locators: VhdParentLocator[];
}

function ascii(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return s;
}

/** The one's complement of the byte sum, with the checksum field (4 bytes at `at`) taken as zero. */
export function vhdChecksum(bytes: Uint8Array, at: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) if (i < at || i >= at + 4) sum += bytes[i]!;
  return ~sum >>> 0;
}

function u64(dv: DataView, off: number, name: string, field: string): number {
  const v = dv.getBigUint64(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${name}: VHD ${field} ${v} is too large`, field, v);
  return Number(v);
}

export function formatUuid(b: Uint8Array): string {
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

export function parseVhdFooter(bytes: Uint8Array, name: string): VhdFooter {
  if (bytes.length < FOOTER_SIZE || ascii(bytes.subarray(0, 8)) !== 'conectix') {
    throw new FormatError(`${name}: no VHD footer ("conectix" cookie)`, 'footer.cookie');
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, FOOTER_SIZE);
  const rawDataOffset = dv.getBigUint64(16);
  return {
    features: dv.getUint32(8),
    version: dv.getUint32(12),
    dataOffset: rawDataOffset === 0xffffffffffffffffn ? null : u64(dv, 16, name, 'footer.data_offset'),
    creatorApp: ascii(bytes.subarray(28, 32)),
    creatorVersion: dv.getUint32(32),
    creatorOs: ascii(bytes.subarray(36, 40)),
    originalSize: u64(dv, 40, name, 'footer.original_size'),
    currentSize: u64(dv, 48, name, 'footer.current_size'),
    cylinders: dv.getUint16(56),
    heads: bytes[58]!,
    sectorsPerTrack: bytes[59]!,
    diskType: dv.getUint32(60),
    checksum: dv.getUint32(64),
    computedChecksum: vhdChecksum(bytes.subarray(0, FOOTER_SIZE), 64),
    uuid: formatUuid(bytes.subarray(68, 84)),
    savedState: bytes[84]!,
  };
}

export function parseVhdDynamicHeader(bytes: Uint8Array, name: string): VhdDynamicHeader {
  if (bytes.length < DYN_HEADER_SIZE || ascii(bytes.subarray(0, 8)) !== 'cxsparse') {
    throw new FormatError(`${name}: the VHD dynamic header has no "cxsparse" cookie; the footer's data offset is wrong or the image is damaged`, 'header.cookie');
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, DYN_HEADER_SIZE);
  // parent name: 512 bytes of UTF-16 big-endian
  const nameBytes = new Uint8Array(512);
  for (let i = 0; i + 1 < 512; i += 2) {
    nameBytes[i] = bytes[64 + i + 1]!;
    nameBytes[i + 1] = bytes[64 + i]!;
  }
  let parentName = utf16leDecode(nameBytes);
  const nul = parentName.indexOf('\0');
  if (nul >= 0) parentName = parentName.slice(0, nul);
  const locators: VhdParentLocator[] = [];
  for (let i = 0; i < 8; i++) {
    const o = 576 + i * 24;
    const code = ascii(bytes.subarray(o, o + 4));
    if (dv.getUint32(o) === 0) continue;
    locators.push({
      platformCode: code,
      dataSpace: dv.getUint32(o + 4),
      dataLength: dv.getUint32(o + 8),
      dataOffset: u64(dv, o + 16, name, 'header.parent_locator.data_offset'),
    });
  }
  return {
    tableOffset: u64(dv, 16, name, 'header.table_offset'),
    headerVersion: dv.getUint32(24),
    maxTableEntries: dv.getUint32(28),
    blockSize: dv.getUint32(32),
    checksum: dv.getUint32(36),
    computedChecksum: vhdChecksum(bytes.subarray(0, DYN_HEADER_SIZE), 36),
    parentUuid: formatUuid(bytes.subarray(40, 56)),
    parentTimestamp: dv.getUint32(56),
    parentName,
    locators,
  };
}

/** The virtual size as qemu, Virtual PC and Hyper-V agree on it (see the file comment). */
export function vhdVirtualSize(f: VhdFooter): { size: number; rule: string } {
  const chsSectors = f.cylinders * f.heads * f.sectorsPerTrack;
  const useChs = !SIZED_BY_CURRENT_SIZE.includes(f.creatorApp);
  if (!useChs) return { size: f.currentSize, rule: `current_size (creator "${f.creatorApp.replace('\0', '\\0')}")` };
  if (chsSectors === MAX_GEOMETRY_SECTORS) return { size: f.currentSize, rule: 'current_size (maximum CHS geometry)' };
  return { size: chsSectors * SECTOR, rule: `CHS geometry ${f.cylinders}/${f.heads}/${f.sectorsPerTrack} (creator "${f.creatorApp}")` };
}

function readFooter(file: BlockReader): VhdFooter {
  const name = file.name;
  if (file.size < FOOTER_SIZE) throw new FormatError(`${name}: ${file.size} bytes is too small for a VHD`, 'size', file.size);
  const tryAt = (off: number): VhdFooter | undefined => {
    const b = file.read(off, FOOTER_SIZE);
    return ascii(b.subarray(0, 8)) === 'conectix' ? parseVhdFooter(b, name) : undefined;
  };
  const end = tryAt(file.size - FOOTER_SIZE);
  if (end && end.checksum === end.computedChecksum) return end;
  const head = file.size >= 2 * FOOTER_SIZE ? tryAt(0) : undefined;
  if (head && head.checksum === head.computedChecksum && head.diskType !== 2) return head;
  const bad = end ?? head;
  if (bad) {
    throw new FormatError(
      `${name}: the VHD footer checksum is wrong (stored 0x${bad.checksum.toString(16)}, computed 0x${bad.computedChecksum.toString(16)}); the image is damaged. Try "qemu-img check" on a copy`,
      'footer.checksum', bad.checksum,
    );
  }
  throw new FormatError(`${name}: no VHD footer ("conectix" cookie) at the start or the end of the file`, 'footer.cookie');
}

/** Candidate parent paths from the locators, relative ones first, then the name next to the child. */
function parentPaths(file: BlockReader, h: VhdDynamicHeader): string[] {
  const rel: string[] = [];
  const abs: string[] = [];
  for (const loc of h.locators) {
    if (loc.dataLength === 0 || loc.dataLength > 64 * 1024) continue;
    if (loc.dataOffset + loc.dataLength > file.size) continue;
    const data = file.read(loc.dataOffset, loc.dataLength);
    let path: string;
    if (loc.platformCode === 'W2ku' || loc.platformCode === 'W2ru') path = utf16leDecode(data);
    else if (loc.platformCode === 'Wi2k' || loc.platformCode === 'Wi2r') path = utf8Decode(data);
    else if (loc.platformCode === 'MacX') {
      path = decodeURIComponentSafe(utf8Decode(data).replace(/^file:\/\/(localhost)?/, ''));
    } else continue;
    path = path.replace(/\0+$/, '');
    if (path === '') continue;
    if (loc.platformCode === 'MacX') {
      abs.push(path);
      continue;
    }
    const posix = path.replace(/\\/g, '/');
    if (loc.platformCode === 'W2ru' || loc.platformCode === 'Wi2r') rel.push(posix);
    else abs.push(posix.replace(/^[A-Za-z]:/, ''));
  }
  const base = (p: string) => p.slice(p.lastIndexOf('/') + 1);
  const out = [...rel];
  for (const p of abs) out.push(base(p));
  if (h.parentName) out.push(base(h.parentName.replace(/\\/g, '/')));
  for (const p of abs) if (p.startsWith('/')) out.push(p);
  return out.filter((p, i) => p !== '' && out.indexOf(p) === i);
}

function decodeURIComponentSafe(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

function openVhd(file: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  const name = ctx.path;
  const f = readFooter(file);
  const typeName = VHD_DISK_TYPES[f.diskType];
  if (!typeName) throw new FormatError(`${name}: VHD disk type ${f.diskType} is unknown (2 fixed, 3 dynamic, 4 differencing)`, 'footer.disk_type', f.diskType);
  const { size, rule } = vhdVirtualSize(f);
  if (size % SECTOR !== 0 || size > MAX_SIZE) {
    throw new FormatError(`${name}: VHD virtual size ${size} is not a multiple of 512 or exceeds the format's 2040 GiB`, 'footer.current_size', size);
  }
  const details: Record<string, string | number | boolean> = {
    'disk type': typeName,
    'creator application': f.creatorApp.replace(/\0/g, '\\0'),
    'creator version': `0x${f.creatorVersion.toString(16)}`,
    'creator host': f.creatorOs.replace(/\0/g, '\\0'),
    'size rule': rule,
    geometry: `${f.cylinders}/${f.heads}/${f.sectorsPerTrack}`,
    'current size': f.currentSize,
    uuid: f.uuid,
  };
  if (f.savedState) details['saved state'] = true;
  const footerRange: MetadataRange = { file: 0, offset: file.size - FOOTER_SIZE, length: FOOTER_SIZE, what: 'footer' };

  if (f.diskType === 2) {
    if (size > file.size - FOOTER_SIZE) {
      throw new FormatError(`${name}: fixed VHD of ${size} bytes but the file holds only ${file.size - FOOTER_SIZE} bytes of data: it is truncated`, 'footer.current_size', size);
    }
    return {
      format: 'vhd', subformat: 'fixed', size, files: [ctx.path], id: f.uuid, details,
      extents: size > 0 ? [{ kind: 'data', start: 0, length: size, file: 0, offset: 0 }] : [],
      metadata: [footerRange],
    };
  }

  if (f.dataOffset === null || f.dataOffset + DYN_HEADER_SIZE > file.size) {
    throw new FormatError(`${name}: the VHD footer's dynamic header offset ${f.dataOffset ?? '0xFFFFFFFFFFFFFFFF'} is outside the ${file.size}-byte file`, 'footer.data_offset', f.dataOffset ?? -1);
  }
  const h = parseVhdDynamicHeader(file.read(f.dataOffset, DYN_HEADER_SIZE), name);
  if (h.checksum !== h.computedChecksum) {
    throw new FormatError(
      `${name}: the VHD dynamic header checksum is wrong (stored 0x${h.checksum.toString(16)}, computed 0x${h.computedChecksum.toString(16)}); the image is damaged`,
      'header.checksum', h.checksum,
    );
  }
  const bs = h.blockSize;
  if (bs < SECTOR || bs > 256 * 1024 * 1024 || (bs & (bs - 1)) !== 0) {
    throw new FormatError(`${name}: VHD block size ${bs} is not a power of two between 512 bytes and 256 MiB`, 'header.block_size', bs);
  }
  const blocks = Math.ceil(size / bs);
  if (h.maxTableEntries < blocks) {
    throw new FormatError(`${name}: the VHD BAT has ${h.maxTableEntries} entries, too few for ${size} bytes in ${bs}-byte blocks (${blocks} needed)`, 'header.max_table_entries', h.maxTableEntries);
  }
  if (blocks > MAX_BAT_ENTRIES) throw new FormatError(`${name}: ${blocks} VHD blocks is more than vdboot reads (${MAX_BAT_ENTRIES})`, 'header.max_table_entries', blocks);
  const batBytes = blocks * 4;
  if (h.tableOffset + batBytes > file.size) {
    throw new FormatError(`${name}: the VHD BAT (${batBytes} bytes at ${h.tableOffset}) runs past the end of the ${file.size}-byte file: it is truncated`, 'header.table_offset', h.tableOffset);
  }
  const bat = file.read(h.tableOffset, batBytes);
  const batView = new DataView(bat.buffer, bat.byteOffset, bat.byteLength);
  const bitmapSize = Math.ceil(bs / SECTOR / 8 / SECTOR) * SECTOR;
  const differencing = f.diskType === 4;
  const metadata: MetadataRange[] = [
    footerRange,
    { file: 0, offset: f.dataOffset, length: DYN_HEADER_SIZE, what: 'dynamic header' },
    { file: 0, offset: h.tableOffset, length: Math.ceil(h.maxTableEntries * 4 / SECTOR) * SECTOR, what: 'BAT' },
  ];
  if (f.dataOffset >= FOOTER_SIZE) metadata.push({ file: 0, offset: 0, length: FOOTER_SIZE, what: 'footer copy' });
  for (const loc of h.locators) {
    if (loc.dataLength > 0) metadata.push({ file: 0, offset: loc.dataOffset, length: loc.dataLength, what: `parent locator ${loc.platformCode}` });
  }

  const absent: LayerExtent['kind'] = differencing ? 'parent' : 'zero';
  const gap = (start: number, length: number): LayerExtent =>
    absent === 'parent' ? { kind: 'parent', start, length } : { kind: 'zero', start, length, why: 'unallocated' };
  const extents: LayerExtent[] = [];
  let allocated = 0;
  let partial = 0;
  for (let k = 0; k < blocks; k++) {
    const start = k * bs;
    const len = Math.min(bs, size - start);
    const entry = batView.getUint32(k * 4);
    if (entry === BAT_UNUSED) {
      extents.push(gap(start, len));
      continue;
    }
    allocated++;
    const blockOff = entry * SECTOR;
    if (blockOff + bitmapSize > file.size) {
      throw new FormatError(`${name}: VHD block ${k} (BAT entry ${entry}) starts past the end of the ${file.size}-byte file: the image is truncated or its BAT is damaged`, 'bat', entry);
    }
    metadata.push({ file: 0, offset: blockOff, length: bitmapSize, what: `block ${k} sector bitmap` });
    const dataOff = blockOff + bitmapSize;
    const bitmap = file.read(blockOff, bitmapSize);
    const sectors = len / SECTOR;
    let s = 0;
    let runs = 0;
    while (s < sectors) {
      const byte = bitmap[s >> 3]!;
      // fast path over whole bitmap bytes
      if ((s & 7) === 0 && s + 8 <= sectors && (byte === 0xff || byte === 0)) {
        const present = byte === 0xff;
        let e = s + 8;
        while (e + 8 <= sectors && bitmap[e >> 3] === byte) e += 8;
        while (e < sectors && ((bitmap[e >> 3]! >> (7 - (e & 7))) & 1) === (present ? 1 : 0)) e++;
        pushRun(extents, present, start + s * SECTOR, (e - s) * SECTOR, dataOff + s * SECTOR, gap);
        runs++;
        s = e;
        continue;
      }
      const present = ((byte >> (7 - (s & 7))) & 1) === 1;
      let e = s + 1;
      while (e < sectors && ((bitmap[e >> 3]! >> (7 - (e & 7))) & 1) === (present ? 1 : 0)) e++;
      pushRun(extents, present, start + s * SECTOR, (e - s) * SECTOR, dataOff + s * SECTOR, gap);
      runs++;
      s = e;
    }
    if (runs > 1) partial++;
  }
  details['block size'] = bs;
  details['BAT entries'] = h.maxTableEntries;
  details['allocated blocks'] = allocated;
  if (partial) details['partially present blocks'] = partial;

  let parent: ParentRef | undefined;
  if (differencing) {
    details['parent uuid'] = h.parentUuid;
    if (h.parentName) details['parent name'] = h.parentName;
    const locs = h.locators.map((l) => l.platformCode).join(', ');
    if (locs) details['parent locators'] = locs;
    const paths = parentPaths(file, h);
    parent = {
      paths,
      verify(p: ImageLayer) {
        if (p.format !== 'vhd') {
          throw new FormatError(`${name}: its parent must be a VHD, but ${p.files[0]} is ${p.format}`, 'parent.format', p.format);
        }
        if (p.id !== h.parentUuid) {
          throw new FormatError(
            `${name}: ${p.files[0]} is not its parent: the child expects parent UUID ${h.parentUuid}, the file has ${p.id ?? 'none'}`,
            'parent.uuid', p.id ?? '',
          );
        }
      },
    };
  }
  return {
    format: 'vhd',
    subformat: typeName,
    size,
    files: [ctx.path],
    id: f.uuid,
    extents: mergeExtents(extents),
    ...(parent ? { parent } : {}),
    details,
    metadata,
  };
}

function pushRun(
  out: LayerExtent[], present: boolean, start: number, length: number, offset: number,
  gap: (start: number, length: number) => LayerExtent,
): void {
  out.push(present ? { kind: 'data', start, length, file: 0, offset } : gap(start, length));
}

export const vhdFormat: FormatReader = {
  format: 'vhd',
  probe(head: Uint8Array, file: BlockReader): boolean {
    if (head.length >= 8 && ascii(head.subarray(0, 8)) === 'conectix') return true;
    if (file.size < FOOTER_SIZE) return false;
    return ascii(file.read(file.size - FOOTER_SIZE, 8)) === 'conectix';
  },
  open: openVhd,
};
