/**
 * npm run test:full — resume= proven by a real hibernation, plain root. One GPT disk: the
 * test guest's ext4 root and a swap partition made by mkswap on this machine. Boot 1
 * (root=LABEL=… resume=UUID=<swap>): vdboot hands the swap to the kernel (no image there
 * yet); the guest mounts a tmpfs, writes a random token into it (state that lives only in
 * RAM), enables the swap and hibernates (`echo disk > /sys/power/state`, mode shutdown), so
 * QEMU powers off. Boot 2, the same command line on the same disk: vdboot hands the swap to
 * the kernel again, the kernel restores the image, and the guest's shell carries on after
 * its `echo disk`: it prints the token read back from the tmpfs, which must be boot 1's.
 * The kernel's own messages show the image read ("PM: hibernation: Read … kbytes") and restored.
 * The swap's first page is read on the host after each boot: S1SUSPEND after boot 1,
 * SWAPSPACE2 again after the restore, and bytes put in its first 1024 (mkswap's boot bits)
 * kept by both (the kernel rewrites that page read-modify-write).
 * Checked too: a third boot after the resume finds no image any more and starts the guest
 * afresh; and a copy of the disk as boot 1 left it, booted without resume=, starts the guest
 * afresh (the control: the restore is vdboot's doing, the kernel cannot resolve UUID=).
 *
 * The same inside a dynamic VHDX on NTFS (root=vdisk:, resume=UUID= of the swap partition in
 * the image): boot 1 expands the image, records its tables in the swap's boot bits
 * (resume-record.ts) and hibernates; boot 2 finds them equal and resumes. The image as boot 1
 * left it, copied onto another NTFS behind a filler file (so its extents differ), is not
 * resumed: the console says why, the guest starts afresh, and the record is cleared.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { HIBERNATE_COMMANDS, hibernateGuestDisk, hibernateInImage, ROOT_LABEL, swapPage } from '../kit/hibernate.ts';

const dir = mkdtempSync(join(tmpdir(), 'vdboot-hibernate-full-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

const kernels = [defaultKernel(), cachedKernel('6.12')].filter((k): k is string => k !== undefined);

for (const kernel of kernels) describe(`resume= with a real hibernation image (plain root) on ${kernelVersion(kernel)}`, { timeout: 1_200_000 }, () => {
  it('boot 1 hibernates with a token in a tmpfs; boot 2 with the same command line resumes: the token is still there', async () => {
    const sub = join(dir, kernelVersion(kernel));
    mkdirSync(sub, { recursive: true });
    const disk = join(sub, 'disk.img');
    const { parts, swapUuid } = hibernateGuestDisk(sub, disk, HIBERNATE_COMMANDS, 192);
    // the swap as the host's blkid sees it in the disk: the spec vdboot is given
    const found = execFileSync('blkid', ['-p', '-o', 'value', '-s', 'UUID', '--offset', String(parts[1]!.offset), disk], { encoding: 'utf8' }).trim();
    expect(found).toBe(swapUuid);
    // bytes in the swap's boot bits, to see whether hibernation and resume keep them
    const swapAt = parts[1]!.offset;
    const probe = Buffer.concat([Buffer.from('VDBOOT-PROBE'), randomBytes(64)]);
    const fd = openSync(disk, 'r+');
    writeSync(fd, probe, 0, probe.length, swapAt);
    closeSync(fd);
    expect(swapPage(disk, swapAt).sig).toBe('SWAPSPACE2');
    const initrd = join(sub, 'initrd.img');
    writeInitramfs(initrd, { kernel });
    const append = `root=LABEL=${ROOT_LABEL} rw resume=UUID=${swapUuid}`;

    const first = await bootVm({ kernel, initrd, append, disks: [{ file: disk }], name: `hibernate-${kernelVersion(kernel)}-1`, memoryMiB: 384 });
    vms.push(first);
    const tokenLine = await first.waitFor(/VDBOOT-GUEST token=[0-9a-f]{32}$/, 400_000);
    const token = tokenLine.replace(/^.*token=/, '');
    await first.waitFor('VDBOOT-GUEST hibernating', 60_000);
    const exit1 = await first.waitExit(600_000);
    const t1 = first.transcript();
    expect(exit1.killed, t1.slice(-3000)).toBe(false);
    expect(t1).toMatch(/handing \/dev\/vda2 \(\d+:\d+\) to the kernel/);
    expect(t1).toMatch(/resume=UUID=\S+: no hibernation image on \/dev\/vda2; booting normally/);
    expect(t1).toMatch(/VDBOOT-GUEST swaps=1/);
    expect(t1).not.toContain('hibernation-failed');
    expect(t1).toMatch(/PM: hibernation: hibernation entry/);
    expect(t1).toMatch(/PM: Image saving done|PM: hibernation: Wrote \d+ kbytes/);
    expect(t1).toMatch(/reboot: Power down/);
    expect(t1).not.toContain(GUEST_MARKER);

    // the image is on the swap vdboot named: its signature says so; the boot bits are kept
    const hibernated = swapPage(disk, swapAt);
    expect(hibernated.sig).toBe('S1SUSPEND');
    expect(hibernated.bootbits.subarray(0, probe.length).equals(probe)).toBe(true);
    // the disk as boot 1 left it, for the control below
    const control = join(sub, 'control.img');
    execFileSync('cp', ['--sparse=always', disk, control]);

    const second = await bootVm({ kernel, initrd, append, disks: [{ file: disk }], name: `hibernate-${kernelVersion(kernel)}-2`, memoryMiB: 384 });
    vms.push(second);
    await second.waitFor(GUEST_MARKER, 600_000);
    await second.waitExit(120_000);
    const t2 = second.transcript();
    process.stderr.write(`hibernate-resume: boot 2's kernel lines about the image:\n${t2.split('\n').filter((l) => /PM: /.test(l)).join('\n')}\n`);
    // vdboot handed the swap over, and the write did not return: no "booting normally"
    expect(t2).toMatch(/handing \/dev\/vda2 \(\d+:\d+\) to the kernel; a hibernation image there is restored now/);
    expect(t2).not.toMatch(/no hibernation image on/);
    expect(t2).not.toContain('mounted /dev/');
    // the kernel's own account: image found, read, restored
    expect(t2).toMatch(/PM: hibernation: resume from hibernation/);
    expect(t2).toMatch(/PM: Image loading done/);
    expect(t2).toMatch(/PM: hibernation: Read \d+ kbytes/);
    expect(t2).toMatch(/PM: hibernation: hibernation exit/);
    // in that order, and after vdboot's hand-over
    const order = [/handing \/dev\/vda2/, /PM: hibernation: resume from hibernation/, /PM: Image loading done/, /PM: hibernation: hibernation exit/, /VDBOOT-GUEST thawed/].map((re) => t2.search(re));
    expect(order).toEqual([...order].sort((a, b) => a - b));
    // the guest is boot 1's, carrying on after its echo disk: same token, no fresh start
    expect(t2).toContain('VDBOOT-GUEST thawed');
    expect(t2).toContain(`VDBOOT-GUEST after=${token}`);
    expect(t2).not.toMatch(/VDBOOT-GUEST uptime=/);
    expect(t2).not.toMatch(/VDBOOT-GUEST token=/);

    // the restore put the swap signature back, and kept the boot bits
    const restored = swapPage(disk, swapAt);
    expect(restored.sig).toBe('SWAPSPACE2');
    expect(restored.bootbits.subarray(0, probe.length).equals(probe)).toBe(true);

    // boot 3: the image was consumed (the swap signature is back), so the guest starts afresh
    const third = await bootVm({ kernel, initrd, append, disks: [{ file: disk }], name: `hibernate-${kernelVersion(kernel)}-3`, memoryMiB: 384 });
    vms.push(third);
    const fresh = (await third.waitFor(/VDBOOT-GUEST token=[0-9a-f]{32}$/, 400_000)).replace(/^.*token=/, '');
    await third.kill();
    const t3 = third.transcript();
    expect(t3).toMatch(/resume=UUID=\S+: no hibernation image on \/dev\/vda2; booting normally/);
    expect(t3).not.toMatch(/PM: hibernation: resume from hibernation/);
    expect(fresh).not.toBe(token);

    // control: the disk holding boot 1's image, booted without resume=: nothing restores it
    // (the kernel cannot resolve UUID= itself), so the guest starts afresh
    const bare = await bootVm({ kernel, initrd, append: `root=LABEL=${ROOT_LABEL} rw`, disks: [{ file: control }], name: `hibernate-${kernelVersion(kernel)}-control`, memoryMiB: 384 });
    vms.push(bare);
    const controlToken = (await bare.waitFor(/VDBOOT-GUEST token=[0-9a-f]{32}$/, 400_000)).replace(/^.*token=/, '');
    await bare.kill();
    const tc = bare.transcript();
    expect(tc).not.toMatch(/PM: hibernation: resume from hibernation/);
    expect(tc).not.toMatch(/handing \/dev\/vda2/);
    expect(controlToken).not.toBe(token);
    rmSync(control);
  });
});

// resume= inside an image: the default kernel's run is in npm test (test/e2e/hibernate-image.test.ts)
const k612 = cachedKernel('6.12');
if (k612) describe(`resume= inside a dynamic VHDX on NTFS with a real hibernation on ${kernelVersion(k612)}`, { timeout: 1_500_000 }, () => {
  it('boot 1 records the tables and hibernates; boot 2 resumes; the image moved on another NTFS is not resumed and its record is cleared', async () => {
    await hibernateInImage(k612, dir, vms);
  });
});
