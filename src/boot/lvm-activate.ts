/**
 * LVM2 activation by vdboot itself (no lvm binary) for linear and striped LVs; thin, cache,
 * raid, mirror and snapshot LVs through LVM's own program when the initramfs has it
 * (lvm-program.ts), else refused naming the type. The PVs among the devices found are
 * read (src/formats/lvm.ts), their VGs assembled from the newest metadata copy, and the
 * LVs asked for created as device-mapper devices with LVM's own names and uuids
 * (/dev/mapper/VG-LV, uuid LVM-<vg uuid><lv uuid>) plus the /dev/VG/LV links, so the booted
 * system's LVM and udev take them for their own.
 *
 * Which LVs: rd.lvm.lv=VG/LV, else those of rd.lvm.vg=VG, else the LV the root (and
 * resume=) names by path, else every LV of every VG. rd.lvm=0: none.
 *
 * Only device-mapper tables are written (to the kernel); nothing on the PVs changes. An LV
 * whose PVs are not all present yet is left for a later scan (another disk may still
 * appear); `notes()` says which VG misses which PV if the boot then gives up.
 */
import type { BlockReader } from '../formats/block-reader.ts';
import { assembleVgs, lvDmName, lvDmUuid, lvTable, scanPv, unsupportedSegmentType, type AssembledVg, type LogicalVolume, type PvScan } from '../formats/lvm.ts';
import { findModule } from '../formats/manifest.ts';
import { isSysError } from '../sys/sys.ts';
import { openBlockReader } from './blockdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import { DeviceMapper } from './dm.ts';
import type { BlockDeviceInfo, DeviceSpec } from './devspec.ts';
import { readTextOr } from './fsutil.ts';
import { activateWithLvmProgram } from './lvm-program.ts';

export interface ActivatedLv {
  vg: string;
  lv: string;
  dmName: string;
  dmUuid: string;
  /** the kernel names of the PV devices it lies on */
  pvDevices: string[];
}

/** Which LVs a plan asks for: explicit VG/LV names, whole VGs, or everything (null). */
export function wantedLvs(ctx: InitContext): { lvs: Set<string>; vgs: Set<string>; all: boolean } {
  const o = ctx.plan.stack.lvm;
  const lvs = new Set(o.lvs);
  const vgs = new Set(o.vgs);
  if (lvs.size || vgs.size) return { lvs, vgs, all: false };
  const byPath = [rootSpec(ctx), ctx.plan.stack.resume].flatMap((s) => (s ? lvOfPath(s) : []));
  if (byPath.length) return { lvs: new Set(byPath), vgs, all: false };
  return { lvs, vgs, all: true };
}

function rootSpec(ctx: InitContext): DeviceSpec | undefined {
  const r = ctx.plan.root;
  if (r.kind === 'block') return r.device;
  if (r.kind === 'vdisk' && ctx.plan.vdisk.root.by === 'spec') return ctx.plan.vdisk.root.spec;
  if (r.kind === 'tmpfs') return r.host;
  return undefined;
}

/** /dev/VG/LV or /dev/mapper/VG-LV → "VG/LV" (LVM's dash doubling undone). */
export function lvOfPath(spec: DeviceSpec): string[] {
  if (spec.by !== 'path') return [];
  const mapper = /^\/dev\/mapper\/((?:[^-]|--)+)-((?:[^-]|--)+)$/.exec(spec.value);
  if (mapper) return [`${mapper[1]!.replace(/--/g, '-')}/${mapper[2]!.replace(/--/g, '-')}`];
  const direct = /^\/dev\/([^/]+)\/([^/]+)$/.exec(spec.value);
  if (direct && !['mapper', 'disk', 'vdhost', 'block', 'char'].includes(direct[1]!)) return [`${direct[1]}/${direct[2]}`];
  return [];
}

export class LvmActivator {
  private readonly scans = new Map<string, PvScan>();
  private readonly active: ActivatedLv[] = [];
  private readonly refused = new Set<string>();
  private lastVgs: AssembledVg[] = [];
  private dm?: DeviceMapper;

  constructor(private readonly ctx: InitContext) {}

  get activated(): readonly ActivatedLv[] {
    return this.active;
  }

  /**
   * Reads the PVs among `devices` not read before and activates every wanted LV whose PVs
   * are all present. Returns true when it created a device (the caller scans again).
   */
  step(devices: BlockDeviceInfo[]): boolean {
    const { ctx } = this;
    if (!ctx.plan.stack.lvm.enabled) return false;
    let added = false;
    for (const d of devices) {
      if (d.fsType !== 'LVM2_member' || d.notReady) continue;
      const key = `${d.name}:${d.size}`;
      if (this.scans.has(key)) continue;
      let reader: (BlockReader & { close(): void }) | undefined;
      try {
        reader = openBlockReader(ctx.sys, d.path, d.size);
        const s = scanPv(reader);
        if (s) {
          this.scans.set(key, { ...s, device: d.name });
          added = true;
          for (const c of s.copies) if (c.error) ctx.log.debug(`LVM: ${c.error}`);
        }
      } catch (e) {
        if (isSysError(e)) continue; // not readable yet: tried again at the next scan
        this.scans.set(key, { device: d.name, label: { sector: 0, pvUuid: '', deviceSize: d.size, dataAreas: [], metadataAreas: [] }, copies: [] });
        ctx.log.warn(`${d.path} looks like an LVM PV but its label cannot be used: ${(e as Error).message}`);
      } finally {
        reader?.close();
      }
    }
    if (!added) return false;
    const vgs = assembleVgs([...this.scans.values()].filter((s) => s.label.pvUuid));
    this.lastVgs = vgs;
    const byName = new Map(devices.map((d) => [d.name, d]));
    const want = wantedLvs(ctx);
    let created = false;
    for (const a of vgs) {
      for (const n of a.notes) ctx.log.warn(`LVM: ${n}`);
      a.notes.length = 0;
      for (const lv of a.vg.lvs) {
        const id = `${a.vg.name}/${lv.name}`;
        const explicitly = want.lvs.has(id) || want.vgs.has(a.vg.name);
        if (!lv.visible || !(explicitly || want.all)) continue;
        if (this.active.some((x) => x.vg === a.vg.name && x.lv === lv.name) || this.refused.has(id)) continue;
        const needs = this.pvsOf(a, lv);
        if (needs.some((u) => !a.devices.has(u))) continue; // maybe later; notes() tells if never
        const other = unsupportedSegmentType(lv);
        if (other) {
          const tool = ctx.manifest.tools.lvm;
          if (tool) {
            if (a.missing.length) continue; // lvm refuses an incomplete VG; notes() tells if it stays so
            if (this.viaProgram(tool, a, lv, other, explicitly, byName)) created = true;
            continue;
          }
          this.refused.add(id);
          const msg = `LV ${id} is a ${other} volume: vdboot activates linear and striped LVs itself, and this initramfs has no lvm program for ${other} volumes`;
          if (explicitly) throw new BootFailure(`${msg}. Build the initramfs with "vdboot mkinitramfs --with lvm" (Debian's lvm2, and thin-provisioning-tools for thin and cache volumes, on the build machine), boot a root on a linear or striped LV, or convert it (lvconvert) from another system.`);
          ctx.log.warn(`${msg} (vdboot mkinitramfs --with lvm adds it); it is left inactive`);
          continue;
        }
        ctx.log.timed(`lvm ${id}`, () => this.create(a, lv, (u) => byName.get(a.devices.get(u)!)));
        created = true;
      }
    }
    return created;
  }

  /**
   * One LV activated by `lvm lvchange -ay` (the VG complete): recorded like vdboot's own, with
   * its /dev/VG/LV link. A failure stops the boot when the LV was asked for (root, rd.lvm.lv,
   * rd.lvm.vg), else it is left inactive with a warning.
   */
  private viaProgram(tool: string, a: AssembledVg, lv: LogicalVolume, type: string, explicitly: boolean, byName: Map<string, BlockDeviceInfo>): boolean {
    const { ctx } = this;
    const id = `${a.vg.name}/${lv.name}`;
    const pvs = [...a.devices.values()].map((n) => byName.get(n)).filter((d): d is BlockDeviceInfo => d !== undefined);
    const r = ctx.log.timed(`lvm ${id}`, () => activateWithLvmProgram(ctx, tool, a, lv, pvs));
    if (!r.ok) {
      this.refused.add(id);
      const msg = `lvm could not activate LV ${id} (a ${type} volume; exit ${r.exitCode}): ${r.message || 'no message'}`;
      if (explicitly) throw new BootFailure(`${msg}. From the rescue shell, "lvm lvchange -ay ${id}" shows the problem again; a thin pool or cache that fails its check may need "lvconvert --repair" from another system.`);
      ctx.log.warn(`${msg}; it is left inactive`);
      return false;
    }
    const { sys } = ctx;
    try { sys.mkdir(`/dev/${a.vg.name}`, 0o755); } catch { /* exists */ }
    try { sys.symlink(`../mapper/${r.dmName}`, `/dev/${a.vg.name}/${lv.name}`); } catch { /* exists: lvm made it */ }
    this.active.push({ vg: a.vg.name, lv: lv.name, dmName: r.dmName, dmUuid: r.dmUuid, pvDevices: [...new Set(pvs.map((d) => d.name))] });
    ctx.log.info(`LVM: activated ${id} as /dev/mapper/${r.dmName} with lvm (${type}, ${(lv.sectors / 2048).toFixed(1)} MiB; metadata seqno ${a.vg.seqno})`);
    return true;
  }

  private pvsOf(a: AssembledVg, lv: LogicalVolume): string[] {
    const keys = new Set(lv.segments.flatMap((s) => s.stripes.map((st) => st.pv)));
    return a.vg.pvs.filter((p) => keys.has(p.key)).map((p) => p.uuid);
  }

  /**
   * Creates one LV's dm device, read-only when any PV device is (an image opened ro or as
   * a snapshot), then its /dev/VG/LV link. A failure after creation removes the device.
   */
  private create(a: AssembledVg, lv: LogicalVolume, deviceOf: (pvUuid: string) => BlockDeviceInfo | undefined): void {
    const { sys, log } = this.ctx;
    const used: BlockDeviceInfo[] = [];
    const targets = lvTable(a, lv, (u) => {
      const d = deviceOf(u);
      if (!d) return undefined;
      used.push(d);
      return `${d.major}:${d.minor}`;
    });
    const readOnly = used.some((d) => readTextOr(sys, `/sys/class/block/${d.name}/ro`)?.trim() === '1');
    const name = lvDmName(a.vg.name, lv.name);
    const uuid = lvDmUuid(a.vg.uuid, lv.uuid);
    if (!this.dm) {
      // a plain root does not preload device-mapper: load it the first time an LV is made
      if (findModule(this.ctx.manifest, 'dm_mod')) this.ctx.modules.reportFailures(this.ctx.modules.load(['dm_mod']));
      this.dm = new DeviceMapper(sys);
    }
    this.dm.create(name, uuid, targets, readOnly);
    try { sys.mkdir(`/dev/${a.vg.name}`, 0o755); } catch { /* exists */ }
    try { sys.symlink(`../mapper/${name}`, `/dev/${a.vg.name}/${lv.name}`); } catch { /* exists */ }
    this.active.push({ vg: a.vg.name, lv: lv.name, dmName: name, dmUuid: uuid, pvDevices: [...new Set(used.map((d) => d.name))] });
    log.info(`LVM: activated ${a.vg.name}/${lv.name} as /dev/mapper/${name} (${targets.map((t) => t.type).join('+')}, ${(lv.sectors / 2048).toFixed(1)} MiB${readOnly ? ', read-only' : ''}; metadata seqno ${a.vg.seqno} from ${a.source.device})`);
  }

  /** For a boot that gives up: each VG that misses PVs, with their uuids and what to try. */
  notes(): string[] {
    return this.lastVgs.filter((a) => a.missing.length).map((a) =>
      `VG ${a.vg.name} is missing PV ${a.missing.map((p) => `${p.uuid}${p.deviceHint ? ` (last seen as ${p.deviceHint})` : ''}`).join(', ')}: attach that disk, or activate only complete VGs with rd.lvm.vg=VG (its LVs on the PVs present were ${this.active.some((x) => x.vg === a.vg.name) ? 'activated' : 'not activated'})`);
  }
}
