/**
 * BitLocker volumes (Windows 7 and later, and BitLocker To Go): what the unencrypted FVE
 * metadata says without a key — the volume's GUID and description, the encryption method,
 * and the protectors (VMK entries) that can unlock it. vdboot never decrypts anything
 * itself: `cryptsetup open --type bitlk` does that at boot. This reader decides whether a
 * host partition is BitLocker, which key the boot must ask for, and refuses what cannot be
 * unlocked (a TPM-only volume) before anything is asked.
 *
 * Layout (all little-endian):
 * - Boot sector: "-FVE-FS-" at 3 (To Go: "MSWIN4.1", a FAT32 boot sector), bytes per
 *   sector at 11, the BitLocker GUID {4967d63b-2e29-4ad8-8399-f6a339e3d001} (used-space-only
 *   encryption: {92a84d3b-dd80-4d0e-9e4e-b1e3284eaed8}) at 160 (To Go: 424), followed by the three FVE metadata block offsets (3 × u64).
 * - Each FVE metadata block: a 64-byte block header ("-FVE-FS-", size in 16-byte units,
 *   version 2, states, volume size, …), a 48-byte metadata header (size, version 1, header
 *   size 48, size copy, volume GUID, nonce counter, encryption method, creation time), then
 *   entries (u16 size, u16 type, u16 value type, u16 version, data) up to the metadata size.
 *   Right after the block (at 16 × size) a validation record holds the block's CRC-32.
 * - A VMK entry (value type 8): GUID, time, u16 unknown, u16 protection, nested entries.
 *
 * Every copy is read and checked (bounds, sizes, CRC-32); the first good one is used and the
 * damaged ones are reported, so a message can name the copy used instead.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import { crc32 } from './crc.ts';
import { guidFromBytes } from './guid.ts';
import { utf16leDecode } from './text.ts';

/** The GUID a BitLocker (and To Go) boot sector carries before its metadata offsets. */
export const BITLOCKER_GUID = '4967d63b-2e29-4ad8-8399-f6a339e3d001';
/** The same for a volume encrypted with "used space only" (encrypt-on-write, Windows 10+). */
export const BITLOCKER_EOW_GUID = '92a84d3b-dd80-4d0e-9e4e-b1e3284eaed8';

function isBitLockerGuid(boot: Uint8Array, at: number): boolean {
  const g = guidFromBytes(boot, at);
  return g === BITLOCKER_GUID || g === BITLOCKER_EOW_GUID;
}
/** Each FVE metadata area is 64 KiB. */
export const FVE_METADATA_AREA = 0x10000;

const BLOCK_HEADER = 64;
const METADATA_HEADER = 48;
const ENTRY_HEADER = 8;
const VMK_FIXED = 28; // GUID 16 + FILETIME 8 + u16 unknown + u16 protection

const ENTRY_VMK = 0x0002;
const ENTRY_DESCRIPTION = 0x0007;
const VALUE_UNICODE = 0x0002;
const VALUE_VMK = 0x0008;
const VALUE_OFFSET_SIZE = 0x000f;

export type BitLockerProtectorKind =
  | 'clear-key' | 'tpm' | 'startup-key' | 'tpm-and-startup-key' | 'tpm-and-pin'
  | 'tpm-pin-and-startup-key' | 'recovery-password' | 'smart-card' | 'password' | 'unknown';

const PROTECTION: Record<number, BitLockerProtectorKind> = {
  0x0000: 'clear-key',
  0x0100: 'tpm',
  0x0200: 'startup-key',
  0x0300: 'tpm-and-startup-key',
  0x0500: 'tpm-and-pin',
  0x0700: 'tpm-pin-and-startup-key',
  0x0800: 'recovery-password',
  0x1000: 'smart-card',
  0x2000: 'password',
};

/** Protectors cryptsetup's bitlk type can open with what vdboot can give it. */
export const UNLOCKABLE_KINDS: readonly BitLockerProtectorKind[] = ['password', 'recovery-password', 'startup-key', 'clear-key'];

export interface BitLockerProtector {
  /** The VMK entry's GUID (a startup key's file is named `<GUID>.BEK`). */
  guid: string;
  kind: BitLockerProtectorKind;
  /** The raw protection value (for `unknown`). */
  protection: number;
  /** The protector's name, when Windows gave it one (e.g. "DiskPassword"). */
  name?: string;
}

export interface BitLockerEncryption {
  /** The FVE method number (0x8000–0x8005). */
  method: number;
  /** As cryptsetup names it: aes-cbc-elephant, aes-cbc-eboiv, aes-xts-plain64. */
  cipher: string;
  /** Key size as dm-crypt gets it (XTS and the diffuser double the AES key). */
  keyBits: number;
  /** Human text: "AES-128-XTS", "AES-256-CBC with the Elephant diffuser", … */
  text: string;
}

export interface BitLockerMetadataCopy {
  index: number;
  offset: number;
  /** Why this copy was not used, or undefined for a good copy. */
  damage?: string;
}

export interface BitLockerVolume {
  /** 'to-go': a removable-drive volume with a FAT32 boot sector (BitLocker To Go). */
  variant: 'bitlocker' | 'to-go';
  /** The boot sector carries the encrypt-on-write GUID (used space only, still converting). */
  encryptOnWrite: boolean;
  /** FVE metadata version (2 for Windows 7 and later). */
  version: number;
  sectorSize: number;
  guid: string;
  description: string;
  /** Size of the encrypted volume in bytes (as the metadata records it). */
  volumeSize: number;
  /** Creation time, Unix milliseconds. */
  created: number;
  encryption: BitLockerEncryption;
  /** FVE states: 1 decrypted, 2 switching, 4 encrypted, 5 paused. */
  state: number;
  nextState: number;
  /** Where the original (encrypted) boot sectors are kept. */
  volumeHeader: { offset: number; size: number };
  protectors: BitLockerProtector[];
  /** The three metadata copies, in order; `used` is the index of the one read. */
  copies: BitLockerMetadataCopy[];
  used: number;
}

function le16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function le32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
/** A u64 as a JavaScript number, or -1 when it does not fit a safe integer. */
function le64(b: Uint8Array, o: number): number {
  const hi = le32(b, o + 4);
  if (hi >= 0x200000) return -1;
  return le32(b, o) + hi * 2 ** 32;
}
function ascii(b: Uint8Array, o: number, n: number): string {
  let s = '';
  for (let i = 0; i < n; i++) s += String.fromCharCode(b[o + i]!);
  return s;
}
function hex4(n: number): string {
  return '0x' + n.toString(16).padStart(4, '0');
}

/** Which BitLocker variant a boot sector is, or null (not BitLocker, or Vista's layout). */
export function bitLockerVariant(boot: Uint8Array): 'bitlocker' | 'to-go' | null {
  if (boot.length < 512) return null;
  const sig = ascii(boot, 3, 8);
  if (sig === '-FVE-FS-' && !isVistaBitLocker(boot) && isBitLockerGuid(boot, 160)) return 'bitlocker';
  if (sig === 'MSWIN4.1' && isBitLockerGuid(boot, 424)) return 'to-go';
  return null;
}

/** Windows Vista's BitLocker boot sector (jump EB 52 90): its metadata layout is not supported. */
export function isVistaBitLocker(boot: Uint8Array): boolean {
  return boot.length >= 512 && ascii(boot, 3, 8) === '-FVE-FS-' && boot[0] === 0xeb && boot[1] === 0x52 && boot[2] === 0x90;
}

/** True for any boot sector BitLocker wrote, Vista's included (for refusing it by name). */
export function looksLikeBitLocker(boot: Uint8Array): boolean {
  return boot.length >= 512 && (bitLockerVariant(boot) !== null || ascii(boot, 3, 8) === '-FVE-FS-');
}

export function encryptionOf(method: number): BitLockerEncryption | null {
  switch (method) {
    case 0x8000: return { method, cipher: 'aes-cbc-elephant', keyBits: 256, text: 'AES-128-CBC with the Elephant diffuser' };
    case 0x8001: return { method, cipher: 'aes-cbc-elephant', keyBits: 512, text: 'AES-256-CBC with the Elephant diffuser' };
    case 0x8002: return { method, cipher: 'aes-cbc-eboiv', keyBits: 128, text: 'AES-128-CBC' };
    case 0x8003: return { method, cipher: 'aes-cbc-eboiv', keyBits: 256, text: 'AES-256-CBC' };
    case 0x8004: return { method, cipher: 'aes-xts-plain64', keyBits: 256, text: 'AES-128-XTS' };
    case 0x8005: return { method, cipher: 'aes-xts-plain64', keyBits: 512, text: 'AES-256-XTS' };
    default: return null;
  }
}

/** How a person names a protector kind (as Windows' manage-bde does). */
export function protectorText(kind: BitLockerProtectorKind): string {
  switch (kind) {
    case 'clear-key': return 'clear key (protection suspended)';
    case 'tpm': return 'TPM';
    case 'startup-key': return 'startup key (.BEK file)';
    case 'tpm-and-startup-key': return 'TPM and startup key';
    case 'tpm-and-pin': return 'TPM and PIN';
    case 'tpm-pin-and-startup-key': return 'TPM, PIN and startup key';
    case 'recovery-password': return 'recovery password (48 digits)';
    case 'smart-card': return 'smart card';
    case 'password': return 'password';
    default: return 'unknown';
  }
}

/** The first Unicode string among nested entries (a VMK's name), bounds-checked; undefined when none. */
function nestedString(entries: Uint8Array): string | undefined {
  for (let p = 0; p + ENTRY_HEADER <= entries.length;) {
    const size = le16(entries, p);
    if (size < ENTRY_HEADER || p + size > entries.length) return undefined;
    if (le16(entries, p + 4) === VALUE_UNICODE) {
      const data = entries.subarray(p + ENTRY_HEADER, p + size);
      return utf16leDecode(data.subarray(0, data.length & ~1)).replace(/\0+$/, '');
    }
    p += size;
  }
  return undefined;
}

interface ParsedCopy {
  version: number;
  state: number;
  nextState: number;
  volumeSize: number;
  guid: string;
  method: number;
  created: number;
  description: string;
  volumeHeader: { offset: number; size: number };
  protectors: BitLockerProtector[];
}

/**
 * Parses one FVE metadata block (the 64 KiB area read at its offset). Throws a message
 * (without the copy's name; the caller adds it) for anything out of bounds or inconsistent.
 */
function parseMetadataBlock(area: Uint8Array): ParsedCopy {
  if (ascii(area, 0, 8) !== '-FVE-FS-') throw new Error(`no "-FVE-FS-" signature (found "${ascii(area, 0, 8).replace(/[^\x20-\x7e]/g, '.')}")`);
  const version = le16(area, 10);
  if (version !== 2) {
    throw new Error(version === 1
      ? 'FVE metadata version 1 (BitLocker of Windows Vista), which cryptsetup cannot open'
      : `unknown FVE metadata version ${version} (expected 2)`);
  }
  const blockSize = le16(area, 8) * 16;
  const metaSize = le32(area, BLOCK_HEADER);
  const metaVersion = le32(area, BLOCK_HEADER + 4);
  const metaHeaderSize = le32(area, BLOCK_HEADER + 8);
  const metaSizeCopy = le32(area, BLOCK_HEADER + 12);
  if (metaHeaderSize !== METADATA_HEADER) throw new Error(`metadata header size ${metaHeaderSize} (expected ${METADATA_HEADER})`);
  if (metaVersion !== 1) throw new Error(`metadata version ${metaVersion} (expected 1)`);
  if (metaSize !== metaSizeCopy) throw new Error(`metadata size ${metaSize} differs from its copy ${metaSizeCopy}`);
  if (metaSize < METADATA_HEADER || BLOCK_HEADER + metaSize > blockSize) {
    throw new Error(`metadata size ${metaSize} does not fit the block size ${blockSize}`);
  }
  if (blockSize + 8 > area.length) throw new Error(`block size ${blockSize} leaves no room for its validation record in the ${area.length}-byte area`);
  const stored = le32(area, blockSize + 4);
  const actual = crc32(area.subarray(0, blockSize));
  if (stored !== actual) throw new Error(`CRC-32 mismatch (stored ${stored.toString(16).padStart(8, '0')}, computed ${actual.toString(16).padStart(8, '0')})`);

  const volumeSize = le64(area, 16);
  if (volumeSize < 0) throw new Error('volume size does not fit 2^53 bytes');
  const guid = guidFromBytes(area, BLOCK_HEADER + 16);
  const method = le16(area, BLOCK_HEADER + 36);
  const filetime = le32(area, BLOCK_HEADER + 40) + le32(area, BLOCK_HEADER + 44) * 2 ** 32;
  const created = Math.round(filetime / 10000 - 11644473600000);

  let description = '';
  let volumeHeader = { offset: le64(area, 56), size: le32(area, 28) };
  const protectors: BitLockerProtector[] = [];
  const end = BLOCK_HEADER + metaSize;
  for (let p = BLOCK_HEADER + METADATA_HEADER; p + ENTRY_HEADER <= end;) {
    const size = le16(area, p);
    const type = le16(area, p + 2);
    const valueType = le16(area, p + 4);
    if (size === 0) break; // padding after the last entry
    if (size < ENTRY_HEADER || p + size > end) throw new Error(`entry at metadata offset ${p - BLOCK_HEADER} has size ${size}, past the metadata's end (${metaSize} bytes)`);
    const data = area.subarray(p + ENTRY_HEADER, p + size);
    if (type === ENTRY_DESCRIPTION && valueType === VALUE_UNICODE) {
      description = utf16leDecode(data.subarray(0, data.length & ~1)).replace(/\0+$/, '');
    } else if (type === ENTRY_VMK && valueType === VALUE_VMK) {
      if (data.length < VMK_FIXED) throw new Error(`VMK entry at metadata offset ${p - BLOCK_HEADER} is ${size} bytes, too small`);
      const protection = le16(data, 26);
      const protector: BitLockerProtector = { guid: guidFromBytes(data, 0), kind: PROTECTION[protection] ?? 'unknown', protection };
      const name = nestedString(data.subarray(VMK_FIXED));
      if (name !== undefined) protector.name = name;
      protectors.push(protector);
    } else if (valueType === VALUE_OFFSET_SIZE && data.length >= 16) {
      const offset = le64(data, 0);
      const len = le64(data, 8);
      if (offset < 0 || len < 0) throw new Error('volume header offset or size does not fit 2^53 bytes');
      volumeHeader = { offset, size: len };
    }
    p += size;
  }
  return {
    version, state: le16(area, 12), nextState: le16(area, 14), volumeSize, guid, method, created, description,
    volumeHeader, protectors,
  };
}

/**
 * Reads a BitLocker volume's metadata from `reader` (a partition or a whole volume).
 * Throws FormatError when it is not BitLocker or no metadata copy is usable.
 */
export function readBitLocker(reader: BlockReader): BitLockerVolume {
  if (reader.size < 512) throw new FormatError(`${reader.name}: ${reader.size} bytes is too small for a BitLocker volume`, 'size', reader.size);
  const boot = reader.read(0, 512);
  const variant = bitLockerVariant(boot);
  if (!variant) {
    if (isVistaBitLocker(boot)) {
      throw new FormatError(`${reader.name}: BitLocker volume of Windows Vista: not supported; decrypt it in Windows (manage-bde -off) or re-encrypt it with a newer Windows`, 'signature');
    }
    if (ascii(boot, 3, 8) === '-FVE-FS-') {
      throw new FormatError(`${reader.name}: BitLocker boot sector with an unknown GUID ${guidFromBytes(boot, 160)} at byte 160 (known: ${BITLOCKER_GUID}, ${BITLOCKER_EOW_GUID}); cryptsetup cannot open it either`, 'guid', guidFromBytes(boot, 160));
    }
    throw new FormatError(`${reader.name}: not a BitLocker volume (no "-FVE-FS-" or BitLocker To Go signature in the boot sector)`, 'signature');
  }
  const sectorSize = le16(boot, 11);
  if (sectorSize !== 512 && sectorSize !== 1024 && sectorSize !== 2048 && sectorSize !== 4096) {
    throw new FormatError(`${reader.name}: BitLocker boot sector says ${sectorSize} bytes per sector (expected 512, 1024, 2048 or 4096)`, 'sectorSize', sectorSize);
  }
  const at = variant === 'to-go' ? 424 + 16 : 160 + 16;
  const copies: BitLockerMetadataCopy[] = [];
  let parsed: ParsedCopy | undefined;
  let used = -1;
  for (let i = 0; i < 3; i++) {
    const offset = le64(boot, at + i * 8);
    const copy: BitLockerMetadataCopy = { index: i, offset };
    copies.push(copy);
    if (offset <= 0 || offset % sectorSize !== 0 || offset + FVE_METADATA_AREA > reader.size) {
      copy.damage = `offset ${offset} is not a sector inside the ${reader.size}-byte volume with room for 64 KiB`;
      continue;
    }
    try {
      const p = parseMetadataBlock(reader.read(offset, FVE_METADATA_AREA));
      if (!parsed) { parsed = p; used = i; }
    } catch (e) {
      copy.damage = e instanceof Error ? e.message : String(e);
    }
  }
  if (!parsed) {
    const why = copies.map((c) => `copy ${c.index + 1} at ${c.offset}: ${c.damage}`).join('; ');
    throw new FormatError(`${reader.name}: BitLocker metadata unreadable, all three copies are damaged (${why}); run "chkdsk" and "manage-bde -status" in Windows`, 'metadata');
  }
  const encryption = encryptionOf(parsed.method);
  if (!encryption) {
    throw new FormatError(`${reader.name}: BitLocker encryption method ${hex4(parsed.method)} is unknown (known: AES-CBC with or without the diffuser, AES-XTS)`, 'encryption', parsed.method);
  }
  const encryptOnWrite = guidFromBytes(boot, variant === 'to-go' ? 424 : 160) === BITLOCKER_EOW_GUID;
  return {
    variant, encryptOnWrite, version: parsed.version, sectorSize, guid: parsed.guid, description: parsed.description,
    volumeSize: parsed.volumeSize, created: parsed.created, encryption, state: parsed.state, nextState: parsed.nextState,
    volumeHeader: parsed.volumeHeader, protectors: parsed.protectors, copies, used,
  };
}

/** What vdboot can unlock the volume with, in the order it would use them. */
export type BitLockerKeyNeed =
  | { kind: 'clear-key' }
  | { kind: 'secret'; accepts: BitLockerProtectorKind[] }
  | { kind: 'refused'; message: string };

/**
 * Which key a boot needs for `vol`: nothing (a clear key: protection suspended), a password
 * / recovery password / startup key, or a refusal naming what to do in Windows (TPM-only).
 */
export function bitLockerKeyNeed(vol: BitLockerVolume, name: string): BitLockerKeyNeed {
  const kinds = vol.protectors.map((p) => p.kind);
  if (kinds.includes('clear-key')) return { kind: 'clear-key' };
  const accepts = (['recovery-password', 'password', 'startup-key'] as const).filter((k) => kinds.includes(k));
  if (accepts.length > 0) return { kind: 'secret', accepts: [...accepts] };
  const have = kinds.length ? [...new Set(kinds.map(protectorText))].join(', ') : 'none';
  return {
    kind: 'refused',
    message: `${name} is BitLocker-encrypted with protectors vdboot cannot use (${have}): the TPM releases its key only to Windows' own boot. ` +
      'In Windows, add a recovery password protector (an administrator prompt: manage-bde -protectors -add C: -RecoveryPassword, ' +
      'with the drive letter of this volume), note the 48 digits it prints, and type them at the prompt, or put them in a file given by rd.vdisk.bitlocker.key=KEYPATH:KEYDEV',
  };
}

/** A few lines describing the volume and its protectors, for `vdboot inspect` / `plan`. */
export function describeBitLocker(vol: BitLockerVolume): string[] {
  const lines = [
    `BitLocker${vol.variant === 'to-go' ? ' To Go' : ''} volume ${vol.guid}${vol.description ? ` "${vol.description}"` : ''}`,
    `  encryption: ${vol.encryption.text} (${vol.encryption.cipher}, ${vol.encryption.keyBits}-bit key), ${vol.sectorSize}-byte sectors, ${vol.volumeSize} bytes`,
  ];
  if (vol.encryptOnWrite) lines.push('  encrypt-on-write (used space only, conversion not finished): cryptsetup up to 2.7 refuses to activate such a volume');
  if (vol.state !== 4) lines.push(`  state: ${vol.state === 1 ? 'decrypted' : vol.state === 2 ? 'encryption or decryption in progress' : vol.state === 5 ? 'encryption or decryption paused' : `state ${vol.state}`}`);
  for (const p of vol.protectors) {
    lines.push(`  protector ${p.guid}: ${protectorText(p.kind)}${p.kind === 'unknown' ? ` (${hex4(p.protection)})` : ''}${p.name ? ` "${p.name}"` : ''}`);
  }
  for (const c of vol.copies) if (c.damage) lines.push(`  metadata copy ${c.index + 1} at ${c.offset} is damaged (${c.damage}); copy ${vol.used + 1} used instead`);
  return lines;
}
