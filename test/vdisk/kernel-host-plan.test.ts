/**
 * `vdboot plan` against a disk whose host partition holds a filesystem only the kernel
 * reads (ext4, btrfs): the plan cannot mount it on the build machine, so it says how the
 * image would be resolved at boot instead of reporting a failure.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { command as planCommand } from '../../src/cli/plan.ts';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { tmpDir } from './helpers.ts';

let dir: string;
let ext4Disk: string;
let btrfsDisk: string;

beforeAll(() => {
  dir = tmpDir();
  const ext4 = path.join(dir, 'host.ext4');
  makeExt4(ext4, { sizeMiB: 16, label: 'linuxhost', files: { '/VMs/linux.img': 'x'.repeat(4096) } });
  ext4Disk = path.join(dir, 'ext4-disk.img');
  makePartitionedDisk(ext4Disk, { table: 'gpt', partitions: [{ image: ext4, name: 'data' }] });
  const btrfs = path.join(dir, 'host.btrfs');
  fs.writeFileSync(btrfs, '');
  fs.truncateSync(btrfs, 128 * 1024 * 1024);
  const tree = path.join(dir, 'tree');
  fs.mkdirSync(tree);
  const r = spawnSync('mkfs.btrfs', ['-q', '-L', 'btrfshost', '-r', tree, btrfs], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mkfs.btrfs failed: ${r.stderr}`);
  btrfsDisk = path.join(dir, 'btrfs-disk.img');
  makePartitionedDisk(btrfsDisk, { table: 'gpt', partitions: [{ image: btrfs, name: 'data' }] });
}, 60_000);

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function plan(cmdline: string, disk: string): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await planCommand.run(['--cmdline', cmdline, '--disk', disk], { stdout: (t: string) => { out += t; }, stderr: (t: string) => { err += t; } } as never);
  return { code, out, err };
}

describe('vdboot plan: an image on a host only the kernel reads', () => {
  it('ext4: says the kernel mounts it at boot through vdhost and the direct path depends on FIEMAP; not a failure', async () => {
    const r = await plan('root=vdisk:LABEL=linuxhost:/VMs/linux.img rw', ext4Disk);
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/\/dev\/sda1 .*ext4 LABEL="linuxhost"/);
    expect(r.out).toMatch(/\/VMs\/linux\.img is on \/dev\/sda1 \(ext4, LABEL="linuxhost"\), a filesystem vdboot does not read itself\. At boot the kernel mounts it at \/run\/vdboot\/host through \/dev\/mapper\/vdhost/);
    expect(r.out).toMatch(/direct path when the filesystem's FIEMAP places all of it, as it is, on \/dev\/sda1 \(and, read-write, the file has no holes or unwritten ranges\); else the loop path/);
    expect(r.out).toMatch(/cannot show the image chain or device-mapper tables/);
    expect(r.out).not.toMatch(/would fail/);
  });

  it('btrfs: read-write direct needs a No_COW file', async () => {
    const r = await plan('root=vdisk:LABEL=btrfshost:/VMs/linux.img rw', btrfsDisk);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/\(btrfs, LABEL="btrfshost"\).*and is No_COW, without data checksums\); else the loop path/);
  });

  it('root=vdisk:PATH without a host does not search it, and says to name the host', async () => {
    const r = await plan('root=vdisk:/VMs/linux.img rw', ext4Disk);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/Not searched \(not NTFS, exFAT or FAT\): .*\/dev\/sda1 ext4/);
    expect(r.err).toMatch(/An image on a filesystem the kernel mounts \(ext4, xfs, btrfs, …\) is found when the host is named: root=vdisk:LABEL=…:\/VMs\/linux\.img/);
  });
});
