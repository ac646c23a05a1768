/**
 * Host-side helpers for expansion tests: a plain file as an ExpandFile, images made by
 * qemu-img and written at scattered offsets by qemu-io, and the oracles (qemu-img
 * convert -O raw, qemu-img map, qemu-img check).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FormatError } from '../../src/formats/block-reader.ts';
import type { ExpandFile } from '../../src/formats/expand/index.ts';
import { vhdxFormat } from '../../src/formats/vhdx.ts';

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
}

export function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
}

/** A file opened read-write as the expanders see it; `writes` counts write calls. */
export function fileOf(p: string, readOnly = false): ExpandFile & { close(): void; writes: number } {
  const fd = fs.openSync(p, readOnly ? 'r' : 'r+');
  const f = {
    name: p,
    writes: 0,
    get size() { return fs.fstatSync(fd).size; },
    read(offset: number, length: number): Uint8Array {
      const size = fs.fstatSync(fd).size;
      if (offset < 0 || length < 0 || offset + length > size) throw new FormatError(`${p}: read of ${length} at ${offset} is past the end (${size})`, 'offset', offset);
      const b = Buffer.alloc(length);
      let done = 0;
      while (done < length) done += fs.readSync(fd, b, done, length - done, offset + done);
      return new Uint8Array(b.buffer, b.byteOffset, length);
    },
    write(offset: number, bytes: Uint8Array): void {
      if (readOnly) throw new Error('read-only');
      f.writes++;
      let done = 0;
      while (done < bytes.length) done += fs.writeSync(fd, bytes, done, bytes.length - done, offset + done);
    },
    sync: () => fs.fsyncSync(fd),
    truncate: (n: number) => fs.ftruncateSync(fd, n),
    close: () => fs.closeSync(fd),
  };
  return f;
}

export const QEMU_FMT: Record<string, string> = { vhd: 'vpc', vdi: 'vdi', vhdx: 'vhdx', vmdk: 'vmdk' };

/** A dynamic image of `sizeMiB` with patterned writes at scattered offsets (some straddling blocks). */
export function makeImage(dir: string, format: 'vhd' | 'vdi' | 'vhdx' | 'vmdk', sizeMiB: number, writes: [number, number, number][], options: string[] = []): string {
  const img = path.join(dir, `img-${Math.random().toString(36).slice(2)}.${format}`);
  sh('qemu-img', ['create', '-q', '-f', QEMU_FMT[format]!, ...(options.length ? ['-o', options.join(',')] : []), img, `${sizeMiB}M`]);
  const cmds = writes.flatMap(([off, len, pat]) => ['-c', `write -P ${pat} ${off} ${len}`]);
  if (cmds.length) sh('qemu-io', ['-f', QEMU_FMT[format]!, ...cmds, img]);
  return img;
}

export function qemuRaw(img: string, format: string): Buffer {
  const out = `${img}.raw`;
  sh('qemu-img', ['convert', '-f', format, '-O', 'raw', img, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** qemu-img check's exit code and output (63: the format has no check, as for VHD). */
export function qemuCheck(img: string, format: string): { code: number; out: string } {
  const r = spawnSync('qemu-img', ['check', '-f', format, img], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

/**
 * Bytes of the virtual disk not allocated in the image: qemu-img map's view, except for
 * VHDX, where qemu reports every range as data; there vdboot's reader reads the BAT.
 */
export function unallocatedBytes(img: string, format: string): number {
  if (format === 'vhdx') {
    const f = fileOf(img, true);
    try {
      return vhdxFormat.open(f, { path: img, openFile: () => { throw new Error('no parent'); } }).extents.filter((e) => e.kind !== 'data').reduce((n, e) => n + e.length, 0);
    } finally {
      f.close();
    }
  }
  const map = JSON.parse(sh('qemu-img', ['map', '-f', format, '--output=json', img])) as { start: number; length: number; data: boolean; zero: boolean; offset?: number }[];
  return map.filter((m) => !m.data || m.offset === undefined).reduce((n, m) => n + m.length, 0);
}

export function sha(p: string): string {
  return sh('sha256sum', [p]).split(' ')[0]!;
}
