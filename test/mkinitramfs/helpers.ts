import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildInitramfs, repoRoot, type MkinitramfsOptions, type MkinitramfsResult } from '../../mkinitramfs/build.ts';

export function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-mkinitramfs-'));
}

/** The Debian kernel installed for the tests (package linux-image-amd64). */
export function installedRelease(): string {
  const all = fs.readdirSync('/lib/modules').filter((r) => fs.existsSync(path.join('/lib/modules', r, 'modules.dep')));
  const debian = all.filter((r) => /-amd64$/.test(r)).sort();
  const release = debian.at(-1) ?? all.sort().at(-1);
  if (!release) throw new Error('no kernel modules in /lib/modules: install linux-image-amd64 (scripts/ensure-deps.sh)');
  return release;
}

/** build/init when the C host has been built, else a stand-in file (the generator only copies it). */
export function initBinary(): string {
  const real = path.join(repoRoot(), 'build', 'init');
  if (fs.existsSync(real)) return real;
  const stand = path.join(tmpdir(), 'init');
  fs.writeFileSync(stand, '#!/bin/sh\n# stand-in for the vdboot /init host in tests\n', { mode: 0o755 });
  return stand;
}

let cached: MkinitramfsResult | undefined;
/** One uncompressed build of the default (universal) set for the installed kernel. */
export function universalBuild(extra: MkinitramfsOptions = {}): MkinitramfsResult {
  if (Object.keys(extra).length > 0) return buildInitramfs({ kernel: installedRelease(), initBinary: initBinary(), compress: 'none', ...extra });
  cached ??= buildInitramfs({ kernel: installedRelease(), initBinary: initBinary(), compress: 'none' });
  return cached;
}

export { imageArchives, imageNames, squashfsNames } from '../kit/initramfs-image.ts';
