/** CRC-32 (IEEE 802.3: GPT, gzip) and CRC-32C (Castagnoli: VHDX), table-driven. */

function makeTable(poly: number): Uint32Array {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? poly ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
}

const IEEE = makeTable(0xedb88320);
const CASTAGNOLI = makeTable(0x82f63b78);

function run(table: Uint32Array, bytes: Uint8Array, seed: number): number {
  let c = ~seed >>> 0;
  for (let i = 0; i < bytes.length; i++) c = table[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

/** CRC-32 as GPT and gzip use it. `seed` continues a previous result. */
export function crc32(bytes: Uint8Array, seed = 0): number {
  return run(IEEE, bytes, seed);
}

/** CRC-32C as VHDX uses it. `seed` continues a previous result. */
export function crc32c(bytes: Uint8Array, seed = 0): number {
  return run(CASTAGNOLI, bytes, seed);
}

/**
 * LVM2's checksum (lib/misc/crc.c): the reflected IEEE polynomial of `crc32`, but with no
 * inversion before or after, started from LVM's INITIAL_CRC (0xf597a6cf) unless `initial`
 * continues a previous result (metadata text that wraps round its area).
 */
export function lvmCrc(bytes: Uint8Array, initial = 0xf597a6cf): number {
  return ~run(IEEE, bytes, ~initial >>> 0) >>> 0;
}
