/**
 * `vdboot`: the host-side command. A thin dispatcher over commands that each export
 * `run(args, io)`; each command's logic lives in its own module.
 */
export interface CliIO {
  stdout(text: string): void;
  stderr(text: string): void;
  /** raw bytes to stdout (vdboot cat); resolves when written */
  stdoutBytes(bytes: Uint8Array): Promise<void>;
}

export interface Command {
  summary: string;
  usage: string;
  run(args: string[], io: CliIO): Promise<number>;
}

/** Every command, by name. Each entry imports its module lazily so `vdboot --help` stays fast. */
export const COMMANDS: Record<string, () => Promise<Command>> = {
  // one line per command, e.g.:
  // inspect: async () => (await import('./inspect.ts')).inspect,
  demo: async () => (await import('./demo.ts')).command,
  mkinitramfs: async () => (await import('./mkinitramfs.ts')).command,
  inspect: async () => (await import('./inspect.ts')).command,
  map: async () => (await import('./map.ts')).command,
  cat: async () => (await import('./cat.ts')).command,
  'vdisk-table': async () => (await import('./vdisk-table.ts')).command,
  plan: async () => (await import('./plan.ts')).command,
  hostfs: async () => (await import('./hostfs.ts')).command,
  mkdisk: async () => (await import('./mkdisk.ts')).command,
  kit: async () => (await import('./kit.ts')).command,
  netboot: async () => (await import('./netboot.ts')).command,
  attach: async () => (await import('./attach.ts')).attach,
  detach: async () => (await import('./attach.ts')).detach,
  list: async () => (await import('./attach.ts')).list,
};

export async function main(argv: string[], io: CliIO): Promise<number> {
  const [name, ...args] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    io.stdout('vdboot: boot Linux from a virtual disk image or a root archive\n\nCommands:\n');
    for (const [n, load] of Object.entries(COMMANDS)) {
      const c = await load();
      io.stdout(`  ${n.padEnd(12)} ${c.summary}\n`);
    }
    io.stdout('\nvdboot COMMAND --help shows a command\'s usage.\n');
    return 0;
  }
  const load = COMMANDS[name];
  if (!load) {
    io.stderr(`vdboot: unknown command "${name}"; run "vdboot --help" for the list.\n`);
    return 2;
  }
  const command = await load();
  if (args.includes('--help') || args.includes('-h')) {
    io.stdout(`${command.usage}\n`);
    return 0;
  }
  return command.run(args, io);
}
