/**
 * Differencing images that name an image as their parent: a Hyper-V checkpoint (`.avhdx`,
 * `.avhd`) beside its disk, a VirtualBox snapshot (`Snapshots/{uuid}.vdi`), a qemu overlay.
 * Each reads the blocks it has not changed from the parent, so writing the parent changes
 * what the child reads: its filesystem is corrupted without a trace. A read-write boot of
 * an image is refused while such a child exists (vdisk.ts); snapshot and ro boots are not.
 *
 * Only the image's own folder and its `Snapshots` subfolder are searched (where Hyper-V and
 * VirtualBox put them). A neighbour is opened only when its header says it has a parent,
 * so large unrelated images next to it cost one small read each.
 */
import { isFormatError, type BlockReader } from '../formats/block-reader.ts';
import type { ChainHost } from '../formats/chain.ts';
import { openLayer } from '../formats/chain.ts';
import type { ImageLayer, OpenContext } from '../formats/image.ts';
import { dirName, joinPath } from '../formats/paths.ts';
import { parseQcow2Header, probeQcow2 } from '../formats/qcow2.ts';
import { parseVdiHeader, probeVdi } from '../formats/vdi.ts';
import { parseVhdFooter } from '../formats/vhd.ts';

export interface ChildSearch {
  /** differencing images whose parent this image is, as they are now */
  children: string[];
  /** images that name this one as their parent but no longer match it (already modified): not protected */
  stale: { path: string; why: string }[];
  /** neighbours that could not be read to tell whether this image is their parent, and why */
  unreadable: { path: string; why: string }[];
  /** neighbours left unexamined past the limit */
  skipped: number;
}

/** Extensions of the formats vdboot reads that can have a parent. */
const DIFFERENCING_NAME = /\.(a?vhdx?|vdi|vmdk|qcow2?)$/i;
/** How many neighbours are examined at most (one small read each unless the header names a parent). */
export const MAX_NEIGHBOURS = 1024;

/**
 * False when the header shows the file has no parent; true when it has one or the header
 * alone cannot tell (VHDX, VMDK, or a header its format's parser rejects: then the file is
 * opened, and what cannot be opened is reported).
 */
export function mayHaveParent(file: BlockReader): boolean {
  const head = file.read(0, Math.min(512, file.size));
  try {
    if (probeQcow2(head)) return parseQcow2Header(head, file).backingFileOffset !== 0;
    if (probeVdi(head)) {
      const type = parseVdiHeader(head, file).imageType;
      return type === 3 || type === 4; // undo, differencing
    }
    if (file.size >= 512) {
      // a dynamic VHD copies its footer at 0; a fixed one has it only at the end
      const footer = isVhdFooter(head) ? head : file.read(file.size - 512, 512);
      if (isVhdFooter(footer)) return parseVhdFooter(footer, file.name).diskType === 4;
    }
  } catch (e) {
    if (!isFormatError(e)) throw e;
  }
  return true;
}

function isVhdFooter(b: Uint8Array): boolean {
  return b.length >= 8 && String.fromCharCode(...b.subarray(0, 8)) === 'conectix';
}

/** The last component of a path written with / or \. */
function baseName(p: string): string {
  return p.slice(Math.max(p.lastIndexOf('/'), p.lastIndexOf('\\')) + 1);
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Differencing images in `path`'s folder (and its `Snapshots` subfolder) whose parent is
 * `top`, the image at `path`. Names are compared without regard to case, as Windows and
 * the FAT family do; the child's own check of its parent (UUID, data write GUID, CID) then
 * decides, so a child made of an earlier state of the image is reported as stale.
 */
export function findChildImages(path: string, top: ImageLayer, host: ChainHost): ChildSearch {
  const out: ChildSearch = { children: [], stale: [], unreadable: [], skipped: 0 };
  if (!host.listDir) return out;
  const dir = dirName(path);
  const self = path.toLowerCase();
  const candidates: string[] = [];
  for (const d of [dir, joinPath(dir, 'Snapshots')]) {
    let names: string[];
    try {
      names = host.listDir(d);
    } catch {
      continue; // no Snapshots folder
    }
    for (const n of names) {
      const p = joinPath(d, n);
      if (DIFFERENCING_NAME.test(n) && p.toLowerCase() !== self) candidates.push(p);
    }
  }
  // Most likely children first: Hyper-V names a checkpoint after its disk ("disk_GUID.avhdx"), VirtualBox keeps them in Snapshots/.
  const stem = baseName(path).replace(/\.[^.]*$/, '').toLowerCase();
  const rank = (p: string): number => (baseName(p).toLowerCase().startsWith(stem) ? 0 : p.includes('/Snapshots/') ? 1 : 2);
  candidates.sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
  if (candidates.length > MAX_NEIGHBOURS) out.skipped = candidates.length - MAX_NEIGHBOURS;
  for (const p of candidates.slice(0, MAX_NEIGHBOURS)) {
    const childDir = dirName(p);
    let layer: ImageLayer;
    try {
      const file = host.openFile(p);
      if (!mayHaveParent(file)) continue;
      const ctx: OpenContext = {
        path: p,
        openFile: (name) => host.openFile(joinPath(childDir, name)),
        listDir: () => host.listDir!(childDir),
      };
      layer = openLayer(file, ctx, undefined, host.readers);
    } catch (e) {
      // A damaged or unreadable neighbour is reported, not thrown: the planner refuses rw over it (it could be a child).
      out.unreadable.push({ path: p, why: errorText(e) });
      continue;
    }
    const ref = layer.parent;
    if (!ref) continue;
    // Named by its path, or by its name alone: a parent named by an absolute path of another
    // machine (C:\Users\…\disk.vmdk from a VirtualBox snapshot) is this one if the child's own check says so.
    const selfName = baseName(path).toLowerCase();
    const named = ref.paths.some((c) => joinPath(childDir, c).toLowerCase() === self || baseName(c).toLowerCase() === selfName);
    // A VDI names its parent by UUID only: its check below is the whole test.
    const byIdentity = ref.format === 'vdi' && top.format === 'vdi';
    if (!named && !byIdentity) continue;
    if (!ref.verify) {
      out.children.push(p);
      continue;
    }
    try {
      ref.verify(top);
      out.children.push(p);
    } catch (e) {
      if (!isFormatError(e)) throw e;
      if (named) out.stale.push({ path: p, why: errorText(e) });
    }
  }
  return out;
}
