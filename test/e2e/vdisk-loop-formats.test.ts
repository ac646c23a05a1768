/**
 * End to end: rd.vdisk.map=loop on an NTFS host (mkinitramfs --with ntfs-3g) for every
 * writable format in one boot. The root is a dynamic VMDK (monolithicSparse); attached with
 * rd.vdisk.attach= on the same host: a dynamic VHD, VDI and VHDX, a qcow2 with preallocated
 * metadata, a monolithicFlat VMDK (descriptor and extent file) and a raw image, each with
 * known content written by qemu-io. The dynamic ones are expanded in place first, then each
 * image goes through a loop device of its file on ntfs-3g. The guest reads every attached
 * disk (its sha256 as qemu reads it) and writes 64 KiB into each at 8 MiB, in a block the
 * dynamic images did not allocate. On the host afterwards: the root fully allocated with
 * the guest's file in it, every attached image reads as before except for the guest's
 * write (qemu-img convert -O raw) and passes `qemu-img check` where qemu has one (not VHD,
 * not raw), NTFS clean.
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeNtfs, makePartitionedDisk, ntfsRead, type FileTree } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { BASIC_DATA, expectNtfsClean, fileInImage, qemuRawOf } from '../kit/host-disk.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';

const NOTE = 'written by the guest through a loop device on ntfs-3g';
const MiB = 1 << 20;
/** where and what the guest writes into each attached disk: 64 KiB of 'G' at 8 MiB (absent in every dynamic image before the boot) */
const WRITE_AT = 8 * MiB;
const WRITE_LEN = 64 * 1024;
const ATTACHED_COUNT = 6;

let dir: string;
let initrd: string;
let guestRaw: string;
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-loopfmt-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), tools: ['ntfs-3g'] });
  const commands: string[] = [];
  for (let i = 1; i <= ATTACHED_COUNT; i++) {
    commands.push(
      guestFact(`sha${i}`, `$(sha256sum < /dev/mapper/vdisk${i} | cut -d' ' -f1)`),
      `dd if=/dev/zero bs=${WRITE_LEN} count=1 2>/dev/null | tr '\\000' G | dd of=/dev/mapper/vdisk${i} bs=${WRITE_LEN} seek=${WRITE_AT / WRITE_LEN} conv=notrunc 2>/dev/null && ${guestFact(`wrote${i}`, 'ok')}`,
    );
  }
  commands.push('sync');
  guestRaw = makeGuestDisk(dir, { writeFile: { path: '/home/note.txt', content: NOTE }, commands, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

interface Attached {
  /** file name on the host, under /VMs */
  name: string;
  /** qemu's format name */
  format: string;
  /** other files the image needs on the host (a flat VMDK's extent) */
  extra?: string[];
  /** expanded in place before the loop path */
  dynamic: boolean;
  /** qemu-img has a consistency check for the format */
  check: boolean;
  create: string[];
}

const SIZE = '16M';
const ATTACHED: Attached[] = [
  { name: 'data.vhd', format: 'vpc', dynamic: true, check: false, create: ['-o', 'subformat=dynamic'] },
  { name: 'data.vdi', format: 'vdi', dynamic: true, check: true, create: [] },
  { name: 'data.vhdx', format: 'vhdx', dynamic: true, check: true, create: ['-o', 'block_size=1M'] },
  { name: 'data.qcow2', format: 'qcow2', dynamic: false, check: true, create: ['-o', 'preallocation=metadata'] },
  { name: 'flat.vmdk', format: 'vmdk', extra: ['flat-flat.vmdk'], dynamic: false, check: true, create: ['-o', 'subformat=monolithicFlat'] },
  { name: 'data.img', format: 'raw', dynamic: false, check: false, create: [] },
];

/** A small image with known content in a few places (and, for the dynamic formats, absent blocks between them). */
function makeAttached(a: Attached): string {
  const file = join(dir, a.name);
  execFileSync('qemu-img', ['create', '-q', '-f', a.format, ...a.create, file, SIZE]);
  execFileSync('qemu-io', ['-f', a.format, '-c', 'write -P 0xa5 0 64k', '-c', 'write -P 0x3c 3M 1M', '-c', 'write -P 0x5a 12M 512k', file], { stdio: 'ignore' });
  return file;
}

function esc(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

describe('end to end: rd.vdisk.map=loop on an NTFS host through ntfs-3g, every writable format at once', { timeout: 600_000 }, () => {
  it('a dynamic VMDK root and attached dynamic VHD, VDI, VHDX, preallocated qcow2, flat VMDK and raw images: the dynamic ones expanded in place, all through loop devices; the guest reads each as qemu does and writes into it; root fully allocated with the guest\'s file, attached images hold exactly the guest\'s write, NTFS clean', async () => {
    const root = join(dir, 'linux.vmdk');
    convertImage(guestRaw, root, 'vmdk', ['subformat=monolithicSparse']);
    const files: FileTree = { '/VMs/linux.vmdk': { hostFile: root } };
    const before = new Map<string, Buffer>();
    for (const a of ATTACHED) {
      const file = makeAttached(a);
      before.set(a.name, qemuRawOf(file, a.format));
      files[`/VMs/${a.name}`] = { hostFile: file };
      for (const x of a.extra ?? []) files[`/VMs/${x}`] = { hostFile: join(dir, x) };
    }
    const ntfs = join(dir, 'host.ntfs');
    makeNtfs(ntfs, { sizeMiB: 220, label: 'Windows', files });
    const disk = join(dir, 'host.img');
    const [layout] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
    expect(ATTACHED.length).toBe(ATTACHED_COUNT);
    const attach = ATTACHED.map((a) => `rd.vdisk.attach=LABEL=Windows:/VMs/${a.name}`).join(' ');
    const vm = await bootVm({ initrd, append: `root=vdisk:LABEL=Windows:/VMs/linux.vmdk ${attach} rd.vdisk.map=loop rw`, disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdisk-loop-formats' });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    const t = vm.transcript();
    expect(facts.root, t).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    // the guest sees each attached disk as qemu reads it, and its write goes through
    ATTACHED.forEach((a, i) => {
      expect(facts.facts[`sha${i + 1}`], a.name).toBe(createHash('sha256').update(before.get(a.name)!).digest('hex'));
      expect(facts.facts[`wrote${i + 1}`], a.name).toBe('ok');
    });
    // the console: each dynamic image expanded first, then every image on the loop path
    for (const name of ['linux.vmdk', ...ATTACHED.filter((a) => a.dynamic).map((a) => a.name)]) {
      expect(t).toMatch(new RegExp(`expanding /VMs/${esc(name)} in place: \\d+ absent blocks? of`));
      expect(t).toMatch(new RegExp(`expanded /VMs/${esc(name)}: .* written in`));
    }
    for (const a of ATTACHED.filter((x) => !x.dynamic)) expect(t).not.toMatch(new RegExp(`expanding /VMs/${esc(a.name)}`));
    expect(t).toMatch(/vdisk0: \/VMs\/linux\.vmdk on .*vmdk monolithicSparse, loop \(asked for\)/);
    ATTACHED.forEach((a, i) => expect(t).toMatch(new RegExp(`vdisk${i + 1}: /VMs/${esc(a.name)} on .*, loop \\(asked for\\)`)));
    expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
    for (let i = 0; i <= ATTACHED.length; i++) expect(t).toMatch(new RegExp(`detached /dev/loop${i}\\b`));
    expect(t).toMatch(/unmounted \/host/);
    expect(t).toMatch(/reboot: Power down/);

    const part = join(dir, 'host-after.ntfs');
    writeFileSync(part, readFileSync(disk).subarray(layout!.offset, layout!.offset + layout!.size));
    const afterDir = mkdtempSync(join(dir, 'after-'));
    const after = (name: string) => {
      const out = join(afterDir, name);
      writeFileSync(out, ntfsRead(part, `/VMs/${name}`));
      return out;
    };
    const rootAfter = after('linux.vmdk');
    const rootCheck = spawnSync('qemu-img', ['check', '-f', 'vmdk', rootAfter], { encoding: 'utf8' });
    expect(rootCheck.status, `${rootCheck.stdout}${rootCheck.stderr}`).toBe(0);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '-f', 'vmdk', '--output=json', rootAfter], { encoding: 'utf8' })) as { data: boolean; offset?: number }[];
    expect(map.filter((m) => !m.data || m.offset === undefined)).toEqual([]);
    expect(fileInImage(dir, rootAfter, 'vmdk', '/home/note.txt')).toBe(NOTE);
    for (const a of ATTACHED) {
      const file = after(a.name);
      for (const x of a.extra ?? []) after(x);
      if (a.check) {
        const check = spawnSync('qemu-img', ['check', '-f', a.format, file], { encoding: 'utf8' });
        expect(check.status, `${a.name}: ${check.stdout}${check.stderr}`).toBe(0);
      }
      const expected = Buffer.from(before.get(a.name)!);
      expected.fill('G', WRITE_AT, WRITE_AT + WRITE_LEN);
      expect(qemuRawOf(file, a.format).equals(expected), `${a.name} reads as before, with the guest's 64 KiB at 8 MiB`).toBe(true);
    }
    expectNtfsClean(disk, layout!.offset, layout!.size);
  });
});
