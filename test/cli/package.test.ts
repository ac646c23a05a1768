/**
 * The installable package: `npm pack` (its prepack builds; here the build npm test made is
 * packed as it is) makes a tarball holding the bundled command and the static /init (x86-64,
 * and build/init-aarch64 for arm64), which
 * `npm install -g` puts into a prefix; there it builds an initramfs with no C compiler, no
 * make and no checkout on PATH. The oracle: the archive's own listing (GNU cpio) and the
 * manifest inside it.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const repo = new URL('../..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'vdboot-package-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A PATH of every program this machine has, except compilers, assemblers, linkers and make. */
function pathWithoutCompilers(): string {
  const bin = join(dir, 'bin-nocc');
  mkdirSync(bin);
  const banned = /^(gcc|cc|c\+\+|g\+\+|cpp|clang|musl-gcc|tcc|make|ld|as)([-.].*)?$|^(x86_64|aarch64)-linux-gnu-(gcc|g\+\+|cpp|as|ld)/;
  for (const d of ['/usr/local/bin', '/usr/bin', '/bin', '/usr/sbin', '/sbin']) {
    if (!existsSync(d)) continue;
    for (const name of readdirSync(d)) {
      if (banned.test(name) || existsSync(join(bin, name))) continue;
      symlinkSync(join(d, name), join(bin, name));
    }
  }
  return bin;
}

describe('the npm package', () => {
  it('packs the command and the static /init, installs into a prefix, and builds an initramfs there with no C compiler on PATH', () => {
    const packed = execFileSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: repo, encoding: 'utf8' });
    const [info] = JSON.parse(packed) as { filename: string; files: { path: string }[] }[];
    const files = info!.files.map((f) => f.path).sort();
    expect(files).toEqual(['README.md', 'bin/vdboot.mjs', 'build/cli.mjs', 'build/init', 'build/init-aarch64', 'build/init-stripped', 'package.json']);
    const prefix = join(dir, 'prefix');
    execFileSync('npm', ['install', '-g', '--offline', '--no-audit', '--no-fund', '--prefix', prefix, join(dir, info!.filename)], { encoding: 'utf8' });
    // both static hosts installed: x86-64 (EM_X86_64 62) and arm64 (EM_AARCH64 183) at the ELF header's e_machine
    const installed = join(prefix, 'lib', 'node_modules', 'vdboot', 'build');
    expect([readFileSync(join(installed, 'init')).readUInt16LE(0x12), readFileSync(join(installed, 'init-aarch64')).readUInt16LE(0x12)]).toEqual([62, 183]);
    const nocc = pathWithoutCompilers();
    const env = { ...process.env, PATH: `${join(prefix, 'bin')}:${nocc}` };
    expect(spawnSync('sh', ['-c', 'command -v gcc || command -v cc || command -v make'], { env }).status).not.toBe(0);
    const out = join(dir, 'initrd.img');
    const r = spawnSync('vdboot', ['mkinitramfs', '--compress', 'none', '-o', out], { env, encoding: 'utf8', cwd: dir });
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
    expect(r.stdout).toMatch(/initrd\.img: .* modules for kernel /);
    const list = execFileSync('sh', ['-c', 'cpio -it --quiet < "$1"', 'sh', out], { encoding: 'utf8', maxBuffer: 64 << 20 }).split('\n');
    expect(list).toContain('init');
    expect(list).toContain('bin/busybox');
  }, 120_000);
});
