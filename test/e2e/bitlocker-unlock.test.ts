/**
 * End to end: BitLocker volumes made by Windows (test/data/bitlocker), unlocked in vdboot's
 * own initramfs under QEMU by Debian's cryptsetup (test/kit/bitlocker.ts, unlockInInitramfs).
 *  1. root=vdisk:/dev/vda:/VMs/missing.vhdx on a BitLocker volume: the console asks for the
 *     key (echo off); a wrong one is refused with the try count, the recovery password opens
 *     it as /dev/mapper/bitlk-GUID, and vdboot's NTFS reader looks for the image inside. These
 *     test volumes are stripped (cryptsetup's test suite keeps only what its hash test needs,
 *     the rest of the encrypted volume is zeros), so the reader finds the MFT damaged and the
 *     boot stops in the rescue shell with that message, the BitLocker mapping still open; its
 *     SHA-256 is the one images.conf records.
 *  2. In that shell, the initramfs's cryptsetup opens an Elephant-diffuser volume with its
 *     password and a BitLocker To Go volume with its recovery password, SHA-256 as images.conf.
 * Every other volume, with both keys: test/full/bitlocker-volumes.full.ts. Not here: an image
 * booted from the NTFS inside a BitLocker volume — these volumes' NTFS is stripped, so an image
 * would first need a whole NTFS made inside the unlocked volume in a builder VM, keeping clear
 * of the FVE metadata areas (Windows' NTFS reserves them as files; a fresh mkntfs does not).
 * test/boot/bitlocker-simulation.test.ts covers that path with a stand-in for the decryption.
 */
import { describe, it } from 'vitest';
import { hasCryptsetup, unlockInInitramfs, useBitLockerVolumes } from '../kit/bitlocker.ts';

const suite = useBitLockerVolumes();

describe.skipIf(!hasCryptsetup())('end to end: BitLocker volumes unlocked in vdboot\'s initramfs', { timeout: 900_000 }, () => {
  it('the recovery password typed after a wrong key opens the host (echo off, try count), SHA-256 as images.conf; the initramfs\'s cryptsetup opens an Elephant volume by password and a To Go volume by recovery password', async () => {
    await unlockInInitramfs({
      ...suite, name: 'bitlocker-unlock', first: 'bitlk-aes-xts-128',
      others: [{ name: 'bitlk-aes-cbc-elephant-128', keys: ['PW'] }, { name: 'bitlk-togo-aes-xts-128', keys: ['RP'] }],
    });
  });
});
