/**
 * End to end: a network client with a persistent overlay, its image served by nbdkit's curl
 * plugin from an HTTP server on 127.0.0.1, its network set up statically. The dynamic VHDX
 * lies in a folder this test serves over HTTP (127.0.0.1 only); QEMU's user network
 * (restrict=on) reaches nothing but the guestfwd, which runs `nbdkit -s curl url=…` for
 * each connection. The client's card has a fixed MAC that ifname= names lan0, and
 * ip=CLIENT::GW:NETMASK::lan0:none configures it without DHCP.
 *
 * The overlay is a preallocated file on a FAT32 stick (LABEL=USB:/vdboot/client.cow). The
 * first boot makes it (rd.vdisk.overlay.init=1) and writes; the second boot, without init,
 * finds the first boot's write and adds its own. Afterwards, on the host: the served file is
 * byte for byte what it was, the FAT is clean, and the overlay's exception store put over
 * the image (test/kit/dm-snapshot.ts) gives a root filesystem e2fsck -fn finds clean that
 * holds both boots' files with what the guest said it wrote.
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, readPartitions } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { expectHostClean, hostDisk, readHostFile, type HostDisk } from '../kit/host-disk.ts';
import { rangeServer, type RangeServer } from '../kit/http-range.ts';
import { mergeSnapshotStore } from '../kit/dm-snapshot.ts';
import { OVERLAY_STORE_OFFSET, storeUsage } from '../../src/formats/overlay.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';

const MiB = 1024 * 1024;
const MAC = '52:54:00:0a:7e:01';
const STATIC = `ip=10.0.2.77::10.0.2.2:255.255.255.0::lan0:none ifname=lan0:${MAC}`;

let dir: string;
let web: string;
let initrd: string;
let raw: string;
let stick: HostDisk;
let http: RangeServer;
const vms: Vm[] = [];

const sha256 = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex');

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-overlay-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  ({ raw } = makeGuestDisk(dir, {
    commands: [
      'n=$(( $(cat /root/boots 2>/dev/null || echo 0) + 1 ))',
      'echo $n > /root/boots',
      'head -c 300000 /dev/urandom > /root/data-$n && sync && echo 3 > /proc/sys/vm/drop_caches',
      guestFact('boots', '$n'),
      guestFact('datasum', '$(sha256sum /root/data-$n | cut -d" " -f1)'),
      guestFact('files', "$(ls /root | tr '\\n' ,)"),
      guestFact('mapper', "$(ls /dev/mapper | tr '\\n' ,)"),
      guestFact('nets', "$(ls /sys/class/net | tr '\\n' ,)"),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }));
  web = join(dir, 'web');
  mkdirSync(web);
  convertImage(raw, join(web, 'disk.vhdx'), 'vhdx', ['subformat=dynamic']);
  stick = hostDisk(dir, 'stick', 'vfat', { 'vdboot/client.cow': Buffer.alloc(48 * MiB) }, { sizeMiB: 64 });
  http = await rangeServer(web);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  http?.close();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/**
 * The user network with only nbdkit's curl plugin reachable, at 10.0.2.100:10809, and a card
 * with a fixed MAC. QEMU runs the command without a shell, with the connection as its standard
 * error too: a wrapper sends nbdkit's messages to a file instead, which a failure shows.
 */
function curlNet(url: string): string[] {
  const script = join(dir, 'serve.sh');
  writeFileSync(script, `#!/bin/sh\nexec nbdkit -s -r --log=stderr curl url=${url} 2>>${join(dir, 'nbdkit.log')}\n`, { mode: 0o755 });
  return ['-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:sh ${script.replace(/,/g, ',,')}`, '-device', `virtio-net-pci,netdev=n0,mac=${MAC}`];
}

/** Waits for the guest's marker; a boot that does not get there says what nbdkit said. */
async function finished(vm: Vm): Promise<void> {
  try {
    await vm.waitFor(GUEST_MARKER, 480_000);
  } catch (e) {
    let log = '';
    try { log = readFileSync(join(dir, 'nbdkit.log'), 'utf8'); } catch { /* nbdkit said nothing */ }
    throw new Error(`${(e as Error).message}\n--- nbdkit's messages ---\n${log || '(none)'}`);
  }
  await vm.waitExit(180_000);
}

/** Seconds from vdboot's start to the card's link: ifname= renames the card, and the wait for its new name must not run out rd.timeout. */
function linkAfter(t: string): number {
  const start = /vdboot: \[\s*([\d.]+)\] vdboot started/.exec(t);
  const link = /vdboot: \[\s*([\d.]+)\] net: lan0 \(virtio_net/.exec(t);
  expect(start && link, t).toBeTruthy();
  return Number(link![1]) - Number(start![1]);
}

async function bootClient(name: string, append: string): Promise<Vm> {
  const vm = await bootVm({
    initrd,
    append: `root=vdisk:nbd://10.0.2.100/disk.vhdx ${STATIC} rd.vdisk.overlay=LABEL=USB:/vdboot/client.cow ${append} rw`,
    disks: [{ file: stick.disk }],
    extraArgs: curlNet(`http://127.0.0.1:${http.port}/disk.vhdx`),
    name,
  });
  vms.push(vm);
  return vm;
}

describe('rd.vdisk.overlay over an image nbdkit serves from HTTP, static address', () => {
  it('the first boot makes the overlay and writes; the second finds the write; the served file is unchanged', async () => {
    const served = join(web, 'disk.vhdx');
    const before = sha256(served);

    const first = await bootClient('overlay-1', 'rd.vdisk.overlay.init=1');
    await finished(first);
    const t1 = first.transcript().replace(/\r/g, '');
    const f1 = parseGuestFacts(t1).facts;
    expect(f1.boots).toBe('1');
    expect(f1.nets).toBe('lan0,lo,');
    expect(f1.mapper).toMatch(/vdisk0-base,vdisk0-cow,vdisk0-overlay,vdisk0p1,vdisk0p2/);
    expect(t1).toMatch(new RegExp(`net: lan0 \\(virtio_net, ${MAC}\\) has a link`));
    expect(t1).toMatch(/net: lan0 is 10\.0\.2\.77\/24, gateway 10\.0\.2\.2 \(ip=/);
    expect(t1).not.toMatch(/DHCP/);
    // the card is found by its MAC at once (it took rd.timeout=30 s when the wait looked for lan0 before renaming)
    expect(linkAfter(t1)).toBeLessThan(15);
    expect(t1).toMatch(/nbd:\/\/10\.0\.2\.100\/disk\.vhdx: 41943040 bytes, read-only/);
    expect(t1).toMatch(/vdisk0: writes go to the persistent overlay \/vdboot\/client\.cow on \/dev\/vda1 \(vfat, LABEL="USB"\) \(48(\.0)? MiB\), new \(rd\.vdisk\.overlay\.init\)/);
    expect(t1).toMatch(/reboot: Power down/);
    expect(http.requests()).toBeGreaterThan(2);

    const second = await bootClient('overlay-2', '');
    await finished(second);
    const t2 = second.transcript().replace(/\r/g, '');
    const f2 = parseGuestFacts(t2).facts;
    const kept = /vdisk0: writes go to the persistent overlay .*, kept from earlier boots, ([\d.]+) (KiB|MiB) written at earlier boots \((\d+)% of its store\)/.exec(t2);
    expect(kept, t2).not.toBeNull();
    expect(f2.boots).toBe('2');
    expect(f2.files).toBe('boots,data-1,data-2,');
    expect(t2).toMatch(/reboot: Power down/);

    // On the host: the image is untouched, the stick's FAT clean, the merged view a clean ext4 with both boots' data.
    expect(sha256(served)).toBe(before);
    expectHostClean(dir, stick);
    const overlay = readHostFile(dir, stick, '/vdboot/client.cow');
    expect(overlay.subarray(0, 16).toString('latin1')).toBe('VDBOOT-OVERLAY\0\0');
    const base = readFileSync(raw);
    const { merged, exceptions } = mergeSnapshotStore(base, overlay.subarray(OVERLAY_STORE_OFFSET));
    expect(exceptions).toBeGreaterThan(0);
    // vdboot's count of the store the kernel wrote agrees with the kit's reading of it (after boot 2: more than boot 2 was told).
    const store = overlay.subarray(OVERLAY_STORE_OFFSET);
    const usage = storeUsage(bytesReader('store', new Uint8Array(store.buffer, store.byteOffset, store.byteLength)), store.readUInt32LE(12));
    expect(usage.exceptions).toBe(exceptions);
    expect(usage.exceptions * usage.chunkBytes).toBeGreaterThanOrEqual(Math.floor(Number(kept![1]) * (kept![2] === 'MiB' ? MiB : 1024) * 0.95));
    const rootPart = readPartitions(raw).find((p) => p.number === 2)!;
    const rootFs = join(dir, 'merged-root.ext4');
    writeFileSync(rootFs, merged.subarray(rootPart.offset, rootPart.offset + rootPart.size));
    const fsck = spawnSync('e2fsck', ['-fn', rootFs], { encoding: 'utf8' });
    expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    const cat = (p: string): Buffer => execFileSync('debugfs', ['-R', `cat ${p}`, rootFs], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 16 * MiB });
    expect(cat('/root/boots').toString()).toBe('2\n');
    expect(createHash('sha256').update(cat('/root/data-1')).digest('hex')).toBe(f1.datasum);
    expect(createHash('sha256').update(cat('/root/data-2')).digest('hex')).toBe(f2.datasum);
  }, 1_500_000);
});
