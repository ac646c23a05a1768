/** vdiskload's pure parts: the command line, the mount that holds a file, refusals, listing. */
import { describe, expect, it } from 'vitest';
import { formatList, imageRecord, listEntries, parseRecord, type AttachedImage } from '../../src/boot/attached.ts';
import { mountOf, parseMountinfo } from '../../src/boot/host-mount.ts';
import { conflictWith, runVdiskload } from '../../src/boot/vdiskload.ts';
import { parseVdiskloadArgs, UsageError } from '../../src/boot/vdiskload-args.ts';
import type { VdiskPlan } from '../../src/boot/vdisk.ts';
import type { Sys } from '../../src/sys/sys.ts';

function usage(args: string[]): string {
  try {
    parseVdiskloadArgs(args);
  } catch (e) {
    expect(e).toBeInstanceOf(UsageError);
    return (e as Error).message;
  }
  throw new Error(`${args.join(' ')}: parsed`);
}

describe('vdiskload command line', () => {
  it('attach: rw by default, --ro, --snapshot, --name, --map (with = or a separate value)', () => {
    expect(parseVdiskloadArgs(['a.vhdx'])).toEqual({ action: 'attach', image: 'a.vhdx', mode: 'rw', map: 'auto' });
    expect(parseVdiskloadArgs(['--ro', '--name', 'data', '--map=loop', '/x/a b.vhdx'])).toEqual({ action: 'attach', image: '/x/a b.vhdx', mode: 'ro', map: 'loop', name: 'data' });
    expect(parseVdiskloadArgs(['--snapshot', '--map', 'nbd', 'DEF.vdisk.json'])).toMatchObject({ mode: 'snapshot', map: 'nbd', image: 'DEF.vdisk.json' });
    expect(parseVdiskloadArgs(['--', '-odd-name.img'])).toMatchObject({ image: '-odd-name.img' });
  });

  it('-d NAME|IMAGE and -l [--json]; help', () => {
    expect(parseVdiskloadArgs(['-d', 'vdisk1'])).toEqual({ action: 'detach', target: 'vdisk1' });
    expect(parseVdiskloadArgs(['-l'])).toEqual({ action: 'list', json: false });
    expect(parseVdiskloadArgs(['-l', '--json'])).toEqual({ action: 'list', json: true });
    expect(parseVdiskloadArgs(['--help'])).toEqual({ action: 'help' });
  });

  it('refuses what it cannot do, saying what is wrong', () => {
    expect(usage([])).toBe('no image given');
    expect(usage(['a', 'b'])).toMatch(/one image at a time \(got 2: a b\)/);
    expect(usage(['--ro', '--snapshot', 'a'])).toMatch(/only one of --ro and --snapshot/);
    expect(usage(['--map', 'fast', 'a'])).toMatch(/--map fast: choose auto, direct, loop or nbd/);
    expect(usage(['--name'])).toBe('--name needs a value');
    expect(usage(['--name', 'a/b', 'x'])).toMatch(/a name is 1 to 64 letters/);
    expect(usage(['--name', 'control', 'x'])).toMatch(/reserved/);
    expect(usage(['--name', 'disk-part1', 'x'])).toMatch(/-base or -partN/);
    expect(usage(['-d'])).toMatch(/-d takes one NAME or IMAGE/);
    expect(usage(['-d', 'x', '--ro'])).toMatch(/-d takes one NAME or IMAGE and no other option/);
    expect(usage(['-l', 'x'])).toMatch(/-l takes no image/);
    expect(usage(['--json', 'x'])).toMatch(/--json goes with -l/);
    expect(usage(['--frobnicate', 'x'])).toBe('unknown option --frobnicate');
  });

  it('a usage error prints the usage and exits 2 before touching the system', () => {
    let err = '';
    const untouchable = new Proxy({}, { get: (_, k) => { throw new Error(`sys.${String(k)} called`); } }) as Sys;
    expect(runVdiskload(untouchable, ['--map', 'fast', 'a'], { out: () => {}, err: (t) => { err += t; } })).toBe(2);
    expect(err).toMatch(/^vdiskload: --map fast: choose auto, direct, loop or nbd\nusage: vdiskload /);
  });
});

describe('the mount holding a file (/proc/self/mountinfo)', () => {
  const text = [
    '22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw',
    '30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw',
    '41 30 253:0 / /run/vdboot/host rw,relatime shared:20 - fuseblk /dev/mapper/vdhost rw,user_id=0',
    '50 22 8:17 / /mnt/my\\040disk ro,relatime shared:30 - ext4 /dev/sdb1 ro',
    '51 22 8:17 /sub /srv/bind rw,relatime shared:30 - ext4 /dev/sdb1 rw',
    'garbage line',
  ].join('\n');
  const mounts = parseMountinfo(text);

  it('parses mount points (\\040 for spaces), read-only flags, types and sources; skips lines it cannot read', () => {
    expect(mounts).toHaveLength(5);
    expect(mounts[3]).toEqual({ dev: '8:17', root: '/', dir: '/mnt/my disk', readOnly: true, fsType: 'ext4', source: '/dev/sdb1' });
    expect(mounts[2]).toMatchObject({ dir: '/run/vdboot/host', readOnly: false, fsType: 'fuseblk', source: '/dev/mapper/vdhost' });
  });

  it('picks the longest mount point above the file on the file\'s own filesystem', () => {
    expect(mountOf(mounts, '/run/vdboot/host/VMs/a.vhdx', '253:0')?.dir).toBe('/run/vdboot/host');
    expect(mountOf(mounts, '/mnt/my disk/a.vhdx', '8:17')?.dir).toBe('/mnt/my disk');
    expect(mountOf(mounts, '/srv/bind/a.vhdx', '8:17')).toMatchObject({ dir: '/srv/bind', root: '/sub' });
    // a directory named like a mount point's prefix is not inside it
    expect(mountOf(mounts, '/run/vdboot/hostile/a', '0:25')?.dir).toBe('/run');
    expect(mountOf(mounts, '/home/a.vhdx', '254:2')?.dir).toBe('/');
    expect(mountOf(mounts, '/home/a.vhdx', '9:9')).toBeUndefined();
  });
});

function plan(over: Partial<VdiskPlan> = {}): VdiskPlan {
  return {
    name: 'vdisk0', imagePath: '/VMs/linux.vhdx', host: '/dev/sda2 (ntfs, LABEL=Windows)', hostDevice: '/dev/sda2',
    chain: [{ path: '/VMs/linux.vhdx', format: 'vhdx', subformat: 'dynamic', size: 1 << 30 }], size: 1 << 30, mode: 'rw', path: 'direct', why: 'direct: …',
    map: { size: 1 << 30, files: [], extents: [] }, summary: {} as VdiskPlan['summary'], partitionTable: 'gpt',
    partitions: [{ number: 1, name: 'vdisk0p1', start: 1 << 20, size: 100 << 20, fsType: 'ext4', label: 'root' }],
    devices: [{ name: 'vdisk0', uuid: 'VDBOOT-vdisk0', readOnly: false, targets: [] }, { name: 'vdisk0p1', uuid: 'VDBOOT-vdisk0-part1', readOnly: false, targets: [] }],
    loops: [], hostMountWritable: false, writeIds: { found: [''], after: [''] }, warnings: [],
    ...over,
  };
}

describe('records, refusals and the list', () => {
  const boot = imageRecord(plan(), 'boot');
  const mine: AttachedImage = imageRecord(plan({ name: 'data', imagePath: '/data.vhdx', mode: 'ro', path: 'loop', host: '/dev/vdb1 (ext4, mounted at /srv)', devices: [{ name: 'data', uuid: 'VDBOOT-data', readOnly: true, targets: [] }], partitions: [] }), 'vdiskload', { image: '/srv/data.vhdx', loops: ['/dev/loop3'], fileId: '254:17:12' });

  it('a record survives its JSON, and anything else is not one', () => {
    expect(parseRecord(JSON.stringify(mine))).toEqual(mine);
    expect(mine).toMatchObject({ format: 'vhdx dynamic', loops: ['/dev/loop3'], by: 'vdiskload', fileId: '254:17:12' });
    expect(parseRecord('{"name":"x"}')).toBeUndefined();
    expect(parseRecord('not json')).toBeUndefined();
  });

  it('the image this system booted from is not attached again when either side writes', () => {
    const loc = { path: '/run/vdboot/host/vms/LINUX.vhdx', fileId: '253:0:99', inMount: '/vms/LINUX.vhdx', mountDir: '/run/vdboot/host' };
    expect(conflictWith([boot], loc, 'ro')).toMatch(/is the image this system booted from as \/dev\/mapper\/vdisk0 \(rw\); it is not attached twice/);
    expect(conflictWith([boot], { ...loc, mountDir: '/mnt' }, 'ro')).toBeUndefined();
  });

  it('an image vdiskload attached read-only may be attached read-only again, never read-write', () => {
    const same = { path: '/srv/data.vhdx', fileId: '254:17:12', inMount: '/data.vhdx', mountDir: '/srv' };
    expect(conflictWith([mine], same, 'ro')).toBeUndefined();
    expect(conflictWith([mine], same, 'rw')).toMatch(/attached as \/dev\/mapper\/data \(ro\).*vdiskload -d data/);
    // the same file through another name (a link, a bind mount): the same inode
    expect(conflictWith([mine], { ...same, path: '/other/name.vhdx' }, 'rw')).toMatch(/not attached twice/);
    expect(conflictWith([mine], { ...same, path: '/other.vhdx', fileId: '254:17:13' }, 'rw')).toBeUndefined();
  });

  it('-l: records first, then vdboot devices no record describes, grouped by their uuid', () => {
    const entries = listEntries([boot, mine], [
      { name: 'vdisk0', uuid: 'VDBOOT-vdisk0', size: 1 << 30, readOnly: false },
      { name: 'vdhost', uuid: 'VDBOOT-vdhost', size: 1 << 34, readOnly: true },
      { name: 'old', uuid: 'VDBOOT-old', size: 8 << 20, readOnly: true },
      { name: 'oldp1', uuid: 'VDBOOT-old-part1', size: 7 << 20, readOnly: true },
    ]);
    expect(entries.map((e) => [e.name, e.image, e.mode, e.path, e.by, e.partitions.join(',')])).toEqual([
      ['vdisk0', '/VMs/linux.vhdx', 'rw', 'direct', 'boot', 'vdisk0p1'],
      ['data', '/srv/data.vhdx', 'ro', 'loop', 'vdiskload', ''],
      ['old', '?', 'ro', '?', 'vdboot (no record)', 'oldp1'],
    ]);
    const text = formatList(entries).split('\n');
    expect(text[0]).toMatch(/^NAME +IMAGE +FORMAT +SIZE +MODE +PATH +HOST +BY +PARTITIONS$/);
    expect(text[1]).toMatch(/^vdisk0 +\/VMs\/linux\.vhdx +vhdx dynamic +1\.0 GiB +rw +direct +\/dev\/sda2 \(ntfs, LABEL=Windows\) +boot +vdisk0p1$/);
    expect(text[2]).toMatch(/^data +\/srv\/data\.vhdx .* ro +loop .* vdiskload +-$/);
  });
});
