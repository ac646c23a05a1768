/**
 * End to end: btrfs roots in subvolumes, as the installers lay them out.
 *  1. Ubuntu's layout inside a dynamic VHDX on NTFS: GPT with an ESP and one btrfs whose
 *     subvolume `@` is the root (`@home` beside it), booted as root=vdisk:… rootflags=subvol=@;
 *  2. Fedora's layout as a plain root, spread over two disks: /boot ext4, then a btrfs with
 *     subvolumes `root` and `home` whose second member is on the other disk (metadata raid1,
 *     so the kernel mounts it only when vdboot has registered both with
 *     BTRFS_IOC_DEVICES_READY); root=UUID=… rootflags=subvol=root, and resume= a swap LV
 *     on the second disk: the kernel gets the LV, the guest reads it back in /sys/power/resume.
 * In both the top level of the btrfs holds no init and a decoy file, so only the named
 * subvolume boots; the guest prints /which, a file that exists only in that subvolume, and
 * /proc/mounts's subvol= option. The filesystems are made by mkfs.btrfs and mounted on loop
 * devices on this machine to create the subvolumes (test/kit/btrfs.ts).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { btrfsAvailable, fedoraBtrfsDisks, folderWith, ubuntuBtrfsDisk } from '../kit/btrfs.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { imageHostDisk } from '../kit/rw-check.ts';
import { makeLvmPv } from '../kit/stack-disk.ts';

const can = btrfsAvailable() && lvmAvailable();

/** the guest's proof of where it booted from */
const SUBVOL_FACTS = [
  guestFact('which', '$(cat /which)'),
  guestFact('home', '$(cat /home/which 2>/dev/null || echo none)'),
  guestFact('resume', '$(cat /sys/power/resume)'),
  'for d in /sys/block/dm-*; do [ -e "$d/dm/name" ] && echo "VDBOOT-GUEST dm.$(cat $d/dm/name)=$(cat $d/dev)"; done',
];

let dir: string;
let initrd: string;
let ubuntuHost: string;
let fedoraDisks: string[];
let fedoraUuid: string;
const vms: Vm[] = [];

/** a guest root holding /which = `name` */
function guestRoot(name: string): string {
  const root = join(dir, `root-${name}`);
  buildGuestRoot(root, { commands: SUBVOL_FACTS, files: { which: `${name}\n` } });
  return root;
}

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-btrfs-e2e-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  // Ubuntu's disk as the disk of a VM: a dynamic VHDX on an NTFS partition
  const ubuntuDisk = join(dir, 'ubuntu.img');
  ubuntuBtrfsDisk(ubuntuDisk, guestRoot('@'), folderWith(join(dir, 'home-u'), { which: '@home\n' }));
  const vhdx = join(dir, 'ubuntu.vhdx');
  convertImage(ubuntuDisk, vhdx, 'vhdx', ['subformat=dynamic']);
  ubuntuHost = imageHostDisk(dir, 'ubuntu-host', 'ntfs', 'VMs/Ubuntu/ubuntu.vhdx', vhdx, false, 256).disk;
  // Fedora over two disks; the second also holds an LVM PV with a swap LV
  const swap = join(dir, 'swap.img');
  fs.writeFileSync(swap, '');
  fs.truncateSync(swap, 8 << 20);
  execFileSync('mkswap', ['-q', swap]);
  const pv = makeLvmPv(dir, 12, 'vg0', [{ name: 'swap', sizeMiB: 8, image: swap }]).pv;
  const fedora = fedoraBtrfsDisks(dir, guestRoot('root'), folderWith(join(dir, 'home-f'), { which: 'home\n' }), {
    secondMember: true, secondDiskAlso: [{ image: pv, name: 'lvm', type: 'E6D6D379-F507-44C2-A23C-238F2A3DF928' }],
  });
  fedoraDisks = fedora.disks;
  fedoraUuid = fedora.uuid;
  for (const f of [ubuntuDisk, vhdx, swap, pv]) fs.rmSync(f);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('end to end: btrfs subvolumes (Ubuntu @, Fedora root)', { timeout: 400_000 }, () => {
  it('Ubuntu inside a dynamic VHDX on NTFS: root=vdisk:… rootflags=subvol=@ boots the @ subvolume', async () => {
    const vm = await bootVm({ initrd, name: 'btrfs-ubuntu-vhdx', append: 'root=vdisk:LABEL=Windows:/VMs/Ubuntu/ubuntu.vhdx rd.vdisk.mode=snapshot rootflags=subvol=@', disks: [{ file: ubuntuHost, interface: 'virtio-blk', snapshot: true }] });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    expect(t).toMatch(/mounted \/dev\/mapper\/vdisk0p2 \(btrfs, ro, subvol=@\)/);
    expect(facts.root.fstype).toBe('btrfs');
    expect(facts.root.options).toContain('subvol=/@');
    expect(facts.facts.which).toBe('@');
  });

  it('Fedora as a plain root over two disks: root=UUID=… rootflags=subvol=root waits for both members; resume= hands the swap LV to the kernel', async () => {
    const vm = await bootVm({
      initrd, name: 'btrfs-fedora-plain', append: `root=UUID=${fedoraUuid} rootflags=subvol=root resume=/dev/vg0/swap`,
      disks: fedoraDisks.map((file) => ({ file, interface: 'virtio-blk' as const, snapshot: true })),
    });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    expect(t).toMatch(new RegExp(`btrfs UUID=${fedoraUuid} \\("fedora"\\): all 2 devices registered with the kernel \\(/dev/vd[ab]\\d \\(devid \\d\\), /dev/vd[ab]\\d \\(devid \\d\\)\\)`));
    expect(t).not.toMatch(/matches \/dev\/vd/); // two members of one btrfs are no ambiguity
    expect(t).toMatch(/resume=\/dev\/vg0\/swap: no hibernation image on/);
    expect(facts.root.fstype).toBe('btrfs');
    expect(facts.root.options).toContain('subvol=/root');
    expect(facts.facts.which).toBe('root');
    // the kernel's resume device is the swap LV vdboot activated
    expect(facts.facts['dm.vg0-swap']).toMatch(/^\d+:\d+$/);
    expect(facts.facts.resume).toBe(facts.facts['dm.vg0-swap']);
  });
});
