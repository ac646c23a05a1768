/**
 * The chain resolver: opens an image by content, follows its parents, and composes one
 * ExtentMap for the whole chain.
 *
 * API:
 *
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
import { dirName, joinPath, normalizePath } from './paths.ts';
import { detectFormat, FORMAT_READERS, readerFor } from './detect.ts';
import type { Extent, ExtentMap } from './extent-map.ts';
import { appendExtent, findExtent, isMerged, validateExtents, type LayerMetadata } from './extent-ops.ts';
import type { ChainLayer, FormatReader, ImageFormat, ImageLayer, OpenContext, OpenedImage } from './image.ts';

export { dirName, joinPath, normalizePath };

export const MAX_CHAIN_DEPTH = 64;

export interface ChainHost {
  /** Opens a file (absolute path, or relative to the working directory); throws when it cannot. */
  openFile(path: string): BlockReader;
  /** A stable identity of a file (e.g. "dev:ino") to catch loops through links; optional. */
  fileId?(path: string): string;
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
  const readersList = host.readers ?? FORMAT_READERS;
  const files: string[] = [];
  const readers: BlockReader[] = [];
  const byPath = new Map<string, number>();
  const openGlobal = (resolved: string): number => {
    let i = byPath.get(resolved);
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
      byPath.set(resolved, i);
    }
    return i;
  };

  const layers: ChainLayer[] = [];
  const seen = new Map<string, string>();
  const identity = (p: string): string => {
    try {
      return host.fileId ? host.fileId(p) : p;
    } catch {
      return p;
    }
  };
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

  const openOne = (p: string, expected?: ImageFormat): ChainLayer => {
    const primary = openGlobal(p);
    const dir = dirName(p);
    const ctx: OpenContext = {
      path: p,
      openFile: (name) => readers[openGlobal(joinPath(dir, name))]!,
      // A disk definition's partition images: whole chains of their own, never another definition.
      openImage: (name) => openImage(joinPath(dir, name), { ...host, readers: readersList.filter((r) => r.format !== 'vdisk-json') }),
    };
    if (host.listDir) ctx.listDir = () => host.listDir!(dir);
    const layer = openLayer(readers[primary]!, ctx, expected, readersList);
    const fileIndex = layer.files.map((name, i) => (i === 0 ? primary : openGlobal(joinPath(dir, name))));
    validateExtents(p, layer.size, layer.extents, {
      fileSizes: fileIndex.map((g) => readers[g]!.size),
      metadata: layer.metadata,
      files: layer.files,
    });
    const hasParentExtent = layer.extents.some((e) => e.kind === 'parent');
    if (hasParentExtent && !layer.parent) {
      throw new FormatError(`${p}: the image leaves ranges to a parent image but names none`, 'parent');
    }
    return { path: p, layer, fileIndex };
  };

  let current = normalizePath(path);
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
      const p = joinPath(dir, cand);
      if (tried.some((t) => t.startsWith(`${p}:`))) continue;
      // A candidate that is an earlier layer would loop: try the others first.
      if (seen.has(identity(p))) {
        loopCandidate ??= p;
        continue;
      }
      try {
        const layer = openOne(p, ref.format);
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
