/**
 * The chain resolver: opens an image by content, follows its parents, and composes one
 * ExtentMap for the whole chain.
 *
 * API:
 *
 *   openDefinitionPartition(definition: string, name: string, host: ChainHost): OpenedImage
 *       A disk definition's partition image as the boot opens it (confined to the
 *       definition's folder); what `vdboot vdisk-table` sizes.
 *   openImage(path: string, host: ChainHost): OpenedImage
 *       Detects the format of `path` by content, opens the layer, validates its extents
 *       (inside its files, not on its own metadata: see LayerMetadata in extent-ops.ts),
 *       and resolves `parent` extents by opening ParentRef.paths in order (relative
 *       paths are relative to the child's directory) and calling verify(). A chain
 *       deeper than MAX_CHAIN_DEPTH (64) or one that opens the same file twice is a
 *       FormatError. The result's map.files[] is the union of every layer's files
 *       (resolved paths), readers[] the matching BlockReaders.
 *
 *   openLayer(file: BlockReader, ctx: OpenContext, expected?: ImageFormat,
 *             readers?: readonly FormatReader[]): ImageLayer
 *       Detects (or, when `expected` is given, checks) the format and opens one layer.
 *
 *   OpenedImage.readUnmappable(start, length): Uint8Array
 *       Reads any virtual range through the layers (decompressing through the layer's
 *       readUnmappable where a range is unmappable). read-map.ts uses it for the
 *       unmappable parts of the map.
 *
 *   joinPath(dir, path), dirName(path), normalizePath(path): re-exported from paths.ts.
 */
import { FormatError, isFormatError, type BlockReader } from './block-reader.ts';
import { dirName, isInside, joinPath, normalizePath, resolveImageName } from './paths.ts';
import { detectFormat, FORMAT_READERS, readerFor } from './detect.ts';
import type { Extent, ExtentMap } from './extent-map.ts';
import { appendExtent, findExtent, isMerged, validateExtents, type LayerMetadata } from './extent-ops.ts';
import type { ChainLayer, FormatReader, ImageFormat, ImageLayer, OpenContext, OpenedImage } from './image.ts';

export { dirName, joinPath, normalizePath };

export const MAX_CHAIN_DEPTH = 64;

export interface ChainHost {
  /** Opens a file (absolute path, or relative to the working directory); throws when it cannot. */
  openFile(path: string): BlockReader;
  /**
   * What a file is, whatever its spelling ("dev:ino", an NTFS MFT record number): two
   * names of one file are one file of the image set, so overlaps and loops are caught
   * through links, "./" and case. Without it the normalized path stands for the file.
   */
  fileId?(path: string): string;
  /**
   * 'device' for a device node, 'link' for a symbolic link the host does not resolve
   * (realPath absent), 'other' for anything else that is not a regular file; optional.
   */
  fileKind?(path: string): 'file' | 'device' | 'link' | 'other';
  /** The path with every symbolic link followed, when the host has links; optional. */
  realPath?(path: string): string;
  /**
   * Files named by the image may lie outside its folder, be absolute paths or device
   * nodes (rd.vdisk.allow-outside=1, --allow-outside). Off by default: see confinement below.
   */
  allowOutside?: boolean;
  /** Names that differ only in case are one name (NTFS, exFAT, FAT): "../vms/x" is inside "/VMs". */
  caseInsensitive?: boolean;
  /** The formats to try; FORMAT_READERS by default. */
  readers?: readonly FormatReader[];
  /** Names in a directory (a VDI parent is found by UUID among its neighbours); optional. */
  listDir?(dir: string): string[];
}

export function openLayer(
  file: BlockReader,
  ctx: OpenContext,
  expected?: ImageFormat,
  readers: readonly FormatReader[] = FORMAT_READERS,
): ImageLayer & LayerMetadata {
  let reader: FormatReader;
  if (expected !== undefined) {
    const r = readerFor(expected, readers);
    if (!r) throw new FormatError(`${ctx.path}: its child says it is ${expected}, a format vdboot cannot read`, 'format', expected);
    if (expected !== 'raw') {
      const head = file.read(0, Math.min(4096, file.size));
      if (!r.probe(head, file)) {
        throw new FormatError(`${ctx.path}: its child says it is ${expected}, but its content is not; was the parent replaced?`, 'format', expected);
      }
    }
    reader = r;
  } else {
    reader = detectFormat(file, readers);
  }
  return reader.open(file, ctx);
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export function openImage(path: string, host: ChainHost): OpenedImage {
  return openChain(path, host, undefined);
}

const ALLOW_OUTSIDE_HINT = 'If you trust this image set, boot with rd.vdisk.allow-outside=1 (on this machine: vdboot inspect|map|cat|plan --allow-outside)';

/**
 * Confinement: every file an image names (extents, data files, parents, a disk
 * definition's partition images) lies in the folder of the image the person named, or
 * below it, and is a regular file. An image is untrusted input: without this a crafted
 * VMDK extent "/Windows/secret.bin" or "../../x", or a qcow2 backing file /dev/sda, would
 * be mapped (and written) as the guest's disk. `root` is that folder.
 */
function confine(host: ChainHost, root: string, p: string, namedBy: string): void {
  if (host.allowOutside) return;
  const refuse = (why: string): never => {
    throw new FormatError(`${namedBy} names ${p}, ${why}: vdboot opens only files in the image's folder ${root} or below it. ${ALLOW_OUTSIDE_HINT}; or move the file into ${root} and name it there.`, 'outside', p);
  };
  const inside = host.caseInsensitive ? isInside(root.toLowerCase(), p.toLowerCase()) : isInside(root, p);
  if (!inside) refuse(p.startsWith('/') && !root.startsWith('/') ? 'an absolute path' : 'which lies outside that folder');
  if (host.realPath) {
    let real: string | undefined;
    let realRoot: string | undefined;
    try {
      real = host.realPath(p);
      realRoot = host.realPath(root);
    } catch {
      // a missing file: opening it says so
    }
    if (real !== undefined && realRoot !== undefined && !isInside(realRoot, real)) refuse(`a link to ${real}, outside that folder`);
  }
  let kind: 'file' | 'device' | 'link' | 'other' = 'file';
  try {
    kind = host.fileKind?.(p) ?? 'file';
  } catch {
    // a missing file: opening it says so
  }
  if (kind === 'device') refuse('a device node, not a file');
  if (kind === 'link') refuse('a symbolic link, which vdboot does not follow there (it could lead anywhere, even outside the host filesystem)');
  if (kind === 'other') refuse('which is not a regular file');
}

/**
 * The folder an image's files must lie in: the named image's own, except that a VirtualBox
 * snapshot (the VM's Snapshots/ folder) reaches its base disk in the VM's folder above it.
 */
export function confinementRoot(image: string): string {
  const folder = dirName(normalizePath(image));
  const last = folder.slice(folder.lastIndexOf('/') + 1);
  return /^snapshots$/i.test(last) ? dirName(folder) : folder;
}

/**
 * A disk definition's partition image `name`, opened as a boot opens it through the
 * definition: confined to the definition's folder (unless host.allowOutside), a whole chain
 * of its own, never another definition. For `vdboot vdisk-table`, which sizes the partitions.
 */
export function openDefinitionPartition(definition: string, name: string, host: ChainHost): OpenedImage {
  const top = normalizePath(definition);
  const root = confinementRoot(top);
  const q = resolveImageName(dirName(top), name);
  confine(host, root, q, top);
  return openChain(q, { ...host, readers: (host.readers ?? FORMAT_READERS).filter((r) => r.format !== 'vdisk-json') }, root);
}

function openChain(path: string, host: ChainHost, outerRoot: string | undefined): OpenedImage {
  const readersList = host.readers ?? FORMAT_READERS;
  const top = normalizePath(path);
  const root = outerRoot ?? confinementRoot(top);
  const files: string[] = [];
  const readers: BlockReader[] = [];
  // by identity (ChainHost.fileId), so two spellings of one file are one index
  const byId = new Map<string, number>();
  const fileIdOf = (p: string): string => {
    try {
      return host.fileId ? host.fileId(p) : p;
    } catch {
      return p;
    }
  };
  const openGlobal = (resolved: string, namedBy?: string): number => {
    if (namedBy !== undefined) confine(host, root, resolved, namedBy);
    const id = fileIdOf(resolved);
    let i = byId.get(id);
    if (i === undefined) {
      let r: BlockReader;
      try {
        r = host.openFile(resolved);
      } catch (e) {
        if (isFormatError(e)) throw e;
        // A missing or unreadable file named by an image is a problem of the image set: say which file.
        throw new FormatError(`cannot open ${resolved}: ${errorText(e)}`, 'file', resolved);
      }
      i = files.length;
      files.push(resolved);
      readers.push(r);
      byId.set(id, i);
    }
    return i;
  };

  const layers: ChainLayer[] = [];
  const seen = new Map<string, string>();
  const identity = fileIdOf;
  const remember = (p: string) => {
    const id = identity(p);
    const before = seen.get(id);
    if (before !== undefined) {
      throw new FormatError(
        `${path}: the chain of parent images loops: ${p} is ${before === p ? 'opened' : `the same file as ${before}, opened`} twice (chain: ${layers.map((l) => l.path).join(' -> ')} -> ${p})`,
        'parent', p,
      );
    }
    seen.set(id, p);
  };

  const openOne = (p: string, expected?: ImageFormat, namedBy?: string): ChainLayer => {
    const primary = openGlobal(p, namedBy);
    const dir = dirName(p);
    const ctx: OpenContext = {
      path: p,
      openFile: (name) => readers[openGlobal(resolveImageName(dir, name), p)]!,
      // A disk definition's partition images: whole chains of their own, never another definition, confined to the same folder.
      openImage: (name) => {
        const q = resolveImageName(dir, name);
        confine(host, root, q, p);
        return openChain(q, { ...host, readers: readersList.filter((r) => r.format !== 'vdisk-json') }, root);
      },
    };
    if (host.listDir) ctx.listDir = () => host.listDir!(dir);
    const layer = openLayer(readers[primary]!, ctx, expected, readersList);
    const fileIndex = layer.files.map((name, i) => (i === 0 ? primary : openGlobal(resolveImageName(dir, name), p)));
    validateLayer(p, layer, fileIndex, files, readers);
    const hasParentExtent = layer.extents.some((e) => e.kind === 'parent');
    if (hasParentExtent && !layer.parent) {
      throw new FormatError(`${p}: the image leaves ranges to a parent image but names none`, 'parent');
    }
    return { path: p, layer, fileIndex };
  };

  let current = top;
  remember(current);
  layers.push(openOne(current));
  for (;;) {
    const child = layers[layers.length - 1]!;
    const ref = child.layer.parent;
    if (!ref) break;
    if (layers.length >= MAX_CHAIN_DEPTH) {
      throw new FormatError(`${path}: the chain of parent images is deeper than ${MAX_CHAIN_DEPTH} (at ${child.path}); vdboot stops there`, 'parent', layers.length);
    }
    if (ref.paths.length === 0) {
      throw new FormatError(`${child.path}: a differencing image whose parent locator names no file; vdboot cannot find its parent`, 'parent');
    }
    const dir = dirName(child.path);
    const tried: string[] = [];
    let opened: ChainLayer | undefined;
    let loopCandidate: string | undefined;
    for (const cand of ref.paths) {
      const p = resolveImageName(dir, cand);
      if (tried.some((t) => t.startsWith(`${p}:`))) continue;
      // A candidate that is an earlier layer would loop: try the others first.
      if (seen.has(identity(p))) {
        loopCandidate ??= p;
        continue;
      }
      try {
        const layer = openOne(p, ref.format, child.path);
        ref.verify?.(layer.layer);
        opened = layer;
        current = p;
        break;
      } catch (e) {
        if (!isFormatError(e)) throw e;
        tried.push(`${p}: ${errorText(e)}`);
      }
    }
    if (!opened && loopCandidate !== undefined && tried.length === 0) remember(loopCandidate); // throws: the chain loops
    if (!opened) {
      throw new FormatError(
        `${child.path}: its parent image could not be opened. Tried:\n  ${tried.join('\n  ')}\nPut the parent next to the child image (or where the locator says) under its original name`,
        'parent', ref.paths[0],
      );
    }
    remember(current);
    checkLayerFiles(path, layers, opened, files);
    layers.push(opened);
  }

  // Drop files opened only by parent candidates that were not the parent.
  const used = new Set<number>();
  for (const l of layers) for (const g of l.fileIndex) used.add(g);
  if (used.size !== files.length) {
    const remap = new Map<number, number>();
    const keptFiles: string[] = [];
    const keptReaders: BlockReader[] = [];
    files.forEach((f, i) => {
      if (!used.has(i)) return;
      remap.set(i, keptFiles.length);
      keptFiles.push(f);
      keptReaders.push(readers[i]!);
    });
    for (const l of layers) l.fileIndex = l.fileIndex.map((g) => remap.get(g)!);
    files.splice(0, files.length, ...keptFiles);
    readers.splice(0, readers.length, ...keptReaders);
  }

  // Compose from the base up.
  let below: Extent[] = [];
  let belowSize = 0;
  for (let k = layers.length - 1; k >= 0; k--) {
    const { layer, fileIndex } = layers[k]!;
    if (k === layers.length - 1 && fileIndex.every((g, i) => g === i) && layer.extents.every((e) => e.kind !== 'parent') && isMerged(layer.extents)) {
      // the base layer's extents already name the map's files by the same indices, merged
      below = layer.extents as Extent[];
      belowSize = layer.size;
      continue;
    }
    const out: Extent[] = [];
    for (const e of layer.extents) {
      if (e.kind === 'data') appendExtent(out, { kind: 'data', start: e.start, length: e.length, file: fileIndex[e.file]!, offset: e.offset });
      else if (e.kind === 'parent') appendParent(out, below, belowSize, e.start, e.length);
      else appendExtent(out, { ...e });
    }
    below = out;
    belowSize = layer.size;
  }
  const map: ExtentMap = { size: layers[0]!.layer.size, files, extents: below };

  const readLayer = (k: number, start: number, length: number, out: Uint8Array, at: number): void => {
    const { layer, fileIndex } = layers[k]!;
    const end = Math.min(start + length, layer.size);
    let pos = start;
    let i = findExtent(layer.extents, pos);
    while (pos < end && i >= 0 && i < layer.extents.length) {
      const e = layer.extents[i]!;
      const take = Math.min(end, e.start + e.length) - pos;
      const dst = at + (pos - start);
      if (e.kind === 'data') {
        out.set(readers[fileIndex[e.file]!]!.read(e.offset + (pos - e.start), take), dst);
      } else if (e.kind === 'unmappable') {
        if (!layer.readUnmappable) throw new FormatError(`${layers[k]!.path}: virtual bytes ${pos}..${pos + take} cannot be read (${e.reason})`, 'extent', pos);
        out.set(layer.readUnmappable(pos, take), dst);
      } else if (e.kind === 'parent') {
        if (k + 1 < layers.length) readLayer(k + 1, pos, take, out, dst);
      } // zero: out is already zero
      pos += take;
      i++;
    }
  };

  return {
    map,
    layers,
    readers,
    readUnmappable(start: number, length: number): Uint8Array {
      if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > map.size) {
        throw new FormatError(`${path}: read of ${length} bytes at ${start} is outside the ${map.size}-byte disk`, 'offset', start);
      }
      const out = new Uint8Array(length);
      readLayer(0, start, length, out, 0);
      return out;
    },
  };
}

/** Copies the parent's map over [start, start+length); past the parent's end reads as zeros. */
function appendParent(out: Extent[], below: readonly Extent[], belowSize: number, start: number, length: number): void {
  const end = start + length;
  const inParentEnd = Math.min(end, belowSize);
  if (start < inParentEnd) {
    let i = findExtent(below, start);
    for (; i >= 0 && i < below.length; i++) {
      const e = below[i]!;
      if (e.start >= inParentEnd) break;
      const s = Math.max(e.start, start);
      const t = Math.min(e.start + e.length, inParentEnd);
      const piece = { ...e, start: s, length: t - s };
      if (piece.kind === 'data') piece.offset = (e as { offset: number }).offset + (s - e.start);
      appendExtent(out, piece);
    }
  }
  const zeroFrom = Math.max(start, belowSize);
  if (zeroFrom < end) appendExtent(out, { kind: 'zero', start: zeroFrom, length: end - zeroFrom, why: 'unallocated' });
}

/**
 * Validates one layer's extents on the chain's files, by identity: when two of the
 * layer's names are one file ("d.raw" and "./d.raw", "D.RAW" and "d.raw" on NTFS, a
 * qcow2 data_file naming the qcow2 itself), its overlap and metadata checks run on that
 * one file, so data can neither be mapped twice nor onto the layer's own tables.
 */
function validateLayer(p: string, layer: ImageLayer & LayerMetadata, fileIndex: readonly number[], files: readonly string[], readers: readonly BlockReader[]): void {
  if (new Set(fileIndex).size === fileIndex.length) {
    validateExtents(p, layer.size, layer.extents, { fileSizes: fileIndex.map((g) => readers[g]!.size), metadata: layer.metadata, files: layer.files });
    return;
  }
  const extents = layer.extents.map((e) => (e.kind === 'data' ? { ...e, file: fileIndex[e.file] ?? -1 } : e));
  const metadata = (layer.metadata ?? []).map((m) => ({ ...m, file: fileIndex[m.file] ?? -1 }));
  validateExtents(p, layer.size, extents, { fileSizes: readers.map((r) => r.size), metadata, files });
}

/**
 * A file belongs to one layer of a chain. A child that names its parent's file as its own
 * extent (a VMDK "FLAT base.vhd 0" beside parentFileNameHint="base.vhd", a qcow2 overlay
 * whose data_file is its backing file) would expose the parent's tables as guest data, and
 * a read-write boot would write the parent through the child.
 */
function checkLayerFiles(path: string, layers: readonly ChainLayer[], next: ChainLayer, files: readonly string[]): void {
  for (const l of layers) {
    const shared = next.fileIndex.find((g) => l.fileIndex.includes(g));
    if (shared === undefined) continue;
    throw new FormatError(
      `${path}: ${files[shared]} is a file of two layers of the chain, ${l.path} and its parent ${next.path}: ` +
        `a child that names its parent's file as its own data would read the parent's tables as the disk's bytes, and writes would change the parent. ` +
        `The image set is damaged or crafted; rebuild the child (qemu-img create -b) or convert the chain to one image on a trusted machine.`,
      'file', files[shared],
    );
  }
}
