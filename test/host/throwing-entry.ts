/**
 * An init bundle that fails the way a bug in the boot code would: an exception thrown
 * deep inside async code. host.test.ts checks that the host prints it with its stack
 * and that PID 1 then runs a rescue shell on the console.
 */
import * as native from 'sys';

function failDeliberately(step: string): never {
  throw new Error(`deliberate failure while ${step}`);
}

async function boot(): Promise<void> {
  native.print('THROWING-ENTRY started as pid ' + native.getpid());
  await Promise.resolve();
  failDeliberately('testing the rescue shell');
}

await boot();
