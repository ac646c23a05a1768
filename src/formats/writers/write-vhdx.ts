/**
 * Writes a dynamic VHDX (MS-VHDX): file type identifier, two headers (CRC-32C, the
 * second with the higher sequence number), two identical region tables, an empty 1 MiB
 * log (LogGuid zero: nothing to replay), the metadata region (file parameters, virtual
 * disk size, virtual disk ID, 512-byte logical and 4096-byte physical sectors) and the
 * BAT, then 2 MiB payload blocks (FULLY_PRESENT) for the blocks the source touches;
 * every other block is NOT_PRESENT and reads as zeros.
 */
import { crc32c } from '../crc.ts';
import { guidToBytes } from '../guid.ts';
import { utf16leEncode } from '../text.ts';
import { GUID_BAT, GUID_FILE_PARAMETERS, GUID_LOGICAL_SECTOR_SIZE, GUID_METADATA, GUID_PHYSICAL_SECTOR_SIZE, GUID_VIRTUAL_DISK_ID, GUID_VIRTUAL_DISK_SIZE, MAX_VIRTUAL_SIZE } from '../vhdx.ts';
import {
  alignUp, ascii, checkSource, eachDataBlock, le16, le32, le64, touchedBlocks,
  type ImageSink, type SparseSource, type WriteOptions, type WriteResult,
} from './sparse.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
export const VHDX_BLOCK_SIZE = 2 * MiB;
/** 64 TiB, the format's limit. */
export const VHDX_MAX_SIZE = MAX_VIRTUAL_SIZE;
const LOGICAL_SECTOR = 512;
const PHYSICAL_SECTOR = 4096;


const BAT_FULLY_PRESENT = 6n;

const LOG_OFFSET = 1 * MiB;
const LOG_LENGTH = 1 * MiB;
const METADATA_OFFSET = 2 * MiB;
const METADATA_LENGTH = 1 * MiB;
const BAT_OFFSET = 3 * MiB;

function guidText(b: Uint8Array): string {
  const h = Array.from(b.subarray(0, 16), (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function header(sequence: number, fileWrite: Uint8Array, dataWrite: Uint8Array): Uint8Array {
  const h = new Uint8Array(4 * KiB);
  ascii(h, 0, 'head');
  le64(h, 8, sequence);
  h.set(fileWrite, 16);
  h.set(dataWrite, 32);
  // LogGuid (48) stays zero: the log is empty.
  le16(h, 64, 0); // LogVersion
  le16(h, 66, 1); // Version
  le32(h, 68, LOG_LENGTH);
  le64(h, 72, LOG_OFFSET);
  le32(h, 4, crc32c(h));
  return h;
}

function regionTable(batLength: number): Uint8Array {
  const t = new Uint8Array(64 * KiB);
  ascii(t, 0, 'regi');
  le32(t, 8, 2);
  const entry = (i: number, guid: string, offset: number, length: number) => {
    const o = 16 + i * 32;
    t.set(guidToBytes(guid), o);
    le64(t, o + 16, offset);
    le32(t, o + 24, length);
    le32(t, o + 28, 1); // Required
  };
  entry(0, GUID_BAT, BAT_OFFSET, batLength);
  entry(1, GUID_METADATA, METADATA_OFFSET, METADATA_LENGTH);
  le32(t, 4, crc32c(t));
  return t;
}

function metadata(size: number, diskId: Uint8Array): Uint8Array {
  const m = new Uint8Array(METADATA_LENGTH);
  ascii(m, 0, 'metadata');
  const IS_VIRTUAL_DISK = 2;
  const IS_REQUIRED = 4;
  const items: [string, Uint8Array, number][] = [];
  const u32 = (v: number) => { const b = new Uint8Array(4); le32(b, 0, v); return b; };
  const params = new Uint8Array(8);
  le32(params, 0, VHDX_BLOCK_SIZE); // flags (4) stay zero: not LeaveBlocksAllocated, no parent
  const sizeBytes = new Uint8Array(8);
  le64(sizeBytes, 0, size);
  items.push([GUID_FILE_PARAMETERS, params, IS_REQUIRED]);
  items.push([GUID_VIRTUAL_DISK_SIZE, sizeBytes, IS_VIRTUAL_DISK | IS_REQUIRED]);
  items.push([GUID_VIRTUAL_DISK_ID, guidToBytes(guidText(diskId)), IS_VIRTUAL_DISK | IS_REQUIRED]);
  items.push([GUID_LOGICAL_SECTOR_SIZE, u32(LOGICAL_SECTOR), IS_VIRTUAL_DISK | IS_REQUIRED]);
  items.push([GUID_PHYSICAL_SECTOR_SIZE, u32(PHYSICAL_SECTOR), IS_VIRTUAL_DISK | IS_REQUIRED]);
  le16(m, 10, items.length);
  // Item data starts at 64 KiB (the table's size), each item on its own 8-byte-aligned slot.
  let dataAt = 64 * KiB;
  items.forEach(([guid, data, flags], i) => {
    const o = 32 + i * 32;
    m.set(guidToBytes(guid), o);
    le32(m, o + 16, dataAt);
    le32(m, o + 20, data.length);
    le32(m, o + 24, flags);
    m.set(data, dataAt);
    dataAt += alignUp(data.length, 8);
  });
  return m;
}

/** A dynamic VHDX with 2 MiB blocks and 512-byte logical sectors. */
export function writeVhdx(src: SparseSource, sink: ImageSink, opts: WriteOptions): WriteResult {
  checkSource(src, 'VHDX', VHDX_MAX_SIZE);
  const payloadBlocks = Math.ceil(src.size / VHDX_BLOCK_SIZE);
  const chunkRatio = (2 ** 23 * LOGICAL_SECTOR) / VHDX_BLOCK_SIZE;
  const batEntries = payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  const batLength = alignUp(batEntries * 8, MiB);
  const bat = new Uint8Array(batLength);

  const ident = new Uint8Array(64 * KiB);
  ascii(ident, 0, 'vhdxfile');
  ident.set(utf16leEncode('vdboot mkdisk'), 8);

  let next = BAT_OFFSET + batLength;
  const blocks = touchedBlocks(src.ranges, VHDX_BLOCK_SIZE);
  eachDataBlock(src, VHDX_BLOCK_SIZE, blocks, opts.progress, (b, bytes) => {
    const entry = b + Math.floor(b / chunkRatio);
    le64(bat, entry * 8, (BigInt(next / MiB) << 20n) | BAT_FULLY_PRESENT);
    sink.write(next, bytes);
    next += VHDX_BLOCK_SIZE;
  });

  sink.write(0, ident);
  const fileWrite = opts.identity.uuid2.subarray(0, 16);
  sink.write(64 * KiB, header(1, fileWrite, fileWrite));
  sink.write(128 * KiB, header(2, fileWrite, fileWrite));
  const regions = regionTable(batLength);
  sink.write(192 * KiB, regions);
  sink.write(256 * KiB, regions);
  sink.write(METADATA_OFFSET, metadata(src.size, opts.identity.uuid));
  sink.write(BAT_OFFSET, bat);
  sink.setSize(next);
  return { fileSize: next, blocksWritten: blocks.length, blockSize: VHDX_BLOCK_SIZE };
}
