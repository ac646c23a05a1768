/**
 * What lies between a partition and a filesystem, seen without a key: a LUKS header
 * (version, cipher, key slots, where a passphrase would be asked at boot) and LVM PVs
 * (VG, LVs, their dm names, the filesystem on each linear LV). For `vdboot inspect` and
 * `vdboot plan`; reads only headers and metadata.
 */
import type { BlockReader } from '../formats/block-reader.ts';
import { describeLuks, isLuks, parseLuksHeader } from '../formats/luks.ts';
import { assembleVgs, lvDmName, scanPv, unsupportedSegmentType, type PvScan } from '../formats/lvm.ts';
import { sliceReader } from '../formats/partitions.ts';
import { probeFilesystem } from '../formats/probe.ts';
import { formatDeviceSpec } from './devspec.ts';
import type { BootPlan } from './plan.ts';

export interface LayerSource {
  /** for messages: "sda3", "partition 3" */
  name: string;
  reader: BlockReader;
}

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

/** Where the boot would get the key for a LUKS volume, by the plan (if any). */
export function keyStory(plan: BootPlan | undefined, uuid: string): string {
  if (!plan) return 'unlocked at boot with rd.luks.key=PATH[:KEYDEV] or a passphrase typed on the console';
  const o = plan.stack.luks;
  if (!o.enabled) return 'left locked (rd.luks=0)';
  if (o.uuids.length && !o.uuids.includes(uuid.toLowerCase())) return 'left locked (not in rd.luks.uuid=)';
  const keys = o.keys.filter((k) => !k.uuid || k.uuid === uuid.toLowerCase());
  const name = o.names.find((n) => n.uuid === uuid.toLowerCase())?.name ?? `luks-${uuid.toLowerCase()}`;
  const how = keys.length
    ? `key file ${keys.map((k) => `${k.path}${k.device ? ` on ${formatDeviceSpec(k.device)}` : ' in the initramfs'}`).join(', then ')}; if that fails, a passphrase is asked on the console (${o.tries} tries)`
    : `a passphrase is asked on the console here (${o.tries} tries; rd.luks.key=PATH:KEYDEV gives a key file instead)`;
  return `opened as /dev/mapper/${name}: ${how}`;
}

/** Lines describing the LUKS volumes and LVM PVs among `sources`. */
export function describeLayers(sources: LayerSource[], plan?: BootPlan): string[] {
  const out: string[] = [];
  const scans: PvScan[] = [];
  const readers = new Map<string, BlockReader>();
  for (const s of sources) {
    if (s.reader.size < 4096) continue;
    let head: Uint8Array;
    try { head = s.reader.read(0, 8); } catch { continue; }
    if (isLuks(head)) {
      try {
        const h = parseLuksHeader(s.reader);
        out.push(`${s.name}: ${describeLuks(h)}${h.label ? `, label "${h.label}"` : ''}, UUID ${h.uuid}`);
        out.push(`  → ${keyStory(plan, h.uuid)}; what it holds (PV, filesystem) is known once unlocked`);
        for (const n of h.notes) out.push(`  warning: ${n}`);
      } catch (e) {
        out.push(`${s.name}: LUKS header cannot be read: ${(e as Error).message}`);
      }
      continue;
    }
    try {
      const scan = scanPv(s.reader);
      if (scan) {
        scans.push({ ...scan, device: s.name });
        readers.set(s.name, s.reader);
        for (const c of scan.copies) if (c.error) out.push(`${s.name}: warning: ${c.error}`);
      }
    } catch (e) {
      out.push(`${s.name}: LVM label cannot be used: ${(e as Error).message}`);
    }
  }
  for (const a of assembleVgs(scans)) {
    out.push(`VG ${a.vg.name} (UUID ${a.vg.uuid}, seqno ${a.vg.seqno}, metadata from ${a.source.device}) on ${[...a.devices.values()].join(', ')}${plan && !plan.stack.lvm.enabled ? ' — not activated (rd.lvm=0)' : ''}`);
    for (const m of a.missing) out.push(`  missing PV ${m.uuid}${m.deviceHint ? ` (last seen as ${m.deviceHint})` : ''}: its LVs cannot be activated; rd.lvm.vg= picks complete VGs`);
    for (const n of a.notes) out.push(`  warning: ${n}`);
    for (const lv of a.vg.lvs) {
      if (!lv.visible) continue;
      const other = unsupportedSegmentType(lv);
      const kind = other ?? (lv.segments.some((s) => s.stripes.length > 1) ? 'striped' : 'linear');
      let fs = '';
      const seg = lv.segments[0]!;
      if (!other && lv.segments.length === 1 && seg.stripes.length === 1) {
        const pv = a.vg.pvs.find((p) => p.key === seg.stripes[0]!.pv);
        const dev = pv && a.devices.get(pv.uuid);
        const r = dev && readers.get(dev);
        if (r && pv) {
          try {
            const p = probeFilesystem(sliceReader(r, (pv.peStart + seg.stripes[0]!.extent * a.vg.extentSize) * 512, lv.sectors * 512, `${a.vg.name}/${lv.name}`));
            if (p) fs = `, ${p.type}${p.label ? ` LABEL="${p.label}"` : ''}${p.uuid ? ` UUID=${p.uuid}` : ''}`;
          } catch { /* unreadable: no filesystem shown */ }
        }
      }
      out.push(`  LV ${lv.name}: ${mib(lv.sectors * 512)} ${kind}${other ? ' (needs the lvm program: vdboot refuses it)' : ` → /dev/mapper/${lvDmName(a.vg.name, lv.name)}`}${fs}`);
    }
  }
  return out;
}
