/**
 * Device specs as dracut and the kernel accept them: `/dev/…`, `UUID=`, `LABEL=`,
 * `PARTUUID=`, `PARTLABEL=`, and the udev symlink forms `/dev/disk/by-uuid/…` etc.,
 * which vdboot resolves itself since the initramfs has no udev.
 */

export type DeviceSpec =
  | { by: 'path'; value: string }
  | { by: 'uuid'; value: string }
  | { by: 'label'; value: string }
  | { by: 'partuuid'; value: string }
  | { by: 'partlabel'; value: string };

/** What discovery knows of one block device; the fields a spec can match. */
export interface BlockDeviceInfo {
  /** kernel name: "vda1" */
  name: string;
  /** "/dev/vda1" */
  path: string;
  major: number;
  minor: number;
  /** bytes */
  size: number;
  /** the whole disk's kernel name for a partition, else undefined */
  parent?: string;
  partNumber?: number;
  /** filesystem probed from the superblock */
  fsType?: string;
  uuid?: string;
  label?: string;
  partuuid?: string;
  partlabel?: string;
  /** "gpt" / "mbr" for a whole disk with a table */
  table?: string;
  /** device-mapper devices: their name and uuid (/sys/class/block/dm-N/dm/) */
  dmName?: string;
  dmUuid?: string;
  /** other paths that name this device: /dev/mapper/NAME, and /dev/VG/LV for an LVM LV */
  aliases?: string[];
  /**
   * Listed in /sys but its node refused to open (ENXIO): the kernel registers a disk in
   * sysfs a moment before it can be opened (6.12's virtio_blk, seen under emulation). It is
   * no match for any spec until a later scan reads it.
   */
  notReady?: boolean;
  /**
   * Byte ranges of this device that read as zeros and drop writes: the metadata areas an
   * unlocked BitLocker volume's mapping fills with `zero` targets (bitlocker.ts). No image
   * file may lie there.
   */
  deadRanges?: ReadonlyArray<{ offset: number; length: number }>;
}

const PREFIXES: [string, DeviceSpec['by']][] = [
  ['UUID=', 'uuid'],
  ['LABEL=', 'label'],
  ['PARTUUID=', 'partuuid'],
  ['PARTLABEL=', 'partlabel'],
  ['/dev/disk/by-uuid/', 'uuid'],
  ['/dev/disk/by-label/', 'label'],
  ['/dev/disk/by-partuuid/', 'partuuid'],
  ['/dev/disk/by-partlabel/', 'partlabel'],
];

/** Parses a device spec; returns undefined when the text is none of the known forms. */
export function parseDeviceSpec(text: string): DeviceSpec | undefined {
  for (const [prefix, by] of PREFIXES) {
    if (text.startsWith(prefix)) {
      let raw = text.slice(prefix.length);
      // root=LABEL="my root": the kernel keeps quotes inside a value; a person means the label.
      if (raw.length >= 2 && raw.startsWith('"') && raw.endsWith('"')) raw = raw.slice(1, -1);
      if (raw === '') return undefined;
      // udev escapes spaces and slashes in by-label links as \x20 and \x2f.
      const value = prefix.startsWith('/dev/disk/') ? raw.replace(/\\x([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16))) : raw;
      return { by, value };
    }
  }
  if (text.startsWith('/dev/') && text.length > 5) return { by: 'path', value: text };
  return undefined;
}

export function formatDeviceSpec(spec: DeviceSpec): string {
  switch (spec.by) {
    case 'path': return spec.value;
    case 'uuid': return `UUID=${spec.value}`;
    case 'label': return `LABEL=${spec.value}`;
    case 'partuuid': return `PARTUUID=${spec.value}`;
    case 'partlabel': return `PARTLABEL=${spec.value}`;
  }
}

/** UUIDs compare without case and, for FAT/NTFS serials, without dashes' position mattering. */
function sameId(a: string | undefined, b: string): boolean {
  return a !== undefined && a.toLowerCase() === b.toLowerCase();
}

export function deviceMatches(spec: DeviceSpec, dev: BlockDeviceInfo): boolean {
  switch (spec.by) {
    case 'path': return spec.value === dev.path || spec.value === `/dev/${dev.name}` || (dev.aliases?.includes(spec.value) ?? false);
    case 'uuid': return sameId(dev.uuid, spec.value);
    case 'label': return dev.label === spec.value;
    case 'partuuid': return sameId(dev.partuuid, spec.value);
    case 'partlabel': return dev.partlabel === spec.value;
  }
}

/**
 * The names a device-mapper device is known by: /dev/mapper/NAME, and for an LV made by
 * LVM or by vdboot (dm uuid LVM-…) also /dev/VG/LV, LVM's own link. LVM's dm name doubles
 * dashes inside the VG and LV names and joins them with a single one.
 */
export function dmAliases(dmName: string, dmUuid: string): string[] {
  const out = [`/dev/mapper/${dmName}`];
  if (dmUuid.startsWith('LVM-')) {
    const m = /^((?:[^-]|--)+)-((?:[^-]|--)+)$/.exec(dmName);
    if (m) out.push(`/dev/${m[1]!.replace(/--/g, '-')}/${m[2]!.replace(/--/g, '-')}`);
  }
  return out;
}
