/** `vdboot kit`: the kernel, a vdboot initramfs and boot entries next to an image on a stick or partition. */
import type { Command, CliIO } from './main.ts';
import { KitError, kitInstructions, makeKit, type KitOptions } from '../../mkdisk/kit.ts';
import { walkArgs } from './args.ts';

const usage = `vdboot kit --image PATH --root-dir DIR [--host SPEC] [--kernel VMLINUZ] [--append ARGS] [--esp DIR] [--no-grub-images] [--no-secure-boot] [--allow-outside]

Makes the image PATH bootable from DIR, the root of the stick or partition that holds it:
writes DIR/boot/vdboot/ with the kernel, a vdboot initramfs, and boot entries that boot
root=vdisk:HOST:PATH, each finding the image's partition by the image file itself:
  grub.cfg      GRUB 2 menuentry (search --file)
  menu.lst      grub4dos entry (find --set-root)
  syslinux.cfg  syslinux/extlinux entry (FAT)
  vdboot.conf   systemd-boot entry
  grubx64.efi   GRUB for UEFI with that search built in (for the firmware's menu or Windows' bcdedit)
  g2ldr, g2ldr.mbr  GRUB for Windows' BIOS boot manager (bcdedit /application bootsector)
and prints the entries and what to do on Windows.

For Secure Boot (no key to enroll), it writes a signed chain into the EFI system partition
(--esp DIR, or DIR itself when it is on FAT): Debian's shim (signed by Microsoft's UEFI
CA) as EFI/BOOT/BOOTX64.EFI and EFI/vdboot/shimx64.efi, Debian's signed GRUB and shim's
MokManager beside each, a grub.cfg there, and the kernel and initramfs in EFI/vdboot/.
The kernel must be signed (Debian's are); the kit says which file is signed by whom.

  --image PATH       the image (vhd, vhdx, vdi, vmdk, qcow2, raw), inside DIR
  --root-dir DIR     the root of the filesystem that holds the image
  --host SPEC        the host filesystem in root=vdisk: (UUID=…, LABEL=…, PARTUUID=…; default:
                     the UUID of DIR's filesystem from findmnt/blkid, else every partition is searched)
  --kernel VMLINUZ   the kernel: a file or a release (default: the newest in /boot)
  --append ARGS      more kernel command line (e.g. "rw", "rd.vdisk.mode=snapshot")
  --esp DIR          the EFI system partition (mounted FAT, or a folder to copy onto one) for
                     the Secure Boot chain (needs shim-signed and grub-efi-amd64-signed)
  --no-grub-images   skip grubx64.efi and g2ldr
  --no-secure-boot   write no Secure Boot chain
  --allow-outside    the image may name files outside its folder (extents, backing files):
                     opened so here, and booted with rd.vdisk.allow-outside=1
  -q, --quiet        no progress`;

export function parseKitArgs(args: string[]): KitOptions & { quiet: boolean } {
  const o: Partial<KitOptions> & { quiet: boolean } = { quiet: false };
  walkArgs(args, (flag, value, arg) => {
    switch (flag) {
      case '--image': o.image = value(); break;
      case '--root-dir': o.rootDir = value(); break;
      case '--host': o.host = value(); break;
      case '--kernel': o.kernel = value(); break;
      case '--append': o.append = value(); break;
      case '--no-grub-images': o.grubImages = false; break;
      case '--esp': o.esp = value(); break;
      case '--no-secure-boot': o.secureBoot = false; break;
      case '-q': case '--quiet': o.quiet = true; break;
      case '--allow-outside': o.allowOutside = true; break;
      default: throw new KitError(`unknown argument "${arg}"; see vdboot kit --help`);
    }
  }, (flag) => new KitError(`${flag} needs a value; see vdboot kit --help`));
  if (!o.image || !o.rootDir) throw new KitError('give --image PATH and --root-dir DIR; see vdboot kit --help');
  if (o.esp !== undefined && o.secureBoot === false) throw new KitError('--esp DIR is where the Secure Boot chain goes, and --no-secure-boot asks for none: give one of them');
  if (o.host !== undefined && !/^(UUID|LABEL|PARTUUID|PARTLABEL)=.+|^\/dev\/\S+$/.test(o.host)) {
    throw new KitError(`--host ${o.host}: give UUID=…, LABEL=…, PARTUUID=…, PARTLABEL=… or /dev/…`);
  }
  return o as KitOptions & { quiet: boolean };
}

export const command: Command = {
  summary: 'write a kernel, a vdboot initramfs and boot entries next to an image on a stick or partition',
  usage,
  async run(args: string[], io: CliIO): Promise<number> {
    try {
      const o = parseKitArgs(args);
      const r = makeKit({ ...o, log: o.quiet ? undefined : (l) => io.stderr(`vdboot kit: ${l}\n`) });
      io.stdout(kitInstructions(r, o.rootDir));
      return 0;
    } catch (e) {
      if (e instanceof Error && ['KitError', 'BootError', 'ModuleError'].includes(e.name)) {
        io.stderr(`vdboot kit: ${e.message}\n`);
        return e.name === 'KitError' ? 2 : 1;
      }
      throw e;
    }
  },
};
