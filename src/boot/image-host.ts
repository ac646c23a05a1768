/**
 * What planning an image boot starts from (vdisk.ts's planVdisk, expand-plan.ts's
 * expansionFor and planFills): the request from the command line (ImageRequest) and the host side
 * that reads the image's files and says where they lie (ImageHost: hostdev.ts for NTFS,
 * exFAT and FAT, fiemap.ts for a Linux filesystem, the CLI's files for `vdboot plan`).
 * Types only, below the planner and the hosts alike.
 */
import type { ChainHost } from '../formats/chain.ts';
import type { FileLayout } from '../formats/extent-ops.ts';
import type { VdiskMapPath, VdiskMode, VdiskRootChoice } from './plan.ts';

export interface ImageRequest {
  /** N of vdiskN */
  index: number;
  /** the dm name instead of vdiskN (vdiskload --name) */
  name?: string;
  /** path on the host filesystem */
  path: string;
  mode: VdiskMode;
  map: VdiskMapPath;
  expand: boolean;
  /** rd.vdisk.allow-outside=1: the image may name files outside its folder (chain.ts's confinement) */
  allowOutside?: boolean;
  /** which partition is root; undefined for an attached image */
  root?: VdiskRootChoice;
  /** qemu-nbd is in the initramfs (vdboot mkinitramfs --with qemu-nbd): the nbd path exists */
  nbd?: boolean;
  /**
   * rd.vdisk.overlay: the snapshot's store is a persistent one on a local disk ("P", the
   * store device named $COW), and the plan carries the image's identity to check it against
   */
  persistentOverlay?: boolean;
}

/** The host side of an image: how to read its files and where they lie. */
export interface ImageHost {
  /** "/dev/sda2 (ntfs, LABEL=Windows)" */
  description: string;
  /** the host device's path, for direct tables */
  device: string;
  chain: ChainHost;
  /** the physical extents of a host file, or null when vdboot cannot tell (no direct path) */
  layout(path: string): FileLayout | null;
  /**
   * Proves that the clusters of these host files belong to them alone (NTFS: no other
   * file or system file claims any, hostdev.ts); throws FormatError naming the other owner.
   * Absent where the host cannot tell (a kernel-mounted filesystem).
   */
  checkOwnership?(paths: readonly string[]): void;
  /** byte ranges of the host device that read as zeros and drop writes (BlockDeviceInfo.deadRanges) */
  deadRanges?: ReadonlyArray<{ offset: number; length: number }>;
  /** why the host filesystem must not be written (hibernated, dirty), or null */
  writeBlocker: string | null;
  /**
   * Why the host filesystem must not be written through a driver (expansion, hole filling,
   * loop), when writes inside an image's own clusters (the direct path) are still safe: an
   * NTFS volume a Linux driver left dirty. Absent or null otherwise.
   */
  driverWriteBlocker?: string | null;
  /** what the console says on a rw boot that is allowed despite such a flaw */
  writeWarning?: string | null;
  /** the host device's logical sector size (512 when unknown) */
  logicalBlockSize?: number;
  /** where file extents come from when not vdboot's own reader, for the console ("ext4's FIEMAP") */
  layoutSource?: string;
}
