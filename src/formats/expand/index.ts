/**
 * In-place expansion of dynamic images, by format: `prepareExpansion` reads the image
 * (nothing is written) and says what expansion would do, or refuses with a FormatError
 * naming the reason and the alternatives; `run` carries it out on a writable file.
 */
import type { BlockReader } from '../block-reader.ts';
import { detectFormat } from '../detect.ts';
import { refuse, type PreparedExpansion } from './common.ts';
import { prepareVdi } from './vdi.ts';
import { prepareVhd } from './vhd.ts';
import { prepareVhdx } from './vhdx.ts';
import { prepareVmdk } from './vmdk.ts';

export type { ExpandFile, ExpandOptions, ExpansionPlan, ExpansionResult, PreparedExpansion } from './common.ts';
export { EXPAND_REMEDIES } from './common.ts';

/**
 * Why vdboot cannot expand an image of this format and subformat in place, or undefined
 * when it can (VHD, VDI and VHDX that are not differencing, monolithicSparse VMDK).
 */
export function expansionRefusal(format: string, subformat: string): string | undefined {
  if (subformat === 'differencing' || subformat === 'undo') {
    return `it is a differencing image: its absent blocks are read from the parent, so expanding it would need the parent's data (merge the chain first, e.g. "qemu-img commit")`;
  }
  switch (format) {
    case 'vhd': case 'vdi': case 'vhdx': return undefined;
    case 'vmdk': return subformat === 'monolithicSparse' ? undefined : `vdboot expands monolithicSparse VMDKs only, and this one is ${subformat}`;
    case 'qcow2': return 'vdboot does not expand QCOW2 images in place: preallocate its metadata on another machine ("qemu-img convert -O qcow2 -o preallocation=metadata in.qcow2 out.qcow2")';
    case 'qcow': return 'vdboot does not expand qcow (version 1) images in place: the format allocates clusters as it writes; convert it on another machine ("qemu-img convert -O qcow2 -o preallocation=metadata in.qcow out.qcow2")';
    default: return `vdboot does not expand ${format} ${subformat} images in place`;
  }
}

export function prepareExpansion(file: BlockReader, name: string): PreparedExpansion {
  const format = detectFormat(file).format;
  switch (format) {
    case 'vhd': return prepareVhd(file, name);
    case 'vdi': return prepareVdi(file, name);
    case 'vhdx': return prepareVhdx(file, name);
    case 'vmdk': return prepareVmdk(file, name);
    default: return refuse(name, expansionRefusal(format, '') ?? `it is ${format}`, 'format', format);
  }
}
