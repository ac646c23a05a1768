/**
 * Host filesystems read by vdboot itself (DESIGN §3, `direct` path): given a partition,
 * find a file by path and return where its bytes lie on the partition, so an image file
 * can be mapped with device-mapper straight onto the partition's sectors.
 *
 * NTFS (ntfs.ts), exFAT (exfat.ts) and FAT12/16/32 (fat.ts) implement HostFs; openHostFs
 * picks one by the boot sector's signature; what they share (the HostFs contract, HostFile,
 * reading through extents, path helpers) is in host-volume.ts. Everything read from the
 * partition is untrusted: every offset and size is checked before use.
 */
import type { BlockReader } from './block-reader.ts';
import type { HostFs } from './host-volume.ts';
import { openNtfs, isNtfsBootSector } from './ntfs.ts';
import { openExfat, isExfatBootSector } from './exfat.ts';
import { openFat, isFatBootSector } from './fat.ts';

/** The filesystem on `partition`, or null when it is not NTFS, exFAT or FAT. */
export function openHostFs(partition: BlockReader): HostFs | null {
  if (partition.size < 512) return null;
  const boot = partition.read(0, 512);
  if (isNtfsBootSector(boot)) return openNtfs(partition);
  if (isExfatBootSector(boot)) return openExfat(partition);
  if (isFatBootSector(boot)) return openFat(partition);
  return null;
}
