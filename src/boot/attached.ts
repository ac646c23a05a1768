/**
 * The record of an attached image: what the boot (root=vdisk:, rd.vdisk.attach=) and
 * vdiskload made for it, so `vdiskload -l` lists it and `vdiskload -d` takes down exactly
 * that, in order. The boot keeps its records in /run/vdboot/state.json (VdiskState.images);
 * vdiskload one file per image in /run/vdboot/attached/NAME.json. Devices vdboot made
 * that no record describes are still found by their dm uuid (VDBOOT-NAME, VDBOOT-NAME-partN,
 * VDBOOT-NAME-base).
 *
 * Pure: parsing and formatting only (vdiskload.ts reads and writes the files).
 */
import { humanSize } from './devices.ts';
import type { VdiskMode } from './plan.ts';
import type { VdiskPlan } from './vdisk.ts';

export const ATTACHED_DIR = '/run/vdboot/attached';

export interface AttachedImage {
  /** the dm name of the whole disk: /dev/mapper/NAME */
  name: string;
  /** the image's path: on a running system the file's full path, at boot its path on the host */
  image: string;
  /** "/dev/vdb2 (ext4, mounted at /srv)" */
  host: string;
  /** the host's block device ("" when the host has none) */
  hostDevice: string;
  /** "vhdx dynamic", "qcow v1 → raw" */
  format: string;
  /** virtual size in bytes */
  size: number;
  mode: VdiskMode;
  path: 'direct' | 'loop' | 'nbd';
  why: string;
  /** dm names in creation order (taken down in reverse) */
  devices: string[];
  /** the partitions' dm names, with what they hold */
  partitions: { name: string; fsType?: string; label?: string; uuid?: string }[];
  loops: string[];
  nbd?: string;
  /** host files vdiskload made immutable for a direct mapping (their flags are restored at detach) */
  immutable?: string[];
  /** the image file's identity ("major:minor:inode"), to refuse attaching it twice */
  fileId?: string;
  by: 'boot' | 'vdiskload';
}

/** Describes a planned image, once its devices exist. */
export function imageRecord(vp: VdiskPlan, by: AttachedImage['by'], extra: { image?: string; loops?: string[]; nbd?: string; immutable?: string[]; fileId?: string } = {}): AttachedImage {
  const rec: AttachedImage = {
    name: vp.name,
    image: extra.image ?? vp.imagePath,
    host: vp.host,
    hostDevice: vp.hostDevice,
    format: vp.chain.map((l) => (l.subformat && l.subformat !== l.format ? `${l.format} ${l.subformat}` : l.format)).join(' → '),
    size: vp.size,
    mode: vp.mode,
    path: vp.path,
    why: vp.why,
    devices: vp.devices.map((d) => d.name),
    partitions: vp.partitions.map((p) => ({ name: p.name, ...(p.fsType ? { fsType: p.fsType } : {}), ...(p.label ? { label: p.label } : {}), ...(p.uuid ? { uuid: p.uuid } : {}) })),
    loops: extra.loops ?? [],
    by,
  };
  if (extra.nbd) rec.nbd = extra.nbd;
  if (extra.immutable?.length) rec.immutable = extra.immutable;
  if (extra.fileId) rec.fileId = extra.fileId;
  return rec;
}

/** Reads a record written by vdiskload or the boot; undefined for anything that is not one. */
export function parseRecord(text: string): AttachedImage | undefined {
  let v: unknown;
  try { v = JSON.parse(text); } catch { return undefined; }
  return isRecord(v) ? v : undefined;
}

export function isRecord(v: unknown): v is AttachedImage {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  return typeof r.name === 'string' && typeof r.image === 'string' && Array.isArray(r.devices) && r.devices.every((d) => typeof d === 'string') &&
    Array.isArray(r.loops) && typeof r.size === 'number' && (r.mode === 'rw' || r.mode === 'ro' || r.mode === 'snapshot') &&
    (r.path === 'direct' || r.path === 'loop' || r.path === 'nbd');
}

/** A dm device made by vdboot, as the kernel lists it. */
export interface VdbootDmDevice {
  name: string;
  uuid: string;
  /** bytes */
  size: number;
  readOnly: boolean;
}

/** One line of `vdiskload -l`. */
export interface ListEntry {
  name: string;
  image: string;
  format: string;
  size: number;
  mode: string;
  path: string;
  host: string;
  by: string;
  partitions: string[];
}

/**
 * What `vdiskload -l` shows: every record, then the vdboot devices no record describes
 * (grouped by the whole disk their uuid names; image and format unknown).
 */
export function listEntries(records: readonly AttachedImage[], devices: readonly VdbootDmDevice[]): ListEntry[] {
  const out: ListEntry[] = [];
  const known = new Set<string>();
  for (const r of records) {
    for (const d of r.devices) known.add(d);
    out.push({ name: r.name, image: r.image, format: r.format, size: r.size, mode: r.mode, path: r.path, host: r.host, by: r.by, partitions: r.partitions.map((p) => p.name) });
  }
  const orphans = new Map<string, VdbootDmDevice[]>();
  for (const d of devices) {
    if (known.has(d.name) || d.name === 'vdhost') continue;
    const base = /^VDBOOT-(.+?)(?:-part\d+|-base)?$/.exec(d.uuid)?.[1] ?? d.name;
    const list = orphans.get(base) ?? [];
    list.push(d);
    orphans.set(base, list);
  }
  for (const [base, list] of orphans) {
    const whole = list.find((d) => d.name === base) ?? list[0]!;
    out.push({
      name: base, image: '?', format: '?', size: whole.size, mode: whole.readOnly ? 'ro' : '?', path: '?', host: '?', by: 'vdboot (no record)',
      partitions: list.filter((d) => /-part\d+$/.test(d.uuid)).map((d) => d.name),
    });
  }
  return out;
}

/** `losetup -l`-style columns. */
export function formatList(entries: readonly ListEntry[]): string {
  const head = ['NAME', 'IMAGE', 'FORMAT', 'SIZE', 'MODE', 'PATH', 'HOST', 'BY', 'PARTITIONS'];
  const rows = entries.map((e) => [e.name, e.image, e.format, humanSize(e.size), e.mode, e.path, e.host, e.by, e.partitions.join(',') || '-']);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join(' ').trimEnd();
  return [line(head), ...rows.map(line)].join('\n') + '\n';
}
