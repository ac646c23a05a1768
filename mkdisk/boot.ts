/**
 * The boot partition of `vdboot mkdisk --bootable`: a FAT32 partition holding the kernel,
 * a vdboot initramfs and GRUB for both firmware kinds, written into the raw disk file
 * without mounting anything and without root.
 *
 * Why GRUB: it is the one boot loader in Debian's packages that boots the same
 * configuration under BIOS and UEFI and can be installed into an image file by plain
 * writes: `grub-mkimage` (grub-pc-bin, grub-efi-amd64-bin) builds a BIOS core.img and a
 * BOOTX64.EFI with every module they need built in and a small embedded configuration
 * that finds the boot partition by its FAT serial number; vdboot itself writes GRUB's
 * boot.img into the MBR's code area and core.img into the BIOS boot partition (GPT) or
 * the gap after the MBR (MBR), patching the sector numbers as grub-bios-setup does; the
 * files go into the FAT partition with mtools. (syslinux would need a second loader for
 * UEFI with a second configuration, and extlinux needs a mounted filesystem.)
 * The same `search` command is what `vdboot kit` entries use to find an image's partition.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { buildInitramfs, kernelReleaseOfImage, type ToolName } from './../mkinitramfs/build.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The disk's partition table (build.ts lays the disk out; where GRUB's core.img goes depends on it). */
export type PartitionScheme = 'gpt' | 'mbr' | 'none';

/** The FAT32 boot partition (EFI system partition): room for two kernels and initramfs images. */
export const BOOT_PARTITION_BYTES = 64 * MiB;
/** The BIOS boot partition GRUB's core.img lives in on a GPT disk. */
export const BIOS_BOOT_BYTES = 1 * MiB;
export const GRUB_PC_DIR = '/usr/lib/grub/i386-pc';
export const GRUB_EFI_DIR = '/usr/lib/grub/x86_64-efi';

export class BootError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BootError';
  }
}

function run(cmd: string, args: string[], what: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, env: { ...process.env, LC_ALL: 'C', MTOOLS_SKIP_CHECK: '1' } });
  if (r.error) throw new BootError(`${what}: ${cmd} could not run (${r.error.message}); install its Debian package`);
  if (r.status !== 0) throw new BootError(`${what}: ${cmd} ${args.join(' ')} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

/** Compares kernel releases as version numbers (6.1.0-10 < 6.1.0-9 is wrong as text). */
function compareReleases(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

/** The kernel file for --kernel (a vmlinuz path or a release), default the newest /boot/vmlinuz-*. */
export function findKernel(kernel?: string, bootDir = '/boot'): { file: string; release: string } {
  if (kernel && fs.existsSync(kernel) && fs.statSync(kernel).isFile()) return { file: kernel, release: kernelReleaseOfImage(kernel) };
  if (kernel) {
    const f = path.join(bootDir, `vmlinuz-${kernel}`);
    if (!fs.existsSync(f)) throw new BootError(`--kernel ${kernel}: neither a file nor a release with ${f}`);
    return { file: f, release: kernelReleaseOfImage(f) };
  }
  const names = fs.existsSync(bootDir) ? fs.readdirSync(bootDir).filter((n) => n.startsWith('vmlinuz-')) : [];
  if (names.length === 0) throw new BootError(`no kernel in ${bootDir} (vmlinuz-*): give --kernel VMLINUZ, or install one (Debian: linux-image-amd64)`);
  names.sort((a, b) => compareReleases(a.slice(8), b.slice(8)));
  const file = path.join(bootDir, names[names.length - 1]!);
  return { file, release: kernelReleaseOfImage(file) };
}

export interface BootFiles {
  kernelFile: string;
  release: string;
  /** the vdboot initramfs for that kernel */
  initrd: Uint8Array;
}

/**
 * The kernel and a vdboot initramfs built for it (its modules from /lib/modules/RELEASE),
 * with mkinitramfs's default programs (ntfs-3g on kernels without ntfs3) unless left out.
 */
export function prepareBootFiles(kernel: string | undefined, log: (l: string) => void, tools: { with?: ToolName[]; without?: ToolName[] } = {}): BootFiles {
  const k = findKernel(kernel);
  log(`building a vdboot initramfs for ${k.release}`);
  const result = buildInitramfs({ kernel: k.file, tools: tools.with, without: tools.without });
  for (const note of result.notes) log(`initramfs: ${note}`);
  return { kernelFile: k.file, release: k.release, initrd: result.image };
}

export interface BootInstall {
  /** the raw disk file */
  raw: string;
  scheme: PartitionScheme;
  espOffset: number;
  espSize: number;
  /** GPT: where the BIOS boot partition starts (1 MiB long) */
  biosBootOffset?: number;
  kernel?: string;
  /** the kernel command line: root=… and the rest */
  append: string;
  scratch: string;
  log: (l: string) => void;
}

export interface BootSetup {
  cmdline: string;
  /** the FAT serial as GRUB's search --fs-uuid writes it: XXXX-XXXX */
  espSerial: string;
  release: string;
}

/** Modules built into both GRUB images, so nothing is loaded from the disk. */
const GRUB_MODULES_COMMON = ['part_gpt', 'part_msdos', 'fat', 'ext2', 'search', 'search_fs_uuid', 'search_fs_file', 'configfile', 'normal', 'linux', 'echo', 'test', 'serial', 'terminal'];
const GRUB_MODULES_PC = ['biosdisk'];
const GRUB_MODULES_EFI = ['efi_gop', 'efi_uga'];

/** The configuration built into core.img and BOOTX64.EFI: find the boot partition, then read its grub.cfg. */
export function earlyGrubConfig(serial: string): string {
  return [
    `search --no-floppy --fs-uuid --set=root ${serial}`,
    'set prefix=($root)/boot/grub',
    '',
  ].join('\n');
}

export function grubMenu(cmdline: string): string {
  return [
    '# vdboot mkdisk: the boot menu of this disk (BIOS and UEFI read the same file)',
    'serial --unit=0 --speed=115200',
    'terminal_input console serial',
    'terminal_output console serial',
    'set timeout=2',
    'set default=0',
    '',
    "menuentry 'Linux (vdboot)' {",
    `\tlinux /boot/vdboot/vmlinuz ${cmdline}`,
    '\tinitrd /boot/vdboot/initrd.img',
    '}',
    '',
  ].join('\n');
}

/**
 * Writes GRUB's boot.img into the MBR code area (keeping the disk signature and the
 * partition table at 440..511) and core.img at `coreOffset`, with the sector numbers
 * patched as grub-bios-setup does: boot.img's kernel_sector (0x5c) points at core.img's
 * first sector, boot_drive (0x64) 0xff means "the drive the BIOS booted", the drive-check
 * jump (0x66) becomes two NOPs for BIOSes that pass a wrong drive number, and the
 * blocklist at the end of core.img's first sector (0x1f4: start, count) lists the rest.
 * Dangerous if wrong: it overwrites the first 440 bytes of the disk and `room` bytes at
 * `coreOffset`, so both are checked against the layout first.
 */
export function writeBiosBoot(raw: string, bootImg: Uint8Array, coreImg: Uint8Array, coreOffset: number, room: number): void {
  if (bootImg.length !== 512) throw new BootError(`GRUB's boot.img is ${bootImg.length} bytes, not 512`);
  if (coreImg.length > room) throw new BootError(`GRUB's core.img (${coreImg.length} bytes) does not fit the ${room} bytes before the first partition`);
  if (coreOffset % 512 !== 0 || coreOffset < 512) throw new BootError(`core.img must start on a sector after the MBR, not at byte ${coreOffset}`);
  const sectors = Math.ceil(coreImg.length / 512);
  const core = new Uint8Array(sectors * 512);
  core.set(coreImg);
  const dv = new DataView(core.buffer);
  const first = coreOffset / 512;
  dv.setBigUint64(0x1f4, BigInt(first + 1), true);
  dv.setUint16(0x1f4 + 8, sectors - 1, true);

  const fd = fs.openSync(raw, 'r+');
  try {
    const mbr = Buffer.alloc(512);
    fs.readSync(fd, mbr, 0, 512, 0);
    if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) throw new BootError('the disk has no partition table to put GRUB\'s boot code next to');
    mbr.set(bootImg.subarray(0, 440), 0);
    mbr.writeBigUInt64LE(BigInt(first), 0x5c);
    mbr[0x64] = 0xff;
    mbr[0x66] = 0x90;
    mbr[0x67] = 0x90;
    fs.writeSync(fd, mbr, 0, 512, 0);
    fs.writeSync(fd, core, 0, core.length, coreOffset);
  } finally {
    fs.closeSync(fd);
  }
}

function requireGrub(dir: string, pkg: string): void {
  if (!fs.existsSync(path.join(dir, 'moddep.lst'))) {
    throw new BootError(`--bootable needs GRUB's ${path.basename(dir)} modules in ${dir}: install the Debian package ${pkg}`);
  }
}

export async function installBootLoader(o: BootInstall): Promise<BootSetup> {
  requireGrub(GRUB_PC_DIR, 'grub-pc-bin');
  requireGrub(GRUB_EFI_DIR, 'grub-efi-amd64-bin');
  const files = prepareBootFiles(o.kernel, o.log);
  const serialHex = randomBytes(4).toString('hex').toUpperCase();
  const serial = `${serialHex.slice(0, 4)}-${serialHex.slice(4)}`;
  const cmdline = `${o.append} console=tty0 console=ttyS0,115200`;

  o.log(`making the boot partition (FAT32, ${o.espSize / MiB} MiB) with GRUB for BIOS and UEFI`);
  const espSector = o.espOffset / 512;
  // One sector per cluster, always: mkfs.fat picks the cluster size from the size of the
  // whole file it is given (the disk), not from the partition's block count, and on disks of
  // about 300 MiB and more it picked 4 KiB clusters, too few for FAT32 in 64 MiB (mtools then
  // reads it as FAT16 and finds no root directory).
  run('mkfs.fat', ['-F', '32', '-s', '1', '-n', 'VDBOOT-BOOT', '-i', serialHex, '-h', String(espSector), '--offset', String(espSector), o.raw, String(o.espSize / KiB)], 'making the boot partition');
  const img = `${o.raw}@@${o.espOffset}`;
  const early = path.join(o.scratch, 'early.cfg');
  fs.writeFileSync(early, earlyGrubConfig(serial));
  const efi = path.join(o.scratch, 'BOOTX64.EFI');
  run('grub-mkimage', ['-d', GRUB_EFI_DIR, '-O', 'x86_64-efi', '-o', efi, '-c', early, '-p', '/boot/grub', ...GRUB_MODULES_COMMON, ...GRUB_MODULES_EFI], 'building GRUB for UEFI');
  const core = path.join(o.scratch, 'core.img');
  run('grub-mkimage', ['-d', GRUB_PC_DIR, '-O', 'i386-pc', '-o', core, '-c', early, '-p', '/boot/grub', ...GRUB_MODULES_COMMON, ...GRUB_MODULES_PC], 'building GRUB for BIOS');

  const kernelCopy = path.join(o.scratch, 'vmlinuz');
  fs.copyFileSync(files.kernelFile, kernelCopy);
  const initrd = path.join(o.scratch, 'initrd.img');
  fs.writeFileSync(initrd, files.initrd);
  const cfg = path.join(o.scratch, 'grub.cfg');
  fs.writeFileSync(cfg, grubMenu(cmdline));
  for (const d of ['::/EFI', '::/EFI/BOOT', '::/boot', '::/boot/grub', '::/boot/vdboot']) run('mmd', ['-i', img, d], 'making the boot partition');
  run('mcopy', ['-i', img, efi, '::/EFI/BOOT/BOOTX64.EFI'], 'copying GRUB for UEFI');
  run('mcopy', ['-i', img, cfg, '::/boot/grub/grub.cfg'], 'copying the boot menu');
  run('mcopy', ['-i', img, kernelCopy, '::/boot/vdboot/vmlinuz'], 'copying the kernel');
  run('mcopy', ['-i', img, initrd, '::/boot/vdboot/initrd.img'], 'copying the initramfs');

  const bootImg = fs.readFileSync(path.join(GRUB_PC_DIR, 'boot.img'));
  const coreImg = fs.readFileSync(core);
  if (o.scheme === 'gpt') {
    if (o.biosBootOffset === undefined) throw new BootError('a GPT disk needs its BIOS boot partition for GRUB');
    writeBiosBoot(o.raw, bootImg, coreImg, o.biosBootOffset, BIOS_BOOT_BYTES);
  } else {
    // MBR: the gap between the MBR and the first partition (1 MiB less the MBR itself).
    writeBiosBoot(o.raw, bootImg, coreImg, 512, o.espOffset - 512);
  }
  return { cmdline, espSerial: serial, release: files.release };
}
