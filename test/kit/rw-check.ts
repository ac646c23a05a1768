/**
 * The end-to-end kit's proof of a read-write path: a guest that counts its boots in
 * /count (printed before it is raised, then synced), an image file put on a host of any
 * kind as a sparse or a whole copy, and the checks after the boots, read with tools other
 * than vdboot: the host filesystem clean by its own fsck, `qemu-img check`, `e2fsck -fn` on
 * the guest's root, and the counter inside the image.
 *
 *   COUNTER_COMMANDS                                        guest shell lines (GuestOptions.commands)
 *   imageHostDisk(dir, name, fs, path, image, sparse)       a GPT disk whose one partition holds the image
 *   readImageBack(dir, host, path, out)                     the image file as the host holds it now
 *   expectHostFsClean(dir, host)                            ntfs: vdboot's reader and ntfsfix -n; vfat, exfat, ext4: fsck -n
 *   expectGuestKept(dir, image, format, count)              qemu-img check, e2fsck -fn, /count == count
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { makeExfat, makeExt4, makeFat, makeNtfs, makePartitionedDisk, ntfsAdd, ntfsAddSparse } from '../../qemu/disks.ts';
import { guestFact } from '../../qemu/guest.ts';
import { BASIC_DATA, expectNtfsClean, extractRange } from './host-disk.ts';

/** The guest's boot counter: `count` is the value before this boot raised it. */
export const COUNTER_COMMANDS = ['n=$(cat /count 2>/dev/null || echo 0)', guestFact('count', '$n'), 'echo $((n+1)) > /count', 'sync', guestFact('kernel', '$(uname -r)')];

export type RwHostFs = 'ntfs' | 'vfat' | 'exfat' | 'ext4';

/** The label each host gets: root="vdisk:LABEL=…:PATH". */
export const RW_HOST_LABEL: Record<RwHostFs, string> = { ntfs: 'Windows', vfat: 'USB', exfat: 'STICK', ext4: 'linuxhost' };

const LINUX_FS = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';

export interface ImageHostDisk {
  disk: string;
  kind: RwHostFs;
  /** the partition's bytes on the disk */
  offset: number;
  size: number;
}

/**
 * A host disk `name.img` in `dir` whose one partition (labelled RW_HOST_LABEL[fs]) holds
 * `image` at `path`: sparse (NTFS: cp onto an ntfs-3g mount; ext4: mke2fs -d, which leaves
 * zero blocks out) or whole (ntfscp, mtools, vdboot's exFAT writer, e2cp). FAT and exFAT
 * have no sparse files.
 */
export function imageHostDisk(dir: string, name: string, fs: RwHostFs, path: string, image: string, sparse: boolean, sizeMiB = 160): ImageHostDisk {
  const part = join(dir, `${name}.${fs}`);
  const label = RW_HOST_LABEL[fs];
  if (sparse && (fs === 'vfat' || fs === 'exfat')) throw new Error(`${fs} has no sparse files`);
  if (fs === 'ntfs') {
    makeNtfs(part, { sizeMiB, label });
    if (sparse) ntfsAddSparse(part, path, image);
    else ntfsAdd(part, { [path]: { hostFile: image } });
  } else if (fs === 'vfat') {
    makeFat(part, { sizeMiB, label, files: { [path]: { hostFile: image } } });
  } else if (fs === 'exfat') {
    makeExfat(part, { sizeMiB, label, files: { [path]: { hostFile: image } } });
  } else if (sparse) {
    makeExt4(part, { sizeMiB, label, files: { [path]: { hostFile: image } } });
  } else {
    execFileSync('truncate', ['-s', `${sizeMiB}M`, part]);
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', label, part]);
    const parent = path.slice(0, path.lastIndexOf('/'));
    if (parent) execFileSync('debugfs', ['-w', '-R', `mkdir ${parent}`, part], { stdio: 'ignore' });
    execFileSync('e2cp', [image, `${part}:${path}`]);
  }
  const disk = join(dir, `${name}.img`);
  const [layout] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: part, type: fs === 'ext4' ? LINUX_FS : BASIC_DATA, name: 'host' }] });
  rmSync(part);
  return { disk, kind: fs, offset: layout!.offset, size: layout!.size };
}

/** The image file as the host partition holds it now, copied to `out` by the host's own tools. */
export function readImageBack(dir: string, host: ImageHostDisk, path: string, out: string): string {
  const part = extractRange(host.disk, host.offset, host.size, join(dir, `read-${Date.now()}.${host.kind}`));
  try {
    if (host.kind === 'ntfs') execFileSync('sh', ['-c', 'ntfscat "$1" "$2" > "$3"', 'sh', part, path, out]);
    else if (host.kind === 'vfat') execFileSync('mcopy', ['-n', '-i', part, `::${path}`, out]);
    else if (host.kind === 'ext4') execFileSync('debugfs', ['-R', `dump "${path}" ${out}`, part], { stdio: 'ignore' });
    else {
      // exFAT: exfatprogs reads no files; the FUSE driver does, from a block device (root, /dev/fuse, a loop device)
      const mnt = mkdtempSync(join(dir, 'exfat-'));
      const loop = execFileSync('losetup', ['-f', '--show', '-r', part], { encoding: 'utf8' }).trim();
      try {
        execFileSync('mount.exfat-fuse', ['-o', 'ro', loop, mnt]);
        try {
          execFileSync('cp', [join(mnt, path), out]);
        } finally {
          execFileSync('umount', [mnt]);
        }
      } finally {
        execFileSync('losetup', ['-d', loop]);
        rmSync(mnt, { recursive: true });
      }
    }
  } finally {
    rmSync(part);
  }
  return out;
}

/** The host filesystem is clean, by its own checker (and, for NTFS, vdboot's reader: not dirty, not hibernated). */
export function expectHostFsClean(dir: string, host: ImageHostDisk): void {
  const part = extractRange(host.disk, host.offset, host.size, join(dir, `fsck-${Date.now()}.${host.kind}`));
  try {
    if (host.kind === 'ntfs') {
      expectNtfsClean(part);
      const r = spawnSync('ntfsfix', ['-n', part], { encoding: 'utf8' });
      expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
      return;
    }
    const [cmd, args] = host.kind === 'vfat' ? ['fsck.fat', ['-n', part]] : host.kind === 'exfat' ? ['fsck.exfat', ['-n', part]] : ['e2fsck', ['-fn', part]];
    const r = spawnSync(cmd as string, args as string[], { encoding: 'utf8' });
    expect(r.status, `${cmd}: ${r.stdout}${r.stderr}`).toBe(0);
  } finally {
    rmSync(part);
  }
}

/**
 * The image after its boots: `qemu-img check` passes, `e2fsck -fn` finds the guest's root
 * (3 MiB in: test/kit/guest-disk.ts) clean, and /count holds `count`.
 */
export function expectGuestKept(dir: string, image: string, format: string, count: number): void {
  const check = spawnSync('qemu-img', ['check', '-f', format, image], { encoding: 'utf8' });
  expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
  const raw = `${image}.raw`;
  const root = `${image}.root.ext4`;
  execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', image, raw]);
  try {
    execFileSync('dd', [`if=${raw}`, `of=${root}`, 'bs=1M', 'skip=3', 'status=none']);
    const fsck = spawnSync('e2fsck', ['-fn', root], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const got = execFileSync('debugfs', ['-R', 'cat /count', root], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(got.trim()).toBe(String(count));
  } finally {
    rmSync(raw, { force: true });
    rmSync(root, { force: true });
  }
}
