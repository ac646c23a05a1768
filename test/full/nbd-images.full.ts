/**
 * Network images beyond the two-client boot of npm test (test/e2e/nbd-root.test.ts):
 *  - a qcow2 with a backing file, served as two exports of one folder: the parent is found
 *    as the sibling export, and the guest reads the overlay's own bytes and the parent's root;
 *  - rd.vdisk.mode=rw on a writable raw export: what the guest wrote is there at the next
 *    boot, and e2fsck -fn passes on the served file's root partition;
 *  - rd.vdisk.mode=rw on an export the server opened read-only: refused with the reason.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, readPartitions } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';

let dir: string;
let initrd: string;
let raw: string;
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-full-nbd-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  ({ raw } = makeGuestDisk(dir, {
    commands: [
      'n=$(cat /root/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /root/count; sync',
      guestFact('count', '$n'),
      guestFact('esp', '$(dd if=/dev/mapper/vdisk0p1 bs=4096 skip=16 count=1 2>/dev/null | od -An -tx1 | head -1 | tr -d " ")'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }));
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

function nbdNet(folder: string, readOnly = false): string[] {
  const cmd = `nbdkit -s --log=null ${readOnly ? '-r ' : ''}file dir=${folder}`.replace(/,/g, ',,');
  return ['-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:${cmd}`, '-device', 'virtio-net-pci,netdev=n0'];
}

async function boot(folder: string, append: string, name: string, readOnly = false) {
  const vm = await bootVm({ initrd, append: `${append} ip=dhcp rw`, extraArgs: nbdNet(folder, readOnly), name });
  vms.push(vm);
  return vm;
}

describe('network images', () => {
  it('qcow2 with a backing file: two exports, the parent found as the sibling', async () => {
    const folder = join(dir, 'chain');
    mkdirSync(folder);
    convertImage(raw, join(folder, 'base.qcow2'), 'qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(folder, 'top.qcow2')]);
    // bytes only the overlay has: 4 KiB into the ESP (partition 1), which nothing else touches
    const esp = readPartitions(raw)[0]!;
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${esp.offset + 64 * 1024} 4096`, join(folder, 'top.qcow2')]);
    const vm = await boot(folder, 'root=vdisk:nbd://10.0.2.100/top.qcow2', 'nbd-qcow2-chain');
    await vm.waitFor(GUEST_MARKER, 480_000);
    const f = parseGuestFacts(vm.transcript());
    await vm.waitExit(180_000);
    expect(f.facts.esp).toBe('5a'.repeat(16));
    expect(f.facts.count).toBe('1');
    expect(vm.transcript()).toMatch(/top\.qcow2: qcow2 v\d → qcow2 v\d, direct/);
    expect(vm.transcript()).toMatch(/\/dev\/nbd\d: nbd:\/\/10\.0\.2\.100\/base\.qcow2/);
    expect(vm.transcript()).toMatch(/\/dev\/nbd\d: nbd:\/\/10\.0\.2\.100\/top\.qcow2/);
  }, 900_000);

  it('rd.vdisk.mode=rw on a writable raw export: the write is there at the next boot, e2fsck passes', async () => {
    const folder = join(dir, 'rw');
    mkdirSync(folder);
    copyFileSync(raw, join(folder, 'disk.raw'));
    const first = await boot(folder, 'root=vdisk:nbd://10.0.2.100/disk.raw rd.vdisk.mode=rw', 'nbd-rw-1');
    await first.waitFor(GUEST_MARKER, 480_000);
    expect(parseGuestFacts(first.transcript()).facts.count).toBe('1');
    await first.waitExit(180_000);
    expect(first.transcript()).toMatch(/disconnected \/dev\/nbd0/);
    // the next boot, in the default snapshot mode, reads what the first one wrote
    const second = await boot(folder, 'root=vdisk:nbd://10.0.2.100/disk.raw', 'nbd-rw-2');
    await second.waitFor(GUEST_MARKER, 480_000);
    expect(parseGuestFacts(second.transcript()).facts.count).toBe('2');
    await second.waitExit(180_000);
    const root = readPartitions(join(folder, 'disk.raw'))[1]!;
    const fs = join(dir, 'root-after.ext4');
    execFileSync('dd', [`if=${join(folder, 'disk.raw')}`, `of=${fs}`, 'bs=512', `skip=${root.offset / 512}`, `count=${root.size / 512}`, 'status=none']);
    const fsck = spawnSync('e2fsck', ['-fn', fs], { encoding: 'utf8' });
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    const count = execFileSync('debugfs', ['-R', 'cat /root/count', fs], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(count.trim()).toBe('1');
  }, 900_000);

  it('rd.vdisk.mode=rw on a read-only export is refused with the reason', async () => {
    const folder = join(dir, 'rw');
    const vm = await boot(folder, 'root=vdisk:nbd://10.0.2.100/disk.raw rd.vdisk.mode=rw rd.shell=0', 'nbd-rw-refused', true);
    await vm.waitFor(/rd\.shell=0: no rescue shell/, 300_000);
    await vm.kill();
    expect(vm.transcript().replace(/\r/g, '')).toMatch(/which vdboot will not write to: the server exports disk\.raw read-only/);
  }, 600_000);
});
