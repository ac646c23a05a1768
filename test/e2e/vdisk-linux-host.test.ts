/**
 * End to end under QEMU: root=vdisk: from a host vdboot does not read itself, and from a
 * JSON disk definition.
 *
 * 1. An ext4 host partition (mke2fs -d, then e2cp / debugfs so the image files have every
 *    block allocated, and in fragments): the kernel mounts it read-only at
 *    /run/vdboot/host through vdhost, FIEMAP places the raw root image (blockmapped, in
 *    fragments) and an attached fixed VHD (extent-mapped) on the partition, both take the
 *    direct path, the guest writes to both, and afterwards `e2fsck -fn` passes on the host
 *    partition and both writes are inside the image files.
 * 2. An xfs host (mkfs.xfs -p): the same, direct, rw, xfs_repair -n clean afterwards; and an
 *    ext4 host whose image file is sparse (mke2fs -d): rw fills its holes through ext4 first and maps
 *    it directly; with rd.vdisk.expand=0 it goes through the loop path.
 * 3. A btrfs host in snapshot mode: FIEMAP's btrfs addresses go through the chunk tree
 *    onto the partition (single data chunks), the guest boots from them, and the image is
 *    unchanged afterwards (`btrfs check`, `btrfs restore`).
 * 4. A `*.vdisk.json` on NTFS assembling a raw vfat ESP image and a fixed VHDX root into
 *    one GPT disk: the root partition is found by its GPT type, the guest writes, and the
 *    write is inside the VHDX afterwards.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsRead, type FileTree } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { BASIC_DATA, expectNtfsClean, extractRange } from '../kit/host-disk.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { pseudoRandom } from '../vdisk/helpers.ts';

const LINUX_FS = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const NOTE = 'written by the guest on a vdisk root';
const MARK = 'VDBOOT-ATTACHED-WRITE';
const MARK_AT = 1024 * 1024;
const MiB = 1024 * 1024;

let dir: string;
let initrd: string;
let guestRaw: string;
let guestFs: string;
const vms: Vm[] = [];

function run(cmd: string, args: string[], opts: { input?: string } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...(opts.input !== undefined ? { input: opts.input } : {}) });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}):\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-linuxhost-'));
  initrd = join(dir, 'initrd.img');
  // without ntfs-3g (included by default on kernels without ntfs3): NTFS hosts through vdboot's direct path alone
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  ({ raw: guestRaw, fs: guestFs } = makeGuestDisk(dir, {
    writeFile: { path: '/home/note.txt', content: NOTE },
    commands: [
      // an attached image (the ext4 boot): a marker written straight onto its device
      `if [ -b /dev/mapper/vdisk1 ]; then printf '%s' '${MARK}' | dd of=/dev/mapper/vdisk1 bs=512 seek=${MARK_AT / 512} conv=notrunc 2>/dev/null && sync && ${guestFact('attached', 'written')}; fi`,
      guestFact('host', "$(ls /run/vdboot/host 2>/dev/null | tr '\\n' ,)"),
      guestFact('mapper', "$(ls /dev/mapper | tr '\\n' ,)"),
      // the volume label of a FAT12/16 boot sector (the JSON boot's ESP image)
      guestFact('esp', '$(dd if=/dev/mapper/vdisk0p1 bs=1 skip=43 count=11 2>/dev/null)'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }));
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

async function boot(disk: string, append: string, name: string) {
  const vm = await bootVm({ initrd, append, disks: [{ file: disk, interface: 'virtio-blk' }], name });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 300_000);
  const facts = parseGuestFacts(vm.transcript());
  await vm.waitExit(120_000);
  return { facts, transcript: vm.transcript() };
}

function expectHandOff(t: string): void {
  expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
  expect(t).toMatch(/removed \/dev\/mapper\/vdisk0\r?\n/);
  expect(t).toMatch(/reboot: Power down/);
}

/** A file of an ext2/3/4 image, read with debugfs. */
function ext4Dump(fsImage: string, path: string, name: string): string {
  const out = join(dir, name);
  run('debugfs', ['-R', `dump ${path} ${out}`, fsImage]);
  return out;
}

/**
 * The runs of a file on an ext2/3/4 image, from debugfs's "stat" (BLOCKS or EXTENTS lines:
 * "(0-11):1234-1245, (IND):1246, …"), merged where contiguous on both sides: what a
 * direct mapping of the file needs one device-mapper target for each.
 */
function ext4Runs(fsImage: string, path: string): number {
  const stat = run('debugfs', ['-R', `stat ${path}`, fsImage]);
  const list = /(?:BLOCKS|EXTENTS):\n([\s\S]*?)(?:\n\n|TOTAL|$)/.exec(stat)?.[1] ?? '';
  const runs: { l: number; p: number; n: number }[] = [];
  for (const m of list.matchAll(/\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?/g)) {
    const l = Number(m[1]);
    const n = (m[2] ? Number(m[2]) : l) - l + 1;
    const p = Number(m[3]);
    const last = runs[runs.length - 1];
    if (last && last.l + last.n === l && last.p + last.n === p) last.n += n;
    else runs.push({ l, p, n });
  }
  return runs.length;
}

describe('end to end: root=vdisk: on an ext4 host (kernel-mounted, FIEMAP)', { timeout: 600_000 }, () => {
  it('a fragmented raw root and an attached fixed VHD take the direct path; both writes land in the files; e2fsck -fn passes on the host', async () => {
    // the host's files: 200 fill files of 64 KiB, every other one removed again, so the
    // images written next land in the gaps
    const hostTree = join(dir, 'hosttree');
    mkdirSync(join(hostTree, 'fill'), { recursive: true });
    mkdirSync(join(hostTree, 'VMs'));
    for (let i = 0; i < 200; i++) writeFileSync(join(hostTree, 'fill', `f${String(i).padStart(3, '0')}`), pseudoRandom(64 * 1024, i + 1));
    writeFileSync(join(hostTree, 'readme.txt'), 'on the ext4 host\n');
    const hostPart = join(dir, 'host.ext4');
    writeFileSync(hostPart, '');
    execFileSync('truncate', ['-s', `${96 * MiB}`, hostPart]);
    run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'linuxhost', '-d', hostTree, hostPart]);
    run('debugfs', ['-w', '-f', '-', hostPart], { input: Array.from({ length: 100 }, (_, i) => `rm /fill/f${String(2 * i).padStart(3, '0')}`).join('\n') + '\n' });
    // e2cp writes every block (mke2fs -d and debugfs leave zero blocks out: a sparse file,
    // whose holes a direct mapping must not write)
    run('e2cp', [guestRaw, `${hostPart}:/VMs/linux.img`]);
    // a fixed VHD of non-zero data: debugfs writes it whole, extent-mapped
    const dataRaw = join(dir, 'data.raw');
    writeFileSync(dataRaw, pseudoRandom(8 * MiB, 99));
    const dataVhd = join(dir, 'data.vhd');
    convertImage(dataRaw, dataVhd, 'vpc', ['subformat=fixed', 'force_size=on']);
    run('debugfs', ['-w', '-R', `write ${dataVhd} /VMs/data.vhd`, hostPart]);
    run('e2fsck', ['-fn', hostPart]);
    const runs = ext4Runs(hostPart, '/VMs/linux.img');
    expect(runs).toBeGreaterThan(10);

    const disk = join(dir, 'ext4-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });
    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=linuxhost:/VMs/linux.img rd.vdisk.attach=LABEL=linuxhost:/VMs/data.vhd rw', 'vdisk-ext4-host');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(facts.facts.attached).toBe('written');
    expect(facts.facts.host).toMatch(/VMs,/);
    expect(facts.facts.host).toMatch(/readme\.txt/);
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(ext4, ro\) on \/run\/vdboot\/host/);
    // one linear target per run of the file on the partition, as debugfs lists them
    const direct = new RegExp(`vdisk0: /VMs/linux\\.img on /dev/vda1 \\(ext4, LABEL="linuxhost"\\): raw, direct: the image is fully mappable: (\\d+) extents on /dev/vda1 \\(from ext4's FIEMAP\\)`);
    expect(transcript).toMatch(direct);
    expect(Number(direct.exec(transcript)![1])).toBe(runs);
    expect(transcript).toMatch(/vdisk1: \/VMs\/data\.vhd on \/dev\/vda1 .*: vhd fixed, direct: the image is fully mappable: \d+ extents? on \/dev\/vda1 \(from ext4's FIEMAP\)/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/unmounted \/host/);

    const after = extractRange(disk, part!.offset, part!.size, join(dir, 'host-after.ext4'));
    const fsck = spawnSync('e2fsck', ['-fn', after], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    // the guest's file, inside the root image inside the host
    const img = ext4Dump(after, '/VMs/linux.img', 'linux-after.img');
    const rootPart = extractRange(img, 3 * MiB, 24 * MiB, join(dir, 'root-after.ext4'));
    expect(run('debugfs', ['-R', 'cat /home/note.txt', rootPart])).toBe(NOTE);
    // the marker, inside the attached VHD, and nothing else of it changed
    const vhd = ext4Dump(after, '/VMs/data.vhd', 'data-after.vhd');
    const raw = join(dir, 'data-after.raw');
    execFileSync('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', vhd, raw]);
    const got = readFileSync(raw);
    const want = readFileSync(dataRaw);
    expect(got.subarray(MARK_AT, MARK_AT + MARK.length).toString('latin1')).toBe(MARK);
    expect(Buffer.compare(got.subarray(0, MARK_AT), want.subarray(0, MARK_AT))).toBe(0);
    expect(Buffer.compare(got.subarray(MARK_AT + 512), want.subarray(MARK_AT + 512))).toBe(0);
  });
});

describe('end to end: root=vdisk: on an ext4 host, a sparse image file', { timeout: 600_000 }, () => {
  /** An ext4 host whose image file is sparse: mke2fs -d leaves the image's zero blocks out. */
  function sparseHost(name: string): { disk: string; part: { offset: number; size: number } } {
    const hostPart = join(dir, `${name}.ext4`);
    makeExt4(hostPart, { sizeMiB: 64, label: 'sparsehost', files: { '/VMs/linux.img': { hostFile: guestRaw } } });
    const disk = join(dir, `${name}.img`);
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });
    return { disk, part: part! };
  }

  /** After the boot: the host's ext4 clean (e2fsck -fn), the guest's file in the image. */
  function expectKept(name: string, disk: string, part: { offset: number; size: number }): void {
    const after = extractRange(disk, part.offset, part.size, join(dir, `${name}-after.ext4`));
    const fsck = spawnSync('e2fsck', ['-fn', after], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const img = ext4Dump(after, '/VMs/linux.img', `${name}-linux-after.img`);
    expect(run('debugfs', ['-R', 'cat /home/note.txt', extractRange(img, 3 * MiB, 24 * MiB, join(dir, `${name}-root-after.ext4`))])).toBe(NOTE);
  }

  it('rw: the file\'s holes are filled through ext4 (remounted read-write for it), checked on the partition, then the image is mapped directly; e2fsck -fn passes afterwards', async () => {
    const { disk, part } = sparseHost('sparse-host');
    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=sparsehost:/VMs/linux.img rw', 'vdisk-ext4-sparse');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).toMatch(/filling \/VMs\/linux\.img's holes in place: .* rewritten through the kernel's ext4 driver/);
    expect(transcript).toMatch(/checked \d+ filled units? on \/dev\/vda1: each holds what was written through the driver/);
    expect(transcript).toMatch(/vdisk0: .*raw, direct: the image is fully mappable/);
    expectHandOff(transcript);
    expectKept('sparse', disk, part);
  });

  it('rw with rd.vdisk.expand=0: holes in the host file send auto to the loop path, the host is mounted read-write for it, and e2fsck -fn passes afterwards', async () => {
    const { disk, part } = sparseHost('sparse-loop-host');
    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=sparsehost:/VMs/linux.img rw rd.vdisk.expand=0', 'vdisk-ext4-sparse-loop');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).not.toMatch(/filling/);
    expect(transcript).toMatch(/vdisk0: .*loop: the direct path is not safe here \(.* in holes, where a write through the raw partition would stay invisible/);
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(ext4, ro\) on \/run\/vdboot\/host/);
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(ext4, rw\) on \/run\/vdboot\/host/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/detached \/dev\/loop0/);
    expect(transcript).toMatch(/unmounted \/host/);
    expectKept('sparse-loop', disk, part);
  });
});

describe('end to end: root=vdisk: on an ext4 host, failures', { timeout: 600_000 }, () => {
  it('an unclean host in snapshot mode is refused before its journal is replayed: the host stays byte-identical', async () => {
    const hostPart = join(dir, 'unclean-snap.ext4');
    makeExt4(hostPart, { sizeMiB: 32, label: 'uncleansnap', files: { '/VMs/notes.txt': 'hello\n' } });
    run('debugfs', ['-w', '-R', 'feature needs_recovery', hostPart]);
    const disk = join(dir, 'unclean-snap.img');
    makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });
    const before = readFileSync(disk);
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=uncleansnap:/VMs/linux.img rd.vdisk.mode=snapshot', disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdisk-ext4-unclean-snapshot' });
    vms.push(vm);
    try {
      await vm.waitFor('starting the rescue shell', 300_000);
      const t = vm.transcript();
      expect(t).toMatch(/it was probably not cleanly unmounted, and mounting it would replay its journal, which writes to the partition\. This boot's rd\.vdisk\.mode=snapshot writes nothing to the host/);
      expect(t).not.toMatch(/journal recovery/);
    } finally {
      await vm.kill();
    }
    expect(readFileSync(disk).equals(before)).toBe(true);
  });

  it('an unclean host is mounted with journal recovery after a warning; a missing image names the folder\'s contents, the host is taken down, then the rescue shell', async () => {
    const hostPart = join(dir, 'unclean-host.ext4');
    makeExt4(hostPart, { sizeMiB: 32, label: 'uncleanhost', files: { '/VMs/other.img': 'not the image\n', '/VMs/notes.txt': 'hello\n' } });
    // as if the host had not been unmounted cleanly: its journal must be replayed before it can be mounted
    run('debugfs', ['-w', '-R', 'feature needs_recovery', hostPart]);
    const disk = join(dir, 'unclean-host.img');
    makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=uncleanhost:/VMs/linux.img rw', disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdisk-ext4-failures' });
    vms.push(vm);
    try {
      await vm.waitFor('starting the rescue shell', 300_000);
      const t = vm.transcript();
      expect(t).toMatch(/does not mount on a read-only view of the partition \(ext4: EROFS\); it was probably not cleanly unmounted\. Mounting it read-only with the kernel's journal recovery/);
      expect(t).toMatch(/mounted \/dev\/mapper\/vdhost \(ext4, ro\) on \/run\/vdboot\/host/);
      expect(t).toMatch(/\/VMs\/linux\.img not found: \/VMs has no "linux\.img"; it holds "notes\.txt", "other\.img"/);
      expect(t).not.toMatch(/while undoing/);
      expect(t).not.toMatch(/created \/dev\/mapper\/vdisk0/);
    } finally {
      await vm.kill();
    }
  });
});

describe('end to end: root=vdisk: on an xfs host', { timeout: 600_000 }, () => {
  it('rw: the raw image takes the direct path through xfs\'s FIEMAP; the write is in the file; xfs_repair -n passes', async () => {
    // mkfs.xfs -p (a protofile) populates the filesystem rootless, with every block of the file written
    const hostPart = join(dir, 'host.xfs');
    writeFileSync(hostPart, '');
    execFileSync('truncate', ['-s', `${300 * MiB}`, hostPart]);
    const proto = join(dir, 'xfs.proto');
    writeFileSync(proto, ['/dev/null', '0 0', 'd--755 0 0', 'VMs d--755 0 0', `linux.img ---644 0 0 ${guestRaw}`, '$', '$', ''].join('\n'));
    run('mkfs.xfs', ['-q', '-L', 'xfshost', '-p', proto, hostPart]);
    const disk = join(dir, 'xfs-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });

    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=xfshost:/VMs/linux.img rw', 'vdisk-xfs-host');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(xfs, ro\) on \/run\/vdboot\/host/);
    expect(transcript).toMatch(/vdisk0: \/VMs\/linux\.img on \/dev\/vda1 \(xfs, LABEL="xfshost"\): raw, direct: the image is fully mappable: \d+ extents? on \/dev\/vda1 \(from xfs's FIEMAP\)/);
    expectHandOff(transcript);

    const after = extractRange(disk, part!.offset, part!.size, join(dir, 'host-after.xfs'));
    const repair = spawnSync('xfs_repair', ['-n', after], { encoding: 'utf8' });
    expect(repair.status, `${repair.stdout}${repair.stderr}`).toBe(0);
    // the file's bytes from xfs_db's block map (fsblock → byte on the partition)
    const bytes = readFileSync(after);
    const img = Buffer.alloc(readFileSync(guestRaw).length);
    const bmap = run('xfs_db', ['-r', '-c', 'path /VMs/linux.img', '-c', 'bmap', after]);
    const bs = Number(/blocksize = (\d+)/.exec(run('xfs_db', ['-r', '-c', 'sb 0', '-c', 'print blocksize', after]))![1]);
    let covered = 0;
    for (const m of bmap.matchAll(/data offset (\d+) startblock (\d+) \(\d+\/\d+\) count (\d+) flag (\d)/g)) {
      expect(m[4]).toBe('0');
      const at = Number(/\((\d+)\)/.exec(run('xfs_db', ['-r', '-c', `convert fsblock ${m[2]} byte`, after]))![1]);
      const n = Number(m[3]) * bs;
      bytes.copy(img, Number(m[1]) * bs, at, at + n);
      covered += n;
    }
    expect(covered).toBe(img.length);
    const imgFile = join(dir, 'xfs-linux-after.img');
    writeFileSync(imgFile, img);
    expect(run('debugfs', ['-R', 'cat /home/note.txt', extractRange(imgFile, 3 * MiB, 24 * MiB, join(dir, 'xfs-root-after.ext4'))])).toBe(NOTE);
  });
});

describe('end to end: root=vdisk: on a btrfs host (FIEMAP through the chunk tree)', { timeout: 600_000 }, () => {
  it('snapshot mode: the image\'s btrfs addresses are moved onto the partition through the chunk tree, the guest boots from them, and the image is unchanged', async () => {
    // mkfs.btrfs --rootdir: rootless; its data chunks sit elsewhere on the device than their logical addresses
    const tree = join(dir, 'btrfstree');
    mkdirSync(join(tree, 'VMs'), { recursive: true });
    writeFileSync(join(tree, 'VMs', 'linux.img'), readFileSync(guestRaw));
    const hostPart = join(dir, 'host.btrfs');
    writeFileSync(hostPart, '');
    execFileSync('truncate', ['-s', `${160 * MiB}`, hostPart]);
    run('mkfs.btrfs', ['-q', '-L', 'btrfshost', '-r', tree, hostPart]);
    const chunks = run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'chunk', hostPart]);
    // the test means something only when logical and physical addresses differ
    expect(chunks).toMatch(/CHUNK_ITEM (\d+)\)[\s\S]*?type DATA[\s\S]*?stripe 0 devid 1 offset (?!\1\b)\d+/);
    const disk = join(dir, 'btrfs-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostPart, type: LINUX_FS, name: 'linux data' }] });

    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=btrfshost:/VMs/linux.img rd.vdisk.mode=snapshot rw', 'vdisk-btrfs-host');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(btrfs, ro\) on \/run\/vdboot\/host/);
    expect(transcript).toMatch(/vdisk0: \/VMs\/linux\.img on \/dev\/vda1 \(btrfs, LABEL="btrfshost"\): raw, direct: the image is fully mappable: \d+ extents? on \/dev\/vda1 \(from btrfs's FIEMAP and chunk tree\)/);
    expectHandOff(transcript);

    const after = extractRange(disk, part!.offset, part!.size, join(dir, 'host-after.btrfs'));
    const check = spawnSync('btrfs', ['check', '--readonly', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    const out = join(dir, 'btrfs-restored');
    mkdirSync(out);
    run('btrfs', ['restore', after, out]);
    expect(Buffer.compare(readFileSync(join(out, 'VMs', 'linux.img')), readFileSync(guestRaw))).toBe(0);
  });
});

describe('end to end: root=vdisk: from a JSON disk definition on NTFS', { timeout: 600_000 }, () => {
  it('a raw vfat ESP image and a fixed VHDX root assembled by disk.vdisk.json boot rw; the write lands in the VHDX; NTFS stays clean', async () => {
    const jsonDir = join(dir, 'json');
    mkdirSync(jsonDir);
    const esp = join(jsonDir, 'esp.img');
    writeFileSync(esp, '');
    execFileSync('truncate', ['-s', `${4 * MiB}`, esp]);
    run('mkfs.vfat', ['-n', 'JSONESP', esp]);
    convertImage(guestFs, join(jsonDir, 'root.vhdx'), 'vhdx', ['subformat=fixed']);
    writeFileSync(join(jsonDir, 'disk.vdisk.json'), JSON.stringify({
      vdisk: 1,
      table: 'gpt',
      partitions: [
        { image: 'esp.img', type: 'esp', name: 'EFI system' },
        { image: 'root.vhdx', type: 'linux-root-x86-64', name: 'root' },
      ],
    }, null, 1));
    run('node', [join(process.cwd(), 'bin/vdboot.mjs'), 'vdisk-table', join(jsonDir, 'disk.vdisk.json')]);
    const files: FileTree = {};
    for (const f of ['disk.vdisk.json', 'disk.vdisk.table', 'esp.img', 'root.vhdx']) files[`/VMs/assembled/${f}`] = { hostFile: join(jsonDir, f) };
    const ntfs = join(dir, 'json.ntfs');
    makeNtfs(ntfs, { sizeMiB: 100, label: 'Windows', files });
    const disk = join(dir, 'json-host.img');
    const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });

    const { facts, transcript } = await boot(disk, 'root=vdisk:LABEL=Windows:/VMs/assembled/disk.vdisk.json rw', 'vdisk-json');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(facts.facts.mapper).toMatch(/vdisk0,vdisk0p1,vdisk0p2,/);
    expect(facts.facts.esp).toMatch(/^JSONESP\s*$/);
    expect(transcript).toMatch(/vdisk0: \/VMs\/assembled\/disk\.vdisk\.json on \/dev\/vda1 \(ntfs, LABEL="Windows"\): vdisk-json gpt, direct: the image is fully mappable/);
    expect(transcript).toMatch(/root is \/dev\/mapper\/vdisk0p2 \(ext4\), chosen by the GPT type "Linux root \(x86-64\)"/);
    expectHandOff(transcript);

    const after = extractRange(disk, part!.offset, part!.size, join(dir, 'json-after.ntfs'));
    const vhdx = join(dir, 'root-after.vhdx');
    writeFileSync(vhdx, ntfsRead(after, '/VMs/assembled/root.vhdx'));
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', vhdx], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    const rootFs = join(dir, 'root-after-json.ext4');
    execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', vhdx, rootFs]);
    expect(run('debugfs', ['-R', 'cat /home/note.txt', rootFs])).toBe(NOTE);
    expectNtfsClean(after);
  });
});
