/**
 * `vdboot mkinitramfs --hostonly` against a recorded sysfs tree (a SATA disk behind AHCI, a
 * virtio disk, a loop device, a partition) and mount table (ext4 root, an ntfs-3g host at
 * /run/vdboot/host), on the installed kernel's real module index; then the init, on a
 * machine with an NVMe controller, naming the driver the image left out.
 */
import fs, { writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildInitramfs, defaultTools, repoRoot } from '../../mkinitramfs/build.ts';
import { readCpio } from '../../src/formats/cpio.ts';
import { filesystemModules, hostDeviceMapper, hostFilesystems, hostKeyboardModules, hostNetworkModules, hostStorageModules, rootFilesystem, rootSpecFilesystems } from '../../mkinitramfs/hostonly.ts';
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

  it('keyboards: the drivers along each input device that has an Enter key; device-mapper devices by kind', () => {
    const index = loadModuleIndex(`/lib/modules/${release}`);
    const kbd = hostKeyboardModules(index, recordedSysfs());
    expect(kbd).toEqual(expect.arrayContaining(['hid_generic', 'usbhid', 'xhci_pci']));
    // the power button (keys, but no Enter) brings nothing; no storage or filesystem module comes in
    for (const m of kbd) expect(['hid_generic', 'usbhid', 'xhci_pci', 'xhci_hcd', 'usbcore', 'hid', 'usb_common']).toContain(m);
    expect([...hostDeviceMapper(recordedSysfs())]).toEqual([]);
    expect([...hostDeviceMapper(recordedSysfs({ dmUuids: ['CRYPT-LUKS2-0f3c-luks-0f3c', 'LVM-abcdef', 'VDBOOT-vdisk0'] }))].sort()).toEqual(['crypt', 'lvm', 'vdboot']);
  });

  it('a plain root (ext4 on a disk, nothing mapped, no NTFS): no image data paths, no ntfs-3g, no cryptsetup; the boot names them when an image needs them', () => {
    const plain = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }) } });
    const mods = Object.keys(plain.manifest.modules);
    for (const m of ['virtio_blk', 'ext4', 'usbhid', 'hid_generic', 'xhci_pci']) expect(mods, m).toContain(m);
    for (const m of ['dm_mod', 'dm_snapshot', 'loop', 'nbd', 'fuse', 'dm_crypt', 'ntfs3']) expect(mods, m).not.toContain(m);
    const has = defaultTools(loadModuleIndex(`/lib/modules/${release}`)).tools;
    const dropped = (['cryptsetup', 'ntfs-3g'] as const).filter((t) => t in has);
    expect(plain.tools.filter((t) => t === 'cryptsetup' || t === 'ntfs-3g')).toEqual([]);
    expect(plain.manifest.build.hostonly!.toolsLeftOut ?? []).toEqual(dropped);
    expect(plain.notes.join('\n')).toMatch(/--hostonly: .*the root is not an image file: loop, nbd and the image device-mapper targets left out/);
    // asked for: kept
    const asked = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', tools: dropped.includes('cryptsetup') ? ['cryptsetup'] : [], hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }) } });
    if (dropped.includes('cryptsetup')) expect(asked.tools).toContain('cryptsetup');
    // an encrypted disk here keeps cryptsetup and device-mapper
    const crypt = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs({ dmUuids: ['CRYPT-LUKS2-0f3c-luks-0f3c'] }), mounts: recordedMounts({ plain: true }) } });
    if ('cryptsetup' in has) expect(crypt.tools).toContain('cryptsetup');
    expect(Object.keys(crypt.manifest.modules)).toContain('dm_mod');
    // --root vdisk: keeps the image data paths
    const image = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }), root: 'vdisk:LABEL=Data:/a.vhdx', typeOf: () => 'ext4' } });
    for (const m of ['dm_mod', 'dm_snapshot', 'loop']) expect(Object.keys(image.manifest.modules), m).toContain(m);

    // the plain image booted for an image file: the init stops and says what to build
    const k = new FakeKernel({ cmdline: '', disks: [], initramfs: { 'etc/vdboot/manifest.json': JSON.stringify(plain.manifest) } });
    const loader = new ModuleLoader(k, plain.manifest, new ConsoleLog(k));
    expect(loader.hostonlyMissing(['dm_mod', 'dm_zero', 'loop'], 'Mapping /a.vhdx')).toMatch(/^Mapping \/a\.vhdx needs the kernel modules dm_mod, dm_zero, loop, which this initramfs does not have: it was built with --hostonly for a machine whose root is not an image file\. Build it again with --hostonly --root set to this boot's root/);
    expect(new ModuleLoader(k, image.manifest, new ConsoleLog(k)).hostonlyMissing(['dm_mod', 'loop'], 'x')).toBeUndefined();
    const universal = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', omitModules: ['loop'] });
    expect(new ModuleLoader(k, universal.manifest, new ConsoleLog(k)).hostonlyMissing(['loop'], 'x')).toBeUndefined();
    console.log(`--hostonly plain root: ${plain.modules} modules, ${(plain.cpio.length / 1048576).toFixed(2)} MiB unpacked; image root: ${image.modules} modules, ${(image.cpio.length / 1048576).toFixed(2)} MiB`);
  });

  it('without --init, a host-only image takes build/init-stripped (no debug info) and says so', () => {
    const stripped = path.join(repoRoot(), 'build', 'init-stripped');
    if (!fs.existsSync(stripped)) return; // built by npm run build with the /init host
    const r = buildInitramfs({ kernel: release, compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }) } });
    const init = readCpio(r.cpio).find((e) => e.name === 'init')!;
    expect(Buffer.from(init.data).equals(fs.readFileSync(stripped))).toBe(true);
    expect(fs.statSync(stripped).size).toBeLessThan(fs.statSync(path.join(repoRoot(), 'build', 'init')).size);
    expect(r.notes.join('\n')).toMatch(/--hostonly: \/init is .*build\/init-stripped, its bytecode without debug info .*--init .*build\/init keeps them/);
  });

  it('the image holds those drivers and filesystems, not the universal set; the manifest records it and what was left out', () => {
    const r = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts(), root: 'UUID=5b1c3f0e', typeOf: () => 'xfs' } });
    const mods = Object.keys(r.manifest.modules);
    for (const m of ['ahci', 'sd_mod', 'virtio_blk', 'libata', 'ext4', 'xfs', 'dm_mod', 'dm_snapshot', 'loop', 'usbhid', 'xhci_pci']) expect(mods, m).toContain(m);
    for (const m of ['nvme', 'usb_storage', 'uas', 'btrfs', 'mmc_block', 'ata_piix', 'isofs']) expect(mods, m).not.toContain(m);
    // squashfs only to mount a packed tool (cryptsetup: this machine's root is an image), not as a root filesystem
    expect(mods.includes('squashfs'), 'squashfs').toBe(r.tools.includes('cryptsetup'));
    // the root is not on an NBD server: no network card drivers
    for (const m of ['virtio_net', 'e1000', 'e1000e', 'igb', 'igc', 'r8169', 'ixgbe', 'tg3']) expect(mods, m).not.toContain(m);
    expect(r.manifest.build.hostonly!.network).toBeUndefined();
    // a root on an NBD server: the machine's wired card, and no other network driver of the universal set
    const net = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }), root: 'vdisk:nbd://10.0.2.2:10809/fleet.vhdx' } });
    const netMods = Object.keys(net.manifest.modules);
    for (const m of ['virtio_net', 'nbd', 'dm_mod', 'dm_snapshot']) expect(netMods, m).toContain(m);
    for (const m of ['e1000', 'e1000e', 'igb', 'igc', 'r8169', 'ixgbe', 'tg3']) expect(netMods, m).not.toContain(m);
    expect(net.manifest.build.hostonly!.network).toEqual({ eth0: expect.arrayContaining(['virtio_net']) });
    expect(net.notes.join('\n')).toMatch(/network cards: eth0 \(virtio_net/);
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
    expect(r.notes.join('\n')).toMatch(/--hostonly: storage drivers of this machine: sda \(sd_mod, ahci\); vda \(virtio_blk.*; filesystems: /);
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
