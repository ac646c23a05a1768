/**
 * Writes a VDI as VirtualBox makes a "normal" (dynamic) image: the pre-header text and
 * signature, header version 1.1 with the LCHS extension, the block map at 512 and the
 * data area on a 1 MiB boundary, 1 MiB blocks stored in the order they are written.
 * Blocks the source does not touch are free (0xffffffff) and read as zeros.
 */
import {
  alignUp, ascii, checkSource, eachDataBlock, le32, le64, touchedBlocks,
  type ImageSink, type SparseSource, type WriteOptions, type WriteResult,
} from './sparse.ts';

const MiB = 1024 * 1024;
export const VDI_BLOCK_SIZE = MiB;
/** VirtualBox's block map has 32-bit entries; its own limit is far above what anyone writes. */
export const VDI_MAX_SIZE = (0xfffffff0 - 1) * VDI_BLOCK_SIZE;
const SIGNATURE = 0xbeda107f;
const BLOCKS_OFFSET = 512;
const BLOCK_FREE = 0xffffffff;

/** A UUID from 16 random bytes, with the version-4 and variant bits set. */
function uuidV4(random: Uint8Array): Uint8Array {
  const u = random.slice(0, 16);
  u[7] = (u[7]! & 0x0f) | 0x40; // VirtualBox stores the time_hi field little-endian
  u[8] = (u[8]! & 0x3f) | 0x80;
  return u;
}

export function writeVdi(src: SparseSource, sink: ImageSink, opts: WriteOptions): WriteResult {
  checkSource(src, 'VDI', VDI_MAX_SIZE);
  const blockCount = Math.ceil(src.size / VDI_BLOCK_SIZE);
  const mapBytes = alignUp(blockCount * 4, 512);
  const dataOffset = alignUp(BLOCKS_OFFSET + mapBytes, MiB);

  const map = new Uint8Array(mapBytes);
  for (let i = 0; i < blockCount; i++) le32(map, i * 4, BLOCK_FREE);
  const blocks = touchedBlocks(src.ranges, VDI_BLOCK_SIZE);
  eachDataBlock(src, VDI_BLOCK_SIZE, blocks, opts.progress, (b, bytes, ordinal) => {
    le32(map, b * 4, ordinal);
    sink.write(dataOffset + ordinal * VDI_BLOCK_SIZE, bytes);
  });

  const h = new Uint8Array(512);
  ascii(h, 0, '<<< Oracle VM VirtualBox Disk Image >>>\n');
  le32(h, 64, SIGNATURE);
  le32(h, 68, 0x00010001);
  le32(h, 72, 400); // header size (version 1.1 with LCHS geometry)
  le32(h, 76, 1); // normal (dynamic)
  le32(h, 80, 0); // flags
  // comment (84..339) stays empty
  le32(h, 340, BLOCKS_OFFSET);
  le32(h, 344, dataOffset);
  // legacy geometry: cylinders, heads, sectors unset; sector size 512
  le32(h, 360, 512);
  le64(h, 368, src.size);
  le32(h, 376, VDI_BLOCK_SIZE);
  le32(h, 380, 0); // block_extra
  le32(h, 384, blockCount);
  le32(h, 388, blocks.length);
  h.set(uuidV4(opts.identity.uuid), 392); // image UUID
  h.set(uuidV4(opts.identity.uuid2), 408); // last modification UUID
  // linkage and parent UUIDs stay zero (not differencing); LCHS geometry zero (let the guest choose)

  sink.write(0, h);
  sink.write(BLOCKS_OFFSET, map);
  const fileSize = dataOffset + blocks.length * VDI_BLOCK_SIZE;
  sink.setSize(fileSize);
  return { fileSize, blocksWritten: blocks.length, blockSize: VDI_BLOCK_SIZE };
}
