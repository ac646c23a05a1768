/**
 * `vdboot kit`: the files and entries it writes (checked statically, GRUB's syntax by
 * grub-script-check), and three boots under QEMU of a kit copied onto a stick:
 *  - NTFS: OVMF starts the kit's own grubx64.efi from a small ESP; GRUB finds the image's
 *    partition with `search --file`, reads the kit's grub.cfg, loads the kernel and the
 *    initramfs from NTFS, and vdboot boots root=vdisk:LABEL=…:PATH to the guest init;
 *  - NTFS, BIOS: g2ldr.mbr as the disk's boot code (Windows' boot manager runs it the same
 *    way as a bootsector application) loads \g2ldr, the kit's GRUB, which does the same;
 *  - exFAT: the kernel and initramfs from the stick, with the kernel line of the kit's GRUB
 *    entry, a fixed VHD read-write (no --host: vdboot searches every partition for the image).
 * The three VMs run side by side.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { mkdisk } from '../../mkdisk/build.ts';
import { imagePathInRoot, kitEntries, splitArgs } from '../../mkdisk/kit.ts';
import { makeExfat, makeFat, makeNtfs, makePartitionedDisk, type FileTree } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, type Vm } from '../../qemu/harness.ts';
import { treeOf } from '../kit/host-disk.ts';
import { cleanupTmpDirs, makeTmpDir } from '../kit/oracle.ts';
import { bootFromDisk } from './firmware.ts';

const MiB = 1024 * 1024;
const IMAGE = '/VMs/Linux Guest.vhdx';
const FIXED_IMAGE = '/VMs/Linux Guest.vhd';

let dir: string;
let guestImage: string;
let fixedImage: string;
const vms: Vm[] = [];

async function vdboot(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} };
  return { code: await main(args, io), out, err };
}

/** A stick's root with the image at IMAGE, then `vdboot kit` run on it. */
async function kitOnStick(name: string, extra: string[], fixed = false): Promise<{ root: string; out: string }> {
  const root = path.join(dir, name);
  fs.mkdirSync(path.join(root, 'VMs'), { recursive: true });
  const image = fixed ? FIXED_IMAGE : IMAGE;
  fs.copyFileSync(fixed ? fixedImage : guestImage, path.join(root, image));
  const r = await vdboot('kit', '--image', path.join(root, image), '--root-dir', root, '-q', ...extra);
  expect(r.err).toBe('');
  expect(r.code).toBe(0);
  return { root, out: r.out };
}


/** The kernel arguments GRUB passes for a `linux` line: its words, double-quoted when they hold spaces. */
function grubLinuxArgs(grubCfg: string): string {
  const line = /^\s*linux\s+\S+\s+(.*)$/m.exec(grubCfg)![1]!;
  return splitArgs(line).map((w) => (/\s/.test(w) ? `"${w}"` : w)).join(' ');
}

beforeAll(async () => {
  dir = makeTmpDir();
  const root = path.join(dir, 'guest');
  buildGuestRoot(root, {});
  guestImage = path.join(dir, 'guest.vhdx');
  await mkdisk({ source: root, output: guestImage, size: { bytes: 16 * MiB, free: true } });
  fixedImage = path.join(dir, 'guest-fixed.vhd');
  await mkdisk({ source: root, output: fixedImage, format: 'vhd-fixed', size: { bytes: 16 * MiB, free: true } });
}, 120_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  cleanupTmpDirs();
});

describe('vdboot kit: files and entries', () => {
  let stick: { root: string; out: string };
  beforeAll(async () => {
    stick = await kitOnStick('static', ['--host', 'LABEL=My Stick', '--append', 'rw quiet']);
  }, 120_000);

  it('writes the kernel, the initramfs, GRUB images and an entry for each boot loader under boot/vdboot', () => {
    const boot = path.join(stick.root, 'boot/vdboot');
    const names = fs.readdirSync(boot).sort();
    expect(names).toEqual(['g2ldr', 'g2ldr.mbr', 'grub.cfg', 'grubx64.efi', 'initrd.img', 'menu.lst', 'syslinux.cfg', 'vdboot.conf', 'vmlinuz'].sort());
    expect(fs.readFileSync(path.join(boot, 'vmlinuz')).subarray(0x202, 0x206).toString('latin1')).toBe('HdrS');
    // ntfs-3g is in the initramfs (this machine has it): NTFS hosts can be written, so
    // --append rd.vdisk.mode=rw expands a dynamic image in place
    const listing = spawnSync('sh', ['-c', `zstd -dc "$0" | cpio -t --quiet`, path.join(boot, 'initrd.img')], { encoding: 'utf8', maxBuffer: 1 << 26 });
    expect(listing.status, listing.stderr).toBe(0);
    expect(listing.stdout.split('\n')).toContain('usr/bin/ntfs-3g');
    // grubx64.efi is a PE program; g2ldr starts with GRUB's g2hdr header.
    expect(fs.readFileSync(path.join(boot, 'grubx64.efi')).subarray(0, 2).toString('latin1')).toBe('MZ');
    expect(fs.readFileSync(path.join(boot, 'g2ldr')).subarray(0, 512)).toEqual(fs.readFileSync('/usr/lib/grub/i386-pc/g2hdr.img').subarray(0, 512));
  });

  it('the GRUB entry finds the image by file and passes root=vdisk:HOST:PATH, quoted, to the kernel; grub-script-check accepts it', () => {
    const cfg = fs.readFileSync(path.join(stick.root, 'boot/vdboot/grub.cfg'), 'utf8');
    expect(cfg).toContain(`search --no-floppy --file --set=root '${IMAGE}'`);
    // A dynamic image: a read-write boot would expand it in place on the stick at the first
    // boot, which the kit does not choose for the user; the entry boots it as a snapshot.
    expect(grubLinuxArgs(cfg)).toBe(`"root=vdisk:LABEL=My Stick:${IMAGE}" rd.vdisk.mode=snapshot rw quiet`);
    expect(cfg).toMatch(/^\s*initrd \/boot\/vdboot\/initrd\.img$/m);
    const check = spawnSync('grub-script-check', [path.join(stick.root, 'boot/vdboot/grub.cfg')], { encoding: 'utf8' });
    expect(check.status, check.stderr).toBe(0);
  });

  it('grub4dos, syslinux and systemd-boot entries carry the same kernel line; grub4dos finds the image by file', () => {
    const cmdline = `"root=vdisk:LABEL=My Stick:${IMAGE}" rd.vdisk.mode=snapshot rw quiet`;
    const menu = fs.readFileSync(path.join(stick.root, 'boot/vdboot/menu.lst'), 'utf8');
    expect(menu).toContain('find --set-root --ignore-floppies /VMs/Linux\\ Guest.vhdx');
    expect(menu).toContain(`kernel /boot/vdboot/vmlinuz ${cmdline}`);
    expect(fs.readFileSync(path.join(stick.root, 'boot/vdboot/syslinux.cfg'), 'utf8')).toContain(`APPEND ${cmdline}`);
    expect(fs.readFileSync(path.join(stick.root, 'boot/vdboot/vdboot.conf'), 'utf8')).toContain(`options ${cmdline}`);
    expect(stick.out).toContain(`Kernel command line: ${cmdline}`);
    expect(stick.out).toContain('bcdedit');
  });

  it('without a host it searches every partition; an image outside the root dir is refused', () => {
    expect(kitEntries('/a.img', undefined, []).cmdline).toBe('root=vdisk:/a.img');
    const outside = path.join(dir, 'outside.img');
    fs.writeFileSync(outside, '');
    expect(() => imagePathInRoot(outside, stick.root)).toThrow(/not inside --root-dir/);
  });
});

describe('vdboot kit: the host filesystem', () => {
  /** Runs the kit with a findmnt that reports `target` as the mount point of the stick, with a UUID. */
  async function withFakeFindmnt(target: (root: string) => string) {
    const bin = path.join(dir, 'fake-bin');
    fs.mkdirSync(bin, { recursive: true });
    const root = path.join(dir, `host-${fs.readdirSync(dir).length}`);
    fs.mkdirSync(path.join(root, 'VMs'), { recursive: true });
    fs.copyFileSync(fixedImage, path.join(root, FIXED_IMAGE));
    fs.writeFileSync(path.join(bin, 'findmnt'), `#!/bin/sh\necho 'SOURCE="/dev/sdz1" FSTYPE="ntfs" TARGET="${target(fs.realpathSync(root))}" UUID="0123456789ABCDEF"'\n`, { mode: 0o755 });
    const saved = process.env.PATH;
    process.env.PATH = `${bin}:${saved}`;
    try {
      return await vdboot('kit', '--image', path.join(root, FIXED_IMAGE), '--root-dir', root, '--no-grub-images');
    } finally {
      process.env.PATH = saved;
    }
  }

  it('without --host, the UUID of the filesystem whose root DIR is goes into root=vdisk:', async () => {
    const r = await withFakeFindmnt((root) => root);
    expect(r.code).toBe(0);
    expect(r.out).toContain(`Kernel command line: "root=vdisk:UUID=0123456789ABCDEF:${FIXED_IMAGE}"`);
    expect(r.err).toMatch(/on \/dev\/sdz1 \(ntfs\) with UUID 0123456789ABCDEF/);
  });

  it('a DIR that is a folder inside another filesystem gets no UUID: the kernel line searches every partition', async () => {
    const r = await withFakeFindmnt(() => '/');
    expect(r.code).toBe(0);
    expect(r.out).toContain(`Kernel command line: "root=vdisk:${FIXED_IMAGE}"`);
    expect(r.err).toMatch(/is a folder/);
  });
});

describe('vdboot kit: boots', () => {
  // The three sticks are built first, then their VMs run side by side; each test awaits its own.
  const boots: Record<string, Promise<string>> = {};
  let exfatAppend = '';

  beforeAll(async () => {
    // NTFS behind a small ESP that holds the kit's grubx64.efi as the firmware's default loader.
    const ntfsKit = await kitOnStick('ntfs', ['--host', 'LABEL=KITNTFS', '--append', 'console=ttyS0,115200']);
    const esp = path.join(dir, 'esp.img');
    makeFat(esp, { sizeMiB: 34, files: { '/EFI/BOOT/BOOTX64.EFI': { hostFile: path.join(ntfsKit.root, 'boot/vdboot/grubx64.efi') } } });
    const ntfs = path.join(dir, 'ntfs.img');
    const ntfsStart = 35 * MiB; // after the ESP at 1 MiB
    makeNtfs(ntfs, { sizeMiB: 160, label: 'KITNTFS', partitionStartSector: ntfsStart / 512, files: treeOf(ntfsKit.root) });
    const ntfsDisk = path.join(dir, 'ntfs-stick.img');
    const layout = makePartitionedDisk(ntfsDisk, { table: 'gpt', partitions: [{ image: esp, type: 'uefi' }, { image: ntfs, type: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7' }] });
    if (layout[1]!.offset !== ntfsStart) throw new Error(`NTFS partition at ${layout[1]!.offset}, made for ${ntfsStart}`);

    // NTFS on an MBR disk whose boot code is g2ldr.mbr: its first 440 bytes in the MBR (the
    // partition table stays), the rest in the sectors after it; \g2ldr at the volume's root.
    const g2Kit = await kitOnStick('g2ldr', ['--host', 'LABEL=KITG2', '--append', 'console=ttyS0,115200']);
    const ntfsG2 = path.join(dir, 'ntfs-g2.img');
    makeNtfs(ntfsG2, { sizeMiB: 120, label: 'KITG2', partitionStartSector: 2048, files: { ...treeOf(g2Kit.root), '/g2ldr': { hostFile: path.join(g2Kit.root, 'boot/vdboot/g2ldr') } } });
    const g2Disk = path.join(dir, 'g2-stick.img');
    makePartitionedDisk(g2Disk, { table: 'dos', partitions: [{ image: ntfsG2, type: '7', bootable: true }] });
    const mbrCode = fs.readFileSync(path.join(g2Kit.root, 'boot/vdboot/g2ldr.mbr'));
    const fd = fs.openSync(g2Disk, 'r+');
    fs.writeSync(fd, mbrCode, 0, 440, 0);
    fs.writeSync(fd, mbrCode, 512, mbrCode.length - 512, 512);
    fs.closeSync(fd);

    // exFAT with a fixed VHD, booted with the kernel line of the kit's GRUB entry.
    const exfatKit = await kitOnStick('exfat', ['--append', 'rw'], true);
    const exfat = path.join(dir, 'exfat.img');
    makeExfat(exfat, { sizeMiB: 160, label: 'KITEXFAT', files: treeOf(exfatKit.root) });
    const exfatDisk = path.join(dir, 'exfat-stick.img');
    makePartitionedDisk(exfatDisk, { table: 'dos', partitions: [{ image: exfat, type: '7' }] });
    exfatAppend = grubLinuxArgs(fs.readFileSync(path.join(exfatKit.root, 'boot/vdboot/grub.cfg'), 'utf8'));

    boots.ntfs = bootFromDisk({ disk: ntfsDisk, format: 'raw', firmware: 'uefi', marker: GUEST_MARKER, timeoutMs: 400_000 });
    boots.g2ldr = bootFromDisk({ disk: g2Disk, format: 'raw', firmware: 'bios', marker: GUEST_MARKER, timeoutMs: 400_000 });
    boots.exfat = (async () => {
      const vm = await bootVm({
        kernel: path.join(exfatKit.root, 'boot/vdboot/vmlinuz'), initrd: path.join(exfatKit.root, 'boot/vdboot/initrd.img'),
        append: exfatAppend, disks: [{ file: exfatDisk, interface: 'virtio-blk', snapshot: true }], name: 'kit-exfat',
      });
      vms.push(vm);
      await vm.waitFor(GUEST_MARKER, 400_000);
      return vm.transcript();
    })();
    for (const p of Object.values(boots)) p.catch(() => {}); // awaited in the tests
  }, 300_000);

  it('NTFS stick: OVMF runs the kit\'s grubx64.efi, GRUB finds the image by file and boots it through vdboot', async () => {
    const facts = parseGuestFacts((await boots.ntfs!).replace(/\r/g, ''));
    expect(facts.cmdline).toContain(`"root=vdisk:LABEL=KITNTFS:${IMAGE}" rd.vdisk.mode=snapshot`);
    expect(facts.root.fstype).toBe('ext4');
    expect(facts.root.device).toMatch(/^\/dev\/(mapper\/vdisk|dm-)/);
  }, 420_000);

  it('BIOS: g2ldr.mbr as MBR code (as Windows\' boot manager runs it) loads \\g2ldr from NTFS; GRUB finds the image by file and boots it', async () => {
    const facts = parseGuestFacts((await boots.g2ldr!).replace(/\r/g, ''));
    expect(facts.cmdline).toContain(`"root=vdisk:LABEL=KITG2:${IMAGE}"`);
    expect(facts.root.device).toMatch(/^\/dev\/(mapper\/vdisk|dm-)/);
  }, 420_000);

  it('exFAT stick: the kernel line of the kit\'s GRUB entry boots a fixed VHD read-write (no host: vdboot searches the partitions)', async () => {
    expect(exfatAppend).toBe(`"root=vdisk:${FIXED_IMAGE}" rw`);
    const facts = parseGuestFacts(await boots.exfat!);
    expect(facts.root.fstype).toBe('ext4');
    expect(facts.root.mode).toBe('rw');
    expect(facts.root.device).toMatch(/^\/dev\/(mapper\/vdisk|dm-)/);
  }, 420_000);
});
