/**
 * `vdboot netboot` for BIOS machines whose firmware speaks PXE: QEMU's PXE ROM loads the
 * pxelinux.0 that netboot copied into the output folder, PXELINUX reads ldlinux.c32 and
 * pxelinux.cfg/default from the same TFTP root, and boots the kernel with the entry's command
 * line into vdboot. (The iPXE script is booted in test/cli/netboot.test.ts.)
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { main } from '../../src/cli/main.ts';
import { bootVm, defaultKernel } from '../../qemu/harness.ts';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'netboot-pxelinux-'));
const PXELINUX = '/usr/lib/PXELINUX/pxelinux.0';
const LDLINUX = '/usr/lib/syslinux/modules/bios/ldlinux.c32';

afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

it.skipIf(!fs.existsSync(PXELINUX) || !fs.existsSync(LDLINUX))('PXELINUX netboots from the folder vdboot netboot wrote: pxelinux.0 and ldlinux.c32 copied, the entry\'s command line reaches vdboot', async () => {
  const image = path.join(work, 'fleet.vhdx');
  execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'subformat=dynamic', image, '64M']);
  const out = path.join(work, 'tftp');
  let stdout = '';
  let stderr = '';
  const code = await main(['netboot', '--image', image, '-o', out, '--server', '10.0.2.2', '--port', '10809', '--kernel', defaultKernel(), '--append', 'console=ttyS0,115200 panic=-1 rd.shell=0'],
    { stdout: (t) => { stdout += t; }, stderr: (t) => { stderr += t; }, stdoutBytes: async () => {} });
  expect(code, stderr).toBe(0);
  expect(Buffer.compare(fs.readFileSync(path.join(out, 'pxelinux.0')), fs.readFileSync(PXELINUX))).toBe(0);
  expect(Buffer.compare(fs.readFileSync(path.join(out, 'ldlinux.c32')), fs.readFileSync(LDLINUX))).toBe(0);
  expect(stdout).toContain('PXELINUX (BIOS clients): DHCP filename "pxelinux.0" (copied here');

  const vm = await bootVm({ name: 'netboot-pxelinux', netboot: { tftp: out, bootfile: 'pxelinux.0' }, accel: 'tcg', maxLifetimeMs: 10 * 60_000 });
  try {
    const kernelLine = await vm.waitFor(/Kernel command line: .*rd\.shell=0/, 8 * 60_000);
    expect(kernelLine).toContain('root=vdisk:nbd://10.0.2.2:10809/fleet.vhdx ip=dhcp console=ttyS0,115200');
    // PXELINUX passes the initrd it loaded with an initrd= word of its own
    expect(kernelLine).toMatch(/initrd=initrd\.img/);
    const first = await vm.waitFor(/^vdboot: \[[^\]]*\]/, 3 * 60_000);
    expect(first).toMatch(/^vdboot: \[[\d.\s]+\]/);
    expect(vm.transcript()).toMatch(/Run \/init as init process/);
  } finally {
    await vm.kill();
  }
}, 12 * 60_000);
