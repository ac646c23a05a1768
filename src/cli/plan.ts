/**
 * `vdboot plan --cmdline '…' --disk host.img [--disk …] [--json]`: the boot planner run
 * on the host against disk image files, as the init would run it at boot: the devices it
 * would find, the image chain, the data path and why, the device-mapper tables, the mounts.
 * Disk files become sda, sdb, … (partitions sda1, …) in the order given.
 */
import * as fs from 'node:fs';
import type { Command, CliIO } from './main.ts';
import { UsageError } from './map.ts';
import { parsePartitionTable, sliceReader } from '../formats/partitions.ts';
import { probeFilesystem } from '../formats/probe.ts';
import { openFileReader } from '../sys/node-reader.ts';
import { describeDevices } from '../boot/devices.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo } from '../boot/devspec.ts';
import { PlanError, planBoot, type BootPlan } from '../boot/plan.ts';
import { findImage, type ClosableReader, type HostDevice, type OpenedHostFs, imageHostFor } from '../boot/hostdev.ts';
import { describeVdiskPlan, planVdisk, type VdiskPlan } from '../boot/vdisk.ts';
import { describeLayers, keyStory } from '../boot/layers.ts';
import { vdhostPlan, HOST_MOUNT } from '../boot/vdisk-exec.ts';
import type { BlockReader } from '../formats/block-reader.ts';
import { isExpansionNeeded } from '../boot/expand-plan.ts';
import { bitLockerPlanStop, isBitLockerHost } from '../boot/bitlocker.ts';
import { readBitLocker } from '../formats/bitlocker.ts';

/** Block devices from disk image files: whole disks and their partitions, probed like discovery does at boot. */
export function diskFileDevices(files: string[]): { devices: HostDevice[]; close(): void } {
  const opened: ClosableReader[] = [];
  const devices: HostDevice[] = [];
  const letters = 'abcdefghijklmnopqrstuvwxyz';
  files.forEach((file, i) => {
    const disk = openFileReader(file);
    opened.push(disk);
    const name = `sd${letters[i] ?? `x${i}`}`;
    const keepOpen = (r: BlockReader): ClosableReader => ({ name: r.name, size: r.size, read: (o, l) => r.read(o, l), close() { /* closed with the disk */ } });
    const probe = (info: BlockDeviceInfo, r: BlockReader) => {
      try {
        const p = probeFilesystem(r);
        if (p) {
          info.fsType = p.type;
          if (p.uuid) info.uuid = p.uuid;
          if (p.label !== undefined) info.label = p.label;
        }
      } catch { /* unreadable: no filesystem */ }
    };
    const whole: BlockDeviceInfo = { name, path: `/dev/${name}`, major: 8, minor: i * 16, size: disk.size - (disk.size % 512) };
    let table;
    try { table = parsePartitionTable(disk); } catch { table = undefined; }
    if (table && table.kind !== 'none') whole.table = table.kind;
    else probe(whole, disk);
    devices.push({ info: whole, open: () => keepOpen(disk) });
    for (const p of table?.partitions ?? []) {
      if (p.extended) continue;
      const info: BlockDeviceInfo = { name: `${name}${p.number}`, path: `/dev/${name}${p.number}`, major: 8, minor: i * 16 + p.number, size: p.size, parent: name, partNumber: p.number, partuuid: p.partuuid };
      if (p.name) info.partlabel = p.name;
      const reader = sliceReader(disk, p.start, p.size, info.path);
      probe(info, reader);
      devices.push({ info, open: () => keepOpen(reader) });
    }
  });
  return { devices, close: () => { for (const r of opened) r.close(); } };
}

export interface BootPlanReport {
  plan: BootPlan;
  devices: BlockDeviceInfo[];
  vdisks: VdiskPlan[];
  /** the mounts the init would make, in order */
  mounts: { source: string; target: string; fstype: string; readOnly: boolean; note?: string }[];
  /** the device-mapper view of the whole host partition, when a direct mapping holds it */
  vdhost?: ReturnType<typeof vdhostPlan>;
  /** LUKS volumes and LVM PVs: on the disks (read without a key) and inside images (where a key is asked) */
  layers: string[];
}

/** Plans a boot against host devices, opening every image the command line names. */
export function planAgainstDevices(cmdline: string, devices: HostDevice[], opts: { nbd?: boolean; allowOutside?: boolean } = {}): BootPlanReport {
  const plan = planBoot(cmdline);
  if ((plan.root.kind === 'vdisk' && plan.root.nbd) || plan.vdisk.attach.some((a) => a.nbd)) {
    throw new PlanError('vdboot plan reads images from the disks given with --disk; it does not connect to NBD servers. To see the plan of a network image, give its file: --cmdline \'root=vdisk:/FILE …\' with a disk holding it, or "vdboot inspect FILE" on the server.');
  }
  const vdisks: VdiskPlan[] = [];
  const hosts: OpenedHostFs[] = [];
  const report: BootPlanReport = { plan, devices: devices.map((d) => d.info), vdisks, mounts: [], layers: [] };
  // a root=vdisk: boot looks only inside the image, unless rd.luks.uuid / rd.lvm.* name a disk's
  if (plan.root.kind === 'block' || plan.stack.luks.uuids.length || plan.stack.lvm.vgs.length || plan.stack.lvm.lvs.length) {
    report.layers.push(...describeLayers(devices.filter((d) => d.info.fsType === 'crypto_LUKS' || d.info.fsType === 'LVM2_member').map((d) => ({ name: d.info.path, reader: d.open() })), plan));
  }
  try {
    let index = 0;
    const planOne = (hostSpec: Parameters<typeof findImage>[1], path: string, root: boolean) => {
      // A BitLocker host: its protectors are shown, and the dry run stops (it has no key).
      const bitlk = hostSpec && devices.find((d) => isBitLockerHost(d.info) && deviceMatches(hostSpec, d.info));
      if (bitlk) {
        const r = bitlk.open();
        try { throw bitLockerPlanStop(bitlk.info, readBitLocker(r), plan.vdisk.bitlockerKey, path); } finally { r.close(); }
      }
      const found = findImage(devices, hostSpec, path);
      hosts.push(found.host);
      const allowOutside = opts.allowOutside === true || plan.vdisk.allowOutside === true;
      const imageIndex = index++;
      const req = { index: imageIndex, path: found.file.path, mode: plan.vdisk.mode, map: plan.vdisk.map, expand: plan.vdisk.expand, nbd: opts.nbd === true, ...(allowOutside ? { allowOutside } : {}), ...(root ? { root: plan.vdisk.root } : {}), ...(plan.vdisk.overlay && imageIndex === 0 ? { persistentOverlay: true } : {}) };
      const vp = planVdisk(req, imageHostFor(found.host, [found.file]));
      vdisks.push(vp);
      for (const p of vp.partitions) {
        if (p.fsType === 'crypto_LUKS' && p.uuid) report.layers.push(`/dev/mapper/${p.name} (in ${vp.imagePath}): LUKS, UUID ${p.uuid} → ${keyStory(plan, p.uuid)}`);
        if (p.fsType === 'LVM2_member') report.layers.push(`/dev/mapper/${p.name} (in ${vp.imagePath}): LVM PV ${p.uuid ?? ''}${plan.stack.lvm.enabled ? ', activated at boot' : ' — not activated (rd.lvm=0)'}`);
      }
      return vp;
    };
    if (plan.root.kind === 'vdisk') {
      const vp = planOne(plan.root.host, plan.root.path, true);
      if (vp.root) report.mounts.push({ source: vp.root.device.path, target: '/root', fstype: plan.rootFsType ?? vp.root.partition.fsType ?? '?', readOnly: plan.readOnly });
      else if (vp.rootDeferred) report.mounts.push({ source: vp.rootDeferred.spec ? formatDeviceSpec(vp.rootDeferred.spec) : '(found at boot)', target: '/root', fstype: plan.rootFsType ?? '?', readOnly: plan.readOnly, note: `after unlocking and activation: ${vp.rootDeferred.why}` });
    }
    for (const a of plan.vdisk.attach) planOne(a.host, a.path, false);
    if (plan.root.kind === 'block') {
      const spec = plan.root.device;
      const attached: BlockDeviceInfo[] = vdisks.flatMap((v) => v.partitions.map((p) => ({ name: p.name, path: `/dev/mapper/${p.name}`, major: 0, minor: 0, size: p.size, fsType: p.fsType, uuid: p.uuid, label: p.label, partuuid: p.partuuid, partlabel: p.partlabel })));
      const dev = [...devices.map((d) => d.info), ...attached].find((d) => deviceMatches(spec, d));
      if (dev || !report.layers.length) report.mounts.push({ source: dev?.path ?? `(${formatDeviceSpec(spec)}: no such device among the disks given)`, target: '/root', fstype: plan.rootFsType ?? dev?.fsType ?? '?', readOnly: plan.readOnly });
      else report.mounts.push({ source: formatDeviceSpec(spec), target: '/root', fstype: plan.rootFsType ?? '?', readOnly: plan.readOnly, note: 'looked for after unlocking and activation (layers above)' });
    } else if (plan.root.kind === 'tmpfs') {
      report.mounts.push({ source: 'tmpfs', target: '/root', fstype: 'tmpfs', readOnly: false, note: `unpacked from ${plan.root.path}` });
    }
    const direct = vdisks.find((v) => v.path === 'direct') ?? vdisks[0];
    if (direct) {
      const hostInfo = devices.find((d) => d.info.path === direct.hostDevice)!.info;
      report.vdhost = vdhostPlan(hostInfo);
      report.mounts.push({ source: `/dev/mapper/${report.vdhost.name}`, target: HOST_MOUNT, fstype: hostInfo.fsType ?? '?', readOnly: !vdisks.some((v) => v.hostMountWritable), note: 'best effort: the boot goes on without it' });
    }
    return report;
  } finally {
    for (const h of hosts) h.close();
  }
}

export function formatReport(r: BootPlanReport): string {
  const out: string[] = [];
  out.push('devices found:', describeDevices(r.devices));
  for (const w of r.plan.warnings) out.push(`warning: ${w}`);
  for (const v of r.vdisks) out.push(...describeVdiskPlan(v));
  if (r.layers.length) out.push('layers:', ...r.layers.map((l) => `  ${l}`));
  if (r.vdhost) out.push(`dm ${r.vdhost.name} (uuid ${r.vdhost.uuid}): 0 ${r.vdhost.targets[0]!.length} linear ${r.vdhost.targets[0]!.params}`);
  out.push('mounts:');
  for (const m of r.mounts) out.push(`  ${m.source} on ${m.target} (${m.fstype}, ${m.readOnly ? 'ro' : 'rw'})${m.note ? ` — ${m.note}` : ''}`);
  return `${out.join('\n')}\n`;
}

export const command: Command = {
  summary: 'dry-run a boot: the devices, image chain, dm tables and mounts the init would make for a command line',
  usage: "vdboot plan --cmdline 'root=vdisk:LABEL=Windows:/VMs/linux.vhdx …' --disk host.img [--disk …] [--json] [--nbd] [--allow-outside]\n" +
    '  --disk FILE  a disk image file standing for a disk of the machine (sda, sdb, … in order)\n' +
    '  --json       the plan as JSON (with every device-mapper target)\n' +
    '  --nbd        plan for an initramfs with qemu-nbd and ntfs-3g (mkinitramfs --with qemu-nbd --with ntfs-3g)\n' +
    '  --allow-outside  let images name files outside their folder (as rd.vdisk.allow-outside=1)',
  async run(args: string[], io: CliIO): Promise<number> {
    let cmdline: string | undefined;
    const disks: string[] = [];
    let json = false;
    let nbd = false;
    let allowOutside = false;
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      const value = () => {
        const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : args[++i];
        if (v === undefined) throw new UsageError(`${a} needs a value\n${this.usage}`);
        return v;
      };
      if (a === '--cmdline' || a.startsWith('--cmdline=')) cmdline = value();
      else if (a === '--disk' || a.startsWith('--disk=')) disks.push(value());
      else if (a === '--json') json = true;
      else if (a === '--nbd') nbd = true;
      else if (a === '--allow-outside') allowOutside = true;
      else throw new UsageError(`unknown argument ${a}\n${this.usage}`);
    }
    if (cmdline === undefined) throw new UsageError(`--cmdline is required\n${this.usage}`);
    for (const d of disks) if (!fs.existsSync(d)) throw new UsageError(`--disk ${d}: no such file`);
    const { devices, close } = diskFileDevices(disks);
    try {
      const report = planAgainstDevices(cmdline, devices, { nbd, allowOutside });
      if (json) io.stdout(`${JSON.stringify({ ...report, vdisks: report.vdisks.map((v) => ({ ...v, map: undefined, headerUpdate: v.headerUpdate && { ...v.headerUpdate, writes: v.headerUpdate.writes.map((w) => ({ offset: w.offset, length: w.bytes.length })) } })) }, null, 1)}\n`);
      else io.stdout(formatReport(report));
      return 0;
    } catch (e) {
      const err = e as Error;
      if (err.name === 'FormatError' && ['kernel-host', 'bitlocker-host'].includes((err as { field?: string }).field ?? '')) {
        // Not a failure: at boot the kernel mounts that host (or cryptsetup unlocks it), which this machine cannot do with a disk file.
        const warnings = planBoot(cmdline).warnings.map((w) => `warning: ${w}\n`).join('');
        io.stdout(`devices found:\n${describeDevices(devices.map((d) => d.info))}\n${warnings}${err.message}\n`);
        return 0;
      }
      if (isExpansionNeeded(err)) {
        // Not a failure: the init expands the image first (it needs the host mounted
        // read-write, which a dry run does not do), then plans again for the direct path.
        io.stdout(`devices found:\n${describeDevices(devices.map((d) => d.info))}\nat boot, before mapping: ${err.message}\n`);
        return 0;
      }
      if (err.name === 'FormatError' || err.name === 'PlanError') {
        io.stderr(`vdboot plan: the boot would fail here:\n${err.message}\n`);
        return 1;
      }
      throw e;
    } finally {
      close();
    }
  },
};
