/**
 * VDI (VirtualBox Disk Image) as LayerExtents: normal (dynamic), fixed, differencing
 * and undo images, header versions 1.x (VirtualBox's and qemu's, with or without the
 * LCHS geometry extension) and 0.x (old VirtualBox).
 *
 * The block map has one 32-bit entry per block: a block number in the data area,
 * 0xffffffff (free: never written; in a differencing image it comes from the parent)
 * or 0xfffffffe (zero: discarded, reads as zeros). A block's data starts after its
 * `block_extra` bytes.
 *
 * A differencing VDI stores no parent path, only the parent's UUID (uuid_link). The
 * parent candidates are the other .vdi files in the child's directory when the
 * OpenContext can list it (`listDir`); otherwise ParentRef.paths is empty and the
 * parent cannot be found by the chain resolver. verify() checks the UUID either way.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import type { LayerMetadata } from './extent-ops.ts';
import type { FormatReader, ImageLayer, OpenContext, ParentRef } from './image.ts';
import type { LayerExtent } from './extent-map.ts';

const SIGNATURE = 0xbeda107f;
const BLOCK_FREE = 0xffffffff;
const BLOCK_ZERO = 0xfffffffe;

const TYPE_NAMES: Record<number, string> = { 1: 'dynamic', 2: 'fixed', 3: 'undo', 4: 'differencing' };

export interface VdiHeader {
  version: number;
  headerSize: number;
  imageType: number;
  flags: number;
  offsetBmap: number;
  offsetData: number;
  sectorSize: number;
  diskSize: number;
  blockSize: number;
  blockExtra: number;
  blocksInImage: number;
  blocksAllocated: number;
  uuidImage: string;
  uuidLastSnap: string;
  uuidLink: string;
  uuidParent: string;
}

function fail(file: BlockReader, msg: string, field: string, value: string | number | bigint): never {
  throw new FormatError(`${file.name}: VDI ${msg}`, field, value);
}

/** A VDI UUID as text (VirtualBox stores RTUUIDs with the first three fields little-endian). */
export function vdiUuid(b: Uint8Array): string {
  const h = (i: number) => b[i]!.toString(16).padStart(2, '0');
  const part = (idx: number[]) => idx.map(h).join('');
  return `${part([3, 2, 1, 0])}-${part([5, 4])}-${part([7, 6])}-${part([8, 9])}-${part([10, 11, 12, 13, 14, 15])}`;
}

const NIL_UUID = '00000000-0000-0000-0000-000000000000';

export function probeVdi(head: Uint8Array): boolean {
  if (head.length < 0x48) return false;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return dv.getUint32(0x40, true) === SIGNATURE;
}

/** Parses the pre-header and header (`bytes` = the first 512 bytes or the whole smaller file). */
export function parseVdiHeader(bytes: Uint8Array, file: BlockReader): VdiHeader {
  if (bytes.length < 0x48) fail(file, `header truncated (${bytes.length} bytes)`, 'header', bytes.length);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sig = dv.getUint32(0x40, true);
  if (sig !== SIGNATURE) fail(file, `signature 0x${sig.toString(16)} is wrong: this is not a VDI image`, 'signature', sig);
  const version = dv.getUint32(0x44, true);
  const major = version >>> 16;
  const need = (n: number) => { if (bytes.length < n) fail(file, `header truncated (${bytes.length} bytes, version ${major}.${version & 0xffff} needs ${n})`, 'header', bytes.length); };
  if (major === 1) {
    need(0x1c8);
    const headerSize = dv.getUint32(0x48, true);
    if (headerSize < 0x180) fail(file, `header_size ${headerSize} is too small for a version 1 header (at least 384)`, 'header_size', headerSize);
    return {
      version,
      headerSize,
      imageType: dv.getUint32(0x4c, true),
      flags: dv.getUint32(0x50, true),
      offsetBmap: dv.getUint32(0x154, true),
      offsetData: dv.getUint32(0x158, true),
      sectorSize: dv.getUint32(0x168, true),
      diskSize: u64(dv, 0x170, file, 'disk_size'),
      blockSize: dv.getUint32(0x178, true),
      blockExtra: dv.getUint32(0x17c, true),
      blocksInImage: dv.getUint32(0x180, true),
      blocksAllocated: dv.getUint32(0x184, true),
      uuidImage: vdiUuid(bytes.subarray(0x188, 0x198)),
      uuidLastSnap: vdiUuid(bytes.subarray(0x198, 0x1a8)),
      uuidLink: vdiUuid(bytes.subarray(0x1a8, 0x1b8)),
      uuidParent: vdiUuid(bytes.subarray(0x1b8, 0x1c8)),
    };
  }
  if (major === 0) {
    // Version 0: no offsets in the header; the block map follows the header, the data the map.
    need(0x48 + 348);
    const blocks = dv.getUint32(0x48 + 0x124, true);
    const offsetBmap = 0x48 + 348;
    return {
      version,
      headerSize: 348,
      imageType: dv.getUint32(0x48, true),
      flags: dv.getUint32(0x4c, true),
      offsetBmap,
      offsetData: offsetBmap + blocks * 4,
      sectorSize: dv.getUint32(0x48 + 0x114, true),
      diskSize: u64(dv, 0x48 + 0x118, file, 'disk_size'),
      blockSize: dv.getUint32(0x48 + 0x120, true),
      blockExtra: 0,
      blocksInImage: blocks,
      blocksAllocated: dv.getUint32(0x48 + 0x128, true),
      uuidImage: vdiUuid(bytes.subarray(0x48 + 0x12c, 0x48 + 0x13c)),
      uuidLastSnap: vdiUuid(bytes.subarray(0x48 + 0x13c, 0x48 + 0x14c)),
      uuidLink: vdiUuid(bytes.subarray(0x48 + 0x14c, 0x48 + 0x15c)),
      uuidParent: NIL_UUID,
    };
  }
  return fail(file, `header version ${major}.${version & 0xffff} is not supported (vdboot reads 0.x and 1.x)`, 'version', version);
}

function u64(dv: DataView, at: number, file: BlockReader, field: string): number {
  const v = dv.getBigUint64(at, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(file, `header field ${field} = ${v} is too large`, field, v);
  return Number(v);
}

export function openVdi(file: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  const head = file.read(0, Math.min(512, file.size));
  const h = parseVdiHeader(head, file);
  const typeName = TYPE_NAMES[h.imageType];
  if (!typeName) fail(file, `image type ${h.imageType} is unknown (1 normal, 2 fixed, 3 undo, 4 differencing)`, 'image_type', h.imageType);
  const differencing = h.imageType === 3 || h.imageType === 4;
  if (h.sectorSize !== 512 && h.sectorSize !== 0) fail(file, `sector size ${h.sectorSize} is not supported (512)`, 'sector_size', h.sectorSize);
  if (h.blockSize < 512 || h.blockSize % 512 !== 0 || h.blockSize > 256 * 1024 * 1024) {
    fail(file, `block size ${h.blockSize} is invalid (a multiple of 512 bytes up to 256 MiB)`, 'block_size', h.blockSize);
  }
  if (h.blockExtra % 512 !== 0 || h.blockExtra > 256 * 1024 * 1024) fail(file, `block_extra ${h.blockExtra} is invalid (a multiple of 512 bytes)`, 'block_extra', h.blockExtra);
  const bs = h.blockSize;
  if (h.diskSize > h.blocksInImage * bs) {
    fail(file, `disk size ${h.diskSize} is larger than its ${h.blocksInImage} blocks of ${bs} bytes`, 'disk_size', h.diskSize);
  }
  const bmapBytes = h.blocksInImage * 4;
  if (h.offsetBmap < 0x48 || h.offsetBmap + bmapBytes > file.size) {
    fail(file, `block map (${h.blocksInImage} entries at offset ${h.offsetBmap}) is past the end of the file (${file.size} bytes)`, 'offset_bmap', h.offsetBmap);
  }
  if (h.offsetData < h.offsetBmap + bmapBytes) {
    fail(file, `data offset ${h.offsetData} lies inside the block map (which ends at ${h.offsetBmap + bmapBytes})`, 'offset_data', h.offsetData);
  }

  const size = h.diskSize;
  const blocksUsed = Math.ceil(size / bs);
  const total = bs + h.blockExtra;
  const maxBlocks = Math.floor(Math.max(0, file.size - h.offsetData) / total) + 1;
  const extents: LayerExtent[] = [];
  const push = (e: LayerExtent) => {
    const last = extents[extents.length - 1];
    if (last && last.kind === e.kind && last.start + last.length === e.start) {
      if (e.kind === 'data' && last.kind === 'data' && last.offset + last.length === e.offset) { last.length += e.length; return; }
      if (e.kind === 'zero' && last.kind === 'zero' && last.why === e.why) { last.length += e.length; return; }
      if (e.kind === 'parent') { last.length += e.length; return; }
    }
    extents.push(e);
  };
  let allocated = 0, zeroBlocks = 0;
  const chunk = 1 << 18; // entries per read
  for (let first = 0; first < blocksUsed; first += chunk) {
    const n = Math.min(chunk, blocksUsed - first);
    const raw = file.read(h.offsetBmap + first * 4, n * 4);
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    for (let i = 0; i < n; i++) {
      const b = first + i;
      const start = b * bs;
      const len = Math.min(bs, size - start);
      const entry = dv.getUint32(i * 4, true);
      if (entry === BLOCK_FREE) {
        push(differencing ? { kind: 'parent', start, length: len } : { kind: 'zero', start, length: len, why: 'unallocated' });
      } else if (entry === BLOCK_ZERO) {
        zeroBlocks++;
        push({ kind: 'zero', start, length: len, why: 'zeroed' });
      } else {
        if (entry >= maxBlocks) {
          fail(file, `block ${b} is stored as data block ${entry}, past the end of the file (${file.size} bytes holds at most ${maxBlocks - 1} blocks)`, 'block_map', entry);
        }
        const offset = h.offsetData + entry * total + h.blockExtra;
        if (offset + len > file.size) fail(file, `block ${b} (data block ${entry} at offset ${offset}) is past the end of the file (${file.size} bytes)`, 'block_map', entry);
        allocated++;
        push({ kind: 'data', start, length: len, file: 0, offset });
      }
    }
  }

  const layer: ImageLayer & LayerMetadata = {
    format: 'vdi',
    subformat: typeName,
    size,
    files: [ctx.path],
    extents,
    id: h.uuidImage,
    metadata: [{ file: 0, offset: 0, length: h.offsetData, what: 'header and block map' }],
    details: {
      version: `${h.version >>> 16}.${h.version & 0xffff}`,
      blockSize: bs,
      blockExtra: h.blockExtra,
      blocks: h.blocksInImage,
      allocatedBlocks: allocated,
      zeroBlocks,
      uuid: h.uuidImage,
      ...(differencing ? { parentUuid: h.uuidLink } : {}),
    },
  };
  if (differencing) {
    if (h.uuidLink === NIL_UUID) fail(file, 'differencing image has no parent UUID (uuid_link is nil)', 'uuid_link', h.uuidLink);
    layer.parent = vdiParentRef(file, ctx, h.uuidLink);
  }
  return layer;
}

function vdiParentRef(file: BlockReader, ctx: OpenContext, uuid: string): ParentRef {
  const listDir = ctx.listDir;
  const self = ctx.path.slice(ctx.path.lastIndexOf('/') + 1);
  const paths = listDir ? listDir.call(ctx).filter((n) => /\.vdi$/i.test(n) && n !== self).sort() : [];
  return {
    paths,
    format: 'vdi',
    verify(parent: ImageLayer): void {
      if (parent.format !== 'vdi' || parent.id !== uuid) {
        throw new FormatError(
          `${file.name}: its parent must be the VDI with UUID ${uuid}, but ${parent.files[0] ?? 'the candidate'} is ${parent.format === 'vdi' ? `UUID ${parent.id}` : `a ${parent.format} image`}`,
          'uuid_link', uuid,
        );
      }
    },
  };
}

export const vdiFormat: FormatReader = {
  format: 'vdi',
  probe: (head) => probeVdi(head),
  open: openVdi,
};
