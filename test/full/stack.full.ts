/**
 * Full runs of the storage stack beside the npm test boots (test/e2e/btrfs.test.ts,
 * lvm-tmpfs.test.ts, luks-lvm.test.ts):
 *  - three wrong passphrases typed on the serial console: the rescue shell starts, after a
 *    message naming the device, the keys to fix and this boot's command line;
 *  - a btrfs root spanning two disks with one disk missing: vdboot waits, then stops naming
 *    the member found, the count the superblock wants and rootflags=degraded;
 *  - Ubuntu's layout as a plain root (root=LABEL=ubuntu rootflags=subvol=@ rw) on Debian 12's
 *    6.12 kernel (btrfs and its dependencies as .ko.xz): the guest counts its boot in /count,
 *    and this machine's btrfs reads the count back from the @ subvolume (btrfs check clean);
 *  - Fedora's layout inside a dynamic VHDX on NTFS (root=vdisk:… rootflags=subvol=root, the
 *    root partition found by rd.vdisk.root=auto beside /boot's ext4 because subvol= names btrfs).
 * Measured under TCG on two busy cores: 42 s, 47 s, 110 s (two boots) and 53 s, plus ~1 min
 * building the disks.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { btrfsAvailable, fedoraBtrfsDisks, folderWith, ubuntuBtrfsDisk } from '../kit/btrfs.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { COUNTER_COMMANDS, imageHostDisk } from '../kit/rw-check.ts';
import { makeLuks2 } from '../kit/stack-disk.ts';

const LUKS_UUID = '0c0ffee0-1234-4abc-8def-0123456789ab';
const can = btrfsAvailable() && lvmAvailable() && fs.existsSync('/usr/sbin/cryptsetup');
const kernel612 = cachedKernel('6.12');

let dir: string;
let initrd: string;
let initrd612: string;
let luksDisk: string;
let fedoraDisks: string[];
let fedoraUuid: string;
let fedoraHost: string;
let ubuntuDisk: string;
let ubuntuRootOffset: number;
let ubuntuRootSize: number;
const vms: Vm[] = [];

function guestRoot(name: string, extra: string[] = []): string {
  const root = join(dir, `root-${name.replace(/\W/g, '_')}`);
  buildGuestRoot(root, { commands: [guestFact('which', '$(cat /which)'), ...extra], files: { which: `${name}\n` } });
  return root;
}

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-stack-full-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  if (kernel612) {
    initrd612 = join(dir, 'initrd-612.img');
    writeInitramfs(initrd612, { kernel: kernel612 });
  }
  // an encrypted ext4 root, for the wrong passphrases
  const rootFs = join(dir, 'crypt-root.ext4');
  makeExt4(rootFs, { sizeMiB: 16, label: 'cryptroot', fromDir: guestRoot('luks') });
  const keyFile = join(dir, 'unused.key');
  fs.writeFileSync(keyFile, 'not given to this boot\n');
  const luks = makeLuks2(dir, rootFs, keyFile, 'the right one', LUKS_UUID);
  luksDisk = join(dir, 'luks.img');
  makePartitionedDisk(luksDisk, { table: 'gpt', partitions: [{ image: luks.file, name: 'cryptroot' }] });
  fs.rmSync(luks.file);
  fs.rmSync(rootFs);
  // Fedora over two disks (the second left out at boot), and on one disk inside a VHDX
  const fedoraDir = join(dir, 'fedora-two');
  fs.mkdirSync(fedoraDir);
  const two = fedoraBtrfsDisks(fedoraDir, guestRoot('root'), folderWith(join(dir, 'home-f'), { which: 'home\n' }), { secondMember: true });
  fedoraDisks = two.disks;
  fedoraUuid = two.uuid;
  const one = fedoraBtrfsDisks(dir, guestRoot('root'), folderWith(join(dir, 'home-f'), { which: 'home\n' }));
  const vhdx = join(dir, 'fedora.vhdx');
  convertImage(one.disks[0]!, vhdx, 'vhdx', ['subformat=dynamic']);
  fedoraHost = imageHostDisk(dir, 'fedora-host', 'ntfs', 'VMs/Fedora/fedora.vhdx', vhdx, false, 256).disk;
  fs.rmSync(vhdx);
  fs.rmSync(one.disks[0]!);
  // Ubuntu as a plain root
  ubuntuDisk = join(dir, 'ubuntu.img');
  const ubuntu = ubuntuBtrfsDisk(ubuntuDisk, guestRoot('@', COUNTER_COMMANDS), folderWith(join(dir, 'home-u'), { which: '@home\n' }));
  ubuntuRootOffset = ubuntu.offset;
  ubuntuRootSize = ubuntu.size;
}, 600_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function boot(name: string, append: string, disks: string[], opts: { kernel?: string; initrd?: string; snapshot?: boolean } = {}): Promise<Vm> {
  const vm = await bootVm({ kernel: opts.kernel, initrd: opts.initrd ?? initrd, name, append, disks: disks.map((file) => ({ file, interface: 'virtio-blk' as const, snapshot: opts.snapshot ?? true })) });
  vms.push(vm);
  return vm;
}

describe.skipIf(!can)('full: the storage stack\'s failures and the btrfs layouts not in npm test', { timeout: 900_000 }, () => {
  it('three wrong passphrases on the console: the rescue shell, with the device, the keys to fix and the command line', async () => {
    const vm = await boot('stack-wrong-passphrases', 'root=LABEL=cryptroot', [luksDisk]);
    for (let i = 1; i <= 3; i++) {
      await vm.waitFor(`Passphrase for /dev/vda1 (luks-${LUKS_UUID}): `, 240_000);
      vm.send(`wrong ${i}\n`);
      await vm.waitFor(`No key available with this passphrase (try ${i} of 3)`, 120_000);
    }
    await vm.waitFor('vdboot# ', 120_000);
    const t = vm.transcript();
    expect(t).toMatch(new RegExp(`/dev/vda1 \\(LUKS, UUID ${LUKS_UUID}\\) stays locked: no key available with the passphrase after 3 tries\\. .*rd\\.luks\\.key=.*rd\\.luks=0`));
    expect(t).toMatch(/this boot's was:\n.*root=LABEL=cryptroot/);
    expect(t).not.toContain('wrong 1');
    expect(t).not.toMatch(/VDBOOT-GUEST/);
    vm.send('poweroff -f\n');
    await vm.waitExit(60_000);
  });

  it('a btrfs root over two disks with one missing: the wait, then the member found, the count and rootflags=degraded', async () => {
    const vm = await boot('stack-btrfs-missing', `root=UUID=${fedoraUuid} rootflags=subvol=root rd.timeout=6`, [fedoraDisks[0]!]);
    await vm.waitFor('vdboot# ', 240_000);
    const t = vm.transcript();
    expect(t).toMatch(new RegExp(`btrfs UUID=${fedoraUuid} \\("fedora"\\) has 1 of its 2 devices: /dev/vda2 \\(devid 1\\); waiting for the others`));
    expect(t).toMatch(new RegExp(`The root btrfs UUID=${fedoraUuid} \\("fedora"\\) spans 2 devices, and after 6 s vdboot has found 1 of its 2 devices: /dev/vda2 \\(devid 1\\)\\.\\n.*rootflags=degraded`));
    expect(t).not.toMatch(/mounted \/dev\/vda2/);
    vm.send('poweroff -f\n');
    await vm.waitExit(60_000);
  });

  it.skipIf(!kernel612)('Ubuntu as a plain root on 6.12: rootflags=subvol=@ rw; the count the guest wrote is in @, read by this machine\'s btrfs', async () => {
    for (const count of ['0', '1']) {
      const vm = await boot(`stack-ubuntu-plain-612-${count}`, 'root=LABEL=ubuntu rootflags=subvol=@ rw', [ubuntuDisk], { kernel: kernel612, initrd: initrd612, snapshot: false });
      await vm.waitFor(GUEST_MARKER, 300_000);
      const facts = parseGuestFacts(vm.transcript());
      await vm.waitExit(60_000);
      expect(facts.root.options).toContain('subvol=/@');
      expect(facts.root.mode).toBe('rw');
      expect(facts.facts.which).toBe('@');
      expect(facts.facts.count).toBe(count);
      expect(vm.transcript()).toMatch(/mounted \/dev\/vda2 \(btrfs, rw, subvol=@\)/);
    }
    // this machine's kernel reads the btrfs back: /count in @ is 2, and btrfs check is clean
    const part = join(dir, 'ubuntu-root.btrfs');
    execFileSync('dd', [`if=${ubuntuDisk}`, `of=${part}`, 'bs=1M', `skip=${ubuntuRootOffset >> 20}`, `count=${ubuntuRootSize >> 20}`, 'status=none']);
    execFileSync('btrfs', ['check', '--readonly', part], { stdio: 'ignore' });
    const mnt = fs.mkdtempSync(join(dir, 'mnt-'));
    const loop = execFileSync('losetup', ['-f', '--show', '-r', part], { encoding: 'utf8' }).trim();
    try {
      execFileSync('mount', ['-t', 'btrfs', '-o', 'ro,subvol=@', loop, mnt]);
      try {
        expect(fs.readFileSync(join(mnt, 'count'), 'utf8').trim()).toBe('2');
      } finally {
        execFileSync('umount', [mnt]);
      }
    } finally {
      execFileSync('losetup', ['-d', loop]);
    }
  });

  it('Fedora inside a dynamic VHDX on NTFS: root=vdisk:… rootflags=subvol=root', async () => {
    const vm = await boot('stack-fedora-vhdx', 'root=vdisk:LABEL=Windows:/VMs/Fedora/fedora.vhdx rd.vdisk.mode=snapshot rootflags=subvol=root', [fedoraHost]);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    // rd.vdisk.root=auto: /boot's ext4 and the btrfs are both Linux filesystems; subvol= picks the btrfs
    expect(t).toMatch(/the only btrfs, as rootflags=subvol=root names a btrfs subvolume/);
    expect(t).toMatch(/mounted \/dev\/mapper\/vdisk0p2 \(btrfs, ro, subvol=root\)/);
    expect(facts.root.options).toContain('subvol=/root');
    expect(facts.facts.which).toBe('root');
  });
});
