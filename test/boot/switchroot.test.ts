/**
 * Emptying the initramfs before the guest's init: every file, link and directory of the
 * initramfs goes, nothing on another filesystem mounted inside it is touched.
 */
import { describe, expect, it } from 'vitest';
import { ConsoleLog } from '../../src/boot/console.ts';
import { deleteInitramfs } from '../../src/boot/switchroot.ts';
import { FakeKernel } from '../../src/sys/fake.ts';

describe('deleteInitramfs', () => {
  it('removes files, applet links and directories, and stays out of a filesystem mounted inside', () => {
    const k = new FakeKernel({
      cmdline: '',
      disks: [],
      pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00' },
      initramfs: {
        init: { mode: 0o100755, content: 'elf' },
        'bin/busybox': { mode: 0o100755, content: 'elf' },
        'bin/sh': { symlink: 'busybox' },
        'sbin/switch_root': { symlink: '/bin/busybox' },
        'lib/modules/6.1/kernel/fs/ext4/ext4.ko': 'module',
        'etc/vdboot/manifest.json': '{}',
        'sys': { dir: true },
        'empty': { dir: true },
      },
    });
    k.mount('sysfs', '/sys', 'sysfs', 0, '');
    const before = k.readdir('/sys/bus/pci/devices');
    expect(before.length).toBe(1);
    deleteInitramfs(k, new ConsoleLog(k));
    // only the mount point is left (rmdir of a mount point fails: EBUSY), and what is mounted there is whole
    expect(k.readdir('/')).toEqual(['sys']);
    expect(k.readdir('/sys/bus/pci/devices')).toEqual(before);
    expect(k.lstat('/sys/bus/pci/devices/0000:00:04.0/modalias')).toBeDefined();
  });
});
