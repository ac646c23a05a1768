/**
 * LVs vdboot does not map itself (thin, cache, raid, mirror, snapshot) activated by LVM's own
 * program, when the initramfs has it (`vdboot mkinitramfs --with lvm`): `lvm lvchange -ay
 * VG/LV` with a configuration given on its command line that lets it see only the PVs of
 * that VG, never scan or touch another disk, and write nothing: no metadata backup or
 * archive, no hints file, no udev (libdevmapper makes the /dev/mapper nodes itself).
 *
 * What lvm writes is what activation writes: device-mapper tables, and for a thin pool or a
 * cache the checks thin_check/cache_check run before it (read-only). The VG's metadata is
 * not changed by activation.
 */
import { LVM_MODULE_NAMES, lvDmName, lvDmUuid, type AssembledVg, type LogicalVolume } from '../formats/lvm.ts';
import { findModule } from '../formats/manifest.ts';
import { utf8Decode } from '../formats/text.ts';
import { MFD } from '../sys/sys.ts';
import type { InitContext } from './context.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import { exists, mkdirs } from './fsutil.ts';
import { mountToolImage } from './tool-images.ts';

export interface LvmProgramResult {
  ok: boolean;
  exitCode: number;
  /** what lvm printed, trimmed (at most 4 KiB of its first 16) */
  message: string;
  /** the device-mapper name of the LV, /dev/mapper/NAME */
  dmName: string;
  dmUuid: string;
}

const LOCK_DIR = '/run/lock/lvm';

/** A device path as an anchored regular expression for lvm's device filter. */
function filterEntry(path: string): string {
  return `"a|^${path.replace(/[\\^$.*+?()[\]{}|"]/g, '\\$&')}$|"`;
}

/**
 * The configuration lvm runs with: only the PV devices of this VG are read; no udev, no
 * hints, no backups, no monitoring (dmeventd is not in the initramfs).
 */
export function lvmProgramConfig(pvPaths: readonly string[]): string {
  const accept = [...pvPaths.map(filterEntry), '"r|.*|"'].join(', ');
  return [
    `devices { filter = [ ${accept} ] global_filter = [ ${accept} ] obtain_device_list_from_udev = 0 external_device_info_source = "none" use_devicesfile = 0 scan_lvs = 0 hints = "none" }`,
    'activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }',
    `global { locking_dir = "${LOCK_DIR}" use_lvmlockd = 0 }`,
    'backup { backup = 0 archive = 0 }',
  ].join(' ');
}

/**
 * Runs `lvm lvchange -ay VG/LV` for one LV whose VG has all its PVs present (`pvDevices`).
 * The kernel modules such LVs need are loaded first (those the initramfs has).
 */
export function activateWithLvmProgram(ctx: InitContext, tool: string, a: AssembledVg, lv: LogicalVolume, pvDevices: readonly BlockDeviceInfo[]): LvmProgramResult {
  const { sys } = ctx;
  const present = ['dm_mod', ...LVM_MODULE_NAMES].filter((m) => findModule(ctx.manifest, m));
  ctx.modules.reportFailures(ctx.modules.load(present));
  mountToolImage(ctx, 'lvm');
  mkdirs(sys, LOCK_DIR);
  const argv = ['lvm', 'lvchange', '-ay', '--config', lvmProgramConfig(pvDevices.map((d) => d.path)), `${a.vg.name}/${lv.name}`];
  const env = ['DM_DISABLE_UDEV=1', 'LVM_SUPPRESS_FD_WARNINGS=1', 'LC_ALL=C', 'PATH=/usr/sbin:/usr/bin:/sbin:/bin'];
  const outFd = sys.memfdCreate('vdboot-lvm', MFD.CLOEXEC);
  let exitCode: number;
  let message: string;
  try {
    const nullFd = sys.open('/dev/null', 0);
    try {
      const pid = sys.spawn(tool, argv, env, { stdio: [nullFd, outFd, outFd] });
      let r = sys.waitpid(pid, 0);
      while (r.pid !== pid) r = sys.waitpid(pid, 0);
      exitCode = r.termSignal ? 128 + r.termSignal : r.exitCode;
    } finally {
      sys.close(nullFd);
    }
    const out = new Uint8Array(16384);
    let n = 0;
    try { n = sys.pread(outFd, out, 0); } catch { n = 0; }
    message = utf8Decode(out.subarray(0, Math.max(0, n))).trim().slice(-4096);
  } finally {
    sys.close(outFd);
  }
  const dmName = lvDmName(a.vg.name, lv.name);
  const ok = exitCode === 0 && exists(sys, `/dev/mapper/${dmName}`);
  return { ok, exitCode, message: ok || exitCode !== 0 ? message : `${message}${message ? '; ' : ''}lvm ended well but made no /dev/mapper/${dmName}`, dmName, dmUuid: lvDmUuid(a.vg.uuid, lv.uuid) };
}
