/**
 * Superblock probing: which filesystem (or container) a block device holds, with its
 * UUID, LABEL and version, as `blkid -p` reports them, without blkid.
 *
 * Each prober reads only the few sectors its format keeps its identity in (and, for FAT,
 * exFAT and NTFS, the root directory or $Volume record where the label lives), so probing
 * a multi-terabyte device costs a handful of small reads. Values follow libblkid's
 * conventions so that `root=UUID=…` / `LABEL=…` written for a blkid-based initramfs
 * match here too.
 */
import { bitLockerVariant, isVistaBitLocker, looksLikeBitLocker } from './bitlocker.ts';
import type { BlockReader } from './block-reader.ts';
import { utf16leDecode, utf8Decode } from './text.ts';

export interface ProbeResult {
  /** blkid's TYPE: ext2, ext3, ext4, xfs, btrfs, vfat, exfat, ntfs, iso9660, squashfs, swap, crypto_LUKS, BitLocker, LVM2_member, linux_raid_member, … */
  type: string;
  /** blkid's USAGE */
  usage: 'filesystem' | 'other' | 'crypto' | 'raid';
  uuid?: string;
  /** blkid's UUID_SUB (btrfs device, md member) */
  uuidSub?: string;
  label?: string;
  version?: string;
  /** blkid's SEC_TYPE (ext2 for a journalled ext3, msdos for FAT12/16) */
  secType?: string;
  /** blkid's BLOCK_SIZE */
  blockSize?: number;
  /** further keys blkid reports, by blkid's name (LABEL_FATBOOT, SYSTEM_ID, SUBSYSTEM, EXT_JOURNAL, …) */
  extra?: Record<string, string>;
}

/** The result as `blkid -p -o export` names its keys (without DEVNAME). */
export function blkidTags(r: ProbeResult): Record<string, string> {
  const t: Record<string, string> = { TYPE: r.type, USAGE: r.usage };
  if (r.uuid !== undefined) t.UUID = r.uuid;
  if (r.uuidSub !== undefined) t.UUID_SUB = r.uuidSub;
  if (r.label !== undefined) t.LABEL = r.label;
  if (r.version !== undefined) t.VERSION = r.version;
  if (r.secType !== undefined) t.SEC_TYPE = r.secType;
  if (r.blockSize !== undefined) t.BLOCK_SIZE = String(r.blockSize);
  return { ...t, ...r.extra };
}

// ---------------------------------------------------------------------------------------
// Byte helpers

function le16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function le32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function le64(b: Uint8Array, o: number): number {
  return le32(b, o) + le32(b, o + 4) * 2 ** 32;
}
function be16(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}
function be32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function ascii(b: Uint8Array, o: number, n: number): string {
  let s = '';
  for (let i = 0; i < n; i++) s += String.fromCharCode(b[o + i]!);
  return s;
}
function hex(b: Uint8Array, o: number, n: number): string {
  let s = '';
  for (let i = 0; i < n; i++) s += b[o + i]!.toString(16).padStart(2, '0');
  return s;
}
function isPowerOf2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}
/** A 16-byte UUID stored in big-endian order (ext, xfs, btrfs, swap, md), as text; undefined when all zero. */
function uuidText(b: Uint8Array, o: number): string | undefined {
  const h = hex(b, o, 16);
  if (/^0+$/.test(h)) return undefined;
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
/** `XXXX-XXXX` from a 32-bit volume serial stored little-endian (FAT, exFAT). */
function serialText(b: Uint8Array, o: number): string {
  const x = (i: number) => b[o + i]!.toString(16).toUpperCase().padStart(2, '0');
  return `${x(3)}${x(2)}-${x(1)}${x(0)}`;
}
function rtrim(s: string): string {
  return s.replace(/[\s\0]+$/, '');
}
/** A NUL-terminated label field, trailing white space removed, as blkid sets labels; undefined when empty. */
function labelFrom(bytes: Uint8Array, decode: (b: Uint8Array) => string = utf8Decode): string | undefined {
  let end = bytes.length;
  if (decode === utf16beDecode) {
    for (let i = 0; i + 1 < bytes.length; i += 2) if (bytes[i] === 0 && bytes[i + 1] === 0) { end = i; break; }
  } else {
    const z = bytes.indexOf(0);
    if (z >= 0) end = z;
  }
  const s = rtrim(decode(bytes.subarray(0, end)));
  return s === '' ? undefined : s;
}
function latin1(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]!);
  return s;
}
function utf16beDecode(b: Uint8Array): string {
  const sw = new Uint8Array(b.length & ~1);
  for (let i = 0; i + 1 < b.length; i += 2) { sw[i] = b[i + 1]!; sw[i + 1] = b[i]!; }
  return utf16leDecode(sw);
}

/** Reads within the device, or undefined when the range is outside it (a small device). */
class Probe {
  constructor(readonly r: BlockReader) {}
  read(offset: number, length: number): Uint8Array | undefined {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.r.size) return undefined;
    return this.r.read(offset, length);
  }
}

// ---------------------------------------------------------------------------------------
// Probers, one per format. Each returns null when the device is not that format.

const EXT_COMPAT_HAS_JOURNAL = 0x4;
const EXT_INCOMPAT_FILETYPE = 0x2;
const EXT_INCOMPAT_RECOVER = 0x4;
const EXT_INCOMPAT_JOURNAL_DEV = 0x8;
const EXT_INCOMPAT_META_BG = 0x10;
const EXT_RO_COMPAT_SUPP_EXT2 = 0x1 | 0x2 | 0x4; // sparse_super, large_file, btree_dir
const EXT2_INCOMPAT_SUPP = EXT_INCOMPAT_FILETYPE | EXT_INCOMPAT_META_BG;
const EXT3_INCOMPAT_SUPP = EXT_INCOMPAT_FILETYPE | EXT_INCOMPAT_RECOVER | EXT_INCOMPAT_META_BG;
const EXT_FLAGS_TEST_FILESYS = 0x4;

/** ext2/3/4 and external journals: the superblock at 1024, named by its feature flags as blkid names it. */
function probeExt(p: Probe): ProbeResult | null {
  const sb = p.read(1024, 1024);
  if (!sb || sb[0x38] !== 0x53 || sb[0x39] !== 0xef) return null;
  const logBlock = le32(sb, 0x18);
  if (logBlock > 6) return null;
  const compat = le32(sb, 0x5c);
  const incompat = le32(sb, 0x60);
  const roCompat = le32(sb, 0x64);
  // The metadata_csum superblock checksum is not verified: blkid 2.38 does not either, and a
  // root= that blkid-based tools printed must keep matching.
  let type: string;
  let usage: ProbeResult['usage'] = 'filesystem';
  const journal = (compat & EXT_COMPAT_HAS_JOURNAL) !== 0;
  if (incompat & EXT_INCOMPAT_JOURNAL_DEV) { type = 'jbd'; usage = 'other'; }
  else if (!journal && !(roCompat & ~EXT_RO_COMPAT_SUPP_EXT2) && !(incompat & ~EXT2_INCOMPAT_SUPP)) type = 'ext2';
  else if (journal && !(roCompat & ~EXT_RO_COMPAT_SUPP_EXT2) && !(incompat & ~EXT3_INCOMPAT_SUPP)) type = 'ext3';
  else type = le32(sb, 0x160) & EXT_FLAGS_TEST_FILESYS ? 'ext4dev' : 'ext4';
  const r: ProbeResult = {
    type, usage,
    uuid: uuidText(sb, 0x68),
    label: labelFrom(sb.subarray(0x78, 0x88)),
    version: `${le32(sb, 0x4c)}.${le16(sb, 0x3e)}`,
    blockSize: 1024 << logBlock,
  };
  if (type !== 'jbd' && type !== 'ext2' && !(incompat & ~EXT2_INCOMPAT_SUPP)) r.secType = 'ext2';
  if (journal) {
    const j = uuidText(sb, 0xd0);
    if (j) r.extra = { EXT_JOURNAL: j };
  }
  if (type === 'jbd' && r.uuid) r.extra = { LOGUUID: r.uuid };
  return clean(r);
}

/** XFS: "XFSB" and the superblock at 0 (big-endian). */
function probeXfs(p: Probe): ProbeResult | null {
  const sb = p.read(0, 512);
  if (!sb || ascii(sb, 0, 4) !== 'XFSB') return null;
  const blockSize = be32(sb, 4);
  const sectSize = be16(sb, 102);
  const agCount = be32(sb, 88);
  if (!isPowerOf2(blockSize) || blockSize < 512 || blockSize > 65536 || !isPowerOf2(sectSize) || sectSize < 512 || agCount === 0) return null;
  return clean({ type: 'xfs', usage: 'filesystem', uuid: uuidText(sb, 32), label: labelFrom(sb.subarray(108, 120)), blockSize: sectSize });
}

/** btrfs: the primary superblock at 64 KiB. */
function probeBtrfs(p: Probe): ProbeResult | null {
  const sb = p.read(0x10000, 0x1000);
  if (!sb || ascii(sb, 0x40, 8) !== '_BHRfS_M') return null;
  return clean({
    type: 'btrfs', usage: 'filesystem',
    uuid: uuidText(sb, 0x20),
    uuidSub: uuidText(sb, 0xc9 + 66),
    label: labelFrom(sb.subarray(0x12b, 0x12b + 256)),
    blockSize: le32(sb, 0x90),
  });
}

/** squashfs: "hsqs" (little-endian, version 4) or the old formats (squashfs3). */
function probeSquashfs(p: Probe): ProbeResult | null {
  const sb = p.read(0, 96);
  if (!sb) return null;
  const magic = ascii(sb, 0, 4);
  if (magic === 'hsqs') {
    const major = le16(sb, 28);
    const minor = le16(sb, 30);
    return { type: major >= 4 ? 'squashfs' : 'squashfs3', usage: 'filesystem', version: `${major}.${minor}` };
  }
  if (magic === 'sqsh') {
    return { type: 'squashfs3', usage: 'filesystem', version: `${be16(sb, 28)}.${be16(sb, 30)}` };
  }
  return null;
}

/** Linux swap (v1 header at 1024, signature at the end of the first page) and suspend images. */
function probeSwap(p: Probe): ProbeResult | null {
  for (const page of [4096, 8192, 16384, 32768, 65536]) {
    const sig = p.read(page - 10, 10);
    if (!sig) return null;
    const s = ascii(sig, 0, 10);
    if (s === 'SWAP-SPACE') return { type: 'swap', usage: 'other', version: '0' };
    const suspend = ['S1SUSPEND', 'S2SUSPEND', 'ULSUSPEND', 'LINHIB0001'].find((m) => s.startsWith(m));
    if (s !== 'SWAPSPACE2' && !suspend && !s.startsWith('\xedWSWAP')) continue;
    const h = p.read(1024, 64);
    if (!h) return null;
    const version = le32(h, 0) === 1 || be32(h, 0) === 1 ? 1 : 0;
    if (version !== 1) return null;
    return clean({
      type: suspend ? 'swsuspend' : 'swap', usage: 'other',
      version: '1',
      uuid: uuidText(h, 12),
      label: labelFrom(h.subarray(28, 44)),
    });
  }
  return null;
}

/** LUKS1 and LUKS2 (primary header). */
function probeLuks(p: Probe): ProbeResult | null {
  const h = p.read(0, 512);
  if (!h || ascii(h, 0, 6) !== 'LUKS\xba\xbe') return null;
  const version = be16(h, 6);
  const r: ProbeResult = { type: 'crypto_LUKS', usage: 'crypto', version: String(version), uuid: labelFrom(h.subarray(168, 208)) };
  if (version === 2) {
    r.label = labelFrom(h.subarray(24, 72));
    const sub = labelFrom(h.subarray(208, 256));
    if (sub) r.extra = { SUBSYSTEM: sub };
  }
  return clean(r);
}

/**
 * BitLocker (Windows 7 and later) and BitLocker To Go: the boot sector's signature, VERSION
 * from the first FVE metadata block, as blkid (which, like this, does not require the
 * BitLocker GUID for a "-FVE-FS-" sector). Windows Vista's layout is named without VERSION.
 */
function probeBitLocker(p: Probe): ProbeResult | null {
  const bs = p.read(0, 512);
  if (!bs || !looksLikeBitLocker(bs)) return null;
  const r: ProbeResult = { type: 'BitLocker', usage: 'crypto' };
  const at = bitLockerVariant(bs) === 'to-go' ? 440 : isVistaBitLocker(bs) ? -1 : 176;
  if (at > 0) {
    const fve = p.read(le64(bs, at), 16);
    if (fve && ascii(fve, 0, 8) === '-FVE-FS-') r.version = String(le16(fve, 10));
  }
  return r;
}

/** LVM2 physical volume: "LABELONE" in one of the first four sectors. */
function probeLvm2(p: Probe): ProbeResult | null {
  const head = p.read(0, 2048);
  if (!head) return null;
  for (let s = 0; s < 4; s++) {
    const o = s * 512;
    if (ascii(head, o, 8) !== 'LABELONE' || ascii(head, o + 24, 8) !== 'LVM2 001') continue;
    if (le64(head, o + 8) !== s) continue;
    const pvOff = o + le32(head, o + 20);
    if (pvOff + 32 > head.length) return null;
    const id = ascii(head, pvOff, 32);
    if (!/^[0-9A-Za-z!#]{32}$/.test(id)) return null;
    const uuid = [id.slice(0, 6), id.slice(6, 10), id.slice(10, 14), id.slice(14, 18), id.slice(18, 22), id.slice(22, 26), id.slice(26)].join('-');
    return { type: 'LVM2_member', usage: 'raid', uuid, version: 'LVM2 001' };
  }
  return null;
}

/** Linux MD RAID member, metadata 1.x (at the end: 1.0, at 0: 1.1, at 4 KiB: 1.2). */
function probeMdRaid(p: Probe): ProbeResult | null {
  const size = p.r.size;
  const ends = size >= 12288 ? [Math.floor((size - 8192) / 4096) * 4096] : [];
  const where: [number, string][] = [[0, '1.1'], [4096, '1.2'], ...ends.map((o): [number, string] => [o, '1.0'])];
  for (const [off, version] of where) {
    const sb = p.read(off, 256);
    if (!sb || le32(sb, 0) !== 0xa92b4efc || le32(sb, 4) !== 1) continue;
    if (le64(sb, 128) * 512 !== off) continue;
    return clean({
      type: 'linux_raid_member', usage: 'raid', version,
      uuid: uuidText(sb, 16),
      uuidSub: uuidText(sb, 168),
      label: labelFrom(sb.subarray(32, 64)),
    });
  }
  return null;
}

/** ISO 9660 with the Joliet supplementary descriptor, named as blkid names it. */
function probeIso9660(p: Probe): ProbeResult | null {
  let pvd: Uint8Array | undefined;
  let joliet: Uint8Array | undefined;
  let boot: Uint8Array | undefined;
  for (let i = 0; i < 16 && (!pvd || !joliet || !boot); i++) {
    const d = p.read(0x8000 + i * 2048, 2048);
    if (!d || ascii(d, 1, 5) !== 'CD001' || d[0] === 0xff) break;
    if (d[0] === 0 && !boot) boot = d;
    else if (d[0] === 1 && !pvd) pvd = d;
    else if (d[0] === 2 && !joliet && ['%/@', '%/C', '%/E'].includes(ascii(d, 88, 3))) joliet = d;
  }
  if (!pvd) return null;
  const r: ProbeResult = { type: 'iso9660', usage: 'filesystem', blockSize: 2048 };
  const extra: Record<string, string> = {};
  const idField = (key: string, off: number, len: number, alwaysMerge: boolean) => {
    const a = pvd!.subarray(off, off + len);
    const u = joliet?.subarray(off, off + len);
    const asciiEmpty = isBlank(a) || (!alwaysMerge && a[0] === 0x5f);
    const uniEmpty = !u || (!alwaysMerge && (isBlank16(u) || (u[0] === 0 && u[1] === 0x5f)));
    let v: string | undefined;
    if (alwaysMerge) {
      if (u) v = mergeJolietAscii(u, a) ?? labelFrom(u, utf16beDecode);
      else v = labelFrom(a, latin1);
    } else if (!uniEmpty && !asciiEmpty) v = mergeJolietAscii(u!, a) ?? labelFrom(u!, utf16beDecode);
    else if (!uniEmpty) v = labelFrom(u!, utf16beDecode);
    else if (!asciiEmpty) v = labelFrom(a, latin1);
    if (v !== undefined) extra[key] = v;
  };
  idField('SYSTEM_ID', 8, 32, true);
  idField('VOLUME_SET_ID', 190, 128, true);
  idField('PUBLISHER_ID', 318, 128, false);
  idField('DATA_PREPARER_ID', 446, 128, false);
  idField('APPLICATION_ID', 574, 128, false);
  const uuid = isoDateUuid(pvd, 830) ?? isoDateUuid(pvd, 813);
  if (uuid) r.uuid = uuid;
  if (boot) {
    const b = labelFrom(boot.subarray(7, 39), latin1);
    if (b) extra.BOOT_SYSTEM_ID = b;
  }
  if (joliet) r.version = 'Joliet Extension';
  const vol = pvd.subarray(40, 72);
  const label = joliet ? mergeJolietAscii(joliet.subarray(40, 72), vol) ?? labelFrom(joliet.subarray(40, 72), utf16beDecode) : labelFrom(vol, latin1);
  if (label) r.label = label;
  if (Object.keys(extra).length) r.extra = extra;
  return r;
}

function isBlank(b: Uint8Array): boolean {
  if (b[0] === 0) return true;
  return b.every((c) => c === 0x20 || (c >= 9 && c <= 13));
}
function isBlank16(b: Uint8Array): boolean {
  for (let i = 0; i + 1 < b.length; i += 2) if (b[i] !== 0 || !(b[i + 1] === 0x20 || (b[i + 1]! >= 9 && b[i + 1]! <= 13))) return false;
  return true;
}

/**
 * Joliet names hold 16 UTF-16 characters, the primary descriptor's 32 ASCII ones ('_' for
 * what ASCII cannot hold). Where the Joliet name is a prefix of the ASCII one (ignoring
 * case and '_'), the full name is Joliet's characters followed by the rest of the ASCII
 * name, as blkid reconstructs it. Undefined when they disagree.
 */
function mergeJolietAscii(u16: Uint8Array, a: Uint8Array): string | undefined {
  const len = a.length;
  const out: number[] = [];
  let u = 0;
  let i = 0;
  const upper = (c: number) => (c >= 0x61 && c <= 0x7a ? c - 32 : c);
  for (; u + 1 < len && i < len; i++, u += 2) {
    if (u16[u]! >= 0xd8 && u16[u]! <= 0xdb && u + 3 < len && u16[u + 2]! >= 0xdc && u16[u + 2]! <= 0xdf) {
      out.push(u16[u]!, u16[u + 1]!);
      u += 2;
    }
    const ac = a[i]!;
    if (ac === 0x5f) out.push(u16[u]!, u16[u + 1]!);
    else if (u16[u] === 0 && u16[u + 1] === 0x5f) out.push(0, ac);
    else if (u16[u] === 0 && upper(ac) === upper(u16[u + 1]!)) out.push(0, ac >= 0x41 && ac <= 0x5a ? u16[u + 1]! : ac);
    else return undefined;
  }
  for (; i < len; i++) out.push(0, a[i]!);
  return labelFrom(new Uint8Array(out), utf16beDecode);
}

function isoDateUuid(d: Uint8Array, o: number): string | undefined {
  const digits = ascii(d, o, 16);
  if (/^0{16}$/.test(digits) && d[o + 16] === 0) return undefined;
  if (digits.includes('\0')) return undefined;
  return `${digits.slice(0, 4)}-${digits.slice(4, 6)}-${digits.slice(6, 8)}-${digits.slice(8, 10)}-${digits.slice(10, 12)}-${digits.slice(12, 14)}-${digits.slice(14, 16)}`;
}

/** NTFS: boot sector, then the $Volume record of the MFT for the label. */
function probeNtfs(p: Probe): ProbeResult | null {
  const bs = p.read(0, 512);
  if (!bs || ascii(bs, 3, 8) !== 'NTFS    ') return null;
  const bps = le16(bs, 11);
  let spc = bs[13]!;
  if (spc > 0x80) spc = 2 ** (256 - spc);
  if (!isPowerOf2(bps) || bps < 256 || bps > 4096 || !isPowerOf2(spc)) return null;
  const cluster = bps * spc;
  const cpr = (bs[0x40]! << 24) >> 24;
  const recordSize = cpr > 0 ? cpr * cluster : 2 ** -cpr;
  if (!isPowerOf2(recordSize) || recordSize < 256 || recordSize > 65536) return null;
  const mftOffset = le64(bs, 0x30) * cluster;
  const serial = hex(bs.slice(0x48, 0x50).reverse(), 0, 8).toUpperCase();
  const r: ProbeResult = { type: 'ntfs', usage: 'filesystem', uuid: serial, blockSize: bps };
  const rec = p.read(mftOffset + 3 * recordSize, recordSize);
  if (rec && ascii(rec, 0, 4) === 'FILE' && applyFixups(rec, bps)) {
    let off = le16(rec, 0x14);
    while (off + 24 <= rec.length) {
      const type = le32(rec, off);
      const len = le32(rec, off + 4);
      if (type === 0xffffffff || len < 24 || off + len > rec.length) break;
      if (type === 0x60 && rec[off + 8] === 0) {
        const vlen = le32(rec, off + 0x10);
        const voff = le16(rec, off + 0x14);
        if (voff + vlen <= len) {
          const label = rtrim(utf16leDecode(rec.subarray(off + voff, off + voff + vlen)));
          if (label) r.label = label;
        }
        break;
      }
      off += len;
    }
  }
  return r;
}

/** Applies an NTFS record's update sequence array in place; false when it does not check out. */
function applyFixups(rec: Uint8Array, bps: number): boolean {
  const usaOff = le16(rec, 4);
  const usaCount = le16(rec, 6);
  const stride = Math.min(bps, 512);
  if (usaCount === 0 || usaOff + usaCount * 2 > rec.length || (usaCount - 1) * stride > rec.length) return false;
  for (let i = 1; i < usaCount; i++) {
    const end = i * stride - 2;
    if (rec[end] !== rec[usaOff] || rec[end + 1] !== rec[usaOff + 1]) return false;
    rec[end] = rec[usaOff + i * 2]!;
    rec[end + 1] = rec[usaOff + i * 2 + 1]!;
  }
  return true;
}

/** The most root-directory clusters vdboot follows looking for a FAT/exFAT volume label. */
const MAX_DIR_CLUSTERS = 100;
/** …and the most bytes of each cluster (or of a FAT12/16 root directory) it reads. */
const MAX_DIR_READ = 64 * 1024;

/** exFAT: boot sector, then the volume label entry of the root directory. */
function probeExfat(p: Probe): ProbeResult | null {
  const bs = p.read(0, 512);
  if (!bs || ascii(bs, 3, 8) !== 'EXFAT   ') return null;
  const bpsShift = bs[108]!;
  const spcShift = bs[109]!;
  if (bpsShift < 9 || bpsShift > 12 || spcShift > 25 - bpsShift) return null;
  const bps = 2 ** bpsShift;
  const clusterSize = bps * 2 ** spcShift;
  const fatOffset = le32(bs, 80) * bps;
  const heapOffset = le32(bs, 88) * bps;
  const clusterCount = le32(bs, 92);
  const r: ProbeResult = {
    type: 'exfat', usage: 'filesystem',
    uuid: serialText(bs, 100),
    version: `${bs[105]}.${bs[104]}`,
    blockSize: bps,
  };
  let cluster = le32(bs, 96);
  const seen = new Set<number>();
  search: for (let n = 0; n < MAX_DIR_CLUSTERS && cluster >= 2 && cluster < clusterCount + 2 && !seen.has(cluster); n++) {
    seen.add(cluster);
    const dir = p.read(heapOffset + (cluster - 2) * clusterSize, Math.min(clusterSize, MAX_DIR_READ));
    if (!dir) break;
    for (let o = 0; o + 32 <= dir.length; o += 32) {
      const t = dir[o]!;
      if (t === 0) break search;
      if (t === 0x83) {
        const chars = Math.min(dir[o + 1]!, 11);
        const label = rtrim(utf16leDecode(dir.subarray(o + 2, o + 2 + chars * 2)));
        if (label) r.label = label;
        break search;
      }
    }
    const fat = p.read(fatOffset + cluster * 4, 4);
    if (!fat) break;
    cluster = le32(fat, 0);
  }
  return r;
}

const FAT_NO_NAME = 'NO NAME    ';

/** FAT12/16/32: the BIOS parameter block, checked as blkid checks it, and the root directory's label entry. */
function probeVfat(p: Probe): ProbeResult | null {
  const bs = p.read(0, 512);
  if (!bs) return null;
  const magic = ascii(bs, 0x52, 5) === 'MSWIN' || ascii(bs, 0x52, 8) === 'FAT32   ' || ascii(bs, 0x36, 5) === 'MSDOS' ||
    ['FAT16   ', 'FAT12   ', 'FAT     '].includes(ascii(bs, 0x36, 8));
  if (!magic) {
    // Only a jump instruction or the 55 AA signature: old floppies. Require both then.
    if (!(bs[0] === 0xeb || bs[0] === 0xe9) || bs[510] !== 0x55 || bs[511] !== 0xaa) return null;
    if (ascii(bs, 0x36, 8) === 'JFS     ' || ascii(bs, 0x36, 8) === 'HPFS    ') return null;
  }
  const fats = bs[16]!;
  const reserved = le16(bs, 14);
  const media = bs[21]!;
  const spc = bs[13]!;
  const bps = le16(bs, 11);
  if (!fats || !reserved || !(media >= 0xf8 || media === 0xf0) || !isPowerOf2(spc) || !isPowerOf2(bps) || bps < 512 || bps > 4096) return null;
  const dirEntries = le16(bs, 17);
  let sectors = le16(bs, 19);
  if (sectors === 0) sectors = le32(bs, 32);
  const fatLength16 = le16(bs, 22);
  const fatLength = fatLength16 || le32(bs, 36);
  const fatSize = fatLength * fats;
  const dirSectors = Math.ceil((dirEntries * 32) / bps);
  const clusters = Math.floor((sectors - (reserved + fatSize + dirSectors)) / spc);
  const fat32 = !fatLength16 && le32(bs, 36) !== 0;
  const maxClusters = fat32 ? 0x0ffffff6 : clusters > 0xff4 ? 0xfff4 : 0xff4;
  if (clusters > maxClusters || clusters < 0) return null;

  const r: ProbeResult = { type: 'vfat', usage: 'filesystem', blockSize: bps };
  let rootLabel: Uint8Array | undefined;
  let bootLabel: Uint8Array;
  let serialAt: number;
  if (!fat32) {
    rootLabel = findFatLabel(p, (reserved + fatSize) * bps, dirEntries);
    bootLabel = bs.subarray(0x2b, 0x36);
    serialAt = 0x27;
    r.secType = 'msdos';
    if (clusters < 0xff4) r.version = 'FAT12';
    else if (clusters < 0xfff4) r.version = 'FAT16';
  } else {
    const clusterBytes = spc * bps;
    const dataStart = (reserved + fatSize) * bps;
    const fatEntries = Math.floor((fatLength * bps) / 4);
    let next = le32(bs, 44);
    const seen = new Set<number>();
    for (let n = 0; n < MAX_DIR_CLUSTERS && next >= 2 && next < fatEntries && !seen.has(next); n++) {
      seen.add(next);
      rootLabel = findFatLabel(p, dataStart + (next - 2) * clusterBytes, Math.min(clusterBytes, MAX_DIR_READ) / 32);
      if (rootLabel) break;
      const e = p.read(reserved * bps + next * 4, 4);
      if (!e) break;
      next = le32(e, 0) & 0x0fffffff;
    }
    bootLabel = bs.subarray(0x47, 0x52);
    serialAt = 0x43;
    r.version = 'FAT32';
    const fsinfo = le16(bs, 48);
    if (fsinfo) {
      const fi = p.read(fsinfo * bps, 512);
      if (!fi) return null;
      const s1 = ascii(fi, 0, 4);
      const s2 = ascii(fi, 484, 4);
      if (!['RRaA', 'RRdA', '\0\0\0\0'].includes(s1) || !['rrAa', '\0\0\0\0'].includes(s2)) return null;
    }
  }
  const bootText = latin1(bootLabel);
  if (bootText !== FAT_NO_NAME) {
    const b = labelFrom(bootLabel, latin1);
    if (b) r.extra = { LABEL_FATBOOT: b };
  }
  const chosen = rootLabel && latin1(rootLabel) !== FAT_NO_NAME ? rootLabel : bootLabel;
  if (latin1(chosen) !== FAT_NO_NAME) {
    const l = labelFrom(fatLabelFixup(chosen), latin1);
    if (l) r.label = l;
  }
  r.uuid = serialText(bs, serialAt);
  return r;
}

/** A label entry's first byte 0x05 stands for 0xE5 (which would mark a deleted entry). */
function fatLabelFixup(b: Uint8Array): Uint8Array {
  if (b[0] !== 0x05) return b;
  const c = b.slice();
  c[0] = 0xe5;
  return c;
}

/** The volume-label entry among `entries` directory entries at `offset`. */
function findFatLabel(p: Probe, offset: number, entries: number): Uint8Array | undefined {
  const n = Math.min(entries, MAX_DIR_READ / 32);
  const dir = p.read(offset, n * 32);
  if (!dir) return undefined;
  for (let i = 0; i < n; i++) {
    const e = dir.subarray(i * 32, i * 32 + 32);
    if (e[0] === 0) break;
    const attr = e[11]!;
    if (e[0] === 0xe5 || le16(e, 20) !== 0 || le16(e, 26) !== 0 || (attr & 0x3f) === 0x0f) continue;
    if ((attr & (0x08 | 0x10)) === 0x08) return e.slice(0, 11);
  }
  return undefined;
}

function clean(r: ProbeResult): ProbeResult {
  for (const k of Object.keys(r) as (keyof ProbeResult)[]) if (r[k] === undefined) delete r[k];
  return r;
}

/**
 * Containers first (their payload may carry another format's magic), then filesystems
 * with unambiguous magic, FAT last (its signature is the weakest).
 */
const PROBERS: ((p: Probe) => ProbeResult | null)[] = [
  probeLuks, probeBitLocker, probeMdRaid, probeLvm2, probeSwap,
  probeXfs, probeBtrfs, probeExt, probeSquashfs, probeIso9660, probeNtfs, probeExfat, probeVfat,
];

/**
 * Identifies what `reader` holds (a partition or a whole unpartitioned disk), or null when
 * nothing vdboot knows. Reads a few KiB; a truncated or malformed superblock gives null,
 * never an exception from a size field.
 */
export function probeFilesystem(reader: BlockReader): ProbeResult | null {
  const p = new Probe(reader);
  for (const probe of PROBERS) {
    const r = probe(p);
    if (r) return r;
  }
  return null;
}
