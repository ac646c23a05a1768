/**
 * End to end: vdboot's own initramfs (built by `vdboot mkinitramfs` from this checkout)
 * boots Debian's kernel under QEMU to a guest init on a plain root, for every device-spec
 * form and every storage controller of the universal set; a missing root ends in a rescue
 * shell that answers commands typed on the serial console.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk, type PartitionLayout } from '../../qemu/disks.ts';
import { buildGuestRoot, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type DiskInterface, type Vm } from '../../qemu/harness.ts';

const hasCryptsetup = existsSync('/usr/sbin/cryptsetup');
const cryptsetupVersion = hasCryptsetup ? execFileSync('/usr/sbin/cryptsetup', ['--version'], { encoding: 'utf8' }).trim() : undefined;
const ROOT_UUID = '3f6a2c1e-9b0d-4e55-8a7f-1c2d3e4f5a6b';
const ROOT_LABEL = 'vd root';
const PART_NAME = 'guest-root';
const PART_UUID = '9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4';

let dir: string;
let initrd: string;
let disk: string;
let layout: PartitionLayout[];
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  const rootDir = join(dir, 'root');
  buildGuestRoot(rootDir, { files: { 'sbin/init2': '#!/bin/sh\nexec /sbin/init "$@"\n' } });
  chmodSync(join(rootDir, 'sbin/init2'), 0o755);
  const fsImg = join(dir, 'root.ext4');
  makeExt4(fsImg, { sizeMiB: 24, label: ROOT_LABEL, uuid: ROOT_UUID, fromDir: rootDir });
  disk = join(dir, 'disk.img');
  // Root on the second partition, so "the first partition" is never a lucky guess.
  layout = makePartitionedDisk(disk, {
    table: 'gpt',
    partitions: [
      { sizeMiB: 2, type: 'uefi', name: 'esp' },
      { image: fsImg, name: PART_NAME, uuid: PART_UUID, type: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709' },
    ],
  });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
});

async function boot(append: string, iface: DiskInterface = 'virtio-blk') {
  const vm = await bootVm({ initrd, append, disks: [{ file: disk, interface: iface, snapshot: true }], name: `plain-${iface}` });
  vms.push(vm);
  return vm;
}

async function bootToGuest(append: string, iface: DiskInterface) {
  const vm = await boot(append, iface);
  await vm.waitFor(GUEST_MARKER, 150_000);
  const facts = parseGuestFacts(vm.transcript());
  await vm.waitExit(60_000);
  return { vm, facts };
}

describe('end to end: vdboot boots a plain root under QEMU', { timeout: 240_000 }, () => {
  it('virtio-blk, root=/dev/vda2, read-only by default', async () => {
    const { facts, vm } = await bootToGuest('root=/dev/vda2', 'virtio-blk');
    expect(facts.root).toMatchObject({ device: '/dev/vda2', fstype: 'ext4', mode: 'ro' });
    expect(facts.pid).toBe(1);
    expect(vm.transcript()).toMatch(/vdboot: .*loading \d+ modules for the devices present/);
    expect(layout[1]!.name).toBe(PART_NAME);
  });

  it('virtio-scsi, root=UUID=…, rw', async () => {
    const { facts } = await bootToGuest(`root=UUID=${ROOT_UUID} rw`, 'virtio-scsi');
    expect(facts.root).toMatchObject({ device: '/dev/sda2', fstype: 'ext4', mode: 'rw' });
  });

  it('AHCI, root="LABEL=…" with a space, init= with arguments after --', async () => {
    const { facts } = await bootToGuest(`"root=LABEL=${ROOT_LABEL}" init=/sbin/init2 -- first "second arg"`, 'ahci');
    expect(facts.root.device).toBe('/dev/sda2');
    expect(facts.args).toEqual(['first', 'second arg']);
  });

  it('NVMe, root=PARTUUID=…', async () => {
    const { facts } = await bootToGuest(`root=PARTUUID=${PART_UUID}`, 'nvme');
    expect(facts.root.device).toBe('/dev/nvme0n1p2');
  });

  it('USB storage, root=PARTLABEL=… with rootwait', async () => {
    const { facts } = await bootToGuest(`root=PARTLABEL=${PART_NAME} rootwait`, 'usb-storage');
    expect(facts.root.device).toBe('/dev/sda2');
  });

  it('a missing root lists the devices and starts a rescue shell that answers typed commands; its cryptsetup mounts its own image and runs', async () => {
    const vm = await boot('root=LABEL=no-such-root rd.timeout=3', 'virtio-blk');
    await vm.waitFor(/did not appear within 3 s/, 150_000);
    await vm.waitFor(/\/dev\/vda2 .*ext4 LABEL="vd root"/, 5_000);
    await vm.waitFor(/vdboot# /, 30_000);
    vm.send('echo answer-$((6*7))\n');
    await vm.waitFor(/answer-42/, 30_000);
    if (hasCryptsetup) {
      // packed by default: the wrapper loads squashfs, mounts the image and runs the program;
      // the version is the build machine's cryptsetup's
      vm.send('cryptsetup --version; echo "MOUNTED $(grep -c " /run/vdboot/tools/cryptsetup squashfs " /proc/mounts)"\n');
      await vm.waitFor(new RegExp(`^${cryptsetupVersion!.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`), 60_000);
      await vm.waitFor(/^MOUNTED 1$/, 30_000);
    }
    await vm.kill();
  });
});
