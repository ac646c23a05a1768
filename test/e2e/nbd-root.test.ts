/**
 * End to end: root=vdisk:nbd:// under QEMU. A dynamic VHDX of the test guest (GPT, ext4
 * root) lies in a folder that nbdkit serves, one export per file, on stdio through QEMU's
 * user network (restrict=on: the guest reaches nothing but the guestfwd, which starts
 * `nbdkit -s` for each connection). Two clients boot the same image at the same time with
 * ip=dhcp, each writes a file of its own on the root and reads the root back; each sees
 * only its own file (the writes stay in its RAM overlay), and the served file is byte for
 * byte what it was. The shutdown hand-off disconnects the nbd device after the root.
 *
 * A third client reads a 16 MiB file slowly (1 MiB at a time, O_DIRECT); the test kills
 * the nbdkit serving it and keeps the server refusing for a few seconds: vdboot's
 * reconnect daemon says the server is lost, retries, reconnects, the read completes with
 * the checksum of the file the host put there, and the guest boots on to the shutdown
 * hand-off, which stops the daemon and disconnects the device.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { killableNbdServer } from '../kit/nbd-server.ts';

let dir: string;
let served: string;
let initrd: string;
const vms: Vm[] = [];
/** the file the reconnect client reads while its server is killed */
const big = randomBytes(16 << 20);

const sha256 = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex');

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-nbd-'));
  initrd = join(dir, 'initrd.img');
  // the default image: nbd and the network cards' drivers (virtio_net) are in the universal set
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const { raw } = makeGuestDisk(dir, {
    files: { '/big': big },
    commands: [
      // vdtest.read=1: read /big 1 MiB at a time past the page cache, a second apart
      'if grep -q vdtest.read=1 /proc/cmdline; then',
      '  echo VDTEST-READING',
      '  sum=$(for i in $(seq 0 15); do dd if=/big bs=1M skip=$i count=1 iflag=direct status=none; sleep 1; done | sha256sum | cut -d" " -f1)',
      `  ${guestFact('bigsum', '$sum')}`,
      'fi',
      'id=$(sed -n "s/.*vdtest.id=\\([A-Za-z0-9]*\\).*/\\1/p" /proc/cmdline)',
      'echo "client $id was here" > /root/client-$id && sync && echo 3 > /proc/sys/vm/drop_caches',
      guestFact('id', '$id'),
      guestFact('mine', '$(cat /root/client-$id)'),
      guestFact('clients', "$(ls /root | grep client- | tr '\\n' ,)"),
      guestFact('mapper', "$(ls /dev/mapper | tr '\\n' ,)"),
      guestFact('nbd0size', '$(cat /sys/block/nbd0/size)'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }, { sizeMiB: 48 });
  served = join(dir, 'served');
  mkdirSync(served);
  convertImage(raw, join(served, 'disk.vhdx'), 'vhdx', ['subformat=dynamic']);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/**
 * QEMU's user network with only the NBD server reachable, at 10.0.2.100:10809. The server's
 * log stays out of the connection (QEMU gives the command the socket as stdout and stderr).
 */
function nbdNet(folder: string): string[] {
  const cmd = `nbdkit -s --log=null file dir=${folder}`.replace(/,/g, ',,');
  return ['-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:${cmd}`, '-device', 'virtio-net-pci,netdev=n0'];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function bootClient(id: string, append: string, net = nbdNet(served)) {
  const vm = await bootVm({ initrd, append: `${append} rw vdtest.id=${id}`, extraArgs: net, name: `nbd-${id}` });
  vms.push(vm);
  return vm;
}

describe('root=vdisk:nbd://', () => {
  it('two clients boot one dynamic VHDX at once, each sees only its own writes, the served file is unchanged', async () => {
    const before = sha256(join(served, 'disk.vhdx'));
    const a = await bootClient('A', 'root=vdisk:nbd://10.0.2.100/disk.vhdx ip=dhcp');
    const b = await bootClient('B', 'root=vdisk:nbd://10.0.2.100/disk.vhdx ip=dhcp');
    for (const vm of [a, b]) await vm.waitFor(GUEST_MARKER, 480_000);
    const fa = parseGuestFacts(a.transcript());
    const fb = parseGuestFacts(b.transcript());
    for (const vm of [a, b]) await vm.waitExit(180_000);
    const ta = a.transcript();
    expect(fa.facts.id).toBe('A');
    expect(fa.facts.mine).toBe('client A was here');
    expect(fa.facts.clients).toBe('client-A,');
    expect(fb.facts.mine).toBe('client B was here');
    expect(fb.facts.clients).toBe('client-B,');
    expect(fa.root.device).toBe('/dev/mapper/vdisk0p2');
    expect(fa.facts.mapper).toMatch(/vdisk0-base/);
    // the export's size in 512-byte sectors, as the kernel's nbd device has it
    expect(Number(fa.facts.nbd0size) * 512).toBe(readFileSync(join(served, 'disk.vhdx')).length);
    expect(ta).toMatch(/net: eth0 \(virtio_net, [0-9a-f:]+\) has a link/);
    expect(ta).toMatch(/net: eth0 is 10\.0\.2\.15\/24 by DHCP from 10\.0\.2\.2/);
    expect(ta).toMatch(/\/dev\/nbd0: nbd:\/\/10\.0\.2\.100\/disk\.vhdx/);
    expect(ta).toMatch(/shutdown hand-off \(poweroff\)/);
    expect(ta).toMatch(/disconnected \/dev\/nbd0|nbd0/);
    expect(ta).toMatch(/reboot: Power down/);
    expect(sha256(join(served, 'disk.vhdx'))).toBe(before);
  }, 900_000);

  it('a server not there yet at boot is waited for; killed and restarted while the client reads: the client finishes its read and boots on', async () => {
    const server = killableNbdServer(join(dir, 'killable'), served);
    // not there yet at boot: the first connections are closed at once, and the boot waits for it
    server.kill();
    const vm = await bootClient('R', 'root=vdisk:nbd://10.0.2.100/disk.vhdx ip=dhcp vdtest.read=1', server.netArgs);
    await vm.waitFor(/WARNING: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the server closed the connection \(0 of 16 bytes arrived\) \(attempt 1; trying again for \d+ s more, rd\.timeout=30\)/, 480_000);
    await sleep(1500);
    // then the first connection that gets through loses its server while the image's tables are read
    server.dropAtFirstRead(statSync(join(served, 'disk.vhdx')).size);
    server.restart();
    await vm.waitFor('VDTEST-READING', 480_000);
    await sleep(2000);
    // the server goes away: the one serving the kernel is killed, new connections are closed at once
    expect(server.kill().length).toBeGreaterThan(0);
    await vm.waitFor(/WARNING: nbd: lost the connection to nbd:\/\/10\.0\.2\.100\/disk\.vhdx \(\/dev\/nbd0\)/, 120_000);
    await sleep(6000);
    server.restart();
    await vm.waitFor(/nbd: reconnected \/dev\/nbd0 to nbd:\/\/10\.0\.2\.100\/disk\.vhdx/, 180_000);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(180_000);
    const t = vm.transcript().replace(/\r/g, '');
    expect(facts.facts.bigsum).toBe(createHash('sha256').update(big).digest('hex'));
    expect(t).toMatch(/nbd: watching \/dev\/nbd0: if the server goes away, I\/O waits up to 300 s while vdboot reconnects/);
    // attempts while the server refused: the connection closed during the handshake
    expect(t).toMatch(/nbd: \/dev\/nbd0: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the server closed the connection \(0 of 16 bytes arrived\) \(attempt 1; retrying for \d+ s more\)/);
    const back = /nbd: reconnected \/dev\/nbd0 to nbd:\/\/10\.0\.2\.100\/disk\.vhdx after ([\d.]+) s \((\d+) attempts\); its I\/O goes on/.exec(t);
    expect(Number(back![1])).toBeGreaterThanOrEqual(5);
    expect(Number(back![2])).toBeGreaterThanOrEqual(2);
    // the refused ones at boot (one warning each), the one dropped at its first read, the one the boot made, then one per attempt
    const refusedAtBoot = [...t.matchAll(/the server closed the connection \(0 of 16 bytes arrived\) \(attempt \d+; trying again/g)].length;
    expect(refusedAtBoot).toBeGreaterThanOrEqual(1);
    expect(t).toMatch(/WARNING: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the server closed the connection \(\d+ of \d+ bytes arrived\) while vdboot read the image's tables; connecting again \(first retry; trying for \d+ s more, rd\.timeout=30\)/);
    expect(server.connections()).toBe(refusedAtBoot + 1 + 1 + Number(back![2]));
    // the shutdown hand-off stops the daemon, then disconnects the device
    const stop = t.search(/stopping the NBD reconnect daemon \(\d+\)/);
    const disc = t.search(/disconnected \/dev\/nbd0/);
    expect(stop).toBeGreaterThan(0);
    expect(disc).toBeGreaterThan(stop);
    expect(t).toMatch(/reboot: Power down/);
    expect(t).not.toMatch(/gave up reconnecting/);
  }, 900_000);

  it('an export the server does not have: the server\'s answer and its export list on the console', async () => {
    const vm = await bootClient('C', 'root=vdisk:nbd://10.0.2.100/missing.vhdx ip=dhcp rd.shell=0');
    await vm.waitFor(/rd\.shell=0: no rescue shell/, 300_000);
    await vm.kill();
    const t = vm.transcript().replace(/\r/g, '');
    expect(t).toMatch(/nbd:\/\/10\.0\.2\.100\/missing\.vhdx: the NBD server has no export "missing\.vhdx" \(NBD_REP_ERR_UNKNOWN[^)]*\)\. The server offers: "disk\.vhdx"\./);
    expect(t).not.toMatch(/VDBOOT-GUEST-OK/);
  }, 600_000);
});
