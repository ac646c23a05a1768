/**
 * Planning a Fedora image (GPT: /boot ext4, then btrfs with subvolumes root and home, no
 * "Linux root" partition type) inside a dynamic VHDX on NTFS: rd.vdisk.root=auto cannot pick
 * between two Linux filesystems, unless rootflags=subvol= says the root is a btrfs subvolume;
 * then the only btrfs is root. The disk is made by mkfs.btrfs and btrfs subvolume create
 * (test/kit/btrfs.ts); the dry run (vdboot plan's planAgainstDevices) reads it as the boot would.
 */
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planAgainstDevices } from '../../src/cli/plan.ts';
import { convertImage } from '../../qemu/disks.ts';
import { btrfsAvailable, fedoraBtrfsDisks, folderWith } from '../kit/btrfs.ts';
import { imageHostDisk } from '../kit/rw-check.ts';
import { devicesOf } from './helpers.ts';

const can = btrfsAvailable();
let dir: string;
let host: string;

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-btrfs-plan-'));
  const f = fedoraBtrfsDisks(dir, folderWith(join(dir, 'r'), { which: 'root\n' }), folderWith(join(dir, 'h'), { which: 'home\n' }));
  const vhdx = join(dir, 'fedora.vhdx');
  convertImage(f.disks[0]!, vhdx, 'vhdx', ['subformat=dynamic']);
  host = imageHostDisk(dir, 'host', 'ntfs', 'VMs/fedora.vhdx', vhdx, false, 256).disk;
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('rd.vdisk.root=auto with Fedora\'s /boot ext4 beside its btrfs', () => {
  function plan(cmdline: string): string {
    const d = devicesOf([host]);
    try {
      const report = planAgainstDevices(cmdline, d.devices);
      const root = report.vdisks[0]!.root!;
      return `partition ${root.partition.number} (${root.partition.fsType}): ${root.why}`;
    } catch (e) {
      return (e as Error).message;
    } finally {
      d.close();
    }
  }

  it('rootflags=subvol=root: the only btrfs is root', () => {
    expect(plan('root=vdisk:LABEL=Windows:/VMs/fedora.vhdx rd.vdisk.mode=ro rootflags=subvol=root')).toBe('partition 2 (btrfs): the only btrfs, as rootflags=subvol=root names a btrfs subvolume');
    expect(plan('root=vdisk:LABEL=Windows:/VMs/fedora.vhdx rd.vdisk.mode=ro rootflags=compress=zstd,subvolid=256')).toMatch(/^partition 2 \(btrfs\): .*rootflags=subvolid=256/);
  });

  it('without subvol=: two Linux filesystems, and the message lists them with what to name', () => {
    const m = plan('root=vdisk:LABEL=Windows:/VMs/fedora.vhdx rd.vdisk.mode=ro');
    expect(m).toMatch(/cannot tell which partition is root \(2 Linux filesystems/);
    expect(m).toMatch(/partition 1: .* ext4 LABEL="boot"/);
    expect(m).toMatch(/partition 2: .* btrfs LABEL="fedora"/);
    expect(m).toMatch(/rd\.vdisk\.root=N/);
  });
});
