/**
 * Expanding a dynamic VHDX (MS-VHDX): every payload block that is not FULLY_PRESENT
 * (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED) gets a zero-filled block at a 1 MiB-aligned
 * file offset — its own reserved space, else space in the file nothing claims (a fixed
 * VHDX from qemu-img leaves its ZERO blocks' space so), else appended — and its BAT entry
 * becomes FULLY_PRESENT with that offset in MiB units. Before the first write, the headers are updated as the format asks of any
 * writer: the non-current header takes the next sequence number and a new FileWriteGuid
 * (and a new DataWriteGuid when the virtual disk's data is about to change), then the
 * other one, so both are current (an image with a log has its log's updates written before
 * them, and the new headers name no log);
 * differencing images are refused here (their absent blocks come from the parent).
 */
import type { BlockReader } from '../block-reader.ts';
import { crc32c } from '../crc.ts';
import { GUID_BAT, parseVhdxHeader, parseVhdxRegionTable, vhdxFormat } from '../vhdx.ts';
import { logWriteBytes, replayedReader, type LogWrite } from '../vhdx-log.ts';
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

interface HeaderSlot {
  o: number;
  raw: Uint8Array;
  h: ReturnType<typeof parseVhdxHeader>;
}

function readHeaders(file: BlockReader, name: string): { current: HeaderSlot; other: HeaderSlot } {
  const headers: HeaderSlot[] = HEADER_OFFSETS.map((o) => ({ o, raw: file.read(o, HEADER_SIZE).slice() })).map((x) => ({ ...x, h: parseVhdxHeader(x.raw, x.o, name) }));
  const valid = headers.filter((x) => x.h !== undefined);
  if (!valid.length) refuse(name, 'neither of its two headers is valid', 'header');
  const current = valid.reduce((a, b) => (b.h!.sequence > a.h!.sequence ? b : a));
  return { current, other: headers.find((x) => x.o !== current.o)! };
}

/**
 * The two header writes that give a VHDX a new FileWriteGuid (and with `dataWillChange` a
 * new DataWriteGuid), as MS-VHDX asks before a file's first write and before the first
 * change to the virtual disk's data: the non-current slot first with the next sequence
 * number, then the other with the one after, each to be synced before the next. A torn
 * write leaves a header whose checksum fails, and the other one current.
 */
function headerWrites(current: HeaderSlot, other: HeaderSlot, opts: ExpandOptions): { offset: number; bytes: Uint8Array }[] {
  const fileWrite = newGuid(opts);
  const dataWrite = opts.dataWillChange ? newGuid(opts) : undefined;
  const header = (sequence: bigint): Uint8Array => {
    const b = current.raw.slice();
    const v = new DataView(b.buffer);
    v.setBigUint64(8, sequence, true);
    b.set(fileWrite, 16);
    if (dataWrite) b.set(dataWrite, 32);
    b.fill(0, 48, 64); // LogGuid: a writer has written the log's updates (if any) before these headers
    v.setUint32(4, 0, true);
    v.setUint32(4, crc32c(b), true);
    return b;
  };
  const seq = current.h!.sequence;
  return [{ offset: other.o, bytes: header(seq + 1n) }, { offset: current.o, bytes: header(seq + 2n) }];
}

/**
 * What a read-write boot writes to a VHDX before anything else: the log's updates, if it has
 * any (`logWrites`, the opened layer's `logReplay`, in the order they were logged), then
 * headers with a new FileWriteGuid and DataWriteGuid (see headerWrites) and no log. Each write
 * is to be synced before the next: a crash before the headers leaves the log in place, to be
 * replayed again.
 */
export function vhdxHeaderRenewal(file: BlockReader, name: string, logWrites: readonly LogWrite[], opts: Pick<ExpandOptions, 'random'> = {}): { offset: number; bytes: Uint8Array }[] {
  const { current, other } = readHeaders(file, name);
  return [...logWrites.map((w) => ({ offset: w.offset, bytes: logWriteBytes(w) })), ...headerWrites(current, other, { ...opts, dataWillChange: true })];
}

export function prepareVhdx(fileAsItIs: BlockReader, name: string): PreparedExpansion {
  // The reader validates everything; a log's updates are read through (and written first, below).
  const layer = vhdxFormat.open(fileAsItIs, { path: name, openFile: () => refuse(name, 'it has a parent', 'parent') });
  const replay = layer.logReplay?.writes ?? [];
  const file = replayedReader(fileAsItIs, replay);
  if (layer.subformat === 'differencing') {
    refuse(name, `it is a differencing VHDX: its absent blocks are read from the parent image, so expanding it would need the parent's data. Merge the chain first ("qemu-img commit ${name}", or Hyper-V's Merge-VHD) or boot with rd.vdisk.mode=snapshot`, 'file_parameters.has_parent', 1);
  }
  const { current, other } = readHeaders(file, name);
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

  // Where each absent block goes. Space in the file that no structure or block claims is
  // used first: a fixed VHDX made by qemu-img marks its all-zero blocks ZERO and leaves their
  // space unclaimed, and a block of its own reserved space (ZERO/UNMAPPED with an offset)
  // keeps it; so a fixed image does not grow. The rest is appended after everything,
  // 1 MiB aligned. Nothing claimed is ever given out: headers, regions (BAT, metadata),
  // the log, present blocks, sector bitmaps, and any offset an absent block still names.
  const h = current.h!;
  const used: [number, number][] = [[0, MiB]];
  for (const r of regions) used.push([r.offset, r.offset + r.length]);
  if (h.logLength > 0) used.push([h.logOffset, h.logOffset + h.logLength]);
  const missing: number[] = [];
  const own: { i: number; offset: number }[] = [];
  for (let b = 0; b < dataBlocks; b++) {
    const i = b + Math.floor(b / chunkRatio);
    const e = entryAt(i);
    if (e.state === FULLY_PRESENT) used.push([e.offset, e.offset + bs]);
    else {
      missing.push(i);
      if (e.offset >= MiB) own.push({ i, offset: e.offset });
    }
    // a sector bitmap entry after every chunkRatio payload entries
    if ((b + 1) % chunkRatio === 0 && i + 1 < totalEntries) {
      const sb = entryAt(i + 1);
      if (sb.state === FULLY_PRESENT) used.push([sb.offset, sb.offset + MiB]);
    }
  }
  const placement = new Map<number, number>(); // BAT index → file offset
  // an absent block keeps its own space when that space is whole, aligned, inside the file and claimed by nothing else
  const claims = [...used.map(([a0, z]) => ({ a: a0, z, own: -1 })), ...own.map((o, k) => ({ a: o.offset, z: o.offset + bs, own: k }))].sort((x, y) => x.a - y.a || x.z - y.z);
  const clash = new Set<number>();
  let reach = -1;
  for (let k = 0; k < claims.length; k++) {
    const c = claims[k]!;
    if (reach >= 0 && claims[reach]!.z > c.a) {
      if (claims[reach]!.own >= 0) clash.add(claims[reach]!.own);
      if (c.own >= 0) clash.add(c.own);
    }
    if (reach < 0 || c.z > claims[reach]!.z) reach = k;
  }
  own.forEach((o, k) => {
    if (!clash.has(k) && o.offset % MiB === 0 && o.offset + bs <= file.size) placement.set(o.i, o.offset);
  });
  for (const o of own) used.push([o.offset, o.offset + bs]); // reused or not, never handed to another block
  // then the unclaimed gaps inside the file, lowest first
  used.sort((x, y) => x[0] - y[0]);
  let end = 0;
  let dataEnd = MiB;
  const todo = missing.filter((i) => !placement.has(i));
  let next = 0;
  const fill = (from: number, to: number): void => {
    for (let at = alignUp(from, MiB); next < todo.length && at + bs <= to; at += bs) placement.set(todo[next++]!, at);
  };
  for (const [a0, z] of used) {
    if (a0 > end) fill(end, Math.min(a0, file.size));
    end = Math.max(end, z);
    dataEnd = Math.max(dataEnd, z);
  }
  if (end < file.size) fill(end, file.size);
  // the rest after the last byte in use
  let last = dataEnd;
  for (const o of placement.values()) last = Math.max(last, o + bs);
  let at = alignUp(last, MiB);
  for (; next < todo.length; next++, at += bs) placement.set(todo[next]!, at);
  let newFileSize = file.size;
  for (const o of placement.values()) newFileSize = Math.max(newFileSize, o + bs);
  const plan = {
    format: 'vhdx' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size,
    blockSize: bs, blocks: missing.length, partialBlocks: 0, newFileSize, writeBytes: missing.length * bs,
  };

  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing.length) return 'done';
      // 0. The log's updates, then the headers (new GUIDs, no log), each synced.
      for (const w of replay) out.write(w.offset, logWriteBytes(w));
      if (replay.length) out.sync();
      for (const w of headerWrites(current, other, opts)) {
        out.write(w.offset, w.bytes);
        out.sync();
      }
      if (opts.stopAfter === 'header') return 'header';
      // 1. Data: every absent block zero-filled at its place, in file order.
      const order = [...placement.entries()].sort((x, y) => x[1] - y[1]);
      dataPhase(out, plan.fileSize, () => {
        const progress = new Progress(plan.writeBytes, opts.progress);
        for (const [, offset] of order) writeZeros(out, offset, bs, progress);
      });
      if (opts.stopAfter === 'data') return 'data';
      // 2. Metadata: the BAT entries, FULLY_PRESENT at their blocks.
      const next = bat.slice();
      const nv = new DataView(next.buffer);
      for (const [i, offset] of placement) {
        const mb = offset / MiB;
        nv.setUint32(i * 8, ((mb % 4096) << 20 | FULLY_PRESENT) >>> 0, true);
        nv.setUint32(i * 8 + 4, Math.floor(mb / 4096), true);
      }
      writeChanged(out, batRegion.offset, next, bat);
      out.sync();
      return 'done';
    },
  };
}
