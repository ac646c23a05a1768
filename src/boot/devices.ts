/**
 * Block device discovery without udev or blkid: the kernel's list in /sys/class/block,
 * nodes from devtmpfs, filesystems by vdboot's own superblock probing, PARTUUID and
 * PARTLABEL from vdboot's own GPT/MBR parsing of the parent disk.
 */
import { parsePartitionTable } from '../formats/partitions.ts';
import { probeFilesystem } from '../formats/probe.ts';
import { isSysError, type Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import { openBlockReader } from './blockdev.ts';
import { dmAliases, type BlockDeviceInfo } from './devspec.ts';
import { readTextOr } from './fsutil.ts';

/** Devices never worth probing: RAM disks, unused loops, empty drives. */
const SKIP = /^(ram\d+|zram\d+)$/;

export class DeviceScanner {
  /** by kernel name; re-probed when the size changes (media inserted, loop attached) */
  private readonly known = new Map<string, BlockDeviceInfo>();
  private readonly tables = new Map<string, { size: number; parts: Map<number, { partuuid?: string; partlabel?: string }>; kind: string; read: boolean }>();

  constructor(private readonly sys: Sys, private readonly log: ConsoleLog) {}

  /** Every block device now present, probed. */
  scan(): BlockDeviceInfo[] {
    let names: string[] = [];
    try { names = this.sys.readdir('/sys/class/block'); } catch { return []; }
    const present: BlockDeviceInfo[] = [];
    const wholeFirst = names.sort((a, b) => (this.isPartition(a) ? 1 : 0) - (this.isPartition(b) ? 1 : 0) || a.localeCompare(b));
    for (const name of wholeFirst) {
      if (SKIP.test(name)) continue;
      const sectors = Number(readTextOr(this.sys, `/sys/class/block/${name}/size`) ?? '0');
      const size = sectors * 512;
      if (!(size > 0)) continue;
      const cached = this.known.get(name);
      if (cached && cached.size === size) {
        present.push(cached);
        continue;
      }
      const { info, complete } = this.probe(name, size);
      // A device whose node or table could not be read yet (its /dev node can appear a moment
      // after its /sys entry) is probed again at the next scan, not remembered half-known.
      if (complete) this.known.set(name, info);
      present.push(info);
    }
    return present;
  }

  private isPartition(name: string): boolean {
    return readTextOr(this.sys, `/sys/class/block/${name}/partition`) !== undefined;
  }

  private probe(name: string, size: number): { info: BlockDeviceInfo; complete: boolean } {
    let complete = true;
    const [major, minor] = (readTextOr(this.sys, `/sys/class/block/${name}/dev`) ?? '0:0').split(':').map(Number);
    const path = `/dev/${name.replace(/!/g, '/')}`;
    const info: BlockDeviceInfo = { name, path, major: major ?? 0, minor: minor ?? 0, size };
    const dmName = readTextOr(this.sys, `/sys/class/block/${name}/dm/name`)?.trim();
    if (dmName) {
      info.dmName = dmName;
      const dmUuid = readTextOr(this.sys, `/sys/class/block/${name}/dm/uuid`)?.trim() ?? '';
      if (dmUuid) info.dmUuid = dmUuid;
      info.aliases = dmAliases(dmName, dmUuid);
    }
    const partNumber = readTextOr(this.sys, `/sys/class/block/${name}/partition`);
    if (partNumber !== undefined) {
      info.partNumber = Number(partNumber);
      // /sys/class/block/vda1 -> ../../devices/…/block/vda/vda1: the parent is the directory above.
      try {
        const link = this.sys.readlink(`/sys/class/block/${name}`).split('/');
        info.parent = link[link.length - 2];
      } catch { /* no parent link: leave it unknown */ }
      const table = info.parent ? this.tableOf(info.parent) : undefined;
      if (info.parent && !table?.read) complete = false;
      const entry = table?.parts.get(info.partNumber);
      if (entry?.partuuid) info.partuuid = entry.partuuid;
      if (entry?.partlabel) info.partlabel = entry.partlabel;
    } else {
      const table = this.tableOf(name);
      if (!table.read) complete = false;
      if (table.kind !== 'none') info.table = table.kind;
    }
    try {
      const reader = openBlockReader(this.sys, path, size);
      try {
        const fs = probeFilesystem(reader);
        if (fs) {
          info.fsType = fs.type;
          if (fs.uuid) info.uuid = fs.uuid;
          if (fs.label) info.label = fs.label;
        }
      } finally {
        reader.close();
      }
    } catch (e) {
      this.log.debug(`probing ${path}: ${(e as Error).message}`);
      if (isSysError(e)) complete = false; // not readable yet; content a probe rejects is final
      if (isSysError(e, 'ENXIO')) info.notReady = true;
    }
    return { info, complete };
  }

  /** The parsed partition table of a whole disk, cached by the disk's size once the disk could be read (`read`). */
  private tableOf(disk: string) {
    const sectors = Number(readTextOr(this.sys, `/sys/class/block/${disk}/size`) ?? '0');
    const size = sectors * 512;
    const cached = this.tables.get(disk);
    if (cached && cached.size === size) return cached;
    const entry = { size, parts: new Map<number, { partuuid?: string; partlabel?: string }>(), kind: 'none', read: false };
    try {
      const reader = openBlockReader(this.sys, `/dev/${disk.replace(/!/g, '/')}`, size);
      try {
        // An MBR on a 4Kn disk counts in 4096-byte sectors: only the device can say so.
        const logical = Number(readTextOr(this.sys, `/sys/class/block/${disk}/queue/logical_block_size`) ?? '512');
        const table = parsePartitionTable(reader, logical === 4096 ? { sectorSize: 4096 } : {});
        entry.kind = table.kind;
        for (const p of table.partitions) {
          entry.parts.set(p.number, { partuuid: p.partuuid, partlabel: p.name || undefined });
        }
        for (const w of table.warnings) this.log.warn(`${disk}: ${w}`);
      } finally {
        reader.close();
      }
      entry.read = true;
    } catch (e) {
      this.log.debug(`partition table of ${disk}: ${(e as Error).message}`);
      // a table the parser rejects is final; a device that could not be opened or read is tried again
      if (!isSysError(e)) entry.read = true;
    }
    if (entry.read) this.tables.set(disk, entry);
    return entry;
  }
}

/** One line per device for the console: what a person needs to write a root= that matches. */
export function describeDevices(devices: BlockDeviceInfo[]): string {
  if (devices.length === 0) return '  (no block devices at all: is the disk controller\'s driver in the initramfs? see `vdboot mkinitramfs --add-module`)';
  return devices
    .map((d) => {
      const facts = [
        d.path.padEnd(14),
        humanSize(d.size).padStart(9),
        d.table ? `${d.table} table` : d.fsType ?? '(no filesystem found)',
        d.label !== undefined ? `LABEL="${d.label}"` : '',
        d.uuid ? `UUID=${d.uuid}` : '',
        d.partuuid ? `PARTUUID=${d.partuuid}` : '',
        d.partlabel ? `PARTLABEL="${d.partlabel}"` : '',
      ];
      return `  ${facts.filter(Boolean).join(' ')}`;
    })
    .join('\n');
}

export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}
