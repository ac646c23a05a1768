/**
 * LUKS1 and LUKS2 headers, read without a key: version, UUID, label, the data segment's
 * cipher, offset and sector size, and the key slots with their key derivation. This is
 * what `vdboot inspect`/`plan` show and what the boot uses to name the mapping; unlocking
 * itself is cryptsetup's (key derivation never runs in the interpreter).
 *
 * LUKS1: the 592-byte phdr (big-endian), 8 key slots. LUKS2: two binary headers (primary at
 * 0, secondary at the offset the primary or a known position gives) each followed by JSON;
 * each is checked with its SHA-256 and the valid one with the higher seqid is used.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import { sha256 } from './sha256.ts';
import { utf8Decode } from './text.ts';

export interface LuksKeySlot {
  slot: number;
  /** pbkdf2, argon2i, argon2id */
  kdf: string;
  /** pbkdf2 iterations, argon2 time cost */
  iterations?: number;
  /** argon2 memory in KiB */
  memoryKiB?: number;
  /** key size in bits */
  keyBits: number;
}

export interface LuksHeader {
  version: 1 | 2;
  uuid: string;
  label?: string;
  /** e.g. "aes-xts-plain64" */
  cipher: string;
  /** the volume key in bits */
  keyBits: number;
  /** where the encrypted data starts, in bytes */
  dataOffset: number;
  /** the encryption sector size in bytes */
  sectorSize: number;
  /** active key slots only */
  keySlots: LuksKeySlot[];
  /** LUKS2: which binary header was used */
  headerUsed?: 'primary' | 'secondary';
  /** damage seen in the header that was not used */
  notes: string[];
}

const MAGIC1 = 'LUKS\xba\xbe';
const MAGIC2 = 'SKUL\xba\xbe';
const LUKS1_ACTIVE = 0x00ac71f3;
const LUKS1_INACTIVE = 0x0000dead;
/** Where cryptsetup may put the secondary LUKS2 header (it equals the primary's hdr_size). */
const LUKS2_SECONDARY_OFFSETS = [0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];
const LUKS2_MAX_JSON = 4 * 1024 * 1024;

function ascii(b: Uint8Array, off: number, len: number): string {
  let s = '';
  for (let i = 0; i < len; i++) {
    const c = b[off + i]!;
    if (c === 0) break;
    s += String.fromCharCode(c);
  }
  return s;
}

export function isLuks(head: Uint8Array): boolean {
  return head.length >= 8 && ascii(head, 0, 6) === MAGIC1 && (head[7] === 1 || head[7] === 2) && head[6] === 0;
}

/** Parses the LUKS header of `reader` (a partition, an LV, …); FormatError when damaged. */
export function parseLuksHeader(reader: BlockReader): LuksHeader {
  if (reader.size < 4096) throw new FormatError(`${reader.name}: too small for a LUKS header (${reader.size} bytes)`, 'size', reader.size);
  const head = reader.read(0, 4096);
  if (!isLuks(head)) throw new FormatError(`${reader.name}: no LUKS header (magic)`, 'magic');
  const version = head[7]!;
  return version === 1 ? parseLuks1(head, reader) : parseLuks2(reader);
}

function parseLuks1(h: Uint8Array, reader: BlockReader): LuksHeader {
  const v = new DataView(h.buffer, h.byteOffset, h.length);
  const name = reader.name;
  const cipherName = ascii(h, 8, 32);
  const cipherMode = ascii(h, 40, 32);
  const payload = v.getUint32(104, false);
  const keyBytes = v.getUint32(108, false);
  if (!cipherName || !/^[\w.:-]+$/.test(cipherName + cipherMode)) throw new FormatError(`${name}: LUKS1 header names no usable cipher ("${cipherName}-${cipherMode}")`, 'cipher_name', cipherName);
  if (keyBytes === 0 || keyBytes > 128) throw new FormatError(`${name}: LUKS1 key size ${keyBytes} bytes is out of range`, 'key_bytes', keyBytes);
  const dataOffset = payload * 512;
  if (dataOffset < 4096 || dataOffset > reader.size) throw new FormatError(`${name}: LUKS1 payload offset ${payload} sectors lies outside the device (${reader.size} bytes)`, 'payload_offset', payload);
  const keySlots: LuksKeySlot[] = [];
  for (let s = 0; s < 8; s++) {
    const o = 208 + s * 48;
    const active = v.getUint32(o, false);
    if (active === LUKS1_ACTIVE) {
      const km = v.getUint32(o + 40, false);
      if (km * 512 >= dataOffset) throw new FormatError(`${name}: LUKS1 key slot ${s}'s key material (sector ${km}) overlaps the data`, 'key_material_offset', km);
      keySlots.push({ slot: s, kdf: 'pbkdf2', iterations: v.getUint32(o + 4, false), keyBits: keyBytes * 8 });
    } else if (active !== LUKS1_INACTIVE) {
      throw new FormatError(`${name}: LUKS1 key slot ${s} has a damaged state word 0x${active.toString(16)}`, 'active', active);
    }
  }
  return {
    version: 1, uuid: ascii(h, 168, 40), cipher: `${cipherName}-${cipherMode}`, keyBits: keyBytes * 8,
    dataOffset, sectorSize: 512, keySlots, notes: [],
  };
}

interface Luks2Binary {
  hdrSize: number;
  seqid: number;
  label: string;
  uuid: string;
  json: unknown;
}

function readLuks2Binary(reader: BlockReader, offset: number, magic: string): Luks2Binary {
  const where = `${reader.name}: LUKS2 ${offset === 0 ? 'primary' : 'secondary'} header at byte ${offset}`;
  if (offset + 4096 > reader.size) throw new FormatError(`${where} lies past the device end`, 'hdr_offset', offset);
  const h = reader.read(offset, 4096);
  const v = new DataView(h.buffer, h.byteOffset, 4096);
  if (ascii(h, 0, 6) !== magic || v.getUint16(6, false) !== 2) throw new FormatError(`${where}: no LUKS2 magic`, 'magic');
  const hdrSize = Number(v.getBigUint64(8, false));
  if (!LUKS2_SECONDARY_OFFSETS.includes(hdrSize) || offset + hdrSize > reader.size) throw new FormatError(`${where}: header size ${hdrSize} is not one LUKS2 allows`, 'hdr_size', hdrSize);
  if (Number(v.getBigUint64(256, false)) !== offset) throw new FormatError(`${where}: says it is at byte ${v.getBigUint64(256, false)}`, 'hdr_offset', offset);
  const alg = ascii(h, 72, 32);
  if (alg !== 'sha256') throw new FormatError(`${where}: checksum algorithm "${alg}" is not supported (sha256 is)`, 'checksum_alg', alg);
  const all = new Uint8Array(reader.read(offset, hdrSize));
  const stored = all.slice(448, 448 + 32);
  all.fill(0, 448, 448 + 64);
  const actual = sha256(all);
  if (!stored.every((b, i) => b === actual[i])) throw new FormatError(`${where}: fails its SHA-256 checksum`, 'csum');
  const jsonBytes = all.subarray(4096, Math.min(hdrSize, 4096 + LUKS2_MAX_JSON));
  let end = jsonBytes.indexOf(0);
  if (end < 0) end = jsonBytes.length;
  let json: unknown;
  try { json = JSON.parse(utf8Decode(jsonBytes.subarray(0, end))); } catch { throw new FormatError(`${where}: its JSON metadata does not parse`, 'json'); }
  return { hdrSize, seqid: Number(v.getBigUint64(16, false)), label: ascii(h, 24, 48), uuid: ascii(h, 168, 40), json };
}

function num(x: unknown): number | undefined {
  const n = typeof x === 'string' && /^[0-9]+$/.test(x) ? Number(x) : typeof x === 'number' ? x : NaN;
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}

function obj(x: unknown): Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x) ? x as Record<string, unknown> : {};
}

function parseLuks2(reader: BlockReader): LuksHeader {
  const notes: string[] = [];
  let primary: Luks2Binary | undefined;
  let secondary: Luks2Binary | undefined;
  try { primary = readLuks2Binary(reader, 0, MAGIC1); } catch (e) { notes.push((e as Error).message); }
  const offsets = primary ? [primary.hdrSize] : LUKS2_SECONDARY_OFFSETS;
  for (const off of offsets) {
    if (off + 4096 > reader.size) break;
    if (!primary && ascii(reader.read(off, 8), 0, 6) !== MAGIC2) continue;
    try { secondary = readLuks2Binary(reader, off, MAGIC2); break; } catch (e) { notes.push((e as Error).message); }
  }
  const use = primary && secondary ? (secondary.seqid > primary.seqid ? secondary : primary) : primary ?? secondary;
  if (!use) throw new FormatError(`${reader.name}: neither LUKS2 header is valid (${notes.join('; ')})`, 'header');
  const name = reader.name;
  const j = obj(use.json);
  const segments = obj(j.segments);
  const seg = obj(segments['0']);
  if (seg.type !== 'crypt') throw new FormatError(`${name}: LUKS2 data segment 0 is ${seg.type === undefined ? 'missing' : `of type "${String(seg.type)}"`}, not "crypt"`, 'segments');
  const dataOffset = num(seg.offset);
  if (dataOffset === undefined || dataOffset < use.hdrSize * 2 || dataOffset > reader.size) throw new FormatError(`${name}: LUKS2 data offset ${String(seg.offset)} lies outside the device (${reader.size} bytes)`, 'segments.0.offset', String(seg.offset));
  const sectorSize = num(seg.sector_size) ?? 512;
  if (![512, 1024, 2048, 4096].includes(sectorSize)) throw new FormatError(`${name}: LUKS2 sector size ${sectorSize} is not one of 512–4096`, 'sector_size', sectorSize);
  const cipher = typeof seg.encryption === 'string' ? seg.encryption : '';
  const keySlots: LuksKeySlot[] = [];
  let keyBits = 0;
  const slots = obj(j.keyslots);
  for (const k of Object.keys(slots).sort((a, b) => Number(a) - Number(b))) {
    const s = obj(slots[k]);
    const slot = num(k);
    if (slot === undefined || slot > 31) continue;
    const kdf = obj(s.kdf);
    const bits = (num(s.key_size) ?? 0) * 8;
    keyBits = Math.max(keyBits, bits);
    const ks: LuksKeySlot = { slot, kdf: typeof kdf.type === 'string' ? kdf.type : '?', keyBits: bits };
    const it = num(kdf.iterations) ?? num(kdf.time);
    if (it !== undefined) ks.iterations = it;
    const mem = num(kdf.memory);
    if (mem !== undefined) ks.memoryKiB = mem;
    keySlots.push(ks);
  }
  const out: LuksHeader = {
    version: 2, uuid: use.uuid, cipher, keyBits, dataOffset, sectorSize, keySlots,
    headerUsed: use === primary ? 'primary' : 'secondary', notes,
  };
  if (use.label) out.label = use.label;
  return out;
}

/** One line for the console and `vdboot inspect`: "LUKS2 aes-xts-plain64 512-bit, key slots 0 (argon2id), 3 (pbkdf2)". */
export function describeLuks(h: LuksHeader): string {
  const slots = h.keySlots.map((s) => `${s.slot} (${s.kdf})`).join(', ') || 'none';
  return `LUKS${h.version} ${h.cipher} ${h.keyBits}-bit, data at byte ${h.dataOffset}, key slots ${slots}`;
}
