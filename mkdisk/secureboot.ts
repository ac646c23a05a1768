/**
 * The Secure Boot chain of `vdboot kit`, with no key to enroll: firmware that trusts
 * Microsoft's UEFI CA (every PC sold with Windows) starts Debian's shim, signed by that CA;
 * shim starts Debian's GRUB, signed by Debian's CA that shim carries; GRUB, under shim's
 * lockdown, asks shim to verify the kernel before it boots it (Debian's kernels are signed
 * by the same CA). vdboot's initramfs is not checked by anyone in this chain; the kernel
 * then checks every module it loads (Debian's are signed).
 *
 * Debian's signed GRUB is one image with its modules built in and an embedded
 * configuration: its prefix is /EFI/debian on its own partition; when that folder is absent
 * it reads /boot/grub/grub.cfg there, else `$cmdpath/grub.cfg`, the grub.cfg in its own
 * folder. It loads no module from disk under Secure Boot, and has no NTFS or exFAT driver:
 * so the kernel and the initramfs go onto the EFI system partition (FAT) beside it, and
 * vdboot, not GRUB, finds the image's partition (root=vdisk:HOST:PATH).
 *
 * The tree written into the ESP (or a FAT stick's root):
 *   EFI/BOOT/BOOTX64.EFI   shim, the firmware's default loader for removable media
 *   EFI/BOOT/grubx64.efi, mmx64.efi, grub.cfg
 *   EFI/vdboot/shimx64.efi, grubx64.efi, mmx64.efi, grub.cfg   for a boot entry of its own
 *   EFI/vdboot/vmlinuz, initrd.img
 *   EFI/vdboot/windows-install.cmd, windows-uninstall.cmd   a firmware boot entry from Windows
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { windowsInstallScript, windowsUninstallScript } from './windows-scripts.ts';

export const SHIM = '/usr/lib/shim/shimx64.efi.signed';
export const MOK_MANAGER = '/usr/lib/shim/mmx64.efi.signed';
export const SIGNED_GRUB = '/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed';

/** The CA Debian's shim carries: kernels it signs start without enrolling a key. */
export const DEBIAN_CA = 'Debian Secure Boot CA';

/**
 * Whether a PE/COFF program carries an Authenticode signature: a certificate table
 * (data directory 4) that is not empty and lies inside the file. Reads the headers only;
 * every offset is checked against the file's length (a kernel given by the user is
 * untrusted input).
 */
export function hasPeSignature(bytes: Uint8Array): boolean {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 0x40 || dv.getUint16(0, true) !== 0x5a4d /* MZ */) return false;
  const pe = dv.getUint32(0x3c, true);
  if (pe + 24 > bytes.length || dv.getUint32(pe, true) !== 0x00004550 /* PE\0\0 */) return false;
  const opt = pe + 24;
  const magic = dv.getUint16(opt, true);
  const dirs = magic === 0x20b ? opt + 112 : magic === 0x10b ? opt + 96 : -1;
  if (dirs < 0) return false;
  const count = dv.getUint32(dirs - 4, true);
  if (count <= 4 || dirs + 5 * 8 > bytes.length) return false;
  const certOffset = dv.getUint32(dirs + 4 * 8, true);
  const certSize = dv.getUint32(dirs + 4 * 8 + 4, true);
  return certSize > 8 && certOffset + certSize <= bytes.length;
}

export interface SignatureInfo {
  signed: boolean;
  /** the issuers' common names, as sbverify --list names them ("Microsoft Corporation UEFI CA 2011") */
  issuers: string[];
  /** why issuers is empty though signed (sbverify missing) */
  unknownWhy?: string;
}

/** Whether `file` is signed, and by whom (sbverify --list, from Debian's sbsigntool). */
export function signatureOf(file: string): SignatureInfo {
  if (!hasPeSignature(fs.readFileSync(file))) return { signed: false, issuers: [] };
  const r = spawnSync('sbverify', ['--list', file], { encoding: 'utf8' });
  if (r.error) return { signed: true, issuers: [], unknownWhy: 'sbverify is not installed (Debian package sbsigntool)' };
  const issuers: string[] = [];
  let inIssuers = false;
  for (const line of r.stdout.split('\n')) {
    if (/^image signature issuers:/.test(line)) inIssuers = true;
    else if (/^image signature certificates:/.test(line) || /^signature \d+/.test(line)) inIssuers = false;
    else if (inIssuers) {
      const cn = /CN=([^/]+)/.exec(line)?.[1]?.trim();
      if (cn && !issuers.includes(cn)) issuers.push(cn);
    }
  }
  return { signed: true, issuers };
}

export function describeSignature(s: SignatureInfo): string {
  if (!s.signed) return 'not signed';
  if (s.issuers.length === 0) return `signed (by whom is unknown: ${s.unknownWhy ?? 'sbverify names no issuer'})`;
  return `signed by ${s.issuers.join(' and by ')}`;
}

/** A GRUB 2 word: single-quoted when needed. */
function grubWord(word: string): string {
  return /^[\w/.,:=+@%-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * The grub.cfg Debian's signed GRUB reads from its own folder ($cmdpath). Only commands
 * built into the signed image: regexp, echo, linux, initrd (no insmod: Secure Boot
 * forbids loading modules). The kernel and initramfs are found on the partition GRUB was
 * started from, the device part of $cmdpath ("(hd0,gpt1)/EFI/BOOT" → "(hd0,gpt1)").
 */
export function signedGrubConfig(title: string, kernelWords: string[]): string {
  return [
    '# vdboot kit: read by Debian\'s signed GRUB (started by shim) from its own folder.',
    '# Under Secure Boot GRUB loads no modules: only its built-in commands are used here.',
    'set timeout=5',
    'set default=0',
    '',
    `menuentry ${grubWord(title)} {`,
    `\tregexp --set=1:vdboot_esp '^(\\([^)]*\\))' "$cmdpath"`,
    `\techo "vdboot: loading the kernel and the initramfs from \${vdboot_esp}/EFI/vdboot"`,
    `\tlinux \${vdboot_esp}/EFI/vdboot/vmlinuz ${kernelWords.map(grubWord).join(' ')}`,
    '\tinitrd ${vdboot_esp}/EFI/vdboot/initrd.img',
    '}',
    '',
  ].join('\n');
}

export interface SignedFile {
  /** relative to the ESP tree, with '/' */
  path: string;
  what: string;
  signature: string;
}

export interface SecureBootChain {
  /** the ESP tree written (the --esp DIR, or the kit's root dir) */
  dir: string;
  files: SignedFile[];
  /** files left as they were, and why */
  notes: string[];
  /** the kernel will not start under Secure Boot (unsigned, or not by Debian's CA) */
  kernelProblem?: string;
}

/** What the chain needs from this machine, or the reason it cannot be written. */
export function secureBootMissing(): string | undefined {
  const missing = [
    [SHIM, 'shim-signed'],
    [MOK_MANAGER, 'shim-signed'],
    [SIGNED_GRUB, 'grub-efi-amd64-signed'],
  ].filter(([f]) => !fs.existsSync(f!));
  if (missing.length === 0) return undefined;
  return `${missing.map(([f]) => f).join(', ')} missing: install the Debian packages ${[...new Set(missing.map(([, p]) => p))].join(' and ')}`;
}

/**
 * Writes the chain into `espDir`. EFI/BOOT/BOOTX64.EFI is written only when absent or
 * already shim: on a machine's own ESP it is the fallback loader (often Windows' boot
 * manager), and replacing it could stop the machine from booting.
 */
export function writeSecureBootChain(o: {
  espDir: string;
  kernelFile: string;
  initrd: Uint8Array;
  title: string;
  kernelWords: string[];
  copy: (from: string | Uint8Array, to: string, what: string) => void;
}): SecureBootChain {
  const files: SignedFile[] = [];
  const notes: string[] = [];
  const shimSig = describeSignature(signatureOf(SHIM));
  const grubSig = describeSignature(signatureOf(SIGNED_GRUB));
  const mmSig = describeSignature(signatureOf(MOK_MANAGER));
  const kernel = signatureOf(o.kernelFile);
  let kernelProblem: string | undefined;
  if (!kernel.signed) {
    kernelProblem = `the kernel ${o.kernelFile} is not signed, so shim and GRUB will not start it under Secure Boot ("bad shim signature"): ` +
      'give --kernel a signed kernel (Debian\'s linux-image-amd64 is signed), sign this one and enroll your key with mokutil --import, or turn Secure Boot off in the firmware';
  } else if (kernel.issuers.length > 0 && !kernel.issuers.includes(DEBIAN_CA)) {
    kernelProblem = `the kernel ${o.kernelFile} is ${describeSignature(kernel)}, not by ${DEBIAN_CA}, the only key Debian's shim trusts without enrollment: ` +
      'enroll that key with mokutil --import (MokManager, mmx64.efi, asks at the next boot), or give --kernel a Debian kernel';
  }
  const config = signedGrubConfig(o.title, o.kernelWords);
  const put = (rel: string, from: string | Uint8Array, what: string, signature: string) => {
    const to = path.join(o.espDir, ...rel.split('/'));
    fs.mkdirSync(path.dirname(to), { recursive: true });
    o.copy(from, to, rel);
    files.push({ path: rel, what, signature });
  };
  const fallback = path.join(o.espDir, 'EFI', 'BOOT', 'BOOTX64.EFI');
  const shimBytes = fs.readFileSync(SHIM);
  const writeFallback = !fs.existsSync(fallback) || fs.readFileSync(fallback).equals(shimBytes);
  if (writeFallback) {
    put('EFI/BOOT/BOOTX64.EFI', SHIM, 'shim, the firmware\'s default loader', shimSig);
    put('EFI/BOOT/grubx64.efi', SIGNED_GRUB, 'Debian\'s GRUB', grubSig);
    put('EFI/BOOT/mmx64.efi', MOK_MANAGER, 'shim\'s MokManager', mmSig);
    put('EFI/BOOT/grub.cfg', new TextEncoder().encode(config), 'the menu GRUB reads from its folder', 'not checked (GRUB reads it)');
  } else {
    notes.push(`${path.join(o.espDir, 'EFI/BOOT/BOOTX64.EFI')} is another loader (kept as it is, and EFI/BOOT untouched): start EFI/vdboot/shimx64.efi from a boot entry of its own`);
  }
  put('EFI/vdboot/shimx64.efi', SHIM, 'shim', shimSig);
  put('EFI/vdboot/grubx64.efi', SIGNED_GRUB, 'Debian\'s GRUB', grubSig);
  put('EFI/vdboot/mmx64.efi', MOK_MANAGER, 'shim\'s MokManager', mmSig);
  put('EFI/vdboot/grub.cfg', new TextEncoder().encode(config), 'the menu GRUB reads from its folder', 'not checked (GRUB reads it)');
  put('EFI/vdboot/vmlinuz', o.kernelFile, 'the kernel', `${describeSignature(kernel)}${kernelProblem ? ': will NOT start under Secure Boot' : ', verified by shim when GRUB loads it'}`);
  put('EFI/vdboot/initrd.img', o.initrd, 'vdboot\'s initramfs', 'not signed (Secure Boot checks the kernel and its modules, not the initramfs)');
  put('EFI/vdboot/windows-install.cmd', new TextEncoder().encode(windowsInstallScript(o.title)), 'Windows: copies EFI\\vdboot to the PC\'s ESP, adds a boot entry', 'a script (run as administrator)');
  put('EFI/vdboot/windows-uninstall.cmd', new TextEncoder().encode(windowsUninstallScript(o.title)), 'Windows: removes that entry and folder', 'a script (run as administrator)');
  // What the signed GRUB's built-in configuration reads before $cmdpath/grub.cfg.
  const debianCfg = ['EFI/debian/grub.cfg', 'EFI/debian/x86_64-efi/grub.cfg'].find((f) => fs.existsSync(path.join(o.espDir, f)));
  if (debianCfg) {
    notes.push(`${path.join(o.espDir, debianCfg)} exists: Debian's signed GRUB reads it before the grub.cfg in its own folder, so this chain shows Debian's menu; add the kit's GRUB entry there instead (on that Debian: /etc/grub.d/40_custom, then update-grub)`);
  } else if (!fs.existsSync(path.join(o.espDir, 'EFI', 'debian')) && ['boot/grub/grub.cfg', 'boot/grub/x86_64-efi/grub.cfg'].some((f) => fs.existsSync(path.join(o.espDir, f)))) {
    notes.push(`${path.join(o.espDir, 'boot/grub')} holds a grub.cfg: with no EFI/debian folder Debian's signed GRUB reads that one before the grub.cfg in its own folder; add the kit's GRUB entry to it, or move it away`);
  }
  return { dir: o.espDir, files, notes, kernelProblem };
}
