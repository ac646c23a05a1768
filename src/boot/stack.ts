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
import { unlockLuks, wantsUnlock } from './luks-unlock.ts';
import { LvmActivator } from './lvm-activate.ts';
import { LINUX_FS } from './vdisk.ts';
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
   * Refused for images (root=vdisk:, or a swap on an rd.vdisk.attach= image): the image's
   * device tables must be the ones recorded at hibernation, which vdboot cannot prove, and
   * resuming onto other sectors would corrupt.
   */
  resume(): void {
    const { ctx } = this;
    const spec = ctx.plan.stack.resume;
    if (!spec || this.resumed) return;
    this.resumed = true;
    const refusal = `resume=${formatDeviceSpec(spec)} is ignored: resuming inside an image is refused, since vdboot cannot prove its device tables are the ones recorded at hibernation (a moved image file would resume onto the wrong sectors)`;
    if (ctx.plan.root.kind === 'vdisk') {
      ctx.log.warn(refusal);
      return;
    }
    const dev = waitForDevice(ctx, spec, 'resume device');
    if (this.liesOnImage(dev, ctx.devices.scan())) {
      ctx.log.warn(`${refusal}; ${dev.path} lies on an image attached by rd.vdisk.attach=`);
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
