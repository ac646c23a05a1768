/**
 * The layers between a block device and the root filesystem: LUKS volumes unlocked
 * (luks-unlock.ts), LVM LVs activated (lvm-activate.ts), and resume= from a swap device.
 * Device discovery calls `onDevices` after every scan (context.ts `stack`), so a root on an
 * LV inside a LUKS volume on a partition appears like any other device, for plain roots and
 * inside images alike.
 *
 * Scope: a plain root (and a root=tmpfs: archive's host) looks at every device; a root=vdisk: boot only at the image's own
 * devices (/dev/mapper/vdisk*), so an encrypted partition of the host machine is never
 * asked about — unless rd.luks.uuid= / rd.lvm.vg= / rd.lvm.lv= name it.
 */
import { BootFailure, type InitContext } from './context.ts';
import { describeDevices } from './devices.ts';
import { formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import { waitForDevice } from './devwait.ts';
import { writeText } from './fsutil.ts';
import { mapHash } from '../formats/overlay.ts';
import { encodeResumeRecord, readBootBits, resumeDifferences, RESUME_RECORD_BYTES, swapState, type ResumeIdentity } from '../formats/resume-record.ts';
import { openBlockReader, writeSynced } from './blockdev.ts';
import { unlockLuks, wantsUnlock } from './luks-unlock.ts';
import { LvmActivator } from './lvm-activate.ts';
import { LINUX_FS, type VdiskPlan } from './vdisk.ts';
import { recordStackedDevice } from './vdisk-exec.ts';

export interface OpenedCrypt {
  name: string;
  /** the kernel name of the LUKS device */
  device: string;
}

export class StorageStack {
  private busy = false;
  readonly lvm: LvmActivator;
  readonly crypts: OpenedCrypt[] = [];
  private resumed = false;

  constructor(private readonly ctx: InitContext) {
    this.lvm = new LvmActivator(ctx);
  }

  /** Unlocks and activates what `devices` make possible; true when new devices were made. */
  onDevices(devices: BlockDeviceInfo[]): boolean {
    if (this.busy) return false; // a key device being looked for: no nested unlocking
    this.busy = true;
    try {
      const { ctx } = this;
      let changed = false;
      const scoped = devices.filter((d) => this.inScope(d));
      const onImage = (kernelName: string): boolean => {
        const d = devices.find((x) => x.name === kernelName);
        return d !== undefined && this.liesOnImage(d, devices);
      };
      for (const d of scoped) {
        if (d.notReady || !wantsUnlock(ctx, d)) continue;
        const path = ctx.log.timed(`unlock ${d.name}`, () => unlockLuks(ctx, d, () => ctx.devices.scan()));
        const name = path.slice('/dev/mapper/'.length);
        this.crypts.push({ name, device: d.name });
        // on an image: the shutdown hand-off closes it before the image's devices go
        if (onImage(d.name)) recordStackedDevice(ctx.sys, name);
        changed = true;
      }
      const before = this.lvm.activated.length;
      if (this.lvm.step(scoped)) changed = true;
      for (const lv of this.lvm.activated.slice(before)) if (lv.pvDevices.some(onImage)) recordStackedDevice(ctx.sys, lv.dmName);
      return changed;
    } finally {
      this.busy = false;
    }
  }

  /**
   * Whether `dev` is an image's device (vdisk…) or lies, through the LUKS volumes and LVs
   * made at this boot, on one: such devices go into the shutdown hand-off's record, and
   * resume= refuses them.
   */
  private liesOnImage(dev: BlockDeviceInfo, devices: BlockDeviceInfo[], depth = 0): boolean {
    const dm = dev.dmName;
    if (dm === undefined || depth > 8) return false;
    if (dm.startsWith('vdisk')) return true;
    const below = [...this.crypts.filter((c) => c.name === dm).map((c) => c.device), ...this.lvm.activated.filter((l) => l.dmName === dm).flatMap((l) => l.pvDevices)];
    return below.some((name) => {
      const d = devices.find((x) => x.name === name);
      return d !== undefined && this.liesOnImage(d, devices, depth + 1);
    });
  }

  private inScope(d: BlockDeviceInfo): boolean {
    const { plan } = this.ctx;
    if (plan.root.kind !== 'vdisk') return true; // a plain root, or a tmpfs root's archive host
    if (d.fsType === 'crypto_LUKS' && d.uuid && plan.stack.luks.uuids.includes(d.uuid.toLowerCase())) return true;
    if (d.fsType === 'LVM2_member' && (plan.stack.lvm.vgs.length || plan.stack.lvm.lvs.length)) return true;
    // an image's devices, and what vdboot made on top of them
    return d.dmName !== undefined && (d.dmName.startsWith('vdisk') || this.crypts.some((c) => c.name === d.dmName) || this.lvm.activated.some((l) => l.dmName === d.dmName));
  }

  /** What to add when the root never appears: VGs missing PVs. */
  notes(): string[] {
    return this.lvm.notes();
  }

  /**
   * resume=: hands the swap device to the kernel (/sys/power/resume) once unlocking and
   * activation are done and before anything is mounted: the root of a plain boot, the
   * archive's host of a root=tmpfs: boot (whose system keeps its swap on the disk beside the
   * archive). With a hibernation image there the kernel restores it and this never returns;
   * without one it returns and the boot goes on. Called once; later calls do nothing.
   *
   * A system in an image (root=vdisk:, `images` given) resumes only when the record in the
   * swap's boot bits (resume-record.ts) shows the image's tables are the ones it hibernated
   * with; each read-write boot writes that record. A swap on an rd.vdisk.attach= image of a
   * plain or tmpfs root is refused.
   */
  resume(images?: readonly VdiskPlan[]): void {
    const { ctx } = this;
    const spec = ctx.plan.stack.resume;
    if (!spec || this.resumed) return;
    this.resumed = true;
    const found = waitForDevice(ctx, spec, 'resume device');
    // named on the console as /dev/mapper/NAME when device-mapper's, as the system names it
    const dev = found.dmName ? { ...found, path: `/dev/mapper/${found.dmName}` } : found;
    if (ctx.plan.root.kind === 'vdisk') {
      if (!this.imageAllowsResume(spec, dev, found.path, images ?? [])) return;
    } else if (this.liesOnImage(dev, ctx.devices.scan())) {
      ctx.log.warn(`resume=${formatDeviceSpec(spec)} is ignored: ${dev.path} lies on an image attached by rd.vdisk.attach=, and vdboot resumes only a system whose root is the image (root=vdisk:), whose tables it records at each boot`);
      return;
    }
    // logged first: with a hibernation image the kernel restores it inside the write below
    ctx.log.info(`resume=${formatDeviceSpec(spec)}: handing ${dev.path} (${dev.major}:${dev.minor}) to the kernel; a hibernation image there is restored now`);
    try {
      writeText(ctx.sys, '/sys/power/resume', `${dev.major}:${dev.minor}\n`);
      ctx.log.info(`resume=${formatDeviceSpec(spec)}: no hibernation image on ${dev.path}; booting normally`);
    } catch (e) {
      throw new BootFailure(`resume=${formatDeviceSpec(spec)}: the kernel refused ${dev.path} (${dev.major}:${dev.minor}) as its resume device (${(e as Error).message}). Remove resume= to boot without resuming.`);
    }
  }

  /**
   * root=vdisk: with resume=: true when the kernel may be handed the swap. A hibernated swap
   * is resumed only when its record equals the image's tables now; otherwise the boot goes
   * on without it (the system's swapon makes the swap anew) and the record is cleared, so the
   * stale image can never be restored later. A swap without one gets this boot's record.
   */
  private imageAllowsResume(spec: DeviceSpec, dev: BlockDeviceInfo, ioPath: string, images: readonly VdiskPlan[]): boolean {
    const { ctx } = this;
    const what = `resume=${formatDeviceSpec(spec)}`;
    const vp = images.find((p) => p.root !== undefined || p.rootDeferred !== undefined) ?? images[0];
    if (!vp) {
      ctx.log.warn(`${what} is ignored: no image was set up`);
      return false;
    }
    if (images.length > 1) {
      ctx.log.warn(`${what} is ignored: resuming is supported with the root image alone, and ${images.length - 1} more ${images.length === 2 ? 'is' : 'are'} attached (rd.vdisk.attach=)`);
      return false;
    }
    if (vp.mode !== 'rw' || vp.path !== 'direct') {
      ctx.log.warn(`${what} is ignored: ${vp.imagePath} is mapped ${vp.path === 'direct' ? '' : `on the ${vp.path} path `}in ${vp.mode} mode; vdboot resumes only an image mapped read-write on the direct path (device-mapper over the host's sectors), whose tables it can record`);
      return false;
    }
    const devices = ctx.devices.scan();
    const hostDev = devices.find((d) => d.path === vp.hostDevice || (d.aliases ?? []).includes(vp.hostDevice));
    const host = hostDev?.partuuid ? `PARTUUID=${hostDev.partuuid.toLowerCase()}` : hostDev?.dmName ? `dm:${hostDev.dmName}` : hostDev?.uuid ? `UUID=${hostDev.uuid.toLowerCase()}` : undefined;
    if (!host) {
      ctx.log.warn(`${what} is ignored: the image's host ${vp.hostDevice} has neither a partition UUID nor a filesystem UUID, so vdboot cannot tell it is the same partition at the next boot`);
      return false;
    }
    const chain = vp.chain.map((c) => `${c.format} ${c.subformat} ${c.size}`).join(' → ');
    const now: ResumeIdentity = { image: vp.imagePath, host, chain, tables: mapHash(vp.map), writeIds: vp.writeIds.found };
    const next: ResumeIdentity = { ...now, writeIds: vp.writeIds.after };
    let page: Uint8Array;
    try {
      const reader = openBlockReader(ctx.sys, ioPath, dev.size);
      try {
        page = reader.read(0, Math.min(4096, dev.size));
      } finally {
        reader.close();
      }
    } catch (e) {
      ctx.log.warn(`${what} is ignored: ${dev.path} could not be read (${(e as Error).message})`);
      return false;
    }
    const state = swapState(page);
    const bits = readBootBits(page.subarray(0, RESUME_RECORD_BYTES));
    if (state === 'none') {
      ctx.log.warn(`${what} is ignored: ${dev.path} is not a swap area (no swap signature at the end of its first 4 KiB)`);
      return false;
    }
    if (state === 'hibernated') {
      const why = bits.kind === 'record' ? resumeDifferences(bits.id, now)
        : bits.kind === 'damaged' ? [`vdboot's record in its first 1 KiB is damaged (${bits.why})`]
          : ['it holds no record of the tables it hibernated with (it was not booted read-write by vdboot with this resume=)'];
      if (!why.length) {
        ctx.log.info(`${what}: ${dev.path} holds a hibernation image made with ${vp.imagePath}'s tables as they are now (${host}, the same extents and write ids)`);
        return true;
      }
      ctx.log.warn(
        `${what}: ${dev.path} holds a hibernation image, but it is NOT restored: ${why.join('; ')}. Restoring it would write through the old tables onto sectors that are no longer the image's. ` +
          `The system boots afresh; what was open at hibernation is lost, and its swapon makes the swap anew. To restore it instead, put the image back as it was at hibernation and boot again.`,
      );
      if (bits.kind === 'record' || bits.kind === 'damaged') this.writeRecord(dev, ioPath, new Uint8Array(RESUME_RECORD_BYTES), what, 'cleared the record, so this hibernation image is never restored later');
      return false;
    }
    if (bits.kind === 'other') {
      ctx.log.warn(`${what}: the first 1 KiB of ${dev.path} holds other data (a boot loader?), so vdboot leaves it and writes no record; a hibernation of this system will not be resumed`);
      return true;
    }
    if (bits.kind === 'record' && !resumeDifferences(bits.id, next).length) return true;
    let record: Uint8Array;
    try {
      record = encodeResumeRecord(next);
    } catch (e) {
      ctx.log.warn(`${what}: no record written, so a hibernation of this boot will not be resumed: ${(e as Error).message}`);
      return true;
    }
    this.writeRecord(dev, ioPath, record, what, `recorded ${vp.imagePath}'s tables in its first 1 KiB (${host}, map ${next.tables.slice(0, 12)}…), so a hibernation of this boot can be resumed`);
    return true;
  }

  private writeRecord(dev: BlockDeviceInfo, ioPath: string, bytes: Uint8Array, what: string, done: string): void {
    const { sys, log } = this.ctx;
    try {
      writeSynced(sys, ioPath, [{ offset: 0, bytes }]);
      log.info(`${what}: ${dev.path}: ${done}`);
    } catch (e) {
      throw new BootFailure(`${what}: writing ${dev.path}'s first 1 KiB failed (${(e as Error).message}). Remove resume= to boot without it.`);
    }
  }
}

/**
 * root=vdisk: whose root lies behind LUKS/LVM inside the image: by rd.vdisk.root's spec
 * (waiting as for any root, unlocking and activating on the way), or the only Linux
 * filesystem on the devices unlocking and activation made — or, among several, the only
 * btrfs when rootflags= names a btrfs subvolume (subvol=/subvolid=), the rule a plain
 * btrfs in an image follows (vdisk.ts). The members of one multi-device btrfs are one
 * filesystem.
 */
export function findStackedRoot(ctx: InitContext, deferred: { spec?: DeviceSpec; why: string }): BlockDeviceInfo {
  if (deferred.spec) return waitForDevice(ctx, deferred.spec, 'root filesystem inside the image');
  const stack = ctx.stack as StorageStack;
  let devices = ctx.devices.scan();
  while (stack.onDevices(devices)) devices = ctx.devices.scan();
  const made = new Set([...stack.crypts.map((c) => c.name), ...stack.lvm.activated.map((l) => l.dmName)]);
  const mine = devices.filter((d) => d.dmName !== undefined && made.has(d.dmName));
  const linux = oneEachFilesystem(mine.filter((d) => d.fsType !== undefined && LINUX_FS.has(d.fsType)));
  const name = (d: BlockDeviceInfo): string => d.aliases?.[1] ?? d.aliases?.[0] ?? d.path;
  if (linux.length === 1) {
    ctx.log.info(`the root is ${name(linux[0]!)} (${linux[0]!.fsType}): ${deferred.why}`);
    return linux[0]!;
  }
  const choice = ctx.plan.vdisk.root;
  const subvol = choice.by === 'auto' ? choice.subvol : undefined;
  const btrfs = linux.filter((d) => d.fsType === 'btrfs');
  if (subvol && btrfs.length === 1) {
    ctx.log.info(`the root is ${name(btrfs[0]!)} (btrfs): the only btrfs among the ${linux.length} Linux filesystems behind the image's LUKS/LVM layers, as rootflags=${subvol} names a btrfs subvolume`);
    return btrfs[0]!;
  }
  const notes = stack.notes().map((n) => `${n}\n`).join('');
  const btrfsNote = subvol ? ` rootflags=${subvol} names a btrfs subvolume, but ${btrfs.length ? `${btrfs.length} of them are btrfs` : 'none of them is btrfs'}.` : '';
  throw new BootFailure(`${linux.length ? `${linux.length} Linux filesystems` : 'No Linux filesystem'} appeared behind the image's LUKS/LVM layers, so vdboot cannot tell which one is root.${btrfsNote}\n` +
    `Devices made:\n${describeDevices(mine)}\n${notes}Name the root with rd.vdisk.root=UUID=…, LABEL=… or /dev/mapper/VG-LV.`);
}

/** One device per filesystem: the members of a multi-device btrfs share its UUID and count once. */
function oneEachFilesystem(devices: BlockDeviceInfo[]): BlockDeviceInfo[] {
  const seen = new Set<string>();
  return devices.filter((d) => {
    if (d.fsType !== 'btrfs' || !d.uuid) return true;
    if (seen.has(d.uuid)) return false;
    seen.add(d.uuid);
    return true;
  });
}
