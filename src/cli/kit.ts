/** `vdboot kit`: boot files and entries for an image on a stick or partition (being built). */
import type { Command, CliIO } from './main.ts';

export const command: Command = {
  summary: 'write a kernel, a vdboot initramfs and boot entries next to an image',
  usage: 'vdboot kit --image PATH --root-dir DIR [--host SPEC] [--kernel VMLINUZ]',
  async run(_args: string[], io: CliIO): Promise<number> {
    io.stderr('vdboot kit: not built yet\n');
    return 1;
  },
};
