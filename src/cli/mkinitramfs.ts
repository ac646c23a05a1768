/** `vdboot mkinitramfs`: build vdboot's initramfs for a kernel. */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Command, CliIO } from './main.ts';
import { COMPRESSIONS, TOOLS, buildInitramfs, summary, type Compression, type MkinitramfsOptions, type ToolName } from '../../mkinitramfs/build.ts';
import { ModuleError } from '../../mkinitramfs/kmod.ts';
import { walkArgs } from './args.ts';

const usage = `vdboot mkinitramfs [--kernel VERSION|VMLINUZ] [-o FILE] [--compress zstd|gzip|xz|none] [--level N]
                  [--add-module NAME]... [--omit-module NAME]...
                  [--with ntfs-3g|qemu-nbd|zstd|lz4|lvm]... [--without ntfs-3g|cryptsetup] [--pack cryptsetup]
                  [--hostonly [--root SPEC]] [--modules-dir DIR] [--arch x86_64|aarch64]
                  [--init FILE] [--busybox FILE]

Builds an initramfs whose /init is vdboot, with the kernel modules to reach a root on
virtio, SCSI, SATA/AHCI, NVMe, USB and SD storage, the usual filesystems, device-mapper,
loop, nbd and fuse, and busybox for the rescue shell. It also includes ntfs-3g (when this
machine has it), so NTFS hosts and sparse image files on them can be written at boot, and
cryptsetup (when this machine has it), so LUKS volumes can be unlocked at boot.
Modules the kernel ships compressed (.ko.xz) stay compressed, appended uncompressed.

  --kernel VERSION|VMLINUZ  the kernel (default: the running one, else the newest in /lib/modules)
  -o, --output FILE         where to write (default: ./initramfs-vdboot-VERSION.img)
  --compress METHOD         zstd (default), gzip, xz or none
  --level N                 compression level (default: zstd 9, gzip 9, xz 6; zstd 19 is ~10% smaller, ~15 s;
                            --hostonly: zstd 19)
  --add-module NAME         also include this module (or alias) and its dependencies; repeatable
  --omit-module NAME        leave a universal-set module out (e.g. btrfs, xfs: ~0.8 MiB each); repeatable
  --with ntfs-3g|qemu-nbd|zstd|lz4|lvm
                            include the program and its libraries (ntfs-3g: NTFS through fuse, for kernels
                            without ntfs3; qemu-nbd: images the kernel cannot map; zstd, lz4: root=tmpfs:
                            archives in those compressions unpack at C speed; lvm: thin, cache, raid and
                            snapshot LVs, with thin_check/cache_check when installed); repeatable
  --without ntfs-3g|cryptsetup
                            leave out a program included by default (ntfs-3g on kernels without ntfs3:
                            NTFS hosts are then reached read-only by vdboot's direct path alone;
                            cryptsetup: LUKS volumes then cannot be unlocked)
  --pack cryptsetup         accepted for older command lines: cryptsetup (like lvm) is always kept with its
                            libraries in a squashfs image mounted only when it runs, so the kernel does not
                            unpack it at every boot (unless the kernel lacks squashfs: a note says so)
  --hostonly                only this machine's storage drivers (each disk's driver chain in /sys) and
                            the filesystems of its mounted disks, instead of the universal set; a boot
                            on hardware that needs a driver left out names the device and the module.
                            Its keyboards' drivers; loop, nbd and the image dm targets only for a root
                            in an image file; ntfs-3g only with NTFS here, cryptsetup only with an
                            encrypted disk here or an image root (--with adds them back)
  --root SPEC               with --hostonly: the root as on the kernel command line (UUID=…, /dev/…,
                            vdisk:HOST:PATH); its filesystem (the host's, for vdisk:) is included too
  --modules-dir DIR         read modules from DIR instead of /lib/modules/VERSION
  --arch x86_64|aarch64     the machine the initramfs is for (default: the kernel file's, a bzImage or an
                            arm64 Image, else this machine's); for another machine no programs of this one
                            (ntfs-3g) go in, and --busybox must name a static busybox for it
  --init FILE               the static /init host to include (default: build/init, or build/init-aarch64)
  --busybox FILE            the static busybox to include (default: /bin/busybox)

SOURCE_DATE_EPOCH sets every timestamp; the same inputs give the same bytes.`;

export function parseMkinitramfsArgs(args: string[]): { options: MkinitramfsOptions; output?: string } {
  const options: MkinitramfsOptions = { addModules: [] };
  let output: string | undefined;
  let rootSpec: string | undefined;
  walkArgs(args, (flag, value, arg) => {
    switch (flag) {
      case '--kernel':
      case '-k':
        options.kernel = value();
        break;
      case '-o':
      case '--output':
        output = value();
        break;
      case '--compress': {
        const c = value();
        if (!COMPRESSIONS.includes(c as Compression)) throw new ModuleError(`--compress ${c}: use one of ${COMPRESSIONS.join(', ')}`);
        options.compress = c as Compression;
        break;
      }
      case '--level': {
        const v = value();
        if (!/^\d+$/.test(v)) throw new ModuleError(`--level ${v}: give a number (zstd 1-19, gzip and xz 1-9)`);
        options.level = Number(v);
        break;
      }
      case '--add-module':
      case '-m':
        options.addModules!.push(...value().split(',').filter(Boolean));
        break;
      case '--omit-module':
        (options.omitModules ??= []).push(...value().split(',').filter(Boolean));
        break;
      case '--with': {
        const t = value();
        if (!(t in TOOLS)) throw new ModuleError(`--with ${t}: vdboot can include ${Object.keys(TOOLS).join(', ')}`);
        (options.tools ??= []).push(t as ToolName);
        break;
      }
      case '--without': {
        const t = value();
        if (!(t in TOOLS)) throw new ModuleError(`--without ${t}: vdboot includes by default only ntfs-3g and cryptsetup`);
        (options.without ??= []).push(t as ToolName);
        break;
      }
      case '--pack': {
        const t = value();
        if (!(t in TOOLS)) throw new ModuleError(`--pack ${t}: vdboot can include ${Object.keys(TOOLS).join(', ')}`);
        (options.pack ??= []).push(t as ToolName);
        break;
      }
      case '--init':
        options.initBinary = value();
        break;
      case '--arch': {
        const a = value();
        if (a !== 'x86_64' && a !== 'aarch64') throw new ModuleError(`--arch ${a}: use x86_64 or aarch64`);
        options.arch = a;
        break;
      }
      case '--busybox':
        options.busybox = value();
        break;
      case '--modules-dir':
        options.modulesDir = value();
        break;
      case '--hostonly':
        options.hostonly = { ...options.hostonly };
        break;
      case '--root':
        rootSpec = value();
        break;
      default:
        throw new ModuleError(`unknown argument "${arg}"; see vdboot mkinitramfs --help`);
    }
  }, (flag) => new ModuleError(`${flag} needs a value; see vdboot mkinitramfs --help`));
  if (rootSpec !== undefined) {
    if (!options.hostonly) throw new ModuleError('--root SPEC goes with --hostonly (the universal image reaches any root)');
    options.hostonly.root = rootSpec;
  }
  return { options, output };
}

export const command: Command = {
  summary: 'build an initramfs with vdboot as its /init',
  usage,
  async run(args: string[], io: CliIO): Promise<number> {
    const { options, output } = parseMkinitramfsArgs(args);
    const started = performance.now();
    const result = buildInitramfs(options);
    // The default name needs the release, known only once the kernel is found.
    const target = output ?? path.resolve(`initramfs-vdboot-${result.manifest.kernelRelease}.img`);
    writeFileSync(target, result.image);
    for (const note of result.notes) io.stderr(`vdboot mkinitramfs: note: ${note}\n`);
    result.milliseconds = performance.now() - started;
    io.stdout(`${summary(target, result)}\n`);
    return 0;
  },
};
