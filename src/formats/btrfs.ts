/**
 * The btrfs superblock (primary copy at 64 KiB) as far as the boot needs it: which
 * filesystem a device belongs to (fsid), which member it is (devid, device UUID) and how
 * many devices the filesystem spans (num_devices), so a root spread over several disks is
 * only mounted once every member is there. The checksum is verified when it is crc32c
 * (btrfs's default); other checksum types are reported, not verified.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import { crc32c } from './crc.ts';
import { utf8Decode } from './text.ts';

export const BTRFS_SUPER_OFFSET = 0x10000;
export const BTRFS_SUPER_SIZE = 0x1000;
const MAGIC = '_BHRfS_M';

/** byte offsets in struct btrfs_super_block (and its embedded struct btrfs_dev_item) */
const SB = {
  csum: 0x00, fsid: 0x20, bytenr: 0x30, magic: 0x40, generation: 0x48, totalBytes: 0x70, numDevices: 0x88,
  sectorSize: 0x90, nodeSize: 0x94, csumType: 0xc4, devItem: 0xc9, label: 0x12b,
} as const;
const DEV_ITEM = { devid: 0, totalBytes: 8, uuid: 66, fsid: 82 } as const;

/** csum_type values (BTRFS_CSUM_TYPE_*) */
export const BTRFS_CSUM_TYPES: Record<number, string> = { 0: 'crc32c', 1: 'xxhash64', 2: 'sha256', 3: 'blake2b' };

export interface BtrfsSuperblock {
  /** the filesystem's UUID, as blkid's UUID */
  fsid: string;
  /** this member's device id (1, 2, …) and UUID (blkid's UUID_SUB) */
  devid: number;
  deviceUuid: string;
  /** how many devices the filesystem spans */
  numDevices: number;
  generation: number;
  label?: string;
  csumType: string;
  /** false only when a crc32c checksum did not match */
  checksumOk: boolean;
}

function le32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function le64(b: Uint8Array, o: number): number {
  return le32(b, o) + le32(b, o + 4) * 2 ** 32;
}
function uuidText(b: Uint8Array, o: number): string {
  const h = Array.from(b.subarray(o, o + 16), (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Parses the 4 KiB superblock (the bytes at BTRFS_SUPER_OFFSET). Throws FormatError when it is none. */
export function parseBtrfsSuperblock(sb: Uint8Array): BtrfsSuperblock {
  if (sb.length < BTRFS_SUPER_SIZE) throw new FormatError(`btrfs superblock: ${sb.length} bytes, expected ${BTRFS_SUPER_SIZE}`, 'length', sb.length);
  if (String.fromCharCode(...sb.subarray(SB.magic, SB.magic + 8)) !== MAGIC) throw new FormatError('not a btrfs superblock (no _BHRfS_M magic at 64 KiB + 0x40)', 'magic');
  const csumCode = sb[SB.csumType]! | (sb[SB.csumType + 1]! << 8);
  const csumType = BTRFS_CSUM_TYPES[csumCode] ?? `unknown (${csumCode})`;
  const checksumOk = csumCode !== 0 || crc32c(sb.subarray(SB.csum + 32, BTRFS_SUPER_SIZE)) === le32(sb, SB.csum);
  const numDevices = le64(sb, SB.numDevices);
  const devid = le64(sb, SB.devItem + DEV_ITEM.devid);
  // the kernel's own limits: at least one device, and a devid is never 0
  if (numDevices < 1 || numDevices > 0xffff) throw new FormatError(`btrfs superblock: num_devices ${numDevices} is out of range`, 'num_devices', numDevices);
  if (devid < 1) throw new FormatError(`btrfs superblock: devid ${devid} is out of range`, 'devid', devid);
  const labelBytes = sb.subarray(SB.label, SB.label + 256);
  const end = labelBytes.indexOf(0);
  const label = utf8Decode(labelBytes.subarray(0, end < 0 ? 256 : end));
  const out: BtrfsSuperblock = {
    fsid: uuidText(sb, SB.fsid),
    devid,
    deviceUuid: uuidText(sb, SB.devItem + DEV_ITEM.uuid),
    numDevices,
    generation: le64(sb, SB.generation),
    csumType,
    checksumOk,
  };
  if (label) out.label = label;
  return out;
}

/** Reads and parses the primary superblock of a device. */
export function readBtrfsSuperblock(reader: BlockReader): BtrfsSuperblock {
  if (reader.size < BTRFS_SUPER_OFFSET + BTRFS_SUPER_SIZE) throw new FormatError(`a device of ${reader.size} bytes is too small for a btrfs superblock`, 'size', reader.size);
  return parseBtrfsSuperblock(reader.read(BTRFS_SUPER_OFFSET, BTRFS_SUPER_SIZE));
}
