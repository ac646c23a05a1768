/**
 * `vdboot mkinitramfs` with no flags includes ntfs-3g on a kernel without ntfs3 (Debian's
 * 6.1 kernel has none), so NTFS hosts can be written at boot; `--without ntfs-3g` leaves it
 * out; a kernel with ntfs3 does not get it. The oracle is the archive itself, listed by GNU
 * cpio, and the kernel's own module index (modinfo, modules.builtin).
 */
import { describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { buildInitramfs, writeInitramfs } from '../../mkinitramfs/build.ts';
import { readCpio } from '../../src/formats/cpio.ts';
import { MANIFEST_PATH, type InitramfsManifest } from '../../src/formats/manifest.ts';
import { main, type CliIO } from '../../src/cli/main.ts';
import { imageArchives, imageNames, initBinary, squashfsNames, tmpdir } from './helpers.ts';

/** Debian's installed 6.1 kernel (linux-image-amd64 on bookworm), which has no ntfs3. */
const vmlinuz61 = fs.readdirSync('/boot').filter((n) => /^vmlinuz-6\.1\./.test(n)).sort().map((n) => `/boot/${n}`).at(-1);
const release61 = vmlinuz61?.slice('/boot/vmlinuz-'.length);
const hasNtfs3g = fs.existsSync('/usr/bin/ntfs-3g');
const hasCryptsetup = fs.existsSync('/usr/sbin/cryptsetup') || fs.existsSync('/sbin/cryptsetup');
const defaults = hasCryptsetup ? ['cryptsetup', 'ntfs-3g'] : ['ntfs-3g'];

function captureIO(): CliIO & { out: string; err: string } {
  const io = {
    out: '',
    err: '',
    stdout(t: string) { io.out += t; },
    stderr(t: string) { io.err += t; },
    async stdoutBytes() {},
  };
  return io;
}

/**
 * The image's member names (both archives) and its manifest, read back by GNU cpio; `packed`
 * the files inside each packed tool's squashfs image, listed by unsquashfs.
 */
function unpack(file: string): { names: string[]; manifest: InitramfsManifest; packed: Record<string, string[]> } {
  const image = fs.readFileSync(file);
  const names = imageNames(image);
  const { main, segment } = imageArchives(image);
  const dir = tmpdir();
  execFileSync('cpio', ['-id', '--quiet', MANIFEST_PATH.slice(1)], { cwd: dir, input: main });
  const packed: Record<string, string[]> = {};
  if (segment.length) {
    execFileSync('cpio', ['-id', '--quiet', 'usr/lib/vdboot/*'], { cwd: dir, input: segment });
    const tools = path.join(dir, 'usr/lib/vdboot');
    for (const f of fs.existsSync(tools) ? fs.readdirSync(tools) : []) packed[f.replace(/\.sqfs$/, '')] = squashfsNames(fs.readFileSync(path.join(tools, f)));
  }
  return { names, manifest: JSON.parse(fs.readFileSync(path.join(dir, MANIFEST_PATH), 'utf8')) as InitramfsManifest, packed };
}

describe.skipIf(!vmlinuz61 || !hasNtfs3g)(`mkinitramfs defaults for ${vmlinuz61 ?? 'a 6.1 kernel'} (no ntfs3)`, () => {
  it('the kernel really has no ntfs3: neither modinfo nor modules.builtin knows it', () => {
    expect(spawnSync('modinfo', ['-k', release61!, 'ntfs3']).status).not.toBe(0);
    expect(fs.readFileSync(`/lib/modules/${release61}/modules.builtin`, 'utf8')).not.toMatch(/ntfs3/);
  });

  it('vdboot mkinitramfs with no flags includes ntfs-3g and its libraries, loads fuse first, and says so', async () => {
    const out = path.join(tmpdir(), 'initrd.img');
    const io = captureIO();
    expect(await main(['mkinitramfs', '--kernel', vmlinuz61!, '--init', initBinary(), '--compress', 'none', '-o', out], io)).toBe(0);
    const { names, manifest } = unpack(out);
    expect(manifest.tools.ntfs3g).toBe('/usr/bin/ntfs-3g');
    expect(names).toContain('usr/bin/ntfs-3g');
    expect(manifest.preload).toContain('fuse');
    expect(Object.keys(manifest.modules)).toContain('fuse');
    // every library ldd names for ntfs-3g is in the archive
    const libs = [...execFileSync('ldd', ['/usr/bin/ntfs-3g'], { encoding: 'utf8' }).matchAll(/=>\s+(\/\S+)/g)].map((m) => m[1]!.slice(1));
    expect(libs.length).toBeGreaterThan(0);
    for (const lib of libs) expect(names).toContain(lib);
    expect(io.out).toMatch(new RegExp(`^${out.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: .* modules for kernel ${release61}, with ${hasCryptsetup ? 'cryptsetup \\(by default: LUKS volumes [^)]*\\), ' : ''}ntfs-3g \\(by default: the kernel has no ntfs3\\), \\d+\\.\\d+ s$`, 'm'));
    expect(io.err).toMatch(/note: ntfs-3g included: the kernel has no ntfs3, so NTFS hosts are written through ntfs-3g; --without ntfs-3g leaves it out/);
  });

  it('--without ntfs-3g leaves the program and its libraries out, and the note says what that costs', async () => {
    const out = path.join(tmpdir(), 'initrd.img');
    const io = captureIO();
    expect(await main(['mkinitramfs', '--kernel', vmlinuz61!, '--init', initBinary(), '--compress', 'none', '--without', 'ntfs-3g', '-o', out], io)).toBe(0);
    const { names, manifest } = unpack(out);
    expect(manifest.tools.ntfs3g).toBeUndefined();
    expect(names).not.toContain('usr/bin/ntfs-3g');
    expect(manifest.preload).not.toContain('fuse');
    expect(io.out).not.toMatch(/ntfs-3g/);
    expect(manifest.tools.cryptsetup === undefined).toBe(!hasCryptsetup);
    expect(io.err).toMatch(/without ntfs3 and without ntfs-3g \(--without ntfs-3g\), NTFS host partitions are reached only by vdboot's direct path/);
    await expect(main(['mkinitramfs', '--kernel', vmlinuz61!, '--without', 'busybox', '-o', out], captureIO())).rejects.toThrow(/--without busybox: vdboot includes by default only ntfs-3g and cryptsetup/);
    expect(() => buildInitramfs({ kernel: vmlinuz61!, initBinary: initBinary(), tools: ['ntfs-3g'], without: ['ntfs-3g'] })).toThrow(/ntfs-3g is both asked for and left out/);
  });

  it('the library default matches: writeInitramfs with no tools option includes ntfs-3g; tools adds to it', () => {
    const out = path.join(tmpdir(), 'initrd.img');
    const r = writeInitramfs(out, { kernel: vmlinuz61!, initBinary: initBinary(), compress: 'none' });
    expect(r.tools).toEqual(defaults);
    expect(unpack(out).manifest.tools.ntfs3g).toBe('/usr/bin/ntfs-3g');
    // the same bytes as asking for it
    const asked = buildInitramfs({ kernel: vmlinuz61!, initBinary: initBinary(), compress: 'none', tools: defaults as ('ntfs-3g' | 'cryptsetup')[] });
    expect(Buffer.from(asked.cpio).equals(Buffer.from(r.cpio))).toBe(true);
    const withZstd = buildInitramfs({ kernel: vmlinuz61!, initBinary: initBinary(), compress: 'none', tools: ['zstd'] });
    expect(withZstd.manifest.tools).toMatchObject({ ntfs3g: '/usr/bin/ntfs-3g', zstd: '/usr/bin/zstd' });
  });

  it('a kernel with ntfs3 (here: the same modules with ntfs3 listed as built in) still gets ntfs-3g, for sparse image files', () => {
    // A copy of the kernel's module index that says ntfs3 is built in; the module files are
    // reached through symlinks to the real tree.
    const real = `/lib/modules/${release61}`;
    const dir = path.join(tmpdir(), release61!);
    fs.mkdirSync(dir);
    for (const name of fs.readdirSync(real)) {
      if (name === 'modules.builtin') continue;
      fs.symlinkSync(path.join(real, name), path.join(dir, name));
    }
    fs.writeFileSync(path.join(dir, 'modules.builtin'), `${fs.readFileSync(path.join(real, 'modules.builtin'), 'utf8')}kernel/fs/ntfs3/ntfs3.ko\n`);
    const r = buildInitramfs({ modulesDir: dir, initBinary: initBinary(), compress: 'none' });
    expect(r.manifest.builtin).toContain('ntfs3');
    expect(r.tools).toEqual(defaults);
    expect(r.manifest.tools.ntfs3g).toBe('/usr/bin/ntfs-3g');
    expect(r.notes.join('\n')).toMatch(/ntfs-3g included: sparse NTFS image files are filled and written through ntfs-3g: the kernel's ntfs3 loses data written into their holes/);
  });

  it.skipIf(!hasCryptsetup)('cryptsetup is included by default, packed with its libraries in a squashfs image, with the modules that unlock LUKS and mount it (loaded on demand); --without cryptsetup leaves them out', async () => {
    const out = path.join(tmpdir(), 'initrd.img');
    const io = captureIO();
    expect(await main(['mkinitramfs', '--kernel', vmlinuz61!, '--init', initBinary(), '--compress', 'none', '-o', out], io)).toBe(0);
    const { names, manifest, packed } = unpack(out);
    expect(manifest.tools.cryptsetup).toBe('/usr/sbin/cryptsetup');
    // the program's path holds the wrapper; the program itself is in the image
    expect(names).toContain('usr/sbin/cryptsetup');
    expect(names).toContain('usr/lib/vdboot/cryptsetup.sqfs');
    expect(packed.cryptsetup).toContain('usr/sbin/cryptsetup');
    // every library ldd names is in the image or, shared with ntfs-3g, in the main archive;
    // the program interpreter is in the main archive (it runs the wrapped program)
    const libs = [...execFileSync('ldd', ['/usr/sbin/cryptsetup'], { encoding: 'utf8' }).matchAll(/=>\s+(\/\S+)/g)].map((m) => m[1]!.slice(1));
    for (const lib of libs) expect(names.includes(lib) || packed.cryptsetup!.includes(lib), lib).toBe(true);
    expect(packed.cryptsetup).toContain('lib/x86_64-linux-gnu/libcryptsetup.so.12');
    expect(names).not.toContain('lib/x86_64-linux-gnu/libcryptsetup.so.12');
    expect(names).toContain('lib64/ld-linux-x86-64.so.2');
    for (const m of ['dm_crypt', 'af_alg', 'algif_skcipher', 'xts', 'squashfs']) {
      expect(Object.keys(manifest.modules), m).toContain(m);
      expect(manifest.preload).not.toContain(m);
    }
    expect(io.err).toMatch(/note: cryptsetup included: LUKS volumes are unlocked with it, .*; --without cryptsetup leaves it out/);
    // its modules are kept from busybox's modprobe (the kernel runs it for crypto algorithms
    // before /init): not in the modules.alias text, still in the manifest for the init
    const { main: archive } = imageArchives(fs.readFileSync(out));
    const aliasText = new TextDecoder().decode(readCpio(new Uint8Array(archive)).find((e) => e.name.endsWith('/modules.alias'))!.data);
    for (const m of ['xts', 'essiv', 'af_alg', 'aesni_intel']) {
      expect(manifest.aliases.some(([, ms]) => ms.includes(m)), m).toBe(true);
      expect(aliasText, m).not.toMatch(new RegExp(` ${m}$`, 'm'));
    }
    expect(aliasText).toMatch(/^alias fs-ext4 ext4$/m);
    // so the kernel's own requests for them ("crypto-ecb(aes)", which xts asks for) would find
    // nothing: the wrapper loads every crypto module kept out of the text, in order (ecb before xts)
    const wrapper = new TextDecoder().decode(readCpio(new Uint8Array(archive)).find((e) => e.name === 'usr/sbin/cryptsetup')!.data);
    const loads = /for x in (.*?); do/.exec(wrapper)![1]!.split(' ').map((x) => x.split(':')[0]!);
    const keptOut = [...new Set(manifest.aliases.filter(([a]) => a.startsWith('crypto-')).flatMap(([, ms]) => ms))].filter((m) => !new RegExp(` ${m}$`, 'm').test(aliasText));
    expect(keptOut).toContain('ecb');
    for (const m of keptOut) expect(loads, m).toContain(m);
    expect(loads.indexOf('ecb')).toBeLessThan(loads.indexOf('xts'));
    const without = path.join(tmpdir(), 'without.img');
    expect(await main(['mkinitramfs', '--kernel', vmlinuz61!, '--init', initBinary(), '--compress', 'none', '--without', 'cryptsetup', '-o', without], captureIO())).toBe(0);
    const w = unpack(without);
    expect(w.manifest.tools.cryptsetup).toBeUndefined();
    expect(w.names).not.toContain('usr/sbin/cryptsetup');
    expect(w.names).not.toContain('usr/lib/vdboot/cryptsetup.sqfs');
    expect(Object.keys(w.manifest.modules)).not.toContain('dm_crypt');
    console.log(`cryptsetup adds ${((fs.statSync(out).size - fs.statSync(without).size) / 1048576).toFixed(2)} MiB unpacked`);
  });

  it.skipIf(!hasCryptsetup)('a kernel without squashfs gets cryptsetup unpacked, with a note saying why', () => {
    // a modules directory with ext4 alone (as depmod lays it out): no loop, no squashfs
    const dir = path.join(tmpdir(), '9.9.9-nosquashfs');
    fs.mkdirSync(path.join(dir, 'kernel/fs'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'kernel/fs/ext4.ko'), '\x7fELF ext4\n');
    fs.writeFileSync(path.join(dir, 'modules.dep'), 'kernel/fs/ext4.ko:\n');
    fs.writeFileSync(path.join(dir, 'modules.alias'), 'alias fs-ext4 ext4\n');
    const r = buildInitramfs({ modulesDir: dir, initBinary: initBinary(), compress: 'none', without: ['ntfs-3g'] });
    expect(r.tools).toEqual(['cryptsetup']);
    expect(r.notes.join('\n')).toMatch(/cryptsetup goes in unpacked \(the kernel unpacks it at every boot\): kernel 9\.9\.9-nosquashfs has no loop and squashfs to mount its squashfs image/);
    expect(r.modulesCpio.length).toBe(0);
    const program = readCpio(r.cpio).find((e) => e.name === 'usr/sbin/cryptsetup')!;
    expect(Buffer.from(program.data).equals(fs.readFileSync('/usr/sbin/cryptsetup'))).toBe(true);
  });
});
