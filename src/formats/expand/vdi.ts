/**
 * Expanding a dynamic VDI: the blocks the block map marks free (0xFFFFFFFF) or zero
 * (0xFFFFFFFE) get zero-filled data blocks appended after the last allocated one, then
 * the block map points at them and the header's blocks_allocated counts them.
 */
import type { BlockReader } from '../block-reader.ts';
import { parseVdiHeader, vdiFormat } from '../vdi.ts';
import { dataPhase, Progress, readTable, refuse, writeChanged, writeZeros, type ExpandFile, type ExpandOptions, type PreparedExpansion } from './common.ts';

const FREE = 0xffffffff;
const ZERO = 0xfffffffe;
/** blocks_allocated in a version 1 header */
const BLOCKS_ALLOCATED_AT = 0x184;

export function prepareVdi(file: BlockReader, name: string): PreparedExpansion {
  const h = parseVdiHeader(file.read(0, Math.min(512, file.size)), file);
  if (h.imageType === 3 || h.imageType === 4) {
    refuse(name, `it is a differencing VDI (a snapshot): its free blocks are read from the parent image, so expanding it would need the parent's data. Merge it into its parent first (VirtualBox "delete snapshot", or "qemu-img commit") or boot with rd.vdisk.mode=snapshot`, 'image_type', h.imageType);
  }
  const layer = vdiFormat.open(file, { path: name, openFile: () => refuse(name, 'it has a parent', 'uuid_link') });
  if (h.version >>> 16 !== 1) refuse(name, `its header is version ${h.version >>> 16}.${h.version & 0xffff} (old VirtualBox); vdboot expands version 1 headers. Convert it with "VBoxManage clonemedium"`, 'version', h.version);
  const bs = h.blockSize;
  const total = bs + h.blockExtra;
  const used = Math.ceil(h.diskSize / bs);
  const map = readTable(file, h.offsetBmap, h.blocksInImage * 4);
  const dv = new DataView(map.buffer, map.byteOffset, map.byteLength);
  const missing: number[] = [];
  let count = 0;
  for (let b = 0; b < h.blocksInImage; b++) {
    const e = dv.getUint32(b * 4, true);
    if (e === FREE || e === ZERO) {
      if (b < used) missing.push(b);
      continue;
    }
    count++;
    if (e >= h.blocksAllocated) {
      refuse(name, `block ${b} is stored as data block ${e}, but the header counts only ${h.blocksAllocated} allocated blocks: the image is inconsistent. Repair a copy with "qemu-img check -r all"`, 'block_map', e);
    }
  }
  if (count !== h.blocksAllocated) {
    refuse(name, `its block map holds ${count} allocated blocks but the header says ${h.blocksAllocated}: the image is inconsistent. Repair a copy with "qemu-img check -r all"`, 'blocks_allocated', h.blocksAllocated);
  }
  const first = h.offsetData + h.blocksAllocated * total;
  const newFileSize = missing.length ? Math.max(file.size, first + missing.length * total) : file.size;
  const plan = {
    format: 'vdi' as const, subformat: layer.subformat, name, virtualSize: layer.size, fileSize: file.size,
    blockSize: bs, blocks: missing.length, partialBlocks: 0, newFileSize, writeBytes: missing.length * total,
  };
  return {
    plan,
    run(out: ExpandFile, opts: ExpandOptions) {
      if (!missing.length) return 'done';
      // 1. Data: the new blocks, contiguous after the last allocated one.
      dataPhase(out, plan.fileSize, () => writeZeros(out, first, missing.length * total, new Progress(plan.writeBytes, opts.progress)));
      if (opts.stopAfter) return 'data';
      // 2. Metadata: the block map, then the count.
      const next = map.slice();
      const nv = new DataView(next.buffer);
      missing.forEach((b, i) => nv.setUint32(b * 4, h.blocksAllocated + i, true));
      writeChanged(out, h.offsetBmap, next, map);
      const n = new Uint8Array(4);
      new DataView(n.buffer).setUint32(0, h.blocksAllocated + missing.length, true);
      out.write(BLOCKS_ALLOCATED_AT, n);
      out.sync();
      return 'done';
    },
  };
}
