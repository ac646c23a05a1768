/**
 * `vdboot kit`: what a stick or partition that holds an image needs to boot it: the kernel
 * and a vdboot initramfs in DIR/boot/vdboot/, and boot entries that find the image's
 * partition by the image file itself (GRUB 2 `search --file`, grub4dos `find --set-root`;
 * syslinux and systemd-boot read their own partition) and boot with
 * `root=vdisk:HOST:PATH`. It also builds GRUB as a UEFI program (grubx64.efi) and as a
 * BIOS loader Windows' boot manager can chain (g2ldr + g2ldr.mbr), both with the same
 * search built in, for machines that have no GRUB yet.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { GRUB_EFI_DIR, GRUB_PC_DIR, prepareBootFiles } from './boot.ts';
import { openHostImage } from '../src/sys/host-image.ts';
import { secureBootMissing, writeSecureBootChain, type SecureBootChain } from './secureboot.ts';

const MiB = 1024 * 1024;

export class KitError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'KitError';
  }
}

export interface KitOptions {
  /** the image file, inside rootDir */
  image: string;
  /** the root of the filesystem (stick, partition) that holds the image */
  rootDir: string;
  /** the host filesystem spec for root=vdisk: (UUID=…, LABEL=…, PARTUUID=…); default: DIR's filesystem UUID */
  host?: string;
  kernel?: string;
  /** more kernel command line (e.g. rw, console=ttyS0,115200) */
  append?: string;
  /** build grubx64.efi and g2ldr (default true; needs grub-efi-amd64-bin and grub-pc-bin) */
  grubImages?: boolean;
  /**
   * The EFI system partition (a mounted FAT filesystem, or a folder to copy onto one) for
   * the Secure Boot chain (shim, Debian's signed GRUB, the kernel and the initramfs);
   * default: rootDir when it is on FAT, else no chain.
   */
  esp?: string;
  /** write the Secure Boot chain (default true; needs shim-signed and grub-efi-amd64-signed) */
  secureBoot?: boolean;
  /** the image may name files outside its folder: opened so here, booted with rd.vdisk.allow-outside=1 */
  allowOutside?: boolean;
  log?: (line: string) => void;
}

export interface KitEntries {
  grub: string;
  grub4dos: string;
  syslinux: string;
  systemdBoot: string;
}

export interface KitResult {
  /** the image's path on its filesystem, from the root: /VMs/linux.vhdx */
  imagePath: string;
  /** the host spec used, or undefined when the kernel line searches every partition */
  host?: string;
  hostSource: 'option' | 'detected' | 'none';
  /** the kernel command line of every entry */
  cmdline: string;
  entries: KitEntries;
  /** why the entries boot in snapshot mode, when they do */
  snapshotReason?: string;
  /** files written, relative to rootDir */
  files: string[];
  release: string;
  /** the Secure Boot chain, when written */
  secureBoot?: SecureBootChain;
  /** why no Secure Boot chain was written */
  secureBootSkipped?: string;
}

function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 16 * MiB, env: { ...process.env, LC_ALL: 'C' } });
  return { status: r.error ? -1 : r.status ?? 1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

/**
 * The UUID of the filesystem `dir` is on: findmnt (which asks udev's database), then
 * blkid on the device (which reads the superblock; may need read access to the device).
 */
export function detectHostUuid(dir: string): { uuid?: string; device?: string; fstype?: string; mountpoint?: string } {
  const f = run('findmnt', ['-n', '-P', '-o', 'SOURCE,FSTYPE,TARGET,UUID', '--target', dir]);
  if (f.status !== 0) return {};
  // KEY="value" pairs, first line (a mount point can be listed twice when mounted over)
  const fields = Object.fromEntries([...(f.stdout.split('\n')[0] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1]!, m[2]!]));
  const device = fields.SOURCE || undefined;
  const fstype = fields.FSTYPE || undefined;
  const mountpoint = fields.TARGET || undefined;
  const uuid = fields.UUID || undefined;
  if (uuid) return { uuid, device, fstype, mountpoint };
  if (device?.startsWith('/dev/')) {
    const b = run('blkid', ['-o', 'value', '-s', 'UUID', device]);
    if (b.status === 0 && b.stdout.trim()) return { uuid: b.stdout.trim(), device, fstype, mountpoint };
  }
  return { device, fstype, mountpoint };
}

/** The image's path from the root of rootDir, with '/' separators: "/VMs/linux.vhdx". */
export function imagePathInRoot(image: string, rootDir: string): string {
  const root = fs.realpathSync(rootDir);
  let img: string;
  try {
    img = fs.realpathSync(image);
  } catch {
    throw new KitError(`the image ${image} does not exist`);
  }
  const rel = path.relative(root, img);
  if (rel === '' || rel.startsWith('..') || path.isAbsolute(rel)) {
    throw new KitError(`the image ${image} is not inside --root-dir ${rootDir}: give the root of the stick or partition that holds it`);
  }
  return `/${rel.split(path.sep).join('/')}`;
}

/** A kernel command-line word, quoted the kernel's way when it holds spaces. */
function kernelWord(word: string): string {
  if (word.includes('"')) throw new KitError(`a double quote cannot be passed on the kernel command line: ${word}`);
  return /\s/.test(word) ? `"${word}"` : word;
}

/** A GRUB 2 word: single-quoted when needed (GRUB passes words with spaces to the kernel in double quotes). */
function grubWord(word: string): string {
  return /^[\w/.,:=+@%-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** A grub4dos path: spaces escaped with a backslash. */
function grub4dosPath(p: string): string {
  return p.replace(/ /g, '\\ ');
}

export function rootWord(host: string | undefined, imagePath: string): string {
  return host ? `root=vdisk:${host}:${imagePath}` : `root=vdisk:${imagePath}`;
}

function entryTitle(imagePath: string): string {
  return `Linux from ${imagePath} (vdboot)`;
}

function kernelWords(host: string | undefined, imagePath: string, append: string[]): string[] {
  return [rootWord(host, imagePath), ...append];
}

export function kitEntries(imagePath: string, host: string | undefined, append: string[]): { entries: KitEntries; cmdline: string } {
  const words = kernelWords(host, imagePath, append);
  const cmdline = words.map(kernelWord).join(' ');
  const title = entryTitle(imagePath);
  const kernel = '/boot/vdboot/vmlinuz';
  const initrd = '/boot/vdboot/initrd.img';
  const grub = [
    `menuentry ${grubWord(title)} {`,
    `\tsearch --no-floppy --file --set=root ${grubWord(imagePath)}`,
    `\tlinux ${kernel} ${words.map(grubWord).join(' ')}`,
    `\tinitrd ${initrd}`,
    '}',
    '',
  ].join('\n');
  const grub4dos = [
    `title ${title}`,
    `find --set-root --ignore-floppies ${grub4dosPath(imagePath)}`,
    `kernel ${kernel} ${cmdline}`,
    `initrd ${initrd}`,
    '',
  ].join('\n');
  const syslinux = [
    'LABEL vdboot',
    `\tMENU LABEL ${title}`,
    `\tLINUX ${kernel}`,
    `\tINITRD ${initrd}`,
    `\tAPPEND ${cmdline}`,
    '',
  ].join('\n');
  const systemdBoot = [
    `title   ${title}`,
    `linux   ${kernel}`,
    `initrd  ${initrd}`,
    `options ${cmdline}`,
    '',
  ].join('\n');
  return { entries: { grub, grub4dos, syslinux, systemdBoot }, cmdline };
}

/** The configuration built into the kit's own GRUB images: find the image's partition, then read the kit's grub.cfg there. */
export function kitEarlyConfig(imagePath: string): string {
  return [
    `search --no-floppy --file --set=root ${grubWord(imagePath)}`,
    'set prefix=($root)/boot/vdboot',
    '',
  ].join('\n');
}

const GRUB_MODULES = ['part_gpt', 'part_msdos', 'fat', 'exfat', 'ntfs', 'ext2', 'search', 'search_fs_file', 'search_fs_uuid', 'configfile', 'normal', 'linux', 'echo', 'test'];

function copyWithProgress(from: string | Uint8Array, to: string, what: string, log: (l: string) => void): void {
  const bytes = typeof from === 'string' ? fs.readFileSync(from) : from;
  const tmp = `${to}.vdboot-tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    const chunk = 4 * MiB;
    for (let at = 0; at < bytes.length; at += chunk) {
      const n = Math.min(chunk, bytes.length - at);
      fs.writeSync(fd, bytes, at, n, at);
      log(`copying ${what}: ${Math.round(((at + n) / bytes.length) * 100)}% of ${(bytes.length / MiB).toFixed(1)} MiB`);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, to);
}

export function makeKit(o: KitOptions): KitResult {
  const log = o.log ?? (() => {});
  if (!fs.existsSync(o.rootDir) || !fs.statSync(o.rootDir).isDirectory()) throw new KitError(`--root-dir ${o.rootDir} is not a directory`);
  const imagePath = imagePathInRoot(o.image, o.rootDir);
  let host = o.host;
  let hostSource: KitResult['hostSource'] = host ? 'option' : 'none';
  const d = detectHostUuid(o.rootDir);
  const isMountRoot = !d.mountpoint || d.mountpoint === fs.realpathSync(o.rootDir);
  if (!isMountRoot) {
    // A staging folder to be copied onto a stick later: its filesystem's UUID is not the stick's.
    log(`note: ${o.rootDir} is not the root of its filesystem (mounted at ${d.mountpoint}); the entries use paths from ${o.rootDir}, as on a stick whose root it is`);
  }
  if (!host) {
    if (d.uuid && isMountRoot) {
      host = `UUID=${d.uuid}`;
      hostSource = 'detected';
      log(`host: ${o.rootDir} is on ${d.device ?? '?'} (${d.fstype ?? '?'}) with UUID ${d.uuid}`);
    } else {
      const why = isMountRoot ? `no UUID found for the filesystem of ${o.rootDir}${d.device ? ` (${d.device})` : ''}` : `${o.rootDir} is a folder, so its filesystem's UUID is not the stick's`;
      log(`host: ${why}; the kernel line searches every partition for ${imagePath} (give --host to name it)`);
    }
  }
  const append = (o.append ?? '').trim() ? splitArgs(o.append!) : [];
  // The boot needs the same permission the person gave here (confinement is checked at boot too).
  if (o.allowOutside && !append.some((w) => w.startsWith('rd.vdisk.allow-outside='))) append.push('rd.vdisk.allow-outside=1');
  const snapshotReason = readWriteObstacle(o.image, { allowOutside: o.allowOutside === true });
  if (snapshotReason && !append.some((w) => w.startsWith('rd.vdisk.mode='))) {
    append.unshift('rd.vdisk.mode=snapshot');
    log(`${snapshotReason}: the entries boot it with rd.vdisk.mode=snapshot (writes are kept in RAM until power-off); give --append rd.vdisk.mode=… to choose`);
  }
  const { entries, cmdline } = kitEntries(imagePath, host, append);

  const boot = path.join(o.rootDir, 'boot', 'vdboot');
  fs.mkdirSync(boot, { recursive: true });
  // mkinitramfs's defaults: ntfs-3g on a kernel without ntfs3, where this machine has it (it
  // says so otherwise): without a driver that writes NTFS the booted system cannot reach the
  // host read-write (/run/vdboot/host, the loop path) nor expand a dynamic image in place.
  const files = prepareBootFiles(o.kernel, log);
  copyWithProgress(files.kernelFile, path.join(boot, 'vmlinuz'), 'the kernel', log);
  copyWithProgress(files.initrd, path.join(boot, 'initrd.img'), 'the initramfs', log);
  const written = ['boot/vdboot/vmlinuz', 'boot/vdboot/initrd.img'];
  const put = (name: string, text: string) => {
    fs.writeFileSync(path.join(boot, name), text);
    written.push(`boot/vdboot/${name}`);
  };
  put('grub.cfg', `# vdboot kit: GRUB 2 menu entry (source or configfile this file, or paste the entry)\nset timeout=5\n\n${entries.grub}`);
  put('menu.lst', `# vdboot kit: grub4dos entry (configfile /boot/vdboot/menu.lst, or paste the entry)\ntimeout 5\n\n${entries.grub4dos}`);
  put('syslinux.cfg', `# vdboot kit: syslinux/extlinux entry (INCLUDE /boot/vdboot/syslinux.cfg)\n${entries.syslinux}`);
  put('vdboot.conf', `# vdboot kit: systemd-boot entry: copy to /loader/entries/ on this partition (its ESP or XBOOTLDR)\n${entries.systemdBoot}`);

  if (o.grubImages ?? true) {
    const early = path.join(boot, '.early.cfg');
    fs.writeFileSync(early, kitEarlyConfig(imagePath));
    try {
      if (fs.existsSync(path.join(GRUB_EFI_DIR, 'moddep.lst'))) {
        mkimage(['-d', GRUB_EFI_DIR, '-O', 'x86_64-efi', '-o', path.join(boot, 'grubx64.efi'), '-c', early, '-p', '/boot/vdboot', ...GRUB_MODULES]);
        written.push('boot/vdboot/grubx64.efi');
      } else log(`no ${GRUB_EFI_DIR}: grubx64.efi not built (Debian package grub-efi-amd64-bin)`);
      if (fs.existsSync(path.join(GRUB_PC_DIR, 'moddep.lst'))) {
        const core = path.join(boot, '.core.img');
        mkimage(['-d', GRUB_PC_DIR, '-O', 'i386-pc', '-o', core, '-c', early, '-p', '/boot/vdboot', ...GRUB_MODULES, 'biosdisk']);
        // g2ldr: GRUB's header for loaders that load a file at 0x2000 (Windows' boot manager through g2ldr.mbr), then core.img.
        fs.writeFileSync(path.join(boot, 'g2ldr'), Buffer.concat([fs.readFileSync(path.join(GRUB_PC_DIR, 'g2hdr.img')), fs.readFileSync(core)]));
        fs.copyFileSync(path.join(GRUB_PC_DIR, 'g2ldr.mbr'), path.join(boot, 'g2ldr.mbr'));
        fs.rmSync(core);
        written.push('boot/vdboot/g2ldr', 'boot/vdboot/g2ldr.mbr');
      } else log(`no ${GRUB_PC_DIR}: g2ldr not built (Debian package grub-pc-bin)`);
    } finally {
      fs.rmSync(early, { force: true });
    }
  }
  const sb = secureBootChain(o, d, files, `${entryTitle(imagePath)} (Secure Boot)`, kernelWords(host, imagePath, append), log);
  return { imagePath, host, hostSource, cmdline, entries, snapshotReason, files: written, release: files.release, ...sb };
}

/**
 * Where the Secure Boot chain goes and the chain itself: --esp DIR, else the kit's root dir
 * when it is on FAT (firmware reads FAT only), else nowhere (with the reason).
 */
function secureBootChain(
  o: KitOptions, d: ReturnType<typeof detectHostUuid>, files: { kernelFile: string; initrd: Uint8Array },
  title: string, words: string[], log: (l: string) => void,
): { secureBoot?: SecureBootChain; secureBootSkipped?: string } {
  if (o.secureBoot === false) return { secureBootSkipped: 'not asked for (--no-secure-boot)' };
  const missing = secureBootMissing();
  let espDir = o.esp;
  if (espDir !== undefined) {
    if (missing) throw new KitError(`--esp ${espDir}: the Secure Boot chain needs Debian's signed shim and GRUB: ${missing}`);
  } else {
    const fat = d.fstype === 'vfat' || d.fstype === 'msdos';
    if (!fat) {
      const why = `${o.rootDir} is on ${d.fstype ?? 'a filesystem of unknown type'}, which firmware cannot read: no Secure Boot chain written; give --esp DIR (the EFI system partition, or a folder to copy onto a FAT stick; DIR itself when it will be one)`;
      log(why);
      return { secureBootSkipped: why };
    }
    if (missing) {
      log(`no Secure Boot chain: ${missing}`);
      return { secureBootSkipped: missing };
    }
    espDir = o.rootDir;
  }
  if (!fs.existsSync(espDir) || !fs.statSync(espDir).isDirectory()) throw new KitError(`--esp ${espDir} is not a directory: give the mounted EFI system partition (e.g. /boot/efi) or a folder`);
  const chain = writeSecureBootChain({
    espDir, kernelFile: files.kernelFile, initrd: files.initrd, title, kernelWords: words,
    copy: (from, to, what) => copyWithProgress(from, to, what, log),
  });
  if (chain.kernelProblem) log(`Secure Boot: ${chain.kernelProblem}`);
  for (const n of chain.notes) log(`Secure Boot: ${n}`);
  return { secureBoot: chain };
}

/**
 * Why vdboot could not map the image read-write at boot (a dynamic image's absent blocks,
 * ranges in a parent image, compressed ranges), or undefined when it can.
 */
export function readWriteObstacle(image: string, opts: { allowOutside?: boolean } = {}): string | undefined {
  const img = openHostImage(image, opts);
  try {
    const absent = img.map.extents.filter((e) => e.kind === 'zero').reduce((n, e) => n + e.length, 0);
    if (absent > 0) {
      return `${path.basename(image)} is a dynamic image (${(absent / MiB).toFixed(0)} MiB not allocated), which read-write boots would first expand in place on the host ` +
        `(the file grows by about that much, at the first boot); give --append rd.vdisk.mode=rw for that`;
    }
    if (img.map.extents.some((e) => e.kind === 'unmappable')) return `${path.basename(image)} has compressed or encrypted ranges`;
    // by layer: a VMDK's extent files and a qcow2's data file are the image's own
    const own = new Set(img.layers[0]!.fileIndex);
    if (img.map.extents.some((e) => e.kind === 'data' && !own.has(e.file))) return `${path.basename(image)} reads ranges from its parent image`;
    return undefined;
  } finally {
    img.close();
  }
}

function mkimage(args: string[]): void {
  const r = run('grub-mkimage', args);
  if (r.status !== 0) throw new KitError(`grub-mkimage failed: ${r.stderr.trim() || `exit ${r.status}`}`);
}

/** Splits --append the way a shell would for simple cases: spaces separate, double or single quotes group. */
export function splitArgs(text: string): string[] {
  const out: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  let m: RegExpExecArray | null;
  let current = '';
  let lastEnd = -1;
  while ((m = re.exec(text))) {
    const piece = m[1] ?? m[2] ?? m[3] ?? '';
    if (m.index === lastEnd) current += piece;
    else {
      if (lastEnd >= 0) out.push(current);
      current = piece;
    }
    lastEnd = m.index + m[0].length;
  }
  if (lastEnd >= 0) out.push(current);
  return out;
}

/** The Secure Boot chain's files, who signed each, and what to do with them. */
function secureBootLines(r: KitResult): string[] {
  if (!r.secureBoot) return ['== Secure Boot ==', `No signed chain: ${r.secureBootSkipped}`, ''];
  const sb = r.secureBoot;
  const width = Math.max(...sb.files.map((f) => f.path.length));
  return [
    `== Secure Boot (no key to enroll: shim is signed by Microsoft's UEFI CA, which PCs sold with Windows trust) in ${sb.dir} ==`,
    ...sb.files.map((f) => `  ${f.path.padEnd(width)}  ${f.what}: ${f.signature}`),
    ...(sb.kernelProblem ? [`  WARNING: ${sb.kernelProblem}`] : []),
    ...sb.notes.map((n) => `  note: ${n}`),
    '  A stick: the firmware starts EFI/BOOT/BOOTX64.EFI from its boot menu. An internal ESP: add a boot entry for \\EFI\\vdboot\\shimx64.efi',
    '  (efibootmgr -c -d DISK -p N -l \\EFI\\vdboot\\shimx64.efi -L vdboot; on Windows: windows-install.cmd, below).',
    '',
  ];
}

/** What to do with the entries, for the person at the terminal. */
export function kitInstructions(r: KitResult, rootDir: string): string {
  const letter = 'X:';
  return [
    `Boot files in ${path.join(rootDir, 'boot/vdboot')}/: ${r.files.map((f) => path.basename(f)).join(', ')}`,
    `Kernel command line: ${r.cmdline}`,
    r.snapshotReason ? `  (rd.vdisk.mode=snapshot: ${r.snapshotReason}; for a read-write root, convert it to a fixed VHD/VHDX or raw: vdboot mkdisk --format vhd-fixed)` : '',
    r.hostSource === 'none' ? '  (no host named: vdboot searches every partition for the image; --host UUID=… or LABEL=… names one)' : '',
    '',
    '== GRUB 2 (add to /etc/grub.d/40_custom and run update-grub, or to a grub.cfg on the stick) ==',
    r.entries.grub,
    '== grub4dos (menu.lst) ==',
    r.entries.grub4dos,
    '== syslinux / extlinux (syslinux.cfg on this FAT partition) ==',
    r.entries.syslinux,
    '== systemd-boot (/loader/entries/vdboot.conf on this partition, when it is the ESP) ==',
    r.entries.systemdBoot,
    ...secureBootLines(r),
    ...(r.secureBoot ? [
      '== Windows: a firmware boot entry for the Secure Boot chain ==',
      `Run ${path.join(r.secureBoot.dir, 'EFI', 'vdboot', 'windows-install.cmd')} as administrator (right-click, "Run as administrator"): it copies`,
      'that EFI\\vdboot folder to the PC\'s EFI system partition and adds a boot entry for \\EFI\\vdboot\\shimx64.efi;',
      'windows-uninstall.cmd there removes both. Secure Boot may stay on.',
      '',
    ] : []),
    '== Windows (an administrator\'s command prompt; Secure Boot off) ==',
    `UEFI: an entry in the firmware's boot menu (${letter} is this partition; GRUB finds the image by itself):`,
    '  mountvol S: /s',
    '  mkdir S:\\EFI\\vdboot-grub',
    `  copy ${letter}\\boot\\vdboot\\grubx64.efi S:\\EFI\\vdboot-grub\\grubx64.efi`,
    '  bcdedit /copy {bootmgr} /d "Linux (vdboot)"          (prints {ID})',
    '  bcdedit /set {ID} path \\EFI\\vdboot-grub\\grubx64.efi',
    '  bcdedit /set {fwbootmgr} displayorder {ID} /addlast',
    `BIOS: an entry in Windows' boot menu (${letter} is this partition; g2ldr.mbr loads \\g2ldr from the root of a partition):`,
    `  copy ${letter}\\boot\\vdboot\\g2ldr ${letter}\\g2ldr`,
    '  bcdedit /create /d "Linux (vdboot)" /application bootsector   (prints {ID})',
    `  bcdedit /set {ID} device partition=${letter}`,
    '  bcdedit /set {ID} path \\boot\\vdboot\\g2ldr.mbr',
    '  bcdedit /displayorder {ID} /addlast',
    'With grub4dos already in the boot menu (grldr), add the grub4dos entry above to its menu.lst instead.',
    '',
  ].filter((l, i, a) => !(l === '' && a[i - 1] === '')).join('\n');
}
