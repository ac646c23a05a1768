/**
 * `vdboot mkinitramfs --hostonly` against a recorded sysfs tree (a SATA disk behind AHCI, a
 * virtio disk, a loop device, a partition) and mount table (ext4 root, an ntfs-3g host at
 * /run/vdboot/host), on the installed kernel's real module index; then the init, on a
 * machine with an NVMe controller, naming the driver the image left out.
 */
import { writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { buildInitramfs } from '../../mkinitramfs/build.ts';
import { filesystemModules, hostFilesystems, hostNetworkModules, hostStorageModules, rootFilesystem, rootSpecFilesystems } from '../../mkinitramfs/hostonly.ts';
import { loadModuleIndex } from '../../mkinitramfs/kmod.ts';
import { ConsoleLog } from '../../src/boot/console.ts';
import { ModuleLoader } from '../../src/boot/modules.ts';
import { validateManifest } from '../../src/formats/manifest.ts';
import { FakeKernel, type FakeTree } from '../../src/sys/fake.ts';
import { recordedMounts, recordedSysfs } from '../kit/sysfs.ts';
import { initBinary, installedRelease } from './helpers.ts';

const release = installedRelease();

describe(`--hostonly on kernel ${release}, from a recorded /sys`, () => {
  it('each disk\'s driver chain gives its storage modules; partitions and loop devices are skipped', () => {
    const index = loadModuleIndex(`/lib/modules/${release}`);
    const storage = hostStorageModules(index, recordedSysfs());
    expect(storage.devices.sda).toEqual(['sd_mod', 'ahci']);
    expect(storage.devices.vda).toEqual(index.files.has('virtio_pci') ? ['virtio_blk', 'virtio_pci'] : ['virtio_blk']);
    expect(Object.keys(storage.devices).sort()).toEqual(['sda', 'vda']);
  });

  it('wired network cards give their driver chain; Wi-Fi and the loopback interface are skipped', () => {
    const index = loadModuleIndex(`/lib/modules/${release}`);
    const network = hostNetworkModules(index, recordedSysfs());
    expect(Object.keys(network.devices)).toEqual(['eth0']);
    expect(network.devices.eth0).toEqual(index.files.has('virtio_pci') ? ['virtio_net', 'virtio_pci'] : ['virtio_net']);
  });

  it('filesystems come from the mounted disks (fuseblk is ntfs) and the --root device', () => {
    expect(hostFilesystems(recordedMounts())).toEqual(['ext4', 'ntfs']);
    expect(rootFilesystem(recordedMounts())).toBe('ext4');
    // a root that is not a block device's filesystem (a container's overlay) tells nothing
    const overlay = `${recordedMounts()}.overlay`;
    writeFileSync(overlay, '/dev/vda1 / ext4 rw 0 0\noverlay / overlay rw 0 0\n');
    expect(rootFilesystem(overlay)).toBeUndefined();
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
    // the machine's wired card, and no other network driver of the universal set
    expect(mods).toContain('virtio_net');
    for (const m of ['e1000', 'e1000e', 'igb', 'igc', 'r8169', 'ixgbe', 'tg3']) expect(mods, m).not.toContain(m);
    expect(r.manifest.build.hostonly!.network).toEqual({ eth0: expect.arrayContaining(['virtio_net']) });
    const universal = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none' });
    expect(r.cpio.length).toBeLessThan(universal.cpio.length);
    expect(r.modules).toBeLessThan(universal.modules * 0.6);
    const h = r.manifest.build.hostonly!;
    expect(h.storage.sda).toEqual(['sd_mod', 'ahci']);
    expect(h.filesystems).toEqual(['ext4', 'ntfs', 'xfs']);
    expect(h.root).toBe('UUID=5b1c3f0e');
    // the --root device's type is the root's filesystem the init loads early
    expect(r.manifest.build.rootFsType).toBe('xfs');
    const leftOut = new Map(h.leftOut);
    expect(leftOut.get('pci:v*d*sv*sd*bc01sc08i02*')).toEqual(['nvme']);
    expect([...leftOut.values()].flat()).not.toContain('ahci');
    expect(validateManifest(r.manifest)).toEqual([]);
    expect(r.notes.join('\n')).toMatch(/--hostonly: storage drivers of this machine: sda \(sd_mod, ahci\); vda \(virtio_blk.*; network cards: eth0 \(virtio_net/);
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
