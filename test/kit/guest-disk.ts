/** The end-to-end kit's guest disk: the one the root=vdisk: tests turn into images. */
import { join } from 'node:path';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, type GuestOptions } from '../../qemu/guest.ts';

/** GPT type of a "Linux root (x86-64)" partition, which rd.vdisk.root=auto picks. */
export const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';

/**
 * The test guest (qemu/guest.ts) as a raw GPT disk in `dir`: a 2 MiB ESP, then the guest's
 * ext4 root ("vdisk root", 24 MiB) in a Linux root partition. Returns the disk and the root
 * filesystem image alone.
 */
export function makeGuestDisk(dir: string, guest: GuestOptions, opts: { uuid?: string } = {}): { raw: string; fs: string } {
  const rootDir = join(dir, 'root');
  buildGuestRoot(rootDir, guest);
  const fs = join(dir, 'root.ext4');
  makeExt4(fs, { sizeMiB: 24, label: 'vdisk root', ...(opts.uuid ? { uuid: opts.uuid } : {}), fromDir: rootDir });
  const raw = join(dir, 'guest.raw');
  makePartitionedDisk(raw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fs, type: ROOT_TYPE, name: 'linux' }] });
  return { raw, fs };
}
