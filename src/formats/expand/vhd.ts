/**
 * Expanding a dynamic VHD: each absent block (BAT entry 0xFFFFFFFF) gets a sector bitmap
 * of all ones and zero-filled data, appended where the footer was; the footer moves to
 * the new end of the file (its copy at offset 0 stays the authority while the data is
 * written); then the BAT entries point at the new blocks. Allocated blocks with absent
 * sectors (clear bitmap bits read as zeros) get those sectors zero-filled, then all bits set.
 */
import type { BlockReader } from '../block-reader.ts';
import { parseVhdDynamicHeader, parseVhdFooter, vhdFormat } from '../vhd.ts';
import { alignUp, dataPhase, Progress, readTable, refuse, writeChanged, writeZeros, type ExpandFile, type ExpandOptions, type PreparedExpansion } from './common.ts';

const SECTOR = 512;
const FOOTER = 512;
const UNUSED = 0xffffffff;

/**
 * Calls `each(first, count)` for every run of absent sectors (clear bits) among the first
 * `sectors` bits of a block's sector bitmap; returns the number of absent sectors.
 */
function absentRuns(bm: Uint8Array, sectors: number, each?: (first: number, count: number) => void): number {
  let absent = 0;
  let s = 0;
  while (s < sectors) {
    if ((s & 7) === 0 && s + 8 <= sectors && bm[s >> 3] === 0xff) { s += 8; continue; }
    if ((bm[s >> 3]! >> (7 - (s & 7))) & 1) { s++; continue; }
    let e = s + 1;
    while (e < sectors && ((bm[e >> 3]! >> (7 - (e & 7))) & 1) === 0) e++;
    each?.(s, e - s);
    absent += e - s;
    s = e;
  }
  return absent;
}

export function prepareVhd(file: BlockReader, name: string): PreparedExpansion {
  const layer = vhdFormat.open(file, { path: name, openFile: () => refuse(name, 'it is a differencing VHD', 'footer.disk_type') });
  const base = { format: 'vhd' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size };
  if (layer.subformat === 'fixed') {
    return { plan: { ...base, blockSize: 0, blocks: 0, partialBlocks: 0, newFileSize: file.size, writeBytes: 0 }, run: () => 'done' };
  }
  if (layer.subformat === 'differencing') {
    refuse(name, `it is a differencing VHD: its absent blocks are read from the parent image, so expanding it would need the parent's data. Merge the chain first ("qemu-img commit ${name}") or boot with rd.vdisk.mode=snapshot`, 'footer.disk_type', 4);
  }
  const parseAt = (off: number): { bytes: Uint8Array; ok: boolean } | undefined => {
    if (off < 0 || off + FOOTER > file.size) return undefined;
    const bytes = file.read(off, FOOTER).slice();
    try {
      const f = parseVhdFooter(bytes, name);
      return { bytes, ok: f.checksum === f.computedChecksum };
    } catch {
      return undefined;
    }
  };
  const end = parseAt(file.size - FOOTER);
  const head = parseAt(0);
  const footerBytes = end?.ok ? end.bytes : head?.ok ? head.bytes : undefined;
  if (!footerBytes) refuse(name, 'neither its footer nor the footer copy at offset 0 is valid', 'footer');
  const footer = parseVhdFooter(footerBytes, name);
  const h = parseVhdDynamicHeader(file.read(footer.dataOffset!, 1024), name);
  const bs = h.blockSize;
  const blocks = Math.ceil(layer.size / bs);
  const bitmapSize = Math.ceil(bs / SECTOR / 8 / SECTOR) * SECTOR;
  const bat = readTable(file, h.tableOffset, blocks * 4);
  const dv = new DataView(bat.buffer, bat.byteOffset, bat.byteLength);

  // Where the image's own structures and blocks end: new blocks go after that (the old footer's place).
  let dataEnd = Math.max(FOOTER, footer.dataOffset! + 1024, h.tableOffset + alignUp(h.maxTableEntries * 4, SECTOR));
  for (const l of h.locators) dataEnd = Math.max(dataEnd, l.dataOffset + l.dataLength);
  const sectorsOf = (k: number): number => Math.min(bs, layer.size - k * bs) / SECTOR;
  const missing: number[] = [];
  // Allocated blocks with absent sectors: only their numbers are kept (a large image made
  // by Windows can have millions of absent runs); run() reads their bitmaps again.
  const partial: number[] = [];
  let partialBytes = 0;
  for (let k = 0; k < blocks; k++) {
    const entry = dv.getUint32(k * 4);
    if (entry === UNUSED) { missing.push(k); continue; }
    const at = entry * SECTOR;
    dataEnd = Math.max(dataEnd, at + bitmapSize + bs);
    const absent = absentRuns(file.read(at, bitmapSize), sectorsOf(k));
    if (absent) {
      partial.push(k);
      partialBytes += absent * SECTOR;
    }
  }
  dataEnd = alignUp(dataEnd, SECTOR);
  const stride = bitmapSize + bs;
  const newFileSize = missing.length ? dataEnd + missing.length * stride + FOOTER : file.size;
  if ((dataEnd + missing.length * stride) / SECTOR >= UNUSED) {
    refuse(name, `it would grow past the 2 TiB a VHD block table can address (${newFileSize} bytes)`, 'bat', missing.length);
  }
  const plan = { ...base, blockSize: bs, blocks: missing.length, partialBlocks: partial.length, newFileSize, writeBytes: missing.length * stride + partialBytes };

  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing.length && !partial.length) return 'done';
      const progress = new Progress(plan.writeBytes, opts.progress);
      const ones = new Uint8Array(bitmapSize).fill(0xff);
      const bitmapAt = (k: number): number => dv.getUint32(k * 4) * SECTOR;
      // 1. Data: new blocks (bitmap all ones, zeros) over the old footer and on, the footer at the new end; absent sectors of partial blocks zeroed.
      // On failure the file is truncated back and its footer rewritten where it was (nothing points at the new blocks yet).
      const oldFooterAt = plan.fileSize - FOOTER;
      dataPhase(out, plan.fileSize, () => {
        if (missing.length) {
          missing.forEach((_, i) => {
            const at = dataEnd + i * stride;
            out.write(at, ones);
            progress.add(bitmapSize);
            writeZeros(out, at + bitmapSize, bs, progress);
          });
          if (out.size > newFileSize) out.truncate(newFileSize);
          out.write(newFileSize - FOOTER, footerBytes);
        }
        for (const k of partial) {
          const at = bitmapAt(k) + bitmapSize;
          absentRuns(out.read(bitmapAt(k), bitmapSize), sectorsOf(k), (s, n) => writeZeros(out, at + s * SECTOR, n * SECTOR, progress));
        }
      }, () => {
        if (missing.length && dataEnd <= oldFooterAt) out.write(oldFooterAt, footerBytes);
      });
      if (opts.stopAfter === 'data' || opts.stopAfter === 'header') return 'data';
      // 2. Metadata: the BAT, the partial blocks' bitmaps, the footer copy at offset 0.
      const newBat = bat.slice();
      const nv = new DataView(newBat.buffer);
      missing.forEach((k, i) => nv.setUint32(k * 4, (dataEnd + i * stride) / SECTOR));
      writeChanged(out, h.tableOffset, newBat, bat);
      for (const k of partial) out.write(bitmapAt(k), ones);
      if (!head?.ok || head.bytes.some((b, i) => b !== footerBytes[i])) out.write(0, footerBytes);
      out.sync();
      return 'done';
    },
  };
}
