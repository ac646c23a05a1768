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
import { alignUp, dataPhase, Progress, refuse, writeZeros, type ExpandFile, type ExpandOptions, type PreparedExpansion } from './common.ts';

const SECTOR = 512;
const FLAG_RGD = 1 << 1;
const FLAG_MARKERS = 1 << 17;

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

  // Grain tables are read one at a time (a 2 TiB image has 32 Mi grains: no per-grain list is kept).
  let dataEnd = Math.max(h.overHead * SECTOR, (h.descriptorOffset + h.descriptorSize) * SECTOR);
  const gts: number[][] = directories.map((d) => {
    dataEnd = Math.max(dataEnd, d.at + gdEntries * 4);
    const gd = file.read(d.at, gdEntries * 4);
    const gv = new DataView(gd.buffer, gd.byteOffset, gd.byteLength);
    const out: number[] = [];
    for (let i = 0; i < gdEntries; i++) {
      const s = gv.getUint32(i * 4, true);
      if (s === 0) refuse(name, `its ${d.what} entry ${i} has no grain table (vdboot fills preallocated grain tables only)`, 'gd.entry', i);
      out.push(s * SECTOR);
      dataEnd = Math.max(dataEnd, s * SECTOR + n * 4);
    }
    return out;
  });
  const count = (i: number): number => Math.min(n, grains - i * n);
  let missing = 0;
  for (let i = 0; i < gdEntries; i++) {
    const gt = file.read(gts[0]![i]!, count(i) * 4);
    const dv = new DataView(gt.buffer, gt.byteOffset, gt.byteLength);
    for (let j = 0; j < count(i); j++) {
      const e = dv.getUint32(j * 4, true);
      if (e <= 1) missing++;
      else dataEnd = Math.max(dataEnd, e * SECTOR + grainBytes);
    }
  }
  dataEnd = alignUp(dataEnd, SECTOR);
  if ((dataEnd + missing * grainBytes) / SECTOR > 0xffffffff) refuse(name, 'it would grow past what 32-bit grain table entries address', 'gt.entry');
  const newFileSize = missing ? Math.max(file.size, dataEnd + missing * grainBytes) : file.size;
  const plan = {
    format: 'vmdk' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size,
    blockSize: grainBytes, blocks: missing, partialBlocks: 0, newFileSize, writeBytes: missing * grainBytes,
  };
  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing) return 'done';
      // 1. Data: the new grains, contiguous after the file's last structure.
      dataPhase(out, plan.fileSize, () => writeZeros(out, dataEnd, missing * grainBytes, new Progress(plan.writeBytes, opts.progress)));
      if (opts.stopAfter) return 'data';
      // 2. Metadata: the grain tables, then the redundant ones, the k-th absent grain (in
      // the primary tables' order) at dataEnd + k grains. Both sets are assigned from the
      // primary entries, so they agree.
      let k = 0;
      for (let i = 0; i < gdEntries; i++) {
        const primary = out.read(gts[0]![i]!, count(i) * 4).slice();
        const pv = new DataView(primary.buffer);
        const updated = primary.slice();
        const uv = new DataView(updated.buffer);
        for (let j = 0; j < count(i); j++) {
          if (pv.getUint32(j * 4, true) <= 1) uv.setUint32(j * 4, (dataEnd + k++ * grainBytes) / SECTOR, true);
        }
        if (updated.some((b, x) => b !== primary[x])) for (const set of gts) out.write(set[i]!, updated);
      }
      out.sync();
      return 'done';
    },
  };
}
