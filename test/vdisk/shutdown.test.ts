/** The shutdown hand-off's pure parts: which mounts to take down in which order, the reboot command. */
import { describe, expect, it } from 'vitest';
import { mountsUnder, rebootCommand } from '../../src/boot/shutdown.ts';
import { REBOOT } from '../../src/sys/sys.ts';

describe('shutdown hand-off', () => {
  it('lists the mounts under /oldroot deepest first, unescaping /proc/mounts octal escapes', () => {
    const mounts = [
      'rootfs / rootfs rw 0 0',
      '/dev/mapper/vdisk0p2 /oldroot ext4 rw,relatime 0 0',
      'proc /oldroot/proc proc rw 0 0',
      'tmpfs /oldroot/run tmpfs rw 0 0',
      '/dev/mapper/vdhost /oldroot/run/vdboot/host ntfs3 ro 0 0',
      '/dev/sdb1 /oldroot/media/My\\040Stick vfat rw 0 0',
      'tmpfs /oldroots tmpfs rw 0 0',
      'tmpfs /run tmpfs rw 0 0',
    ].join('\n');
    expect(mountsUnder(mounts, '/oldroot')).toEqual([
      '/oldroot/run/vdboot/host', '/oldroot/media/My Stick', '/oldroot/proc', '/oldroot/run', '/oldroot',
    ]);
  });

  it('maps systemd\'s verbs to reboot(2) commands; unknown verbs power off', () => {
    expect(rebootCommand('reboot')).toBe(REBOOT.RESTART);
    expect(rebootCommand('kexec')).toBe(REBOOT.RESTART);
    expect(rebootCommand('halt')).toBe(REBOOT.HALT);
    expect(rebootCommand('poweroff')).toBe(REBOOT.POWER_OFF);
    expect(rebootCommand(undefined)).toBe(REBOOT.POWER_OFF);
  });
});
