/**
 * A tree shaped like a library directory for the root=tmpfs benchmarks: nested packages
 * of small files (0-3000 bytes) and a symbolic link every fifty, the same for a given
 * count on every run, so the unpacker's per-entry cost dominates, not copying bytes.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** Writes `files` entries (and about files/25 directories) under `root`/usr/lib/python3/dist-packages. */
export function buildSmallFileTree(root: string, files: number): void {
  let seed = 1;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  const dirs: string[] = [];
  for (let i = 0; i < Math.ceil(files / 25); i++) {
    const parent = dirs.length && rand(3) ? dirs[rand(dirs.length)]! : 'usr/lib/python3/dist-packages';
    const d = `${parent}/package_${i}`;
    fs.mkdirSync(path.join(root, d), { recursive: true });
    dirs.push(d);
  }
  for (let i = 0; i < files; i++) {
    const d = dirs[i % dirs.length]!;
    const name = `${d}/module_${i}_${'x'.repeat(rand(12))}.py`;
    if (i % 50 === 49) {
      fs.symlinkSync(`module_${i - 1}.py`, path.join(root, name));
      continue;
    }
    const body = Buffer.alloc(rand(3000));
    for (let k = 0; k < body.length; k++) body[k] = 0x20 + rand(90);
    fs.writeFileSync(path.join(root, name), body);
  }
  execFileSync('find', [root, '-exec', 'touch', '-h', '-d', '@1600000000', '{}', '+']);
}
