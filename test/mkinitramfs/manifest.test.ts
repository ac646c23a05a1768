import { describe, expect, it } from 'vitest';
import { findModule, isBuiltin, loadOrder, loadWaves, moduleForFilesystem, validateManifest, MANIFEST_VERSION, type InitramfsManifest, type ManifestModule } from '../../src/formats/manifest.ts';

function mod(name: string, deps: string[] = [], softPre: string[] = [], softPost: string[] = []): ManifestModule {
  return { name, path: `/lib/modules/x/${name}.ko`, deps, softPre, softPost, options: '', compression: '' };
}

/** A small hand-made manifest: ext4 over jbd2/mbcache, crc32c as its softdep, a softdep cycle. */
function manifest(): InitramfsManifest {
  const modules = [
    mod('crc16'),
    mod('mbcache'),
    mod('jbd2', ['crc16']),
    mod('crc32c_generic'),
    mod('ext4', ['crc16', 'jbd2', 'mbcache'], ['crc32c_generic']),
    mod('ohci_hcd'),
    mod('ehci_pci'),
    mod('ohci_pci', ['ohci_hcd'], ['ehci_pci']),
    mod('ping', [], [], ['pong']),
    mod('pong', [], [], ['ping']),
    mod('dm_mod'),
  ];
  return {
    version: MANIFEST_VERSION,
    kernelRelease: 'x',
    build: { generator: 'test', sourceDateEpoch: 0, compression: 'none', modulesDir: '/lib/modules/x', addedModules: [] },
    modules: Object.fromEntries(modules.map((m) => [m.name, m])),
    aliases: [],
    builtin: ['unix', 'nls_base'],
    preload: ['dm_mod'],
    filesystems: { ext4: 'ext4', ext2: 'ext4', debugfs: '' },
    tools: { busybox: '/bin/busybox' },
  };
}

describe('manifest helpers the init uses', () => {
  it('loadOrder puts hard deps and softdep pre before a module, each once', () => {
    const m = manifest();
    const order = loadOrder(m, ['ext4', 'jbd2']);
    expect(new Set(order).size).toBe(order.length);
    expect(order.at(-1)).toBe('ext4');
    for (const d of ['crc16', 'jbd2', 'mbcache', 'crc32c_generic']) expect(order.indexOf(d)).toBeLessThan(order.indexOf('ext4'));
    expect(order.indexOf('crc16')).toBeLessThan(order.indexOf('jbd2'));
  });

  it('loadOrder treats - and _ alike and skips unknown and built-in names', () => {
    const m = manifest();
    expect(loadOrder(m, ['dm-mod', 'no-such-module', 'unix'])).toEqual(['dm_mod']);
    expect(findModule(m, 'dm-mod')?.name).toBe('dm_mod');
    expect(findModule(m, 'constructor')).toBeUndefined();
    expect(isBuiltin(m, 'nls-base')).toBe(true);
    expect(isBuiltin(m, 'ext4')).toBe(false);
  });

  it('loadOrder survives a softdep cycle and loads softdep post after', () => {
    const m = manifest();
    const order = loadOrder(m, ['ping']);
    expect(order).toEqual(['ping', 'pong']);
  });

  it('loadWaves: each wave only needs earlier waves', () => {
    const m = manifest();
    const waves = loadWaves(m, ['ext4', 'ohci_pci']);
    const at = new Map<string, number>();
    waves.forEach((w, i) => w.forEach((n) => at.set(n, i)));
    expect(at.get('crc16')).toBe(0);
    expect(at.get('jbd2')).toBe(1);
    expect(at.get('ext4')).toBe(2);
    expect(at.get('ehci_pci')!).toBeLessThan(at.get('ohci_pci')!);
    expect(waves.flat().sort()).toEqual(loadOrder(m, ['ext4', 'ohci_pci']).sort());
  });

  it('moduleForFilesystem: module, built-in, unknown', () => {
    const m = manifest();
    expect(moduleForFilesystem(m, 'ext2')).toBe('ext4');
    expect(moduleForFilesystem(m, 'debugfs')).toBe('');
    expect(moduleForFilesystem(m, 'zfs')).toBeUndefined();
    expect(moduleForFilesystem(m, 'toString')).toBeUndefined();
  });

  it('validateManifest names what is wrong', () => {
    expect(validateManifest(manifest())).toEqual([]);
    expect(validateManifest(null)).toEqual(['the manifest is not a JSON object']);
    const broken = manifest();
    broken.modules.ext4.deps.push('gone');
    (broken as { version: number }).version = 99;
    const problems = validateManifest(broken);
    expect(problems.join('\n')).toMatch(/version 99/);
    expect(problems.join('\n')).toMatch(/ext4 depends on gone/);
  });
});
