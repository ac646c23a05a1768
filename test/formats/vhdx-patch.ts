/** Patching helpers for tests: take a qemu-made VHDX and change single structures. */
import * as fs from 'node:fs';
import { crc32c } from '../../src/formats/crc.ts';
import { utf16leEncode } from '../../src/formats/text.ts';
import { parseVhdxHeader, parseVhdxMetadataTable, parseVhdxRegionTable } from '../../src/formats/vhdx.ts';

const KiB = 1024;
const MiB = 1024 * 1024;

export function vhdxLayout(b: Buffer) {
  const regions = parseVhdxRegionTable(b.subarray(192 * KiB, 256 * KiB), 't')!;
  const bat = regions.find((r) => r.guid === '2dc27766-f623-4200-9d64-115e9bfd4a08')!;
  const meta = regions.find((r) => r.guid === '8b7ca206-4790-4b9a-b8fe-575f050f886e')!;
  const items = parseVhdxMetadataTable(b.subarray(meta.offset, meta.offset + 64 * KiB), 't');
  return { batOffset: bat.offset, metaOffset: meta.offset, items };
}

export function currentHeader(b: Buffer) {
  const hs = [64 * KiB, 128 * KiB].map((o) => parseVhdxHeader(b.subarray(o, o + 4 * KiB), o, 't')).filter((h) => h !== undefined);
  return hs.reduce((a, h) => (h!.sequence > a!.sequence ? h : a))!;
}

export function fixHeaderCrc(b: Buffer, at: number): void {
  b.writeUInt32LE(0, at + 4);
  b.writeUInt32LE(crc32c(b.subarray(at, at + 4 * KiB)), at + 4);
}

export function guidBytes(g: string): Buffer {
  const h = g.replace(/-/g, '');
  const x = Buffer.from(h, 'hex');
  return Buffer.concat([Buffer.from([x[3]!, x[2]!, x[1]!, x[0]!, x[5]!, x[4]!, x[7]!, x[6]!]), x.subarray(8)]);
}

export function parentLocator(entries: Record<string, string>): Buffer {
  const keys = Object.entries(entries);
  const head = Buffer.alloc(20 + keys.length * 12);
  guidBytes('b04aefb7-d19e-4a81-b789-25b8e9445913').copy(head, 0);
  head.writeUInt16LE(keys.length, 18);
  const strings: Buffer[] = [];
  let off = head.length;
  keys.forEach(([k, v], i) => {
    const kb = Buffer.from(utf16leEncode(k));
    const vb = Buffer.from(utf16leEncode(v));
    head.writeUInt32LE(off, 20 + i * 12);
    head.writeUInt32LE(off + kb.length, 20 + i * 12 + 4);
    head.writeUInt16LE(kb.length, 20 + i * 12 + 8);
    head.writeUInt16LE(vb.length, 20 + i * 12 + 10);
    strings.push(kb, vb);
    off += kb.length + vb.length;
  });
  return Buffer.concat([head, ...strings]);
}

/**
 * Turns a qemu-made dynamic VHDX (1 MiB blocks, 512-byte sectors) into a differencing
 * one: HasParent, a parent locator, BAT states per block, and a sector bitmap block.
 */
export function makeDifferencing(child: string, parentHeaderGuid: string, relPath: string, states: Map<number, number>, bitmap: (block: number, sector: number) => boolean): void {
  const b = fs.readFileSync(child);
  const { batOffset, metaOffset, items } = vhdxLayout(b);
  const fp = items.find((i) => i.guid === 'caa16737-fa36-4d43-b3b6-33f0aa44e76b')!;
  b.writeUInt32LE(b.readUInt32LE(metaOffset + fp.offset + 4) | 2, metaOffset + fp.offset + 4);
  // add the parent locator item
  const count = b.readUInt16LE(metaOffset + 10);
  const loc = parentLocator({ parent_linkage: `{${parentHeaderGuid}}`, relative_path: relPath.replace(/\//g, '\\') });
  const locAt = 512 * KiB;
  const e = metaOffset + 32 + count * 32;
  guidBytes('a8d35f2d-b30b-454d-abf7-d3d84834ab0c').copy(b, e);
  b.writeUInt32LE(locAt, e + 16);
  b.writeUInt32LE(loc.length, e + 20);
  b.writeUInt32LE(4 | 2, e + 24); // required, virtual disk
  b.writeUInt16LE(count + 1, metaOffset + 10);
  loc.copy(b, metaOffset + locAt);
  // sector bitmap block appended at a 1 MiB boundary
  const bmAt = Math.ceil(b.length / MiB) * MiB;
  const bm = Buffer.alloc(MiB);
  const spb = 2048; // sectors per 1 MiB block
  for (const [blk, st] of states) {
    const entry = batOffset + blk * 8; // blocks < chunk ratio: payload index = block
    const lo = b.readUInt32LE(entry);
    const hi = b.readUInt32LE(entry + 4);
    b.writeUInt32LE((lo & ~7) | st, entry);
    b.writeUInt32LE(hi, entry + 4);
    if (st === 7) for (let s = 0; s < spb; s++) if (bitmap(blk, s)) bm[(blk * spb + s) >> 3]! |= 1 << (s & 7);
  }
  const chunkRatio = 4096;
  b.writeUInt32LE(6 | ((bmAt / MiB) << 20), batOffset + chunkRatio * 8);
  b.writeUInt32LE(0, batOffset + chunkRatio * 8 + 4);
  fs.writeFileSync(child, Buffer.concat([b, Buffer.alloc(bmAt - b.length), bm]));
}

export interface LogEntrySpec {
  /** log-relative offset of the entry */
  at: number;
  /** log-relative offset of the oldest entry still needed */
  tail: number;
  sequence: bigint;
  writes?: { offset: number; data: Buffer }[];
  zeros?: { offset: number; length: number }[];
  /** file offsets the entry records (default: the file's size) */
  flushedFileOffset?: number;
  lastFileOffset?: number;
}

/**
 * Writes one VHDX log entry (MS-VHDX §2.3.1) into the log of `b` and gives the current header
 * `logGuid`, as Hyper-V leaves a file whose logged updates did not all reach their places.
 * Returns the entry's length.
 */
export function writeLogEntry(b: Buffer, logGuid: Buffer, e: LogEntrySpec): number {
  const h = currentHeader(b);
  const writes = e.writes ?? [];
  const zeros = e.zeros ?? [];
  const count = writes.length + zeros.length;
  const descSectors = Math.ceil((count + 2) / 128);
  const length = (descSectors + writes.length) * 4096;
  const entry = Buffer.alloc(length);
  entry.write('loge', 0, 'latin1');
  entry.writeUInt32LE(length, 8);
  entry.writeUInt32LE(e.tail, 12);
  entry.writeBigUInt64LE(e.sequence, 16);
  entry.writeUInt32LE(count, 24);
  logGuid.copy(entry, 32);
  entry.writeBigUInt64LE(BigInt(e.flushedFileOffset ?? b.length), 48);
  entry.writeBigUInt64LE(BigInt(e.lastFileOffset ?? b.length), 56);
  let d = 64;
  for (const z of zeros) {
    entry.write('zero', d, 'latin1');
    entry.writeBigUInt64LE(BigInt(z.length), d + 8);
    entry.writeBigUInt64LE(BigInt(z.offset), d + 16);
    entry.writeBigUInt64LE(e.sequence, d + 24);
    d += 32;
  }
  writes.forEach((w, i) => {
    entry.write('desc', d, 'latin1');
    w.data.copy(entry, d + 4, 4092, 4096); // trailing 4 bytes
    w.data.copy(entry, d + 8, 0, 8); // leading 8 bytes
    entry.writeBigUInt64LE(BigInt(w.offset), d + 16);
    entry.writeBigUInt64LE(e.sequence, d + 24);
    d += 32;
    const s = (descSectors + i) * 4096;
    entry.write('data', s, 'latin1');
    entry.writeUInt32LE(Number(e.sequence >> 32n), s + 4);
    w.data.copy(entry, s + 8, 8, 4092);
    entry.writeUInt32LE(Number(e.sequence & 0xffffffffn), s + 4092);
  });
  entry.writeUInt32LE(crc32c(entry), 4);
  for (let i = 0; i < length; i += 4096) entry.copy(b, h.logOffset + ((e.at + i) % h.logLength), i, i + 4096);
  logGuid.copy(b, h.offset + 48);
  fixHeaderCrc(b, h.offset);
  return length;
}
