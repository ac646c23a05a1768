/**
 * Reading back an initramfs image as the kernel does: a compressed (zstd) or plain newc
 * archive, zeros, then the uncompressed segment vdboot mkinitramfs appends (modules kept
 * compressed as shipped, packed tools' squashfs images). The walkers here are independent
 * of src/formats/cpio.ts, so they can serve as its oracle; GNU cpio and unsquashfs list.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/**
 * The end of the newc archive that starts at `at` (just past its TRAILER!!! entry, padded to
 * 4 bytes), walked from the headers' own sizes: an oracle independent of src/formats/cpio.ts.
 */
function newcEnd(bytes: Uint8Array, at: number): number {
  const text = (o: number, n: number) => Buffer.from(bytes.subarray(o, o + n)).toString('latin1');
  const align = (n: number) => (n + 3) & ~3;
  let pos = at;
  for (;;) {
    if (text(pos, 6) !== '070701') throw new Error(`no newc header at byte ${pos}`);
    const filesize = parseInt(text(pos + 54, 8), 16);
    const namesize = parseInt(text(pos + 94, 8), 16);
    const name = text(pos + 110, namesize - 1);
    pos = align(align(pos + 110 + namesize) + filesize);
    if (name === 'TRAILER!!!') return pos;
  }
}

/** The end of the zstd frames that start at `at` (RFC 8878: frame header, blocks, checksum). */
function zstdEnd(b: Uint8Array, at: number): number {
  let pos = at;
  while (pos + 4 <= b.length && b[pos] === 0x28 && b[pos + 1] === 0xb5 && b[pos + 2] === 0x2f && b[pos + 3] === 0xfd) {
    const fhd = b[pos + 4]!;
    const single = (fhd >> 5) & 1;
    const fcs = [single, 2, 4, 8][fhd >> 6]!;
    pos += 5 + (single ? 0 : 1) + [0, 1, 2, 4][fhd & 3]! + fcs;
    for (;;) {
      const h = b[pos]! | (b[pos + 1]! << 8) | (b[pos + 2]! << 16);
      const type = (h >> 1) & 3;
      pos += 3 + (type === 1 ? 1 : h >>> 3);
      if (h & 1) break;
    }
    if (fhd & 4) pos += 4;
  }
  if (pos === at) throw new Error(`no zstd frame at byte ${at}`);
  return pos;
}

/**
 * An initramfs file split the way the kernel reads it: the first archive (zstd-compressed or
 * plain newc), decompressed; then, after zero padding, the uncompressed segment (compressed
 * modules as shipped, packed tools' squashfs images), empty when there is none.
 */
export function imageArchives(image: Uint8Array): { main: Buffer; segment: Buffer } {
  const zstd = image[0] === 0x28 && image[1] === 0xb5;
  const end = zstd ? zstdEnd(image, 0) : newcEnd(image, 0);
  const main = zstd ? execFileSync('zstd', ['-dcq'], { input: image.subarray(0, end), maxBuffer: 1 << 30 }) : Buffer.from(image.subarray(0, end));
  let at = end;
  while (at < image.length && image[at] === 0) at++;
  const segment = Buffer.from(image.subarray(at));
  if (segment.length && newcEnd(segment, 0) !== segment.length) throw new Error('bytes after the uncompressed segment');
  return { main, segment };
}

/** Member names of the image's archives, listed by GNU cpio (the main archive's first). */
export function imageNames(image: Uint8Array): string[] {
  const { main, segment } = imageArchives(image);
  const list = (b: Buffer) => (b.length ? execFileSync('cpio', ['-it', '--quiet'], { input: b, encoding: 'utf8', maxBuffer: 1 << 28 }).split('\n').filter(Boolean) : []);
  return [...list(main), ...list(segment)];
}

/** Member names of a squashfs image, listed by unsquashfs (paths without the leading "/"). */
export function squashfsNames(image: Uint8Array): string[] {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-sqfs-'));
  const file = path.join(dir, 'image.sqfs');
  fs.writeFileSync(file, image);
  try {
    return execFileSync('unsquashfs', ['-lc', '-d', '', file], { encoding: 'utf8', maxBuffer: 1 << 26 }).split('\n').filter(Boolean).map((l) => l.replace(/^\/+/, ''));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
