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

/** Decodes UTF-8; malformed sequences become U+FFFD. Stops at the end of `bytes`. */
export function utf8Decode(bytes: Uint8Array): string {
  let s = '';
  const parts: string[] = [];
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i]!;
    let c: number;
    let need = 0;
    if (b < 0x80) { c = b; }
    else if (b >= 0xc2 && b < 0xe0) { c = b & 0x1f; need = 1; }
    else if (b >= 0xe0 && b < 0xf0) { c = b & 0x0f; need = 2; }
    else if (b >= 0xf0 && b < 0xf5) { c = b & 0x07; need = 3; }
    else { c = 0xfffd; }
    i++;
    for (let k = 0; k < need; k++) {
      const d = bytes[i];
      if (d === undefined || (d & 0xc0) !== 0x80) { c = 0xfffd; need = 0; break; }
      c = (c << 6) | (d & 0x3f);
      i++;
    }
    s += String.fromCodePoint(c > 0x10ffff ? 0xfffd : c);
    if (s.length > 4096) { parts.push(s); s = ''; }
  }
  parts.push(s);
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
