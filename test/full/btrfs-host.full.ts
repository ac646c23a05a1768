/**
 * A btrfs spanning two disks as the host filesystem (metadata raid1, so the kernel mounts it
 * only when both members are registered), holding in its subvolume `VMs` a dynamic VHDX of
 * the test guest and a root archive:
 *  - root=vdisk:LABEL=vms:/VMs/linux.vhdx rd.vdisk.mode=snapshot: vdboot registers both
 *    members, the kernel mounts the btrfs through vdhost, the image takes the loop path
 *    (FIEMAP cannot place a file of a two-device btrfs on one partition) and the guest boots
 *    from the image's root partition;
 *  - root=tmpfs:LABEL=vms:/VMs/rootfs.tar.gz: the same registration before the archive's host
 *    is mounted read-only, then the archive unpacked into the tmpfs root.
 * The oracle is the guest's own view (/which, a file only in that root, and /proc/mounts).
 * Measured under TCG on two busy cores: 47 s and 40 s, plus ~40 s building the disks.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { btrfsAvailable, makeBtrfs } from '../kit/btrfs.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';

const can = btrfsAvailable();
let dir: string;
let initrd: string;
let disks: string[];
let uuid: string;
const vms: Vm[] = [];

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-btrfs-host-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  const vmsDir = join(dir, 'vms');
  fs.mkdirSync(vmsDir);
  // the image's guest: a root that says where it came from
  fs.mkdirSync(join(dir, 'guest'));
  const guest = makeGuestDisk(join(dir, 'guest'), { commands: [guestFact('which', '$(cat /which)')], files: { which: 'the image on the two-disk btrfs\n' } });
  convertImage(guest.raw, join(vmsDir, 'linux.vhdx'), 'vhdx', ['subformat=dynamic']);
  // the archive's guest
  const archiveRoot = join(dir, 'archive-root');
  buildGuestRoot(archiveRoot, { commands: [guestFact('which', '$(cat /which)')], files: { which: 'the archive on the two-disk btrfs\n' } });
  execFileSync('tar', ['-czf', join(vmsDir, 'rootfs.tar.gz'), '-C', archiveRoot, '.']);
  const members = [join(dir, 'vms1.btrfs'), join(dir, 'vms2.btrfs')];
  uuid = makeBtrfs({ files: members, sizeMiB: 160, label: 'vms', subvolumes: { VMs: vmsDir } }).uuid;
  disks = members.map((m, i) => {
    const disk = join(dir, `disk-${i + 1}.img`);
    makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: m, name: `vms${i + 1}` }] });
    fs.rmSync(m);
    return disk;
  });
  fs.rmSync(join(dir, 'guest'), { recursive: true, force: true });
  fs.rmSync(vmsDir, { recursive: true, force: true });
}, 600_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function boot(name: string, append: string): Promise<{ t: string; facts: ReturnType<typeof parseGuestFacts> }> {
  const vm = await bootVm({ initrd, name, append, disks: disks.map((file) => ({ file, interface: 'virtio-blk' as const, snapshot: true })) });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 400_000);
  const t = vm.transcript();
  const facts = parseGuestFacts(t);
  await vm.waitExit(60_000);
  return { t, facts };
}

describe.skipIf(!can)('end to end: a btrfs over two disks holding the image and the root archive', () => {
  it('root=vdisk:LABEL=vms:/VMs/linux.vhdx: both members registered, the host mounted through vdhost, the image booted over the loop path', async () => {
    const { t, facts } = await boot('btrfs-host-vdisk', 'root=vdisk:LABEL=vms:/VMs/linux.vhdx rd.vdisk.mode=snapshot');
    expect(t).toMatch(new RegExp(`btrfs UUID=${uuid} \\("vms"\\): all 2 devices registered with the kernel \\(/dev/vd[ab]1 \\(devid \\d\\), /dev/vd[ab]1 \\(devid \\d\\)\\)`));
    expect(t).toMatch(/mounted \/dev\/mapper\/vdhost \(btrfs, ro\) on \/run\/vdboot\/host/);
    expect(t).toMatch(/linux\.vhdx[^\n]*loop/);
    expect(facts.facts.which).toBe('the image on the two-disk btrfs');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4' });
  });

  it('root=tmpfs:LABEL=vms:/VMs/rootfs.tar.gz: both members registered before the archive\'s host is mounted read-only; the archive boots', async () => {
    const { t, facts } = await boot('btrfs-host-tmpfs', 'root=tmpfs:LABEL=vms:/VMs/rootfs.tar.gz rd.tmpfs.size=64M');
    expect(t).toMatch(new RegExp(`btrfs UUID=${uuid} \\("vms"\\): all 2 devices registered with the kernel`));
    expect(t).toMatch(/mounted \/dev\/vd[ab]1 \(btrfs, ro, nologreplay\) on \/run\/vdboot\/archive-host/);
    expect(facts.root.fstype).toBe('tmpfs');
    expect(facts.facts.which).toBe('the archive on the two-disk btrfs');
  });
});
