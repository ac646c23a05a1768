/**
 * `vdboot netboot`: what a fleet of machines needs to boot the same images over the network.
 * Writes into DIR (a TFTP root) the kernel, a vdboot initramfs and the boot entries — an iPXE
 * script, a PXELINUX entry, a GRUB entry for a `grub-mknetdir` tree — each booting
 * `root=vdisk:nbd://SERVER:PORT/EXPORT ip=dhcp`, and prints the nbdkit command that serves the
 * images read-only.
 *
 * Every file of an image's chain (the image, its parents, a VMDK's extent files, a qcow2's
 * data file, as vdboot's own chain reader finds them) is exported under its file name, so a
 * client finds a parent as a sibling export of the same server. nbdkit's file plugin serves
 * one export per file of a directory (`dir=`, export names without "/"), so DIR/nbd-exports/
 * gets one symbolic link per file to serve, and nothing else is exported. With `--url BASE`
 * the images lie on an HTTP server or object store instead: nbdkit's curl plugin serves one
 * URL per process, so each image gets a port of its own and must be a single file.
 *
 * Nothing here writes outside DIR, and an image is only read (its tables, to find its chain).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command, CliIO } from './main.ts';
import { walkArgs } from './args.ts';
import { findKernel } from '../../mkdisk/boot.ts';
import { splitArgs } from '../../mkdisk/kit.ts';
import { buildInitramfs } from '../../mkinitramfs/build.ts';
import { openHostImage } from '../sys/host-image.ts';

export const DEFAULT_NBD_PORT = 10809;
/** The folder of DIR that nbdkit's file plugin serves: one link per exported file. */
export const EXPORTS_DIR = 'nbd-exports';

export class NetbootError extends Error {
  constructor(message: string, readonly usage = false) {
    super(message);
    this.name = 'NetbootError';
  }
}

const usage = `vdboot netboot --image PATH [--image PATH]... -o DIR [--server HOST] [--port N]
               [--kernel VERSION|VMLINUZ] [--append ARGS] [--url BASE] [--force]

Writes into DIR (the root of a TFTP or HTTP server) what machines need to boot the images
over the network, each client reading the image file from an NBD server:
  vmlinuz, initrd.img      the kernel and a vdboot initramfs (network drivers and nbd included)
  boot.ipxe                iPXE script (a menu when there are several images)
  pxelinux.cfg/default     PXELINUX entries (pxelinux.0 and ldlinux.c32 copied beside it
                           when Debian's pxelinux and syslinux-common are installed)
  boot/grub/grub.cfg       GRUB entries for a grub-mknetdir tree (grub-mknetdir --net-directory=DIR)
  nbd-exports/             one link per file to serve: the images and their parents
each with root=vdisk:nbd://HOST:PORT/EXPORT ip=dhcp, EXPORT being the image's file name;
then prints the nbdkit command that serves the images read-only, one export per file,
parents (and VMDK extents, qcow2 data files) as sibling exports.

  --image PATH     an image (vhd, vhdx, vdi, vmdk, qcow2, raw); repeatable: the first is the default entry
  -o, --output DIR the folder to write; it must be empty or new (see --force)
  --server HOST    the NBD server's address as clients reach it (default: this machine's first IPv4 address)
  --port N         the NBD server's TCP port (default ${DEFAULT_NBD_PORT}; with --url, image K is served on N+K)
  --kernel VERSION|VMLINUZ  the kernel (default: the newest in /boot)
  --append ARGS    more kernel command line (e.g. "console=ttyS0,115200", "rd.vdisk.mode=snapshot")
  --url BASE       the images lie at BASE/NAME on an HTTP server or object store: print nbdkit's
                   curl plugin instead (one process, and one port, per image; single-file images only)
  --force          write into a DIR that is not empty (vdboot's files there are replaced)`;

export interface NetbootOptions {
  images: string[];
  output: string;
  server?: string;
  port: number;
  kernel?: string;
  append: string[];
  url?: string;
  force: boolean;
}

export function parseNetbootArgs(args: string[]): NetbootOptions {
  const o: Partial<NetbootOptions> & { images: string[]; append: string[]; force: boolean } = { images: [], append: [], force: false };
  walkArgs(args, (flag, value, arg) => {
    switch (flag) {
      case '--image': o.images.push(value()); break;
      case '-o': case '--output': o.output = value(); break;
      case '--server': o.server = value(); break;
      case '--port': {
        const v = value();
        if (!/^\d{1,5}$/.test(v) || Number(v) < 1 || Number(v) > 65535) throw new NetbootError(`--port ${v}: give a TCP port number from 1 to 65535`, true);
        o.port = Number(v);
        break;
      }
      case '--kernel': case '-k': o.kernel = value(); break;
      case '--append': o.append.push(...splitArgs(value())); break;
      case '--url': o.url = value(); break;
      case '--force': o.force = true; break;
      default: throw new NetbootError(`unknown argument "${arg}"; see vdboot netboot --help`, true);
    }
  }, (flag) => new NetbootError(`${flag} needs a value; see vdboot netboot --help`, true));
  if (o.images.length === 0) throw new NetbootError('give at least one --image PATH; see vdboot netboot --help', true);
  if (!o.output) throw new NetbootError('give -o DIR, the folder to write the boot files into; see vdboot netboot --help', true);
  if (o.server !== undefined) checkServer(o.server);
  if (o.url !== undefined && !/^(https?|ftps?|file):\/\/\S+$/.test(o.url)) throw new NetbootError(`--url ${o.url}: give the base URL the images lie under, such as https://files.example/vms/`, true);
  for (const w of o.append) if (/^(root|ip)=/.test(w)) throw new NetbootError(`--append ${w}: vdboot netboot writes root= and ip= itself`, true);
  const port = o.port ?? DEFAULT_NBD_PORT;
  if (o.url !== undefined && port + o.images.length - 1 > 65535) throw new NetbootError(`--port ${port}: with --url, image K is served on port ${port}+K, past 65535 for ${o.images.length} images`, true);
  return { images: o.images, output: o.output, server: o.server, port, kernel: o.kernel, append: o.append, url: o.url, force: o.force };
}

/** An NBD server address for a URL: an IPv4 address, a host name, or an IPv6 address in brackets. */
function checkServer(server: string): void {
  const ipv4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(server);
  if (ipv4) {
    if (ipv4.slice(1).some((n) => Number(n) > 255)) throw new NetbootError(`--server ${server}: not an IPv4 address (each part is 0-255)`, true);
    return;
  }
  if (/^\[[0-9A-Fa-f:.]+\]$/.test(server)) return;
  if (server.includes(':')) throw new NetbootError(`--server ${server}: an IPv6 address goes in brackets ([${server}]); the port goes in --port`, true);
  if (!/^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(server)) {
    throw new NetbootError(`--server ${server}: give an IPv4 address, a host name, or [IPv6]`, true);
  }
}

/** This machine's first non-loopback IPv4 address, the default server. */
function defaultServer(): string {
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  throw new NetbootError('this machine has no IPv4 address besides the loopback: give --server HOST, the NBD server\'s address as the clients reach it');
}

/**
 * A file name that can be an NBD export name and a word of the kernel command line in every
 * entry format (iPXE expands `$`, GRUB and PXELINUX split at spaces) without quoting.
 */
const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._+,@~-]{0,254}$/;

/** One file served: its export name (the file name) and where it really is. */
export interface NetbootExport {
  name: string;
  file: string;
  /** the image (by its export name) whose chain needs it */
  usedBy: string;
  role: 'image' | 'parent' | 'extent';
}

export interface NetbootImage {
  export: string;
  file: string;
  format: string;
  subformat: string;
  virtualSize: number;
  /** export names of the other files its chain reads (parents, extents, data files) */
  needs: string[];
  port: number;
  cmdline: string;
}

/**
 * The files of `image`'s chain as vdboot reads them: every layer's own file and the files
 * its data extents point into. The chain reader refuses a file outside the image's folder
 * (or a link, a device) with its own message; here each file must also have a name a client
 * can ask for as an export.
 */
export function chainFiles(image: string): { files: Array<{ file: string; role: NetbootExport['role'] }>; format: string; subformat: string; size: number } {
  let img: ReturnType<typeof openHostImage>;
  try {
    img = openHostImage(image);
  } catch (e) {
    throw new NetbootError(`${image}: ${e instanceof Error ? e.message : String(e)}`);
  }
  try {
    const top = img.layers[0]!.layer;
    if (top.format === 'vdisk-json') throw new NetbootError(`${image} is a disk definition (.vdisk.json): serve its partition images as images of their own`);
    const out: Array<{ file: string; role: NetbootExport['role'] }> = [];
    const seen = new Set<string>();
    img.layers.forEach((l, depth) => {
      const own = [l.path, ...l.fileIndex.map((i) => img.map.files[i]!)];
      own.forEach((f, k) => {
        const real = fs.realpathSync(f);
        if (seen.has(real)) return;
        seen.add(real);
        out.push({ file: real, role: k === 0 ? (depth === 0 ? 'image' : 'parent') : 'extent' });
      });
    });
    return { files: out, format: top.format, subformat: top.subformat, size: img.map.size };
  } finally {
    img.close();
  }
}

/** The exports for all images: one per file, named by its file name; two different files of one name are refused. */
export function planExports(images: readonly string[]): { images: Array<Omit<NetbootImage, 'port' | 'cmdline'>>; exports: NetbootExport[] } {
  const byName = new Map<string, NetbootExport>();
  const out: Array<Omit<NetbootImage, 'port' | 'cmdline'>> = [];
  const given = new Map<string, string>();
  for (const image of images) {
    if (!fs.existsSync(image)) throw new NetbootError(`--image ${image}: no such file`);
    if (!fs.statSync(image).isFile()) throw new NetbootError(`--image ${image}: not a regular file`);
    const real = fs.realpathSync(image);
    if (given.has(real)) throw new NetbootError(`--image ${image}: given twice (also as ${given.get(real)})`);
    given.set(real, image);
    const chain = chainFiles(image);
    const top = path.basename(real);
    const needs: string[] = [];
    for (const { file, role } of chain.files) {
      const name = path.basename(file);
      if (!EXPORT_NAME.test(name)) {
        const what = role === 'image' ? 'the image' : `${top}'s ${role === 'parent' ? 'parent' : 'extent file'} ${file}`;
        throw new NetbootError(`${what} is named "${name}", which cannot be an NBD export name on every boot loader's command line: use letters, digits and . _ + , @ ~ - only${role === 'image' ? ' (rename the file)' : ' (rename it and point the child at the new name, e.g. qemu-img rebase -u)'}`);
      }
      const prior = byName.get(name);
      if (prior && prior.file !== file) {
        throw new NetbootError(`two different files would both be the export "${name}": ${prior.file} (for ${prior.usedBy}) and ${file} (for ${top}); clients find files by name on one server, so serve these images from separate runs of vdboot netboot (another --port), or rename one`);
      }
      if (!prior) byName.set(name, { name, file, usedBy: top, role });
      if (role !== 'image') needs.push(name);
    }
    out.push({ export: top, file: real, format: chain.format, subformat: chain.subformat, virtualSize: chain.size, needs });
  }
  return { images: out, exports: [...byName.values()] };
}

// ------------------------------------------------------------------------- boot entries

export interface NetbootEntries {
  ipxe: string;
  pxelinux: string;
  grub: string;
}

function title(img: { export: string }): string {
  return `Linux from ${img.export} over NBD (vdboot)`;
}

/** The kernel command line of one image: its NBD root, DHCP on the first interface with a link, then --append. */
export function netbootCmdline(server: string, port: number, exportName: string, append: readonly string[]): string {
  for (const w of append) if (/[\s"'$\\;]/.test(w)) throw new NetbootError(`--append: "${w}" holds a space, a quote, $, \\ or ;, which the boot loaders' entries cannot all carry`, true);
  return [`root=vdisk:nbd://${server}:${port}/${exportName}`, 'ip=dhcp', ...append].join(' ');
}

/**
 * The three entry files. Paths are relative to DIR, the TFTP root: iPXE resolves them against
 * the script's own URL, PXELINUX against its directory, GRUB (netbooted by grub-mknetdir's
 * images) against ($root) = the TFTP server. `initrd=initrd.img` on iPXE's kernel line lets the
 * kernel's EFI stub find the initramfs when iPXE runs under UEFI.
 */
export function netbootEntries(images: ReadonlyArray<Pick<NetbootImage, 'export' | 'cmdline'>>): NetbootEntries {
  const ipxeBoot = (img: Pick<NetbootImage, 'cmdline'>) => [`kernel vmlinuz initrd=initrd.img ${img.cmdline}`, 'initrd initrd.img', 'boot'];
  const ipxe = images.length === 1
    ? ['#!ipxe', `# vdboot netboot: ${title(images[0]!)}`, ...ipxeBoot(images[0]!), '']
    : [
      '#!ipxe',
      '# vdboot netboot: one entry per image',
      'menu vdboot: boot an image over NBD',
      ...images.map((img, i) => `item img${i} ${title(img)}`),
      'choose --default img0 --timeout 5000 target && goto ${target} || goto img0',
      ...images.flatMap((img, i) => [`:img${i}`, ...ipxeBoot(img)]),
      '',
    ];
  const pxelinux = [
    '# vdboot netboot: PXELINUX entries (read by pxelinux.0, with ldlinux.c32 beside it)',
    `DEFAULT img0`,
    images.length > 1 ? 'PROMPT 1' : 'PROMPT 0',
    'TIMEOUT 50',
    // without a menu module (menu.c32) the boot: prompt shows these lines and takes a label
    ...(images.length > 1 ? images.map((img, i) => `SAY img${i}: ${title(img)}`) : []),
    ...images.flatMap((img, i) => [`LABEL img${i}`, `  MENU LABEL ${title(img)}`, '  KERNEL vmlinuz', '  INITRD initrd.img', `  APPEND ${img.cmdline}`]),
    '',
  ];
  const grub = [
    '# vdboot netboot: GRUB entries for a grub-mknetdir tree (grub-mknetdir --net-directory=DIR writes the images that read this file)',
    'set timeout=5',
    'set default=0',
    ...images.flatMap((img) => [`menuentry '${title(img)}' {`, `\tlinux /vmlinuz ${img.cmdline}`, '\tinitrd /initrd.img', '}']),
    '',
  ];
  return { ipxe: ipxe.join('\n'), pxelinux: pxelinux.join('\n'), grub: grub.join('\n') };
}

// ------------------------------------------------------------------------- the server

/** A shell word: single-quoted when it holds anything but plain characters. */
function shellWord(w: string): string {
  return /^[\w@%+=:,./-]+$/.test(w) ? w : `'${w.replace(/'/g, `'\\''`)}'`;
}

/**
 * The nbdkit commands that serve the images: read-only, on PORT; the file plugin over
 * EXPORTS (one export per file in it, by name; a client asking for the default export ""
 * is refused), or with `url` one curl process per image, on PORT+K for image K.
 * The truncate filter rounds each export's size up to 512 bytes with zeros: NBD clients
 * (the kernel's nbd device, QEMU) size a disk in 512-byte sectors, and an image file need not
 * be a multiple of that (a small qcow2 often is not), so its last bytes would be cut off.
 */
export function nbdkitCommands(o: { port: number; exportsDir: string; url?: string; images: ReadonlyArray<Pick<NetbootImage, 'export' | 'port'>> }): string[][] {
  const common = (port: number) => ['nbdkit', '--readonly', '--port', String(port), '--filter=truncate'];
  if (o.url === undefined) return [[...common(o.port), 'file', `dir=${o.exportsDir}`, 'round-up=512']];
  const base = o.url.endsWith('/') ? o.url : `${o.url}/`;
  return o.images.map((img) => [...common(img.port), 'curl', `url=${base}${encodeURIComponent(img.export)}`, 'round-up=512']);
}

export function commandLine(argv: readonly string[]): string {
  return argv.map(shellWord).join(' ');
}

// ------------------------------------------------------------------------- the command

export interface NetbootResult {
  dir: string;
  server: string;
  release: string;
  images: NetbootImage[];
  exports: NetbootExport[];
  entries: NetbootEntries;
  /** the nbdkit commands, as argv */
  serve: string[][];
  files: string[];
  notes: string[];
}

/** The files vdboot netboot writes into DIR (and nbd-exports/), relative to DIR. */
const OWN_FILES = ['vmlinuz', 'initrd.img', 'boot.ipxe', 'pxelinux.cfg/default', 'boot/grub/grub.cfg'];

/** PXELINUX's own files (BIOS clients), copied into DIR when this machine has them. */
const PXELINUX_FILES: ReadonlyArray<{ name: string; from: string; pkg: string }> = [
  { name: 'pxelinux.0', from: '/usr/lib/PXELINUX/pxelinux.0', pkg: 'pxelinux' },
  { name: 'ldlinux.c32', from: '/usr/lib/syslinux/modules/bios/ldlinux.c32', pkg: 'syslinux-common' },
];

export function makeNetboot(o: NetbootOptions, log: (line: string) => void = () => {}): NetbootResult {
  const server = o.server ?? defaultServer();
  const plan = planExports(o.images);
  if (o.url !== undefined) {
    const chained = plan.images.find((img) => img.needs.length > 0);
    if (chained) throw new NetbootError(`--url: ${chained.export} reads ${chained.needs.join(', ')} too, and nbdkit's curl plugin serves one URL per process, so a client cannot find them as sibling exports; flatten the image first (qemu-img convert -O qcow2 ${chained.export} flat.qcow2), or serve it with the file plugin (no --url)`);
  }
  const images: NetbootImage[] = plan.images.map((img, k) => {
    const port = o.url === undefined ? o.port : o.port + k;
    return { ...img, port, cmdline: netbootCmdline(server, port, img.export, o.append) };
  });
  const kernel = (() => {
    try {
      return findKernel(o.kernel);
    } catch (e) {
      throw new NetbootError(e instanceof Error ? e.message : String(e));
    }
  })();

  const dir = path.resolve(o.output);
  if (fs.existsSync(dir)) {
    if (!fs.statSync(dir).isDirectory()) throw new NetbootError(`-o ${o.output} is a file, not a folder`);
    const present = fs.readdirSync(dir);
    if (present.length > 0 && !o.force) throw new NetbootError(`-o ${o.output} is not empty (${present.slice(0, 5).join(', ')}${present.length > 5 ? ', …' : ''}): give an empty or new folder, or --force to write vdboot's files into it`);
  }
  const exportsDir = path.join(dir, EXPORTS_DIR);
  // Only links vdboot made are replaced in nbd-exports/: a file of the person's own there is never deleted.
  const oldLinks = fs.existsSync(exportsDir) ? fs.readdirSync(exportsDir).map((n) => path.join(exportsDir, n)) : [];
  for (const p of oldLinks) if (!fs.lstatSync(p).isSymbolicLink()) throw new NetbootError(`${p} is not a link vdboot netboot made: move it out of ${EXPORTS_DIR}/ (every file there is served to the network)`);
  log(`building a vdboot initramfs for ${kernel.release}`);
  const initramfs = buildInitramfs({ kernel: kernel.file });
  const notes = [...initramfs.notes];
  const missingNet = ['virtio_net', 'e1000e', 'r8169', 'nbd'].filter((m) => !initramfs.manifest.modules[m] && !initramfs.manifest.builtin.includes(m));
  if (missingNet.length) notes.push(`kernel ${kernel.release} has no ${missingNet.join(', ')}: machines that need them cannot reach the NBD server`);

  fs.mkdirSync(dir, { recursive: true });
  const entries = netbootEntries(images);
  // Each file is written beside its final name and renamed over it, so a machine booting from
  // DIR while it is rewritten reads the old file or the new one, never half of one.
  const put = (rel: string, data: string | Uint8Array) => {
    const target = path.join(dir, rel);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(`${target}.vdboot-tmp`, data);
    fs.renameSync(`${target}.vdboot-tmp`, target);
  };
  put('vmlinuz', fs.readFileSync(kernel.file));
  put('initrd.img', initramfs.image);
  put('boot.ipxe', entries.ipxe);
  put('pxelinux.cfg/default', entries.pxelinux);
  put('boot/grub/grub.cfg', entries.grub);
  const pxeMissing = PXELINUX_FILES.filter((f) => !fs.existsSync(f.from));
  const pxeFiles = pxeMissing.length === 0 ? PXELINUX_FILES.map((f) => f.name) : [];
  if (pxeMissing.length === 0) for (const f of PXELINUX_FILES) put(f.name, fs.readFileSync(f.from));
  else notes.push(`PXELINUX's ${pxeMissing.map((f) => f.name).join(' and ')} not found (${pxeMissing.map((f) => f.from).join(', ')}): install ${[...new Set(pxeMissing.map((f) => f.pkg))].join(' and ')} and run vdboot netboot again, or copy them into ${dir} yourself`);
  for (const p of oldLinks) fs.unlinkSync(p);
  if (o.url === undefined) {
    fs.mkdirSync(exportsDir, { recursive: true });
    for (const e of plan.exports) fs.symlinkSync(e.file, path.join(exportsDir, e.name));
  }
  const serve = nbdkitCommands({ port: o.port, exportsDir, url: o.url, images });
  const files = [...OWN_FILES, ...pxeFiles, ...(o.url === undefined ? plan.exports.map((e) => `${EXPORTS_DIR}/${e.name}`) : [])];
  return { dir, server, release: kernel.release, images, exports: plan.exports, entries, serve, files, notes };
}

function size(bytes: number): string {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

/** What was written and how to serve it, for the person at the terminal. */
export function netbootInstructions(r: NetbootResult, url?: string): string {
  const lines = [
    `Boot files in ${r.dir}/ (kernel ${r.release}): ${r.files.filter((f) => !f.startsWith(`${EXPORTS_DIR}/`)).join(', ')}`,
    '',
    '== Images ==',
    ...r.images.map((img) => `  ${img.export}: ${img.format} ${img.subformat}, ${size(img.virtualSize)}${img.needs.length ? `, reads ${img.needs.join(', ')}` : ''}\n    ${img.cmdline}`),
    '',
  ];
  if (url === undefined) {
    lines.push(
      `== Serve them (read-only; one export per file in ${EXPORTS_DIR}/, parents as sibling exports) ==`,
      `  ${commandLine(r.serve[0]!)}`,
      `  (Debian package nbdkit; it listens on every address: -i ${r.server} for one; --foreground under systemd)`,
      ...r.exports.map((e) => `  export ${e.name.padEnd(24)} ${e.file}${e.role === 'image' ? '' : ` (${e.role} for ${e.usedBy})`}`),
      '',
      '== Images kept on an HTTP server or object store instead ==',
      `  vdboot netboot --url https://HOST/PATH/ … prints nbdkit's curl plugin, one process per image:`,
      `  ${commandLine(nbdkitCommands({ port: r.images[0]!.port, exportsDir: '', url: 'https://HOST/PATH/', images: r.images.slice(0, 1) })[0]!)}`,
      '',
    );
  } else {
    lines.push(
      `== Serve them from ${url} (read-only; nbdkit's curl plugin, one process and port per image) ==`,
      ...r.serve.map((argv) => `  ${commandLine(argv)}`),
      '  (Debian package nbdkit; a signed object-store URL works as it is; header=… adds an HTTP header)',
      '',
    );
  }
  lines.push(
    '== Boot loaders (DIR is the TFTP root) ==',
    '  iPXE: chain boot.ipxe (a DHCP server\'s filename option "boot.ipxe" for clients whose user-class is iPXE)',
    r.files.includes('pxelinux.0')
      ? '  PXELINUX (BIOS clients): DHCP filename "pxelinux.0" (copied here with ldlinux.c32; it reads pxelinux.cfg/default)'
      : '  PXELINUX (BIOS clients): pxelinux.0 and ldlinux.c32 (Debian: pxelinux, syslinux-common) into DIR; DHCP filename "pxelinux.0"',
    '  GRUB: grub-mknetdir --net-directory=DIR (its core.0 / core.efi read boot/grub/grub.cfg)',
    ...r.notes.map((n) => `note: ${n}`),
    '',
  );
  return lines.join('\n');
}

export const command: Command = {
  summary: 'write a kernel, a vdboot initramfs and PXE/iPXE/GRUB entries that boot images from an NBD server',
  usage,
  async run(args: string[], io: CliIO): Promise<number> {
    try {
      const o = parseNetbootArgs(args);
      const r = makeNetboot(o, (l) => io.stderr(`vdboot netboot: ${l}\n`));
      io.stdout(netbootInstructions(r, o.url));
      return 0;
    } catch (e) {
      if (e instanceof NetbootError) {
        io.stderr(`vdboot netboot: ${e.message}\n`);
        return e.usage ? 2 : 1;
      }
      if (e instanceof Error && e.name === 'ModuleError') {
        io.stderr(`vdboot netboot: ${e.message}\n`);
        return 1;
      }
      throw e;
    }
  },
};
