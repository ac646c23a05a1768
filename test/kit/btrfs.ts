/**
 * btrfs test filesystems with subvolumes, as Ubuntu (`@`, `@home`) and Fedora (`root`,
 * `home`) install them. Debian 12's mkfs.btrfs has no --subvol, so the filesystem is made by
 * mkfs.btrfs on image files, attached to loop devices, mounted by this machine's kernel, and
 * filled with `btrfs subvolume create` and a copy of each subvolume's folder, then unmounted
 * and the loop devices detached (a btrfs spanning several images is forgotten by the
 * kernel's device list again). Needs root, losetup and btrfs in the running kernel:
 * `btrfsAvailable()` says whether this machine can.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { makeExt4, makePartitionedDisk, type PartitionSpec } from '../../qemu/disks.ts';

export function btrfsAvailable(): boolean {
  if (process.getuid?.() !== 0) return false;
  if (spawnSync('mkfs.btrfs', ['--version'], { stdio: 'ignore' }).status !== 0) return false;
  if (spawnSync('losetup', ['--version'], { stdio: 'ignore' }).status !== 0) return false;
  try {
    return /\tbtrfs$/m.test(fs.readFileSync('/proc/filesystems', 'utf8')) || spawnSync('modprobe', ['btrfs'], { stdio: 'ignore' }).status === 0;
  } catch {
    return false;
  }
}

export interface BtrfsOptions {
  /** the member images: one file, or several for a multi-device btrfs (metadata raid1, data single) */
  files: string[];
  /** each member's size in MiB (mkfs.btrfs needs ~110 MiB per device) */
  sizeMiB: number;
  label?: string;
  /** subvolume name → the folder copied into it */
  subvolumes: Record<string, string>;
  /** files in the top level (subvolid 5), outside every subvolume */
  topLevel?: Record<string, string>;
  /** the subvolume made the default (`btrfs subvolume set-default`); else the top level stays default */
  defaultSubvolume?: string;
}

export interface BtrfsMade {
  uuid: string;
  /** subvolume name → its id */
  subvolumeIds: Record<string, number>;
}

/** Makes the btrfs on `opts.files` (created or overwritten). */
export function makeBtrfs(opts: BtrfsOptions): BtrfsMade {
  for (const f of opts.files) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, opts.sizeMiB * 1024 * 1024);
  }
  const mkfs = ['-q', '-f'];
  if (opts.label) mkfs.push('-L', opts.label);
  if (opts.files.length > 1) mkfs.push('-m', 'raid1', '-d', 'single');
  execFileSync('mkfs.btrfs', [...mkfs, ...opts.files], { stdio: ['ignore', 'ignore', 'pipe'] });
  const loops: string[] = [];
  const mnt = fs.mkdtempSync(path.join(path.dirname(opts.files[0]!), 'btrfs-mnt-'));
  let mounted = false;
  try {
    for (const f of opts.files) loops.push(execFileSync('losetup', ['-f', '--show', f], { encoding: 'utf8' }).trim());
    const deviceOpts = loops.length > 1 ? ['-o', loops.map((l) => `device=${l}`).join(',')] : [];
    execFileSync('mount', ['-t', 'btrfs', ...deviceOpts, loops[0]!, mnt]);
    mounted = true;
    const subvolumeIds: Record<string, number> = {};
    for (const [name, dir] of Object.entries(opts.subvolumes)) {
      execFileSync('btrfs', ['subvolume', 'create', path.join(mnt, name)], { stdio: 'ignore' });
      execFileSync('cp', ['-a', `${dir}/.`, path.join(mnt, name)]);
      subvolumeIds[name] = Number(/Subvolume ID:\s*(\d+)/.exec(execFileSync('btrfs', ['subvolume', 'show', path.join(mnt, name)], { encoding: 'utf8' }))![1]);
    }
    for (const [p, content] of Object.entries(opts.topLevel ?? {})) {
      fs.mkdirSync(path.dirname(path.join(mnt, p)), { recursive: true });
      fs.writeFileSync(path.join(mnt, p), content);
    }
    if (opts.defaultSubvolume) execFileSync('btrfs', ['subvolume', 'set-default', String(subvolumeIds[opts.defaultSubvolume]), mnt]);
    const uuid = /uuid: ([0-9a-f-]{36})/.exec(execFileSync('btrfs', ['filesystem', 'show', mnt], { encoding: 'utf8' }))![1]!;
    return { uuid, subvolumeIds };
  } finally {
    if (mounted) execFileSync('umount', [mnt]);
    fs.rmSync(mnt, { recursive: true, force: true });
    for (const l of loops) {
      // the kernel keeps a scanned member in its device list; forget it before the loop goes
      if (loops.length > 1) spawnSync('btrfs', ['device', 'scan', '--forget', l], { stdio: 'ignore' });
      spawnSync('losetup', ['-d', l]);
    }
  }
}

/** A folder holding `files` (path → content), for a subvolume's content. */
export function folderWith(dir: string, files: Record<string, string>): string {
  for (const [p, c] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, p)), { recursive: true });
    fs.writeFileSync(path.join(dir, p), c);
  }
  return dir;
}

/**
 * Ubuntu's btrfs layout as a raw disk `out`: GPT with an ESP and one btrfs (label "ubuntu")
 * whose subvolume `@` holds `rootDir` and `@home` holds `homeDir`; the top level, which stays
 * the default subvolume as Ubuntu leaves it, holds only /which ("top level") and no init.
 * Returns the btrfs partition's place on the disk too.
 */
export function ubuntuBtrfsDisk(out: string, rootDir: string, homeDir: string): BtrfsMade & { offset: number; size: number } {
  const fsFile = `${out}.btrfs`;
  try {
    const made = makeBtrfs({ files: [fsFile], sizeMiB: 128, label: 'ubuntu', subvolumes: { '@': rootDir, '@home': homeDir }, topLevel: { which: 'top level\n' } });
    const part = makePartitionedDisk(out, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsFile, name: 'root' }] })[1]!;
    return { ...made, offset: part.offset, size: part.size };
  } finally {
    fs.rmSync(fsFile, { force: true });
  }
}

/**
 * Fedora's layout as raw disks: the first holds /boot (ext4, label "boot") and a btrfs
 * (label "fedora") with subvolumes `root` (`rootDir`) and `home` (`homeDir`), the top level
 * holding only /which. With `secondMember`, the btrfs spans a second disk too (metadata
 * raid1: the kernel mounts it only with both), whose partitions are that member and then
 * `secondDiskAlso`. Returns the disks and the btrfs UUID.
 */
export function fedoraBtrfsDisks(dir: string, rootDir: string, homeDir: string, opts: { secondMember?: boolean; secondDiskAlso?: PartitionSpec[] } = {}): BtrfsMade & { disks: string[] } {
  const members = [path.join(dir, 'fedora1.btrfs')];
  if (opts.secondMember) members.push(path.join(dir, 'fedora2.btrfs'));
  const boot = path.join(dir, 'fedora-boot.ext4');
  try {
    const made = makeBtrfs({ files: members, sizeMiB: 128, label: 'fedora', subvolumes: { root: rootDir, home: homeDir }, topLevel: { which: 'top level\n' } });
    makeExt4(boot, { sizeMiB: 8, label: 'boot' });
    const disks = [path.join(dir, 'fedora-a.img')];
    makePartitionedDisk(disks[0]!, { table: 'gpt', partitions: [{ image: boot, name: 'boot' }, { image: members[0]!, name: 'fedora' }] });
    if (opts.secondMember) {
      disks.push(path.join(dir, 'fedora-b.img'));
      makePartitionedDisk(disks[1]!, { table: 'gpt', partitions: [{ image: members[1]!, name: 'fedora2' }, ...(opts.secondDiskAlso ?? [])] });
    }
    return { ...made, disks };
  } finally {
    for (const f of [...members, boot]) fs.rmSync(f, { force: true });
  }
}
