/**
 * `vdboot mkinitramfs --hostonly`: the modules this machine needs to reach its disks, its
 * wired network cards (for a root on an NBD server) and mount its filesystems, instead of the
 * universal set. Read from sysfs (each block device's
 * chain of parent devices and the modules of the drivers bound along it) and from the mount
 * table (the filesystems of mounted block devices: the root, /boot, a vdboot host at
 * /run/vdboot/host), plus the filesystem of the `--root` device. Both roots are parameters,
 * so tests point them at a recorded tree.
 */
import { existsSync, readdirSync, readFileSync, realpathSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { moduleKey } from '../src/formats/manifest.ts';
import { resolveName, type KernelModuleIndex } from './kmod.ts';

/** Block devices that are not hardware: their drivers are the universal set's anyway (loop, dm, nbd) or nothing to load. */
const VIRTUAL_BLOCK = /^(loop|ram|zram|dm-|md|nbd)\d/;

export interface HostStorage {
  /** block device → the modules of the drivers bound along its device chain (the disk's own first) */
  devices: Record<string, string[]>;
  /** every module above, once, sorted */
  modules: string[];
}

/**
 * The storage drivers of this machine: for each block device in SYSFS/class/block (not a
 * partition, not a virtual device), its `device` link resolved, then every ancestor up to
 * SYSFS/devices that has a driver bound: the driver's module (its `module` link) when `index`
 * has it as a loadable module, and the modules `index` resolves the device's modalias to, so
 * a driver built into the running kernel but a module in the target one is found too. E.g.
 * sda → sd_mod (the SCSI disk), ahci (its PCI controller).
 */
export function hostStorageModules(index: KernelModuleIndex, sysfs = '/sys'): HostStorage {
  const devices: Record<string, string[]> = {};
  const classDir = path.join(sysfs, 'class', 'block');
  const top = realpathSync(path.join(sysfs, 'devices'));
  for (const dev of existsSync(classDir) ? readdirSync(classDir).sort() : []) {
    if (VIRTUAL_BLOCK.test(dev) || existsSync(path.join(classDir, dev, 'partition'))) continue;
    const link = path.join(classDir, dev, 'device');
    if (!existsSync(link)) continue;
    devices[dev] = driverChain(index, realpathSync(link), top);
  }
  return { devices, modules: [...new Set(Object.values(devices).flat())].sort() };
}

/**
 * The wired network cards of this machine, for a root on an NBD server: for each interface in
 * SYSFS/class/net that is hardware (it has a `device` link; lo, bridges, tunnels and VPNs
 * have none) and not wireless (a `wireless` or `phy80211` entry: a root is not reached
 * through Wi-Fi before its credentials are known), the driver chain as for disks. E.g. eth0 →
 * virtio_net, virtio_pci; enp3s0 → r8169.
 */
export function hostNetworkModules(index: KernelModuleIndex, sysfs = '/sys'): HostStorage {
  const devices: Record<string, string[]> = {};
  const classDir = path.join(sysfs, 'class', 'net');
  const top = realpathSync(path.join(sysfs, 'devices'));
  for (const dev of existsSync(classDir) ? readdirSync(classDir).sort() : []) {
    const iface = path.join(classDir, dev);
    if (existsSync(path.join(iface, 'wireless')) || existsSync(path.join(iface, 'phy80211'))) continue;
    const link = path.join(iface, 'device');
    if (!existsSync(link)) continue;
    devices[dev] = driverChain(index, realpathSync(link), top);
  }
  return { devices, modules: [...new Set(Object.values(devices).flat())].sort() };
}

/**
 * The modules of the drivers bound from `device` up to `top` (SYSFS/devices), innermost
 * first: each driver's module (its `module` link) when `index` has it as a loadable module,
 * and the modules `index` resolves the device's modalias to.
 */
function driverChain(index: KernelModuleIndex, device: string, top: string): string[] {
  const chain: string[] = [];
  for (let dir = device; dir.startsWith(top + path.sep); dir = path.dirname(dir)) {
    if (!existsSync(path.join(dir, 'driver'))) continue;
    const names: string[] = [];
    const driverModule = path.join(dir, 'driver', 'module');
    if (existsSync(driverModule)) names.push(moduleKey(path.basename(realpathSync(driverModule))));
    const alias = path.join(dir, 'modalias');
    if (existsSync(alias)) names.push(...resolveName(index, readFileSync(alias, 'utf8').trim()));
    for (const name of names) if (index.files.has(name) && !chain.includes(name)) chain.push(name);
  }
  return chain;
}

/**
 * The filesystem types of mounted block devices in a mounts file (/proc/self/mounts format):
 * the root, /boot, a vdboot host at /run/vdboot/host, a mounted Windows partition. A
 * `fuseblk` mount (ntfs-3g) counts as ntfs.
 */
export function hostFilesystems(mountsFile = '/proc/self/mounts'): string[] {
  const types = new Set<string>();
  if (!existsSync(mountsFile)) return [];
  for (const line of readFileSync(mountsFile, 'utf8').split('\n')) {
    const [source, , fstype] = line.split(' ');
    if (!source || !fstype || !source.startsWith('/dev/')) continue;
    types.add(fstype === 'fuseblk' || fstype === 'ntfs3' ? 'ntfs' : fstype);
  }
  return [...types].sort();
}

/** The type of the filesystem mounted at / when it is on a block device (not tmpfs, overlay, …). */
export function rootFilesystem(mountsFile = '/proc/self/mounts'): string | undefined {
  if (!existsSync(mountsFile)) return undefined;
  let found: string | undefined;
  for (const line of readFileSync(mountsFile, 'utf8').split('\n')) {
    const [source, target, fstype] = line.split(' ');
    // the last mount on / is the one seen
    if (target === '/' && source && fstype) found = source.startsWith('/dev/') ? fstype : undefined;
  }
  return found;
}

/**
 * The filesystem types `--root SPEC` needs, as this machine sees them (blkid): a device spec
 * (/dev/…, UUID=, LABEL=, PARTUUID=, PARTLABEL=) gives its type; `vdisk:HOST:PATH` gives
 * the host's (the image's own filesystems are those mounted here when vdboot is built from
 * inside the booted image, as `hostFilesystems` reads them). Unknown specs give nothing.
 */
export function rootSpecFilesystems(spec: string, typeOf: (deviceSpec: string) => string | undefined = blkidType): string[] {
  if (spec.startsWith('vdisk:nbd:')) return []; // the image is on a server: no local host filesystem
  const vdisk = /^vdisk:(.+):\//.exec(spec);
  const device = vdisk ? vdisk[1]! : spec.startsWith('vdisk:') ? undefined : spec;
  const type = device ? typeOf(device) : undefined;
  return type ? [type] : [];
}

function blkidType(deviceSpec: string): string | undefined {
  try {
    const args = deviceSpec.startsWith('/dev/') ? ['-o', 'value', '-s', 'TYPE', deviceSpec] : ['-o', 'value', '-s', 'TYPE', '-t', deviceSpec];
    return execFileSync('blkid', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim().split('\n')[0] || undefined;
  } catch {
    return undefined;
  }
}

/**
 * The module of each filesystem type, from the kernel's fs-TYPE aliases; "ntfs" is the
 * kernel's ntfs3 when it has one (else ntfs-3g alone serves it, and it is listed unknown).
 */
export function filesystemModules(index: Pick<KernelModuleIndex, 'files' | 'aliases' | 'builtin'>, types: readonly string[]): { modules: string[]; unknown: string[] } {
  const modules = new Set<string>();
  const unknown: string[] = [];
  for (const t of types) {
    if (index.builtin.has(moduleKey(t))) continue;
    const names = t === 'ntfs' ? ['ntfs3'] : [t];
    const found = index.aliases.filter(([p]) => names.some((n) => p === `fs-${n}`)).map(([, m]) => m).filter((m) => index.files.has(m));
    for (const n of names) if (index.files.has(moduleKey(n))) found.push(moduleKey(n));
    if (found.length) for (const m of found) modules.add(m);
    else unknown.push(t);
  }
  return { modules: [...modules].sort(), unknown };
}

/** KEY_ENTER in `capabilities/key`: what tells a keyboard from a mouse or a power button. */
const KEY_ENTER = 28;

/**
 * The keyboards' drivers, for the rescue shell and a typed passphrase: for each input device
 * in SYSFS/class/input that reports KEY_ENTER, the modules of the drivers bound along its
 * device chain (a USB keyboard: hid_generic, usbhid, its host controller's module; a PS/2
 * one on a kernel with i8042 and atkbd built in: nothing).
 */
export function hostKeyboardModules(index: KernelModuleIndex, sysfs = '/sys'): string[] {
  const classDir = path.join(sysfs, 'class', 'input');
  const top = realpathSync(path.join(sysfs, 'devices'));
  const out = new Set<string>();
  for (const dev of existsSync(classDir) ? readdirSync(classDir).sort() : []) {
    const keys = path.join(classDir, dev, 'capabilities', 'key');
    if (!existsSync(keys) || !hasBit(readFileSync(keys, 'utf8'), KEY_ENTER)) continue;
    for (const m of driverChain(index, realpathSync(path.join(classDir, dev)), top)) out.add(m);
  }
  return [...out].sort();
}

/** A sysfs bitmap (hex words of the kernel's long, most significant first) has `bit` set. */
function hasBit(text: string, bit: number): boolean {
  const words = text.trim().split(/\s+/).reverse();
  const word = words[Math.floor(bit / 64)];
  return word !== undefined && /^[0-9a-f]+$/i.test(word) && ((BigInt(`0x${word}`) >> BigInt(bit % 64)) & 1n) === 1n;
}

/**
 * The device-mapper devices of this machine by kind, from SYSFS/class/block/dm-N/dm/uuid:
 * `crypt` (LUKS, BitLocker: cryptsetup's CRYPT- uuids), `lvm` (LVM-), `vdboot` (images vdboot
 * mapped at boot), `other`.
 */
export function hostDeviceMapper(sysfs = '/sys'): Set<'crypt' | 'lvm' | 'vdboot' | 'other'> {
  const kinds = new Set<'crypt' | 'lvm' | 'vdboot' | 'other'>();
  const classDir = path.join(sysfs, 'class', 'block');
  for (const dev of existsSync(classDir) ? readdirSync(classDir) : []) {
    if (!/^dm-\d+$/.test(dev)) continue;
    const file = path.join(classDir, dev, 'dm', 'uuid');
    const uuid = existsSync(file) ? readFileSync(file, 'utf8').trim() : '';
    kinds.add(uuid.startsWith('CRYPT-') ? 'crypt' : uuid.startsWith('LVM-') ? 'lvm' : /^VDBOOT/i.test(uuid) ? 'vdboot' : 'other');
  }
  return kinds;
}
