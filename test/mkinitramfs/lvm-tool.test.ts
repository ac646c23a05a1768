/**
 * `vdboot mkinitramfs --with lvm`: LVM's program, thin-provisioning-tools' pdata_tools (as
 * thin_check and cache_check) and the libraries the main archive lacks go into a squashfs
 * image in the uncompressed segment; the programs' paths hold wrappers that mount it and run
 * them from it. The oracles are the archive read back by GNU cpio, the image listed by
 * unsquashfs, and ldd.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildInitramfs } from '../../mkinitramfs/build.ts';
import { lvmProgramConfig } from '../../src/boot/lvm-program.ts';
import { initBinary, tmpdir } from './helpers.ts';

const vmlinuz61 = fs.readdirSync('/boot').filter((n) => /^vmlinuz-6\.1\./.test(n)).sort().map((n) => `/boot/${n}`).at(-1);
const can = vmlinuz61 !== undefined && ['/usr/sbin/lvm', '/usr/sbin/pdata_tools', '/usr/bin/mksquashfs', '/usr/bin/unsquashfs'].every((p) => fs.existsSync(p));

describe.skipIf(!can)('mkinitramfs --with lvm', () => {
  it('lvm and thin_check in a squashfs image beside the modules, wrappers at their paths, its modules on demand', () => {
    const r = buildInitramfs({ kernel: vmlinuz61!, initBinary: initBinary(), compress: 'none', tools: ['lvm'] });
    expect(r.manifest.tools.lvm).toBe('/usr/sbin/lvm');
    const dir = tmpdir();
    const segment = path.join(dir, 'segment.cpio');
    fs.writeFileSync(segment, r.image.subarray(r.modulesOffset));
    execFileSync('cpio', ['-id', '--quiet'], { cwd: dir, input: fs.readFileSync(segment) });
    const image = path.join(dir, 'usr/lib/vdboot/lvm.sqfs');
    const listing = execFileSync('unsquashfs', ['-lls', '-d', '', image], { encoding: 'utf8' });
    expect(listing).toMatch(/ \/usr\/sbin\/lvm$/m);
    expect(listing).toMatch(/ \/usr\/sbin\/pdata_tools$/m);
    expect(listing).toMatch(/ \/usr\/sbin\/thin_check -> pdata_tools$/m);
    expect(listing).toMatch(/ \/usr\/sbin\/cache_check -> pdata_tools$/m);
    // every library lvm and pdata_tools need is in the image or in the main archive, never in both
    const main = execFileSync('cpio', ['-it', '--quiet'], { input: Buffer.from(r.cpio), encoding: 'utf8', maxBuffer: 1 << 26 }).split('\n');
    for (const program of ['/usr/sbin/lvm', '/usr/sbin/pdata_tools']) {
      for (const lib of [...execFileSync('ldd', [program], { encoding: 'utf8' }).matchAll(/=>\s+(\/\S+)/g)].map((m) => m[1]!)) {
        const inImage = listing.includes(` ${lib}\n`);
        const inMain = main.includes(lib.slice(1));
        expect(inImage !== inMain, `${lib}: image ${inImage}, main ${inMain}`).toBe(true);
      }
    }
    const wrapper = new TextDecoder().decode(execFileSync('cpio', ['-i', '--quiet', '--to-stdout', 'usr/sbin/thin_check'], { input: Buffer.from(r.cpio) }));
    expect(wrapper).toMatch(/^#!\/bin\/sh\n/);
    expect(wrapper).toContain('mount -t squashfs -o ro,loop /usr/lib/vdboot/lvm.sqfs "$d"');
    expect(wrapper).toContain('exec "$d/usr/sbin/thin_check" "$@"');
    // busybox's modprobe hands a .ko.xz to the kernel without MODULE_INIT_COMPRESSED_FILE (refused): the wrapper falls back to xzcat + insmod
    expect(wrapper).toMatch(/modprobe -q \$1 2>\/dev\/null && return; case \$2 in \*\.ko\.xz\) xzcat \$2 > \/tmp\/\$1\.ko && insmod \/tmp\/\$1\.ko/);
    // the modules it needs by name and path as stored, dependencies first: loop and squashfs, then the tool's
    const list = /for x in (.*); do m/.exec(wrapper)![1]!.split(' ').map((x) => x.split(':'));
    expect(list.slice(0, 2).map(([n]) => n)).toEqual(['loop', 'squashfs']);
    for (const [n, p] of list) expect(r.manifest.modules[n!]!.path, n).toBe(p);
    for (const n of ['dm_thin_pool', 'dm_cache']) expect(list.map(([x]) => x)).toContain(n);
    expect(list.findIndex(([x]) => x === 'dm_persistent_data')).toBeLessThan(list.findIndex(([x]) => x === 'dm_thin_pool'));
    for (const m of ['dm_thin_pool', 'dm_cache', 'dm_raid', 'squashfs', 'loop']) expect(Object.keys(r.manifest.modules)).toContain(m);
    expect(r.manifest.preload).not.toContain('dm_thin_pool');
  }, 120_000);
});

describe('lvm lvchange configuration', () => {
  it('sees only the given PV devices, as anchored literal paths; no udev, hints or backups', () => {
    const c = lvmProgramConfig(['/dev/vda2', '/dev/mapper/luks-1.2']);
    expect(c).toContain('filter = [ "a|^/dev/vda2$|", "a|^/dev/mapper/luks-1\\.2$|", "r|.*|" ]');
    expect(c).toContain('global_filter = [ "a|^/dev/vda2$|"');
    expect(c).toMatch(/udev_sync = 0 udev_rules = 0 monitoring = 0/);
    expect(c).toMatch(/hints = "none"/);
    expect(c).toMatch(/backup = 0 archive = 0/);
    // lvm itself parses it: `lvm dumpconfig` with the string accepted as a config cascade
    if (fs.existsSync('/usr/sbin/lvm')) {
      const out = execFileSync('lvm', ['dumpconfig', '--config', c, 'devices/filter'], { encoding: 'utf8', env: { ...process.env, LVM_SUPPRESS_FD_WARNINGS: '1' } });
      expect(out).toContain('"a|^/dev/vda2$|"');
    }
  });
});
