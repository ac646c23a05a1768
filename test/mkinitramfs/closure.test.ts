import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { loadOrder, loadWaves, moduleKey } from '../../src/formats/manifest.ts';
import { QUIETLY_OPTIONAL, UNIVERSAL_MODULES } from '../../mkinitramfs/build.ts';
import { installedRelease, universalBuild } from './helpers.ts';

const release = installedRelease();

/** Module names modprobe would load for `name` (hard deps, softdeps and itself), from `modprobe --show-depends`. */
function modprobeShowDepends(name: string): string[] {
  const out = execFileSync('modprobe', ['-S', release, '--show-depends', name], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => l.startsWith('insmod '))
    .map((l) => moduleKey(path.basename(l.split(/\s+/)[1]).replace(/\.ko(\.\w+)?$/, '')));
}

/** Direct hard dependencies, from the module's own modinfo. */
function modinfoDepends(name: string): string[] {
  return execFileSync('modinfo', ['-k', release, '-F', 'depends', name], { encoding: 'utf8' })
    .trim()
    .split(',')
    .filter(Boolean)
    .map(moduleKey);
}

function modprobeResolve(alias: string): string[] {
  try {
    return execFileSync('modprobe', ['-S', release, '-R', alias], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n').filter(Boolean).map(moduleKey);
  } catch {
    return [];
  }
}

describe(`module closure for kernel ${release}`, () => {
  it('includes every module modprobe --show-depends would load for each included module', () => {
    const { manifest } = universalBuild();
    const included = new Set(Object.keys(manifest.modules));
    expect(included.size).toBeGreaterThan(20);
    for (const name of included) {
      for (const dep of modprobeShowDepends(name)) expect(included, `${dep} (needed by ${name})`).toContain(dep);
    }
  });

  it('every universal-set module the kernel has as a module is included', () => {
    const { manifest, notes } = universalBuild();
    let present = 0;
    for (const name of UNIVERSAL_MODULES) {
      let loads: string[];
      try {
        loads = modprobeShowDepends(name);
      } catch {
        // the kernel has no such module: the build says so (unless it is commonly absent)
        if (!QUIETLY_OPTIONAL.has(moduleKey(name))) expect(notes.join('\n'), name).toContain(moduleKey(name));
        expect(manifest.modules).not.toHaveProperty(moduleKey(name));
        continue;
      }
      if (loads.length === 0) continue; // built in
      expect(manifest.modules, name).toHaveProperty(moduleKey(name));
      present++;
    }
    expect(present).toBeGreaterThan(UNIVERSAL_MODULES.length / 2);
  });

  it('orders every direct dependency (modinfo depends) before its user, in deps and in loadOrder', () => {
    const { manifest } = universalBuild();
    const direct = new Map<string, string[]>();
    for (const name of Object.keys(manifest.modules)) direct.set(name, modinfoDepends(name));
    let checked = 0;
    for (const [name, mod] of Object.entries(manifest.modules)) {
      for (const d of direct.get(name)!) expect(mod.deps, `${name} deps`).toContain(d);
      mod.deps.forEach((d, i) => {
        for (const dd of direct.get(d) ?? []) {
          expect(mod.deps.indexOf(dd), `${dd} before ${d} in ${name}.deps`).toBeGreaterThanOrEqual(0);
          expect(mod.deps.indexOf(dd)).toBeLessThan(i);
          checked++;
        }
      });
      const order = loadOrder(manifest, [name]);
      expect(order.at(-1) === name || mod.softPost.length > 0).toBe(true);
      for (const d of direct.get(name)!) expect(order.indexOf(d)).toBeLessThan(order.indexOf(name));
    }
    expect(checked).toBeGreaterThan(10);
  });

  it('loadWaves puts every hard dependency in an earlier wave', () => {
    const { manifest } = universalBuild();
    const all = Object.keys(manifest.modules);
    const waves = loadWaves(manifest, all);
    const waveOf = new Map<string, number>();
    waves.forEach((w, i) => w.forEach((m) => waveOf.set(m, i)));
    expect(waveOf.size).toBe(all.length);
    for (const name of all) for (const d of modinfoDepends(name)) expect(waveOf.get(d)!, `${d} before ${name}`).toBeLessThan(waveOf.get(name)!);
    expect(waves.length).toBeGreaterThan(1);
  });

  it('softdeps resolve to modules: ext4 pre-loads crc32c as modprobe does', () => {
    const { manifest } = universalBuild();
    const crc32c = modprobeResolve('crypto-crc32c').filter((m) => m in manifest.modules);
    expect(crc32c.length).toBeGreaterThan(0);
    expect([...manifest.modules.ext4.softPre].sort()).toEqual(expect.arrayContaining(crc32c));
    const order = loadOrder(manifest, ['ext4']);
    for (const c of crc32c) expect(order.indexOf(c)).toBeLessThan(order.indexOf('ext4'));
  });

  it('--add-module pulls the module and its dependencies (by name and by alias)', () => {
    const base = universalBuild();
    const extra = ['hv_storvsc', 'fs-msdos'];
    const { manifest } = universalBuild({ addModules: extra });
    for (const name of extra) {
      const targets = modprobeResolve(name);
      expect(targets.length, name).toBeGreaterThan(0);
      for (const t of targets) {
        expect(base.manifest.modules, `${t} not in the default set`).not.toHaveProperty(t);
        for (const dep of modprobeShowDepends(t)) expect(manifest.modules, `${dep} for ${name}`).toHaveProperty(dep);
      }
    }
    expect(manifest.build.addedModules).toEqual(['hv_storvsc', 'fs_msdos']);
  });

  it('an unknown --add-module stops with a message naming it', () => {
    expect(() => universalBuild({ addModules: ['no_such_module_vdboot'] })).toThrow(/no_such_module_vdboot.*no module or alias/);
  });

  it('the filesystem table follows the kernel fs- aliases (ext2 and ext3 by ext4 when so built)', () => {
    const { manifest } = universalBuild();
    expect(Object.keys(manifest.filesystems).length).toBeGreaterThan(5);
    for (const [fstype, mod] of Object.entries(manifest.filesystems)) {
      if (mod === '') continue;
      expect(modprobeResolve(`fs-${fstype}`), fstype).toContain(mod);
    }
    for (const fstype of ['ext2', 'ext3', 'ext4', 'xfs', 'btrfs', 'vfat', 'exfat', 'iso9660', 'squashfs', 'overlay']) {
      const oracle = modprobeResolve(`fs-${fstype}`);
      if (oracle.length === 1) expect(manifest.filesystems[fstype], fstype).toBe(oracle[0]);
    }
    for (const p of manifest.preload) expect(manifest.modules, p).toHaveProperty(p);
  });

  it("vfat brings the code page and I/O charset the kernel's config makes it ask for at mount", () => {
    const { manifest } = universalBuild();
    const config = fs.readFileSync(`/boot/config-${release}`, 'utf8');
    const value = (key: string) => new RegExp(`^${key}="?([^"\\n]*)"?$`, 'm').exec(config)?.[1];
    const wanted = [`nls_cp${value('CONFIG_FAT_DEFAULT_CODEPAGE')}`, `nls_${value('CONFIG_FAT_DEFAULT_IOCHARSET')!.replace(/-/g, '_')}`];
    const order = loadOrder(manifest, ['vfat']);
    for (const w of wanted) {
      if (modprobeShowDepends(w).length === 0) continue; // built in
      expect(manifest.modules.vfat.softPre, w).toContain(w);
      expect(order.indexOf(w), w).toBeLessThan(order.indexOf('vfat'));
    }
    const exfatCharset = `nls_${value('CONFIG_EXFAT_DEFAULT_IOCHARSET')}`;
    expect(loadOrder(manifest, ['exfat'])).toContain(exfatCharset);
    expect(manifest.preload.filter((m) => m.startsWith('nls_'))).toEqual([]);
  });
});
