/**
 * End to end: a dynamic image booted read-write is expanded in place first (DESIGN §3),
 * then mapped directly: on NTFS through ntfs-3g (the Debian kernel has no ntfs3, so
 * mkinitramfs includes ntfs-3g by default: the initramfs here is built with no tools option), on a
 * FAT32 stick through the kernel's vfat, on ext4 through the kernel-mounted host (and
 * FIEMAP afterwards). On the host afterwards: every block allocated, the guest's file
 * inside the image, the virtual disk otherwise unchanged, the host filesystem clean. A
 * host without room refuses before writing anything: the whole host disk is
 * byte-identical after the boot.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, fatRead, makeFat, makePartitionedDisk } from '../../qemu/disks.ts';
import { parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { BASIC_DATA, copyHostFile, expectNtfsClean, fileInImage, hostDisk, qemuRawOf, sha256File } from '../kit/host-disk.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { vhdFormat } from '../../src/formats/vhd.ts';
import { vhdxFormat } from '../../src/formats/vhdx.ts';

const NOTE = 'written by the guest on an expanded image';
const MiB = 1 << 20;

let dir: string;
let initrd: string;
let guestRaw: string;
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-expand-'));
  initrd = join(dir, 'initrd.img');
  // no tools option: the default build (ntfs-3g comes in because the kernel has no ntfs3)
  const built = writeInitramfs(initrd, { kernel: defaultKernel() });
  if (!built.manifest.tools.ntfs3g) throw new Error(`the default initramfs for ${defaultKernel()} has no ntfs-3g (tools: ${built.tools.join(', ') || 'none'}); these boots need a kernel without ntfs3 and ntfs-3g installed`);
  guestRaw = makeGuestDisk(dir, { writeFile: { path: '/home/note.txt', content: NOTE }, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/** Bytes of the virtual disk the image does not store, by vdboot's reader (qemu's vhdx driver reports no allocation). */
function unallocated(file: string, format: 'vhd' | 'vhdx'): number {
  const reader = bytesReader(file, new Uint8Array(readFileSync(file)));
  const layer = (format === 'vhd' ? vhdFormat : vhdxFormat).open(reader, { path: file, openFile: () => { throw new Error('no parent'); } });
  return layer.extents.filter((e) => e.kind !== 'data').reduce((n, e) => n + e.length, 0);
}

describe('end to end: dynamic images expanded in place for a read-write boot (mkinitramfs with no flags)', { timeout: 600_000 }, () => {
  it('a dynamic VHD root and an attached dynamic VHDX are expanded through ntfs-3g, a VDI on a FAT32 stick through vfat, then all mapped directly; the guest\'s file lands in the fully allocated VHD', async () => {
    const vhd = join(dir, 'linux.vhd');
    convertImage(guestRaw, vhd, 'vpc');
    const vhdx = join(dir, 'data.vhdx');
    convertImage(guestRaw, vhdx, 'vhdx', ['block_size=1M']);
    expect(unallocated(vhd, 'vhd')).toBeGreaterThan(0);
    expect(unallocated(vhdx, 'vhdx')).toBeGreaterThan(0);
    const vhdxBefore = qemuRawOf(vhdx, 'vhdx');
    const host = hostDisk(dir, 'expand', 'ntfs', { '/VMs/linux.vhd': { hostFile: vhd }, '/VMs/data.vhdx': { hostFile: vhdx } }, { sizeMiB: 120 });
    // a FAT32 stick on a second disk with a dynamic VDI: expanded through the kernel's vfat
    const vdi = join(dir, 'stick.vdi');
    convertImage(guestRaw, vdi, 'vdi');
    const vdiBefore = qemuRawOf(vdi, 'vdi');
    const fatPart = join(dir, 'stick.vfat');
    makeFat(fatPart, { sizeMiB: 64, label: 'STICK', files: { '/VMs/stick.vdi': { hostFile: vdi } } });
    const stick = join(dir, 'stick.img');
    const [fatLayout] = makePartitionedDisk(stick, { table: 'gpt', partitions: [{ image: fatPart, type: BASIC_DATA, name: 'stick' }] });
    const vm = await bootVm({
      initrd,
      append: 'root=vdisk:LABEL=Windows:/VMs/linux.vhd rd.vdisk.attach=LABEL=Windows:/VMs/data.vhdx rd.vdisk.attach=LABEL=STICK:/VMs/stick.vdi rw',
      disks: [{ file: host.disk, interface: 'virtio-blk' }, { file: stick, interface: 'virtio-blk' }],
      name: 'vdisk-expand',
    });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    const t = vm.transcript();
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    // the console: what is expanded, the progress, and the direct path afterwards
    expect(t).toMatch(/expanding \/VMs\/linux\.vhd in place: \d+ absent blocks? of 2\.0 MiB .* allocated and zero-filled, the file grows from/);
    expect(t).toMatch(/with ntfs-3g \(rw\) on \/run\/vdboot\/expand/);
    expect(t).toMatch(/expanding \/VMs\/linux\.vhd: .* \(100%\), .*\/s/);
    expect(t).toMatch(/expanded \/VMs\/linux\.vhd: .* written in/);
    expect(t).toMatch(/expanding \/VMs\/data\.vhdx in place/);
    expect(t).toMatch(/vdisk0: \/VMs\/linux\.vhd on .*vhd dynamic, direct: the image is fully mappable/);
    expect(t).toMatch(/vdisk1: \/VMs\/data\.vhdx on .*vhdx dynamic, direct: the image is fully mappable/);
    expect(t).toMatch(/mounted \/dev\/vdb1 \(vfat, rw\) on \/run\/vdboot\/expand to expand \/VMs\/stick\.vdi/);
    expect(t).toMatch(/vdisk2: \/VMs\/stick\.vdi on \/dev\/vdb1 \(vfat, LABEL="STICK"\): vdi dynamic, direct: the image is fully mappable/);
    expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
    expect(t).toMatch(/reboot: Power down/);

    const afterVhd = copyHostFile(dir, host, '/VMs/linux.vhd', join(dir, 'after.vhd'));
    expect(unallocated(afterVhd, 'vhd')).toBe(0);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '-f', 'vpc', '--output=json', afterVhd], { encoding: 'utf8' })) as { data: boolean; offset?: number }[];
    expect(map.every((m) => m.data && m.offset !== undefined)).toBe(true);
    expect(fileInImage(dir, afterVhd, 'vpc', '/home/note.txt')).toBe(NOTE);
    const b = readFileSync(afterVhd);
    expect(b.subarray(b.length - 512).equals(b.subarray(0, 512))).toBe(true);

    const afterVhdx = copyHostFile(dir, host, '/VMs/data.vhdx', join(dir, 'after.vhdx'));
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', afterVhdx], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(unallocated(afterVhdx, 'vhdx')).toBe(0);
    expect(qemuRawOf(afterVhdx, 'vhdx').equals(vhdxBefore)).toBe(true);
    expectNtfsClean(host.disk, host.offset, host.size);
    // the stick: FAT clean, the VDI fully allocated and otherwise unchanged
    const fatAfter = join(dir, 'stick-after.vfat');
    writeFileSync(fatAfter, readFileSync(stick).subarray(fatLayout!.offset, fatLayout!.offset + fatLayout!.size));
    const fsck = spawnSync('fsck.fat', ['-n', fatAfter], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const afterVdi = join(dir, 'stick-after.vdi');
    writeFileSync(afterVdi, fatRead(fatAfter, '/VMs/stick.vdi'));
    const vdiCheck = spawnSync('qemu-img', ['check', '-f', 'vdi', afterVdi], { encoding: 'utf8' });
    expect(vdiCheck.status, `${vdiCheck.stdout}${vdiCheck.stderr}`).toBe(0);
    const vdiMap = JSON.parse(execFileSync('qemu-img', ['map', '-f', 'vdi', '--output=json', afterVdi], { encoding: 'utf8' })) as { data: boolean; offset?: number }[];
    expect(vdiMap.every((m) => m.data && m.offset !== undefined)).toBe(true);
    expect(qemuRawOf(afterVdi, 'vdi').equals(vdiBefore)).toBe(true);
  });

  it('on an ext4 host the kernel mounts: a dynamic VDI is expanded through ext4 (remounted read-write), mapped directly from FIEMAP, and e2fsck -fn passes afterwards', async () => {
    const vdi = join(dir, 'linux.vdi');
    convertImage(guestRaw, vdi, 'vdi');
    const before = qemuRawOf(vdi, 'vdi');
    const hostPart = join(dir, 'host.ext4');
    execFileSync('truncate', ['-s', `${96 * MiB}`, hostPart]);
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'linuxhost', hostPart]);
    execFileSync('debugfs', ['-w', '-R', 'mkdir /VMs', hostPart], { stdio: 'ignore' });
    // e2cp writes every block: the file has no holes
    execFileSync('e2cp', [vdi, `${hostPart}:/VMs/linux.vdi`]);
    const disk = join(dir, 'ext4-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: '0FC63DAF-8483-4772-8E79-3D69D8477DE4', name: 'linux data' }] });
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=linuxhost:/VMs/linux.vdi rw', disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdisk-expand-ext4' });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    const t = vm.transcript();
    expect(facts.wrote).toBe('/home/note.txt');
    expect(t).toMatch(/expanding \/VMs\/linux\.vdi in place: \d+ absent blocks? of 1\.0 MiB/);
    expect(t).toMatch(/mounted \/dev\/mapper\/vdhost \(ext4, rw\) on \/run\/vdboot\/host/);
    expect(t).toMatch(/expanded \/VMs\/linux\.vdi: .* written in/);
    expect(t).toMatch(/vdisk0: \/VMs\/linux\.vdi on .*vdi dynamic, direct: the image is fully mappable: \d+ extents? on \/dev\/vda1 \(from ext4's FIEMAP\)/);
    expect(t).toMatch(/reboot: Power down/);
    const after = join(dir, 'host-after.ext4');
    writeFileSync(after, readFileSync(disk).subarray(part!.offset, part!.offset + part!.size));
    const fsck = spawnSync('e2fsck', ['-fn', after], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const img = join(dir, 'after.vdi');
    execFileSync('debugfs', ['-R', `dump /VMs/linux.vdi ${img}`, after], { stdio: 'ignore' });
    const check = spawnSync('qemu-img', ['check', '-f', 'vdi', img], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '-f', 'vdi', '--output=json', img], { encoding: 'utf8' })) as { data: boolean; offset?: number }[];
    expect(map.every((m) => m.data && m.offset !== undefined)).toBe(true);
    expect(fileInImage(dir, img, 'vdi', '/home/note.txt')).toBe(NOTE);
    // only the guest's writes changed the virtual disk: the ESP (first 3 MiB) is as before
    expect(qemuRawOf(img, 'vdi').subarray(0, 3 * MiB).equals(before.subarray(0, 3 * MiB))).toBe(true);
  });

  it('on an ext4 host with rd.vdisk.map=loop: after the expansion the host is mounted read-write again for the loop device, the guest writes through it, e2fsck -fn passes', async () => {
    const vdi = join(dir, 'loop.vdi');
    convertImage(guestRaw, vdi, 'vdi');
    const hostPart = join(dir, 'host-loop.ext4');
    execFileSync('truncate', ['-s', `${96 * MiB}`, hostPart]);
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'linuxhost', hostPart]);
    execFileSync('debugfs', ['-w', '-R', 'mkdir /VMs', hostPart], { stdio: 'ignore' });
    execFileSync('e2cp', [vdi, `${hostPart}:/VMs/linux.vdi`]);
    const disk = join(dir, 'ext4-loop-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: '0FC63DAF-8483-4772-8E79-3D69D8477DE4', name: 'linux data' }] });
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=linuxhost:/VMs/linux.vdi rw rd.vdisk.map=loop', disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdisk-expand-ext4-loop' });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    const t = vm.transcript();
    expect(facts.wrote, t).toBe('/home/note.txt');
    expect(t).toMatch(/expanded \/VMs\/linux\.vdi: .* written in/);
    // rw for the expansion, read-only after it, rw again for the loop path
    expect(t.match(/mounted \/dev\/mapper\/vdhost \(ext4, rw\) on \/run\/vdboot\/host/g)?.length).toBe(2);
    expect(t).toMatch(/vdisk0: \/VMs\/linux\.vdi on .*vdi dynamic, loop \(asked for\)/);
    expect(t).not.toMatch(/EROFS/);
    const after = join(dir, 'host-loop-after.ext4');
    writeFileSync(after, readFileSync(disk).subarray(part!.offset, part!.offset + part!.size));
    const fsck = spawnSync('e2fsck', ['-fn', after], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const img = join(dir, 'loop-after.vdi');
    execFileSync('debugfs', ['-R', `dump /VMs/linux.vdi ${img}`, after], { stdio: 'ignore' });
    expect(fileInImage(dir, img, 'vdi', '/home/note.txt')).toBe(NOTE);
  });

  it('a host without room for the expansion is refused before anything is written: the sizes and the remedies, the host disk byte-identical', async () => {
    const vhdx = join(dir, 'tight.vhdx');
    convertImage(guestRaw, vhdx, 'vhdx', ['block_size=1M']);
    const size = statSync(vhdx).size;
    // room for the dynamic file, not for the expanded one
    const host = hostDisk(dir, 'tight', 'ntfs', { '/VMs/linux.vhdx': { hostFile: vhdx } }, { sizeMiB: Math.ceil(size / MiB) + 8 });
    const before = sha256File(host.disk);
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=Windows:/VMs/linux.vhdx rw', disks: [{ file: host.disk, interface: 'virtio-blk' }], name: 'vdisk-expand-noroom' });
    vms.push(vm);
    try {
      await vm.waitFor('starting the rescue shell', 240_000);
      const t = vm.transcript();
      expect(t).toMatch(/\/VMs\/linux\.vhdx on .* cannot be mapped read-write as it is/);
      expect(t).toMatch(/it would grow by [\d.]+ MiB \(\d+ bytes\) .*but the host has only .* free/);
      expect(t).toMatch(/Nothing was written/);
      expect(t).toMatch(/rd\.vdisk\.mode=snapshot/);
      expect(t).toMatch(/rd\.vdisk\.map=nbd/);
      expect(t).toMatch(/subformat=fixed/);
      expect(t).not.toMatch(/created \/dev\/mapper\/vdisk0/);
    } finally {
      await vm.kill();
    }
    expect(sha256File(host.disk)).toBe(before);
  });
});
