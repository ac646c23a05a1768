/**
 * Modules shipped compressed stay compressed: on Debian 12's 6.12 (.ko.xz, CONFIG_MODULE_DECOMPRESS=y
 * for xz) the image is the zstd main archive, zeros to a 4-byte boundary, then an uncompressed
 * cpio of the .ko.xz files as shipped, which the outer compression never sees. Checked with
 * zstd and GNU cpio as the oracles, against the kernel package's own files.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildInitramfs, findKernelConfig, kernelModuleDecompression, moduleDecompressor, moduleFileCompression, readKernelConfig, summary } from '../../mkinitramfs/build.ts';
import { cachedKernel } from '../../qemu/harness.ts';
import { readCpio } from '../../src/formats/cpio.ts';
import { recordedMounts, recordedSysfs } from '../kit/sysfs.ts';
import { initBinary, installedRelease, tmpdir } from './helpers.ts';

const kernel612 = cachedKernel('6.12');
const MiB = 1048576;

function cpioList(bytes: Uint8Array): string[] {
  return execFileSync('cpio', ['-it', '--quiet'], { input: Buffer.from(bytes), encoding: 'utf8', maxBuffer: 1 << 28 }).split('\n').filter(Boolean);
}

describe('kernel configs: who decompresses modules', () => {
  it('6.12 decompresses xz itself; 6.1 (modules plain, no MODULE_DECOMPRESS) nothing', () => {
    const r61 = installedRelease();
    const c61 = findKernelConfig(r61);
    expect(c61).toBe(`/boot/config-${r61}`);
    expect(kernelModuleDecompression(readKernelConfig(c61!))).toEqual([]);
    if (kernel612) {
      const release = path.basename(kernel612).replace(/^vmlinuz-/, '');
      const c = findKernelConfig(release, kernel612);
      expect(c).toBe(path.join(path.dirname(kernel612), `config-${release}`));
      expect(kernelModuleDecompression(readKernelConfig(c!))).toEqual(['xz']);
    }
    expect(kernelModuleDecompression(new Map([['CONFIG_MODULE_COMPRESS_ZSTD', 'y']]))).toEqual([]);
    expect(kernelModuleDecompression(undefined)).toEqual([]);
  });

  it('busybox-static has xzcat and zcat, not zstd: .ko.zst needs the zstd program in the image', () => {
    const applets = new Set(execFileSync('/bin/busybox', ['--list'], { encoding: 'utf8' }).split('\n'));
    expect(moduleDecompressor('xz', applets, [])).toEqual(['/bin/busybox', 'xzcat']);
    expect(moduleDecompressor('gz', applets, [])).toEqual(['/bin/busybox', 'zcat']);
    expect(moduleDecompressor('zst', applets, [])).toBeUndefined();
    expect(moduleDecompressor('zst', applets, ['zstd'])).toEqual(['/usr/bin/zstd', '-dcq']);
    expect(moduleFileCompression('kernel/fs/ext4/ext4.ko.xz')).toBe('xz');
    expect(moduleFileCompression('kernel/fs/ext4/ext4.ko')).toBe('');
  });
});

describe.skipIf(!kernel612)('mkinitramfs on 6.12: .ko.xz kept as shipped in an uncompressed segment', () => {
  it('zstd main archive + zero padding + uncompressed modules cpio; every module byte-identical to the package; paths and modules.dep agree', () => {
    const r = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), sourceDateEpoch: 1 });
    const image = Buffer.from(r.image);
    // the layout
    expect(r.modulesOffset % 4).toBe(0);
    expect(image.subarray(r.modulesOffset, r.modulesOffset + 6).toString('latin1')).toBe('070701');
    expect(r.modulesOffset + r.modulesCpio.length).toBe(image.length);
    // the zstd frame, then at most 3 zeros (the kernel skips zeros between archives; zstd's CLI would not)
    expect(r.modulesOffset - r.packedLength).toBeLessThan(4);
    expect([...image.subarray(r.packedLength, r.modulesOffset)].every((b) => b === 0)).toBe(true);
    const main = image.subarray(0, r.packedLength);
    expect(execFileSync('zstd', ['-dcq'], { input: main, maxBuffer: 1 << 30 }).equals(Buffer.from(r.cpio))).toBe(true);
    expect(Buffer.from(image.subarray(r.modulesOffset)).equals(Buffer.from(r.modulesCpio))).toBe(true);
    // the main archive has no compressed module; the uncompressed segment only compressed
    // modules, packed tools' squashfs images (cryptsetup by default) and their folders
    const mainNames = cpioList(r.cpio);
    const modNames = cpioList(image.subarray(r.modulesOffset));
    expect(mainNames.filter((n) => /\.ko(\.\w+)?$/.test(n))).toEqual([]);
    const modFiles = modNames.filter((n) => /\.ko\.xz$/.test(n));
    const toolImages = modNames.filter((n) => /^usr\/lib\/vdboot\/[\w-]+\.sqfs$/.test(n));
    expect(toolImages).toEqual(r.tools.includes('cryptsetup') ? ['usr/lib/vdboot/cryptsetup.sqfs'] : []);
    for (const n of modNames.filter((n) => !modFiles.includes(n) && !toolImages.includes(n))) expect([...modFiles, ...toolImages].some((f) => f.startsWith(`${n}/`)), `${n} is a folder of modules or tool images`).toBe(true);
    expect(modFiles.length).toBe(r.modules);
    // every manifest path is in the modules segment, byte for byte the package's file
    const x = tmpdir();
    execFileSync('cpio', ['-i', '-d', '--quiet'], { cwd: x, input: Buffer.from(r.modulesCpio) });
    for (const mod of Object.values(r.manifest.modules)) {
      expect(mod.compression, mod.name).toBe('xz');
      expect(modFiles, mod.name).toContain(mod.path.slice(1));
      const shipped = path.join(r.manifest.build.modulesDir, path.relative(`/lib/modules/${r.manifest.kernelRelease}`, mod.path));
      expect(fs.readFileSync(path.join(x, mod.path)).equals(fs.readFileSync(shipped)), mod.name).toBe(true);
    }
    expect(r.manifest.decompressors).toBeUndefined();
    // modules.dep (for busybox's modprobe in the rescue shell) names the same .ko.xz files
    const y = tmpdir();
    execFileSync('cpio', ['-i', '-d', '--quiet', '--nonmatching', 'dev/*'], { cwd: y, input: Buffer.from(r.cpio) });
    const dep = fs.readFileSync(path.join(y, `lib/modules/${r.manifest.kernelRelease}/modules.dep`), 'utf8');
    expect(dep).toMatch(/^kernel\/fs\/ext4\/ext4\.ko\.xz: .*jbd2\.ko\.xz/m);
    for (const line of dep.trim().split('\n')) for (const f of line.replace(':', '').split(' ')) expect(modFiles, line).toContain(`lib/modules/${r.manifest.kernelRelease}/${f}`);
    // the sizes, as the build counts them
    const sumShipped = Object.values(r.manifest.modules).reduce((a, m) => a + fs.statSync(path.join(x, m.path)).size, 0);
    const sumTools = toolImages.reduce((a, t) => a + fs.statSync(path.join(x, t)).size, 0);
    expect(r.modulesCpio.length - sumShipped - sumTools).toBeLessThan((modNames.length + 1) * 256); // only cpio headers on top
    console.log(`6.12 image ${(image.length / MiB).toFixed(2)} MiB = zstd main ${(r.modulesOffset / MiB).toFixed(2)} MiB (${(r.cpio.length / MiB).toFixed(2)} MiB unpacked) + uncompressed segment ${(r.modulesCpio.length / MiB).toFixed(2)} MiB (${r.modules} .ko.xz, ${(sumShipped / MiB).toFixed(2)} MiB; tool images ${(sumTools / MiB).toFixed(2)} MiB)`);
    expect(summary('out.img', r)).toMatch(/\.ko\.xz kept compressed \(the kernel decompresses them\) in [\d.]+ MiB appended uncompressed/);
  });

  it('for a kernel that cannot decompress them, the .ko.xz stay in the same segment and the manifest names busybox xzcat', () => {
    const r = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'gzip', level: 1, kernelDecompresses: [] });
    expect(r.manifest.decompressors).toEqual({ xz: ['/bin/busybox', 'xzcat'] });
    expect(r.moduleLoading).toEqual({ xz: '/bin/busybox xzcat' });
    expect(r.manifest.modules.ext4!.path).toMatch(/\/ext4\.ko\.xz$/);
    expect(execFileSync('gzip', ['-dc'], { input: Buffer.from(r.image.subarray(0, r.packedLength)), maxBuffer: 1 << 30 }).equals(Buffer.from(r.cpio))).toBe(true);
    expect(cpioList(r.image.subarray(r.modulesOffset)).filter((n) => n.endsWith('.ko.xz')).length).toBe(r.modules);
  });

  it('--hostonly stores the disks\' drivers and the root filesystem\'s modules decompressed in the main archive, the rest as shipped', () => {
    const r = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'gzip', level: 1, hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts({ plain: true }) } });
    const hot = ['ext4', 'jbd2', 'mbcache', 'crc16', 'virtio_blk', 'ahci', 'libata', 'sd_mod'];
    const main = new Map(readCpio(r.cpio).map((e) => [e.name, e.data]));
    for (const m of hot) {
      const mod = r.manifest.modules[m]!;
      expect(mod, m).toMatchObject({ path: expect.stringMatching(new RegExp(`/${m}\\.ko$`)), compression: '' });
      // the kernel package's .ko.xz, decompressed by xz: the same bytes
      const shipped = path.join(r.manifest.build.modulesDir, path.relative(`/lib/modules/${r.manifest.kernelRelease}`, mod.path) + '.xz');
      expect(Buffer.from(main.get(mod.path.slice(1))!).equals(execFileSync('xz', ['-dc', shipped], { maxBuffer: 1 << 28 })), m).toBe(true);
    }
    // the keyboard's drivers (not loaded for the root) stay as shipped, in the uncompressed segment
    for (const m of ['usbhid', 'hid_generic', 'xhci_pci']) expect(r.manifest.modules[m], m).toMatchObject({ compression: 'xz' });
    expect(cpioList(r.modulesCpio)).toContain(r.manifest.modules.usbhid!.path.slice(1));
    expect(r.notes.join('\n')).toMatch(/ext4.* stored decompressed in the gzip archive \(--hostonly: the modules this machine loads first, its disks' drivers and its root's filesystem\)/);
    // asked for by name in a universal image
    const u = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'gzip', level: 1, decompressModules: ['ext4'] });
    expect(u.manifest.modules.ext4!.compression).toBe('');
    expect(u.manifest.modules.jbd2!.compression).toBe('xz');
  });

  it('unpackModules gives the layout before: plain .ko, decompressed here, one compressed archive', () => {
    const r = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'gzip', level: 1, unpackModules: true, without: ['cryptsetup'] });
    expect(r.modulesCpio.length).toBe(0);
    expect(r.modulesOffset).toBe(r.image.length);
    // with the default packed cryptsetup, its image is all the uncompressed segment holds
    const packed = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'gzip', level: 1, unpackModules: true });
    if (packed.tools.includes('cryptsetup')) expect(cpioList(packed.modulesCpio).filter((n) => !n.endsWith('/') && n.includes('.'))).toEqual(['usr/lib/vdboot/cryptsetup.sqfs']);
    expect(r.manifest.modules.ext4).toMatchObject({ path: expect.stringMatching(/\/ext4\.ko$/), compression: '' });
    const ext4 = readCpio(r.cpio).find((e) => e.name === r.manifest.modules.ext4!.path.slice(1))!;
    expect(Buffer.from(ext4.data.subarray(0, 4)).toString('latin1')).toBe('\x7fELF');
  });
});

describe('a kernel shipping .ko.zst without MODULE_DECOMPRESS', () => {
  /** A modules directory of two zstd-compressed stand-in modules, as depmod lays it out. */
  function zstModules(): string {
    const dir = path.join(tmpdir(), '9.9.9-zst');
    fs.mkdirSync(path.join(dir, 'kernel/fs'), { recursive: true });
    for (const n of ['ext4', 'jbd2']) fs.writeFileSync(path.join(dir, `kernel/fs/${n}.ko.zst`), execFileSync('zstd', ['-q', '-c'], { input: `\x7fELF ${n}\n` }));
    fs.writeFileSync(path.join(dir, 'modules.dep'), 'kernel/fs/ext4.ko.zst: kernel/fs/jbd2.ko.zst\nkernel/fs/jbd2.ko.zst:\n');
    fs.writeFileSync(path.join(dir, 'modules.alias'), 'alias fs-ext4 ext4\n');
    return dir;
  }

  it('without the zstd program they are decompressed at build time, said in a note; --with zstd keeps them', () => {
    const modulesDir = zstModules();
    const plain = buildInitramfs({ modulesDir, initBinary: initBinary(), compress: 'none', without: ['ntfs-3g', 'cryptsetup'] });
    expect(plain.manifest.modules.ext4).toMatchObject({ path: '/lib/modules/9.9.9-zst/kernel/fs/ext4.ko', compression: '' });
    expect(plain.modulesCpio.length).toBe(0);
    expect(plain.notes.join('\n')).toMatch(/\.ko\.zst modules were decompressed at build time: kernel 9\.9\.9-zst cannot decompress them \(no kernel config found\).*--with zstd/);
    const kept = buildInitramfs({ modulesDir, initBinary: initBinary(), compress: 'none', without: ['ntfs-3g', 'cryptsetup'], tools: ['zstd'] });
    expect(kept.manifest.modules.ext4).toMatchObject({ path: '/lib/modules/9.9.9-zst/kernel/fs/ext4.ko.zst', compression: 'zst' });
    expect(kept.manifest.decompressors).toEqual({ zst: ['/usr/bin/zstd', '-dcq'] });
    expect(cpioList(kept.modulesCpio)).toContain('lib/modules/9.9.9-zst/kernel/fs/jbd2.ko.zst');
  });
});
