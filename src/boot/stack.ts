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
        const dm = devices.find((x) => x.name === kernelName)?.dmName;
        return dm !== undefined && (dm.startsWith('vdisk') || this.crypts.some((c) => c.name === dm) || this.lvm.activated.some((l) => l.dmName === dm));
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
   * activation are done and before anything is mounted. With a hibernation image there the
   * kernel restores it and this never returns; without one it returns and the boot goes on.
   * Refused for images: the image's device tables must be the ones recorded at
   * hibernation, which vdboot cannot prove, and resuming onto other sectors would corrupt.
   */
  resume(): void {
    const { ctx } = this;
    const spec = ctx.plan.stack.resume;
    if (!spec) return;
    if (ctx.plan.root.kind !== 'block') {
      ctx.log.warn(`resume=${formatDeviceSpec(spec)} is ignored: resuming inside an image is refused, since vdboot cannot prove its device tables are the ones recorded at hibernation (a moved image file would resume onto the wrong sectors)`);
      return;
    }
    const dev = waitForDevice(ctx, spec, 'resume device');
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
 * filesystem on the devices unlocking and activation made.
 */
export function findStackedRoot(ctx: InitContext, deferred: { spec?: DeviceSpec; why: string }): BlockDeviceInfo {
  if (deferred.spec) return waitForDevice(ctx, deferred.spec, 'root filesystem inside the image');
  const stack = ctx.stack as StorageStack;
  let devices = ctx.devices.scan();
  while (stack.onDevices(devices)) devices = ctx.devices.scan();
  const made = new Set([...stack.crypts.map((c) => c.name), ...stack.lvm.activated.map((l) => l.dmName)]);
  const mine = devices.filter((d) => d.dmName !== undefined && made.has(d.dmName));
  const linux = mine.filter((d) => d.fsType !== undefined && LINUX_FS.has(d.fsType));
  if (linux.length === 1) {
    ctx.log.info(`the root is ${linux[0]!.aliases?.[1] ?? linux[0]!.aliases?.[0] ?? linux[0]!.path} (${linux[0]!.fsType}): ${deferred.why}`);
    return linux[0]!;
  }
  const notes = stack.notes().map((n) => `${n}\n`).join('');
  throw new BootFailure(`${linux.length ? `${linux.length} Linux filesystems` : 'No Linux filesystem'} appeared behind the image's LUKS/LVM layers, so vdboot cannot tell which one is root.\n` +
    `Devices made:\n${describeDevices(mine)}\n${notes}Name the root with rd.vdisk.root=UUID=…, LABEL=… or /dev/mapper/VG-LV.`);
}
