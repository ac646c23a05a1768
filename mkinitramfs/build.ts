/**
 * Builds vdboot's initramfs: the /init host, busybox for the rescue shell, the kernel
 * modules of a universal set (storage, filesystems, device-mapper, keyboards) with their
 * dependencies, and the manifest the init reads. The archive is a deterministic newc cpio:
 * the same inputs and SOURCE_DATE_EPOCH give the same bytes.
 *
 * Modules the kernel ships compressed (.ko.xz, .ko.zst) stay compressed: they go as shipped
 * into a second, uncompressed cpio appended to the compressed main one (the kernel unpacks
 * concatenated archives), so the outer compression does not spend time failing to shrink
 * them again. The init hands them to finit_module with MODULE_INIT_COMPRESSED_FILE when the
 * kernel decompresses that format itself (CONFIG_MODULE_DECOMPRESS), else decompresses the
 * ones it loads with busybox into a memfd (see ManifestModule.compression).
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync, statSync, symlinkSync, writeFileSync, openSync, readSync, closeSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readCpio, writeCpio, type CpioInput } from '../src/formats/cpio.ts';
import { buildAliasIndex, MANIFEST_PATH, MANIFEST_VERSION, moduleKey, type InitramfsManifest, type ManifestHostonly, type ManifestModule, type ManifestTools } from '../src/formats/manifest.ts';
import { LVM_MODULE_NAMES } from '../src/formats/lvm.ts';
import { hardDepsInLoadOrder, loadModuleIndex, ModuleError, resolveName, type KernelModuleIndex } from './kmod.ts';
import { filesystemModules, hostDeviceMapper, hostFilesystems, hostKeyboardModules, hostNetworkModules, hostStorageModules, rootFilesystem, rootSpecFilesystems } from './hostonly.ts';

export type Compression = 'zstd' | 'gzip' | 'xz' | 'none';
export const COMPRESSIONS: readonly Compression[] = ['zstd', 'gzip', 'xz', 'none'];

/**
 * The universal module set: what a machine (or VM) may need to reach a root on a disk or an
 * image file, plus keyboards for the rescue shell. Names the kernel lacks (neither a module
 * nor built in) are reported as notes: kernels are configured differently.
 */
export const UNIVERSAL_STORAGE: readonly string[] = [
  'virtio_pci', 'virtio_blk', 'virtio_scsi',
  'sd_mod', 'sr_mod', 'ahci', 'libata', 'ata_piix', 'ata_generic', 'nvme',
  'usb_storage', 'uas', 'xhci_pci', 'xhci_plat_hcd', 'ehci_pci', 'ehci_platform', 'ohci_pci', 'ohci_platform', 'uhci_hcd',
  'mmc_block', 'sdhci_pci', 'sdhci_acpi',
];

/**
 * Wired network drivers of common PCs and VMs, for roots served over the network
 * (root=vdisk:nbd://…): QEMU/KVM's virtio-net and e1000, Intel's e1000e (PC onboard), igb and
 * igc (server and 2.5G onboard), ixgbe (10G), Realtek's r8169 (most desktop boards), Broadcom's
 * tg3 (office PCs, servers). The init loads the one a machine has through its modalias, like
 * any device driver. Firmware files (some r8169 and tg3 chips ask for one) are not included:
 * those chips run without it.
 */
export const UNIVERSAL_NETWORK: readonly string[] = ['virtio_net', 'e1000', 'e1000e', 'igb', 'igc', 'r8169', 'ixgbe', 'tg3'];

export const UNIVERSAL_MODULES: readonly string[] = [
  // virtual machines (Hyper-V's hv_storvsc and VMware's vmw_pvscsi cost 170 KiB: --add-module them)
  'virtio_pci', 'virtio_blk', 'virtio_scsi', 'virtio_console',
  // SCSI disks and CD-ROMs, SATA/AHCI, legacy IDE as QEMU's pc machine has it, NVMe
  'sd_mod', 'sr_mod', 'ahci', 'libata', 'ata_piix', 'ata_generic', 'nvme',
  // USB mass storage and the host controllers (PCI and platform)
  'usb_storage', 'uas', 'xhci_pci', 'xhci_plat_hcd', 'ehci_pci', 'ehci_platform', 'ohci_pci', 'ohci_platform', 'uhci_hcd',
  // SD/MMC
  'mmc_block', 'sdhci_pci', 'sdhci_acpi',
  // filesystems (ext4 also mounts ext2/ext3 when the kernel says so in its fs- aliases)
  'ext4', 'xfs', 'btrfs', 'vfat', 'nls_cp437', 'nls_ascii', 'nls_iso8859_1', 'nls_utf8', 'exfat', 'isofs', 'squashfs', 'overlay', 'ntfs3',
  // device-mapper (linear is part of dm_mod), loop, nbd, fuse
  'dm_mod', 'dm_zero', 'dm_snapshot', 'loop', 'nbd', 'fuse',
  // network cards, for roots on an NBD server
  ...UNIVERSAL_NETWORK,
  // keyboards for the rescue shell
  'hid_generic', 'usbhid', 'atkbd', 'i8042',
];

/** Universal-set modules many x86 kernels lack (platform USB controllers of SoC boards): no note when absent. */
export const QUIETLY_OPTIONAL: ReadonlySet<string> = new Set(['xhci_plat_hcd', 'ehci_platform', 'ohci_platform']);

/**
 * Loaded by the init at every boot, whatever devices it finds. Filesystems are not here: the
 * init probes the superblock first and loads `manifest.filesystems[type]` just before the
 * mount (loading btrfs unconditionally would also run raid6's benchmark at every boot).
 * The character sets a filesystem asks for by name during its mount are its softPre
 * (see filesystemCharsets), so they come with it.
 */
export const PRELOAD_MODULES: readonly string[] = ['dm_mod', 'dm_zero', 'dm_snapshot', 'loop'];

/**
 * The nls modules each filesystem loads by name in its mount with default options, from the
 * kernel's config (vfat: codepage and iocharset, e.g. cp437 and "ascii" on Debian; exfat and
 * isofs: their default iocharset). The init does not run modprobe, so they become softPre of
 * the filesystem's module. Without a config file, every usual table is listed.
 */
export function filesystemCharsets(release: string, configFile = `/boot/config-${release}`): Record<string, string[]> {
  const nls = (charset: string) => `nls_${moduleKey(charset.toLowerCase())}`;
  if (!existsSync(configFile)) {
    const all = ['nls_cp437', 'nls_ascii', 'nls_iso8859_1', 'nls_utf8'];
    return { vfat: all, msdos: all, exfat: ['nls_utf8'], isofs: ['nls_utf8', 'nls_iso8859_1'] };
  }
  const config = readKernelConfig(configFile);
  const fat = [`nls_cp${config.get('CONFIG_FAT_DEFAULT_CODEPAGE') ?? '437'}`, nls(config.get('CONFIG_FAT_DEFAULT_IOCHARSET') ?? 'iso8859-1')];
  if (config.get('CONFIG_FAT_DEFAULT_UTF8') === 'y') fat.push('nls_utf8');
  const nlsDefault = nls(config.get('CONFIG_NLS_DEFAULT') ?? 'iso8859-1');
  return {
    vfat: fat,
    msdos: fat.slice(0, 1),
    exfat: [nls(config.get('CONFIG_EXFAT_DEFAULT_IOCHARSET') ?? 'utf8')],
    isofs: [nlsDefault],
  };
}

export type ModuleCompression = Exclude<ManifestModule['compression'], ''>;

/** The compression of a module file by its name ("ext4.ko.xz" → "xz"), "" for a plain .ko. */
export function moduleFileCompression(file: string): ManifestModule['compression'] {
  const m = /\.ko\.(xz|zst|gz)$/.exec(file);
  return m ? (m[1] as ModuleCompression) : '';
}

/**
 * The kernel's build configuration: config-RELEASE beside the vmlinuz given (a kernel
 * package unpacked with dpkg-deb -x: DIR/boot/config-R beside DIR/boot/vmlinuz-R), or
 * beside the modules directory's package root (DIR/lib/modules/R → DIR/boot/config-R),
 * else /boot/config-RELEASE. Undefined when none exists.
 */
export function findKernelConfig(release: string, kernel?: string, modulesDir?: string, bootDir = '/boot'): string | undefined {
  const candidates: string[] = [];
  if (kernel && existsSync(kernel) && statSync(kernel).isFile()) candidates.push(path.join(path.dirname(path.resolve(kernel)), `config-${release}`));
  if (modulesDir) candidates.push(path.join(path.resolve(modulesDir), '..', '..', '..', 'boot', `config-${release}`));
  candidates.push(path.join(bootDir, `config-${release}`));
  return candidates.find((c) => existsSync(c));
}

/** CONFIG_ lines of a kernel config file as a map ("y", "m", a number or a string without quotes). */
export function readKernelConfig(file: string): Map<string, string> {
  const config = new Map<string, string>();
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const m = /^(CONFIG_\w+)=(.*)$/.exec(line);
    if (m) config.set(m[1], m[2].replace(/^"(.*)"$/, '$1'));
  }
  return config;
}

/**
 * The module compressions finit_module accepts with MODULE_INIT_COMPRESSED_FILE: with
 * CONFIG_MODULE_DECOMPRESS the kernel decompresses the one format it was built for
 * (kernel/module/decompress.c picks gzip, xz or zstd from CONFIG_MODULE_COMPRESS_*).
 * Without a config file: none (the init then decompresses them itself, which works on any
 * kernel).
 */
export function kernelModuleDecompression(config: Map<string, string> | undefined): ModuleCompression[] {
  if (!config || config.get('CONFIG_MODULE_DECOMPRESS') !== 'y') return [];
  const formats: Array<[string, ModuleCompression]> = [['CONFIG_MODULE_COMPRESS_GZIP', 'gz'], ['CONFIG_MODULE_COMPRESS_XZ', 'xz'], ['CONFIG_MODULE_COMPRESS_ZSTD', 'zst']];
  return formats.filter(([k]) => config.get(k) === 'y').map(([, f]) => f);
}

/**
 * For a kernel that cannot decompress a module format itself: the program in the initramfs
 * that writes a decompressed module from stdin to stdout (busybox's xzcat or zcat, the zstd
 * program when it is included), as the argv the init spawns, or undefined when there is none
 * (such modules are then decompressed here, at build time).
 */
export function moduleDecompressor(format: ModuleCompression, applets: ReadonlySet<string>, tools: readonly ToolName[]): string[] | undefined {
  const applet = { xz: 'xzcat', gz: 'zcat', zst: 'zstdcat' }[format];
  if (applets.has(applet)) return ['/bin/busybox', applet];
  if (format === 'zst' && tools.includes('zstd')) return [`/${TOOLS.zstd.path}`, '-dcq'];
  return undefined;
}

export interface MkinitramfsOptions {
  /** A kernel release ("6.1.0-56-amd64") or a vmlinuz file; default: the running kernel's, else the newest in /lib/modules. */
  kernel?: string;
  /** The modules directory to read instead of /lib/modules/RELEASE. */
  modulesDir?: string;
  /** Extra modules (names or aliases), with their dependencies. */
  addModules?: string[];
  /** Universal-set modules to leave out (kept anyway when another included module needs them). */
  omitModules?: string[];
  /**
   * Optional programs with their shared libraries, besides the default ones (see
   * defaultTools: ntfs-3g when the kernel has no ntfs3): qemu-nbd (the nbd path), zstd, lz4.
   */
  tools?: ToolName[];
  /** Default programs to leave out (`--without ntfs-3g`). */
  without?: ToolName[];
  /**
   * Programs kept in a squashfs image mounted when run, besides those packed always (TOOLS'
   * `packed`: cryptsetup and lvm): the kernel no longer unpacks them at every boot.
   */
  pack?: ToolName[];
  compress?: Compression;
  /** The compressor's level (zstd 1-19, gzip 1-9, xz 1-9); default DEFAULT_LEVELS. */
  level?: number;
  /**
   * The machine the initramfs is for; default: the kernel image's (`kernel` as a file:
   * bzImage x86_64, arm64 Image aarch64), else this machine's. It picks the default /init
   * (build/init, build/init-aarch64); /init and busybox must be programs for it.
   */
  arch?: InitArch;
  /** The static /init; default build/init (x86_64) or build/init-aarch64 (aarch64) of this checkout or package. */
  initBinary?: string;
  /** A static busybox; default /bin/busybox. */
  busybox?: string;
  /** Seconds since the epoch for every mtime; default $SOURCE_DATE_EPOCH, else 0. */
  sourceDateEpoch?: number;
  /** Where modprobe.d `options`/`softdep` lines are read; default /lib/modprobe.d, /etc/modprobe.d. */
  modprobeDirs?: string[];
  /**
   * The module compressions the kernel decompresses itself (finit_module with
   * MODULE_INIT_COMPRESSED_FILE); default: read from its config (kernelModuleDecompression).
   * [] has busybox decompress the modules loaded at boot instead, which any kernel accepts.
   */
  kernelDecompresses?: ModuleCompression[];
  /**
   * Decompress every module here and compress it again with the rest, in one archive (the
   * layout before compressed modules were kept; for comparisons).
   */
  unpackModules?: boolean;
  /**
   * Modules (names) stored decompressed in the main archive although the kernel could load
   * them as shipped: the outer compression packs them, and the kernel's unpacking of the
   * archive (zstd) is faster than its decompression of each .ko.xz in finit_module. Default:
   * none; with --hostonly, this machine's disk drivers and its root's filesystem with their
   * dependencies (on 6.12 under TCG: modules 0.2 s sooner for 0.05 MiB, bench/boot.ts).
   */
  decompressModules?: string[];
  /**
   * Only this machine's storage drivers (from sysfs) and filesystems (its mounted block
   * devices', and the `root` spec's), instead of the universal set, with what the root's kind
   * needs (hostonlyNeeds: image data paths, device-mapper, keyboards, default programs). `sysfs` and `mounts` point elsewhere for tests; `typeOf` answers a device
   * spec's filesystem type (default: blkid).
   */
  hostonly?: { root?: string; sysfs?: string; mounts?: string; typeOf?: (deviceSpec: string) => string | undefined };
}

/** Where packed tools' squashfs images lie in the initramfs, and where they are mounted when run. */
export const TOOL_IMAGE_DIR = 'usr/lib/vdboot';
export const TOOL_MOUNT_DIR = '/run/vdboot/tools';
/** What mounting a packed tool's image needs (loaded by the init before it runs one). */
export const TOOL_IMAGE_MODULES: readonly string[] = ['loop', 'squashfs'];

/** The modules unlocking a LUKS volume needs (loaded when one is found, not at every boot). */
export const CRYPT_MODULES: readonly string[] = ['dm_crypt', 'af_alg', 'algif_skcipher', 'xts', 'essiv', 'cbc', 'aesni_intel', 'aes_generic', 'sha256_ssse3', 'sha256_generic'];

/** What --hostonly keeps for a root in an image file (vdisk:): the image's data paths. */
const HOSTONLY_IMAGE: readonly string[] = ['dm_mod', 'dm_zero', 'dm_snapshot', 'loop', 'nbd'];

/**
 * What --hostonly needs beyond the storage drivers and filesystems: the network cards' drivers
 * for a root on an NBD server (`--root vdisk:nbd://…`, or this machine booted from one), the image data paths when
 * the root is an image (`--root vdisk:…`, or this machine was booted from one by vdboot),
 * device-mapper when a disk here is mapped (LVM, LUKS), the keyboards' drivers; and which
 * default programs it leaves out: ntfs-3g without an NTFS filesystem, cryptsetup without an
 * encrypted disk (an image root keeps it: what the image holds is not known here).
 */
function hostonlyNeeds(index: KernelModuleIndex, h: NonNullable<MkinitramfsOptions['hostonly']>, filesystems: readonly string[]): { modules: string[]; dropTools: ToolName[]; imageRoot: boolean; networkRoot: boolean } {
  const dm = hostDeviceMapper(h.sysfs);
  // a root on an NBD server: named so, or this machine booted from one (a connected nbd device)
  const networkRoot = h.root?.startsWith('vdisk:nbd:') === true || hostNbdConnected(h.sysfs);
  const imageRoot = networkRoot || h.root?.startsWith('vdisk:') === true || dm.has('vdboot') || hostMountedAt(h.mounts, '/run/vdboot/host');
  const modules = [...hostKeyboardModules(index, h.sysfs)];
  if (imageRoot) modules.push(...HOSTONLY_IMAGE);
  else if (dm.size || /^\/dev\/(mapper\/|dm-)/.test(h.root ?? '')) modules.push('dm_mod');
  const dropTools: ToolName[] = [];
  if (!filesystems.includes('ntfs')) dropTools.push('ntfs-3g');
  if (!imageRoot && !dm.has('crypt') && !filesystems.some((t) => t === 'crypto_LUKS' || t === 'BitLocker')) dropTools.push('cryptsetup');
  return { modules, dropTools, imageRoot, networkRoot };
}

/** An nbd device of this machine is connected (SYSFS/class/block/nbdN/pid exists while it is). */
function hostNbdConnected(sysfs = '/sys'): boolean {
  const classDir = path.join(sysfs, 'class', 'block');
  return existsSync(classDir) && readdirSync(classDir).some((d) => /^nbd\d+$/.test(d) && existsSync(path.join(classDir, d, 'pid')));
}

/** A filesystem is mounted at `target` in the mounts file. */
function hostMountedAt(mountsFile: string | undefined, target: string): boolean {
  const file = mountsFile ?? '/proc/self/mounts';
  if (!existsSync(file)) return false;
  return readFileSync(file, 'utf8').split('\n').some((line) => line.split(' ')[1] === target);
}

export type ToolName = 'ntfs-3g' | 'qemu-nbd' | 'zstd' | 'lz4' | 'cryptsetup' | 'lvm';
/**
 * Optional programs; `module` is the kernel module the program needs ('' for none), loaded
 * at every boot; `onDemand` are modules it needs that the init loads only when it runs it.
 */
export const TOOLS: Record<ToolName, {
  manifestKey: 'ntfs3g' | 'qemuNbd' | 'zstd' | 'lz4' | 'cryptsetup' | 'lvm';
  module: string;
  path: string;
  onDemand?: readonly string[];
  /**
   * Kept with its libraries in a squashfs image in the uncompressed segment (TOOL_IMAGE_DIR),
   * mounted only when it is run: the kernel then never unpacks it at a boot that does not
   * need it (cryptsetup's 10 MiB cost every boot 0.3-0.5 s under emulation when unpacked).
   * Its programs' paths hold small shell wrappers that mount the image and run them from it.
   */
  packed?: boolean;
  /** programs that go in beside it when this machine has them, each with its other names (links) */
  companions?: readonly { program: string; path: string; links: readonly string[] }[];
}> = {
  'ntfs-3g': { manifestKey: 'ntfs3g', module: 'fuse', path: 'usr/bin/ntfs-3g' },
  'qemu-nbd': { manifestKey: 'qemuNbd', module: 'nbd', path: 'usr/bin/qemu-nbd' },
  // root=tmpfs: archives compressed with zstd or lz4 unpack at C speed instead of in JavaScript
  zstd: { manifestKey: 'zstd', module: '', path: 'usr/bin/zstd' },
  lz4: { manifestKey: 'lz4', module: '', path: 'usr/bin/lz4' },
  // LUKS: cryptsetup opens the volume (key derivation in C); dm_crypt maps it, the kernel's
  // AF_ALG sockets decrypt the key slots, xts/essiv/aesni the usual ciphers. Packed: its
  // 10 MiB with libraries, unpacked by the kernel at every boot, cost a boot without LUKS
  // 0.3-0.5 s under emulation (bench/boot.ts with BENCH_WITHOUT=cryptsetup).
  cryptsetup: { manifestKey: 'cryptsetup', module: '', path: 'usr/sbin/cryptsetup', onDemand: [...CRYPT_MODULES, ...TOOL_IMAGE_MODULES], packed: true },
  // LVM's own program for thin, cache, raid and snapshot LVs (linear and striped ones vdboot
  // maps itself); thin pools and cache volumes are checked by thin-provisioning-tools'
  // thin_check/cache_check (one program, pdata_tools) before lvm activates them.
  lvm: {
    manifestKey: 'lvm', module: '', path: 'usr/sbin/lvm', onDemand: [...LVM_MODULE_NAMES, ...TOOL_IMAGE_MODULES], packed: true,
    companions: [{ program: 'pdata_tools', path: 'usr/sbin/pdata_tools', links: ['usr/sbin/thin_check', 'usr/sbin/cache_check'] }],
  },
};

export interface MkinitramfsResult {
  /**
   * The image: `cpio` compressed, zero-padded to a multiple of 4 bytes when
   * `modulesCpio` follows (the kernel reads the next archive's header at such an offset),
   * then `modulesCpio` as it is. Equal to `cpio` when compress is none and no module is
   * kept compressed.
   */
  image: Uint8Array;
  /** The main archive, uncompressed. */
  cpio: Uint8Array;
  /**
   * The second archive, never compressed again: the modules kept compressed as shipped and
   * packed tools' squashfs images; empty when there are none.
   */
  modulesCpio: Uint8Array;
  /** The compressed main archive's length: image[0, packedLength) is `cpio` compressed, then zeros up to modulesOffset. */
  packedLength: number;
  /** Where `modulesCpio` starts in `image` (image.length when it is empty). */
  modulesOffset: number;
  manifest: InitramfsManifest;
  compression: Compression;
  /** Entries in the archive (files, links, directories, nodes). */
  files: number;
  modules: number;
  /** Things the user may want to know: modules this kernel does not have, … */
  notes: string[];
  /** Programs included (the default ones and those asked for), sorted. */
  tools: ToolName[];
  /** The default programs included and why ("ntfs-3g": "kernel … has no ntfs3"). */
  defaultTools: Partial<Record<ToolName, string>>;
  /** The kernel config read (for CONFIG_MODULE_DECOMPRESS and the filesystems' charsets), if any. */
  kernelConfig?: string;
  /** Every file in the image with its size and what it is part of (for size breakdowns). */
  parts: MkinitramfsPart[];
  /** How the init gets each compressed module format it loads: "kernel" (finit_module decompresses) or the program's argv joined. */
  moduleLoading: Partial<Record<ModuleCompression, string>>;
  milliseconds: number;
}

/** One file of the image: `bytes` as stored in its archive (a kept-compressed module as shipped, in `modulesCpio`). */
export interface MkinitramfsPart {
  path: string;
  bytes: number;
  part: 'init' | 'busybox' | 'tools' | 'modules' | 'modules-compressed' | 'manifest' | 'other';
  /** for tools: the program this file belongs to (its libraries included) */
  tool?: ToolName;
}

/** The vdboot checkout this code runs from (the folder with vdboot's package.json). */
export function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if (JSON.parse(readFileSync(pkg, 'utf8')).name === 'vdboot') return dir;
      } catch {
        /* keep looking */
      }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new ModuleError('cannot find the vdboot checkout (package.json) above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/** The machines vdboot's /init is built for (build/init, build/init-aarch64). */
export type InitArch = 'x86_64' | 'aarch64';
const ELF_MACHINE: Record<InitArch, number> = { x86_64: 62, aarch64: 183 };
/** The build machine's architecture, as vdboot names it. */
export const HOST_ARCH: InitArch | undefined = process.arch === 'x64' ? 'x86_64' : process.arch === 'arm64' ? 'aarch64' : undefined;

/** arm64's Image header: the magic "ARM\x64" at 0x38. */
function isArm64Image(head: Buffer, n: number): boolean {
  return n >= 0x40 && head.readUInt32LE(0x38) === 0x644d5241;
}

/** The architecture of a kernel image file: x86-64 bzImage or arm64 Image, else undefined. */
export function kernelArch(file: string): InitArch | undefined {
  const head = Buffer.alloc(0x210);
  const fd = openSync(file, 'r');
  let n = 0;
  try { n = readSync(fd, head, 0, head.length, 0); } finally { closeSync(fd); }
  if (n >= 0x206 && head.toString('latin1', 0x202, 0x206) === 'HdrS') return 'x86_64';
  return isArm64Image(head, n) ? 'aarch64' : undefined;
}

/**
 * The release string inside a bzImage (setup header "HdrS", kernel_version pointer at
 * 0x20E) or an uncompressed arm64 Image (its "Linux version RELEASE " banner).
 */
export function kernelReleaseOfImage(file: string): string {
  const fd = openSync(file, 'r');
  try {
    const head = Buffer.alloc(0x10000); // the real-mode setup area is at most 64 KiB
    const n = readSync(fd, head, 0, head.length, 0);
    if (isArm64Image(head, n)) return arm64ImageRelease(file);
    if (n < 0x210 || head.toString('latin1', 0x202, 0x206) !== 'HdrS') throw new ModuleError(`${file} is not a Linux bzImage (no "HdrS" setup header at 0x202); give --kernel a release such as ${os.release()} or a vmlinuz file`);
    const off = head.readUInt16LE(0x20e) + 0x200;
    if (off >= n) throw new ModuleError(`${file}: its kernel_version pointer (0x${off.toString(16)}) is outside the setup header`);
    const end = head.indexOf(0, off);
    const release = head.toString('latin1', off, end < 0 ? n : end).split(' ')[0];
    if (!/^[\w.+~-]+$/.test(release)) throw new ModuleError(`${file}: its version string "${release}" does not look like a kernel release`);
    return release;
  } finally {
    closeSync(fd);
  }
}

function arm64ImageRelease(file: string): string {
  const size = statSync(file).size;
  if (size > (256 << 20)) throw new ModuleError(`${file} is ${size} bytes, more than an arm64 kernel Image should be`);
  const image = readFileSync(file);
  const at = image.indexOf('Linux version ', 0, 'latin1');
  if (at < 0) throw new ModuleError(`${file} is an arm64 Image without a "Linux version" banner; give --kernel its release and --modules-dir`);
  const release = image.toString('latin1', at + 14, Math.min(image.length, at + 14 + 200)).split(' ')[0]!;
  if (!/^[\w.+~-]+$/.test(release)) throw new ModuleError(`${file}: its version string "${release}" does not look like a kernel release`);
  return release;
}

/** The modules directory for `kernel` (release or vmlinuz), or the default kernel's. */
export function findModulesDir(kernel?: string, modulesRoot = '/lib/modules'): string {
  let release = kernel;
  if (kernel && existsSync(kernel) && statSync(kernel).isFile()) {
    release = kernelReleaseOfImage(kernel);
    // A kernel package unpacked without installing it (dpkg-deb -x pkg DIR; depmod -b DIR):
    // DIR/boot/vmlinuz-R with its modules in DIR/lib/modules/R.
    const beside = path.join(path.dirname(path.resolve(kernel)), '..', 'lib', 'modules', release);
    if (!existsSync(path.join(modulesRoot, release, 'modules.dep')) && existsSync(path.join(beside, 'modules.dep'))) return path.normalize(beside);
  }
  if (!release) {
    if (existsSync(path.join(modulesRoot, os.release(), 'modules.dep'))) release = os.release();
    else {
      const all = existsSync(modulesRoot) ? readdirSync(modulesRoot).filter((r) => existsSync(path.join(modulesRoot, r, 'modules.dep'))) : [];
      all.sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
      release = all.at(-1);
      if (!release) throw new ModuleError(`no kernel modules under ${modulesRoot}; install a kernel (Debian: linux-image-amd64) or give --modules-dir`);
    }
  }
  const dir = path.join(modulesRoot, release);
  if (!existsSync(path.join(dir, 'modules.dep'))) {
    const have = existsSync(modulesRoot) ? readdirSync(modulesRoot).join(', ') : 'none';
    throw new ModuleError(`no modules for kernel ${release}: ${dir}/modules.dep does not exist (installed: ${have || 'none'}); give --kernel one of those, or --modules-dir`);
  }
  return dir;
}

/** The closure of `roots` (names or aliases) over hard deps and softdeps, each module once. */
export function moduleClosure(index: KernelModuleIndex, roots: readonly string[]): Set<string> {
  const included = new Set<string>();
  const queue = [...roots];
  while (queue.length > 0) {
    const name = queue.shift()!;
    if (included.has(name)) continue;
    included.add(name);
    for (const d of index.depList.get(name) ?? []) queue.push(d);
    const soft = index.softdeps.get(name);
    if (soft) for (const s of [...soft.pre, ...soft.post]) queue.push(...resolveName(index, s));
  }
  return included;
}

const EM_AARCH64 = ELF_MACHINE.aarch64;

/** An ELF file's e_machine (62 x86-64, 183 arm64), or -1 for anything else. */
function elfMachine(file: string): number {
  const b = Buffer.alloc(20);
  let n = 0;
  try {
    const fd = openSync(file, 'r');
    try { n = readSync(fd, b, 0, 20, 0); } finally { closeSync(fd); }
  } catch {
    return -1;
  }
  return n === 20 && b.readUInt32BE(0) === 0x7f454c46 && b[5] === 1 ? b.readUInt16LE(0x12) : -1;
}

/**
 * A squashfs image (zstd, root-owned, every time `mtime`: the same bytes for the same inputs)
 * of `files` (regular files and symlinks, archive paths).
 */
function squashfsImage(files: readonly CpioInput[], mtime: number): Uint8Array {
  const stage = mkdtempSync(path.join(os.tmpdir(), 'vdboot-tool-'));
  try {
    const root = path.join(stage, 'root');
    for (const f of files) {
      const target = path.join(root, f.path.replace(/^\/+/, ''));
      mkdirSync(path.dirname(target), { recursive: true });
      if (f.type === 'file') writeFileSync(target, f.data, { mode: f.mode ?? 0o644 });
      else if (f.type === 'symlink') symlinkSync(f.target, target);
    }
    const out = path.join(stage, 'image.sqfs');
    // mksquashfs refuses -mkfs-time/-all-time while SOURCE_DATE_EPOCH is set (it would use
    // that instead): the times are given here, from the same source, so it runs without it.
    const { SOURCE_DATE_EPOCH: _epoch, ...env } = process.env;
    execFileSync('mksquashfs', [root, out, '-comp', 'zstd', '-noappend', '-all-root', '-no-xattrs', '-quiet', '-no-progress', '-mkfs-time', String(mtime), '-all-time', String(mtime)], { stdio: ['ignore', 'ignore', 'pipe'], env });
    return readFileSync(out);
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

/**
 * Whether the kernel can mount a packed tool's image: loop and squashfs (a module or built
 * in) and, when its config is known, squashfs's zstd decompressor; else why not.
 */
function toolImageSupport(index: KernelModuleIndex, config: Map<string, string> | undefined): true | string {
  const lacks = TOOL_IMAGE_MODULES.filter((m) => !index.files.has(m) && !index.builtin.has(m));
  if (lacks.length) return `kernel ${index.release} has no ${lacks.join(' and ')} to mount its squashfs image`;
  if (config && config.get('CONFIG_SQUASHFS_ZSTD') !== 'y') return `kernel ${index.release} reads no zstd squashfs images (no CONFIG_SQUASHFS_ZSTD)`;
  return true;
}

/**
 * The shell wrapper at a packed tool's program path: mounts the tool's squashfs image at
 * TOOL_MOUNT_DIR/TOOL the first time (busybox mount -o loop; the init has loaded loop and
 * squashfs, and unmounts it before switching root), then runs the program from it with its
 * libraries. Used the same way by the init and by a person in the rescue shell.
 */
function toolWrapper(tool: string, image: string, command: string, libraryPath: string, modules: readonly { name: string; path: string }[]): string {
  return [
    '#!/bin/sh',
    `# ${tool} and its libraries are in ${image}, mounted when first run (vdboot mkinitramfs)`,
    `d=${TOOL_MOUNT_DIR}/${tool}`,
    `if [ ! -e "$d${command}" ]; then`,
    // The modules it needs, dependencies first (the init loads them itself before it runs the
    // program; this is for the rescue shell). busybox's modprobe hands a .ko.xz to
    // finit_module without MODULE_INIT_COMPRESSED_FILE, which the kernel refuses ("Invalid
    // ELF header magic", 6.12): then the module is decompressed to /tmp by xzcat and insmod'ed.
    '  m() { [ -d /sys/module/$1 ] && return; modprobe -q $1 2>/dev/null && return; case $2 in *.ko.xz) xzcat $2 > /tmp/$1.ko && insmod /tmp/$1.ko; rm -f /tmp/$1.ko;; *) insmod $2;; esac; }',
    `  for x in ${modules.map((m) => `${m.name}:${m.path}`).join(' ')}; do m \${x%%:*} \${x#*:} 2>/dev/null; done`,
    `  mkdir -p "$d" && mount -t squashfs -o ro,loop ${image} "$d" || { echo "${path.basename(command)}: cannot mount ${image} on $d" >&2; exit 127; }`,
    'fi',
    `LD_LIBRARY_PATH="${libraryPath}" exec "$d${command}" "$@"`,
    '',
  ].join('\n');
}

/** The program `name` on this host's PATH (plus the sbin directories), or undefined. */
function lookupProgram(name: string): string | undefined {
  for (const d of programDirs()) {
    const p = path.join(d, name);
    if (existsSync(p) && statSync(p).isFile()) return p;
  }
  return undefined;
}

function programDirs(): string[] {
  return [...new Set([...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin', '/usr/bin', '/bin'].filter(Boolean))];
}

/**
 * The programs an initramfs for this kernel gets without being asked, each with the reason,
 * and what the user should hear about the ones it cannot get:
 *  - ntfs-3g when this machine has it. Without ntfs3 (6.1) it is the only driver that
 *    writes NTFS: without it the booted system reaches an NTFS host only read-only through
 *    vdboot's direct path (no loop path, no in-place expansion). With ntfs3 (6.12) it is
 *    still the one that writes a sparse image file (one copied with cp): ntfs3 loses data
 *    written into a sparse file's holes, so vdboot fills them through ntfs-3g.
 */
export function defaultTools(index: Pick<KernelModuleIndex, 'files' | 'builtin' | 'release'>, has: (program: string) => boolean = (p) => lookupProgram(p) !== undefined): { tools: Partial<Record<ToolName, string>>; notes: string[] } {
  const tools: Partial<Record<ToolName, string>> = {};
  const notes: string[] = [];
  const ntfs3 = index.files.has('ntfs3') || index.builtin.has('ntfs3');
  if (has('ntfs-3g')) {
    tools['ntfs-3g'] = ntfs3
      ? 'sparse NTFS image files are filled and written through ntfs-3g: the kernel\'s ntfs3 loses data written into their holes'
      : 'the kernel has no ntfs3, so NTFS hosts are written through ntfs-3g';
  } else if (!ntfs3) {
    notes.push(`kernel ${index.release} has no ntfs3 and this machine has no ntfs-3g (Debian package ntfs-3g), so the initramfs writes no NTFS: NTFS hosts are reached only by vdboot's direct path (no loop path, no read-write boot of a dynamic image); install ntfs-3g and build again`);
  } else {
    notes.push(`this machine has no ntfs-3g (Debian package ntfs-3g): a sparse NTFS image file (one copied with cp) cannot be booted read-write, since the kernel's ntfs3 loses data written into its holes; install ntfs-3g and build again`);
  }
  if (has('cryptsetup')) tools.cryptsetup = 'LUKS volumes are unlocked with it, in plain roots and inside images';
  else notes.push('this machine has no cryptsetup (Debian package cryptsetup-bin): LUKS volumes cannot be unlocked at boot; install it and build again');
  return { tools, notes };
}

interface ModuleSelection {
  roots: string[];
  builtinRequested: string[];
  notes: string[];
}

function selectModules(index: KernelModuleIndex, added: readonly string[], omitted: readonly string[], tools: readonly ToolName[], without: readonly ToolName[], base: readonly string[] = UNIVERSAL_MODULES): ModuleSelection {
  const roots: string[] = [];
  const builtinRequested: string[] = [];
  const missing: string[] = [];
  const omit = new Set(omitted.map(moduleKey));
  for (const o of omit) if (!UNIVERSAL_MODULES.includes(o)) throw new ModuleError(`--omit-module ${o}: not in the universal set (${UNIVERSAL_MODULES.join(', ')})`);
  for (const name of base) {
    const key = moduleKey(name);
    if (omit.has(key)) continue;
    if (index.files.has(key)) roots.push(key);
    else if (index.builtin.has(key)) builtinRequested.push(key);
    else missing.push(key);
  }
  for (const name of added) {
    const key = moduleKey(name);
    if (index.builtin.has(key)) {
      builtinRequested.push(key);
      continue;
    }
    const found = resolveName(index, name);
    if (found.length === 0) throw new ModuleError(`--add-module ${name}: kernel ${index.release} has no module or alias of that name (looked in ${index.dir}/modules.dep, modules.alias and modules.builtin)`);
    roots.push(...found);
  }
  const notes: string[] = [];
  const worthSaying = missing.filter((m) => !QUIETLY_OPTIONAL.has(m));
  if (worthSaying.length > 0) notes.push(`kernel ${index.release} has neither a module nor a built-in for: ${worthSaying.join(', ')} (skipped)`);
  if (missing.includes('ntfs3') && !tools.includes('ntfs-3g') && without.includes('ntfs-3g')) notes.push(`without ntfs3 and without ntfs-3g (--without ntfs-3g), NTFS host partitions are reached only by vdboot's direct path; leave --without ntfs-3g out for the loop path, a mounted host at /run/vdboot/host, and read-write boots of dynamic images (expanded in place through it)`);
  return { roots, builtinRequested, notes };
}

/** Filesystem type → module, from `fs-TYPE` aliases of included modules and of built-in ones. */
function filesystemTable(index: KernelModuleIndex, included: Set<string>): Record<string, string> {
  const table: Record<string, string> = {};
  const builtinInfo = path.join(index.dir, 'modules.builtin.modinfo');
  if (existsSync(builtinInfo)) {
    for (const rec of readFileSync(builtinInfo, 'latin1').split('\0')) {
      const m = /^[^.]+\.alias=fs-(.+)$/.exec(rec);
      if (m) table[m[1]] = '';
    }
  }
  for (const [pattern, mod] of index.aliases) {
    if (pattern.startsWith('fs-') && included.has(mod) && !/[*?[]/.test(pattern)) table[pattern.slice(3)] = mod;
  }
  return Object.fromEntries(Object.entries(table).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** A module file's bytes, decompressed when it is compressed (for a kernel and image that cannot at boot). */
function readModuleFile(file: string): Uint8Array {
  const ext = path.extname(file);
  const tool = ext === '.xz' ? 'xz' : ext === '.zst' ? 'zstd' : ext === '.gz' ? 'gzip' : '';
  if (tool) return execFileSync(tool, ['-dc', file], { maxBuffer: 1 << 30 });
  return readFileSync(file);
}

function busyboxApplets(busybox: string): string[] {
  let out: string;
  // An arm64 busybox on another machine runs through qemu-user (Debian's qemu-user-static).
  const foreign = elfMachine(busybox) === EM_AARCH64 && process.arch !== 'arm64';
  const [cmd, args] = foreign ? ['qemu-aarch64-static', [busybox, '--list-full']] : [busybox, ['--list-full']];
  try {
    out = execFileSync(cmd, args, { encoding: 'utf8' });
  } catch (e) {
    const hint = foreign ? 'it is an arm64 program: install qemu-user-static to list its applets here' : "install Debian's busybox-static or give another static busybox";
    throw new ModuleError(`cannot run ${foreign ? `${cmd} ${busybox}` : busybox} --list-full (${(e as Error).message.split('\n')[0]}); ${hint}`);
  }
  return out.split('\n').map((l) => l.trim()).filter((l) => l && !l.includes('..') && l !== 'linuxrc');
}

/** The program `name` on this host's PATH (plus the sbin directories). */
function findProgram(name: string): string {
  const found = lookupProgram(name);
  if (found) return found;
  const pkg = name === 'qemu-nbd' ? 'qemu-utils' : name;
  throw new ModuleError(`${name} is not installed on this machine (searched ${programDirs().join(':')}); install the Debian package ${pkg}`);
}

/**
 * The shared libraries `program` loads (and the dynamic loader), as absolute paths, from
 * ldd. They go into the initramfs at the same paths, where the loader's default search finds
 * them without an ld.so.cache.
 */
export function sharedLibraries(program: string): string[] {
  if (isStaticElf(program)) return [];
  let out: string;
  try {
    out = execFileSync('ldd', [program], { encoding: 'utf8' });
  } catch (e) {
    throw new ModuleError(`ldd ${program} failed (${(e as Error).message.split('\n')[0]}); is it a program for this machine?`);
  }
  const libs: string[] = [];
  for (const line of out.split('\n')) {
    if (/=> not found/.test(line)) throw new ModuleError(`${program} needs ${line.trim().split(' ')[0]}, which is not installed`);
    const m = /=>\s+(\/\S+)\s+\(/.exec(line) ?? /^\s*(\/\S+)\s+\(/.exec(line);
    if (m) libs.push(m[1]);
  }
  return libs.sort();
}

function isStaticElf(file: string): boolean {
  const b = readFileSync(file);
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2) return false;
  const phoff = Number(b.readBigUInt64LE(32));
  const phentsize = b.readUInt16LE(54);
  const phnum = b.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > b.length) return false;
    if (b.readUInt32LE(off) === 3 /* PT_INTERP */) return false;
  }
  return true;
}

/** Levels used when none is given: zstd -9 keeps the build well under a second (-19 saves ~10% and takes ~15 s). */
export const DEFAULT_LEVELS: Record<Exclude<Compression, 'none'>, number> = { zstd: 9, gzip: 9, xz: 6 };
/** The zstd level of --hostonly images when none is given. */
export const HOSTONLY_ZSTD_LEVEL = 19;
const MAX_LEVELS: Record<Exclude<Compression, 'none'>, number> = { zstd: 19, gzip: 9, xz: 9 };

export function compress(bytes: Uint8Array, how: Compression, level?: number): Uint8Array {
  if (how === 'none') return bytes;
  const l = level ?? DEFAULT_LEVELS[how];
  if (!Number.isInteger(l) || l < 1 || l > MAX_LEVELS[how]) throw new ModuleError(`compression level ${l} is not valid for ${how} (1 to ${MAX_LEVELS[how]})`);
  // Every flag is chosen for reproducible output: no names or times in headers, a fixed
  // thread count (zstd's output does not depend on it from one worker up; xz's does).
  // Kernel-side: xz must use CRC32 (the kernel's decoder may lack CRC64) and the
  // dictionary the documentation recommends (1 MiB); zstd -19 keeps its window at 8 MiB.
  const args: Record<Exclude<Compression, 'none'>, [string, string[]]> = {
    zstd: ['zstd', ['-q', '-c', `-${l}`, '-T2', '--no-progress']],
    gzip: ['gzip', ['-n', `-${l}`, '-c']],
    xz: ['xz', ['-c', '-T1', '--check=crc32', `--lzma2=preset=${l},dict=1MiB`]],
  };
  const [tool, flags] = args[how];
  try {
    return execFileSync(tool, flags, { input: bytes, maxBuffer: 1 << 30 });
  } catch (e) {
    throw new ModuleError(`${tool} failed (${(e as Error).message.split('\n')[0]}); install it (Debian package: ${tool === 'xz' ? 'xz-utils' : tool}) or use --compress none`);
  }
}

export function sourceDateEpochFromEnv(): number {
  const v = process.env.SOURCE_DATE_EPOCH;
  if (v === undefined || v === '') return 0;
  if (!/^\d+$/.test(v) || Number(v) > 0xffffffff) throw new ModuleError(`SOURCE_DATE_EPOCH="${v}" is not a whole number of seconds since 1970 (up to 4294967295)`);
  return Number(v);
}

/** Builds the initramfs in memory; see MkinitramfsResult. */
export function buildInitramfs(options: MkinitramfsOptions = {}): MkinitramfsResult {
  const started = performance.now();
  const compression = options.compress ?? 'zstd';
  if (!COMPRESSIONS.includes(compression)) throw new ModuleError(`unknown compression "${compression}"; use one of ${COMPRESSIONS.join(', ')}`);
  const mtime = options.sourceDateEpoch ?? sourceDateEpochFromEnv();
  const root = options.initBinary && options.busybox ? '' : repoRoot();
  const kernelFile = options.kernel !== undefined && existsSync(options.kernel) && statSync(options.kernel).isFile() ? options.kernel : undefined;
  const arch: InitArch = options.arch ?? (kernelFile ? kernelArch(kernelFile) : undefined) ?? HOST_ARCH ?? 'x86_64';
  if (!(arch in ELF_MACHINE)) throw new ModuleError(`unknown architecture "${arch}"; vdboot's /init is built for ${Object.keys(ELF_MACHINE).join(' and ')}`);
  const foreign = arch !== HOST_ARCH;
  // A host-only image takes the /init whose bytecode has no debug info (build/init-stripped,
  // 0.13 MiB less zstd-compressed): an internal error's stack then names the functions but
  // not their lines. --init build/init keeps them.
  const stripped = path.join(root, 'build', 'init-stripped');
  const strippedInit = !options.initBinary && options.hostonly !== undefined && arch === 'x86_64' && existsSync(stripped);
  const initBinary = options.initBinary ?? (strippedInit ? stripped : path.join(root, 'build', arch === 'aarch64' ? 'init-aarch64' : 'init'));
  if (!existsSync(initBinary)) throw new ModuleError(`${initBinary} does not exist: build the /init host first ("npm run build" builds it when init/ and src/boot/main.ts are present${arch === 'aarch64' ? ', build/init-aarch64 with gcc-aarch64-linux-gnu' : ''})`);
  if (elfMachine(initBinary) !== ELF_MACHINE[arch]) throw new ModuleError(`${initBinary} is not an ${arch} program, and the initramfs is for ${arch}${kernelFile && !options.arch ? ` (the kernel ${kernelFile} is)` : ''}: give --init the ${arch} one (build/init${arch === 'aarch64' ? '-aarch64' : ''})`);
  const busybox = options.busybox ?? '/bin/busybox';
  if (!existsSync(busybox)) throw new ModuleError(`${busybox} does not exist: install Debian's busybox-static (apt-get install busybox-static)`);
  if (!isStaticElf(busybox)) throw new ModuleError(`${busybox} is not a statically linked ELF program; the initramfs has no shared libraries for it: install busybox-static`);
  if (elfMachine(busybox) !== ELF_MACHINE[arch]) throw new ModuleError(`${busybox} is not an ${arch} program, and the initramfs is for ${arch}: give --busybox a static ${arch} busybox (Debian's busybox-static:${arch === 'aarch64' ? 'arm64' : 'amd64'}, unpacked with dpkg-deb -x; scripts/fetch-arm64-boot.sh fetches the arm64 one)`);
  // Programs with their libraries come from this machine: only for its own architecture.
  if (foreign && options.tools?.length) throw new ModuleError(`--with ${options.tools.join(', ')}: the programs come from this machine, which is not ${arch}; build the initramfs on an ${arch} machine for them`);

  const modulesDir = options.modulesDir ?? findModulesDir(options.kernel);
  const index = loadModuleIndex(modulesDir, options.modprobeDirs);
  const without = [...new Set(options.without ?? [])];
  for (const t of [...(options.tools ?? []), ...without]) if (!(t in TOOLS)) throw new ModuleError(`unknown tool "${t}"; vdboot can include ${Object.keys(TOOLS).join(', ')}`);
  for (const t of without) if ((options.tools ?? []).includes(t)) throw new ModuleError(`${t} is both asked for and left out (--with ${t} --without ${t}): give one of them`);
  const defaults = foreign
    ? { tools: {}, notes: [`the initramfs is for ${arch} and this machine is not: no programs from it (ntfs-3g) go in; NTFS hosts are reached by the kernel's ntfs3 where it has one, else only by vdboot's direct path`] }
    : defaultTools(index);
  let hostonly: ManifestHostonly | undefined;
  let base = UNIVERSAL_MODULES;
  let hostonlyWhy: string[] = [];
  const hostonlyDrop: ToolName[] = [];
  // the --root device's filesystem (blkid by default): asked once, used for the modules and the early root module
  const rootSpecTypes = options.hostonly?.root ? rootSpecFilesystems(options.hostonly.root, options.hostonly.typeOf) : [];
  let hotModules = options.decompressModules;
  if (options.hostonly) {
    const storage = hostStorageModules(index, options.hostonly.sysfs);
    const types = [...new Set([...hostFilesystems(options.hostonly.mounts), ...rootSpecTypes])].sort();
    const fs = filesystemModules(index, types);
    const needs = hostonlyNeeds(index, options.hostonly, types);
    const network = needs.networkRoot ? hostNetworkModules(index, options.hostonly.sysfs) : { devices: {}, modules: [] };
    base = [...new Set([...needs.modules, ...storage.modules, ...network.modules, ...fs.modules])];
    // The modules every boot of this machine loads first: its disks' drivers and the root's
    // filesystem, stored decompressed (see HOSTONLY_HOT).
    const rootType = rootSpecTypes[0] ?? rootFilesystem(options.hostonly.mounts);
    hotModules ??= [...moduleClosure(index, [...storage.modules, ...filesystemModules(index, rootType ? [rootType] : []).modules].filter((m) => index.files.has(m)))];
    hostonlyDrop.push(...needs.dropTools.filter((t) => t in defaults.tools && !(options.tools ?? []).includes(t)));
    hostonlyWhy = hostonlyDrop.map((t) => (t === 'ntfs-3g' ? 'no NTFS filesystem here: ntfs-3g left out' : `no encrypted disk here: ${t} left out`));
    if (!needs.imageRoot) hostonlyWhy.push('the root is not an image file: loop, nbd and the image device-mapper targets left out');
    if (!needs.networkRoot) hostonlyWhy.push('the root is not on an NBD server: no network card drivers');
    hostonly = { storage: storage.devices, ...(needs.networkRoot ? { network: network.devices } : {}), filesystems: types, ...(options.hostonly.root ? { root: options.hostonly.root } : {}), leftOut: [], ...(hostonlyDrop.length ? { toolsLeftOut: [...hostonlyDrop].sort() } : {}) };
  }
  const chosenDefaults = Object.fromEntries(Object.entries(defaults.tools).filter(([t]) => !without.includes(t as ToolName) && !hostonlyDrop.includes(t as ToolName))) as Partial<Record<ToolName, string>>;
  const tools = [...new Set([...(options.tools ?? []), ...(Object.keys(chosenDefaults) as ToolName[])])].sort();
  const selection = selectModules(index, options.addModules ?? [], options.omitModules ?? [], tools, without, base);
  if (hostonly) {
    const devices = Object.entries(hostonly.storage).map(([d, m]) => `${d} (${m.join(', ') || 'built-in drivers'})`);
    const nics = Object.entries(hostonly.network ?? {}).map(([d, m]) => `${d} (${m.join(', ') || 'built-in drivers'})`);
    selection.notes.push(`--hostonly: storage drivers of this machine: ${devices.join('; ') || 'no block devices found'}; ${hostonly.network ? `network cards: ${nics.join('; ') || 'none wired'}; ` : ''}filesystems: ${hostonly.filesystems.join(', ') || 'none mounted'}`);
    if (hostonlyWhy.length) selection.notes.push(`--hostonly: ${hostonlyWhy.join('; ')} (--with or --add-module adds them back)`);
    if (strippedInit) selection.notes.push(`--hostonly: /init is ${stripped}, its bytecode without debug info (0.13 MiB smaller): a report of an internal error names functions but no lines; --init ${path.join(root, 'build', 'init')} keeps them`);
  }
  selection.notes.push(...defaults.notes.filter((n) => !without.some((t) => n.includes(`has no ${t}`))));
  for (const [t, why] of Object.entries(chosenDefaults)) if (!(options.tools ?? []).includes(t as ToolName)) selection.notes.push(`${t} included: ${why}; --without ${t} leaves it out`);
  const configFile = findKernelConfig(index.release, options.kernel, modulesDir);
  const config = configFile ? readKernelConfig(configFile) : undefined;
  const charsets = filesystemCharsets(index.release, configFile ?? `/boot/config-${index.release}`);
  const fsRoots = new Set(selection.roots);
  const charsetRoots = Object.entries(charsets).flatMap(([fs, list]) => (fsRoots.has(fs) ? list : [])).filter((m) => index.files.has(m));
  const toolModules = tools.flatMap((t) => [TOOLS[t].module, ...(TOOLS[t].onDemand ?? []), ...((options.pack ?? []).includes(t) ? TOOL_IMAGE_MODULES : [])]).map(moduleKey).filter((m) => m !== '' && index.files.has(m));
  const included = moduleClosure(index, [...selection.roots, ...charsetRoots, ...toolModules]);
  // Modules only a program needs when it runs (cryptsetup's crypto modules, lvm's targets):
  // kept out of the modules.alias text that busybox's modprobe reads, since the kernel's own
  // early request_module calls (crypto algorithms for IMA, keys) run /sbin/modprobe before
  // /init and would load them, or on 6.12 fail on each .ko.xz, at every boot.
  const everyBoot = moduleClosure(index, [...selection.roots, ...charsetRoots, ...tools.map((t) => TOOLS[t].module).map(moduleKey).filter((m) => m !== '' && index.files.has(m))]);
  const onDemandOnly = new Set([...included].filter((m) => !everyBoot.has(m)));
  for (const o of options.omitModules ?? []) if (included.has(moduleKey(o))) selection.notes.push(`${moduleKey(o)} stays in: another included module needs it`);
  if (hostonly) {
    // what the universal set would have brought for storage: named at boot when a device needs it
    const universal = moduleClosure(index, UNIVERSAL_STORAGE.map(moduleKey).filter((m) => index.files.has(m)));
    const leftOut = new Map<string, string[]>();
    for (const [pattern, mod] of index.aliases) if (universal.has(mod) && !included.has(mod) && !pattern.startsWith('fs-')) leftOut.set(pattern, [...(leftOut.get(pattern) ?? []), mod]);
    hostonly.leftOut = [...leftOut.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }
  const release = index.release;
  const modRoot = `lib/modules/${release}`;

  const inputs: CpioInput[] = [];
  for (const d of ['dev', 'proc', 'sys', 'run', 'root', 'mnt', 'etc/vdboot', 'bin', 'sbin', 'usr/bin', 'usr/sbin']) inputs.push({ type: 'dir', path: d, mode: 0o755 });
  inputs.push({ type: 'dir', path: 'tmp', mode: 0o1777 });
  inputs.push({ type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 });
  inputs.push({ type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
  inputs.push({ type: 'file', path: 'init', data: readFileSync(initBinary), mode: 0o755 });
  inputs.push({ type: 'file', path: 'bin/busybox', data: readFileSync(busybox), mode: 0o755 });
  // vdiskload (attach images from the rescue shell) is /init chosen by its name.
  inputs.push({ type: 'symlink', path: 'usr/sbin/vdiskload', target: '/init' });
  const taken = new Set(['bin/busybox', 'init', 'usr/sbin/vdiskload']);
  const toolOf = new Map<string, ToolName>();
  // the uncompressed archive: modules kept compressed as shipped, packed tools' squashfs images
  const compressedInputs: CpioInput[] = [];
  const manifestTools: ManifestTools = { busybox: '/bin/busybox' };
  // packed tools last: libraries the main archive already has stay out of their images
  // (the wrapper's LD_LIBRARY_PATH falls back to the usual directories)
  // A packed tool needs mksquashfs here, and at boot loop and squashfs with zstd in the kernel;
  // without them it goes in unpacked, as before packing (said in a note).
  const imageMounts = toolImageSupport(index, config);
  const packable = lookupProgram('mksquashfs') ? imageMounts : 'this machine has no mksquashfs (Debian package squashfs-tools)';
  const wrappers: { input: CpioInput & { type: 'file' }; tool: ToolName; image: string; command: string; libraryPath: string }[] = [];
  const isPacked = (t: ToolName): boolean => ((TOOLS[t].packed ?? false) || (options.pack ?? []).includes(t)) && packable === true;
  for (const t of tools) if (((TOOLS[t].packed ?? false) || (options.pack ?? []).includes(t)) && packable !== true) selection.notes.push(`${t} goes in unpacked (the kernel unpacks it at every boot): ${packable}`);
  for (const t of [...tools].sort((a, b) => Number(isPacked(a)) - Number(isPacked(b)))) {
    const found = findProgram(t);
    const spec = TOOLS[t];
    // the tool's files: its program, companions with their links, their libraries
    const own: CpioInput[] = [{ type: 'file', path: spec.path, data: readFileSync(found), mode: 0o755 }];
    const programs = [found];
    const commands = [spec.path];
    for (const c of spec.companions ?? []) {
      const other = lookupProgram(c.program);
      if (!other) continue; // optional: lvm says what it misses when it needs it
      own.push({ type: 'file', path: c.path, data: readFileSync(other), mode: 0o755 });
      for (const link of c.links) own.push({ type: 'symlink', path: link, target: path.basename(c.path) });
      programs.push(other);
      commands.push(c.path, ...c.links);
    }
    const libs = [...new Set(programs.flatMap((p) => sharedLibraries(p)))].sort();
    manifestTools[spec.manifestKey] = `/${spec.path}`;
    if (isPacked(t)) {
      const imageRelPath = `${TOOL_IMAGE_DIR}/${t}.sqfs`;
      for (const lib of libs) {
        const rel = lib.replace(/^\/+/, '');
        if (!taken.has(rel)) own.push({ type: 'file', path: rel, data: readFileSync(realpathSync(lib)), mode: 0o755 });
      }
      compressedInputs.push({ type: 'file', path: imageRelPath, data: squashfsImage(own, mtime), mode: 0o644 });
      toolOf.set(imageRelPath, t);
      // the program interpreter runs the wrapped programs: it stays in the main archive
      for (const lib of libs.filter((l) => /\/ld-linux[^/]*\.so/.test(l))) {
        const rel = lib.replace(/^\/+/, '');
        if (taken.has(rel)) continue;
        taken.add(rel);
        inputs.push({ type: 'file', path: rel, data: readFileSync(realpathSync(lib)), mode: 0o755 });
      }
      const libraryPath = [...new Set(libs.map((l) => path.dirname(l)))].map((d) => `$d${d}`).join(':');
      for (const cmd of commands) {
        // written once the modules' paths in the image are known (below)
        const wrapper: CpioInput = { type: 'file', path: cmd, data: new Uint8Array(0), mode: 0o755 };
        wrappers.push({ input: wrapper, tool: t, image: `/${imageRelPath}`, command: `/${cmd}`, libraryPath });
        inputs.push(wrapper);
        taken.add(cmd);
        toolOf.set(cmd, t);
      }
      continue;
    }
    for (const input of own) {
      inputs.push(input);
      taken.add(input.path);
      toolOf.set(input.path, t);
    }
    for (const lib of libs) {
      const rel = lib.replace(/^\/+/, '');
      if (taken.has(rel)) continue;
      taken.add(rel);
      toolOf.set(rel, t);
      inputs.push({ type: 'file', path: rel, data: readFileSync(realpathSync(lib)), mode: 0o755 });
    }
  }
  const applets = busyboxApplets(busybox);
  for (const applet of applets) {
    if (taken.has(applet)) continue;
    taken.add(applet);
    inputs.push({ type: 'symlink', path: applet, target: '/bin/busybox' });
  }

  const sortedNames = [...included].sort();
  const modules: Record<string, ManifestModule> = {};
  const depLines: string[] = [];
  // Each compressed module stays as shipped when the kernel or a program in the image can
  // decompress it at boot; otherwise it is decompressed here (e.g. .ko.zst on a kernel
  // without MODULE_DECOMPRESS and without the zstd program in the image).
  const kernelFormats = new Set(options.kernelDecompresses ?? kernelModuleDecompression(config));
  const appletNames = new Set(applets.map((a) => path.basename(a)));
  const decompressors: Partial<Record<ModuleCompression, string[]>> = {};
  const moduleLoading: Partial<Record<ModuleCompression, string>> = {};
  const unpackedHere = new Set<ModuleCompression>();
  const imageRel = new Map<string, string>();
  const decompress = new Set((hotModules ?? []).map(moduleKey));
  const decompressed: string[] = [];
  for (const name of sortedNames) {
    const rel = index.files.get(name)!;
    const format = moduleFileCompression(rel);
    let keep = false;
    if (options.unpackModules) {
      /* plain, in the main archive */
    } else if (format && decompress.has(name)) {
      decompressed.push(name);
    } else if (format && kernelFormats.has(format)) {
      keep = true;
      moduleLoading[format] = 'kernel';
    } else if (format) {
      const argv = moduleDecompressor(format, appletNames, tools);
      if (argv) {
        keep = true;
        decompressors[format] = argv;
        moduleLoading[format] = argv.join(' ');
      } else unpackedHere.add(format);
    }
    imageRel.set(name, keep ? rel : rel.replace(/\.ko\.(xz|zst|gz)$/, '.ko'));
    const file = path.join(modulesDir, rel);
    if (keep) compressedInputs.push({ type: 'file', path: `${modRoot}/${rel}`, data: readFileSync(file), mode: 0o644 });
    else inputs.push({ type: 'file', path: `${modRoot}/${imageRel.get(name)!}`, data: readModuleFile(file), mode: 0o644 });
  }
  for (const w of wrappers) {
    const order: string[] = [];
    // Soft pre-dependencies too (xts asks for ecb): these modules are not in the modules.alias
    // text, so the kernel's own request for "crypto-ecb(aes)" finds nothing; the wrapper loads them.
    const add = (m: string, seen: Set<string>): void => {
      if (seen.has(m)) return;
      seen.add(m);
      const pre = [...new Set((index.softdeps.get(m)?.pre ?? []).flatMap((x) => resolveName(index, x)))].filter((x) => included.has(x) && x !== m);
      for (const x of pre) add(x, seen);
      for (const d of [...hardDepsInLoadOrder(index, m), m]) if (!order.includes(d)) order.push(d);
    };
    const seen = new Set<string>();
    for (const m of [...TOOL_IMAGE_MODULES, ...(TOOLS[w.tool].onDemand ?? [])].map(moduleKey).filter((m) => included.has(m))) add(m, seen);
    w.input.data = new TextEncoder().encode(toolWrapper(w.tool, w.image, w.command, w.libraryPath, order.map((name) => ({ name, path: `/${modRoot}/${imageRel.get(name)!}` }))));
  }
  for (const format of options.unpackModules ? [] : unpackedHere) {
    selection.notes.push(`.ko.${format} modules were decompressed at build time: kernel ${index.release} cannot decompress them (${configFile ? `${configFile} has no CONFIG_MODULE_DECOMPRESS for ${format}` : 'no kernel config found'}) and the image has no program for it${format === 'zst' ? ' (--with zstd adds one)' : ''}`);
  }
  if (decompressed.length) selection.notes.push(`${decompressed.join(', ')} stored decompressed in the ${compression} archive${options.decompressModules ? '' : ' (--hostonly: the modules this machine loads first, its disks\' drivers and its root\'s filesystem)'}: the kernel unpacks them with the archive, faster than it decompresses each .ko.${moduleFileCompression(index.files.get(decompressed[0]!)!)} when loading it`);
  if (!configFile && Object.keys(decompressors).length > 0) selection.notes.push(`no config-${index.release} found (beside the kernel or in /boot): compressed modules are decompressed by busybox at boot, which works on any kernel`);
  for (const name of sortedNames) {
    const deps = hardDepsInLoadOrder(index, name);
    const soft = index.softdeps.get(name) ?? { pre: [], post: [] };
    const resolveSoft = (list: string[]) => [...new Set(list.flatMap((s) => resolveName(index, s)))].filter((m) => included.has(m) && m !== name);
    modules[name] = {
      name,
      path: `/${modRoot}/${imageRel.get(name)!}`,
      deps,
      softPre: [...new Set([...resolveSoft(soft.pre), ...(Object.hasOwn(charsets, name) ? charsets[name] : []).filter((m) => included.has(m))])],
      softPost: resolveSoft(soft.post),
      options: index.options.get(name) ?? '',
      compression: moduleFileCompression(imageRel.get(name)!),
    };
    depLines.push(`${imageRel.get(name)!}: ${deps.slice().reverse().map((d) => imageRel.get(d)!).join(' ')}`.trimEnd() + '\n');
  }

  const aliasMap = new Map<string, Set<string>>();
  for (const [pattern, mod] of index.aliases) {
    if (!included.has(mod)) continue;
    let s = aliasMap.get(pattern);
    if (!s) aliasMap.set(pattern, (s = new Set()));
    s.add(mod);
  }
  const aliases: Array<[string, string[]]> = [...aliasMap.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([p, s]) => [p, [...s].sort()]);

  const preload = [...PRELOAD_MODULES, ...tools.map((t) => TOOLS[t].module).filter((m) => m !== '')].map(moduleKey).filter((m) => included.has(m));
  const pkgVersion = (() => {
    try {
      return JSON.parse(readFileSync(path.join(repoRoot(), 'package.json'), 'utf8')).version as string;
    } catch {
      return 'unknown';
    }
  })();
  // The root's likely filesystem, when the image has its module (or it is built in).
  const fsTable = filesystemTable(index, included);
  const rootGuess = rootSpecTypes[0] ?? rootFilesystem(options.hostonly?.mounts);
  const rootFsType = rootGuess !== undefined && Object.prototype.hasOwnProperty.call(fsTable, rootGuess) ? rootGuess : undefined;
  const manifest: InitramfsManifest = {
    version: MANIFEST_VERSION,
    kernelRelease: release,
    build: {
      generator: `vdboot mkinitramfs ${pkgVersion}`,
      sourceDateEpoch: mtime,
      compression,
      modulesDir,
      addedModules: (options.addModules ?? []).map(moduleKey),
      ...(hostonly ? { hostonly } : {}),
      ...(rootFsType ? { rootFsType } : {}),
    },
    modules,
    aliases,
    aliasIndex: buildAliasIndex(aliases),
    builtin: [...index.builtin].sort(),
    preload,
    filesystems: fsTable,
    tools: manifestTools,
    ...(Object.keys(decompressors).length > 0 ? { decompressors } : {}),
  };
  inputs.push({ type: 'file', path: MANIFEST_PATH, data: new TextEncoder().encode(JSON.stringify(manifest) + '\n') });
  inputs.push({ type: 'file', path: `${modRoot}/modules.dep`, data: new TextEncoder().encode(depLines.join('')) });
  inputs.push({ type: 'file', path: `${modRoot}/modules.alias`, data: new TextEncoder().encode(aliases.flatMap(([p, ms]) => ms.filter((m) => !onDemandOnly.has(m)).map((m) => `alias ${p} ${m}\n`)).join('')) });
  const builtinFile = path.join(modulesDir, 'modules.builtin');
  if (existsSync(builtinFile)) inputs.push({ type: 'file', path: `${modRoot}/modules.builtin`, data: readFileSync(builtinFile) });
  const release_ = [`NAME="vdboot"`, `ID=vdboot`, `VERSION_ID="${pkgVersion}"`, `PRETTY_NAME="vdboot initramfs ${pkgVersion} (kernel ${release})"`, `VDBOOT_KERNEL="${release}"`].join('\n') + '\n';
  inputs.push({ type: 'file', path: 'etc/initrd-release', data: new TextEncoder().encode(release_) });

  const cpio = writeCpio(inputs, { mtime });
  // A host-only image is small already: zstd -19 takes seconds there and saves ~7% more.
  const packed = compress(cpio, compression, options.level ?? (options.hostonly && compression === 'zstd' ? HOSTONLY_ZSTD_LEVEL : undefined));
  const modulesCpio = compressedInputs.length > 0 ? writeCpio(compressedInputs, { mtime }) : new Uint8Array(0);
  const modulesOffset = modulesCpio.length > 0 ? (packed.length + 3) & ~3 : packed.length;
  let image = packed;
  if (modulesCpio.length > 0) {
    // The compressed archive, zeros up to a 4-byte boundary (the kernel skips them and
    // reads the next header there), then the uncompressed modules archive.
    image = new Uint8Array(modulesOffset + modulesCpio.length);
    image.set(packed, 0);
    image.set(modulesCpio, modulesOffset);
  }
  const files = readCpio(cpio).length + (modulesCpio.length > 0 ? readCpio(modulesCpio).length : 0);
  const moduleFiles = new Set(Object.values(modules).map((m) => m.path.slice(1)));
  const parts: MkinitramfsPart[] = [];
  for (const [list, kept] of [[inputs, false], [compressedInputs, true]] as const) {
    for (const input of list) {
      if (input.type !== 'file') continue;
      const p = input.path.replace(/^\/+/, '');
      const tool = toolOf.get(p);
      const part: MkinitramfsPart['part'] = p === 'init' ? 'init' : p === 'bin/busybox' ? 'busybox' : tool ? 'tools' : moduleFiles.has(p) ? (kept ? 'modules-compressed' : 'modules') : p === MANIFEST_PATH.slice(1) || p.startsWith(`${modRoot}/modules.`) ? 'manifest' : 'other';
      parts.push({ path: p, bytes: input.data.length, part, ...(tool ? { tool } : {}) });
    }
  }
  return {
    image,
    cpio,
    modulesCpio,
    packedLength: packed.length,
    modulesOffset,
    manifest,
    compression,
    files,
    modules: sortedNames.length,
    notes: selection.notes,
    tools,
    defaultTools: chosenDefaults,
    kernelConfig: configFile,
    parts,
    moduleLoading,
    milliseconds: performance.now() - started,
  };
}

/** Builds and writes the image to `output`; returns the result for the summary. */
export function writeInitramfs(output: string, options: MkinitramfsOptions = {}): MkinitramfsResult {
  const result = buildInitramfs(options);
  writeFileSync(output, result.image);
  return result;
}

/** One line for the console: size, files, modules, time. */
export function summary(output: string, r: MkinitramfsResult): string {
  const mib = (n: number) => `${(n / 1048576).toFixed(2)} MiB`;
  // the reason in short: the notes say it in full
  const tools = r.tools.length ? `, with ${r.tools.map((t) => (t in r.defaultTools ? `${t} (by default: ${r.defaultTools[t]!.split(',')[0]})` : t)).join(', ')}` : '';
  const kept = Object.entries(r.moduleLoading).map(([f, how]) => `.ko.${f} kept compressed (${how === 'kernel' ? 'the kernel decompresses them' : `decompressed at boot by ${how}`})`);
  const modules = kept.length ? `, ${kept.join(', ')} in ${mib(r.modulesCpio.length)} appended uncompressed` : '';
  return `${output}: ${mib(r.image.length)} (${r.compression}; ${mib(r.cpio.length + r.modulesCpio.length)} unpacked), ${r.files} files, ${r.modules} modules for kernel ${r.manifest.kernelRelease}${tools}${modules}, ${(r.milliseconds / 1000).toFixed(2)} s`;
}
