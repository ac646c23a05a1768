/**
 * Writes a VHD: fixed (the raw disk then a footer) or dynamic (footer copy, dynamic
 * header, BAT, 2 MiB blocks each behind a 512-byte sector bitmap, footer), as in
 * Microsoft's "Virtual Hard Disk Image Format Specification".
 *
 * Size rule: readers take a VHD's size either from the CHS geometry or from
 * current_size, depending on the creator application. vdboot writes the geometry the
 * specification computes when cylinders × heads × sectors is exactly the disk's size,
 * and otherwise the maximum geometry 65535/16/255, which qemu, VirtualBox, Windows and
 * vdboot's reader all take to mean "use current_size"; either way every reader sees the
 * same size.
 */
import { FormatError } from '../block-reader.ts';
import {
  alignUp, ascii, be16, be32, be64, checkSource, eachDataBlock, touchedBlocks,
  type ImageSink, type SparseSource, type WriteOptions, type WriteResult,
} from './sparse.ts';

const SECTOR = 512;
export const VHD_BLOCK_SIZE = 2 * 1024 * 1024;
/** 2040 GiB: the largest VHD (the BAT's 32-bit sector offsets and Windows' limit). */
export const VHD_MAX_SIZE = 2040 * 1024 * 1024 * 1024;
const VHD_EPOCH = 946684800; // 2000-01-01T00:00:00Z

/** The CHS geometry of the VHD specification's appendix for a disk of `sectors` sectors. */
export function vhdGeometry(totalSectors: number): { cylinders: number; heads: number; sectors: number } {
  let total = Math.min(totalSectors, 65535 * 16 * 255);
  let spt: number; let heads: number; let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255; heads = 16; cth = Math.floor(total / spt);
  } else {
    spt = 17; cth = Math.floor(total / spt);
    heads = Math.floor((cth + 1023) / 1024);
    if (heads < 4) heads = 4;
    if (cth >= heads * 1024 || heads > 16) { spt = 31; heads = 16; cth = Math.floor(total / spt); }
    if (cth >= heads * 1024) { spt = 63; heads = 16; cth = Math.floor(total / spt); }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectors: spt };
}

function checksum(b: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) sum += b[i]!;
  return (~sum) >>> 0;
}

function footer(size: number, dynamic: boolean, opts: WriteOptions): Uint8Array {
  const f = new Uint8Array(SECTOR);
  ascii(f, 0, 'conectix');
  be32(f, 8, 2); // features: reserved bit always set
  be32(f, 12, 0x00010000);
  be64(f, 16, dynamic ? 512n : 0xffffffffffffffffn);
  be32(f, 24, Math.max(0, Math.floor(opts.identity.time) - VHD_EPOCH) >>> 0);
  ascii(f, 28, 'vdbt');
  be32(f, 32, 0x00010000);
  ascii(f, 36, 'Wi2k');
  be64(f, 40, size);
  be64(f, 48, size);
  let g = vhdGeometry(size / SECTOR);
  if (g.cylinders * g.heads * g.sectors * SECTOR !== size) g = { cylinders: 65535, heads: 16, sectors: 255 };
  be16(f, 56, g.cylinders);
  f[58] = g.heads;
  f[59] = g.sectors;
  be32(f, 60, dynamic ? 3 : 2);
  f.set(opts.identity.uuid.subarray(0, 16), 68);
  be32(f, 64, checksum(f));
  return f;
}

/** A fixed VHD: the disk's bytes at their own offsets (unwritten ranges stay holes), then the footer. */
export function writeVhdFixed(src: SparseSource, sink: ImageSink, opts: WriteOptions): WriteResult {
  checkSource(src, 'VHD', VHD_MAX_SIZE);
  const chunk = 1024 * 1024;
  const blocks = touchedBlocks(src.ranges, chunk);
  eachDataBlock(src, chunk, blocks, opts.progress, (b, bytes) => {
    sink.write(b * chunk, bytes.subarray(0, Math.min(chunk, src.size - b * chunk)));
  });
  sink.write(src.size, footer(src.size, false, opts));
  sink.setSize(src.size + SECTOR);
  return { fileSize: src.size + SECTOR, blocksWritten: blocks.length, blockSize: chunk };
}

/** A dynamic VHD with 2 MiB blocks; only blocks the source's ranges touch are allocated. */
export function writeVhdDynamic(src: SparseSource, sink: ImageSink, opts: WriteOptions): WriteResult {
  checkSource(src, 'VHD', VHD_MAX_SIZE);
  const blockCount = Math.ceil(src.size / VHD_BLOCK_SIZE);
  const batOffset = 3 * SECTOR;
  const batBytes = alignUp(blockCount * 4, SECTOR);
  const bitmapBytes = alignUp(VHD_BLOCK_SIZE / SECTOR / 8, SECTOR);
  const foot = footer(src.size, true, opts);

  const header = new Uint8Array(1024);
  ascii(header, 0, 'cxsparse');
  be64(header, 8, 0xffffffffffffffffn);
  be64(header, 16, batOffset);
  be32(header, 24, 0x00010000);
  be32(header, 28, blockCount);
  be32(header, 32, VHD_BLOCK_SIZE);
  be32(header, 36, checksum(header));

  const bat = new Uint8Array(batBytes).fill(0xff);
  const blocks = touchedBlocks(src.ranges, VHD_BLOCK_SIZE);
  // Blocks start on a 4 KiB boundary after the BAT (the data behind each 512-byte bitmap is then 512-aligned).
  let next = alignUp(batOffset + batBytes, 4096);
  const bitmap = new Uint8Array(bitmapBytes).fill(0xff);
  eachDataBlock(src, VHD_BLOCK_SIZE, blocks, opts.progress, (b, bytes) => {
    const sector = next / SECTOR;
    if (sector > 0xfffffffe) throw new FormatError(`VHD: block ${b} would start past the BAT's 32-bit sector range`, 'bat', b);
    be32(bat, b * 4, sector);
    sink.write(next, bitmap);
    sink.write(next + bitmapBytes, bytes);
    next += bitmapBytes + VHD_BLOCK_SIZE;
  });
  sink.write(0, foot);
  sink.write(SECTOR, header);
  sink.write(batOffset, bat);
  sink.write(next, foot);
  sink.setSize(next + SECTOR);
  return { fileSize: next + SECTOR, blocksWritten: blocks.length, blockSize: VHD_BLOCK_SIZE };
}
