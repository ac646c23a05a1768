/**
 * `vdboot demo`: the whole path in one command. Builds vdboot's initramfs for the
 * installed kernel, a small root disk (a GPT disk whose ext4 partition holds busybox and
 * an init that prints what it sees), and boots both under QEMU with the console shown.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { summary, writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel } from '../../qemu/harness.ts';
import type { CliIO, Command } from './main.ts';

const usage = `vdboot demo [--keep] [--append 'KERNEL ARGS']

Builds vdboot's initramfs for the newest installed kernel and a small demo root disk,
then boots them under QEMU (KVM when it works, else software emulation) with the serial
console shown here. The demo guest prints what it found and powers off.

  --append ARGS   more kernel command line (e.g. 'rd.vdboot.debug' or 'rd.break=pre-mount')
  --keep          keep the work folder (initramfs, disk, console log) and print its path`;

export const command: Command = {
  summary: 'build an initramfs and a demo disk, boot them in QEMU, show the console',
  usage,
  async run(args: string[], io: CliIO): Promise<number> {
    let keep = false;
    let extra = '';
    for (let i = 0; i < args.length; i++) {
      if (args[i] === '--keep') keep = true;
      else if (args[i] === '--append' && args[i + 1] !== undefined) extra = args[++i]!;
      else {
        io.stderr(`vdboot demo: unknown argument "${args[i]}"\n${usage}\n`);
        return 2;
      }
    }
    const work = mkdtempSync(path.join(tmpdir(), 'vdboot-demo-'));
    try {
      const kernel = defaultKernel();
      const initrd = path.join(work, 'initrd.img');
      io.stdout(`vdboot demo: building the initramfs for ${kernel}\n`);
      io.stdout(`${summary(initrd, writeInitramfs(initrd, { kernel }))}\n`);

      io.stdout('vdboot demo: building a root disk (GPT, ext4 partition labelled "demo-root", made without mounting)\n');
      const rootDir = path.join(work, 'root');
      buildGuestRoot(rootDir, { kernelMessages: false });
      const fsImage = path.join(work, 'root.ext4');
      makeExt4(fsImage, { sizeMiB: 16, label: 'demo-root', fromDir: rootDir });
      const disk = path.join(work, 'disk.img');
      makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: fsImage, name: 'demo-root', type: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709' }] });

      const append = `root=LABEL=demo-root ${extra}`.trim();
      io.stdout(`vdboot demo: booting with "${append}" (console below)\n\n`);
      const vm = await bootVm({ initrd, append, disks: [{ file: disk }], name: 'demo', echo: true, logFile: path.join(work, 'console.log') });
      try {
        await vm.waitFor(GUEST_MARKER, 300_000);
        await vm.waitExit(60_000);
      } finally {
        if (!vm.exited) await vm.kill();
      }
      const facts = parseGuestFacts(vm.transcript());
      const reached = vm.lines().find((l) => /starting \S+ \(vdboot took/.test(l.text));
      io.stdout(`\nvdboot demo: the guest's init ran as PID ${facts.pid} at ${facts.uptime.toFixed(2)} s of uptime with root ${facts.root.device} (${facts.root.fstype}, ${facts.root.mode}) under ${vm.accel}.\n`);
      if (reached) io.stdout(`vdboot demo: ${reached.text.replace(/^vdboot: \[[^\]]*\] /, '')}\n`);
      if (keep) io.stdout(`vdboot demo: files kept in ${work}\n`);
      return 0;
    } finally {
      if (!keep) rmSync(work, { recursive: true, force: true });
    }
  },
};
