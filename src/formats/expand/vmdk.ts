/**
 * Expanding a hosted monolithicSparse VMDK (one file, "KDMV" header, embedded
 * descriptor): every grain the grain tables leave unallocated (0) or zeroed (1) gets a
 * zero-filled grain appended after the last structure of the file, then its entry in the
 * grain table and in the redundant grain table points at it. The grain tables must exist
 * already (qemu-img and VMware preallocate them); split, delta and streamOptimized VMDKs
 * are refused.
 */
import type { BlockReader } from '../block-reader.ts';
import { parseSparseHeader, vmdkFormat } from '../vmdk.ts';
import { alignUp, Progress, refuse, writeZeros, type ExpandFile, type ExpandOptions, type PreparedExpansion } from './common.ts';

const SECTOR = 512;
const FLAG_RGD = 1 << 1;
const FLAG_MARKERS = 1 << 17;

interface Table {
  /** byte offset of the grain table */
  at: number;
  entries: Uint8Array;
  old: Uint8Array;
}

export function prepareVmdk(file: BlockReader, name: string): PreparedExpansion {
  const layer = vmdkFormat.open(file, { path: name, openFile: () => refuse(name, 'it is a VMDK made of several files or with a parent', 'extent') });
  if (layer.parent) {
    refuse(name, `it is a VMDK delta (a snapshot): its absent grains are read from the parent image, so expanding it would need the parent's data. Consolidate the snapshot first (or "qemu-img commit") or boot with rd.vdisk.mode=snapshot`, 'parentCID');
  }
  if (layer.files.length !== 1 || layer.subformat !== 'monolithicSparse') {
    refuse(name, `vdboot expands monolithicSparse VMDKs (one file), and this one is ${layer.subformat} in ${layer.files.length} file${layer.files.length === 1 ? '' : 's'}. Convert it on another machine ("qemu-img convert -O vmdk -o subformat=monolithicFlat")`, 'createType', layer.subformat);
  }
  const h = parseSparseHeader(file.read(0, SECTOR), file);
  if (h.compressAlgorithm !== 0 || (h.flags & FLAG_MARKERS) !== 0) refuse(name, 'its grains are compressed (streamOptimized)', 'compressAlgorithm', h.compressAlgorithm);
  const grainBytes = h.grainSize * SECTOR;
  const n = h.numGTEsPerGT;
  const grains = Math.ceil(h.capacity / h.grainSize);
  const gdEntries = Math.ceil(grains / n);
  const directories = [{ at: h.gdOffset * SECTOR, what: 'grain directory' }];
  if ((h.flags & FLAG_RGD) !== 0 && h.rgdOffset > 0) directories.push({ at: h.rgdOffset * SECTOR, what: 'redundant grain directory' });

  let dataEnd = Math.max(h.overHead * SECTOR, (h.descriptorOffset + h.descriptorSize) * SECTOR);
  const tables: Table[][] = directories.map((d) => {
    dataEnd = Math.max(dataEnd, d.at + gdEntries * 4);
    const gd = file.read(d.at, gdEntries * 4);
    const gv = new DataView(gd.buffer, gd.byteOffset, gd.byteLength);
    const out: Table[] = [];
    for (let i = 0; i < gdEntries; i++) {
      const s = gv.getUint32(i * 4, true);
      if (s === 0) refuse(name, `its ${d.what} entry ${i} has no grain table (vdboot fills preallocated grain tables only)`, 'gd.entry', i);
      const at = s * SECTOR;
      const count = Math.min(n, grains - i * n);
      const entries = file.read(at, count * 4).slice();
      out.push({ at, entries, old: entries.slice() });
      dataEnd = Math.max(dataEnd, at + n * 4);
    }
    return out;
  });
  const primary = tables[0]!;
  const missing: number[] = [];
  for (let g = 0; g < grains; g++) {
    const t = primary[Math.floor(g / n)]!;
    const e = new DataView(t.entries.buffer).getUint32((g % n) * 4, true);
    if (e <= 1) missing.push(g);
    else dataEnd = Math.max(dataEnd, e * SECTOR + grainBytes);
  }
  dataEnd = alignUp(dataEnd, SECTOR);
  if ((dataEnd + missing.length * grainBytes) / SECTOR > 0xffffffff) refuse(name, 'it would grow past what 32-bit grain table entries address', 'gt.entry');
  const newFileSize = missing.length ? Math.max(file.size, dataEnd + missing.length * grainBytes) : file.size;
  const plan = {
    format: 'vmdk' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size,
    blockSize: grainBytes, blocks: missing.length, partialBlocks: 0, newFileSize, writeBytes: missing.length * grainBytes,
  };
  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing.length) return 'done';
      // 1. Data: the new grains, contiguous after the file's last structure.
      writeZeros(out, dataEnd, missing.length * grainBytes, new Progress(plan.writeBytes, opts.progress));
      out.sync();
      if (opts.stopAfter) return 'data';
      // 2. Metadata: the grain tables, then the redundant ones, pointing at the new grains.
      for (const set of tables) {
        missing.forEach((g, k) => new DataView(set[Math.floor(g / n)]!.entries.buffer).setUint32((g % n) * 4, (dataEnd + k * grainBytes) / SECTOR, true));
        for (const t of set) {
          if (t.entries.some((b, i) => b !== t.old[i])) out.write(t.at, t.entries);
        }
      }
      out.sync();
      return 'done';
    },
  };
}
