/** `vdboot mkdisk SOURCE -o OUT`: a directory or tar archive becomes a (bootable) disk image. */
import type { Command, CliIO } from './main.ts';
import { OUTPUT_FORMATS, type OutputFormat } from '../formats/writers/index.ts';
import { FS_TYPES, MkdiskError, formatBytes, mkdisk, parseSize, type FsType, type MkdiskOptions } from '../../mkdisk/build.ts';
import type { PartitionScheme } from '../../mkdisk/boot.ts';
import { walkArgs } from './args.ts';

const usage = `vdboot mkdisk SOURCE -o OUT [--format FORMAT] [--fs ext4|ext3|ext2|xfs|btrfs] [--label LABEL]
              [--size SIZE|+SIZE] [--partition gpt|mbr|none] [--bootable [--kernel VMLINUZ] [--append ARGS]]

Makes a disk image from SOURCE, a directory or a tar archive (gzip, bzip2, xz, zstd, lz4 or
none; a "docker export" works), without root: owners, modes, links and device nodes are kept.

  -o, --output OUT     the image to write
  --format FORMAT      ${OUTPUT_FORMATS.join(', ')} (default: by OUT's extension: .vhd .vhdx .vdi
                       .vmdk .qcow2, anything else raw); vhd is dynamic, vhd-fixed fixed
  --fs TYPE            ext4 (default), ext3, ext2, xfs or btrfs (xfs: hard links become
                       copies, names with white space are refused; see README)
  --label LABEL        the filesystem label (at most 16 bytes; xfs 12, btrfs 255)
  --size SIZE          the whole disk (e.g. 4G); an error says so when the content does not fit
  --size +SIZE         at least SIZE free in the filesystem (default: +25% of the content, at least +64M)
  --partition SCHEME   gpt (default: one "Linux root (x86-64)" partition), mbr (one type 83
                       partition) or none (the filesystem is the whole disk)
  --bootable           add a boot partition with GRUB (BIOS and UEFI), the kernel and a vdboot
                       initramfs, so the disk boots in a VM or from a USB stick without -kernel
  --kernel VMLINUZ     the kernel for --bootable: a file or a release (default: the newest in /boot)
  --append ARGS        more kernel command line for --bootable
  --tmp-dir DIR        where to build (default: OUT's directory; needs room for the raw disk)
  -q, --quiet          no progress`;

export function parseMkdiskArgs(args: string[]): MkdiskOptions & { quiet: boolean } {
  let source: string | undefined;
  let output: string | undefined;
  const o: Partial<MkdiskOptions> & { quiet: boolean } = { quiet: false };
  walkArgs(args, (flag, value, arg) => {
    switch (flag) {
      case '-o': case '--output': output = value(); break;
      case '--format': {
        const f = value();
        if (!OUTPUT_FORMATS.includes(f as OutputFormat)) throw new MkdiskError(`--format ${f}: use one of ${OUTPUT_FORMATS.join(', ')}`);
        o.format = f as OutputFormat;
        break;
      }
      case '--fs': {
        const f = value();
        if (!FS_TYPES.includes(f as FsType)) throw new MkdiskError(`--fs ${f}: vdboot mkdisk makes ${FS_TYPES.join(', ')}`);
        o.fs = f as FsType;
        break;
      }
      case '--label': o.label = value(); break;
      case '--size': o.size = parseSize(value()); break;
      case '--partition': {
        const p = value();
        if (!['gpt', 'mbr', 'none'].includes(p)) throw new MkdiskError(`--partition ${p}: use gpt, mbr or none`);
        o.partition = p as PartitionScheme;
        break;
      }
      case '--bootable': o.bootable = true; break;
      case '--kernel': o.kernel = value(); break;
      case '--append': o.append = value(); break;
      case '--tmp-dir': o.tmpDir = value(); break;
      case '-q': case '--quiet': o.quiet = true; break;
      default:
        if (arg.startsWith('-') && arg !== '-') throw new MkdiskError(`unknown option "${arg}"; see vdboot mkdisk --help`);
        if (source !== undefined) throw new MkdiskError(`one SOURCE only ("${source}", then "${arg}"); the output is given with -o`);
        source = arg;
    }
  }, (flag) => new MkdiskError(`${flag} needs a value; see vdboot mkdisk --help`));
  if (source === undefined) throw new MkdiskError('give a SOURCE directory or tar archive; see vdboot mkdisk --help');
  if (output === undefined) throw new MkdiskError('give the image to write with -o OUT; see vdboot mkdisk --help');
  if (o.kernel !== undefined && !o.bootable) throw new MkdiskError('--kernel is for --bootable disks');
  return { ...o, source, output } as MkdiskOptions & { quiet: boolean };
}

export const command: Command = {
  summary: 'make a disk image (raw, VHD, VHDX, VDI, VMDK, QCOW2) from a directory or tar archive',
  usage,
  async run(args: string[], io: CliIO): Promise<number> {
    let options: ReturnType<typeof parseMkdiskArgs>;
    try {
      options = parseMkdiskArgs(args);
    } catch (e) {
      if (e instanceof MkdiskError) { io.stderr(`vdboot mkdisk: ${e.message}\n`); return 2; }
      throw e;
    }
    let lastPercent = -1;
    try {
      const r = await mkdisk({
        ...options,
        log: options.quiet ? undefined : (l) => io.stderr(`vdboot mkdisk: ${l}\n`),
        progress: options.quiet ? undefined : (done, total) => {
          const p = Math.floor((done / Math.max(total, 1)) * 100);
          // Every 10% for outputs over 64 MiB of data: enough to see it move.
          if (total >= 64 * 1024 * 1024 && p >= lastPercent + 10) {
            lastPercent = p;
            io.stderr(`vdboot mkdisk: writing ${p}% (${formatBytes(done)} of ${formatBytes(total)})\n`);
          }
        },
      });
      const lines = [
        `${r.output}: ${r.format}, disk ${formatBytes(r.diskSize)}, file ${formatBytes(r.fileSize)}`,
        `  ${options.fs ?? 'ext4'} UUID=${r.fsUuid}${options.label ? ` LABEL=${options.label}` : ''}, ${formatBytes(r.fsSize)} at byte ${r.fsOffset}${r.partUuid ? `, PARTUUID=${r.partUuid}` : ''}`,
        `  content: ${formatBytes(r.contentBytes)} in ${r.files} files and directories`,
      ];
      if (r.cmdline) lines.push(`  boots (BIOS and UEFI) with: ${r.cmdline}`);
      io.stdout(`${lines.join('\n')}\n`);
      return 0;
    } catch (e) {
      if (e instanceof Error && (e.name === 'MkdiskError' || e.name === 'BootError' || e.name === 'FormatError' || e.name === 'ModuleError')) {
        io.stderr(`vdboot mkdisk: ${e.message}\n`);
        return 1;
      }
      throw e;
    }
  },
};
