/**
 * root=vdisk: at boot: find the host partition and the image (waiting for devices like
 * the root wait does), plan every image completely (vdisk.ts), and only then put the
 * plan on the kernel: loop devices, the snapshot's RAM store, device-mapper devices,
 * the host filesystem at /run/vdboot/host. What was created is recorded in
 * /run/vdboot/state.json for the shutdown hand-off (shutdown.ts).
 */
import { isFormatError, type FormatError } from '../formats/block-reader.ts';
import { isSysError, MS, O, type Sys } from '../sys/sys.ts';
import { openBlockReader, writeSynced } from './blockdev.ts';
import { describeDevices, humanSize } from './devices.ts';
import { DeviceMapper, type DmTarget } from './dm.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import { mkdirs, readText, readTextOr, writeText } from './fsutil.ts';
import { dropDeviceCache, expandInPlace, type ExpandTarget, type InPlaceResult } from './expand.ts';
import { layoutReader, verifyFill } from '../formats/expand/fill.ts';
import { isExpansionNeeded, type ExpansionNeeded } from './expand-plan.ts';
import { kernelImageHost } from './fiemap.ts';
import { describeHost, findImage, imageHostFor, isKernelHost, type FoundImage, type HostDevice } from './hostdev.ts';
import { isBitLockerHost, unlockBitLocker } from './bitlocker.ts';
import { readyBtrfsHost } from './btrfs.ts';
import { BootFailure, type InitContext } from './context.ts';
import { waitForDevice, waitForUevents } from './devwait.ts';
import { mountDevice } from './mount-device.ts';
import { attachLoop, detachLoop } from './loop.ts';
import { describeVdiskPlan, DM_UUID_PREFIX, formatName, planVdisk, type DmDevicePlan, type HeaderUpdate, type VdiskPlan } from './vdisk.ts';
import type { ImageHost, ImageRequest } from './image-host.ts';
import { imageRecord, type AttachedImage } from './attached.ts';
import { NbdImageHost, type ConnectedNbd } from './nbd-client.ts';
import { reconnectArgv } from './nbd-reconnect.ts';
import { NBD_RECONNECT_DEFAULT_S } from './plan.ts';
import { formatNbdUrl, type NbdUrl } from '../formats/nbd.ts';
import { createOverlay, describeOverlay, overlayFullWarning, planOverlay, type OverlayPlan } from './overlay.ts';

export const HOST_MOUNT = '/run/vdboot/host';
export const STATE_DIR = '/run/vdboot';
export const STATE_PATH = '/run/vdboot/state.json';

/** What vdboot put on the kernel, for the shutdown hand-off to take down in reverse. */
export interface VdiskState {
  /** dm device names in creation order */
  dm: string[];
  /** loop devices in attach order */
  loops: string[];
  /** nbd devices qemu-nbd serves images on */
  nbds?: string[];
  /** the host filesystem's mountpoint (in the booted system), if mounted */
  hostMount?: string;
  /** pids of storage daemons (ntfs-3g) started with "@" in argv[0] */
  daemons: number[];
  /** what each image is, for vdiskload -l and -d in the booted system */
  images?: AttachedImage[];
  /** dm names of BitLocker host partitions cryptsetup unlocked: closed after the host and vdhost */
  unlocked?: string[];
}

/** dm-linear over the whole host partition: the host filesystem is mounted through it while a direct mapping holds the partition. */
export function vdhostPlan(host: BlockDeviceInfo, readOnly = true): DmDevicePlan {
  return { name: 'vdhost', uuid: `${DM_UUID_PREFIX}vdhost`, readOnly, targets: [{ start: 0, length: Math.floor(host.size / 512), type: 'linear', params: `${host.path} 0` }] };
}

/** The kernel's block devices as the planner reads them. */
function hostDevices(ctx: InitContext, devices: BlockDeviceInfo[]): HostDevice[] {
  return devices.map((info) => ({ info, open: () => openBlockReader(ctx.sys, info.path, info.size) }));
}

/**
 * Waits for the host of `path`: the device matching `spec`, or any partition holding
 * the file when there is no spec (devices that appear later are searched too).
 */
function waitForImage(ctx: InitContext, spec: DeviceSpec | undefined, path: string, what: string): FoundImage {
  if (spec) {
    const dev = waitForDevice(ctx, spec, `host partition of ${what}`);
    return findImage(hostDevices(ctx, [dev]), spec, path);
  }
  const { sys, log, plan } = ctx;
  const start = sys.monotonicMs();
  const deadline = plan.rootWait ? Infinity : start + plan.timeoutSec * 1000;
  for (;;) {
    const devices = ctx.devices.scan();
    try {
      const found = findImage(hostDevices(ctx, devices), undefined, path);
      log.info(`found ${path} on ${found.host.device.path} after ${((sys.monotonicMs() - start) / 1000).toFixed(2)} s`);
      return found;
    } catch (e) {
      if (!isFormatError(e)) throw e;
      if (sys.monotonicMs() >= deadline) {
        throw new BootFailure(`${(e as Error).message}\nWaited ${plan.timeoutSec} s for devices (rd.timeout=SECONDS or rootwait waits longer). Block devices seen:\n${describeDevices(devices)}`);
      }
    }
    waitForUevents(ctx, Math.min(500, deadline - sys.monotonicMs()));
  }
}

/**
 * The host of `path`: a device vdboot reads itself with the image found on it, or a
 * device holding a filesystem only the kernel reads (the caller mounts it to look).
 */
function locateImage(ctx: InitContext, spec: DeviceSpec | undefined, path: string, what: string, unlocked: Map<string, BlockDeviceInfo>, onUnlocked: (dmName: string) => void): { found?: FoundImage; kernel?: BlockDeviceInfo } {
  if (!spec) return { found: waitForImage(ctx, spec, path, what) };
  let dev = waitForDevice(ctx, spec, `host partition of ${what}`);
  let hostSpec = spec;
  if (isBitLockerHost(dev)) {
    // Unlocked once per boot: an image planned again after its expansion finds it open.
    let open = unlocked.get(dev.path);
    if (!open) {
      open = unlockBitLocker(ctx, dev, ctx.plan.vdisk.bitlockerKey, onUnlocked);
      unlocked.set(dev.path, open);
    }
    dev = open;
    hostSpec = { by: 'path', value: open.path };
  }
  if (isKernelHost(dev)) return { kernel: dev };
  return { found: findImage(hostDevices(ctx, [dev]), hostSpec, path) };
}

/** A host mounted by the kernel at /run/vdboot/host (through vdhost) for vdboot to read its image files. */
interface KernelMount {
  device: BlockDeviceInfo;
  /** the type it mounted as */
  fsType: string;
  writable: boolean;
}

/** Creates vdhost over `host` (read-only unless `writable`) and mounts it at HOST_MOUNT; takes vdhost down again when the mount fails. */
function mountThroughVdhost(ctx: InitContext, dm: DeviceMapper, undo: Undo, host: BlockDeviceInfo, writable: boolean, fsType: string | undefined, readOnlyMount: boolean): string {
  const vh = vdhostPlan(host, !writable);
  const created = dm.create(vh.name, vh.uuid, vh.targets, vh.readOnly);
  if (!undo.state.dm.includes(vh.name)) undo.state.dm.push(vh.name);
  try {
    return mountDevice(ctx, { ...host, name: vh.name, path: created.path }, HOST_MOUNT, fsType, readOnlyMount, '');
  } catch (e) {
    try {
      dm.remove(vh.name);
      undo.state.dm.splice(undo.state.dm.indexOf(vh.name), 1);
    } catch { /* the rollback tries again */ }
    throw e;
  }
}

/**
 * Mounts a host only the kernel reads (ext4, xfs, btrfs, …) read-only at HOST_MOUNT, on a
 * read-only vdhost, so mounting writes nothing. A filesystem whose journal needs replaying
 * (not cleanly unmounted) refuses that; it is then mounted read-only on a writable vdhost,
 * where the kernel replays the journal as it would for any root filesystem.
 */
function mountKernelHost(ctx: InitContext, dm: DeviceMapper, undo: Undo, host: BlockDeviceInfo, mayWrite: boolean): KernelMount {
  const { log } = ctx;
  ctx.modules.reportFailures(ctx.modules.load(['dm_mod']));
  // a btrfs over several disks mounts only once all its members are registered
  readyBtrfsHost(ctx, host, 'filesystem holding the image');
  let fsType: string;
  try {
    try {
      fsType = mountThroughVdhost(ctx, dm, undo, host, false, undefined, true);
    } catch (first) {
      const msg = (first as Error).message;
      const why = /\(((?:[\w.-]+: E[A-Z]+(?:; )?)+)\)/.exec(msg)?.[1] ?? msg;
      // Journal recovery writes the host: only a read-write boot may do that.
      if (!mayWrite) {
        throw new BootFailure(
          `${describeHost(host)} does not mount on a read-only view of the partition (${why}); it was probably not cleanly unmounted, and mounting it would replay its journal, ` +
            `which writes to the partition. This boot's rd.vdisk.mode=${ctx.plan.vdisk.mode} writes nothing to the host, so vdboot stops here. ` +
            `Check the filesystem from another system (fsck), or boot once with rd.vdisk.mode=rw to let the kernel replay the journal.`,
        );
      }
      log.warn(`${describeHost(host)} does not mount on a read-only view of the partition (${why}); it was probably not cleanly unmounted. Mounting it read-only with the kernel's journal recovery, which writes to the partition`);
      fsType = mountThroughVdhost(ctx, dm, undo, host, true, undefined, true);
    }
  } catch (e) {
    if (e instanceof BootFailure) throw e;
    throw new BootFailure(
      `${(e as Error).message}\nvdboot reaches image files on ${host.fsType} through the kernel's driver, so it must mount ${host.path}. ` +
        `Check the filesystem from another system (fsck), or put the image on an NTFS, exFAT or FAT partition, which vdboot reads itself.`,
    );
  }
  undo.state.hostMount = HOST_MOUNT;
  return { device: host, fsType, writable: false };
}

/** The loop or nbd path writes through the kernel-mounted host: mount it again read-write, on a writable vdhost. */
function remountKernelHostWritable(ctx: InitContext, dm: DeviceMapper, undo: Undo, k: KernelMount): void {
  const { sys } = ctx;
  if (k.writable) return;
  sys.umount2(HOST_MOUNT, 0);
  undo.state.hostMount = undefined;
  dm.remove('vdhost');
  undo.state.dm.splice(undo.state.dm.indexOf('vdhost'), 1);
  mountThroughVdhost(ctx, dm, undo, k.device, true, k.fsType, false);
  undo.state.hostMount = HOST_MOUNT;
  k.writable = true;
}

/** After an expansion through the kernel-mounted host: read-only again, and known to be, so a loop or nbd path remounts it. */
function remountKernelHostReadOnly(ctx: InitContext, k: KernelMount): void {
  ctx.sys.mount('none', HOST_MOUNT, '', MS.REMOUNT | MS.RDONLY, '');
  k.writable = false;
}

/** The logical sector size of a device (a partition's is its disk's), 512 when sysfs does not say. */
function logicalBlockSize(sys: Sys, dev: BlockDeviceInfo): number {
  const n = Number(readTextOr(sys, `/sys/class/block/${dev.parent ?? dev.name}/queue/logical_block_size`) ?? '512');
  return Number.isInteger(n) && n >= 512 ? n : 512;
}

/** Everything created so far, so a failure half-way takes it down again. */
class Undo {
  readonly state: VdiskState = { dm: [], loops: [], nbds: [], daemons: [] };
  constructor(private readonly sys: Sys, private readonly dm: DeviceMapper) {}

  /**
   * Takes down what was made, users before what they use: the image's dm devices, nbd,
   * loops (they hold files on the host), the host mount, and last vdhost (the host is
   * mounted through it). In another order the host stays mounted — read-write on the
   * loop and nbd paths — and is left dirty. Best effort per item; failures are reported.
   */
  rollback(log?: { warn(m: string): void }): void {
    const { sys, dm, state } = this;
    const attempt = (what: string, fn: () => void): void => {
      try { fn(); } catch (e) { log?.warn(`while undoing: ${what}: ${(e as Error).message}`); }
    };
    const dms = [...state.dm].reverse();
    for (const name of dms.filter((n) => n !== 'vdhost')) attempt(`removing /dev/mapper/${name}`, () => dm.remove(name));
    for (const nbd of state.nbds ?? []) attempt(`disconnecting ${nbd}`, () => disconnectNbd(sys, nbd));
    for (const loop of [...state.loops].reverse()) attempt(`detaching ${loop}`, () => detachLoop(sys, loop));
    if (state.hostMount) attempt(`unmounting ${state.hostMount}`, () => sys.umount2(state.hostMount!, 0));
    for (const name of dms.filter((n) => n === 'vdhost')) attempt('removing /dev/mapper/vdhost', () => dm.remove(name));
  }
}

function substitute(targets: DmTarget[], loops: string[], cow: string | undefined, nbd: string | undefined): DmTarget[] {
  return targets.map((t) => ({
    ...t,
    params: t.params
      .replace(/\$LOOP(\d+)/g, (_, i: string) => loops[Number(i)] ?? `$LOOP${i}`)
      .replace(/\$COW/g, cow ?? '$COW')
      .replace(/\$NBD/g, nbd ?? '$NBD'),
  }));
}

/** vdboot's own binary in the initramfs, which the reconnect daemon runs again. */
const SELF = '/init';

/**
 * Starts the reconnect daemon (nbd-reconnect.ts) for the network images' devices: this
 * binary again, argv[0] "@vdboot-nbd", in a session of its own (no key typed on the
 * console signals it). Best effort: without it, a server that goes away fails the
 * devices' I/O after the 120 s they were connected with.
 */
function startNbdReconnect(ctx: InitContext, devices: ConnectedNbd[], state: VdiskState): void {
  const { sys, log, plan } = ctx;
  const argv = reconnectArgv(devices, plan.vdisk.nbdTimeout ?? NBD_RECONNECT_DEFAULT_S, log.quiet);
  try {
    const pid = sys.spawn(SELF, argv, [], { setsid: true });
    state.daemons.push(pid);
    log.debug(`nbd: reconnect daemon ${pid}: ${argv.join(' ')}`);
  } catch (e) {
    log.warn(`could not start the NBD reconnect daemon (${(e as Error).message}): if the server goes away, I/O on ${devices.map((d) => d.device).join(', ')} waits 120 s, then fails`);
  }
}

/** NBD_DISCONNECT and NBD_CLEAR_SOCK (linux/nbd.h): qemu-nbd flushes the image and exits. */
export const NBD = { CLEAR_SOCK: 0xab04, DISCONNECT: 0xab08 } as const;

export function disconnectNbd(sys: Sys, dev: string): void {
  const fd = sys.open(dev, O.RDWR | O.CLOEXEC);
  try {
    sys.ioctlInt(fd, NBD.DISCONNECT, 0);
    try { sys.ioctlInt(fd, NBD.CLEAR_SOCK, 0); } catch { /* newer kernels clear it themselves */ }
  } finally {
    sys.close(fd);
  }
}

/** Serves the image on a free /dev/nbdN with qemu-nbd (argv[0] "@qemu-nbd": a storage daemon systemd spares). */
function connectNbd(ctx: InitContext, undo: Undo, n: NonNullable<VdiskPlan['nbd']>): string {
  const { sys, log } = ctx;
  const tool = ctx.manifest.tools.qemuNbd;
  if (!tool) throw new BootFailure('The nbd path needs qemu-nbd in the initramfs: build it with "vdboot mkinitramfs --with qemu-nbd".');
  for (let i = 0; i < 16; i++) {
    if (readTextOr(sys, `/sys/class/block/nbd${i}/size`) === undefined) break;
    if (readTextOr(sys, `/sys/class/block/nbd${i}/pid`) !== undefined) continue; // connected already
    const dev = `/dev/nbd${i}`;
    // Its server socket lives in /run (its default, /var/lock, does not exist here).
    mkdirs(sys, STATE_DIR);
    const argv = ['@qemu-nbd', '--fork', '--connect', dev, '--socket', `${STATE_DIR}/nbd${i}.sock`, '--format', n.format, ...(n.readOnly ? ['--read-only'] : []), `${HOST_MOUNT}${n.file}`];
    const pid = sys.spawn(tool, argv, []);
    const r = sys.waitpid(pid, 0);
    if (r.exitCode !== 0) throw new BootFailure(`qemu-nbd could not serve ${n.file} on ${dev} (exit ${r.exitCode}${r.termSignal ? `, signal ${r.termSignal}` : ''}); its message is above.`);
    undo.state.nbds!.push(dev);
    log.info(`qemu-nbd serves ${n.file} (${n.format}${n.readOnly ? ', read-only' : ''}) on ${dev}`);
    return dev;
  }
  throw new BootFailure('No free nbd device (/dev/nbd0…15): is the nbd module in the initramfs? Build it with "vdboot mkinitramfs --with qemu-nbd".');
}

/**
 * Sets up root=vdisk: (and rd.vdisk.attach images) and returns the root device to
 * mount. Every image is planned before anything is written or created.
 */
export function setupVdisks(ctx: InitContext): { root?: BlockDeviceInfo; rootDeferred?: NonNullable<VdiskPlan['rootDeferred']>; plans: VdiskPlan[] } {
  const { sys, log, plan } = ctx;
  const requests: { spec?: DeviceSpec; path: string; root: boolean; what: string; nbd?: NbdUrl }[] = [];
  if (plan.root.kind === 'vdisk') requests.push({ ...(plan.root.host ? { spec: plan.root.host } : {}), ...(plan.root.nbd ? { nbd: plan.root.nbd } : {}), path: plan.root.path, root: true, what: 'the root image' });
  for (const a of plan.vdisk.attach) requests.push({ ...(a.host ? { spec: a.host } : {}), ...(a.nbd ? { nbd: a.nbd } : {}), path: a.path, root: false, what: a.from });
  /** the NBD servers' connections: kept open from planning until the kernel took the used ones */
  const nbdHosts: NbdImageHost[] = [];
  if (plan.vdisk.compat && plan.root.kind === 'vdisk') {
    log.info(`${plan.vdisk.compat}: booting as root=vdisk:${plan.root.host ? `${formatDeviceSpec(plan.root.host)}:` : ''}${plan.root.path} would`);
  }

  // 1. Plan everything (reads only; a host only the kernel reads is mounted read-only first).
  const dm = new DeviceMapper(sys);
  const undo = new Undo(sys, dm);
  let kernelHost: KernelMount | undefined;
  /** BitLocker host partitions unlocked for this boot, by their own path */
  const unlocked = new Map<string, BlockDeviceInfo>();
  const planned: { vp: VdiskPlan; host: BlockDeviceInfo; nbd?: NbdImageHost }[] = [];
  type Planned = { kind: 'planned'; vp: VdiskPlan; host: BlockDeviceInfo; nbd?: NbdImageHost } | { kind: 'expand'; need: ExpansionNeeded; target: ExpandTarget };
  /** Locates, opens and plans request `index` (reads only); a dynamic image for a rw mapping comes back as 'expand'. */
  const planOne = (index: number, verify?: (host: ImageHost, device: BlockDeviceInfo) => void): Planned => {
    const r = requests[index]!;
    if (r.nbd) return planNbd(ctx, index, r.nbd, r.root, nbdHosts);
    // A host mounted already is now also matched by vdhost (it carries the host's label): use the mounted one.
    const located = kernelHost && r.spec && deviceMatches(r.spec, kernelHost.device) ? { kernel: kernelHost.device } : log.timed('locate-host', () => locateImage(ctx, r.spec, r.path, r.what, unlocked, (name) => (undo.state.unlocked ??= []).push(name)));
    let opened: { path: string; device: BlockDeviceInfo; imageHost: ImageHost; nbdReadable: boolean; close(): void };
    if (located.kernel) {
      const dev = located.kernel;
      if (kernelHost && kernelHost.device.path !== dev.path) {
        throw new BootFailure(`${r.what} is on ${describeHost(dev)}, but ${describeHost(kernelHost.device)} is mounted already for another image, and vdboot mounts one host filesystem at a time. Put the images on one partition.`);
      }
      kernelHost ??= log.timed('host-mount', () => mountKernelHost(ctx, dm, undo, dev, plan.vdisk.mode === 'rw'));
      const k = kernelImageHost(sys, HOST_MOUNT, dev, kernelHost.fsType, describeHost(dev), r.path, plan.vdisk.mode === 'rw');
      opened = { path: k.file.path, device: dev, imageHost: k.host, nbdReadable: true, close: () => k.close() };
    } else {
      const found = located.found!;
      opened = {
        path: found.file.path, device: found.host.device, imageHost: imageHostFor(found.host, [found.file]),
        // qemu-nbd reads the image through the host filesystem: the kernel (or ntfs-3g) must mount it
        nbdReadable: found.host.fs.type !== 'ntfs' || ctx.manifest.tools.ntfs3g !== undefined || 'ntfs3' in ctx.manifest.filesystems,
        close: () => found.host.close(),
      };
    }
    try {
      const req: ImageRequest = {
        index, path: opened.path, mode: plan.vdisk.mode, map: plan.vdisk.map, expand: plan.vdisk.expand,
        ...(plan.vdisk.allowOutside ? { allowOutside: true } : {}),
        ...(plan.vdisk.overlay && index === 0 ? { persistentOverlay: true } : {}),
        nbd: ctx.manifest.tools.qemuNbd !== undefined && opened.nbdReadable,
        ...(r.root ? { root: plan.vdisk.root } : {}),
      };
      const imageHost = { ...opened.imageHost, logicalBlockSize: logicalBlockSize(sys, opened.device) };
      let vp: VdiskPlan;
      try {
        vp = log.step('plan', () => planVdisk(req, imageHost), (p) => `${p.name}: ${p.imagePath} on ${p.host}: ${p.chain.map(formatName).join(' → ')}, ${p.why}`);
      } catch (e) {
        if (!isExpansionNeeded(e)) throw e;
        const kernelMount = located.kernel && kernelHost ? { dir: HOST_MOUNT, makeWritable: () => remountKernelHostWritable(ctx, dm, undo, kernelHost!), makeReadOnly: () => remountKernelHostReadOnly(ctx, kernelHost!) } : undefined;
        return { kind: 'expand', need: e, target: { device: opened.device, description: imageHost.description, path: opened.path, ...(kernelMount ? { kernelMount } : {}) } };
      }
      verify?.(imageHost, opened.device);
      for (const line of describeVdiskPlan(vp, 8)) log.debug(line);
      for (const w of vp.warnings) log.warn(w);
      if (vp.root) log.info(`${vp.name}: root is /dev/mapper/${vp.root.partition.name} (${vp.root.partition.fsType ?? 'no filesystem found'}), chosen by ${vp.root.why}`);
      if (vp.rootDeferred) log.info(`${vp.name}: the root is found after unlocking and activation: ${vp.rootDeferred.why}`);
      return { kind: 'planned', vp, host: opened.device };
    } finally {
      // the host's files are closed before anything remounts it (an open file keeps it busy)
      opened.close();
    }
  };
  try {
    // Every image is located and planned before any is expanded, so a later image that is
    // missing or refused stops the boot before anything was written.
    const results = requests.map((_, index) => planOne(index));
    for (let index = 0; index < results.length; index++) {
      let res = results[index]!;
      if (res.kind === 'expand') {
        // A dynamic image for a rw mapping: expand it in place (expand.ts), then plan it again.
        const need = res.need, target = res.target;
        const done = log.timed('expand', () => expandInPlace(ctx, need, target));
        res = planOne(index, done.fills.length ? (host, device) => verifyFills(ctx, host, device, done) : undefined);
        if (res.kind === 'expand') {
          throw new BootFailure(
            res.need.fills.length
              ? `${res.target.path} still has ${res.need.fills.map((f) => `${humanSize(f.zeroBytes)} of holes in ${f.name}`).join(', ')} after they were filled through the host's driver: the driver did not allocate them, so vdboot will not map the file read-write. The boot stops here. Copy the image whole on another machine (Windows: copy; Linux: cp --sparse=never), or boot with rd.vdisk.mode=snapshot.`
              : `${res.target.path} still has unallocated blocks after it was expanded in place; the boot stops here. Check the image with "qemu-img check" on another machine.`,
          );
        }
      }
      planned.push({ vp: res.vp, host: res.host, ...(res.nbd ? { nbd: res.nbd } : {}) });
    }
  } catch (e) {
    undo.rollback(log);
    for (const h of nbdHosts) h.close();
    throw e;
  }

  // vdboot mounts one host filesystem (at /run/vdboot/host): images that reach their file
  // through it (loop, nbd) must all lie on that one host, or a loop would open a file of
  // the same name on the wrong partition.
  const local = planned.filter((p) => !p.nbd);
  const throughHost = local.filter((p) => p.vp.path !== 'direct');
  const mountedHost = kernelHost?.device ?? throughHost[0]?.host ?? local[0]?.host;
  const elsewhere = throughHost.find((p) => p.host.path !== mountedHost?.path);
  if (elsewhere && mountedHost) {
    undo.rollback(log);
    throw new BootFailure(
      `${elsewhere.vp.name} (${elsewhere.vp.imagePath} on ${elsewhere.host.path}) takes the ${elsewhere.vp.path} path, which reads the file through the mounted host filesystem, ` +
        `but ${kernelHost ? 'the host of another image' : throughHost[0]!.vp.name} needs ${mountedHost.path} mounted, and vdboot mounts one host filesystem at a time. ` +
        'Put the images that need loop or nbd on one partition, or let the others take the direct path (rd.vdisk.map=auto, a fully allocated image).',
    );
  }

  // The persistent overlay of the first image (rd.vdisk.overlay): found and checked against
  // the image's identity before anything is created (reads only).
  let overlay: OverlayPlan | undefined;
  if (plan.vdisk.overlay && planned[0]?.vp.mode === 'snapshot') {
    const vp0 = planned[0].vp;
    const chunk = Number(/ P (\d+)$/.exec(vp0.devices.find((d) => d.name === vp0.name)?.targets[0]?.params ?? '')?.[1] ?? 8);
    try {
      overlay = log.timed('overlay', () => planOverlay(ctx, plan.vdisk.overlay!, vp0, chunk));
      const full = overlayFullWarning(overlay);
      if (full) log.warn(full);
      // An overlay kept from earlier boots has its chunk size in its store: the table says the same.
      const kept = overlay.record.chunkSectors;
      for (const t of vp0.devices.find((d) => d.name === vp0.name)?.targets ?? []) if (t.type === 'snapshot') t.params = t.params.replace(/ P \d+$/, ` P ${kept}`);
    } catch (e) {
      undo.rollback(log);
      for (const h of nbdHosts) h.close();
      throw e;
    }
  }

  // 2. Execute.
  const wanted = ['dm_mod', 'dm_zero'];
  if (planned.some((p) => p.vp.mode === 'snapshot')) wanted.push('dm_snapshot');
  if (planned.some((p) => p.vp.loops.length || p.vp.cowBytes !== undefined)) wanted.push('loop');
  if (planned.some((p) => p.vp.nbd)) wanted.push('nbd');
  {
    const missing = ctx.modules.hostonlyMissing(wanted, `Mapping ${planned.map((p) => p.vp.imagePath).join(', ')}`);
    if (missing) { undo.rollback(log); throw new BootFailure(missing); }
  }
  log.timed('dm-modules', () => ctx.modules.reportFailures(ctx.modules.load(wanted)));
  const connectedNbds: ConnectedNbd[] = [];
  try {
    const hostInfo = mountedHost;
    const needsHostMount = planned.some((p) => p.vp.path !== 'direct');
    const hostWritable = local.some((p) => p.vp.hostMountWritable);
    if (kernelHost) {
      if (hostWritable) remountKernelHostWritable(ctx, dm, undo, kernelHost);
    } else if (hostInfo && needsHostMount) {
      const sparse = planned.flatMap((p) => (p.vp.hostMountWritable ? p.vp.sparseHostFiles ?? [] : []));
      log.timed('host-mount', () => mountHost(ctx, dm, undo, hostInfo, hostWritable, true, sparse));
    }
    // The NBD exports the tables name, handed to the kernel: /dev/nbdN must have its size before device-mapper opens it.
    for (const h of nbdHosts) {
      for (const d of log.timed('nbd-connect', () => h.connectKernel(log))) {
        undo.state.nbds!.push(d.device);
        connectedNbds.push(d);
      }
    }
    for (const { vp } of planned) {
      const loops: string[] = [];
      for (const l of vp.loops) {
        const dev = attachLoop(sys, `${HOST_MOUNT}${l.file}`, { readOnly: l.readOnly, directIo: false });
        undo.state.loops.push(dev);
        loops[l.index] = dev;
      }
      let cow: string | undefined;
      if (vp.cowBytes !== undefined) cow = makeCow(sys, undo, vp.name, vp.cowBytes, plan.vdisk.overlaySize);
      else if (overlay && vp === planned[0]!.vp) {
        const op = overlay;
        cow = log.step('overlay', () => createOverlay(sys, dm, vp.name, op, (n) => undo.state.dm.push(n)), () => describeOverlay(vp.name, op));
      }
      const nbd = vp.nbd ? connectNbd(ctx, undo, vp.nbd) : undefined;
      log.step('dm', () => {
        for (const d of vp.devices) {
          dm.create(d.name, d.uuid, substitute(d.targets, loops, cow, nbd), d.readOnly);
          undo.state.dm.push(d.name);
        }
      }, () => `created ${vp.devices.map((d) => `/dev/mapper/${d.name}${d.readOnly ? ' (ro)' : ''}`).join(', ')}`);
    }
    // Only once every device exists: the first writes to the images (VHDX logs and headers).
    for (const { vp } of planned) {
      const hu = vp.headerUpdate;
      if (hu) log.step('header', () => applyHeaderUpdate(sys, hu), () => `${vp.name}: wrote ${hu.what}`);
    }
    if (hostInfo && !needsHostMount && !kernelHost) log.timed('host-mount', () => mountHost(ctx, dm, undo, hostInfo, false, false));
  } catch (e) {
    undo.rollback(log);
    for (const h of nbdHosts) h.close();
    if (isSysError(e)) {
      throw new BootFailure(`Setting up the image devices failed (${e.message}). Nothing was written to the image. ` +
        `Does the initramfs have device-mapper (dm_mod${planned.some((p) => p.vp.mode === 'snapshot') ? ', dm_snapshot' : ''}) and loop? Rebuild it with "vdboot mkinitramfs".`);
    }
    throw e;
  }
  for (const h of nbdHosts) h.close();
  if (connectedNbds.length) startNbdReconnect(ctx, connectedNbds, undo.state);
  writeState(sys, { ...undo.state, images: planned.map((p) => imageRecord(p.vp, 'boot')) });
  const root = planned.find((p) => p.vp.root)?.vp.root?.device;
  const rootDeferred = planned.find((p) => p.vp.rootDeferred)?.vp.rootDeferred;
  return { ...(root ? { root } : {}), ...(rootDeferred ? { rootDeferred } : {}), plans: planned.map((p) => p.vp) };
}

/**
 * After a fill (fill.ts): the units where a file's data and its former holes meet, read
 * again from the partition where the file's records now place them, must hold what was
 * written through the driver. A driver that put them elsewhere (or lost them) stops the
 * boot before anything is mapped, and before the guest writes anything.
 */
function verifyFills(ctx: InitContext, host: ImageHost, device: BlockDeviceInfo, done: InPlaceResult): void {
  const { sys, log } = ctx;
  dropDeviceCache(sys, device.path);
  const dev = openBlockReader(sys, device.path, device.size);
  try {
    const bad: string[] = [];
    let units = 0;
    for (const f of done.fills) {
      const layout = host.layout(f.name);
      if (!layout) { bad.push(`${f.name}: vdboot cannot see where it lies on ${host.description}`); continue; }
      const size = layout.size ?? layout.extents.reduce((n, e) => Math.max(n, e.fileOffset + e.length), 0);
      bad.push(...verifyFill(f.name, f.checks, layoutReader(f.name, size, layout.extents, dev)));
      units += f.checks.length;
    }
    if (bad.length) {
      throw new BootFailure(
        `After filling the holes of the image through the host's driver, what the partition holds is not what was written:\n  ${bad.slice(0, 8).join('\n  ')}${bad.length > 8 ? `\n  and ${bad.length - 8} more` : ''}\n` +
          `The driver placed or kept the data elsewhere than the file's records say, so vdboot will not map this file. The boot stops here, before the guest wrote anything. ` +
          `Check the host filesystem (Windows: chkdsk /f), and copy the image whole on another machine (Windows: copy; Linux: cp --sparse=never); or boot with rd.vdisk.mode=snapshot.`,
      );
    }
    log.info(`checked ${units} filled unit${units === 1 ? '' : 's'} on ${device.path}: each holds what was written through the driver`);
  } finally {
    dev.close();
  }
}

/**
 * A plan's header writes (a VHDX's new write GUIDs), each synced before the next, after the
 * devices exist and before anything can write through them. A write that fails leaves the
 * other header current: the image reads as before.
 */
function applyHeaderUpdate(sys: Sys, hu: HeaderUpdate): void {
  const target = hu.on === 'device' ? hu.path : `${HOST_MOUNT}${hu.path}`;
  try {
    writeSynced(sys, target, hu.writes);
  } catch (e) {
    throw new BootFailure(
      `Writing ${hu.what} to ${target} failed (${(e as Error).message}); the boot stops before anything else is written. ` +
        `The image is left consistent: an interrupted header update leaves the other header current, and an interrupted log replay is replayed again when the image is next opened. Check the host disk, or boot with rd.vdisk.mode=snapshot.`,
    );
  }
}

/**
 * A sparse file in /run (RAM) on a loop device: the snapshot's copy-on-write store. With
 * rd.vdisk.overlay.size, the file lies in a tmpfs of that size of its own, so a client that
 * writes more gets ENOSPC on the snapshot (the kernel then invalidates it) instead of
 * filling /run.
 */
function makeCow(sys: Sys, undo: Undo, name: string, size: number, limit?: string): string {
  mkdirs(sys, STATE_DIR);
  let dir = STATE_DIR;
  if (limit) {
    dir = `${STATE_DIR}/overlay-${name}`;
    mkdirs(sys, dir, 0o700);
    sys.mount('tmpfs', dir, 'tmpfs', MS.NOSUID | MS.NODEV, `mode=0700,size=${limit}`);
  }
  const file = `${dir}/${name}.cow`;
  const fd = sys.open(file, O.RDWR | O.CREAT | O.TRUNC | O.CLOEXEC, 0o600);
  try {
    sys.truncate(fd, size);
  } finally {
    sys.close(fd);
  }
  const dev = attachLoop(sys, file, { readOnly: false });
  undo.state.loops.push(dev);
  // The loop holds the file open: unlinking it now means the RAM is freed when the loop goes.
  try { sys.unlink(file); } catch { /* left in /run: harmless */ }
  return dev;
}

/** Kernel filesystem types to try for a host filesystem type vdboot probed. */
const HOST_MOUNT_TYPES: Record<string, string> = { ntfs: 'ntfs3,ntfs', vfat: 'vfat', exfat: 'exfat' };

/**
 * Mounts the host filesystem at /run/vdboot/host through vdhost. `required`: the loop
 * path reads the image through it, so failing is fatal; otherwise the boot goes on.
 */
function mountHost(ctx: InitContext, dm: DeviceMapper, undo: Undo, host: BlockDeviceInfo, writable: boolean, required: boolean, sparseFiles: string[] = []): void {
  const { sys, log } = ctx;
  // ntfs3 loses data written into the holes of a sparse file (a partly allocated
  // compression unit gets new clusters without the old ones' data): such files are
  // written through ntfs-3g, or not at all.
  const avoidNtfs3 = writable && host.fsType === 'ntfs' && sparseFiles.length > 0;
  if (avoidNtfs3 && !ctx.manifest.tools.ntfs3g) {
    throw new BootFailure(
      `${sparseFiles.join(', ')} on ${host.path} is a sparse file (it has holes), and this boot would write it through the kernel's ntfs3, which loses data written into a sparse file's holes; this initramfs has no ntfs-3g to write it instead. Nothing was written. ` +
        `Boot without rd.vdisk.expand=0 (vdboot then fills the holes first and maps the image directly), or build the initramfs with "vdboot mkinitramfs --with ntfs-3g", ` +
        `or copy the image whole on another machine (Windows: copy; Linux: cp --sparse=never), or boot with rd.vdisk.mode=snapshot.`,
    );
  }
  try {
    const vh = vdhostPlan(host, !writable);
    const created = dm.create(vh.name, vh.uuid, vh.targets, vh.readOnly);
    undo.state.dm.push(vh.name);
    const dev: BlockDeviceInfo = { ...host, name: vh.name, path: created.path };
    mkdirs(sys, HOST_MOUNT);
    const types = HOST_MOUNT_TYPES[host.fsType ?? ''] ?? host.fsType;
    if (avoidNtfs3) {
      log.info(`${sparseFiles.join(', ')} is sparse on ${host.path}: written through ntfs-3g, not ntfs3 (ntfs3 loses data written into a sparse file's holes)`);
    } else {
      try {
        mountDevice(ctx, dev, HOST_MOUNT, types, !writable, '');
        undo.state.hostMount = HOST_MOUNT;
        return;
      } catch (e) {
        if (host.fsType !== 'ntfs' || !ctx.manifest.tools.ntfs3g) throw e;
      }
    }
    // NTFS through ntfs-3g: the kernel has no NTFS driver that mounts it, or the file is sparse.
    const ntfs3g = ctx.manifest.tools.ntfs3g!;
    ctx.modules.reportFailures(ctx.modules.load(['fuse']));
    // Storage daemons run with "@" as argv[0]'s first character: systemd's final kill spares them.
    const pid = sys.spawn(ntfs3g, ['@ntfs-3g', '-o', writable ? 'rw' : 'ro', dev.path, HOST_MOUNT], []);
    const r = sys.waitpid(pid, 0);
    if (r.exitCode !== 0) throw new BootFailure(`ntfs-3g could not mount ${dev.path} (exit ${r.exitCode})`);
    undo.state.hostMount = HOST_MOUNT;
    log.info(`mounted ${host.path} through ${dev.path} with ntfs-3g on ${HOST_MOUNT}`);
  } catch (e) {
    if (required) {
      throw new BootFailure(
        `${(e as Error).message}\nThe loop path reads the image through the host filesystem, so the kernel must mount it` +
          `${host.fsType === 'ntfs' ? ' (NTFS: the ntfs3 module, or ntfs-3g in the initramfs)' : ''}. ` +
          `Without that, boot with rd.vdisk.map=direct where the image allows it, or rd.vdisk.mode=snapshot or ro.`,
      );
    }
    log.warn(`the host filesystem ${host.path} is not reachable at ${HOST_MOUNT} (${(e as Error).message}); the booted system can mount /dev/mapper/vdhost itself${host.fsType === 'ntfs' ? ', e.g. with ntfs-3g' : ''}`);
  }
}

/**
 * Adds a device made on top of an image's devices (an unlocked LUKS volume, an LV) to the
 * record the shutdown hand-off reads, after the image's own devices: they are removed in
 * reverse, so it goes before the partition it sits on.
 */
export function recordStackedDevice(sys: Sys, name: string): void {
  try {
    const state = JSON.parse(readText(sys, STATE_PATH)) as VdiskState;
    if (!Array.isArray(state.dm) || state.dm.includes(name)) return;
    state.dm.push(name);
    writeState(sys, state);
  } catch { /* no record: the hand-off finds them by their place on vdboot's devices */ }
}

function writeState(sys: Sys, state: VdiskState): void {
  try {
    mkdirs(sys, STATE_DIR);
    writeText(sys, STATE_PATH, `${JSON.stringify(state)}\n`);
  } catch { /* the shutdown hand-off then finds devices by their dm uuid prefix */ }
}

/** The snapshot's chunk over a network image, in 512-byte sectors (64 KiB). */
const NBD_SNAPSHOT_CHUNK_SECTORS = 128;

/**
 * Plans an image that is an export of an NBD server: the network is up already (init.ts);
 * the nbd module is loaded, the export opened and its tables read over the network. The
 * connections stay open (nbdHosts) until the kernel takes them after the whole plan stands.
 */
/** A connection refused or closed before the server said anything: a server not (yet) there, not an answer. */
function serverNotThereYet(e: FormatError): boolean {
  return (e.field === 'closed' && e.value === 0) || (e.field === 'server' && /^Could not connect to the NBD server .*\((ECONNREFUSED|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH)\)/.test(e.message));
}

function planNbd(ctx: InitContext, index: number, url: NbdUrl, root: boolean, nbdHosts: NbdImageHost[]): { kind: 'planned'; vp: VdiskPlan; host: BlockDeviceInfo; nbd: NbdImageHost } {
  const { sys, log, plan } = ctx;
  ctx.modules.reportFailures(ctx.modules.load(['nbd']));
  // A connection that drops while the image's tables are read (a relay that died, a server
  // restarted) is opened again and the plan made anew, within the same rd.timeout.
  const deadline = sys.monotonicMs() + plan.timeoutSec * 1000;
  for (let round = 1; ; round++) {
    const nh = openNbdWithin(ctx, url, deadline);
    nbdHosts.push(nh);
    try {
      return planNbdExport(ctx, index, url, root, nh);
    } catch (e) {
      const left = Math.ceil((deadline - sys.monotonicMs()) / 1000);
      if (!(isFormatError(e) && (e as FormatError).field === 'closed' && left > 0)) throw e;
      log.warn(`${(e as Error).message} while vdboot read the image's tables; connecting again (${round === 1 ? 'first retry' : `retry ${round}`}; trying for ${left} s more, rd.timeout=${plan.timeoutSec})`);
      nbdHosts.splice(nbdHosts.indexOf(nh), 1);
      try { nh.close(); } catch { /* the connection is gone already */ }
      sys.sleepMs(Math.min(500 * round, 5000, left * 1000));
    }
  }
}

/** Connects to the export, retrying a server that is not (yet) there until `deadline`. */
function openNbdWithin(ctx: InitContext, url: NbdUrl, deadline: number): NbdImageHost {
  const { sys, log, plan } = ctx;
  const where = formatNbdUrl(url);
  let nh: NbdImageHost | undefined;
  // A server that is starting (nothing listens yet, or its relay closes the connection before
  // the greeting) is waited for like a disk that has not appeared, up to rd.timeout.
  for (let attempt = 1; !nh; attempt++) {
    try {
      nh = log.timed('nbd-open', () => new NbdImageHost(sys, url));
    } catch (e) {
      const left = Math.ceil((deadline - sys.monotonicMs()) / 1000);
      if (isFormatError(e) && serverNotThereYet(e as FormatError) && left > 0) {
        log.warn(`${(e as Error).message} (attempt ${attempt}; trying again for ${left} s more, rd.timeout=${plan.timeoutSec})`);
        sys.sleepMs(Math.min(1000 * attempt, 5000, left * 1000));
        continue;
      }
      if (isFormatError(e)) throw new BootFailure(`${(e as Error).message}${attempt > 1 ? ` (after ${attempt} attempts within rd.timeout=${plan.timeoutSec} s)` : ''}`);
      if (isSysError(e)) throw new BootFailure(`${where}: ${e.message}. Does the kernel have TCP/IP networking, and the initramfs the network card's driver?`);
      throw e;
    }
  }
  return nh;
}

function planNbdExport(ctx: InitContext, index: number, url: NbdUrl, root: boolean, nh: NbdImageHost): { kind: 'planned'; vp: VdiskPlan; host: BlockDeviceInfo; nbd: NbdImageHost } {
  const { log, plan } = ctx;
  const where = formatNbdUrl(url);
  log.info(`${where}: ${nh.rootExport.size} bytes${nh.rootExport.readOnly ? ', read-only' : ', writable'}${nh.rootExport.blockSize ? `, block sizes ${nh.rootExport.blockSize.minimum}/${nh.rootExport.blockSize.preferred}/${nh.rootExport.blockSize.maximum}` : ''}`);
  const req: ImageRequest = {
    index, path: nh.path, mode: plan.vdisk.mode, map: plan.vdisk.map, expand: false,
    ...(plan.vdisk.allowOutside ? { allowOutside: true } : {}),
    ...(plan.vdisk.overlay && index === 0 ? { persistentOverlay: true } : {}),
    ...(root ? { root: plan.vdisk.root } : {}),
  };
  if (req.map === 'loop' || req.map === 'nbd') throw new BootFailure(`${where}: rd.vdisk.map=${plan.vdisk.map} does not apply to a network image: vdboot maps its export directly (/dev/nbdN under device-mapper). Remove rd.vdisk.map.`);
  let vp: VdiskPlan;
  try {
    vp = log.step('plan', () => planVdisk(req, nh.host), (p) => `${p.name}: ${where}: ${p.chain.map(formatName).join(' → ')}, ${p.why}`);
  } catch (e) {
    if (isExpansionNeeded(e)) {
      throw new BootFailure(`${where}: rd.vdisk.mode=rw maps the image read-write, but it has unallocated blocks (a dynamic image), which vdboot can only expand on a local disk. ` +
        `Boot it in snapshot mode (the default for network images: remove rd.vdisk.mode=rw), or convert it to a fixed image on the server (qemu-img convert -O vhdx -o subformat=fixed).`);
    }
    throw e;
  }
  // dm-snapshot splits every read at its chunk size: 4 KiB chunks turn a 1 MiB read of the
  // image into 256 round trips to the server. Network images take 64 KiB chunks (a first
  // write to a chunk copies 64 KiB from the server into RAM).
  for (const d of vp.devices) for (const t of d.targets) if (t.type === 'snapshot') t.params = t.params.replace(/ ([NP]) 8$/, ` $1 ${NBD_SNAPSHOT_CHUNK_SECTORS}`);
  for (const line of describeVdiskPlan(vp, 8)) log.debug(line);
  for (const w of vp.warnings) log.warn(w);
  if (vp.root) log.info(`${vp.name}: root is /dev/mapper/${vp.root.partition.name} (${vp.root.partition.fsType ?? 'no filesystem found'}), chosen by ${vp.root.why}`);
  if (vp.rootDeferred) log.info(`${vp.name}: the root is found after unlocking and activation: ${vp.rootDeferred.why}`);
  const host: BlockDeviceInfo = { name: `nbd-${url.server}`, path: where, major: 0, minor: 0, size: nh.rootExport.size };
  return { kind: 'planned', vp, host, nbd: nh };
}
