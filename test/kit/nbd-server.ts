/**
 * NBD servers for tests, on stdio: `nbdkit -s` with its standard input and output on two
 * FIFOs, so the synchronous protocol code reads and writes them with blocking calls (no
 * TCP socket at all). One server serves one connection. And servers for QEMU guests that
 * a test kills and restarts (killableNbdServer).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
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

/**
 * An NBD server for a QEMU guest that a test can take away: QEMU's user network
 * (restrict=on) forwards 10.0.2.100:10809 to a wrapper that runs `nbdkit -s` for each
 * connection. The wrapper notes each server's pid (so the test kills only servers it
 * started), serves the folder named in `work`/folder (changeable between connections),
 * and while the server is down closes every new connection at once. After dropAtFirstRead(),
 * the next connection completes its handshake and then loses its server at the first request
 * (nbdkit's sh plugin kills its own nbdkit), as a relay that dies mid-session does.
 */
export interface KillableNbd {
  /** QEMU arguments: the netdev and a virtio-net card */
  netArgs: string[];
  /** SIGKILLs the running servers (the one serving the guest's kernel among them) and refuses new connections; returns their pids */
  kill(): number[];
  /** new connections are served again, from `folder` if given */
  restart(folder?: string): void;
  /** how many connections the guest opened so far */
  connections(): number;
  /** the next connection gets through the handshake for an export of `size` bytes, then the server dies at the first request */
  dropAtFirstRead(size: number): void;
}

export function killableNbdServer(work: string, folder: string): KillableNbd {
  mkdirSync(work, { recursive: true });
  const script = join(work, 'serve.sh');
  writeFileSync(join(work, 'folder'), folder);
  writeFileSync(script, [
    '#!/bin/sh',
    `echo $$ >> ${shellQuote(join(work, 'pids'))}`,
    `[ -e ${shellQuote(join(work, 'down'))} ] && exit 0`,
    `if [ -e ${shellQuote(join(work, 'drop'))} ]; then rm -f ${shellQuote(join(work, 'drop'))}; exec nbdkit -s --log=null sh ${shellQuote(join(work, 'drop.sh'))}; fi`,
    `exec nbdkit -s --log=null file dir="$(cat ${shellQuote(join(work, 'folder'))})"`,
    '',
  ].join('\n'), { mode: 0o755 });
  const pids = (): number[] => (existsSync(join(work, 'pids')) ? readFileSync(join(work, 'pids'), 'utf8').split('\n').filter(Boolean).map(Number) : []);
  return {
    netArgs: ['-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:sh ${script.replace(/,/g, ',,')}`, '-device', 'virtio-net-pci,netdev=n0'],
    kill() {
      writeFileSync(join(work, 'down'), '');
      // the wrapper exec'd nbdkit under its own pid: only those still running are servers
      const running = pids().filter((pid) => {
        try { return readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('nbdkit'); } catch { return false; }
      });
      for (const pid of running) process.kill(pid, 'SIGKILL');
      return running;
    },
    restart(to) {
      if (to) writeFileSync(join(work, 'folder'), to);
      rmSync(join(work, 'down'), { force: true });
    },
    connections: () => pids().length,
    dropAtFirstRead(size) {
      // the sh plugin runs the script as nbdkit's child: SIGKILL to $PPID closes the client's connection
      writeFileSync(join(work, 'drop.sh'), ['#!/bin/sh', 'case "$1" in', `  get_size) echo ${size} ;;`, '  pread) kill -9 $PPID; exit 1 ;;', '  *) exit 2 ;;', 'esac', ''].join('\n'), { mode: 0o755 });
      writeFileSync(join(work, 'drop'), '');
    },
  };
}
