/**
 * Runs on the build machine (not as PID 1) for native.test.ts: argument checks and
 * buffer handling of the `sys` module, and how the host ends a script. The mode is the
 * first argument; results are printed as one `NATIVE-RESULT {json}` line.
 */
import * as native from 'sys';
import { quickjsSys } from '../../src/sys/quickjs.ts';
import { O, SysError } from '../../src/sys/sys.ts';

const sys = quickjsSys(native);
const mode = sys.argv()[1];

function caught(f: () => unknown): string {
  try {
    f();
    return 'no exception';
  } catch (e) {
    return e instanceof SysError ? `SysError ${e.code} ${e.errno} ${e.call}` : `${(e as Error).name}: ${(e as Error).message}`;
  }
}

if (mode === 'checks') {
  const [r, w] = sys.pipe();
  const ab = new ArrayBuffer(16);
  native.write(w, new Uint8Array([1, 2, 3, 4, 5, 6]).subarray(1, 4));
  const intoView = native.read(r, new DataView(ab, 8, 4));
  native.write(w, new Uint8Array([7, 8]));
  const intoBuffer = native.read(r, ab);
  const result = {
    argv: sys.argv(),
    env: sys.env.filter((e) => e.startsWith('VDBOOT_')),
    intoView, intoBuffer, bytes: [...new Uint8Array(ab)],
    pathNotString: caught(() => sys.open(42 as unknown as string, O.RDONLY)),
    pathWithNul: caught(() => sys.open('/etc\0/passwd', O.RDONLY)),
    flagsNotNumber: caught(() => sys.open('/', '0' as unknown as number)),
    negativeOffset: caught(() => sys.pread(r, new Uint8Array(1), -1)),
    notBytes: caught(() => sys.read(r, 'abc' as unknown as Uint8Array)),
    badStdio: caught(() => sys.spawn('/bin/true', ['true'], [], { stdio: [0, 1] as unknown as [number, number, number] })),
    argvNotStrings: caught(() => sys.spawn('/bin/true', ['true', 3 as unknown as string], [])),
    badPoll: caught(() => sys.poll([{ fd: r } as unknown as { fd: number; events: number }], 0)),
    // never a real kernel: fd 9999 is not open, so nothing is loaded
    kexecCmdlineNotString: caught(() => sys.kexecFileLoad(9999, -1, 42 as unknown as string, 0)),
    utf8: [sys.utf8Decode(new Uint8Array([0x68, 0xc3, 0xa9, 0xff, 0x21, 0xf0, 0x9f, 0x98, 0x80])), sys.utf8Decode(new Uint8Array(0)), sys.utf8Decode(new Uint8Array([0x61, 0x62, 0x63, 0x64]).subarray(1, 3))],
    kexecBadFd: caught(() => sys.kexecFileLoad(9999, -1, 'console=ttyS0', 0)),
    enotdir: caught(() => sys.readdir('/etc/passwd')),
    ebadf: caught(() => sys.close(9999)),
    closedPipeRead: (sys.close(w), sys.read(r, new Uint8Array(4))),
    umask: [sys.umask(0o077), sys.umask(0o022)],
  };
  sys.print('NATIVE-RESULT ' + JSON.stringify(result));
} else if (mode === 'exit3') {
  sys.exit(3);
} else if (mode === 'throw') {
  function nested(): never {
    throw new TypeError('thrown by the native test');
  }
  nested();
} else if (mode === 'hang') {
  await new Promise(() => {});
} else if (mode === 'return') {
  // A rejection handled one tick later is not an unhandled rejection.
  const late = (async () => {
    throw new Error('handled later');
  })();
  await Promise.resolve();
  const message = await late.catch((e: Error) => e.message);
  sys.print('returned normally after ' + message);
}
