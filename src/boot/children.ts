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

function u32be(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

function u32le(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
}

function ascii(b: Uint8Array, at: number, n: number): string {
  return String.fromCharCode(...b.subarray(at, at + n));
}

/**
 * False when the header shows the file has no parent; true when it has one or the header
 * alone cannot tell (VHDX, VMDK: then the file is opened).
 */
export function mayHaveParent(file: BlockReader): boolean {
  const head = file.read(0, Math.min(512, file.size));
  if (head.length >= 16 && u32be(head, 0) === 0x514649fb) {
    // qcow2: backing_file_offset, a big-endian u64 at 8
    return u32be(head, 8) !== 0 || u32be(head, 12) !== 0;
  }
  if (head.length >= 0x50 && u32le(head, 0x40) === 0xbeda107f) {
    // VDI: the image type follows the header size (at 0x4C; at 0x48 in version 0 headers, which have none); 3 undo, 4 differencing
    const type = u32le(head, u32le(head, 0x44) >>> 16 === 0 ? 0x48 : 0x4c);
    return type === 3 || type === 4;
  }
  if (file.size >= 512) {
    // VHD: the footer in the last 512 bytes (a dynamic VHD copies it at 0); disk type at 60, 4 = differencing
    const footer = ascii(head, 0, 8) === 'conectix' ? head : file.read(file.size - 512, 512);
    if (ascii(footer, 0, 8) === 'conectix') return u32be(footer, 60) === 4;
  }
  return true;
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
