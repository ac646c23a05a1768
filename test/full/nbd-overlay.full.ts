/**
 * Persistent overlays on a partition (npm run test:full): a client's overlay on a GPT
 * partition named vdboot-overlay, over a dynamic VHDX that nbdkit serves read-only on stdio
 * through QEMU's user network (restrict=on). In order:
 *   1. rd.vdisk.overlay.init=1 makes the overlay on the blank partition; the guest writes.
 *   2. The served image is changed on the server (qemu-io writes it: a new DataWriteGuid, a
 *      new block): the next boot refuses the overlay, saying what changed, and writes nothing
 *      to it (its bytes are the same afterwards).
 *   3. rd.vdisk.overlay.init=reset starts the overlay over on the new image: the guest sees
 *      none of the first boot's writes, and the console says why it was started over.
 *   4. An overlay partition that holds an ext4 filesystem is refused, even with init=1, and
 *      left as it was.
 */
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makePartitionedDisk, readPartitions } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';

let dir: string;
let served: string;
let initrd: string;
let overlayDisk: string;
let ext4Disk: string;
const vms: Vm[] = [];

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const partitionBytes = (disk: string): Buffer => {
  const p = readPartitions(disk)[0]!;
  return readFileSync(disk).subarray(p.offset, p.offset + p.size);
};

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-full-overlay-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const { raw } = makeGuestDisk(dir, {
    commands: [
      'n=$(( $(cat /root/boots 2>/dev/null || echo 0) + 1 ))',
      'echo $n > /root/boots && sync',
      guestFact('boots', '$n'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  });
  served = join(dir, 'served');
  mkdirSync(served);
  convertImage(raw, join(served, 'disk.vhdx'), 'vhdx', ['subformat=dynamic', 'block_size=1048576']);
  overlayDisk = join(dir, 'overlay.img');
  makePartitionedDisk(overlayDisk, { table: 'gpt', partitions: [{ sizeMiB: 32, type: 'linux', name: 'vdboot-overlay' }] });
  const ext4 = join(dir, 'home.ext4');
  makeExt4(ext4, { sizeMiB: 16, label: 'home', files: { 'keep.txt': 'precious\n' } });
  ext4Disk = join(dir, 'ext4.img');
  makePartitionedDisk(ext4Disk, { table: 'gpt', partitions: [{ image: ext4, type: 'linux', name: 'vdboot-overlay' }] });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

function nbdNet(folder: string): string[] {
  const cmd = `nbdkit -s -r --log=null file dir=${folder}`.replace(/,/g, ',,');
  return ['-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:${cmd}`, '-device', 'virtio-net-pci,netdev=n0'];
}

async function boot(name: string, disk: string, append: string): Promise<Vm> {
  const vm = await bootVm({
    initrd,
    append: `root=vdisk:nbd://10.0.2.100/disk.vhdx ip=dhcp rd.vdisk.overlay=PARTLABEL=vdboot-overlay ${append} rw`,
    disks: [{ file: disk }],
    extraArgs: nbdNet(served),
    name,
  });
  vms.push(vm);
  return vm;
}

async function bootToGuest(name: string, disk: string, append: string): Promise<string> {
  const vm = await boot(name, disk, append);
  await vm.waitFor(GUEST_MARKER, 480_000);
  await vm.waitExit(180_000);
  return vm.transcript().replace(/\r/g, '');
}

async function bootToRefusal(name: string, disk: string, append: string): Promise<string> {
  const vm = await boot(name, disk, `${append} rd.shell=0`);
  await vm.waitFor(/rd\.shell=0: no rescue shell/, 480_000);
  await vm.kill();
  return vm.transcript().replace(/\r/g, '');
}

describe('rd.vdisk.overlay on a partition: made, refused over a changed image, reset; a partition with a filesystem refused', () => {
  it('init=1, then a changed base refused, then init=reset', async () => {
    const t1 = await bootToGuest('ovl-init', overlayDisk, 'rd.vdisk.overlay.init=1');
    expect(t1).toMatch(/vdisk0: writes go to the persistent overlay \/dev\/vda1 .*new \(rd\.vdisk\.overlay\.init\)/);
    expect(parseGuestFacts(t1).facts.boots).toBe('1');

    execFileSync('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 20M 64k', join(served, 'disk.vhdx')], { stdio: 'ignore' });
    const kept = sha256(partitionBytes(overlayDisk));
    const t2 = await bootToRefusal('ovl-changed', overlayDisk, '');
    expect(t2).toMatch(/rd\.vdisk\.overlay=PARTLABEL=vdboot-overlay \(\/dev\/vda1\) holds writes made over \/disk\.vhdx \(vhdx dynamic, [^)]*\), but the image booted now is not that image: layer 1 was written since \(DataWriteGuid [0-9a-f-]+, was [0-9a-f-]+\); its allocation tables changed\./);
    expect(t2).toMatch(/rd\.vdisk\.overlay\.init=reset/);
    expect(t2).not.toMatch(/VDBOOT-GUEST-OK/);
    expect(sha256(partitionBytes(overlayDisk))).toBe(kept);

    const t3 = await bootToGuest('ovl-reset', overlayDisk, 'rd.vdisk.overlay.init=reset');
    expect(t3).toMatch(/started over \(rd\.vdisk\.overlay\.init=reset: layer 1 was written since/);
    expect(parseGuestFacts(t3).facts.boots).toBe('1');
  }, 2_400_000);

  it('a partition with an ext4 filesystem is never taken, even with init=1', async () => {
    const before = sha256(partitionBytes(ext4Disk));
    const t = await bootToRefusal('ovl-ext4', ext4Disk, 'rd.vdisk.overlay.init=1');
    expect(t).toMatch(/rd\.vdisk\.overlay=PARTLABEL=vdboot-overlay \(\/dev\/vda1\) holds a filesystem of type ext4, LABEL=home, UUID=[0-9a-f-]+; vdboot never writes over that/);
    expect(sha256(partitionBytes(ext4Disk))).toBe(before);
  }, 900_000);
});
