/**
 * QCOW version 1 (qemu's first copy-on-write format, `qemu-img create -f qcow`) as
 * LayerExtents.
 *
 * The layout (all fields big-endian):
 *
 *   0  magic "QFI\xfb"          4  version = 1
 *   8  backing_file_offset u64  16 backing_file_size u32   20 mtime u32
 *   24 size u64 (bytes)         32 cluster_bits u8         33 l2_bits u8
 *   36 crypt_method u32 (0 none, 1 AES)                    40 l1_table_offset u64
 *
 * The L1 table has ceil(size / 2^(cluster_bits + l2_bits)) entries, each the file offset
 * of an L2 table of 2^l2_bits entries (0: not allocated). An L2 entry is the file offset
 * of a data cluster; bit 63 marks a compressed cluster, whose byte length sits in the
 * cluster_bits bits below it and whose offset in the bits below those (raw deflate, one
 * cluster of output). There are no zero flags, no refcounts and no snapshots; an
 * unallocated cluster is the backing file's (`parent`) or reads as zero.
 *
 * Compressed clusters are `unmappable` (read through readUnmappable), as in QCOW2; an
 * encrypted image (AES) is refused. The format cannot be grown in place by vdboot, so a
 * read-write boot of a not fully allocated image goes through qemu-nbd.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { appendExtent, type LayerMetadata, type MetadataRange } from './extent-ops.ts';
import type { LayerExtent } from './extent-map.ts';
import type { FormatReader, ImageLayer, OpenContext, ParentRef } from './image.ts';
import { inflateRaw } from './inflate.ts';
import { compressedClusterReader, parentCandidates } from './qcow2.ts';
import { utf8Decode } from './text.ts';

const MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW_HEADER_BYTES = 48;

/** Tables are read in pieces of at most this many bytes. */
const CHUNK = 1 << 20;

export interface QcowHeader {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
}

function fail(file: BlockReader, msg: string, field: string, value: string | number | bigint): never {
  throw new FormatError(`${file.name}: qcow ${msg}`, field, value);
}

function u64(dv: DataView, at: number, file: BlockReader, field: string): number {
  const v = dv.getBigUint64(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(file, `header field ${field} = ${v} is too large`, field, v);
  return Number(v);
}

export function probeQcow(head: Uint8Array): boolean {
  return head.length >= 8 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb &&
    head[4] === 0 && head[5] === 0 && head[6] === 0 && head[7] === 1;
}

/** Parses the 48-byte header; checks the ranges qemu accepts (clusters of 512 B..64 KiB, L2 tables of 64..8192 entries). */
export function parseQcowHeader(bytes: Uint8Array, file: BlockReader): QcowHeader {
  if (bytes.length < QCOW_HEADER_BYTES) fail(file, `header truncated (${bytes.length} bytes, needs ${QCOW_HEADER_BYTES})`, 'header', bytes.length);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (dv.getUint32(0) !== MAGIC) fail(file, 'magic is wrong: this is not a qcow image', 'magic', dv.getUint32(0));
  const version = dv.getUint32(4);
  if (version !== 1) fail(file, `version ${version} is not 1`, 'version', version);
  const h: QcowHeader = {
    backingFileOffset: u64(dv, 8, file, 'backing_file_offset'),
    backingFileSize: dv.getUint32(16),
    mtime: dv.getUint32(20),
    size: u64(dv, 24, file, 'size'),
    clusterBits: bytes[32]!,
    l2Bits: bytes[33]!,
    cryptMethod: dv.getUint32(36),
    l1TableOffset: u64(dv, 40, file, 'l1_table_offset'),
  };
  if (h.clusterBits < 9 || h.clusterBits > 16) fail(file, `cluster_bits ${h.clusterBits} is out of range (9..16: 512 bytes to 64 KiB)`, 'cluster_bits', h.clusterBits);
  if (h.l2Bits < 6 || h.l2Bits > 13) fail(file, `l2_bits ${h.l2Bits} is out of range (6..13: L2 tables of 64 to 8192 entries)`, 'l2_bits', h.l2Bits);
  return h;
}

const COMPRESSED_REASON = 'zlib-compressed qcow cluster';

export function openQcow(file: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  if (file.size < QCOW_HEADER_BYTES) fail(file, `file is too small (${file.size} bytes) to hold a header`, 'file.size', file.size);
  const h = parseQcowHeader(file.read(0, QCOW_HEADER_BYTES), file);
  if (h.cryptMethod !== 0) {
    const how = h.cryptMethod === 1 ? 'AES-CBC, qcow\'s built-in encryption' : `unknown method ${h.cryptMethod}`;
    fail(file, `image is encrypted (crypt_method ${h.cryptMethod}: ${how}); vdboot cannot map encrypted images: decrypt it on another machine (qemu-img convert --object secret,id=s0,... --image-opts ... -O qcow2)`, 'crypt_method', h.cryptMethod);
  }
  const cs = 2 ** h.clusterBits;
  const l2Entries = 2 ** h.l2Bits;
  const l1Span = l2Entries * cs;
  const size = h.size;
  const l1Size = Math.ceil(size / l1Span);

  const metadata: MetadataRange[] = [];
  const meta = (offset: number, length: number, what: string): void => { if (length > 0) metadata.push({ file: 0, offset, length, what }); };
  meta(0, QCOW_HEADER_BYTES, 'header');

  let parent: ParentRef | undefined;
  let backingName: string | undefined;
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > 1023) fail(file, `backing_file_size ${h.backingFileSize} is out of range (1..1023)`, 'backing_file_size', h.backingFileSize);
    if (h.backingFileOffset + h.backingFileSize > file.size) fail(file, `backing file name at offset ${h.backingFileOffset} is past the end of the file (${file.size} bytes)`, 'backing_file_offset', h.backingFileOffset);
    backingName = utf8Decode(file.read(h.backingFileOffset, h.backingFileSize));
    meta(h.backingFileOffset, h.backingFileSize, 'backing file name');
    parent = { paths: parentCandidates(backingName) };
  }

  if (h.l1TableOffset % 8 !== 0) fail(file, `l1_table_offset ${h.l1TableOffset} is not a multiple of 8`, 'l1_table_offset', h.l1TableOffset);
  if (h.l1TableOffset + l1Size * 8 > file.size) {
    fail(file, `L1 table (${l1Size} entries for a ${size}-byte disk, at offset ${h.l1TableOffset}) is past the end of the file (${file.size} bytes)`, 'l1_table_offset', h.l1TableOffset);
  }
  if (l1Size > 0 && h.l1TableOffset < QCOW_HEADER_BYTES) fail(file, `l1_table_offset ${h.l1TableOffset} lies inside the header`, 'l1_table_offset', h.l1TableOffset);
  meta(h.l1TableOffset, l1Size * 8, 'L1 table');

  /** A range no cluster of this layer holds: the parent's, else zeros. */
  const gap = (start: number, length: number): LayerExtent => (parent ? { kind: 'parent', start, length } : { kind: 'zero', start, length, why: 'unallocated' });
  const extents: LayerExtent[] = [];
  const compressed = new Map<number, { offset: number; length: number }>();
  const seenL2 = new Set<number>();
  const l2Bytes = l2Entries * 8;
  const offsetBits = 63 - h.clusterBits;
  let allocatedClusters = 0;
  let l2Tables = 0;
  const per = CHUNK / 8;
  for (let first = 0; first < l1Size; first += per) {
    const count = Math.min(per, l1Size - first);
    const l1 = file.read(h.l1TableOffset + first * 8, count * 8);
    const l1v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let k = 0; k < count; k++) {
      const l1i = first + k;
      const base = l1i * l1Span;
      const span = Math.min(l1Span, size - base);
      const raw = l1v.getBigUint64(k * 8);
      if (raw === 0n) { appendExtent(extents, gap(base, span)); continue; }
      if (raw > BigInt(Number.MAX_SAFE_INTEGER)) fail(file, `L1 entry ${l1i} = 0x${raw.toString(16)} is not a file offset`, 'l1_entry', raw);
      const l2Off = Number(raw);
      if (l2Off % 8 !== 0 || l2Off < QCOW_HEADER_BYTES) fail(file, `L1 entry ${l1i} points to offset ${l2Off}, which cannot hold an L2 table (inside the header or not 8-byte aligned)`, 'l1_entry', l2Off);
      if (l2Off + l2Bytes > file.size) fail(file, `L1 entry ${l1i} points to an L2 table at offset ${l2Off}, past the end of the file (${file.size} bytes)`, 'l1_entry', l2Off);
      // A table used twice would let a small file describe an enormous disk (and is
      // corruption anyway): refuse it, which also bounds the work by the file size.
      if (seenL2.has(l2Off)) fail(file, `L1 entry ${l1i} points to the L2 table at offset ${l2Off}, which an earlier L1 entry already uses`, 'l1_entry', l2Off);
      seenL2.add(l2Off);
      meta(l2Off, l2Bytes, 'L2 table');
      l2Tables++;
      const l2 = file.read(l2Off, l2Bytes);
      const dv = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
      const n = Math.ceil(span / cs);
      for (let j = 0; j < n; j++) {
        const start = base + j * cs;
        const len = Math.min(cs, size - start);
        const hi = dv.getUint32(j * 8);
        const lo = dv.getUint32(j * 8 + 4);
        if (hi === 0 && lo === 0) { appendExtent(extents, gap(start, len)); continue; }
        allocatedClusters++;
        if (hi & 0x80000000) {
          const entry = (BigInt(hi) << 32n) | BigInt(lo);
          const coff = Number(entry & ((1n << BigInt(offsetBits)) - 1n));
          const clen = Number((entry >> BigInt(offsetBits)) & BigInt(cs - 1));
          if (clen === 0 || coff < QCOW_HEADER_BYTES || coff + clen > file.size) {
            fail(file, `compressed cluster for guest offset ${start} (${clen} bytes at offset ${coff}) is not inside the file (${file.size} bytes)`, 'l2_entry', coff);
          }
          compressed.set(start / cs, { offset: coff, length: clen });
          appendExtent(extents, { kind: 'unmappable', start, length: len, reason: COMPRESSED_REASON });
          continue;
        }
        const off = hi * 2 ** 32 + lo;
        if (hi > 0x1fffff) fail(file, `L2 entry for guest offset ${start} = 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is not a file offset`, 'l2_entry', off);
        if ((lo & (cs - 1)) !== 0) fail(file, `L2 entry for guest offset ${start} points to offset ${off}, not aligned to the cluster size ${cs}`, 'l2_entry', off);
        if (off + len > file.size) fail(file, `guest offset ${start} maps to offset ${off}, past the end of the file (${file.size} bytes)`, 'l2_entry', off);
        appendExtent(extents, { kind: 'data', start, length: len, file: 0, offset: off });
      }
    }
  }

  const layer: ImageLayer & LayerMetadata = {
    format: 'qcow',
    subformat: 'v1',
    size,
    files: [ctx.path],
    extents,
    metadata,
    details: {
      version: 1,
      clusterSize: cs,
      l2Entries,
      allocatedClusters,
      compressedClusters: compressed.size,
      l2Tables,
      ...(backingName !== undefined ? { backingFile: backingName, backingMtime: h.mtime } : {}),
    },
  };
  if (parent) layer.parent = parent;
  if (compressed.size > 0) layer.readUnmappable = compressedClusterReader(file, size, cs, compressed, (input, what) => inflateRaw(input, cs, what));
  return layer;
}

export const qcowFormat: FormatReader = {
  format: 'qcow',
  probe: (head) => probeQcow(head),
  open: openQcow,
};
