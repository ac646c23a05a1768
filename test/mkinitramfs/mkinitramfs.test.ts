import { describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { buildInitramfs, compress, kernelReleaseOfImage, writeInitramfs } from '../../mkinitramfs/build.ts';
import { readCpio, writeCpio } from '../../src/formats/cpio.ts';
import { MANIFEST_PATH, validateManifest } from '../../src/formats/manifest.ts';
import { main, type CliIO } from '../../src/cli/main.ts';
import { imageArchives, imageNames, initBinary, installedRelease, tmpdir } from './helpers.ts';

const release = installedRelease();

function listArchive(cpioBytes: Buffer, verbose = false): string[] {
  return execFileSync('cpio', [verbose ? '-itv' : '-it', '--quiet'], { input: cpioBytes, encoding: 'utf8' }).split('\n').filter(Boolean);
}

function captureIO(): CliIO & { out: string; err: string } {
  const io = {
    out: '',
    err: '',
    stdout(t: string) {
      io.out += t;
    },
    stderr(t: string) {
      io.err += t;
    },
    async stdoutBytes() {},
  };
  return io;
}

describe(`vdboot mkinitramfs for kernel ${release}`, () => {
  it('a zstd image unpacks (zstd -d, GNU cpio) to /init, busybox, the manifest and every module, byte for byte; cryptsetup in its squashfs image after it', () => {
    const dir = tmpdir();
    const out = path.join(dir, 'initramfs.img');
    const init = initBinary();
    const epoch = 1_650_000_000;
    const result = writeInitramfs(out, { kernel: release, initBinary: init, compress: 'zstd', sourceDateEpoch: epoch });
    // the zstd archive, then (packed cryptsetup) the uncompressed segment with its squashfs image
    const { main: cpioBytes, segment } = imageArchives(fs.readFileSync(out));
    expect(cpioBytes.equals(Buffer.from(result.cpio))).toBe(true);
    expect(segment.equals(Buffer.from(result.modulesCpio))).toBe(true);
    const names = listArchive(cpioBytes);
    const packed = segment.length ? listArchive(segment) : [];
    expect(names.length + packed.length).toBe(result.files);
    if (result.tools.includes('cryptsetup')) {
      expect(packed).toContain('usr/lib/vdboot/cryptsetup.sqfs');
      expect(names).not.toContain('usr/lib/vdboot/cryptsetup.sqfs');
    }
    for (const p of ['init', 'bin/busybox', 'bin/sh', 'bin/mount', 'bin/umount', 'bin/dmesg', 'bin/ls', 'bin/cat', 'sbin/modprobe', 'etc/initrd-release', MANIFEST_PATH.slice(1), 'dev', 'dev/console', 'dev/null', 'proc', 'sys', 'run', 'root', 'tmp', `lib/modules/${release}/modules.dep`]) {
      expect(names, p).toContain(p);
    }
    for (const mod of Object.values(result.manifest.modules)) expect(names, mod.name).toContain(mod.path.slice(1));

    const x = path.join(dir, 'x');
    fs.mkdirSync(x);
    execFileSync('cpio', ['-i', '-d', '-m', '--quiet', '--nonmatching', 'dev/*'], { cwd: x, input: cpioBytes });
    expect(fs.readFileSync(path.join(x, 'init')).equals(fs.readFileSync(init))).toBe(true);
    expect(fs.statSync(path.join(x, 'init')).mode & 0o777).toBe(0o755);
    expect(fs.statSync(path.join(x, 'init')).mtimeMs / 1000).toBe(epoch);
    expect(fs.readFileSync(path.join(x, 'bin/busybox')).equals(fs.readFileSync('/bin/busybox'))).toBe(true);
    expect(fs.readlinkSync(path.join(x, 'bin/sh'))).toBe('/bin/busybox');
    for (const mod of Object.values(result.manifest.modules)) {
      const rel = path.relative(`/lib/modules/${release}`, mod.path);
      expect(fs.readFileSync(path.join(x, mod.path)).equals(fs.readFileSync(path.join('/lib/modules', release, rel))), mod.name).toBe(true);
    }
    const manifest = JSON.parse(fs.readFileSync(path.join(x, MANIFEST_PATH), 'utf8'));
    expect(validateManifest(manifest)).toEqual([]);
    expect(manifest).toEqual(result.manifest);
    expect(manifest.kernelRelease).toBe(release);
    expect(manifest.build.sourceDateEpoch).toBe(epoch);
    expect(fs.readFileSync(path.join(x, 'etc/initrd-release'), 'utf8')).toMatch(/^NAME="vdboot"$/m);
    // busybox's own modprobe can use the trimmed modules.dep in the rescue shell
    const dep = fs.readFileSync(path.join(x, `lib/modules/${release}/modules.dep`), 'utf8');
    expect(dep).toMatch(/^kernel\/fs\/ext4\/ext4\.ko: .*jbd2\.ko/m);

    const verbose = listArchive(cpioBytes, true);
    expect(verbose.find((l) => l.endsWith(' dev/console'))).toMatch(/^crw------- +1 root +root +5, +1 /);
    expect(verbose.find((l) => l.endsWith(' dev/null'))).toMatch(/^crw-rw-rw- +1 root +root +1, +3 /);
    expect(verbose.find((l) => / tmp$/.test(l))).toMatch(/^drwxrwxrwt /);
  });

  it('two builds of the same inputs are byte-identical; SOURCE_DATE_EPOCH changes the bytes', () => {
    const init = initBinary();
    const saved = process.env.SOURCE_DATE_EPOCH;
    try {
      process.env.SOURCE_DATE_EPOCH = '1234567890';
      const a = buildInitramfs({ kernel: release, initBinary: init, compress: 'gzip', level: 1 });
      const b = buildInitramfs({ kernel: release, initBinary: init, compress: 'gzip', level: 1 });
      // (each compressor's own determinism is checked on a small archive below)
      expect(Buffer.from(a.image).equals(Buffer.from(b.image))).toBe(true);
      expect(a.manifest.build.sourceDateEpoch).toBe(1234567890);
      const first = listArchive(execFileSync('gzip', ['-dc'], { input: a.image.subarray(0, a.packedLength), maxBuffer: 1 << 30 }), true)[0];
      expect(first).toMatch(/ Feb 1[34] {2}2009 /);
      // the packed cryptsetup's squashfs image carries the same time (mksquashfs refuses its
      // time options while SOURCE_DATE_EPOCH is set: the build runs it without)
      const sqfs = a.modulesCpio.length ? readCpio(a.modulesCpio).find((e) => e.name === 'usr/lib/vdboot/cryptsetup.sqfs') : undefined;
      if (a.tools.includes('cryptsetup')) {
        const file = path.join(tmpdir(), 'c.sqfs');
        fs.writeFileSync(file, sqfs!.data);
        expect(execFileSync('unsquashfs', ['-mkfs-time', file], { encoding: 'utf8' }).trim()).toBe('1234567890');
      }
      process.env.SOURCE_DATE_EPOCH = '1234567891';
      const c = buildInitramfs({ kernel: release, initBinary: init, compress: 'none' });
      expect(Buffer.from(c.cpio).equals(Buffer.from(a.cpio))).toBe(false);
      expect(c.cpio.length).toBe(a.cpio.length);
    } finally {
      if (saved === undefined) delete process.env.SOURCE_DATE_EPOCH;
      else process.env.SOURCE_DATE_EPOCH = saved;
    }
  });

  it('the command writes the image and prints its size, files and modules', async () => {
    const dir = tmpdir();
    const out = path.join(dir, 'cli.img');
    const io = captureIO();
    const rc = await main(['mkinitramfs', '--kernel', release, '-o', out, '--compress', 'zstd', '--level', '1', '--init', initBinary(), '--add-module', 'hv_storvsc'], io);
    expect(rc).toBe(0);
    const size = fs.statSync(out).size;
    const m = /: ([\d.]+) MiB \(zstd; [\d.]+ MiB unpacked\), (\d+) files, (\d+) modules for kernel (\S+),/.exec(io.out);
    expect(m, io.out).not.toBeNull();
    expect(m![1]).toBe((size / 1048576).toFixed(2));
    const names = imageNames(fs.readFileSync(out));
    expect(Number(m![2])).toBe(names.length);
    expect(Number(m![3])).toBe(names.filter((n) => n.endsWith('.ko')).length);
    expect(m![4]).toBe(release);
    expect(names.some((n) => n.endsWith('/hv_storvsc.ko'))).toBe(true);
  });

  it('every compression round-trips through its own decompressor (xz with the CRC32 check the kernel needs)', () => {
    const cpio = writeCpio([{ type: 'file', path: 'etc/hello', data: new TextEncoder().encode('hello\n'.repeat(1000)) }], { mtime: 1 });
    for (const how of ['zstd', 'gzip', 'xz'] as const) {
      const packed = compress(cpio, how);
      expect(packed.length, how).toBeLessThan(cpio.length);
      const back = execFileSync(how, ['-dc'], { input: packed });
      expect(back.equals(Buffer.from(cpio)), how).toBe(true);
      expect(Buffer.from(compress(cpio, how)).equals(Buffer.from(packed)), `${how} is deterministic`).toBe(true);
    }
    const xzFile = path.join(tmpdir(), 'a.xz');
    fs.writeFileSync(xzFile, compress(cpio, 'xz'));
    expect(execFileSync('xz', ['--robot', '--list', xzFile], { encoding: 'utf8' })).toMatch(/\tCRC32\t/);
    expect(compress(cpio, 'none')).toBe(cpio);
    expect(() => compress(cpio, 'gzip', 12)).toThrow(/level 12 is not valid for gzip/);
  });

  it('a missing /init host, an unknown kernel and bad arguments give messages, not stacks', async () => {
    expect(() => buildInitramfs({ kernel: release, initBinary: '/nonexistent/vdboot-init' })).toThrow(/\/nonexistent\/vdboot-init does not exist: build the \/init host/);
    expect(() => buildInitramfs({ kernel: '0.0.0-none', initBinary: initBinary() })).toThrow(/no modules for kernel 0\.0\.0-none.*installed:/);
    const io = captureIO();
    await expect(main(['mkinitramfs', '--compress', 'lz77'], io)).rejects.toThrow(/--compress lz77: use one of zstd, gzip, xz, none/);
    await expect(main(['mkinitramfs', '--frobnicate'], io)).rejects.toThrow(/unknown argument "--frobnicate"/);
  });

  it('--kernel accepts a vmlinuz file: its release is read from the bzImage header', () => {
    const vmlinuz = `/boot/vmlinuz-${release}`;
    expect(fs.existsSync(vmlinuz)).toBe(true);
    const described = execFileSync('file', ['-b', vmlinuz], { encoding: 'utf8' });
    const oracle = /version (\S+)/.exec(described)![1];
    expect(kernelReleaseOfImage(vmlinuz)).toBe(oracle);
    const built = buildInitramfs({ kernel: vmlinuz, initBinary: initBinary(), compress: 'none' });
    expect(built.manifest.kernelRelease).toBe(oracle);
    expect(built.manifest.build.modulesDir).toBe(`/lib/modules/${oracle}`);
    expect(() => kernelReleaseOfImage('/bin/busybox')).toThrow(/not a Linux bzImage/);
  });

  it('--with ntfs-3g carries the program and every shared library it loads; fuse is preloaded', () => {
    const dir = tmpdir();
    const result = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', tools: ['ntfs-3g'] });
    expect(result.manifest.tools.ntfs3g).toBe('/usr/bin/ntfs-3g');
    expect(result.manifest.preload).toContain('fuse');
    const x = path.join(dir, 'x');
    fs.mkdirSync(x);
    execFileSync('cpio', ['-i', '-d', '--quiet', '--nonmatching', 'dev/*'], { cwd: x, input: Buffer.from(result.cpio) });
    const interp = fs.readdirSync(path.join(x, 'lib64')).find((n) => n.startsWith('ld-linux'));
    expect(interp).toBeDefined();
    // The extracted loader, told to search only the extracted library directory, finds
    // every library there: the closure is complete.
    const libdir = path.dirname(execFileSync('ldd', ['/usr/bin/ntfs-3g'], { encoding: 'utf8' }).match(/=> (\/\S+)/)![1]);
    const listing = execFileSync(path.join(x, 'lib64', interp!), ['--library-path', path.join(x, libdir), '--list', path.join(x, 'usr/bin/ntfs-3g')], { encoding: 'utf8' });
    const resolved = [...listing.matchAll(/=> (\/\S+)/g)].map((m) => m[1]);
    expect(resolved.length).toBeGreaterThan(0);
    for (const r of resolved) expect(r.startsWith(x), r).toBe(true);
    // and the extracted program runs on them (it prints its version on stderr)
    const run = spawnSync(path.join(x, 'lib64', interp!), ['--library-path', path.join(x, libdir), path.join(x, 'usr/bin/ntfs-3g'), '--version'], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    expect(run.stderr).toMatch(/^ntfs-3g \d/);
  });

  it('--omit-module leaves a universal module out unless another needs it', () => {
    const result = buildInitramfs({ kernel: release, initBinary: initBinary(), compress: 'none', omitModules: ['btrfs', 'xfs', 'libata'] });
    expect(result.manifest.modules).not.toHaveProperty('btrfs');
    expect(result.manifest.modules).not.toHaveProperty('xfs');
    expect(result.manifest.filesystems.btrfs).toBeUndefined();
    expect(result.manifest.modules).toHaveProperty('libata'); // ahci needs it
    expect(result.notes.join('\n')).toMatch(/libata stays in/);
    expect(() => buildInitramfs({ kernel: release, initBinary: initBinary(), omitModules: ['snd_hda_intel'] })).toThrow(/not in the universal set/);
  });
});
