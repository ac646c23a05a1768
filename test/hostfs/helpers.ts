import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import type { BlockReader } from '../../src/formats/block-reader.ts';
import { FormatError } from '../../src/formats/block-reader.ts';

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
}

/** Runs a tool; throws with its stderr when it fails. */
export function run(cmd: string, args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv } = {}): Buffer {
  return execFileSync(cmd, args, { input: opts.input, env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 1 << 30 });
}

/** A BlockReader over an image file (reads through the Node fd, like the host CLI). */
export function fileReader(file: string, sizeLimit?: number): BlockReader & { close(): void } {
  const fd = fs.openSync(file, 'r');
  const size = sizeLimit ?? fs.fstatSync(fd).size;
  return {
    name: path.basename(file),
    size,
    read(offset: number, length: number): Uint8Array {
      if (offset < 0 || length < 0 || offset + length > size) {
        throw new FormatError(`${file}: read of ${length} bytes at ${offset} is past the end (${size})`, 'offset', offset);
      }
      const b = new Uint8Array(length);
      let done = 0;
      while (done < length) {
        const n = fs.readSync(fd, b, done, length - done, offset + done);
        if (n === 0) throw new Error('short read');
        done += n;
      }
      return b;
    },
    close: () => fs.closeSync(fd),
  };
}

/** Deterministic pseudo-random bytes (xorshift), so a wrong offset never reads the right bytes. */
export function pseudoRandom(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** True when FUSE mounts work here (root and /dev/fuse): some volumes can only be filled through a mount. */
let fuseOk: boolean | undefined;
export function fuseWorks(): boolean {
  if (fuseOk !== undefined) return fuseOk;
  fuseOk = false;
  if (!fs.existsSync('/dev/fuse')) return false;
  const dir = tmpDir();
  try {
    const img = path.join(dir, 'probe.img');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 4 << 20);
    run('mkntfs', ['-F', '-f', '-q', img]);
    const mnt = path.join(dir, 'm');
    fs.mkdirSync(mnt);
    const r = spawnSync('ntfs-3g', [img, mnt], { stdio: 'ignore', timeout: 20_000 });
    if (r.status === 0) {
      fuseOk = true;
      unmount(mnt);
    }
  } catch {
    fuseOk = false;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return fuseOk;
}

export function unmount(mnt: string): void {
  const r = spawnSync('fusermount3', ['-u', mnt], { stdio: 'ignore' });
  if (r.status !== 0) spawnSync('umount', [mnt], { stdio: 'ignore' });
}
