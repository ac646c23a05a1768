/**
 * `vdboot attach | detach | list`: vdiskload on a machine with Node. The work is done by
 * the same static binary as /init (build/init, shipped in the package), started as
 * `init vdiskload …`: one implementation, which needs only the kernel's device-mapper,
 * loop and (for --map nbd) qemu-nbd, never Node itself.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { repoRoot } from '../../mkinitramfs/build.ts';
import type { CliIO, Command } from './main.ts';

function runVdiskload(args: string[], io: CliIO): number {
  const init = path.join(repoRoot(), 'build', 'init');
  if (!existsSync(init)) {
    io.stderr(`vdboot: ${init} does not exist: build it first ("npm run build")\n`);
    return 1;
  }
  // stdio inherited: vdiskload speaks to the terminal itself (and qemu-nbd, when it runs)
  const r = spawnSync(init, ['vdiskload', ...args], { stdio: 'inherit' });
  if (r.error) {
    io.stderr(`vdboot: could not run ${init} (${r.error.message})\n`);
    return 1;
  }
  return r.status ?? 1;
}

export const attach: Command = {
  summary: 'attach an image as /dev/mapper/NAME and NAMEpN on this machine (vdiskload)',
  usage: [
    'vdboot attach [--ro|--snapshot] [--name NAME] [--map auto|direct|loop|nbd] IMAGE|DEF.vdisk.json',
    '  The same as vdiskload (the /init binary under that name): the image is planned as at',
    '  boot, through the mounted filesystem that holds it; direct only where its blocks are',
    '  held still (the file made immutable while attached), the loop path otherwise.',
  ].join('\n'),
  run: async (args, io) => runVdiskload(args, io),
};

export const detach: Command = {
  summary: 'take an attached image\'s devices down again (vdiskload -d)',
  usage: 'vdboot detach NAME|IMAGE',
  run: async (args, io) => runVdiskload(['-d', ...args], io),
};

export const list: Command = {
  summary: 'list the images vdboot attached, at boot and since (vdiskload -l)',
  usage: 'vdboot list [--json]',
  run: async (args, io) => runVdiskload(['-l', ...args], io),
};
