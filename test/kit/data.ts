/**
 * Test data that travels with the repository (test/data/), found relative to this file so
 * the tests run from any clone:
 *
 *   REAL_WORLD_DIR      test/data/real-world: images made by Hyper-V, Disk2vhd, Virtual PC,
 *                       fuzzers (its README.md says what a correct reader does with each)
 *   BITLOCKER_DIR       test/data/bitlocker: BitLocker volumes made by Windows
 *   realWorld(name, dir): string   decompresses REAL_WORLD_DIR/NAME (.bz2 or .xz) into dir
 *                                  once; returns the path
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const TEST_DATA_DIR = fileURLToPath(new URL('../data/', import.meta.url));
export const REAL_WORLD_DIR = path.join(TEST_DATA_DIR, 'real-world');
export const BITLOCKER_DIR = path.join(TEST_DATA_DIR, 'bitlocker');

/** Decompresses test/data/real-world/NAME (.bz2 or .xz) into dir once; returns the path. */
export function realWorld(name: string, dir: string): string {
  const src = path.join(REAL_WORLD_DIR, name);
  const out = path.join(dir, name.replace(/\.(bz2|xz)$/, ''));
  if (fs.existsSync(out)) return out;
  const tool = name.endsWith('.bz2') ? 'bzip2' : 'xz';
  fs.writeFileSync(out, execFileSync(tool, ['-dc', src], { maxBuffer: 1 << 30 }));
  return out;
}
