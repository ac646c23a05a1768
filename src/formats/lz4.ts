/**
 * A streaming LZ4 decoder: the frame format (magic 0x184D2204; independent or linked
 * blocks, optional checksums, which are skipped, not verified; concatenated and skippable
 * frames) and the legacy format the kernel's initramfs tools write (magic 0x184C2102).
 * Output comes one block at a time, so memory stays at one block plus 64 KiB of history.
 *
 * Engine-neutral: Uint8Array only.
 */
import { FormatError } from './block-reader.ts';
import { type ByteSource, StreamCursor } from './archive-stream.ts';

const FRAME_MAGIC = 0x184d2204;
const LEGACY_MAGIC = 0x184c2102;
const HISTORY = 65536;
const LEGACY_BLOCK = 8 << 20;

function u32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}

/**
 * Decodes one LZ4 block from `src` into `out` starting at `start` (bytes before `start`
 * are history that matches may refer to). Returns the end of the output.
 */
export function lz4DecodeBlock(src: Uint8Array, out: Uint8Array, start: number, what: string): number {
  let ip = 0;
  let op = start;
  const n = src.length;
  const bad = (why: string): FormatError => new FormatError(`${what}: corrupt LZ4 block (${why} at input byte ${ip})`, 'lz4', ip);
  while (ip < n) {
    const token = src[ip++]!;
    let lit = token >>> 4;
    if (lit === 15) {
      let b: number;
      do {
        if (ip >= n) throw bad('literal length runs past the block');
        b = src[ip++]!;
        lit += b;
      } while (b === 255);
    }
    if (ip + lit > n) throw bad('literals run past the block');
    if (op + lit > out.length) throw bad('output larger than the block size');
    out.set(src.subarray(ip, ip + lit), op);
    ip += lit;
    op += lit;
    if (ip >= n) break;
    if (ip + 2 > n) throw bad('match offset cut off');
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    let len = (token & 15) + 4;
    if ((token & 15) === 15) {
      let b: number;
      do {
        if (ip >= n) throw bad('match length runs past the block');
        b = src[ip++]!;
        len += b;
      } while (b === 255);
    }
    if (offset === 0 || offset > op) throw bad(`match offset ${offset} points before the data`);
    if (op + len > out.length) throw bad('output larger than the block size');
    let from = op - offset;
    if (offset >= len) {
      out.copyWithin(op, from, from + len);
      op += len;
    } else {
      const end = op + len;
      while (op < end) out[op++] = out[from++]!;
    }
  }
  return op;
}

/** Decompresses an LZ4 stream pulled from `input`, one block per pull. */
export function lz4Source(input: ByteSource, what = 'LZ4 stream'): ByteSource {
  const cur = new StreamCursor(input);
  let out = new Uint8Array(0);
  let used = 0; // bytes of `out` that are output (history + last block)
  let mode: 'start' | 'frame' | 'legacy' = 'start';
  let blockMax = 0;
  let blockChecksum = false;
  let contentChecksum = false;
  let linked = false;

  const need = (n: number, why: string): Uint8Array => {
    const at = cur.offset;
    const b = cur.take(n);
    if (b.length < n) throw new FormatError(`${what} is truncated: ${why} at byte ${at} is cut off`, 'lz4', at);
    return b;
  };

  const startFrame = (): boolean => {
    for (;;) {
      if (cur.atEnd()) return false;
      const at = cur.offset;
      const magic = u32(need(4, 'a frame magic'), 0);
      if (magic === LEGACY_MAGIC) {
        mode = 'legacy';
        blockMax = LEGACY_BLOCK;
        linked = false;
        return true;
      }
      if ((magic & 0xfffffff0) === 0x184d2a50) {
        const len = u32(need(4, 'a skippable frame'), 0);
        if (cur.skip(len) < len) throw new FormatError(`${what} is truncated inside a skippable frame at byte ${at}`, 'lz4', at);
        continue;
      }
      if (magic !== FRAME_MAGIC) throw new FormatError(`${what}: bytes at ${at} are not an LZ4 frame (magic 0x${magic.toString(16)})`, 'lz4', at);
      const flg = need(2, 'the frame descriptor');
      const f = flg[0]!;
      const bd = flg[1]!;
      if (f >> 6 !== 1) throw new FormatError(`${what}: LZ4 frame at byte ${at} has version ${f >> 6}, not 1`, 'lz4', at);
      linked = (f & 0x20) === 0;
      blockChecksum = (f & 0x10) !== 0;
      contentChecksum = (f & 0x04) !== 0;
      const sizeCode = (bd >> 4) & 7;
      if (sizeCode < 4) throw new FormatError(`${what}: LZ4 frame at byte ${at} has an invalid block size code ${sizeCode}`, 'lz4', at);
      blockMax = 1 << (8 + 2 * sizeCode);
      need((f & 0x08 ? 8 : 0) + (f & 0x01 ? 4 : 0) + 1, 'the frame descriptor');
      mode = 'frame';
      return true;
    }
  };

  const room = (): number => {
    // Keep the last 64 KiB as history for linked blocks, then room for one block.
    const keep = linked ? Math.min(used, HISTORY) : 0;
    if (out.length < keep + blockMax) {
      const bigger = new Uint8Array(keep + blockMax);
      bigger.set(out.subarray(used - keep, used), 0);
      out = bigger;
    } else if (keep) {
      out.copyWithin(0, used - keep, used);
    }
    used = keep;
    return keep;
  };

  return {
    pull(): Uint8Array | null {
      for (;;) {
        if (mode === 'start' && !startFrame()) return null;
        if (mode === 'legacy') {
          if (cur.atEnd()) return null;
          const at = cur.offset;
          const size = u32(cur.peek(4), 0);
          if (size === LEGACY_MAGIC || size === FRAME_MAGIC) {
            mode = 'start';
            continue;
          }
          need(4, 'a block size');
          if (size > LEGACY_BLOCK + (LEGACY_BLOCK >> 7) + 64) throw new FormatError(`${what}: legacy LZ4 block at byte ${at} claims ${size} bytes`, 'lz4', at);
          const src = need(size, 'a block');
          const start = room();
          used = lz4DecodeBlock(src, out, start, what);
          return out.subarray(start, used);
        }
        const at = cur.offset;
        const word = u32(need(4, 'a block size'), 0);
        if (word === 0) {
          if (contentChecksum) need(4, 'the content checksum');
          mode = 'start';
          used = 0;
          continue;
        }
        const raw = (word & 0x80000000) !== 0;
        const size = word & 0x7fffffff;
        if (size > blockMax) throw new FormatError(`${what}: LZ4 block at byte ${at} is ${size} bytes, more than the frame's ${blockMax}`, 'lz4', at);
        const src = need(size, 'a block');
        const start = room();
        if (raw) {
          out.set(src, start);
          used = start + size;
        } else {
          used = lz4DecodeBlock(src, out, start, what);
        }
        if (blockChecksum) need(4, 'a block checksum');
        if (used > start) return out.subarray(start, used);
      }
    },
  };
}
