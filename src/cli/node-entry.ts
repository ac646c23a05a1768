/** The Node side of `vdboot`: wires the dispatcher to the process's streams. */
import { main, type CliIO } from './main.ts';

export async function runCli(argv: string[]): Promise<number> {
  // `vdboot cat IMAGE | head`: the reader going away is the end of the job, not an error.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  const io: CliIO = {
    stdout: (text) => void process.stdout.write(text),
    stderr: (text) => void process.stderr.write(text),
    stdoutBytes: (bytes) =>
      new Promise((resolve, reject) => {
        process.stdout.write(bytes, (err) => (err ? ((err as NodeJS.ErrnoException).code === 'EPIPE' ? process.exit(0) : reject(err)) : resolve()));
      }),
  };
  try {
    return await main(argv, io);
  } catch (e) {
    const err = e as Error;
    if (err && (err.name === 'FormatError' || err.name === 'SysError' || err.name === 'UsageError')) {
      io.stderr(`vdboot: ${err.message}\n`);
      return 1;
    }
    throw e;
  }
}
