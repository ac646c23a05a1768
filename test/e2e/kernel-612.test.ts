/**
 * End to end on Debian 12's 6.12 kernel (scripts/fetch-kernel.sh unpacks it into .cache):
 * a dynamic VHDX on NTFS booted read-write with the initramfs `vdboot mkinitramfs` builds
 * with no flags, twice, the second boot reading what the first wrote.
 *
 * 6.12 has ntfs3, which loses data written into the holes of a sparse file (a compression
 * unit that is partly allocated gets new clusters without its old ones' data: a guest's
 * ext4 lost its journal superblock that way). So each case is a sparse copy (cp onto an
 * ntfs-3g mount, as a Linux user makes one) or a whole one (ntfscp), and afterwards on the
 * host: NTFS clean, `qemu-img check` passes, `e2fsck -fn` on the guest's root is clean, and
 * the guest's counter in the image says 2.
 *  - sparse, with absent blocks: the holes are filled through ntfs-3g and checked on the
 *    partition, the image expanded, then mapped directly;
 *  - whole, with absent blocks: expanded through ntfs3 (no FUSE), then mapped directly;
 *  - sparse with rd.vdisk.expand=0: nothing is filled, the loop path writes through
 *    ntfs-3g, not ntfs3.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, ntfsAddSparse, sparseCopySupported } from '../../qemu/disks.ts';
import { GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { copyHostFile, expectHostClean, fileInImage, hostDisk, type HostDisk } from '../kit/host-disk.ts';

const kernel = cachedKernel('6.12');
const IMAGE = '/VMs/My Linux.vhdx';
let dir: string;
let initrd: string;
let guestRaw: string;
const vms: Vm[] = [];

beforeAll(() => {
  if (!kernel) return;
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-612-'));
  initrd = join(dir, 'initrd.img');
  // no flags: what a user gets first
  const built = writeInitramfs(initrd, { kernel });
  expect(built.manifest.kernelRelease).toMatch(/^6\.12\./);
  expect(built.manifest.tools.ntfs3g).toBeDefined();
  // the guest counts its boots in /count: printed before it is raised, then synced
  guestRaw = makeGuestDisk(dir, {
    commands: ['n=$(cat /count 2>/dev/null || echo 0)', guestFact('count', '$n'), 'echo $((n+1)) > /count', 'sync', guestFact('kernel', '$(uname -r)')],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }).raw;
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/** Boots the 6.12 kernel on `host`, returns the console and the guest's facts after it powered off. */
async function boot(host: HostDisk, append: string, name: string): Promise<{ t: string; facts: ReturnType<typeof parseGuestFacts> }> {
  const vm = await bootVm({ kernel: kernel!, initrd, append: `root="vdisk:LABEL=Windows:${IMAGE}" rw ${append}`.trim(), disks: [{ file: host.disk }], name, memoryMiB: 768 });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 300_000);
  await vm.waitExit(120_000);
  const t = vm.transcript();
  expect(t).toMatch(/reboot: Power down/);
  return { t, facts: parseGuestFacts(t) };
}

/** After the boots: NTFS clean, qemu-img check passes, the guest's ext4 clean, its counter at `count`. */
function expectKept(host: HostDisk, name: string, count: number): void {
  expectHostClean(dir, host);
  const after = copyHostFile(dir, host, IMAGE, join(dir, `${name}-after.vhdx`));
  const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
  expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
  const raw = join(dir, `${name}-after.raw`);
  execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', after, raw]);
  const root = join(dir, `${name}-after.ext4`);
  execFileSync('dd', [`if=${raw}`, `of=${root}`, 'bs=1M', 'skip=3', 'status=none']);
  const fsck = spawnSync('e2fsck', ['-fn', root], { encoding: 'utf8' });
  expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
  expect(fileInImage(dir, after, 'vhdx', '/count').trim()).toBe(String(count));
  rmSync(raw);
  rmSync(root);
}

function vhdx(name: string, blockSize: string): string {
  const out = join(dir, `${name}.vhdx`);
  convertImage(guestRaw, out, 'vhdx', ['subformat=dynamic', `block_size=${blockSize}`]);
  return out;
}

describe.skipIf(!kernel)(`end to end on ${kernel ?? 'the 6.12 kernel (run scripts/fetch-kernel.sh)'}: a dynamic VHDX on NTFS, rw, with the default initramfs`, { timeout: 900_000 }, () => {
  it.skipIf(!sparseCopySupported())('a sparse copy is filled through ntfs-3g (checked on the partition), expanded, mapped directly; the next boot reads what the first wrote', async () => {
    const image = vhdx('sparse', '1M');
    const host = hostDisk(dir, 'sparse', 'ntfs', {}, { extra: (img) => ntfsAddSparse(img, IMAGE, image) });
    const first = await boot(host, '', 'k612-sparse-1');
    expect(first.facts.facts.kernel).toMatch(/^6\.12\./);
    expect(first.facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(first.facts.facts.count).toBe('0');
    expect(first.t).toMatch(/filling \/VMs\/My Linux\.vhdx's holes in place: .* rewritten through ntfs-3g in whole units of 64 KiB/);
    expect(first.t).toMatch(/checked \d+ filled units? on \/dev\/vda1: each holds what was written through the driver/);
    expect(first.t).toMatch(/expanding \/VMs\/My Linux\.vhdx in place/);
    expect(first.t).toMatch(/vdisk0: \/VMs\/My Linux\.vhdx on .*vhdx dynamic, direct: the image is fully mappable/);
    const second = await boot(host, '', 'k612-sparse-2');
    expect(second.facts.facts.count).toBe('1');
    expect(second.t).not.toMatch(/filling/);
    expect(second.t).toMatch(/vhdx dynamic, direct/);
    expectKept(host, 'sparse', 2);
  });

  it('a whole copy is expanded through ntfs3 (no FUSE daemon), mapped directly; the next boot reads what the first wrote', async () => {
    const image = vhdx('whole', '1M');
    const host = hostDisk(dir, 'whole', 'ntfs', { [IMAGE]: { hostFile: image } });
    const first = await boot(host, '', 'k612-whole-1');
    expect(first.facts.facts.count).toBe('0');
    expect(first.t).not.toMatch(/filling/);
    expect(first.t).toMatch(/mounted \/dev\/vda1 \(ntfs3, rw\) on \/run\/vdboot\/expand to expand \/VMs\/My Linux\.vhdx/);
    expect(first.t).toMatch(/vhdx dynamic, direct: the image is fully mappable/);
    const second = await boot(host, '', 'k612-whole-2');
    expect(second.facts.facts.count).toBe('1');
    expectKept(host, 'whole', 2);
  });

  it.skipIf(!sparseCopySupported())('a sparse copy with rd.vdisk.expand=0 takes the loop path written through ntfs-3g, not ntfs3; the next boot reads what the first wrote', async () => {
    const image = vhdx('loop', '8M');
    const host = hostDisk(dir, 'loop', 'ntfs', {}, { extra: (img) => ntfsAddSparse(img, IMAGE, image) });
    const first = await boot(host, 'rd.vdisk.expand=0', 'k612-loop-1');
    expect(first.facts.facts.count).toBe('0');
    expect(first.t).toMatch(/vhdx dynamic, loop: the direct path is not safe here/);
    expect(first.t).toMatch(/is sparse on \/dev\/vda1: written through ntfs-3g, not ntfs3/);
    expect(first.t).toMatch(/with ntfs-3g on \/run\/vdboot\/host/);
    const second = await boot(host, 'rd.vdisk.expand=0', 'k612-loop-2');
    expect(second.facts.facts.count).toBe('1');
    expectKept(host, 'loop', 2);
  });
});
