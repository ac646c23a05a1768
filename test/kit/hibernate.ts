/**
 * Hibernation for the resume= tests: the guest's commands that hibernate with a token in a
 * tmpfs (and print it again after a restore), a swap's first page as the kernel leaves it,
 * and the whole resume-inside-an-image case (hibernateInImage).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes, randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { expect } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, readPartitions } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact } from '../../qemu/guest.ts';
import { bootVm, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { BASIC_DATA, copyHostFile, hostDisk, type HostDisk } from './host-disk.ts';

export const SWAP_TYPE = '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F';
export const ROOT_LABEL = 'hib-root';
/**
 * The guest's part: a token in a tmpfs, the swap vdboot named enabled, then hibernation.
 * After a restore the shell returns from the `echo disk` and prints what the tmpfs holds.
 */
export const HIBERNATE_COMMANDS = [
  'mkdir -p /mnt/ram && mount -t tmpfs -o size=1m ram /mnt/ram',
  "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /mnt/ram/token",
  guestFact('token', '$(cat /mnt/ram/token)'),
  guestFact('resume', '$(cat /sys/power/resume)'),
  'swapon /dev/disk/by-partlabel/swap 2>/dev/null || swapon "$(findfs PARTLABEL=swap)" || swapon /dev/vda2',
  guestFact('swaps', '$(tail -n +2 /proc/swaps | wc -l)'),
  'echo 0 > /sys/power/image_size',
  'echo shutdown > /sys/power/disk',
  'echo 7 > /proc/sys/kernel/printk',
  'echo "VDBOOT-GUEST hibernating"',
  'if echo disk > /sys/power/state; then echo "VDBOOT-GUEST thawed"; else echo "VDBOOT-GUEST hibernation-failed"; fi',
  'echo 1 > /proc/sys/kernel/printk',
  guestFact('after', '$(cat /mnt/ram/token)'),
];

/** `length` bytes of `file` at `offset` */
function readAt(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

/**
 * The swap's first page as the kernel leaves it: its signature (the last 10 bytes of the
 * page: SWAPSPACE2 for a swap, S1SUSPEND while it holds a hibernation image) and its first
 * 1024 bytes (the "boot bits" mkswap leaves to boot loaders: where a record kept across a
 * hibernation could live, so the test checks the kernel keeps them).
 */
export function swapPage(disk: string, offset: number): { sig: string; bootbits: Buffer } {
  const page = readAt(disk, offset, 4096);
  return { sig: page.subarray(4086).toString('latin1').replace(/\0+$/, ''), bootbits: page.subarray(0, 1024) };
}

/** The swap partition's first page inside a VHDX that lies on a host disk. */
function swapPageInVhdx(work: string, host: HostDisk, path: string, swapOffset: number): { sig: string; bootbits: Buffer } {
  const vhdx = copyHostFile(work, host, path, join(work, 'read-back.vhdx'));
  const raw = join(work, 'read-back.raw');
  execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', vhdx, raw]);
  const page = swapPage(raw, swapOffset);
  rmSync(vhdx);
  rmSync(raw);
  return page;
}

/**
 * The hibernating guest's disk `out` in `sub`: GPT with the test guest's ext4 root (label
 * ROOT_LABEL, running `commands`) and a swap partition of `swapMiB` made by mkswap with a
 * fresh UUID; returns the partitions and that UUID.
 */
export function hibernateGuestDisk(sub: string, out: string, commands: string[], swapMiB: number): { parts: ReturnType<typeof makePartitionedDisk>; swapUuid: string } {
  const root = join(sub, 'root');
  mkdirSync(root, { recursive: true });
  buildGuestRoot(root, { commands, kernelMessages: true });
  const rootFs = join(sub, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 24, label: ROOT_LABEL, fromDir: root });
  const swapUuid = randomUUID();
  const swap = join(sub, 'swap.img');
  writeFileSync(swap, '');
  truncateSync(swap, swapMiB << 20);
  execFileSync('mkswap', ['-q', '-U', swapUuid, swap]);
  const parts = makePartitionedDisk(out, { table: 'gpt', partitions: [{ image: rootFs, name: 'root' }, { image: swap, name: 'swap', type: SWAP_TYPE }] });
  rmSync(rootFs);
  rmSync(swap);
  return { parts, swapUuid };
}

/**
 * resume= inside a dynamic VHDX on NTFS, with a real hibernation (the test's body; the e2e
 * suite runs it on the default kernel, test:full on 6.12): boot 1 expands the image, records
 * its tables in the swap's boot bits and hibernates with a token in a tmpfs; boot 2 resumes
 * and prints the token; the image as boot 1 left it, copied to another NTFS with the same
 * PARTUUID and label behind a filler file (so its extents differ), is not resumed: the
 * console says why, the guest starts afresh and the record is cleared. `vms` collects the
 * machines for the caller's cleanup.
 */
export async function hibernateInImage(kernel: string, work: string, vms: Vm[]): Promise<void> {
  {
    const sub = join(work, `image-${kernelVersion(kernel)}`);
    const raw = join(sub, 'guest.raw');
    const { parts, swapUuid } = hibernateGuestDisk(sub, raw, HIBERNATE_COMMANDS.map((c) => (c.startsWith('swapon') ? 'swapon /dev/mapper/vdisk0p2' : c)), 128);
    const swapAt = parts[1]!.offset;
    const vhdx = join(sub, 'hib.vhdx');
    convertImage(raw, vhdx, 'vhdx', ['subformat=dynamic']);
    rmSync(raw);
    const host = hostDisk(sub, 'host', 'ntfs', { '/VMs/hib.vhdx': { hostFile: vhdx } }, { sizeMiB: 320 });
    const initrd = join(sub, 'initrd.img');
    writeInitramfs(initrd, { kernel });
    const append = `root=vdisk:LABEL=Windows:/VMs/hib.vhdx rd.vdisk.root=LABEL=${ROOT_LABEL} rw resume=UUID=${swapUuid}`;
    const boot = async (name: string, disk: string): Promise<Vm> => {
      const vm = await bootVm({ kernel, initrd, append, disks: [{ file: disk }], name: `hibernate-image-${kernelVersion(kernel)}-${name}`, memoryMiB: 384 });
      vms.push(vm);
      return vm;
    };

    const first = await boot('1', host.disk);
    const token = (await first.waitFor(/VDBOOT-GUEST token=[0-9a-f]{32}$/, 600_000)).replace(/^.*token=/, '');
    await first.waitFor('VDBOOT-GUEST hibernating', 60_000);
    const exit1 = await first.waitExit(600_000);
    const t1 = first.transcript();
    expect(exit1.killed, t1.slice(-3000)).toBe(false);
    expect(t1).toMatch(/resume=UUID=\S+: \/dev\/mapper\/vdisk0p2: recorded \/VMs\/hib\.vhdx's tables in its first 1 KiB \(PARTUUID=[0-9a-f-]+, map [0-9a-f]{12}…\)/);
    expect(t1).toMatch(/no hibernation image on \/dev\/mapper\/vdisk0p2; booting normally/);
    expect(t1).toMatch(/VDBOOT-GUEST swaps=1/);
    expect(t1).toMatch(/PM: hibernation: hibernation entry/);
    expect(t1).not.toContain('hibernation-failed');
    // on the host: the image's swap holds the hibernation image and vdboot's record
    const hibernated = swapPageInVhdx(sub, host, '/VMs/hib.vhdx', swapAt);
    expect(hibernated.sig).toBe('S1SUSPEND');
    expect(hibernated.bootbits.subarray(0, 16).toString('latin1')).toBe('VDBOOT-RESUME\0\0\0');
    const record = JSON.parse(hibernated.bootbits.subarray(24, 24 + hibernated.bootbits.readUInt32LE(16)).toString('utf8')) as { image: string; chain: string; writeIds: string[] };
    expect(record.image).toBe('/VMs/hib.vhdx');
    expect(record.chain).toMatch(/^vhdx dynamic \d+$/);
    expect(record.writeIds[0]).toMatch(/^[0-9a-f-]{36}$/);
    // the image as boot 1 left it, for the moved case below
    const left = copyHostFile(sub, host, '/VMs/hib.vhdx', join(sub, 'left.vhdx'));

    const second = await boot('2', host.disk);
    await second.waitFor(GUEST_MARKER, 600_000);
    await second.waitExit(120_000);
    const t2 = second.transcript();
    expect(t2).toMatch(/holds a hibernation image made with \/VMs\/hib\.vhdx's tables as they are now/);
    expect(t2).toMatch(/handing \/dev\/mapper\/vdisk0p2 \(\d+:\d+\) to the kernel; a hibernation image there is restored now/);
    expect(t2).toMatch(/PM: hibernation: resume from hibernation/);
    expect(t2).toMatch(/PM: Image loading done/);
    expect(t2).toContain('VDBOOT-GUEST thawed');
    expect(t2).toContain(`VDBOOT-GUEST after=${token}`);
    expect(t2).not.toMatch(/VDBOOT-GUEST uptime=/);
    expect(t2).not.toContain('mounted /dev/mapper/vdisk0p2');

    // moved: the same bytes on another NTFS (same partition UUID and label) behind a filler file
    const ntfs = join(sub, 'moved.ntfs');
    makeNtfs(ntfs, { sizeMiB: 320, label: 'Windows', files: { '/AAA-filler.bin': randomBytes(24 << 20), '/VMs/hib.vhdx': { hostFile: left } } });
    const movedDisk = join(sub, 'moved.img');
    const movedParts = makePartitionedDisk(movedDisk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition', uuid: readPartitions(host.disk)[0]!.uuid! }] });
    rmSync(ntfs);
    rmSync(left);
    const moved = await boot('moved', movedDisk);
    const fresh = (await moved.waitFor(/VDBOOT-GUEST token=[0-9a-f]{32}$/, 600_000)).replace(/^.*token=/, '');
    await moved.kill();
    const tm = moved.transcript();
    expect(tm).toMatch(/resume=UUID=\S+: \/dev\/mapper\/vdisk0p2 holds a hibernation image, but it is NOT restored: its file lies elsewhere on the host now/);
    expect(tm).toMatch(/\/dev\/mapper\/vdisk0p2: cleared the record, so this hibernation image is never restored later/);
    expect(tm).not.toMatch(/PM: hibernation: resume from hibernation/);
    expect(fresh).not.toBe(token);
    const after = swapPageInVhdx(sub, { disk: movedDisk, offset: movedParts[0]!.offset, size: movedParts[0]!.size, fs: 'ntfs' }, '/VMs/hib.vhdx', swapAt);
    expect(after.bootbits.equals(Buffer.alloc(1024))).toBe(true);
  }
}
