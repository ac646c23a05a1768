/**
 * A kernel's module index read from depmod's text files, and the manifest for another
 * kernel made from it (the initramfs vdboot assembles for kexec). Checked against the real
 * index of Debian 12's 6.12 kernel when .cache/kernels has it.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { builtinFilesystems, bzImageRelease, compareKernelReleases, hardDepsInLoadOrder, manifestForKernel, moduleNameOfPath, parseModulesAlias, parseModulesBuiltin, parseModulesDep, parseSoftdeps } from '../../src/formats/kmod-index.ts';
import { loadOrder, matchModalias, validateManifest, type InitramfsManifest } from '../../src/formats/manifest.ts';
import { cachedKernel, kernelVersion } from '../../qemu/harness.ts';

const DEP = `kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/drivers/md/dm-mod.ko.xz:
kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-bufio.ko.xz:
kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz
kernel/fs/fat/fat.ko.xz:
kernel/fs/nls/nls_cp437.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/sound/core/snd.ko.xz:
`;
const ALIAS = `# Aliases extracted from modules themselves.
alias fs-ext4 ext4
alias fs-ext3 ext4
alias fs-vfat vfat
alias devname:mapper/control dm_mod
alias virtio:d00000002v* virtio_blk
alias pci:v*d*sv*sd*bc04sc03i* snd
alias dm-snapshot dm_snapshot
`;
const running: InitramfsManifest = {
  version: 1,
  kernelRelease: '6.1.0-57-amd64',
  build: { generator: 'vdboot mkinitramfs 0.1.0', sourceDateEpoch: 0, compression: 'zstd', modulesDir: '/lib/modules/6.1.0-57-amd64', addedModules: [] },
  modules: Object.fromEntries(['ext4', 'jbd2', 'mbcache', 'crc16', 'dm_mod', 'dm_snapshot', 'dm_bufio', 'vfat', 'fat', 'nls_cp437', 'virtio_blk', 'virtio_pci', 'ahci'].map((n) => [n, { name: n, path: `/lib/modules/6.1.0-57-amd64/${n}.ko`, deps: [], softPre: n === 'vfat' ? ['nls_cp437'] : [], softPost: [], options: n === 'dm_mod' ? 'major=253' : '', compression: '' as const }])),
  aliases: [],
  builtin: [],
  preload: ['dm_mod', 'dm_snapshot', 'loop'],
  filesystems: { ext4: 'ext4' },
  tools: { busybox: '/bin/busybox', ntfs3g: '/usr/bin/ntfs-3g' },
};

describe('modules.dep, modules.alias, modules.builtin, modules.softdep', () => {
  it('module names come from paths, - and _ the same', () => {
    expect(moduleNameOfPath('kernel/drivers/md/dm-mod.ko.xz')).toBe('dm_mod');
    expect(moduleNameOfPath('kernel/fs/ext4/ext4.ko')).toBe('ext4');
    expect(moduleNameOfPath('kernel/x/a-b.ko.zst')).toBe('a_b');
  });

  it('modules.dep: files and dependency lists by canonical name', () => {
    const { files, depList } = parseModulesDep(DEP);
    expect(files.get('dm_snapshot')).toBe('kernel/drivers/md/dm-snapshot.ko.xz');
    expect(depList.get('ext4')).toEqual(['crc16', 'mbcache', 'jbd2']);
    expect(depList.get('mbcache')).toEqual([]);
    expect(hardDepsInLoadOrder(depList, 'dm_snapshot')).toEqual(['dm_mod', 'dm_bufio']);
  });

  it('modules.alias: pattern and module, comments skipped, filtered by module before anything else', () => {
    expect(parseModulesAlias(ALIAS)).toContainEqual(['devname:mapper/control', 'dm_mod']);
    expect(parseModulesAlias(ALIAS, (n) => n === 'ext4')).toEqual([['fs-ext4', 'ext4'], ['fs-ext3', 'ext4']]);
  });

  it('modules.builtin, softdeps, built-in filesystem types from modules.builtin.modinfo', () => {
    expect([...parseModulesBuiltin('kernel/fs/proc/proc.ko\nkernel/drivers/md/dm-mod.ko\n\n')]).toEqual(['proc', 'dm_mod']);
    expect(parseSoftdeps('# c\nsoftdep ext4 pre: crc32c post: x\nsoftdep a-b pre: c\n').get('ext4')).toEqual({ pre: ['crc32c'], post: ['x'] });
    expect(parseSoftdeps('softdep a-b pre: c').get('a_b')).toEqual({ pre: ['c'], post: [] });
    expect(builtinFilesystems('ext4.alias=fs-ext4\0ext4.license=GPL\0tmpfs.alias=fs-tmpfs\0x.alias=pci:v*\0')).toEqual(['ext4', 'tmpfs']);
  });
});

describe('kernel releases and images', () => {
  it('orders releases as versions', () => {
    const sorted = ['6.12.118+deb12-amd64', '6.1.0-9-amd64', '6.1.0-57-amd64', '5.10.0-30-amd64', '6.1.0-57-amd64'].sort(compareKernelReleases);
    expect(sorted).toEqual(['5.10.0-30-amd64', '6.1.0-9-amd64', '6.1.0-57-amd64', '6.1.0-57-amd64', '6.12.118+deb12-amd64']);
    expect(compareKernelReleases('6.12.118+deb12-amd64', '6.1.0-57-amd64')).toBeGreaterThan(0);
  });

  it('reads the release from a bzImage header; anything else is not one', () => {
    const head = new Uint8Array(0x4000);
    head.set([0x48, 0x64, 0x72, 0x53], 0x202);
    head[0x20e] = 0x00; head[0x20f] = 0x10; // version string at 0x1200
    head.set(Array.from('6.12.118+deb12-amd64 (debian-kernel@lists.debian.org) #1', (c) => c.charCodeAt(0)), 0x1200);
    expect(bzImageRelease(head)).toBe('6.12.118+deb12-amd64');
    expect(bzImageRelease(new Uint8Array(0x4000))).toBeUndefined();
    expect(bzImageRelease(head.subarray(0, 0x100))).toBeUndefined();
  });

  it('the installed kernel\'s own header names its release', () => {
    const k = cachedKernel('6.12');
    if (!k) return;
    expect(bzImageRelease(new Uint8Array(readFileSync(k).subarray(0, 0x10000)))).toBe(kernelVersion(k));
  });
});

describe('a manifest for another kernel, with the running initramfs\'s module set', () => {
  const index = { release: '6.12.118+deb12-amd64', ...parseModulesDep(DEP), softdeps: parseSoftdeps(''), builtin: parseModulesBuiltin('kernel/drivers/virtio/virtio_pci.ko\n') };
  const made = manifestForKernel(index, ALIAS, 'tmpfs.alias=fs-tmpfs\0', running);

  it('the same modules by name, with the new kernel\'s dependencies, paths and compression', () => {
    const m = made.manifest;
    expect(validateManifest(m)).toEqual([]);
    expect(m.kernelRelease).toBe('6.12.118+deb12-amd64');
    expect(Object.keys(m.modules).sort()).toEqual(['crc16', 'dm_bufio', 'dm_mod', 'dm_snapshot', 'ext4', 'fat', 'jbd2', 'mbcache', 'nls_cp437', 'vfat', 'virtio_blk']);
    expect(m.modules.ext4).toMatchObject({ path: '/lib/modules/6.12.118+deb12-amd64/kernel/fs/ext4/ext4.ko.xz', deps: ['jbd2', 'mbcache', 'crc16'], compression: 'xz' });
    expect(m.modules.dm_mod!.options).toBe('major=253');
    expect(m.modules.vfat!.softPre).toEqual(['nls_cp437']);
    expect(loadOrder(m, ['ext4']).at(-1)).toBe('ext4');
    expect(made.files).toContainEqual({ rel: 'kernel/fs/ext4/ext4.ko.xz', path: '/lib/modules/6.12.118+deb12-amd64/kernel/fs/ext4/ext4.ko.xz' });
  });

  it('cut down to the modules this boot loaded: their closure in the new kernel, preloads kept', () => {
    const cut = manifestForKernel(index, ALIAS, 'tmpfs.alias=fs-tmpfs\0', running, new Set(['virtio_blk', 'ext4', 'jbd2', 'mbcache', 'crc16', 'snd']));
    // ext4's new dependencies come with it, vfat (not loaded) does not; dm_mod and dm_snapshot are preloads
    expect(Object.keys(cut.manifest.modules).sort()).toEqual(['crc16', 'dm_bufio', 'dm_mod', 'dm_snapshot', 'ext4', 'jbd2', 'mbcache', 'virtio_blk']);
    expect(cut.manifest.aliases.some(([, mods]) => mods.includes('vfat'))).toBe(false);
    expect(cut.missing).toEqual([]);
    expect(validateManifest(cut.manifest)).toEqual([]);
  });

  it('modules the new kernel lacks are named; built-ins are not missing', () => {
    expect(made.missing).toEqual(['ahci']);
    expect(made.manifest.builtin).toEqual(['virtio_pci']);
  });

  it('aliases of included modules only, filesystems from fs- aliases and built-ins, preloads kept when present', () => {
    const m = made.manifest;
    expect(matchModalias(m, 'virtio:d00000002v00001AF4')).toEqual(['virtio_blk']);
    expect(m.aliases.some(([, mods]) => mods.includes('snd'))).toBe(false);
    expect(m.filesystems).toEqual({ ext3: 'ext4', ext4: 'ext4', tmpfs: '', vfat: 'vfat' });
    expect(m.preload).toEqual(['dm_mod', 'dm_snapshot']);
    expect(m.tools).toEqual(running.tools);
  });

  it('Debian 12\'s 6.12 index: every universal module resolves, every dependency is included', () => {
    const k = cachedKernel('6.12');
    if (!k) return;
    const dir = join(dirname(k), '..', 'lib', 'modules', kernelVersion(k));
    const text = (f: string) => readFileSync(join(dir, f), 'utf8');
    const real = { release: kernelVersion(k), ...parseModulesDep(text('modules.dep')), softdeps: parseSoftdeps(text('modules.softdep')), builtin: parseModulesBuiltin(text('modules.builtin')) };
    const r = manifestForKernel(real, text('modules.alias'), text('modules.builtin.modinfo'), running);
    expect(validateManifest(r.manifest)).toEqual([]);
    expect(r.manifest.modules.ext4!.compression).toBe('xz');
    expect(r.manifest.filesystems.ext4).toBe('ext4');
    expect(matchModalias(r.manifest, 'virtio:d00000002v00001AF4')).toContain('virtio_blk');
    expect(r.missing).toEqual([]);
  });
});
