/**
 * The contract between one image format's reader and the chain resolver.
 *
 * A format reader opens ONE layer (one image in a chain: a VHD, a qcow2 overlay, a VMDK
 * with its extent files) and describes it as LayerExtents. Ranges the layer leaves to
 * its parent (a differencing VHD's absent block, a qcow2 overlay's unallocated
 * cluster, a VMDK delta's missing grain) are `parent` extents; the chain resolver
 * (chain.ts) opens the parent and composes the final ExtentMap, returned as an
 * OpenedImage (defined here, so readers that open other images — disk definitions —
 * need not import the resolver).
 */
import type { BlockReader } from './block-reader.ts';
import type { ExtentMap, LayerExtent } from './extent-map.ts';
import type { LayerMetadata, MetadataRange } from './extent-ops.ts';
import type { LogWrite } from './vhdx-log.ts';

export type ImageFormat = 'raw' | 'vhd' | 'vhdx' | 'vdi' | 'vmdk' | 'qcow' | 'qcow2' | 'vdisk-json';

export interface ParentRef {
  /** Candidate paths in the order to try them (relative ones are relative to the child's directory). */
  paths: string[];
  /** Checks the opened parent (UUID, CID, size); throws FormatError naming both files when it is not the one. */
  verify?(parent: ImageLayer): void;
  /** The format the child expects (qcow2 backing_fmt), if it says. */
  format?: ImageFormat;
}

export interface ImageLayer {
  format: ImageFormat;
  /** e.g. "dynamic", "fixed", "differencing", "monolithicSparse", "v3" */
  subformat: string;
  /** virtual size in bytes */
  size: number;
  /** the files this layer's data extents point into (index = DataExtent.file); files[0] is the opened file */
  files: string[];
  /** sorted, gap-free, covering [0, size) */
  extents: LayerExtent[];
  parent?: ParentRef;
  /** the layer's identity, for a child's verify(): VHD/VHDX/VDI UUID, VMDK CID */
  id?: string;
  /** facts for `vdboot inspect`: block size, allocated blocks, logical sector size, … */
  details: Record<string, string | number | boolean>;
  /**
   * VHDX: the log's updates, replayed in memory to read the image; a writer must write them
   * (and then clear the log) before anything else.
   */
  logReplay?: { entries: number; writes: LogWrite[] };
  /**
   * Reads bytes of an `unmappable` range (decompressing on the host). Absent when the
   * layer has none or cannot read them at all (encryption).
   */
  readUnmappable?(start: number, length: number): Uint8Array;
  /** The layer's own structures in its files (header, tables): no data extent may point into them. */
  metadata?: MetadataRange[];
}

export interface ChainLayer {
  /** the layer's path as resolved (relative to the child's directory) */
  path: string;
  layer: ImageLayer & LayerMetadata;
  /** layer.files[i] → index in OpenedImage.map.files */
  fileIndex: number[];
}

/** An image with its whole chain, as chain.ts's openImage returns it. */
export interface OpenedImage {
  map: ExtentMap;
  /** [0] is the image opened, [1] its parent, … */
  layers: ChainLayer[];
  /** BlockReaders by map file index */
  readers: BlockReader[];
  readUnmappable(start: number, length: number): Uint8Array;
}

export interface OpenContext {
  /** The opened file's path as the user gave it. */
  path: string;
  /** Opens another file of the same layer or a parent, relative to this file's directory unless absolute. */
  openFile(path: string): BlockReader;
  /** Names (not paths) in this file's directory, when the host can list it (VDI parents by UUID). */
  listDir?(): string[];
  /** Opens another image with its whole chain, relative to this file's directory (disk definitions). */
  openImage?(path: string): OpenedImage;
}

export interface FormatReader {
  format: ImageFormat;
  /** True when the first bytes (at least 4096, fewer for a smaller file) and the size look like this format. */
  probe(head: Uint8Array, file: BlockReader): boolean;
  open(file: BlockReader, ctx: OpenContext): ImageLayer;
}
