/**
 * `vdboot mkinitramfs --hostonly` against a recorded sysfs tree (a SATA disk behind AHCI, a
 * virtio disk, a loop device, a partition) and mount table (ext4 root, an ntfs-3g host at
 * /run/vdboot/host), on the installed kernel's real module index; then the init, on a
 * machine with an NVMe controller, naming the driver the image left out.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildInitramfs } from '../../mkinitramfs/build.ts';
import { filesystemModules, hostFilesystems, hostStorageModules, rootSpecFilesystems } from '../../mkinitramfs/hostonly.ts';
import { loadModuleIndex } from '../../mkinitramfs/kmod.ts';
import { ConsoleLog } from '../../src/boot/console.ts';
import { ModuleLoader } from '../../src/boot/modules.ts';
import { validateManifest } from '../../src/formats/manifest.ts';
import { FakeKernel, type FakeTree } from '../../src/sys/fake.ts';
import { initBinary, installedRelease, tmpdir } from './helpers.ts';

const release = installedRelease();

/** A sysfs tree as a QEMU q35 machine with an AHCI disk and a virtio disk shows it, symlinks and all. */
function recordedSysfs(): string {
  const sys = path.join(tmpdir(), 'sys');
  const mk = (p: string) => fs.mkdirSync(path.join(sys, p), { recursive: true });
  const ln = (target: string, p: string) => fs.symlinkSync(path.join(sys, target), path.join(sys, p));
  const write = (p: string, text: string) => fs.writeFileSync(path.join(sys, p), text);
  for (const [bus, driver, module] of [['pci', 'ahci', 'ahci'], ['scsi', 'sd', 'sd_mod'], ['virtio', 'virtio_blk', 'virtio_blk'], ['pci', 'virtio-pci', 'virtio_pci']] as const) {
    mk(`module/${module}`);
    mk(`bus/${bus}/drivers/${driver}`);
    ln(`module/${module}`, `bus/${bus}/drivers/${driver}/module`);
  }
  const ahci = 'devices/pci0000:00/0000:00:1f.2';
  const scsiDisk = `${ahci}/ata1/host0/target0:0:0/0:0:0:0`;
  mk(`${scsiDisk}/block/sda/sda1`);
  write(`${ahci}/modalias`, 'pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01\n');
  ln('bus/pci/drivers/ahci', `${ahci}/driver`);
  ln('bus/scsi/drivers/sd', `${scsiDisk}/driver`);
  write(`${scsiDisk}/block/sda/sda1/partition`, '1\n');
  write(`${scsiDisk}/modalias`, 'scsi:t-0x00\n');
  const virtio = 'devices/pci0000:00/0000:00:04.0';
  mk(`${virtio}/virtio1/block/vda`);
  ln('bus/pci/drivers/virtio-pci', `${virtio}/driver`);
  ln('bus/virtio/drivers/virtio_blk', `${virtio}/virtio1/driver`);
  write(`${virtio}/virtio1/modalias`, 'virtio:d00000002v00001AF4\n');
  mk('devices/virtual/block/loop0');
  mk('class/block');
  ln(`${scsiDisk}/block/sda`, 'class/block/sda');
  ln(`${scsiDisk}/block/sda/sda1`, 'class/block/sda1');
  ln(`${virtio}/virtio1/block/vda`, 'class/block/vda');
  ln('devices/virtual/block/loop0', 'class/block/loop0');
  ln(scsiDisk, `${scsiDisk}/block/sda/device`);
  ln(`${virtio}/virtio1`, `${virtio}/virtio1/block/vda/device`);
  return sys;
}

function recordedMounts(): string {
  const file = path.join(tmpdir(), 'mounts');
  fs.writeFileSync(file, [
    '/dev/vda1 / ext4 rw,relatime 0 0',
    'proc /proc proc rw 0 0',
    'tmpfs /run tmpfs rw 0 0',
    '/dev/sda1 /run/vdboot/host fuseblk rw,user_id=0 0 0',
    '',
  ].join('\n'));
  return file;
}

describe(`--hostonly on kernel ${release}, from a recorded /sys`, () => {
  it('each disk\'s driver chain gives its storage modules; partitions and loop devices are skipped', () => {
    const index = loadModuleIndex(`/lib/modules/${release}`);
    const storage = hostStorageModules(index, recordedSysfs());
    expect(storage.devices.sda).toEqual(['sd_mod', 'ahci']);
    expect(storage.devices.vda).toEqual(index.files.has('virtio_pci') ? ['virtio_blk', 'virtio_pci'] : ['virtio_blk']);
    expect(Object.keys(storage.devices).sort()).toEqual(['sda', 'vda']);
  });

  it('filesystems come from the mounted disks (fuseblk is ntfs) and the --root device', () => {
    expect(hostFilesystems(recordedMounts())).toEqual(['ext4', 'ntfs']);
    expect(rootSpecFilesystems('vdisk:LABEL=Windows:/VMs/a.vhdx', (d) => (d === 'LABEL=Windows' ? 'ntfs' : undefined))).toEqual(['ntfs']);
    expect(rootSpecFilesystems('UUID=1234', () => 'xfs')).toEqual(['xfs']);
    expect(rootSpecFilesystems('vdisk:/VMs/a.vhdx', () => 'xfs')).toEqual([]);
    const index = loadModuleIndex(`/lib/modules/${release}`);
    const fsMods = filesystemModules(index, ['ext4', 'xfs', 'ntfs']);
    expect(fsMods.modules).toEqual(expect.arrayContaining(['ext4', 'xfs']));
    if (!index.files.has('ntfs3')) expect(fsMods.unknown).toEqual(['ntfs']); // 6.1: ntfs-3g alone writes NTFS
  });

  it('the image holds those drivers and filesystems, not the universal set; the manifest records it and what was left out', () => {
    const r = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts(), root: 'UUID=5b1c3f0e', typeOf: () => 'xfs' } });
    const mods = Object.keys(r.manifest.modules);
    for (const m of ['ahci', 'sd_mod', 'virtio_blk', 'libata', 'ext4', 'xfs', 'dm_mod', 'dm_snapshot', 'loop', 'fuse', 'usbhid']) expect(mods, m).toContain(m);
    for (const m of ['nvme', 'usb_storage', 'uas', 'xhci_pci', 'btrfs', 'mmc_block', 'ata_piix', 'isofs', 'squashfs']) expect(mods, m).not.toContain(m);
    const universal = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none' });
    expect(r.cpio.length).toBeLessThan(universal.cpio.length);
    expect(r.modules).toBeLessThan(universal.modules * 0.6);
    const h = r.manifest.build.hostonly!;
    expect(h.storage.sda).toEqual(['sd_mod', 'ahci']);
    expect(h.filesystems).toEqual(['ext4', 'ntfs', 'xfs']);
    expect(h.root).toBe('UUID=5b1c3f0e');
    const leftOut = new Map(h.leftOut);
    expect(leftOut.get('pci:v*d*sv*sd*bc01sc08i02*')).toEqual(['nvme']);
    expect([...leftOut.values()].flat()).not.toContain('ahci');
    expect(validateManifest(r.manifest)).toEqual([]);
    expect(r.notes.join('\n')).toMatch(/--hostonly: storage drivers of this machine: sda \(sd_mod, ahci\); vda \(virtio_blk/);
    console.log(`--hostonly: ${r.modules} modules, ${(r.cpio.length / 1048576).toFixed(2)} MiB unpacked (universal: ${universal.modules}, ${(universal.cpio.length / 1048576).toFixed(2)} MiB); leftOut table ${h.leftOut.length} patterns, ${JSON.stringify(h.leftOut).length} bytes of JSON`);

    // booted on a machine whose disk sits behind an NVMe controller: the init names the driver
    const initramfs: FakeTree = { 'etc/vdboot/manifest.json': JSON.stringify(r.manifest) };
    for (const m of Object.values(r.manifest.modules)) initramfs[m.path.slice(1)] = 'module';
    const k = new FakeKernel({ cmdline: '', disks: [], initramfs: { ...initramfs, sys: { dir: true } }, pciDevices: { '0000:00:05.0': 'pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02' } });
    k.mount('sysfs', '/sys', 'sysfs', 0, '');
    new ModuleLoader(k, r.manifest, new ConsoleLog(k)).coldplugModules();
    expect(k.consoleText).toMatch(/no driver in this initramfs for the storage device pci:v00001B36d00000010\S*: it needs nvme, which --hostonly left out \(built for sda: sd_mod, ahci; vda: virtio_blk.*\); build the initramfs without --hostonly, or with --add-module nvme/);
  });
});
