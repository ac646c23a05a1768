/**
 * An init bundle that ends badly without throwing at the top: a forked child fails (it
 * must exit with status 1, not start a second rescue shell), a promise rejection nobody
 * handles, then the script simply returns. host.test.ts checks that PID 1 reports the
 * rejection and runs the rescue shell instead of exiting.
 */
import * as native from 'sys';

const pid = native.fork();
if (pid === 0) {
  throw new Error('failure inside a forked child');
}
native.print('FORKED-CHILD exit code ' + native.waitpid(pid, 0).exitCode);
void Promise.reject(new Error('a rejection nobody handles'));
native.print('RETURNING-ENTRY returns');
