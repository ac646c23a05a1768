/**
 * End to end on Debian 12's 6.12 kernel, whose modules ship as .ko.xz: the default
 * initramfs keeps them compressed (in an uncompressed cpio appended to the zstd one), and
 * the init loads virtio_blk, ext4 and their dependencies from them, handing each to
 * finit_module with MODULE_INIT_COMPRESSED_FILE; an initramfs built as for a kernel that
 * cannot decompress modules has busybox decompress each one loaded into a memfd instead.
 * Both reach the guest's init on a plain ext4 root.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs, type MkinitramfsResult } from '../../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, type DiskInterface, type Vm } from '../../qemu/harness.ts';
import { recordedMounts, recordedSysfs } from '../kit/sysfs.ts';

const kernel = cachedKernel('6.12');
let dir: string;
let disk: string;
const vms: Vm[] = [];

beforeAll(() => {
  if (!kernel) return;
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-612-plain-'));
  const rootDir = join(dir, 'root');
  buildGuestRoot(rootDir, {
    commands: [guestFact('kernel', '$(uname -r)'), guestFact('modules', '$(cut -d" " -f1 /proc/modules | sort | tr "\\n" ",")')],
  });
  const fsImg = join(dir, 'root.ext4');
  makeExt4(fsImg, { sizeMiB: 24, label: 'root612', fromDir: rootDir });
  disk = join(dir, 'disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: fsImg, name: 'root', type: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709' }] });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

async function start(initrd: string, name: string, append = 'root=/dev/vda1 rd.vdboot.debug', iface: DiskInterface = 'virtio-blk') {
  const vm = await bootVm({ kernel: kernel!, initrd, append, disks: [{ file: disk, interface: iface, snapshot: true }], name, memoryMiB: 512 });
  vms.push(vm);
  return vm;
}

async function bootWith(initrd: string, name: string) {
  const vm = await start(initrd, name);
  await vm.waitFor(GUEST_MARKER, 200_000);
  const facts = parseGuestFacts(vm.transcript());
  await vm.waitExit(60_000);
  return { t: vm.transcript(), facts };
}

function expectXzModules(built: MkinitramfsResult) {
  for (const name of ['virtio_blk', 'ext4', 'jbd2']) {
    expect(built.manifest.modules[name], name).toMatchObject({ compression: 'xz', path: expect.stringMatching(/\.ko\.xz$/) });
  }
  expect(built.modulesCpio.length).toBeGreaterThan(1 << 20);
}

describe.skipIf(!kernel)('end to end: a plain root on 6.12 with modules kept .ko.xz', { timeout: 300_000 }, () => {
  it('the kernel decompresses them (MODULE_INIT_COMPRESSED_FILE): virtio_blk and ext4 load, the guest starts', async () => {
    const initrd = join(dir, 'initrd-default.img');
    // a level at which the zstd archive's length is not a multiple of 4, so the kernel has to
    // skip the zeros before the modules archive (the default level when it already is)
    let built = writeInitramfs(initrd, { kernel: kernel! });
    for (const level of [8, 10, 7, 11]) {
      if (built.packedLength % 4 !== 0) break;
      built = writeInitramfs(initrd, { kernel: kernel!, level });
    }
    expect(built.modulesOffset - built.packedLength).toBeGreaterThan(0);
    expectXzModules(built);
    expect(built.manifest.decompressors).toBeUndefined();
    expect(built.moduleLoading).toEqual({ xz: 'kernel' });
    const { t, facts } = await bootWith(initrd, 'plain-612-kernel-xz');
    expect(facts.facts.kernel).toMatch(/^6\.12\./);
    expect(facts.root).toMatchObject({ device: '/dev/vda1', fstype: 'ext4', mode: 'ro' });
    const loaded = facts.facts.modules!.split(',');
    for (const m of ['virtio_blk', 'ext4', 'jbd2']) expect(loaded, m).toContain(m);
    expect(t).toMatch(/loaded module virtio_blk/);
    expect(t).not.toMatch(/did not load/);
  });

  it('busybox decompresses each module loaded into a memfd when the image says the kernel cannot', async () => {
    const initrd = join(dir, 'initrd-memfd.img');
    const built = writeInitramfs(initrd, { kernel: kernel!, kernelDecompresses: [] });
    expectXzModules(built);
    expect(built.manifest.decompressors).toEqual({ xz: ['/bin/busybox', 'xzcat'] });
    const { t, facts } = await bootWith(initrd, 'plain-612-busybox-xz');
    expect(facts.root).toMatchObject({ device: '/dev/vda1', fstype: 'ext4' });
    const loaded = facts.facts.modules!.split(',');
    for (const m of ['virtio_blk', 'ext4', 'jbd2']) expect(loaded, m).toContain(m);
    expect(t).toMatch(/loaded module ext4/);
    expect(t).not.toMatch(/did not load|could not decompress/);
  });

  it('--hostonly for a machine with AHCI and virtio disks boots the virtio disk (its driver and ext4 stored decompressed, the stripped /init), and on NVMe names the driver it left out', async () => {
    const initrd = join(dir, 'initrd-hostonly.img');
    const built = writeInitramfs(initrd, { kernel: kernel!, hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts() } });
    expect(built.manifest.modules.nvme).toBeUndefined();
    // the modules this machine loads first: plain .ko in the zstd archive, loaded without MODULE_INIT_COMPRESSED_FILE
    for (const m of ['virtio_blk', 'ext4', 'jbd2']) expect(built.manifest.modules[m], m).toMatchObject({ compression: '', path: expect.stringMatching(/\.ko$/) });
    expect(built.notes.join('\n')).toMatch(/build\/init-stripped/);
    const { t, facts } = await bootWith(initrd, 'plain-612-hostonly');
    expect(facts.root).toMatchObject({ device: '/dev/vda1', fstype: 'ext4' });
    const loaded = facts.facts.modules!.split(',');
    for (const m of ['virtio_blk', 'ext4', 'jbd2']) expect(loaded, m).toContain(m);
    expect(t).toMatch(/loaded module ext4/);
    expect(t).not.toMatch(/did not load/);
    const vm = await start(initrd, 'plain-612-hostonly-nvme', 'root=/dev/nvme0n1p1 rd.timeout=5', 'nvme');
    await vm.waitFor(/no driver in this initramfs for the storage device pci:v00001B36d00000010\S*: it needs nvme, which --hostonly left out/, 200_000);
    await vm.waitFor(/did not appear within 5 s/, 60_000);
    await vm.kill();
  });
});
