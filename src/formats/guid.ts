/**
 * GUIDs as GPT, VHDX and NTFS store them: "mixed-endian". The text form
 * `aabbccdd-eeff-gghh-iijj-kkllmmnnoopp` is stored as the first three groups little-endian
 * (dd cc bb aa, ff ee, hh gg) and the last two as written (ii jj kk ll mm nn oo pp).
 * Also the table of GPT partition type GUIDs vdboot knows by name.
 */
import { FormatError } from './block-reader.ts';

const GUID_TEXT = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

export function isGuidText(text: string): boolean {
  return GUID_TEXT.test(text);
}

function hex2(b: number): string {
  return (b < 16 ? '0' : '') + b.toString(16);
}

/** Reads 16 mixed-endian bytes at `offset` as lowercase GUID text. */
export function guidFromBytes(bytes: Uint8Array, offset = 0): string {
  if (offset < 0 || offset + 16 > bytes.length) {
    throw new FormatError(`GUID at offset ${offset} is past the end of a ${bytes.length}-byte structure`, 'guid', offset);
  }
  const b = (i: number) => hex2(bytes[offset + i]!);
  return (
    b(3) + b(2) + b(1) + b(0) + '-' + b(5) + b(4) + '-' + b(7) + b(6) + '-' +
    b(8) + b(9) + '-' + b(10) + b(11) + b(12) + b(13) + b(14) + b(15)
  );
}

/** GUID text (any case, with or without braces) → 16 mixed-endian bytes. */
export function guidToBytes(text: string): Uint8Array {
  const t = text.startsWith('{') && text.endsWith('}') ? text.slice(1, -1) : text;
  if (!GUID_TEXT.test(t)) {
    throw new FormatError(`"${text}" is not a GUID: expected 8-4-4-4-12 hexadecimal digits, e.g. 4f68bce3-e8cd-4db1-96e7-fbcaf984b709`, 'guid', text);
  }
  const h = t.replace(/-/g, '');
  const raw = new Uint8Array(16);
  for (let i = 0; i < 16; i++) raw[i] = parseInt(h.slice(i * 2, i * 2 + 2), 16);
  const out = raw.slice();
  out[0] = raw[3]!; out[1] = raw[2]!; out[2] = raw[1]!; out[3] = raw[0]!;
  out[4] = raw[5]!; out[5] = raw[4]!;
  out[6] = raw[7]!; out[7] = raw[6]!;
  return out;
}

/** Normalizes GUID text to lowercase without braces; throws FormatError when it is not one. */
export function normalizeGuid(text: string): string {
  return guidFromBytes(guidToBytes(text));
}

export const NIL_GUID = '00000000-0000-0000-0000-000000000000';

export interface GptType {
  guid: string;
  /** the name fdisk/sfdisk print */
  name: string;
  /** short names accepted in a `*.vdisk.json` and on the command line */
  aliases: string[];
  /** the MBR type byte a partition of this kind gets in an MBR table vdboot writes */
  mbrType?: number;
}

/** GPT partition type GUIDs vdboot names (names as util-linux's fdisk prints them). */
export const GPT_TYPES: readonly GptType[] = [
  { guid: 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b', name: 'EFI System', aliases: ['esp', 'efi', 'uefi'], mbrType: 0xef },
  { guid: '21686148-6449-6e6f-744e-656564454649', name: 'BIOS boot', aliases: ['bios-boot', 'bios'] },
  { guid: '0fc63daf-8483-4772-8e79-3d69d8477de4', name: 'Linux filesystem', aliases: ['linux', 'linux-filesystem', 'linux-data'], mbrType: 0x83 },
  { guid: '4f68bce3-e8cd-4db1-96e7-fbcaf984b709', name: 'Linux root (x86-64)', aliases: ['linux-root-x86-64', 'root-x86-64', 'root'], mbrType: 0x83 },
  { guid: '44479540-f297-41b2-9af7-d131d5f0458a', name: 'Linux root (x86)', aliases: ['linux-root-x86', 'root-x86'], mbrType: 0x83 },
  { guid: 'b921b045-1df0-41c3-af44-4c6f280d3fae', name: 'Linux root (ARM-64)', aliases: ['linux-root-arm64', 'root-arm64'], mbrType: 0x83 },
  { guid: '8484680c-9521-48c6-9c11-b0720656f69e', name: 'Linux /usr (x86-64)', aliases: ['linux-usr-x86-64', 'usr-x86-64'], mbrType: 0x83 },
  { guid: '933ac7e1-2eb4-4f13-b844-0e14e2aef915', name: 'Linux home', aliases: ['linux-home', 'home'], mbrType: 0x83 },
  { guid: '3b8f8425-20e0-4f3b-907f-1a25a76f98e8', name: 'Linux server data', aliases: ['linux-srv', 'srv'], mbrType: 0x83 },
  { guid: 'bc13c2ff-59e6-4262-a352-b275fd6f7172', name: 'Linux extended boot', aliases: ['linux-xbootldr', 'xbootldr'], mbrType: 0xea },
  { guid: '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f', name: 'Linux swap', aliases: ['swap', 'linux-swap'], mbrType: 0x82 },
  { guid: 'e6d6d379-f507-44c2-a23c-238f2a3df928', name: 'Linux LVM', aliases: ['lvm', 'linux-lvm'], mbrType: 0x8e },
  { guid: 'a19d880f-05fc-4d3b-a006-743f0f84911e', name: 'Linux RAID', aliases: ['raid', 'linux-raid'], mbrType: 0xfd },
  { guid: 'ca7d7ccb-63ed-4c53-861c-1742536059cc', name: 'Linux LUKS', aliases: ['luks', 'linux-luks'], mbrType: 0x83 },
  { guid: 'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7', name: 'Microsoft basic data', aliases: ['msdata', 'microsoft-basic-data', 'basic-data', 'ntfs', 'exfat'], mbrType: 0x07 },
  { guid: 'e3c9e316-0b5c-4db8-817d-f92df00215ae', name: 'Microsoft reserved', aliases: ['msr', 'microsoft-reserved'] },
  { guid: 'de94bba4-06d1-4d40-a16a-bfd50179d6ac', name: 'Windows recovery environment', aliases: ['windows-recovery', 'winre'], mbrType: 0x27 },
];

/** The GPT type entry for a GUID (any case), or undefined. */
export function gptTypeByGuid(guid: string): GptType | undefined {
  const g = guid.toLowerCase();
  return GPT_TYPES.find((t) => t.guid === g);
}

/** fdisk's name of a GPT type GUID, or the GUID itself when vdboot has no name for it. */
export function gptTypeName(guid: string): string {
  return gptTypeByGuid(guid)?.name ?? guid.toLowerCase();
}

/** A GPT type given as an alias ("esp", "linux-root-x86-64"), a name ("EFI System") or a GUID → its GUID. */
export function gptTypeFromText(text: string): string {
  if (isGuidText(text) || (text.startsWith('{') && isGuidText(text.slice(1, -1)))) return normalizeGuid(text);
  const t = text.toLowerCase();
  const found = GPT_TYPES.find((x) => x.aliases.includes(t) || x.name.toLowerCase() === t);
  if (!found) {
    throw new FormatError(
      `unknown GPT partition type "${text}": give a type GUID or one of ${GPT_TYPES.map((x) => x.aliases[0]).join(', ')}`,
      'type', text,
    );
  }
  return found.guid;
}

/**
 * Well-known GPT type GUIDs by role, for code that looks for them (rd.vdisk.root=auto).
 */
export const GPT_TYPE = {
  efiSystem: 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b',
  biosBoot: '21686148-6449-6e6f-744e-656564454649',
  linuxFilesystem: '0fc63daf-8483-4772-8e79-3d69d8477de4',
  linuxRootX86_64: '4f68bce3-e8cd-4db1-96e7-fbcaf984b709',
  linuxSwap: '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f',
  linuxLvm: 'e6d6d379-f507-44c2-a23c-238f2a3df928',
  linuxRaid: 'a19d880f-05fc-4d3b-a006-743f0f84911e',
  microsoftBasicData: 'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7',
} as const;
