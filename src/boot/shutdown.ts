/**
 * Leaving the system safely (DESIGN §4), through systemd's initrd interface:
 *
 * Before switch_root, installShutdown() makes /run/initramfs a small root of its own:
 * `shutdown` (a copy of vdboot's /init, which runs runShutdown() when started under that
 * name), busybox for a shell, /etc/initrd-release and the record of what vdboot created.
 * At power-off systemd-shutdown unmounts what it can, pivots into /run/initramfs with
 * the old root at /oldroot and executes `/shutdown VERB` as PID 1.
 *
 * runShutdown() then moves the host filesystem's mount out of the old root (to /host),
 * unmounts everything left under /oldroot deepest first, takes down the images vdiskload
 * left attached (their records in /run/vdboot/attached), removes vdboot's image dm devices
 * newest first, detaches its loop devices (the loop path reads through the host
 * filesystem), unmounts the host filesystem (NTFS is flushed and marked clean), stops
 * storage daemons that started with "@" in argv[0], removes vdhost, syncs and powers off /
 * reboots / halts.
 *
 * Guests without systemd: run `/run/initramfs/shutdown poweroff` (or reboot, halt) as the
 * last step of the shutdown scripts, after the other processes are stopped and the
 * filesystems other than / are unmounted: it pivots into /run/initramfs itself.
 */
import { isSysError, MS, O, REBOOT, type Sys } from '../sys/sys.ts';
import { ConsoleLog } from './console.ts';
import { DeviceMapper } from './dm.ts';
import { BITLOCKER_DM_PREFIX } from './bitlocker.ts';
import { exists, isDirectory, mkdirs, readFileBytes, readText, readTextOr, writeText } from './fsutil.ts';
import { detachLoop } from './loop.ts';
import { disconnectNbd, HOST_MOUNT, STATE_DIR, STATE_PATH, type VdiskState } from './vdisk-exec.ts';
import { DM_UUID_PREFIX } from './vdisk.ts';
import { ATTACHED_DIR, parseRecord, type AttachedImage } from './attached.ts';
import { clearImmutable } from './vdiskload.ts';
import { RECONNECT_ARGV0 } from './nbd-reconnect.ts';

export const SHUTDOWN_ROOT = '/run/initramfs';
export const OLD_ROOT = '/oldroot';
/** The record of what to take down, inside the shutdown root. */
export const SHUTDOWN_STATE = '/etc/vdboot/state.json';
/** Where the host filesystem's mount is moved inside the shutdown root. */
export const HOST_AT_SHUTDOWN = '/host';
const MNT_DETACH = 2;
const SIGTERM = 15;
const WNOHANG = 1;

function copyFile(sys: Sys, from: string, to: string, mode: number): void {
  const bytes = readFileBytes(sys, from, 256 << 20);
  const fd = sys.open(to, O.WRONLY | O.CREAT | O.TRUNC | O.CLOEXEC, mode);
  try {
    let off = 0;
    while (off < bytes.length) off += sys.pwrite(fd, bytes.subarray(off), off);
  } finally {
    sys.close(fd);
  }
  sys.chmod(to, mode);
}

/**
 * Prepares /run/initramfs when vdboot created devices the booted system cannot take
 * down itself (the record at /run/vdboot/state.json exists). Best-effort: a failure is
 * a warning, since the system can still boot, and says what will not be clean.
 */
export function installShutdown(sys: Sys, log: ConsoleLog, busybox: string | undefined, self = '/init'): boolean {
  let record: string | undefined = readTextOr(sys, STATE_PATH);
  if (record === undefined) {
    const found = recoverState(sys);
    if (!found.dm.length && !found.loops.length && !found.hostMount && !found.unlocked) return false;
    record = `${JSON.stringify(found)}\n`;
  }
  try {
    for (const d of ['bin', 'etc/vdboot', 'proc', 'sys', 'dev', 'run', 'tmp', OLD_ROOT.slice(1), HOST_AT_SHUTDOWN.slice(1)]) mkdirs(sys, `${SHUTDOWN_ROOT}/${d}`);
    copyFile(sys, self, `${SHUTDOWN_ROOT}/shutdown`, 0o755);
    // The same binary attaches more images in the booted system (main.ts chooses by name).
    try { sys.symlink('shutdown', `${SHUTDOWN_ROOT}/vdiskload`); } catch (e) { if (!isSysError(e, 'EEXIST')) throw e; }
    if (busybox && exists(sys, busybox)) {
      copyFile(sys, busybox, `${SHUTDOWN_ROOT}/bin/busybox`, 0o755);
      try { sys.symlink('busybox', `${SHUTDOWN_ROOT}/bin/sh`); } catch (e) { if (!isSysError(e, 'EEXIST')) throw e; }
    }
    writeText(sys, `${SHUTDOWN_ROOT}/etc/initrd-release`, 'NAME=vdboot\nID=vdboot\nPRETTY_NAME="vdboot shutdown hand-off"\n');
    writeText(sys, `${SHUTDOWN_ROOT}${SHUTDOWN_STATE}`, record);
    log.info(`shutdown hand-off ready in ${SHUTDOWN_ROOT} (systemd runs it at power-off; other inits: "${SHUTDOWN_ROOT}/shutdown poweroff" last)`);
    return true;
  } catch (e) {
    log.warn(`could not prepare ${SHUTDOWN_ROOT}/shutdown (${(e as Error).message}): at power-off the image devices are not taken down by vdboot; the host filesystem may be left mounted`);
    return false;
  }
}

/** The reboot(2) command for systemd's shutdown verb. */
export function rebootCommand(verb: string | undefined): number {
  switch (verb) {
    case 'reboot':
    case 'kexec': return REBOOT.RESTART;
    case 'halt': return REBOOT.HALT;
    default: return REBOOT.POWER_OFF;
  }
}

/** Mount points under `base` from a /proc/self/mounts text, deepest first. */
export function mountsUnder(mountsText: string, base: string): string[] {
  const out: string[] = [];
  for (const line of mountsText.split('\n')) {
    const f = line.split(' ');
    if (f.length < 2) continue;
    // /proc/mounts escapes space, tab, newline and backslash as octal
    const mp = f[1]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (mp === base || mp.startsWith(`${base}/`)) out.push(mp);
  }
  return [...new Set(out)].sort((a, b) => b.split('/').length - a.split('/').length || b.length - a.length);
}

function readState(sys: Sys, log: ConsoleLog, recovered?: VdiskState): VdiskState {
  // In the shutdown root, then the old root's record, then the initramfs's own (a failed boot).
  for (const p of [SHUTDOWN_STATE, `${OLD_ROOT}${STATE_PATH}`, STATE_PATH]) {
    try {
      const s = JSON.parse(readText(sys, p)) as VdiskState;
      if (Array.isArray(s.dm) && Array.isArray(s.loops)) {
        return { dm: s.dm, loops: s.loops, nbds: Array.isArray(s.nbds) ? s.nbds : [], daemons: Array.isArray(s.daemons) ? s.daemons : [], ...(s.hostMount ? { hostMount: s.hostMount } : {}), ...(Array.isArray(s.unlocked) && s.unlocked.length ? { unlocked: s.unlocked.filter((n: unknown) => typeof n === 'string') } : {}) };
      }
    } catch { /* try the next */ }
  }
  const found = recovered ?? recoverState(sys);
  if (found.dm.length || found.loops.length || found.hostMount) {
    log.warn(`no record of the devices vdboot created; found by their names instead: ${[...found.dm, ...found.loops, ...(found.hostMount ? [found.hostMount] : [])].join(', ')}`);
  } else {
    log.warn('no record of the devices vdboot created, and none found by name; only unmounting');
  }
  return found;
}

/**
 * What vdboot set up, read back from the kernel when its record (/run/vdboot/state.json)
 * could not be written or read: device-mapper devices whose dm uuid begins with VDBOOT-
 * (in the order they were made: vdhost, snapshot bases, whole disks, then partitions),
 * loop devices whose backing file lies under /run/vdboot (an image through the host
 * mount, a snapshot's RAM store), the host mount, and unlocked BitLocker hosts (bitlk-GUID).
 */
export function recoverState(sys: Sys): VdiskState {
  const dm: { name: string; minor: number; rank: number }[] = [];
  const unlocked: string[] = [];
  const loops: string[] = [];
  let entries: string[] = [];
  try { entries = sys.readdir('/sys/class/block'); } catch { /* no sysfs */ }
  // LUKS volumes and LVs vdboot opened on an image's devices: found by what they sit on
  // (sysfs "slaves"), removed before those (a higher rank goes first).
  const onVdboot = (e: string, depth: number): boolean => {
    if (depth > 4) return false;
    let slaves: string[] = [];
    try { slaves = sys.readdir(`/sys/class/block/${e}/slaves`); } catch { return false; }
    return slaves.some((s) => (readTextOr(sys, `/sys/class/block/${s}/dm/uuid`) ?? '').startsWith(DM_UUID_PREFIX) || onVdboot(s, depth + 1));
  };
  for (const e of entries) {
    const dmMinor = /^dm-(\d+)$/.exec(e);
    if (dmMinor) {
      const uuid = (readTextOr(sys, `/sys/class/block/${e}/dm/uuid`) ?? '').trim();
      const name = (readTextOr(sys, `/sys/class/block/${e}/dm/name`) ?? '').trim();
      if (!name) continue;
      // cryptsetup names its dm uuids CRYPT-BITLK-…; vdboot's BitLocker hosts are bitlk-GUID
      if (uuid.startsWith('CRYPT-BITLK-') && name.startsWith(BITLOCKER_DM_PREFIX)) {
        unlocked.push(name);
        continue;
      }
      if (!uuid.startsWith(DM_UUID_PREFIX)) {
        if ((uuid.startsWith('CRYPT-') || uuid.startsWith('LVM-')) && onVdboot(e, 0)) dm.push({ name, minor: Number(dmMinor[1]), rank: uuid.startsWith('CRYPT-') ? 4 : 5 });
        continue;
      }
      const rank = name === 'vdhost' ? 0 : name.endsWith('-base') ? 1 : /-part\d+$/.test(uuid) ? 3 : 2;
      dm.push({ name, minor: Number(dmMinor[1]), rank });
    } else if (/^loop\d+$/.test(e)) {
      const backing = (readTextOr(sys, `/sys/class/block/${e}/loop/backing_file`) ?? '').trim();
      if (backing.includes(`${STATE_DIR}/`)) loops.push(`/dev/${e}`);
    }
  }
  dm.sort((a, b) => a.rank - b.rank || a.minor - b.minor);
  loops.sort((a, b) => Number(a.slice(9)) - Number(b.slice(9)));
  const mounts = readTextOr(sys, '/proc/self/mounts') ?? '';
  const hostMounted = mounts.split('\n').some((l) => {
    const mp = l.split(' ')[1];
    return mp === HOST_MOUNT || mp === `${OLD_ROOT}${HOST_MOUNT}`;
  });
  // nbd devices are left out: nothing tells vdboot's from one the user connected; the
  // hand-off stops vdboot's qemu-nbd (argv[0] "@qemu-nbd") anyway, which ends its device.
  return { dm: dm.map((d) => d.name), loops, nbds: [], daemons: [], ...(hostMounted ? { hostMount: HOST_MOUNT } : {}), ...(unlocked.length ? { unlocked } : {}) };
}

/** Not started by systemd's hand-off: pivot into /run/initramfs ourselves, the old root at /oldroot. */
function pivotIntoShutdownRoot(sys: Sys, log: ConsoleLog): void {
  sys.mount(SHUTDOWN_ROOT, SHUTDOWN_ROOT, '', MS.BIND, '');
  sys.chdir(SHUTDOWN_ROOT);
  mkdirs(sys, `${SHUTDOWN_ROOT}${OLD_ROOT}`);
  sys.pivotRoot('.', OLD_ROOT.slice(1));
  sys.chroot('.');
  sys.chdir('/');
  log.info(`entered ${SHUTDOWN_ROOT}; the system's root is at ${OLD_ROOT}`);
}

/**
 * Unmounts `mounts` (deepest first), retrying those that are busy once the others are
 * gone; what stays busy is remounted read-only (so its data is on disk) and detached.
 */
function unmountAll(sys: Sys, log: ConsoleLog, mounts: string[]): void {
  let todo = mounts;
  for (let round = 0; round < 3 && todo.length; round++) {
    const busy: string[] = [];
    for (const m of todo) {
      try {
        sys.umount2(m, 0);
        log.info(`unmounted ${m}`);
      } catch (e) {
        if (isSysError(e, 'EINVAL') || isSysError(e, 'ENOENT')) continue; // not a mount (any more)
        busy.push(m);
      }
    }
    todo = busy;
  }
  // The old /run holds this shutdown root (/run/initramfs), and a storage daemon keeps
  // /dev/fuse open on the old /dev: those hold no data and can only be detached. Once they
  // are, the mounts that were busy only because of them unmount normally.
  const holdsUs = todo.filter((m) => `${OLD_ROOT}${SHUTDOWN_ROOT}`.startsWith(`${m}/`)).sort((a, b) => b.length - a.length).slice(0, 1);
  // The host filesystem (under /run/vdboot) holds data: it is never only detached.
  const api = todo.filter((m) => holdsUs.includes(m) || (/^\/oldroot\/(dev|proc|sys|run)(\/|$)/.test(m) && !m.startsWith(`${OLD_ROOT}/run/vdboot/`)));
  for (const m of api) {
    try {
      sys.umount2(m, MNT_DETACH);
      log.info(`detached ${m}${holdsUs.includes(m) ? ' (it holds this shutdown root)' : ' (still in use; it holds no data)'}`);
    } catch (e) {
      if (!isSysError(e, 'EINVAL')) log.warn(`could not detach ${m}: ${(e as Error).message}`);
    }
  }
  todo = todo.filter((m) => !api.includes(m));
  todo = todo.filter((m) => {
    try {
      sys.umount2(m, 0);
      log.info(`unmounted ${m}`);
      return false;
    } catch (e) {
      return !(isSysError(e, 'EINVAL') || isSysError(e, 'ENOENT'));
    }
  });
  for (const m of todo) {
    try { sys.mount('', m, '', MS.REMOUNT | MS.RDONLY, ''); } catch { /* best effort */ }
    try {
      sys.umount2(m, MNT_DETACH);
      log.warn(`${m} was busy: remounted read-only and detached`);
    } catch (e) {
      log.warn(`could not unmount ${m}: ${(e as Error).message}`);
    }
  }
}

/**
 * Storage daemons left running: processes whose argv[0] begins with "@" (the mark that
 * spares them from systemd's final kill), found in /proc, plus the ones vdboot recorded.
 */
export function storageDaemons(sys: Sys, recorded: readonly number[], only?: RegExp): number[] {
  const out = new Set<number>();
  const self = sys.getpid();
  let names: string[] = [];
  try { names = sys.readdir('/proc'); } catch { /* no /proc */ }
  for (const n of names) {
    if (!/^\d+$/.test(n) || Number(n) === self || n === '1') continue;
    let argv0: string;
    try {
      const bytes = readFileBytes(sys, `/proc/${n}/cmdline`, 4096);
      const end = bytes.indexOf(0);
      argv0 = String.fromCharCode(...bytes.subarray(0, end < 0 ? bytes.length : end));
    } catch {
      continue;
    }
    if (argv0.startsWith('@') && (!only || only.test(argv0))) out.add(Number(n));
  }
  if (!only) for (const p of recorded) if (exists(sys, `/proc/${p}`)) out.add(p);
  return [...out];
}

/** Waits up to `ms` for the storage daemons to exit after SIGTERM (they flush on exit). */
function stopDaemons(sys: Sys, log: ConsoleLog, pids: number[], ms = 10_000, said = false): void {
  if (!said) log.info(`stopping storage daemon${pids.length === 1 ? '' : 's'} ${pids.join(', ')}`);
  const left = new Set(pids);
  for (const pid of pids) {
    try { sys.kill(pid, SIGTERM); } catch { left.delete(pid); }
  }
  const deadline = sys.monotonicMs() + ms;
  while (left.size && sys.monotonicMs() < deadline) {
    for (const pid of [...left]) {
      try {
        if (sys.waitpid(pid, WNOHANG).pid === pid) left.delete(pid);
      } catch {
        // not our child: it is gone when /proc no longer lists it
        if (!exists(sys, `/proc/${pid}`)) left.delete(pid);
      }
    }
    if (left.size) sys.sleepMs(100);
  }
  if (left.size) log.warn(`storage daemon(s) ${[...left].join(', ')} did not exit within ${ms / 1000} s`);
}

/**
 * Stops the network images' reconnect daemon (argv[0] "@vdboot-nbd") before their nbd
 * devices are disconnected: the root is unmounted by then (while it was, a lost server
 * was still reconnected), and nothing may hand the kernel a new socket any more.
 */
function stopReconnectDaemon(sys: Sys, log: ConsoleLog): void {
  const pids = storageDaemons(sys, [], new RegExp(`^${RECONNECT_ARGV0}$`));
  if (!pids.length) return;
  log.info(`stopping the NBD reconnect daemon (${pids.join(', ')})`);
  stopDaemons(sys, log, pids, 5000, true);
}

/** Removes dm devices newest first; devices systemd-shutdown already removed are fine. */
function removeDevices(sys: Sys, log: ConsoleLog, names: string[]): void {
  const dm = new DeviceMapper(sys);
  try {
    for (const name of [...names].reverse()) {
      try {
        dm.remove(name);
        log.info(`removed /dev/mapper/${name}`);
      } catch (e) {
        if (isSysError(e, 'ENXIO') || isSysError(e, 'ENODEV')) continue;
        log.warn(`could not remove /dev/mapper/${name}: ${(e as Error).message}`);
      }
    }
  } finally {
    dm.close();
  }
}

function detachLoops(sys: Sys, log: ConsoleLog, loops: string[]): void {
  for (const loop of [...loops].reverse()) {
    try {
      detachLoop(sys, loop);
      log.info(`detached ${loop}`);
    } catch (e) {
      if (!isSysError(e, 'ENXIO') && !isSysError(e, 'ENOENT')) log.warn(`could not detach ${loop}: ${(e as Error).message}`);
    }
  }
}

/** Images vdiskload attached and left attached: their records in the old root's /run, read before it is unmounted. */
function leftAttached(sys: Sys): AttachedImage[] {
  const dir = `${OLD_ROOT}${ATTACHED_DIR}`;
  let names: string[] = [];
  try { names = sys.readdir(dir); } catch { return []; }
  return names.filter((n) => n.endsWith('.json')).flatMap((n) => {
    const r = parseRecord(readTextOr(sys, `${dir}/${n}`) ?? '');
    return r && r.by === 'vdiskload' ? [r] : [];
  });
}

/**
 * An image vdiskload left attached, taken down like `vdiskload -d` once the old root's
 * mounts are gone: its dm devices, nbd, loops, then the immutable flag of the files it
 * held still (they lie on the host mount, moved to /host here).
 */
function takeDownAttached(sys: Sys, log: ConsoleLog, r: AttachedImage, host: string | undefined): void {
  removeDevices(sys, log, r.devices);
  if (r.nbd) {
    try { disconnectNbd(sys, r.nbd); } catch (e) { log.warn(`could not disconnect ${r.nbd}: ${(e as Error).message}`); }
  }
  detachLoops(sys, log, r.loops);
  for (const f of r.immutable ?? []) {
    const at = host && f.startsWith(`${HOST_MOUNT}/`) ? `${host}${f.slice(HOST_MOUNT.length)}` : undefined;
    try {
      if (!at) throw new Error('its filesystem is not mounted here any more');
      clearImmutable(sys, at);
      log.info(`cleared the immutable flag vdiskload set on ${f}`);
    } catch (e) {
      log.warn(`could not clear the immutable flag vdiskload set on ${f} (${(e as Error).message}): run "chattr -i ${f}" after the next boot`);
    }
  }
}

/**
 * Takes down what vdboot set up, from where we stand: `unmount` first (the root at /root
 * when the init gives up), then the image's dm devices, nbd, loops, the host filesystem
 * and vdhost, users before what they use. Best effort per step; never throws.
 */
export function takeDownInPlace(sys: Sys, log: ConsoleLog, unmount: string[]): void {
  try {
    // nothing was set up (no image, no host mount) unless the kernel shows vdboot's devices
    let found: VdiskState | undefined;
    if (!exists(sys, STATE_PATH)) {
      found = recoverState(sys);
      if (!found.dm.length && !found.loops.length && !found.hostMount && !found.unlocked) return;
    }
    const state = readState(sys, log, found);
    if (unmount.length) unmountAll(sys, log, unmount.filter((m) => exists(sys, m)));
    removeDevices(sys, log, state.dm.filter((n) => n !== 'vdhost'));
    stopReconnectDaemon(sys, log);
    for (const nbd of state.nbds ?? []) {
      try { disconnectNbd(sys, nbd); } catch (e) { log.warn(`could not disconnect ${nbd}: ${(e as Error).message}`); }
    }
    const servers = storageDaemons(sys, [], /^@qemu-nbd/);
    if (servers.length) stopDaemons(sys, log, servers);
    detachLoops(sys, log, state.loops);
    if (state.hostMount) unmountAll(sys, log, [state.hostMount]);
    const daemons = storageDaemons(sys, state.daemons);
    if (daemons.length) stopDaemons(sys, log, daemons);
    if (state.dm.includes('vdhost')) removeDevices(sys, log, ['vdhost']);
    if (state.unlocked?.length) removeDevices(sys, log, state.unlocked);
  } catch (e) {
    log.warn(`taking down the image devices: ${(e as Error).message}`);
  }
}

/**
 * The fallback when the pivot failed: remount the root read-only, then take down the
 * host and the devices in place. The sync and the power-off always happen.
 */
function shutdownInPlace(sys: Sys, log: ConsoleLog, verb: string | undefined): never {
  try {
    sys.mount('', '/', '', MS.REMOUNT | MS.RDONLY, '');
    log.info('remounted / read-only');
  } catch (e) {
    log.warn(`could not remount / read-only: ${(e as Error).message}`);
  }
  takeDownInPlace(sys, log, []);
  sys.sync();
  log.info(verb === 'reboot' || verb === 'kexec' ? 'rebooting' : verb === 'halt' ? 'halting' : 'powering off');
  return sys.reboot(rebootCommand(verb));
}

/** /shutdown VERB: take down what vdboot set up, then power off, reboot or halt. Never returns. */
export function runShutdown(sys: Sys, args: string[]): never {
  const log = new ConsoleLog(sys);
  const verb = args[0];
  try {
    log.info(`shutdown hand-off (${verb ?? 'poweroff'})`);
    const pivoted = isDirectory(sys, OLD_ROOT) && (() => { try { return sys.readdir(OLD_ROOT).length > 0; } catch { return false; } })();
    if (!pivoted) {
      try {
        pivotIntoShutdownRoot(sys, log);
      } catch (e) {
        // Without the pivot the guest's root cannot be unmounted: make it read-only and
        // take down what can be taken down from here. Never skip the host's unmount.
        log.warn(`could not move into the shutdown root (${(e as Error).message}); taking things down in place`);
        return shutdownInPlace(sys, log, verb);
      }
    }
    for (const [src, target, type] of [['proc', '/proc', 'proc'], ['sysfs', '/sys', 'sysfs'], ['devtmpfs', '/dev', 'devtmpfs']] as const) {
      try {
        mkdirs(sys, target);
        sys.mount(src, target, type, MS.NOSUID, '');
      } catch { /* already there */ }
    }
    const state = readState(sys, log);
    // The host filesystem outlives the root: with the loop path the root's blocks are read
    // through it. Its mount moves out of the old root, whose /run is only detached.
    let host: string | undefined;
    if (state.hostMount) {
      try { sys.mount('', '/', '', MS.REC | MS.PRIVATE, ''); } catch { /* already private */ }
      try {
        sys.mount(`${OLD_ROOT}${state.hostMount}`, HOST_AT_SHUTDOWN, '', MS.MOVE, '');
        host = HOST_AT_SHUTDOWN;
      } catch (e) {
        if (!isSysError(e, 'EINVAL') && !isSysError(e, 'ENOENT')) log.warn(`could not move the host filesystem out of ${OLD_ROOT} (${(e as Error).message}); unmounting it in place`);
      }
    }
    const attached = leftAttached(sys);
    const known = [
      ...(state.hostMount && !host ? [`${OLD_ROOT}${state.hostMount}`] : []),
      `${OLD_ROOT}/run`, `${OLD_ROOT}/dev/pts`, `${OLD_ROOT}/dev`, `${OLD_ROOT}/proc`, `${OLD_ROOT}/sys`, OLD_ROOT,
    ];
    const listed = mountsUnder(readTextOr(sys, '/proc/self/mounts') ?? '', OLD_ROOT);
    unmountAll(sys, log, listed.length ? listed : known);
    for (const r of attached) takeDownAttached(sys, log, r, host);
    removeDevices(sys, log, state.dm.filter((n) => n !== 'vdhost'));
    detachLoops(sys, log, state.loops);
    stopReconnectDaemon(sys, log);
    for (const nbd of state.nbds ?? []) {
      try {
        disconnectNbd(sys, nbd);
        log.info(`disconnected ${nbd}`);
      } catch (e) {
        log.warn(`could not disconnect ${nbd}: ${(e as Error).message}`);
      }
    }
    // qemu-nbd flushes the image and exits; it holds the image open on the host until then.
    const servers = storageDaemons(sys, [], /^@qemu-nbd/);
    if (servers.length) stopDaemons(sys, log, servers);
    if (host) unmountAll(sys, log, [host]);
    const daemons = storageDaemons(sys, state.daemons);
    if (daemons.length) stopDaemons(sys, log, daemons);
    if (state.dm.includes('vdhost')) removeDevices(sys, log, ['vdhost']);
    // Last: the BitLocker host under everything above (removing it drops its key from the kernel).
    if (state.unlocked?.length) removeDevices(sys, log, state.unlocked);
  } catch (e) {
    log.error(`the shutdown hand-off failed: ${(e as Error).message}; syncing and going on`);
  }
  sys.sync();
  log.info(verb === 'reboot' || verb === 'kexec' ? 'rebooting' : verb === 'halt' ? 'halting' : 'powering off');
  return sys.reboot(rebootCommand(verb));
}
