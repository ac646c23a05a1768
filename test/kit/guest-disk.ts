/** The end-to-end kit's guest disk: the one the root=vdisk: tests turn into images. */
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, type GuestOptions } from '../../qemu/guest.ts';
import { manifestForKernel, parseModulesBuiltin, parseModulesDep, parseSoftdeps } from '../../src/formats/kmod-index.ts';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';

/** GPT type of a "Linux root (x86-64)" partition, which rd.vdisk.root=auto picks. */
export const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';

/**
 * The test guest (qemu/guest.ts) as a raw GPT disk in `dir`: a 2 MiB ESP, then the guest's
 * ext4 root ("vdisk root", 24 MiB unless `sizeMiB`) in a Linux root partition. Returns the disk and the root
 * filesystem image alone.
 */
export function makeGuestDisk(dir: string, guest: GuestOptions, opts: { uuid?: string; sizeMiB?: number } = {}): { raw: string; fs: string } {
  const rootDir = join(dir, 'root');
  buildGuestRoot(rootDir, guest);
  const fs = join(dir, 'root.ext4');
  makeExt4(fs, { sizeMiB: opts.sizeMiB ?? 24, label: 'vdisk root', ...(opts.uuid ? { uuid: opts.uuid } : {}), fromDir: rootDir });
  const raw = join(dir, 'guest.raw');
  makePartitionedDisk(raw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fs, type: ROOT_TYPE, name: 'linux' }] });
  return { raw, fs };
}

/**
 * A plain-root guest disk in `dir` that holds another kernel than the one booting it: the
 * test guest, `kernel` (a vmlinuz-RELEASE from .cache/kernels, its config and modules
 * beside it) in /boot, and in /lib/modules/RELEASE the module index (the text files) with
 * the modules vdboot's kexec step takes for `running` (the booting initramfs's manifest):
 * the whole tree would make the disk 100 MiB larger. One GPT partition, ext4 labelled
 * `label`. No modules for the booting kernel.
 */
export function makeKexecGuestDisk(dir: string, kernel: string, running: InitramfsManifest, guest: GuestOptions, label: string): string {
  const release = basename(kernel).replace(/^vmlinuz-/, '');
  const modSrc = join(dirname(kernel), '..', 'lib', 'modules', release);
  const rootDir = join(dir, 'kexec-root');
  buildGuestRoot(rootDir, guest);
  mkdirSync(join(rootDir, 'boot'));
  copyFileSync(kernel, join(rootDir, 'boot', basename(kernel)));
  const config = join(dirname(kernel), `config-${release}`);
  if (existsSync(config)) copyFileSync(config, join(rootDir, 'boot', `config-${release}`));
  const modDst = join(rootDir, 'lib', 'modules', release);
  mkdirSync(modDst, { recursive: true });
  for (const f of readdirSync(modSrc)) if (/^modules\.[a-z.]+$/.test(f) && !f.endsWith('.bin')) copyFileSync(join(modSrc, f), join(modDst, f));
  const text = (f: string) => (existsSync(join(modSrc, f)) ? readFileSync(join(modSrc, f), 'utf8') : '');
  const index = { release, ...parseModulesDep(text('modules.dep')), softdeps: parseSoftdeps(text('modules.softdep')), builtin: parseModulesBuiltin(text('modules.builtin')) };
  for (const f of manifestForKernel(index, text('modules.alias'), text('modules.builtin.modinfo'), running).files) {
    mkdirSync(dirname(join(modDst, f.rel)), { recursive: true });
    copyFileSync(join(modSrc, f.rel), join(modDst, f.rel));
  }
  const fs = join(dir, 'kexec-root.ext4');
  makeExt4(fs, { sizeMiB: 96, label, fromDir: rootDir });
  const disk = join(dir, 'kexec-disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: fs, name: 'root' }] });
  return disk;
}
