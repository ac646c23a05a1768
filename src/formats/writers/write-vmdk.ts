/**
 * Writes a monolithicSparse VMDK (VMware's "Virtual Disk Format 1.1"): the sparse extent
 * header, the embedded text descriptor, a redundant and a primary grain directory with
 * every grain table preallocated (as VMware expects of this type), then 64 KiB grains for
 * the grains the source touches. Other grains have a zero table entry and read as zeros.
 */
import { FormatError } from '../block-reader.ts';
import { utf8Encode } from '../text.ts';
import {
  alignUp, checkSource, eachDataBlock, le16, le32, le64, touchedBlocks,
  type ImageSink, type SparseSource, type WriteOptions, type WriteResult,
} from './sparse.ts';

const SECTOR = 512;
const GRAIN_SECTORS = 128;
export const VMDK_GRAIN_SIZE = GRAIN_SECTORS * SECTOR;
const GTES_PER_GT = 512;
const DESCRIPTOR_SECTORS = 20;
/** 2 TiB less a grain: grain table entries are 32-bit sector numbers. */
export const VMDK_MAX_SIZE = 2 * 1024 * 1024 * 1024 * 1024 - VMDK_GRAIN_SIZE;

export interface VmdkOptions extends WriteOptions {
  /** the file name the descriptor's extent line names: the output file's own name */
  fileName: string;
}

function descriptor(opts: VmdkOptions, sectors: number): Uint8Array {
  const cid = ((opts.identity.uuid[0]! << 24) | (opts.identity.uuid[1]! << 16) | (opts.identity.uuid[2]! << 8) | opts.identity.uuid[3]!) >>> 0;
  if (/["\n\r]/.test(opts.fileName) || opts.fileName.includes('/')) {
    throw new FormatError(`VMDK: the file name "${opts.fileName}" cannot be written in a descriptor's extent line`, 'fileName', opts.fileName);
  }
  const cylinders = Math.min(16383, Math.floor(sectors / (16 * 63)));
  const text = [
    '# Disk DescriptorFile',
    'version=1',
    `CID=${cid.toString(16).padStart(8, '0')}`,
    'parentCID=ffffffff',
    'createType="monolithicSparse"',
    '',
    '# Extent description',
    `RW ${sectors} SPARSE "${opts.fileName}"`,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    'ddb.virtualHWVersion = "4"',
    `ddb.geometry.cylinders = "${cylinders}"`,
    'ddb.geometry.heads = "16"',
    'ddb.geometry.sectors = "63"',
    'ddb.adapterType = "ide"',
    '',
  ].join('\n');
  const bytes = utf8Encode(text);
  if (bytes.length > DESCRIPTOR_SECTORS * SECTOR) throw new FormatError('VMDK: the descriptor does not fit its 20 sectors', 'descriptor', bytes.length);
  const out = new Uint8Array(DESCRIPTOR_SECTORS * SECTOR);
  out.set(bytes);
  return out;
}

export function writeVmdk(src: SparseSource, sink: ImageSink, opts: VmdkOptions): WriteResult {
  checkSource(src, 'VMDK', VMDK_MAX_SIZE);
  const capacity = src.size / SECTOR;
  const grains = Math.ceil(capacity / GRAIN_SECTORS);
  const tables = Math.ceil(grains / GTES_PER_GT);
  const gdSectors = Math.ceil((tables * 4) / SECTOR);
  const gtSectors = (GTES_PER_GT * 4) / SECTOR;
  const rgdOffset = 1 + DESCRIPTOR_SECTORS;
  const rgtOffset = rgdOffset + gdSectors;
  const gdOffset = rgtOffset + tables * gtSectors;
  const gtOffset = gdOffset + gdSectors;
  const overhead = alignUp(gtOffset + tables * gtSectors, GRAIN_SECTORS);

  const gts = new Uint8Array(tables * gtSectors * SECTOR);
  let next = overhead;
  const blocks = touchedBlocks(src.ranges, VMDK_GRAIN_SIZE);
  eachDataBlock(src, VMDK_GRAIN_SIZE, blocks, opts.progress, (g, bytes) => {
    if (next > 0xffffffff - GRAIN_SECTORS) throw new FormatError('VMDK: the image grew past 2 TiB of grains', 'grain', g);
    le32(gts, g * 4, next);
    sink.write(next * SECTOR, bytes);
    next += GRAIN_SECTORS;
  });

  const gd = (first: number) => {
    const d = new Uint8Array(gdSectors * SECTOR);
    for (let t = 0; t < tables; t++) le32(d, t * 4, first + t * gtSectors);
    return d;
  };

  const h = new Uint8Array(SECTOR);
  le32(h, 0, 0x564d444b); // "KDMV"
  le32(h, 4, 1);
  le32(h, 8, 0x3); // valid newline test, redundant grain table in use
  le64(h, 12, capacity);
  le64(h, 20, GRAIN_SECTORS);
  le64(h, 28, 1);
  le64(h, 36, DESCRIPTOR_SECTORS);
  le32(h, 44, GTES_PER_GT);
  le64(h, 48, rgdOffset);
  le64(h, 56, gdOffset);
  le64(h, 64, overhead);
  h[72] = 0; // clean shutdown
  h[73] = 0x0a; h[74] = 0x20; h[75] = 0x0d; h[76] = 0x0a;
  le16(h, 77, 0); // no compression

  sink.write(0, h);
  sink.write(SECTOR, descriptor(opts, capacity));
  sink.write(rgdOffset * SECTOR, gd(rgtOffset));
  sink.write(rgtOffset * SECTOR, gts);
  sink.write(gdOffset * SECTOR, gd(gtOffset));
  sink.write(gtOffset * SECTOR, gts);
  sink.setSize(next * SECTOR);
  return { fileSize: next * SECTOR, blocksWritten: blocks.length, blockSize: VMDK_GRAIN_SIZE };
}
