/**
 * The host partition of an image file: finding it (a device spec, or every partition
 * searched for the path, like grub4dos `find --set-root`), opening its filesystem with
 * vdboot's own readers, and reading image files through it for the chain resolver.
 * Pure: devices come in as BlockDeviceInfo plus a way to read them, so the same code
 * runs at boot (Sys.pread) and in `vdboot plan` (disk image files).
 */
import { type BlockReader, FormatError, isFormatError } from '../formats/block-reader.ts';
import type { ChainHost } from '../formats/chain.ts';
import type { FileLayout } from '../formats/extent-ops.ts';
import { hostFileReader, type HostFile, type HostFs } from '../formats/host-volume.ts';
import { openHostFs } from '../formats/hostfs.ts';
import { FIEMAP_DIRECT_FS } from './fiemap.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import type { ImageHost } from './image-host.ts';

export interface ClosableReader extends BlockReader {
  close(): void;
}

/** A block device the planner may read. */
export interface HostDevice {
  info: BlockDeviceInfo;
  open(): ClosableReader;
}

/** The filesystems vdboot reads itself and can map files of directly. */
export const HOST_FS_TYPES: ReadonlySet<string> = new Set(['ntfs', 'exfat', 'vfat']);

/**
 * Filesystems the kernel mounts for vdboot to reach an image file on them (fiemap.ts):
 * at /run/vdboot/host, with the file's places on the partition from FIEMAP.
 */
export const KERNEL_HOST_FS_TYPES: ReadonlySet<string> = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs', 'f2fs', 'jfs', 'reiserfs', 'nilfs2', 'bcachefs', 'iso9660', 'udf', 'hfsplus']);

/** The host holds a filesystem the kernel mounts for vdboot rather than one vdboot reads. */
export function isKernelHost(d: BlockDeviceInfo): boolean {
  return d.fsType !== undefined && KERNEL_HOST_FS_TYPES.has(d.fsType);
}

/** The message for a kernel-mounted host where vdboot cannot mount (`vdboot plan` on a disk file); FormatError field "kernel-host". */
export function kernelHostError(d: BlockDeviceInfo, path: string): FormatError {
  return new FormatError(
    `${path} is on ${describeHost(d)}, a filesystem vdboot does not read itself. At boot the kernel mounts it at /run/vdboot/host through /dev/mapper/vdhost (read-only, unless the loop path writes through it) ` +
      `and vdboot reads the image through it. ${FIEMAP_DIRECT_FS.has(d.fsType ?? '') ? `The image takes the direct path when the filesystem's FIEMAP places all of it, as it is, on ${d.path} (and, read-write, the file has no holes or unwritten ranges${d.fsType === 'btrfs' ? ' and is No_COW, without data checksums' : ''}); else the loop path. ` : `The image takes the loop path (through the kernel's ${d.fsType} driver). `}` +
      `Without mounting it, this machine cannot show the image chain or device-mapper tables.`,
    'kernel-host', d.path,
  );
}

/** A host filesystem opened by vdboot on one device. */
export interface OpenedHostFs {
  device: BlockDeviceInfo;
  fs: HostFs;
  close(): void;
}

export function describeHost(d: BlockDeviceInfo): string {
  const facts = [d.fsType ?? 'no filesystem found'];
  if (d.label) facts.push(`LABEL="${d.label}"`);
  else if (d.uuid) facts.push(`UUID=${d.uuid}`);
  return `${d.path} (${facts.join(', ')})`;
}

/** Opens the filesystem on `dev`; FormatError when it is none vdboot reads. */
export function openHostDevice(dev: HostDevice): OpenedHostFs {
  const reader = dev.open();
  try {
    const fs = openHostFs(reader);
    if (!fs) {
      throw new FormatError(
        `${describeHost(dev.info)} holds no NTFS, exFAT or FAT filesystem, the ones vdboot reads itself to find image files. ` +
          `Put the image on such a partition, or name the right one (root=vdisk:LABEL=…:/path).`,
        'host', dev.info.path,
      );
    }
    return { device: dev.info, fs, close: () => reader.close() };
  } catch (e) {
    reader.close();
    throw e;
  }
}

export interface FoundImage {
  host: OpenedHostFs;
  file: HostFile;
}

/**
 * Finds `path` on the device matching `spec`, or when `spec` is undefined on every
 * partition holding a filesystem vdboot reads (exactly one may have it: two copies are
 * refused, naming both). The error names every partition searched and what each holds.
 */
export function findImage(devices: readonly HostDevice[], spec: DeviceSpec | undefined, path: string): FoundImage {
  const candidates = spec ? devices.filter((d) => deviceMatches(spec, d.info)) : devices.filter((d) => d.info.fsType !== undefined && HOST_FS_TYPES.has(d.info.fsType));
  const searched: string[] = [];
  let lastError: unknown;
  let found: FoundImage | undefined;
  for (const dev of candidates) {
    if (spec && isKernelHost(dev.info)) throw kernelHostError(dev.info, path);
    let host: OpenedHostFs;
    try {
      host = openHostDevice(dev);
    } catch (e) {
      if (!isFormatError(e) && (e as Error).name !== 'SysError') throw e;
      searched.push(`${describeHost(dev.info)}: ${(e as Error).message}`);
      lastError = e;
      continue;
    }
    try {
      const file = host.fs.lookup(path);
      if (spec) return { host, file };
      // Searching: a second copy (a backup stick) must not be booted, and written, by
      // the chance of which disk appeared first.
      if (found) {
        const first = found.host.device;
        found.host.close();
        host.close();
        throw new FormatError(
          `${path} is on more than one partition: ${describeHost(first)} and ${describeHost(dev.info)}. ` +
            `Name the one to boot on the kernel command line, e.g. root="vdisk:${first.uuid ? `UUID=${first.uuid}` : first.label ? `LABEL=${first.label}` : first.path}:${path}"`,
          'path', path,
        );
      }
      found = { host, file };
      continue;
    } catch (e) {
      if (isFormatError(e) && /is on more than one partition/.test((e as Error).message)) throw e;
      host.close();
      if (!isFormatError(e) && (e as Error).name !== 'SysError') throw e;
      searched.push(`${describeHost(dev.info)}: ${(e as Error).message}`);
      lastError = e;
    }
  }
  if (found) return found;
  if (spec && candidates.length === 1 && lastError) throw lastError;
  const others = devices.filter((d) => !candidates.includes(d)).map((d) => `${d.info.path} ${d.info.fsType ?? '(no filesystem)'}`);
  const where = spec ? formatDeviceSpec(spec) : 'any partition';
  throw new FormatError(
    `Could not find ${path} on ${where}. ` +
      (candidates.length ? `Searched ${candidates.length} partition${candidates.length === 1 ? '' : 's'}:${searched.map((s) => `\n  ${s}`).join('')}` : 'No partition holds an NTFS, exFAT or FAT filesystem to search.') +
      (others.length ? `\nNot searched (${spec ? 'not matching, or ' : ''}not NTFS, exFAT or FAT): ${others.join(', ')}` : '') +
      (!spec && devices.some((d) => isKernelHost(d.info)) ? `\nAn image on a filesystem the kernel mounts (ext4, xfs, btrfs, …) is found when the host is named: root=vdisk:LABEL=…:${path}` : '') +
      (!spec && devices.some((d) => d.info.fsType === 'BitLocker') ? `\nBitLocker partitions (${devices.filter((d) => d.info.fsType === 'BitLocker').map((d) => d.info.path).join(', ')}) are unlocked and searched only when named: root=vdisk:PARTUUID=${devices.find((d) => d.info.fsType === 'BitLocker')!.info.partuuid ?? '…'}:${path}` : '') +
      `\nCheck the path (it starts with "/"; "\\" works too) and the host spec on the kernel command line.`,
    'path', path,
  );
}

/** The chain resolver's view of the host filesystem: paths are host paths; files are read through their extents. */
export function hostChainHost(host: OpenedHostFs, known: readonly HostFile[] = []): ChainHost & { lookup(path: string): HostFile } {
  // Looking a big file up walks its whole allocation (a FAT chain): each file once.
  const files = new Map<string, HostFile>(known.map((f) => [f.path, f]));
  const lookup = (p: string): HostFile => {
    let f = files.get(p);
    if (!f) {
      f = host.fs.lookup(p);
      files.set(p, f);
    }
    return f;
  };
  return {
    openFile: (p) => hostFileReader(host.fs, lookup(p)),
    // What the file is (its MFT record, its first cluster); else the volume's own spelling, case-insensitive as NTFS and FAT are.
    fileId: (p) => {
      const f = lookup(p);
      return f.id ?? f.path.toLowerCase();
    },
    caseInsensitive: true,
    // A differencing VDI names no parent file: its parent is found by UUID among its neighbours.
    listDir: (dir) => host.fs.readdir(dir).filter((e) => !e.isDir).map((e) => e.name),
    lookup,
  };
}

/** Where a host file's bytes lie on the host device, for composing a direct mapping. */
export function hostFileLayout(host: OpenedHostFs, file: HostFile): FileLayout {
  if (file.resident) {
    throw new FormatError(`${file.path} on ${describeHost(host.device)} is only ${file.size} bytes, stored inside its NTFS record: it has no clusters to map`, 'path', file.path);
  }
  return { device: host.device.path, extents: file.extents, size: file.size, ...(file.allocationUnit ? { allocationUnit: file.allocationUnit } : {}) };
}

/** The planner's view of a found image's host: the chain host, file layouts, the write blocker. */
export function imageHostFor(host: OpenedHostFs, known: readonly HostFile[] = []): ImageHost {
  const chain = hostChainHost(host, known);
  return {
    description: describeHost(host.device),
    device: host.device.path,
    chain,
    layout: (p) => hostFileLayout(host, chain.lookup(p)),
    checkOwnership: (paths) => host.fs.proveOwnership?.(paths.map((p) => chain.lookup(p))),
    ...(host.device.deadRanges?.length ? { deadRanges: host.device.deadRanges } : {}),
    writeBlocker: host.fs.writeBlocker(),
    driverWriteBlocker: host.fs.driverWriteBlocker?.() ?? null,
    writeWarning: host.fs.writeWarning?.() ?? null,
  };
}
