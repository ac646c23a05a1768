/**
 * Every BitLocker volume in test/data/bitlocker that Debian 12's cryptsetup (2.6.1) opens,
 * unlocked in vdboot's initramfs under QEMU with its password and its recovery password (the
 * first recovery password of the two-recovery volume); each opened device's SHA-256 is the one
 * images.conf records. Measured: 362 s for 31 opens (one boot, TCG, two busy cores). Left out, with cryptsetup 2.6.1's reason: the encrypt-on-write and
 * partially encrypted volumes ("cannot be activated" / "not supported"), the clear-key-only
 * volume ("partially decrypted"), and the password of the unicode volume (non-ASCII: no key
 * available; its recovery password is tested).
 */
import { describe, it } from 'vitest';
import { hasCryptsetup, unlockInInitramfs, useBitLockerVolumes } from '../kit/bitlocker.ts';

const suite = useBitLockerVolumes();

describe.skipIf(!hasCryptsetup())('full: every Windows-made BitLocker volume unlocked in vdboot\'s initramfs', { timeout: 3_600_000 }, () => {
  it('password and recovery password of each, SHA-256 as images.conf', async () => {
    const both = ['PW', 'RP'] as ('PW' | 'RP')[];
    await unlockInInitramfs({
      ...suite, name: 'bitlocker-volumes', first: 'bitlk-aes-xts-128',
      others: [
        ...['bitlk-aes-cbc-128', 'bitlk-aes-cbc-256', 'bitlk-aes-cbc-elephant-128', 'bitlk-aes-cbc-elephant-256', 'bitlk-aes-xts-256',
          'bitlk-aes-cbc-128-4k', 'bitlk-aes-xts-128-4k', 'bitlk-togo-aes-cbc-128', 'bitlk-togo-aes-xts-128', 'bitlk-aes-xts-128-new-entry',
          'bitlk-aes-xts-128-two-recovery', 'bitlk-aes-xts-128-first-recovery', 'bitlk-aes-xts-128-crc'].map((name) => ({ name, keys: both })),
        ...['bitlk-aes-xts-128-smart-card', 'bitlk-aes-xts-128-startup-key', 'bitlk-aes-xts-128-startup-key-win11', 'bitlk-aes-xts-128-unicode'].map((name) => ({ name, keys: ['RP'] as ('PW' | 'RP')[] })),
      ],
    });
  });
});
