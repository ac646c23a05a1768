/**
 * NBD servers for tests, on stdio: `nbdkit -s` with its standard input and output on two
 * FIFOs, so the synchronous protocol code reads and writes them with blocking calls (no
 * TCP socket at all). One server serves one connection.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { shellQuote } from '../../qemu/guest.ts';
import type { NbdTransport } from '../../src/formats/nbd.ts';

export interface StdioNbd {
  transport: NbdTransport;
  /** what the server wrote to its standard error */
  stderr(): string;
  close(): void;
}

/** Starts `nbdkit -s ARGS…` and connects to it (blocks until the server opened its ends). */
export function startStdioNbdkit(args: string[]): StdioNbd {
  const dir = mkdtempSync(join(tmpdir(), 'nbd-test-'));
  const toServer = join(dir, 'in');
  const fromServer = join(dir, 'out');
  const errFile = join(dir, 'err');
  execFileSync('mkfifo', [toServer, fromServer]);
  const quoted = args.map(shellQuote).join(' ');
  const child: ChildProcess = spawn('sh', ['-c', `exec nbdkit -s ${quoted} <'${toServer}' >'${fromServer}' 2>'${errFile}'`], { stdio: 'ignore' });
  const w = openSync(toServer, 'w');
  const r = openSync(fromServer, 'r');
  const transport: NbdTransport = {
    write(bytes) {
      for (let done = 0; done < bytes.length;) done += writeSync(w, bytes, done, bytes.length - done);
    },
    read(length) {
      const out = new Uint8Array(length);
      for (let done = 0; done < length;) {
        const n = readSync(r, out, done, length - done, null);
        if (n === 0) throw new Error(`the server closed the connection after ${done} of ${length} bytes`);
        done += n;
      }
      return out;
    },
  };
  const stderr = (): string => {
    try { return readFileSync(errFile, 'utf8'); } catch { return ''; }
  };
  return {
    transport,
    stderr,
    close() {
      try { closeSync(w); } catch { /* closed */ }
      try { closeSync(r); } catch { /* closed */ }
      child.kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
