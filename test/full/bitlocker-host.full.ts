/**
 * A rw boot from the VHDX inside a Windows-made BitLocker volume (test/kit/bitlocker-host.ts,
 * the guest of test/e2e/bitlocker-unlock.test.ts), then the whole unlocked volume read back in
 * a second VM and checked on the build machine with tools other than vdboot's: the NTFS
 * (ntfsfix -n; neither dirty nor hibernated by vdboot's reader), the FVE metadata areas still
 * held by the reserved files only and reading as zeros, the VHDX (qemu-img check), the guest's
 * root inside it (e2fsck -fn) and the count it wrote.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { clusterOwners, ntfsRead } from '../../qemu/disks.ts';
import { GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm } from '../../qemu/harness.ts';
import { hasCryptsetup, useBitLockerVolumes } from '../kit/bitlocker.ts';
import { GUEST_HOST_VOLUME, GUEST_IMAGE_PATH, guestOnBitLockerHost, throughMapping } from '../kit/bitlocker-host.ts';
import { expectNtfsClean, hostDisk } from '../kit/host-disk.ts';
import { makeTmpDir } from '../kit/oracle.ts';
import { expectGuestKept } from '../kit/rw-check.ts';
import { execFileSync } from 'node:child_process';

const suite = useBitLockerVolumes();

describe.skipIf(!hasCryptsetup())('full: the BitLocker host after a rw boot, read back whole', { timeout: 1_800_000 }, () => {
  it('the NTFS inside is clean, the metadata areas untouched, the VHDX and its guest root clean with the count written', async () => {
    const host = await guestOnBitLockerHost(suite);
    const conf = suite.conf.get(GUEST_HOST_VOLUME)!;
    const dir = makeTmpDir();
    const volume = path.join(dir, 'bitlocker-host.img');
    fs.copyFileSync(host.volume, volume);
    // the recovery password in a key file this time (the e2e test types it and puts the password in one)
    const stick = hostDisk(dir, 'stick', 'vfat', { '/keys/recovery.txt': `${conf.RP}\n` }, { sizeMiB: 34 });
    const vm = await bootVm({
      initrd: suite.initrd, name: 'bitlocker-host-rw', append: `root=vdisk:/dev/vda:${GUEST_IMAGE_PATH} rw rd.vdisk.bitlocker.key=/keys/recovery.txt:LABEL=USB rd.timeout=30`,
      disks: [{ file: volume }, { file: stick.disk, snapshot: true }],
    });
    suite.vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 600_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    expect(facts.facts.count).toBe('0');
    expect(vm.transcript()).toContain(`removed /dev/mapper/bitlk-${conf.GUID}`);

    const unlocked = path.join(dir, 'unlocked.ntfs');
    await throughMapping({ initrd: suite.initrd, volume, key: conf.PW!, size: fs.statSync(volume).size, readBack: unlocked, name: 'bitlocker-host-read' });
    expect(execFileSync('ntfsfix', ['-n', unlocked], { encoding: 'utf8' })).toMatch(/processed successfully/);
    expectNtfsClean(unlocked);
    const fd = fs.openSync(unlocked, 'r');
    try {
      for (const s of host.zeroSegments) {
        const buf = Buffer.alloc(s.size);
        fs.readSync(fd, buf, 0, s.size, s.offset);
        expect(buf.every((b) => b === 0), `zero segment at ${s.offset}`).toBe(true);
        const owners = clusterOwners(unlocked, Math.floor(s.offset / 4096), Math.ceil((s.offset + s.size) / 4096) - Math.floor(s.offset / 4096));
        expect(owners.length).toBeGreaterThan(0);
        for (const o of owners) expect(host.reserved).toContain(o);
      }
    } finally {
      fs.closeSync(fd);
    }
    const vhdx = path.join(dir, 'guest-after.vhdx');
    fs.writeFileSync(vhdx, ntfsRead(unlocked, GUEST_IMAGE_PATH));
    expectGuestKept(dir, vhdx, 'vhdx', 1);
  });
});
