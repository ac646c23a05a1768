/**
 * ExtentMap: how a virtual disk's bytes lie in files (DESIGN §3).
 *
 * A map is a sorted, gap-free list of extents covering [0, size) of the virtual disk.
 * `data` extents name a file of the image chain by index (`files[i]`) and an offset in
 * it; `zero` extents read as zeros; `unmappable` extents exist but cannot be handed to
 * device-mapper (compressed, encrypted, needs a log replay) and say why.
 * Adjacent extents that are contiguous on both sides are always merged.
 */

export interface DataExtent {
  kind: 'data';
  /** virtual offset, bytes */
  start: number;
  length: number;
  /** index into ExtentMap.files */
  file: number;
  /** byte offset inside that file */
  offset: number;
}

export interface ZeroExtent {
  kind: 'zero';
  start: number;
  length: number;
  /**
   * Why it reads as zero: `unallocated` (a dynamic image's absent block: rw must not
   * map it to dm-zero, writes would vanish), `zeroed` (the format says zeros and a
   * write there would need a table update too), `uninitialized` (NTFS past initialized
   * size / a host hole).
   */
  why: 'unallocated' | 'zeroed' | 'uninitialized';
}

export interface UnmappableExtent {
  kind: 'unmappable';
  start: number;
  length: number;
  /** e.g. "zlib-compressed cluster", "streamOptimized grain" */
  reason: string;
}

export type Extent = DataExtent | ZeroExtent | UnmappableExtent;

/** A range one layer of a chain leaves to its parent (image.ts, chain.ts). */
export interface ParentExtent {
  kind: 'parent';
  start: number;
  length: number;
}

/** What one format reader reports for one layer: the map's kinds plus `parent`. */
export type LayerExtent = DataExtent | ZeroExtent | UnmappableExtent | ParentExtent;

export interface ExtentMap {
  /** virtual size in bytes */
  size: number;
  /** the files data extents point into, by index: names as given to the opener */
  files: string[];
  extents: Extent[];
}
