/**
 * DEFLATE (RFC 1951) and zlib (RFC 1950) decoding, engine-neutral, for the compressed
 * pieces of images: qcow2 compressed clusters (raw deflate) and VMDK streamOptimized
 * grains (zlib). Output is bounded by the caller's `maxOutput` (a cluster or grain), so
 * a hostile stream cannot allocate more than that. Zstandard (qcow2
 * compression_type=zstd) is decoded by the bundled pure-JS `fzstd`.
 */
import { decompress as zstdDecompress } from 'fzstd';
import { FormatError } from './block-reader.ts';

const LENGTH_BASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LENGTH_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577];
const DIST_EXTRA = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
const CLEN_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/**
 * A canonical Huffman code as a lookup table indexed by the next `bits` input bits
 * (LSB first): each entry is symbol << 4 | code length, 0 for an unused pattern.
 */
interface Huffman {
  table: Uint16Array;
  bits: number;
}

function buildHuffman(lengths: Uint8Array, what: string): Huffman {
  const counts = new Uint16Array(16);
  let maxLen = 0;
  for (const l of lengths) { counts[l]!++; if (l > maxLen) maxLen = l; }
  counts[0] = 0;
  let left = 1;
  for (let len = 1; len < 16; len++) {
    left = left * 2 - counts[len]!;
    if (left < 0) throw new FormatError(`deflate stream: over-subscribed ${what} code`, 'deflate', what);
  }
  const bits = Math.max(1, maxLen);
  const table = new Uint16Array(1 << bits);
  const next = new Uint16Array(16);
  let code = 0;
  for (let len = 1; len < 16; len++) {
    code = (code + counts[len - 1]!) << 1;
    next[len] = code;
  }
  for (let sym = 0; sym < lengths.length; sym++) {
    const l = lengths[sym]!;
    if (l === 0) continue;
    const c = next[l]!++;
    let r = 0;
    for (let i = 0; i < l; i++) r |= ((c >> i) & 1) << (l - 1 - i);
    for (let k = r; k < table.length; k += 1 << l) table[k] = (sym << 4) | l;
  }
  return { table, bits };
}

let FIXED_LIT: Huffman | undefined;
let FIXED_DIST: Huffman | undefined;

function fixedCodes(): [Huffman, Huffman] {
  if (!FIXED_LIT || !FIXED_DIST) {
    const l = new Uint8Array(288);
    l.fill(8, 0, 144); l.fill(9, 144, 256); l.fill(7, 256, 280); l.fill(8, 280, 288);
    FIXED_LIT = buildHuffman(l, 'fixed literal/length');
    FIXED_DIST = buildHuffman(new Uint8Array(30).fill(5), 'fixed distance');
  }
  return [FIXED_LIT, FIXED_DIST];
}

class Inflater {
  private pos = 0;
  private bitBuf = 0;
  private bitCnt = 0;
  out: Uint8Array;
  outLen = 0;

  constructor(private readonly input: Uint8Array, private readonly maxOutput: number, private readonly what: string) {
    this.out = new Uint8Array(Math.min(maxOutput, Math.max(1024, input.length * 4)));
  }

  fail(msg: string): never {
    throw new FormatError(`${this.what}: corrupt compressed data (${msg})`, 'deflate', msg);
  }

  bits(n: number): number {
    while (this.bitCnt < n) {
      if (this.pos >= this.input.length) this.fail('stream ends early');
      this.bitBuf |= this.input[this.pos++]! << this.bitCnt;
      this.bitCnt += 8;
    }
    const v = this.bitBuf & ((1 << n) - 1);
    this.bitBuf >>>= n;
    this.bitCnt -= n;
    return v;
  }

  decode(h: Huffman): number {
    while (this.bitCnt < h.bits && this.pos < this.input.length) {
      this.bitBuf |= this.input[this.pos++]! << this.bitCnt;
      this.bitCnt += 8;
    }
    const e = h.table[this.bitBuf & ((1 << h.bits) - 1)]!;
    const len = e & 15;
    if (len === 0) this.fail('invalid Huffman code');
    if (len > this.bitCnt) this.fail('stream ends early');
    this.bitBuf >>>= len;
    this.bitCnt -= len;
    return e >> 4;
  }

  ensure(n: number): void {
    const need = this.outLen + n;
    if (need > this.maxOutput) this.fail(`output larger than ${this.maxOutput} bytes`);
    if (need > this.out.length) {
      const grown = new Uint8Array(Math.min(this.maxOutput, Math.max(need, this.out.length * 2)));
      grown.set(this.out.subarray(0, this.outLen));
      this.out = grown;
    }
  }

  stored(): void {
    // drop the partial byte; give back whole bytes the Huffman decoder fetched ahead
    this.pos -= this.bitCnt >> 3;
    this.bitBuf = 0;
    this.bitCnt = 0;
    if (this.pos + 4 > this.input.length) this.fail('stored block header truncated');
    const len = this.input[this.pos]! | (this.input[this.pos + 1]! << 8);
    const nlen = this.input[this.pos + 2]! | (this.input[this.pos + 3]! << 8);
    this.pos += 4;
    if ((len ^ 0xffff) !== nlen) this.fail('stored block length check');
    if (this.pos + len > this.input.length) this.fail('stored block truncated');
    this.ensure(len);
    this.out.set(this.input.subarray(this.pos, this.pos + len), this.outLen);
    this.outLen += len;
    this.pos += len;
  }

  dynamicCodes(): [Huffman, Huffman] {
    const nlen = this.bits(5) + 257;
    const ndist = this.bits(5) + 1;
    const ncode = this.bits(4) + 4;
    if (nlen > 286 || ndist > 30) this.fail('bad code counts');
    const cl = new Uint8Array(19);
    for (let i = 0; i < ncode; i++) cl[CLEN_ORDER[i]!] = this.bits(3);
    const clh = buildHuffman(cl, 'code length');
    const lengths = new Uint8Array(nlen + ndist);
    let i = 0;
    while (i < nlen + ndist) {
      const sym = this.decode(clh);
      if (sym < 16) { lengths[i++] = sym; continue; }
      let rep: number, val = 0;
      if (sym === 16) {
        if (i === 0) this.fail('repeat with no previous length');
        val = lengths[i - 1]!;
        rep = 3 + this.bits(2);
      } else if (sym === 17) rep = 3 + this.bits(3);
      else rep = 11 + this.bits(7);
      if (i + rep > nlen + ndist) this.fail('too many code lengths');
      lengths.fill(val, i, i + rep);
      i += rep;
    }
    if (lengths[256] === 0) this.fail('no end-of-block code');
    return [buildHuffman(lengths.subarray(0, nlen), 'literal/length'), buildHuffman(lengths.subarray(nlen), 'distance')];
  }

  codes(lit: Huffman, dist: Huffman): void {
    for (;;) {
      const sym = this.decode(lit);
      if (sym < 256) {
        this.ensure(1);
        this.out[this.outLen++] = sym;
      } else if (sym === 256) {
        return;
      } else {
        const li = sym - 257;
        if (li >= 29) this.fail('bad length symbol');
        const len = LENGTH_BASE[li]! + this.bits(LENGTH_EXTRA[li]!);
        const di = this.decode(dist);
        if (di >= 30) this.fail('bad distance symbol');
        const d = DIST_BASE[di]! + this.bits(DIST_EXTRA[di]!);
        if (d > this.outLen) this.fail('distance too far back');
        this.ensure(len);
        const o = this.out;
        let w = this.outLen;
        for (let k = 0; k < len; k++, w++) o[w] = o[w - d]!;
        this.outLen = w;
      }
    }
  }

  run(): void {
    let last = 0;
    while (!last) {
      last = this.bits(1);
      const type = this.bits(2);
      if (type === 0) this.stored();
      else if (type === 1) { const [l, d] = fixedCodes(); this.codes(l, d); }
      else if (type === 2) { const [l, d] = this.dynamicCodes(); this.codes(l, d); }
      else this.fail('reserved block type 3');
    }
  }

  /** Bytes consumed, counting a partly used last byte as used. */
  consumed(): number {
    return this.pos - (this.bitCnt >> 3);
  }
}

/**
 * Decodes a raw DEFLATE stream into at most `maxOutput` bytes. Bytes after the final
 * block are ignored (qcow2 stores compressed clusters in whole sectors).
 */
export function inflateRaw(input: Uint8Array, maxOutput: number, what = 'deflate stream'): Uint8Array {
  const inf = new Inflater(input, maxOutput, what);
  inf.run();
  return inf.out.subarray(0, inf.outLen);
}

/** Decodes a zlib stream (RFC 1950 header, DEFLATE body, Adler-32 checked) into at most `maxOutput` bytes. */
export function inflateZlib(input: Uint8Array, maxOutput: number, what = 'zlib stream'): Uint8Array {
  if (input.length < 2) throw new FormatError(`${what}: corrupt compressed data (zlib header truncated)`, 'zlib', input.length);
  const cmf = input[0]!, flg = input[1]!;
  if ((cmf & 0x0f) !== 8 || ((cmf << 8) | flg) % 31 !== 0 || (flg & 0x20) !== 0) {
    throw new FormatError(`${what}: not a zlib stream (header bytes 0x${cmf.toString(16)} 0x${flg.toString(16)})`, 'zlib', cmf);
  }
  const inf = new Inflater(input.subarray(2), maxOutput, what);
  inf.run();
  const out = inf.out.subarray(0, inf.outLen);
  const at = 2 + inf.consumed();
  if (at + 4 <= input.length) {
    const want = ((input[at]! << 24) | (input[at + 1]! << 16) | (input[at + 2]! << 8) | input[at + 3]!) >>> 0;
    if (adler32(out) !== want) throw new FormatError(`${what}: corrupt compressed data (Adler-32 mismatch)`, 'adler32', want);
  }
  return out;
}

export function adler32(bytes: Uint8Array): number {
  let a = 1, b = 0;
  for (let i = 0; i < bytes.length;) {
    const end = Math.min(bytes.length, i + 5552);
    for (; i < end; i++) { a += bytes[i]!; b += a; }
    a %= 65521; b %= 65521;
  }
  return ((b << 16) | a) >>> 0;
}

/**
 * Decodes the Zstandard frame at the start of `input` into a buffer of exactly
 * `maxOutput` bytes (a qcow2 cluster); bytes after the frame (sector padding) are
 * ignored.
 */
export function unzstd(input: Uint8Array, maxOutput: number, what = 'zstd stream'): Uint8Array {
  const frame = input.subarray(0, zstdFrameLength(input, what));
  const declared = zstdFrameContentSize(frame);
  if (declared !== undefined && declared > maxOutput) {
    throw new FormatError(`${what}: zstd frame declares ${declared} bytes, more than the ${maxOutput} expected`, 'zstd', declared);
  }
  try {
    // With an output buffer supplied, fzstd allocates no window of its own.
    return zstdDecompress(frame, new Uint8Array(maxOutput)).subarray(0, maxOutput);
  } catch (e) {
    throw new FormatError(`${what}: corrupt zstd data (${e instanceof Error ? e.message : String(e)})`, 'zstd', String(e));
  }
}

function zstdHeader(b: Uint8Array, what: string): { fhd: number; end: number; fcsAt: number; fcsBytes: number } {
  if (b.length < 6 || b[0] !== 0x28 || b[1] !== 0xb5 || b[2] !== 0x2f || b[3] !== 0xfd) {
    throw new FormatError(`${what}: not a zstd frame (bad magic)`, 'zstd', b.length ? b[0]! : 0);
  }
  const fhd = b[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const fcsAt = 5 + (single ? 0 : 1) + [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = fcsFlag === 0 ? single : [1, 2, 4, 8][fcsFlag]!;
  return { fhd, end: fcsAt + fcsBytes, fcsAt, fcsBytes };
}

/** The byte length of the zstd frame at the start of `b`: header, blocks, checksum. */
function zstdFrameLength(b: Uint8Array, what: string): number {
  const h = zstdHeader(b, what);
  let p = h.end;
  for (;;) {
    if (p + 3 > b.length) throw new FormatError(`${what}: corrupt zstd data (frame truncated)`, 'zstd', p);
    const bh = b[p]! | (b[p + 1]! << 8) | (b[p + 2]! << 16);
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new FormatError(`${what}: corrupt zstd data (reserved block type)`, 'zstd', p);
    p += 3 + (type === 1 ? 1 : size);
    if (bh & 1) break;
  }
  if ((h.fhd >> 2) & 1) p += 4;
  if (p > b.length) throw new FormatError(`${what}: corrupt zstd data (frame truncated)`, 'zstd', p);
  return p;
}

/** The Frame_Content_Size of a zstd frame header, when present. */
function zstdFrameContentSize(b: Uint8Array): number | undefined {
  const h = zstdHeader(b, 'zstd stream');
  if (h.fcsBytes === 0) return undefined;
  let v = 0;
  for (let i = h.fcsBytes - 1; i >= 0; i--) v = v * 256 + b[h.fcsAt + i]!;
  if (h.fcsBytes === 2) v += 256;
  return v;
}
