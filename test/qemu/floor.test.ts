// The benchmark's floor initramfs boots the guest the way the benchmark relies on: root as
// asked (ro here), init= honoured, init arguments passed, and the guest's own hand-off command.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { makeExt4 } from '../../qemu/disks.ts';
import { buildFloorInitramfs } from '../../qemu/floor-initramfs.ts';
import { buildGuestRoot, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion } from '../../qemu/harness.ts';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

it('the floor initramfs mounts root read-only when asked, runs init= with its arguments, and the guest hands off to a command', async () => {
  const root = path.join(dir, 'root');
  buildGuestRoot(root, { then: { exec: 'poweroff -f' } });
  // a second init, so init= is seen to be honoured
  fs.copyFileSync(path.join(root, 'sbin/init'), path.join(root, 'sbin/other-init'));
  fs.chmodSync(path.join(root, 'sbin/other-init'), 0o755);
  const rootImg = path.join(dir, 'root.ext4');
  makeExt4(rootImg, { sizeMiB: 24, fromDir: root });
  const initrd = path.join(dir, 'floor.img');
  buildFloorInitramfs(initrd, { kernelVersion: kernelVersion(defaultKernel()) });

  const vm = await bootVm({
    name: 'floor',
    initrd,
    append: 'root=/dev/vda ro init=/sbin/other-init -- x "y z"',
    disks: [{ file: rootImg, readonly: true }],
  });
  try {
    await vm.waitFor('VDBOOT-GUEST-OK', 90_000);
    const facts = parseGuestFacts(vm.transcript());
    expect(facts.argv0).toBe('/sbin/other-init');
    expect(facts.args).toEqual(['x', 'y z']);
    expect(facts.pid).toBe(1);
    expect(facts.root).toMatchObject({ device: '/dev/vda', fstype: 'ext4', mode: 'ro' });
    expect(await vm.waitExit(30_000)).toMatchObject({ code: 0, killed: false });
  } finally {
    await vm.kill();
  }
}, 200_000);
