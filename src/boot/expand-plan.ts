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
import { planFill, type FillPlan } from '../formats/expand/fill.ts';
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
    /** the image's expansion, when it has absent blocks vdboot can allocate */
    readonly expansion: ExpansionPlan | undefined,
    readonly unallocated: number,
    host: string,
    /** the image file's holes and uninitialized ranges on the host, filled first (fill.ts) */
    readonly fills: readonly FillPlan[] = [],
  ) {
    const steps: string[] = [];
    for (const f of fills) {
      steps.push(`fills ${f.name}'s ${bytes(f.zeroBytes)} of holes and uninitialized ranges on ${host} through the host's driver (${bytes(f.writeBytes)} rewritten in whole units of ${humanSize(f.unit)}), so that they have a place on the partition`);
    }
    if (expansion) {
      steps.push(`expands it in place (${expansion.blocks} block${expansion.blocks === 1 ? '' : 's'} of ${humanSize(expansion.blockSize)} allocated and zero-filled; the file grows from ${bytes(expansion.fileSize)} to ${bytes(expansion.newFileSize)} on ${host})`);
    }
    const why = expansion
      ? `${bytes(unallocated)} of it ${unallocated > 1 ? 'are' : 'is'} not allocated in the image (a dynamic image's absent blocks), where writes through a direct mapping would vanish`
      : `${bytes(fills.reduce((n, f) => n + f.zeroBytes, 0))} of the file lie in holes or past its initialized size on ${host} (a sparse copy, or a file grown without being written), where a write through the partition would stay invisible to the host filesystem, and writing them through some drivers (ntfs3) loses data`;
    super(
      `${path} cannot be mapped read-write${fills.length ? ' as it is' : ''}: ${why}. ` +
        `At boot, vdboot first ${steps.join(', then ')}, then plans again and maps it directly (rd.vdisk.expand=0 refuses instead). ` +
        `Without ${fills.length ? 'that' : 'expanding it'}: ${EXPAND_REMEDIES}.`,
      'expand', path,
    );
  }
}

export function isExpansionNeeded(e: unknown): e is ExpansionNeeded {
  return typeof e === 'object' && e !== null && (e as { expansionNeeded?: unknown }).expansionNeeded === true;
}

/** The expansion a rw mapping needs, or why vdboot cannot expand the image. */
export function expansionFor(req: ImageRequest, image: OpenedImage, host: ImageHost, unallocated: number): ExpansionPlan | string {
  if (!req.expand) return 'rd.vdisk.expand=0 forbids expanding it in place';
  const top = image.layers[0]!;
  const reason = expansionRefusal(top.layer.format, top.layer.subformat);
  if (reason) return reason;
  if (image.layers.length > 1) return 'it has a parent image, whose data expanding it would need';
  const prepared = prepareExpansion(host.chain.openFile(top.path), req.path);
  if (prepared.plan.blocks === 0 && prepared.plan.partialBlocks === 0) {
    throw new FormatError(`${req.path}: the planner sees ${bytes(unallocated)} unallocated, but its block table has no absent block: the image is inconsistent. Check a copy with "qemu-img check"`, 'expand', req.path);
  }
  return prepared.plan;
}

/**
 * The image's own files (not a parent's) that lie on the host with holes or uninitialized
 * ranges: a rw boot fills them through the host's driver first (fill.ts), whatever data
 * path follows, so that no write ever lands in a hole — not through the partition, where it
 * would stay invisible, and not through a driver such as ntfs3, which loses data there.
 */
export function planFills(image: OpenedImage, host: ImageHost): FillPlan[] {
  const fills: FillPlan[] = [];
  const used = new Set<number>();
  for (const e of image.map.extents) if (e.kind === 'data') used.add(e.file);
  for (const i of image.layers[0]!.fileIndex) {
    if (!used.has(i)) continue;
    const name = image.map.files[i]!;
    let layout;
    try {
      layout = host.layout(name);
    } catch (e) {
      if ((e as Error).name === 'FormatError') continue; // no layout: no direct path; the planner says why
      throw e;
    }
    if (!layout) continue;
    const size = layout.size ?? layout.extents.reduce((n, x) => Math.max(n, x.fileOffset + x.length), 0);
    const f = planFill(name, size, layout.extents, layout.allocationUnit);
    if (f) fills.push(f);
  }
  return fills;
}

/**
 * A rw boot of an image whose files have holes on the host: ExpansionNeeded carrying the
 * fills, and the expansion too when the image also has absent blocks vdboot can allocate.
 * Returns when there is nothing to fill, or rd.vdisk.expand=0 forbids writing.
 */
export function checkFills(req: ImageRequest, image: OpenedImage, host: ImageHost, unallocated: number, expansion?: ExpansionPlan): void {
  if (!req.expand || req.mode !== 'rw') return;
  const fills = planFills(image, host);
  if (!fills.length) return;
  throw new ExpansionNeeded(req.path, expansion, unallocated, host.description, fills);
}
