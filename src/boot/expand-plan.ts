/**
 * The planner's side of in-place expansion (DESIGN §3): when a read-write mapping meets
 * blocks a dynamic image leaves unallocated, planVdisk asks here. Either the image can be
 * expanded (VHD, VDI, VHDX, not differencing, rd.vdisk.expand on): then ExpansionNeeded
 * carries the expansion's plan (sizes, read without writing) to the boot, which expands
 * the image through the host filesystem's driver and plans again (expand.ts); or a
 * FormatError says why not and what to do instead. Pure: reads only.
 */
import { FormatError } from '../formats/block-reader.ts';
import type { OpenedImage } from '../formats/image.ts';
import { EXPAND_REMEDIES, expansionRefusal, prepareExpansion, type ExpansionPlan } from '../formats/expand/index.ts';
import { humanSize } from './devices.ts';
import type { ImageHost, ImageRequest } from './image-host.ts';

function bytes(n: number): string {
  return `${humanSize(n)}${n >= 1024 ? ` (${n} bytes)` : ''}`;
}

/**
 * Thrown by planVdisk when the image must be expanded before it can be mapped
 * read-write. A FormatError by name, so a dry run (vdboot plan) prints it as the
 * reason the plan stops there.
 */
export class ExpansionNeeded extends FormatError {
  readonly expansionNeeded = true;
  constructor(
    readonly path: string,
    readonly expansion: ExpansionPlan,
    readonly unallocated: number,
    host: string,
  ) {
    super(
      `${path} cannot be mapped read-write: ${bytes(unallocated)} of it ${unallocated > 1 ? 'are' : 'is'} not allocated in the image (a dynamic image's absent blocks), where writes through a direct mapping would vanish. ` +
        `At boot, vdboot first expands it in place (${expansion.blocks} block${expansion.blocks === 1 ? '' : 's'} of ${humanSize(expansion.blockSize)} allocated and zero-filled; the file grows from ${bytes(expansion.fileSize)} to ${bytes(expansion.newFileSize)} on ${host}), then plans again and maps it directly (rd.vdisk.expand=0 refuses instead). ` +
        `Without expanding it: ${EXPAND_REMEDIES}.`,
      'expand', path,
    );
  }
}

export function isExpansionNeeded(e: unknown): e is ExpansionNeeded {
  return typeof e === 'object' && e !== null && (e as { expansionNeeded?: unknown }).expansionNeeded === true;
}

/**
 * Called by the planner for a rw mapping of an image with `unallocated` bytes and no
 * parent data. Throws ExpansionNeeded when vdboot can expand it; returns the reason it
 * cannot otherwise (the planner's refusal names it). A malformed image throws its FormatError.
 */
export function checkExpansion(req: ImageRequest, image: OpenedImage, host: ImageHost, unallocated: number): string {
  if (!req.expand) return 'rd.vdisk.expand=0 forbids expanding it in place';
  const top = image.layers[0]!;
  const reason = expansionRefusal(top.layer.format, top.layer.subformat);
  if (reason) return reason;
  if (image.layers.length > 1) return 'it has a parent image, whose data expanding it would need';
  const prepared = prepareExpansion(host.chain.openFile(top.path), req.path);
  if (prepared.plan.blocks === 0 && prepared.plan.partialBlocks === 0) {
    throw new FormatError(`${req.path}: the planner sees ${bytes(unallocated)} unallocated, but its block table has no absent block: the image is inconsistent. Check a copy with "qemu-img check"`, 'expand', req.path);
  }
  throw new ExpansionNeeded(req.path, prepared.plan, unallocated, host.description);
}
