/**
 * resume= inside an image: the record that lets a later boot prove the image's device tables
 * are the ones the hibernated system ran on.
 *
 * A hibernated kernel keeps its device-mapper tables in its memory image: after a restore it
 * reads and writes the image's file through the extents it had. If the file moved on its host
 * (Windows defragmented or copied it), if the host is another partition, or if the image was
 * written by another machine (Hyper-V, VirtualBox) in between, restoring would corrupt it.
 *
 * So at every read-write boot with resume= vdboot writes a record of what the tables are made
 * from into the swap's first 1024 bytes, the "boot bits" that swap and hibernation leave alone:
 * the image's path and host, the chain's formats and sizes, a SHA-256 of the map (file
 * extents on the host device), and each layer's write id as this boot leaves it (a VHDX's
 * DataWriteGuid after vdboot renewed it). A later boot resumes only when the record equals
 * what it finds before writing anything itself; otherwise it says what differs.
 *
 * Layout (little-endian): magic "VDBOOT-RESUME\0\0\0" (16), JSON length u32, CRC-32 of the
 * JSON u32, the JSON (at most 1000 bytes), zeros to 1024.
 */
import { crc32 } from './crc.ts';
import { utf8Decode, utf8Encode } from './text.ts';

export const RESUME_RECORD_BYTES = 1024;
const MAGIC = 'VDBOOT-RESUME\0\0\0';
const HEAD = 24;

export interface ResumeIdentity {
  /** the image's path on its host */
  image: string;
  /** the host named so that disk order does not matter: PARTUUID=…, UUID=…, dm:NAME */
  host: string;
  /** "vhdx dynamic 21474836480 → …" */
  chain: string;
  /** mapHash (overlay.ts) of the map the tables are made from */
  tables: string;
  /** each layer's write id ('' where the format has none) */
  writeIds: string[];
}

export function encodeResumeRecord(id: ResumeIdentity): Uint8Array {
  const json = utf8Encode(JSON.stringify({ v: 1, ...id }));
  if (HEAD + json.length > RESUME_RECORD_BYTES) throw new Error(`the resume record is ${json.length} bytes, more than ${RESUME_RECORD_BYTES - HEAD} fit in the swap's boot bits (an image path of ${id.image.length} characters)`);
  const out = new Uint8Array(RESUME_RECORD_BYTES);
  out.set(utf8Encode(MAGIC), 0);
  const v = new DataView(out.buffer);
  v.setUint32(16, json.length, true);
  v.setUint32(20, crc32(json), true);
  out.set(json, HEAD);
  return out;
}

export type BootBits =
  | { kind: 'empty' }
  | { kind: 'record'; id: ResumeIdentity }
  | { kind: 'damaged'; why: string }
  | { kind: 'other' };

/** What the swap's first 1024 bytes hold: nothing, vdboot's record (checked), or something else. */
export function readBootBits(bits: Uint8Array): BootBits {
  if (bits.length < RESUME_RECORD_BYTES) return { kind: 'damaged', why: `only ${bits.length} bytes could be read` };
  const b = bits.subarray(0, RESUME_RECORD_BYTES);
  if (b.every((x) => x === 0)) return { kind: 'empty' };
  if (utf8Decode(b.subarray(0, 16)) !== MAGIC) return { kind: 'other' };
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const length = v.getUint32(16, true);
  if (length === 0 || HEAD + length > RESUME_RECORD_BYTES) return { kind: 'damaged', why: `its length field says ${length} bytes` };
  const json = b.subarray(HEAD, HEAD + length);
  if (crc32(json) !== v.getUint32(20, true)) return { kind: 'damaged', why: 'its checksum does not match' };
  let parsed: unknown;
  try { parsed = JSON.parse(utf8Decode(json)); } catch { return { kind: 'damaged', why: 'its text is not JSON' }; }
  const o = parsed as Record<string, unknown>;
  const str = (k: string) => typeof o[k] === 'string';
  if (o.v !== 1 || !str('image') || !str('host') || !str('chain') || !str('tables') || !Array.isArray(o.writeIds) || !o.writeIds.every((w) => typeof w === 'string')) {
    return { kind: 'damaged', why: `version ${String(o.v)} or its fields are not what this vdboot writes` };
  }
  return { kind: 'record', id: { image: o.image as string, host: o.host as string, chain: o.chain as string, tables: o.tables as string, writeIds: o.writeIds as string[] } };
}

/** How `now` differs from `recorded`, one phrase each; empty when the tables are the ones recorded. */
export function resumeDifferences(recorded: ResumeIdentity, now: ResumeIdentity): string[] {
  const out: string[] = [];
  if (recorded.image !== now.image) out.push(`the image is ${now.image}, was ${recorded.image}`);
  if (recorded.host !== now.host) out.push(`its host is ${now.host}, was ${recorded.host}`);
  if (recorded.chain !== now.chain) out.push(`it is ${now.chain}, was ${recorded.chain}`);
  else if (recorded.tables !== now.tables) out.push('its file lies elsewhere on the host now (moved, defragmented or copied), or its blocks were allocated since');
  recorded.writeIds.forEach((w, i) => {
    const n = now.writeIds[i] ?? '';
    if (recorded.chain === now.chain && w !== n) out.push(`layer ${i + 1} was written by another program since (write id ${n || 'none'}, was ${w || 'none'})`);
  });
  return out;
}

/**
 * The signature at the end of a swap's first page (4 KiB pages): a swap area, or a swap
 * that holds a hibernation image (swsusp writes its own signature there).
 */
export function swapState(page: Uint8Array, pageSize = 4096): 'swap' | 'hibernated' | 'none' {
  if (page.length < pageSize) return 'none';
  const sig = utf8Decode(page.subarray(pageSize - 10, pageSize));
  if (sig === 'SWAPSPACE2' || sig === 'SWAP-SPACE') return 'swap';
  if (['S1SUSPEND', 'S2SUSPEND', 'ULSUSPEND', 'LINHIB0001'].some((s) => sig.startsWith(s))) return 'hibernated';
  return 'none';
}
