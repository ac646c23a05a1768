/**
 * `vdboot demo`: vdboot's headline in one command. Builds the initramfs `vdboot
 * mkinitramfs` makes with no flags for the installed kernel, a small Linux guest as a
 * dynamic VHDX at a path with spaces on an NTFS partition (as it would lie beside Windows),
 * boots it read-write under QEMU with the console shown — the image is expanded in place,
 * mapped directly, the guest writes a file and powers off through the shutdown hand-off —
 * and then proves it on the host with other tools: NTFS clean, `qemu-img check` passes, the
 * guest's file is in the image.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { summary, writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsRead } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel } from '../../qemu/harness.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { sliceReader } from '../../src/formats/partitions.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import type { CliIO, Command } from './main.ts';

/** Where the demo's image lies on its NTFS partition. */
export const DEMO_IMAGE = '/Users/Jörg/VMs/My Linux.vhdx';
const NOTE = 'written by the demo guest on its VHDX';

const usage = `vdboot demo [--keep] [--append 'KERNEL ARGS']

Builds vdboot's initramfs for the newest installed kernel (no flags, as a user gets it) and
a small Linux guest as a dynamic VHDX at "${DEMO_IMAGE}" on an NTFS partition labelled
Windows, boots it read-write under QEMU (KVM when it works, else software emulation) with
the serial console shown here, then checks the host afterwards: NTFS clean, qemu-img check,
the guest's file inside the image.

  --append ARGS   more kernel command line (e.g. 'rd.vdboot.debug' or 'rd.break=pre-mount')
  --keep          keep the work folder (initramfs, disks, console log) and print its path`;

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

      io.stdout(`vdboot demo: building a Linux guest (GPT, ext4 root) as a dynamic VHDX, put at "${DEMO_IMAGE}" on an NTFS partition labelled Windows (all made without mounting)\n`);
      const rootDir = path.join(work, 'root');
      buildGuestRoot(rootDir, { writeFile: { path: '/home/note.txt', content: NOTE }, then: { exec: '/run/initramfs/shutdown poweroff' } });
      const fsImage = path.join(work, 'root.ext4');
      makeExt4(fsImage, { sizeMiB: 24, label: 'demo-root', fromDir: rootDir });
      const guestRaw = path.join(work, 'guest.raw');
      makePartitionedDisk(guestRaw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImage, name: 'linux', type: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709' }] });
      const vhdx = path.join(work, 'guest.vhdx');
      convertImage(guestRaw, vhdx, 'vhdx', ['subformat=dynamic', 'block_size=1M']);
      const ntfs = path.join(work, 'windows.ntfs');
      makeNtfs(ntfs, { sizeMiB: 96, label: 'Windows', files: { [DEMO_IMAGE]: { hostFile: vhdx } } });
      const disk = path.join(work, 'disk.img');
      const [part] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, name: 'Basic data partition', type: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7' }] });
      rmSync(ntfs);

      const append = `root="vdisk:LABEL=Windows:${DEMO_IMAGE}" rw ${extra}`.trim();
      io.stdout(`vdboot demo: booting with '${append}' (console below)\n\n`);
      const vm = await bootVm({ initrd, append, disks: [{ file: disk }], name: 'demo', echo: true, logFile: path.join(work, 'console.log') });
      try {
        await vm.waitFor(GUEST_MARKER, 300_000);
        await vm.waitExit(120_000);
      } finally {
        if (!vm.exited) await vm.kill();
      }
      const facts = parseGuestFacts(vm.transcript());
      const reached = vm.lines().find((l) => /starting \S+ \(vdboot took/.test(l.text));
      io.stdout(`\nvdboot demo: the guest's init ran as PID ${facts.pid} at ${facts.uptime.toFixed(2)} s of uptime with root ${facts.root.device} (${facts.root.fstype}, ${facts.root.mode}) under ${vm.accel}.\n`);
      if (reached) io.stdout(`vdboot demo: ${reached.text.replace(/^vdboot: \[[^\]]*\] /, '')}\n`);

      // The proof, read on the host by other tools than the boot's.
      const after = path.join(work, 'windows-after.ntfs');
      writeFileSync(after, readFileSync(disk).subarray(part!.offset, part!.offset + part!.size));
      const checks: [string, boolean, string][] = [];
      const r = openFileReader(after);
      let blocker: string | null | undefined;
      try { blocker = openHostFs(sliceReader(r, 0, r.size, 'ntfs'))?.writeBlocker(); } finally { r.close(); }
      const fix = spawnSync('ntfsfix', ['-n', after], { encoding: 'utf8' });
      checks.push(['NTFS is clean (not dirty, not hibernated; ntfsfix -n)', blocker === null && fix.status === 0, blocker ?? fix.stdout.trim().split('\n').at(-1) ?? '']);
      const image = path.join(work, 'guest-after.vhdx');
      writeFileSync(image, ntfsRead(after, DEMO_IMAGE));
      const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', image], { encoding: 'utf8' });
      checks.push([`qemu-img check ${DEMO_IMAGE}`, check.status === 0, (check.stdout + check.stderr).trim().split('\n')[0] ?? '']);
      const rawAfter = path.join(work, 'guest-after.raw');
      execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', image, rawAfter]);
      const rootAfter = path.join(work, 'root-after.ext4');
      execFileSync('dd', [`if=${rawAfter}`, `of=${rootAfter}`, 'bs=1M', 'skip=3', 'status=none']);
      const note = spawnSync('debugfs', ['-R', 'cat /home/note.txt', rootAfter], { encoding: 'utf8' }).stdout;
      checks.push(['the guest\'s /home/note.txt is in the image', note === NOTE, JSON.stringify(note.slice(0, 80))]);
      io.stdout('\nvdboot demo: on the host afterwards:\n');
      for (const [what, ok, detail] of checks) io.stdout(`  ${ok ? 'ok  ' : 'FAIL'} ${what}${ok ? '' : `: ${detail}`}\n`);
      const failed = checks.filter((c) => !c[1]).length;
      if (failed) {
        io.stderr(`vdboot demo: ${failed} check${failed === 1 ? '' : 's'} failed; the console log is ${path.join(work, 'console.log')}${keep ? '' : ' (run again with --keep to keep it)'}\n`);
      }
      if (keep) io.stdout(`vdboot demo: files kept in ${work}\n`);
      return failed ? 1 : 0;
    } finally {
      if (!keep) rmSync(work, { recursive: true, force: true });
    }
  },
};
