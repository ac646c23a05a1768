/**
 * Text codecs that run on every engine: QuickJS has no TextDecoder/TextEncoder,
 * and on-disk names come as UTF-8 (ext4, tar, VMDK descriptors) or UTF-16LE
 * (NTFS, GPT, VHD parent locators, VHDX metadata).
 */

export function utf8Encode(text: string): Uint8Array {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < text.length) { n += 4; i++; }
    else n += 3;
  }
  const out = new Uint8Array(n);
  let o = 0;
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c >= 0xd800 && c < 0xdc00 && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d < 0xe000) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
      }
    }
    if (c < 0x80) out[o++] = c;
    else if (c < 0x800) { out[o++] = 0xc0 | (c >> 6); out[o++] = 0x80 | (c & 63); }
    else if (c < 0x10000) { out[o++] = 0xe0 | (c >> 12); out[o++] = 0x80 | ((c >> 6) & 63); out[o++] = 0x80 | (c & 63); }
    else { out[o++] = 0xf0 | (c >> 18); out[o++] = 0x80 | ((c >> 12) & 63); out[o++] = 0x80 | ((c >> 6) & 63); out[o++] = 0x80 | (c & 63); }
  }
  return o === n ? out : out.subarray(0, o);
}

/**
 * Decodes UTF-8; malformed sequences become U+FFFD. Code units are gathered in a
 * Uint16Array and turned into text a chunk at a time: per-character string building is
 * far too slow on QuickJS under emulation (the manifest is read at every boot).
 */
export function utf8Decode(bytes: Uint8Array): string {
  // Most text here is ASCII (manifests, sysfs, procfs): read it as Latin-1 in large
  // chunks and let the regular-expression engine (native code) confirm no byte is >= 0x80.
  const latin1: string[] = [];
  for (let off = 0; off < bytes.length; off += 32768) {
    latin1.push(String.fromCharCode.apply(null, bytes.subarray(off, off + 32768) as unknown as number[]));
  }
  const text = latin1.join('');
  return NON_ASCII.test(text) ? utf8DecodeSlow(bytes) : text;
}

const NON_ASCII = /[\u0080-\u00ff]/;

function utf8DecodeSlow(bytes: Uint8Array): string {
  const CHUNK = 8192;
  const units = new Uint16Array(CHUNK + 2);
  const parts: string[] = [];
  let u = 0;
  let i = 0;
  const n = bytes.length;
  while (i < n) {
    if (u >= CHUNK) {
      parts.push(String.fromCharCode.apply(null, units.subarray(0, u) as unknown as number[]));
      u = 0;
    }
    const b = bytes[i]!;
    if (b < 0x80) {
      units[u++] = b;
      i++;
      continue;
    }
    let c: number;
    let need: number;
    if (b >= 0xc2 && b < 0xe0) { c = b & 0x1f; need = 1; }
    else if (b >= 0xe0 && b < 0xf0) { c = b & 0x0f; need = 2; }
    else if (b >= 0xf0 && b < 0xf5) { c = b & 0x07; need = 3; }
    else { units[u++] = 0xfffd; i++; continue; }
    i++;
    let ok = true;
    for (let k = 0; k < need; k++) {
      const d = bytes[i];
      if (d === undefined || (d & 0xc0) !== 0x80) { ok = false; break; }
      c = (c << 6) | (d & 0x3f);
      i++;
    }
    if (!ok || c > 0x10ffff || (need === 2 && c < 0x800) || (need === 3 && c < 0x10000)) { units[u++] = 0xfffd; continue; }
    if (c >= 0x10000) {
      c -= 0x10000;
      units[u++] = 0xd800 + (c >> 10);
      units[u++] = 0xdc00 + (c & 0x3ff);
    } else {
      units[u++] = c;
    }
  }
  parts.push(String.fromCharCode.apply(null, units.subarray(0, u) as unknown as number[]));
  return parts.join('');
}

/** Decodes UTF-16LE code units (surrogate pairs kept as they are). */
export function utf16leDecode(bytes: Uint8Array): string {
  const parts: string[] = [];
  const units: number[] = [];
  for (let i = 0; i + 1 < bytes.length; i += 2) {
    units.push(bytes[i]! | (bytes[i + 1]! << 8));
    if (units.length === 4096) { parts.push(String.fromCharCode(...units)); units.length = 0; }
  }
  parts.push(String.fromCharCode(...units));
  return parts.join('');
}

export function utf16leEncode(text: string): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    out[2 * i] = c & 0xff;
    out[2 * i + 1] = c >> 8;
  }
  return out;
}

/** A NUL-terminated field: decodes up to the first NUL. */
export function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return utf8Decode(end < 0 ? bytes : bytes.subarray(0, end));
}
