/**
 * Expanding a dynamic VHDX (MS-VHDX): every payload block that is not FULLY_PRESENT
 * (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED) gets a new zero-filled block appended at a
 * 1 MiB-aligned file offset, and its BAT entry becomes FULLY_PRESENT with that offset in
 * MiB units. Before the first write, the headers are updated as the format asks of any
 * writer: the non-current header takes the next sequence number and a new FileWriteGuid
 * (and a new DataWriteGuid when the virtual disk's data is about to change), then the
 * other one, so both are current. Images with a log to replay were refused by the reader;
 * differencing images are refused here (their absent blocks come from the parent).
 */
import type { BlockReader } from '../block-reader.ts';
import { crc32c } from '../crc.ts';
import { GUID_BAT, parseVhdxHeader, parseVhdxRegionTable, vhdxFormat } from '../vhdx.ts';
import { alignUp, MiB, dataPhase, Progress, randomBytes, readTable, refuse, writeChanged, writeZeros, type ExpandFile, type ExpandOptions, type PreparedExpansion } from './common.ts';

const KiB = 1024;
const HEADER_OFFSETS = [64 * KiB, 128 * KiB];
const HEADER_SIZE = 4 * KiB;
const FULLY_PRESENT = 6;

/** A random (version 4) GUID's 16 bytes. */
function newGuid(opts: ExpandOptions): Uint8Array {
  const b = randomBytes(16, opts).slice(0, 16);
  b[7] = (b[7]! & 0x0f) | 0x40; // version 4 (the third field is little-endian: its high byte is byte 7)
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

export function prepareVhdx(file: BlockReader, name: string): PreparedExpansion {
  // The reader validates everything and refuses an image whose log must be replayed.
  const layer = vhdxFormat.open(file, { path: name, openFile: () => refuse(name, 'it has a parent', 'parent') });
  if (layer.subformat === 'differencing') {
    refuse(name, `it is a differencing VHDX: its absent blocks are read from the parent image, so expanding it would need the parent's data. Merge the chain first ("qemu-img commit ${name}", or Hyper-V's Merge-VHD) or boot with rd.vdisk.mode=snapshot`, 'file_parameters.has_parent', 1);
  }
  const headers = HEADER_OFFSETS.map((o) => ({ o, raw: file.read(o, HEADER_SIZE).slice() })).map((x) => ({ ...x, h: parseVhdxHeader(x.raw, x.o, name) }));
  const valid = headers.filter((x) => x.h !== undefined);
  const current = valid.reduce((a, b) => (b.h!.sequence > a.h!.sequence ? b : a));
  const other = headers.find((x) => x.o !== current.o)!;
  let regions = parseVhdxRegionTable(file.read(192 * KiB, 64 * KiB), name);
  if (!regions) regions = parseVhdxRegionTable(file.read(256 * KiB, 64 * KiB), name)!;
  const batRegion = regions.find((r) => r.guid === GUID_BAT)!;

  const bs = Number(layer.details['block size']);
  const lss = Number(layer.details['logical sector size']);
  const chunkRatio = (2 ** 23 * lss) / bs;
  const dataBlocks = Math.ceil(layer.size / bs);
  const totalEntries = dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
  const bat = readTable(file, batRegion.offset, totalEntries * 8);
  const dv = new DataView(bat.buffer, bat.byteOffset, bat.byteLength);
  const entryAt = (i: number): { state: number; offset: number } => {
    const lo = dv.getUint32(i * 8, true);
    const hi = dv.getUint32(i * 8 + 4, true);
    return { state: lo & 7, offset: ((lo >>> 20) + hi * 4096) * MiB };
  };

  // Where the file's structures and blocks end: new blocks go after, 1 MiB aligned.
  let dataEnd = MiB;
  for (const r of regions) dataEnd = Math.max(dataEnd, r.offset + r.length);
  const h = current.h!;
  if (h.logLength > 0) dataEnd = Math.max(dataEnd, h.logOffset + h.logLength);
  const missing: number[] = [];
  for (let b = 0; b < dataBlocks; b++) {
    const i = b + Math.floor(b / chunkRatio);
    const e = entryAt(i);
    if (e.state === FULLY_PRESENT) dataEnd = Math.max(dataEnd, e.offset + bs);
    else missing.push(i);
    // a sector bitmap entry after every chunkRatio payload entries
    if ((b + 1) % chunkRatio === 0 && i + 1 < totalEntries) {
      const sb = entryAt(i + 1);
      if (sb.state === FULLY_PRESENT) dataEnd = Math.max(dataEnd, sb.offset + MiB);
    }
  }
  dataEnd = alignUp(dataEnd, MiB);
  const newFileSize = missing.length ? Math.max(file.size, dataEnd + missing.length * bs) : file.size;
  const plan = {
    format: 'vhdx' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size,
    blockSize: bs, blocks: missing.length, partialBlocks: 0, newFileSize, writeBytes: missing.length * bs,
  };

  const writeHeader = (out: ExpandFile, at: number, sequence: bigint, fileWrite: Uint8Array, dataWrite: Uint8Array | undefined): void => {
    const b = current.raw.slice();
    const v = new DataView(b.buffer);
    v.setBigUint64(8, sequence, true);
    b.set(fileWrite, 16);
    if (dataWrite) b.set(dataWrite, 32);
    v.setUint32(4, 0, true);
    v.setUint32(4, crc32c(b), true);
    out.write(at, b);
  };

  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing.length) return 'done';
      // 0. Headers: the non-current one first, then the other, each synced.
      const fileWrite = newGuid(opts);
      const dataWrite = opts.dataWillChange ? newGuid(opts) : undefined;
      writeHeader(out, other.o, h.sequence + 1n, fileWrite, dataWrite);
      out.sync();
      writeHeader(out, current.o, h.sequence + 2n, fileWrite, dataWrite);
      out.sync();
      if (opts.stopAfter === 'header') return 'header';
      // 1. Data: zero-filled blocks, contiguous from the aligned end.
      dataPhase(out, plan.fileSize, () => writeZeros(out, dataEnd, missing.length * bs, new Progress(plan.writeBytes, opts.progress)));
      if (opts.stopAfter === 'data') return 'data';
      // 2. Metadata: the BAT entries, FULLY_PRESENT at their blocks.
      const next = bat.slice();
      const nv = new DataView(next.buffer);
      missing.forEach((i, k) => {
        const mb = (dataEnd + k * bs) / MiB;
        nv.setUint32(i * 8, ((mb % 4096) << 20 | FULLY_PRESENT) >>> 0, true);
        nv.setUint32(i * 8 + 4, Math.floor(mb / 4096), true);
      });
      writeChanged(out, batRegion.offset, next, bat);
      out.sync();
      return 'done';
    },
  };
}
