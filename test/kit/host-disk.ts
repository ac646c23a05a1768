/**
 * The end-to-end kit's host side: host disks (a GPT disk with one NTFS, exFAT or FAT32
 * "Basic data partition" holding image files, built without mounting by qemu/disks.ts),
 * and what the tests check on the host after a boot: a file read back from the host
 * partition, the host filesystem clean, the guest's file inside an image, the virtual disk
 * as qemu reads it.
 *
 *   hostDisk(dir, name, fs, files, opts?): HostDisk        the disk file and where its partition lies
 *   extractRange(disk, offset, size, out): string          bytes of a disk as a file of their own
 *   readHostFile(dir, host, path): Buffer                  a file of the host partition as it is now
 *   copyHostFile(dir, host, path, out): string             the same, written to `out`
 *   expectNtfsClean(file, offset?, size?)                  neither dirty nor hibernated (vdboot's reader)
 *   expectHostClean(dir, host)                             NTFS as above; FAT and exFAT by fsck.fat -n
 *   fileInImage(dir, image, format, guestPath): string     the guest's file (debugfs on the root partition)
 *   qemuRawOf(file, format): Buffer                        the virtual disk by qemu-img convert -O raw
 *   sha256File(file): string
 *   treeOf(root): FileTree                                 every file under a folder, for the disk builders
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { expect } from 'vitest';
import { fatRead, makeExfat, makeFat, makeNtfs, makePartitionedDisk, ntfsRead, type FileTree } from '../../qemu/disks.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { sliceReader } from '../../src/formats/partitions.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';

/** GPT type of a Windows "Basic data partition" (NTFS, exFAT, FAT). */
export const BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';

export type HostFsType = 'ntfs' | 'vfat' | 'exfat';

export interface HostDisk {
  disk: string;
  fs: HostFsType;
  /** the partition's bytes on the disk */
  offset: number;
  size: number;
}

const LABELS: Record<HostFsType, string> = { ntfs: 'Windows', exfat: 'STICK', vfat: 'USB' };

/**
 * A host disk `name.img` in `dir` with one partition "Windows" (NTFS), "STICK" (exFAT) or
 * "USB" (FAT32) of `sizeMiB` (120 by default) holding `files`; `extra` changes the
 * filesystem image before it goes into the disk.
 */
export function hostDisk(dir: string, name: string, fsType: HostFsType, files: FileTree, opts: { sizeMiB?: number; extra?: (img: string) => void } = {}): HostDisk {
  const sizeMiB = opts.sizeMiB ?? 120;
  const img = join(dir, `${name}.${fsType}`);
  if (fsType === 'ntfs') makeNtfs(img, { sizeMiB, label: LABELS.ntfs, files });
  else if (fsType === 'exfat') makeExfat(img, { sizeMiB, label: LABELS.exfat, files });
  else makeFat(img, { sizeMiB, label: LABELS.vfat, files });
  opts.extra?.(img);
  const disk = join(dir, `${name}.img`);
  const layout = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: img, type: BASIC_DATA, name: 'Basic data partition' }] });
  return { disk, fs: fsType, offset: layout[0]!.offset, size: layout[0]!.size };
}

/** Bytes [offset, offset+size) of a disk file as a file of their own at `out`. */
export function extractRange(disk: string, offset: number, size: number, out: string): string {
  writeFileSync(out, readFileSync(disk).subarray(offset, offset + size));
  return out;
}

/** A file from the host partition as it is on the disk now. */
export function readHostFile(dir: string, host: HostDisk, path: string): Buffer {
  const part = extractRange(host.disk, host.offset, host.size, join(dir, `part-${Date.now()}.${host.fs}`));
  try {
    return host.fs === 'ntfs' ? ntfsRead(part, path) : fatRead(part, path);
  } finally {
    rmSync(part);
  }
}

/** readHostFile, written to `out`; returns `out`. */
export function copyHostFile(dir: string, host: HostDisk, path: string, out: string): string {
  writeFileSync(out, readHostFile(dir, host, path));
  return out;
}

/** The NTFS volume at `offset` of `file` (the whole file by default) is neither dirty nor hibernated, by vdboot's reader. */
export function expectNtfsClean(file: string, offset = 0, size?: number): void {
  const r = openFileReader(file);
  try {
    expect(openHostFs(sliceReader(r, offset, size ?? r.size - offset, 'ntfs'))?.writeBlocker()).toBeNull();
  } finally {
    r.close();
  }
}

/** The host filesystem is clean: NTFS neither dirty nor hibernated (vdboot's reader); FAT by fsck.fat -n. */
export function expectHostClean(dir: string, host: HostDisk): void {
  if (host.fs === 'ntfs') {
    expectNtfsClean(host.disk, host.offset, host.size);
  } else {
    const part = extractRange(host.disk, host.offset, host.size, join(dir, `fsck-${Date.now()}.vfat`));
    const r = spawnSync('fsck.fat', ['-n', part], { encoding: 'utf8' });
    rmSync(part);
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
  }
}

/**
 * The guest's file, read from an image on the host: qemu-img convert, then debugfs on the
 * root partition, which starts 3 MiB in (1 MiB alignment, then the 2 MiB ESP: guest-disk.ts).
 */
export function fileInImage(dir: string, image: string, format: string, guestPath: string): string {
  const raw = join(dir, `check-${Date.now()}.raw`);
  execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', image, raw]);
  const part = `${raw}.ext4`;
  execFileSync('dd', [`if=${raw}`, `of=${part}`, 'bs=1M', 'skip=3', 'status=none']);
  try {
    return execFileSync('debugfs', ['-R', `cat ${guestPath}`, part], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } finally {
    rmSync(raw);
    rmSync(part);
  }
}

/** The virtual disk of `file` as qemu reads it (qemu-img convert -O raw next to the file). */
export function qemuRawOf(file: string, format: string): Buffer {
  const out = `${file}.raw`;
  execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', file, out]);
  try {
    return readFileSync(out);
  } finally {
    rmSync(out);
  }
}

export function sha256File(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/** Every file under `root` as a FileTree of host files, for the test-disk builders. */
export function treeOf(root: string): FileTree {
  const files: FileTree = {};
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else files[`/${relative(root, p)}`] = { hostFile: p };
    }
  };
  walk(root);
  return files;
}
