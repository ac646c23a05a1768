/**
 * The udev database entries of the device-mapper devices vdboot made, written to
 * /run/udev/data before switch_root (/run moves into the new root with its content).
 *
 * Why: the booted system's udev, at coldplug, handles a dm device's "add" event only when its
 * database says the device was activated through libdevmapper's udev protocol
 * (DM_UDEV_PRIMARY_SOURCE_FLAG=1, lvm2's 10-dm/55-dm.rules); otherwise it marks the device
 * "disabled" (no /dev/disk/by-uuid links, SYSTEMD_READY=0), so systemd waits in vain for the
 * devices its crypttab and fstab name (luks-UUID, /dev/mapper/VG-LV) and the boot stalls for
 * 90 s per device. An initramfs that runs udev leaves these entries behind; vdboot has no
 * udev, so it writes the flags udev would have recorded. An entry udev already has is left
 * alone, and a failure only costs the booted system's coldplug of that device: warned, never
 * fatal.
 */
import { isSysError, O, type Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import { mkdirs, readTextOr } from './fsutil.ts';
import { utf8Encode } from '../formats/text.ts';

export const UDEV_DATA = '/run/udev/data';

/** What libdevmapper's udev rules record for a device activated through them. */
export function dmUdevEntry(): string {
  return ['E:DM_UDEV_PRIMARY_SOURCE_FLAG=1', 'E:DM_UDEV_RULES_VSN=2', 'E:DM_ACTIVATION=1', ''].join('\n');
}

/** Writes the entry of every dm device present; returns how many were written. */
export function recordDmDevicesForUdev(sys: Sys, log: ConsoleLog): number {
  let names: string[];
  try {
    names = sys.readdir('/sys/class/block').filter((n) => n.startsWith('dm-'));
  } catch {
    return 0;
  }
  if (!names.length) return 0;
  let written = 0;
  try {
    mkdirs(sys, UDEV_DATA);
  } catch (e) {
    log.warn(`could not make ${UDEV_DATA} (${(e as Error).message}): the booted system's udev may not take vdboot's device-mapper devices for its own`);
    return 0;
  }
  for (const name of names) {
    const dev = readTextOr(sys, `/sys/class/block/${name}/dev`)?.trim();
    if (!dev || !/^\d+:\d+$/.test(dev)) continue;
    const path = `${UDEV_DATA}/b${dev}`;
    let fd: number;
    try {
      // O_EXCL: an entry udev wrote itself stays as it is
      fd = sys.open(path, O.WRONLY | O.CREAT | O.EXCL | O.CLOEXEC, 0o644);
    } catch (e) {
      if (!isSysError(e, 'EEXIST')) log.warn(`could not write ${path} for /dev/${name} (${(e as Error).message})`);
      continue;
    }
    try {
      sys.write(fd, utf8Encode(dmUdevEntry()));
      written++;
    } finally {
      sys.close(fd);
    }
  }
  log.debug(`udev database entries written for ${written} device-mapper devices`);
  return written;
}
