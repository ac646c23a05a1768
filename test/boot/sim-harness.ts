/**
 * Runs the production init bundle (build/init.js) inside QuickJS (quickjs-emscripten)
 * against the fake kernel: the bundle's `import * as native from 'sys'` gets a module
 * whose functions forward to FakeKernel on the Node side, shaped like the static host's
 * native module (init/host.c), so the real adapter (src/sys/quickjs.ts) runs too.
 */
import { readFileSync } from 'node:fs';
import { getQuickJS, type QuickJSContext, type QuickJSHandle } from 'quickjs-emscripten';
import { FakeKernel, SimulationEnd, type FakeMachine } from '../../src/sys/fake.ts';

const BYTES_IN = new Set(['write', 'pwrite']);
const BYTES_OUT = new Set(['read', 'pread']);

/** The native `sys` module as seen inside QuickJS, forwarding to the host. */
const SHIM = `
const call = globalThis.__sysCall;
let factory = (code, errno, what) => Object.assign(new Error(what + ': ' + code), { name: 'SysError', code, errno, call: what });
function unwrap(json) {
  const r = JSON.parse(json);
  if (r.err) throw factory(r.err.code, r.err.errno, r.err.call);
  if (r.end) throw new Error('SimulationEnd: ' + r.end);
  return r.value;
}
const view = (b) => b instanceof ArrayBuffer ? new Uint8Array(b) : new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
export const args = unwrap(call('argv'));
export const env = [];
export function setErrorFactory(f) { factory = f; }
export function read(fd, buf) { const v = view(buf); const r = call('read', fd, v.length); if (typeof r === 'string') return unwrap(r); const b = new Uint8Array(r); v.set(b); return b.length; }
export function pread(fd, buf, off) { const v = view(buf); const r = call('pread', fd, v.length, off); if (typeof r === 'string') return unwrap(r); const b = new Uint8Array(r); v.set(b); return b.length; }
export function write(fd, buf) { return unwrap(call('write', fd, Array.from(view(buf)))); }
export function pwrite(fd, buf, off) { return unwrap(call('pwrite', fd, Array.from(view(buf)), off)); }
export function utf8Decode(b) { return unwrap(call('utf8Decode', Array.from(view(b)))); }
export function byteSum(b) { let s = 0; for (const x of view(b)) s += x; return s; }
export function lsetxattr(path, name, value) { return unwrap(call('lsetxattr', path, name, Array.from(view(value)))); }
${[
  'open', 'close', 'ioctlInt', 'fsync', 'truncate', 'stat', 'lstat', 'statfs', 'readdir', 'readlink', 'mkdir', 'rmdir', 'unlink',
  'symlink', 'link', 'rename', 'mknod', 'chmod', 'lchown', 'mount', 'umount2', 'chdir', 'chroot', 'pivotRoot', 'finitModule', 'memfdCreate', 'sendfile',
  'getpid', 'execve', 'spawn', 'waitpid', 'kill', 'exit', 'ueventSocket', 'poll', 'monotonicMs', 'uptimeSec', 'sleepMs', 'sync', 'reboot', 'kexecFileLoad',
  'umask', 'openat', 'openat2', 'mkdirat', 'unlinkat', 'fchmodat', 'mknodat', 'fchownat', 'symlinkat', 'linkat', 'fstatat', 'utimensatAt',
].map((n) => `export function ${n}(...a) { return unwrap(call('${n}', ...a)); }`).join('\n')}
export function ioctl(fd, req, arg) { const v = view(arg); const r = unwrap(call('ioctl', fd, req, Array.from(v))); v.set(r.buf); return r.ret; }
export function fork() { throw factory('ENOSYS', 38, 'fork'); }
export function _exit(c) { return unwrap(call('exit', c)); }
export function dup2() { throw factory('ENOSYS', 38, 'dup2'); }
export function pipe() { throw factory('ENOSYS', 38, 'pipe'); }
export function uname() { return { sysname: 'Linux', nodename: 'sim', release: 'sim', version: '', machine: 'x86_64' }; }
export function print(...a) { write(1, new Uint8Array(Array.from(a.join(' ') + '\\n', (c) => c.charCodeAt(0) & 255))); }
export const printErr = print;
`;

export interface SimResult {
  kernel: FakeKernel;
  /** why the simulation stopped: exec of the guest init, the rescue shell, … */
  end?: SimulationEnd;
  /** an exception that escaped the init bundle other than the simulation's end */
  escaped?: string;
}

/** `kernel`: go on with an existing simulated kernel (its state after an earlier run), e.g. for the shutdown hand-off. */
export async function runBundleInQuickJS(machine: FakeMachine, bundlePath = 'build/init.js', existing?: FakeKernel): Promise<SimResult> {
  const QuickJS = await getQuickJS();
  const runtime = QuickJS.newRuntime();
  runtime.setMemoryLimit(256 << 20);
  runtime.setMaxStackSize(4 << 20);
  runtime.setModuleLoader((name) => {
    if (name === 'sys') return SHIM;
    throw new Error(`the init bundle imports "${name}": only "sys" is external`);
  });
  const vm = runtime.newContext();
  const kernel = existing ?? new FakeKernel(machine);
  let end: SimulationEnd | undefined;
  const fn = vm.newFunction('__sysCall', (nameH: QuickJSHandle, ...argH: QuickJSHandle[]) => {
    const name = vm.getString(nameH);
    // After the exec (or the final shell) nothing more happens on this machine: every
    // later call fails, so whatever the init tries next leaves no trace.
    if (end) return vm.newString(JSON.stringify({ end: end.message }));
    const args = argH.map((h) => vm.dump(h) as unknown);
    try {
      if (BYTES_OUT.has(name)) {
        const buf = new Uint8Array(args[1] as number);
        const n = name === 'read' ? kernel.read(args[0] as number, buf) : kernel.pread(args[0] as number, buf, args[2] as number);
        return vm.newArrayBuffer(buf.slice(0, n).buffer);
      }
      if (BYTES_IN.has(name)) args[1] = Uint8Array.from(args[1] as number[]);
      if (name === 'lsetxattr') args[2] = Uint8Array.from(args[2] as number[]);
      // the host decodes in C, invalid sequences as U+FFFD: Node's decoder does the same
      if (name === 'utf8Decode') return vm.newString(JSON.stringify({ value: Buffer.from(args[0] as number[]).toString('utf8') }));
      if (name === 'ioctl') {
        // The struct goes in and comes back: the kernel writes its reply into it.
        const buf = Uint8Array.from(args[2] as number[]).buffer;
        const ret = kernel.ioctl(args[0] as number, args[1] as number, buf);
        return vm.newString(JSON.stringify({ value: { ret, buf: Array.from(new Uint8Array(buf)) } }));
      }
      const value = (kernel as unknown as Record<string, (...a: unknown[]) => unknown>)[name]!(...args);
      return vm.newString(JSON.stringify({ value: value === undefined ? null : value }));
    } catch (e) {
      if (e instanceof SimulationEnd) {
        end ??= e;
        return vm.newString(JSON.stringify({ end: e.message }));
      }
      const err = e as { name?: string; code?: string; errno?: number; call?: string; message?: string };
      if (err.name === 'SysError') return vm.newString(JSON.stringify({ err: { code: err.code, errno: err.errno, call: err.call } }));
      throw e;
    }
  });
  // Stops the VM soon after the end even if the init loops without calling the kernel.
  runtime.setInterruptHandler(() => end !== undefined);
  vm.setProp(vm.global, '__sysCall', fn);
  fn.dispose();
  let escaped: string | undefined;
  const result = vm.evalCode(readFileSync(bundlePath, 'utf8'), 'init.js', { type: 'module' });
  escaped = takeError(vm, result);
  const jobs = runtime.executePendingJobs();
  if (jobs.error) {
    escaped ??= String(vm.dump(jobs.error));
    jobs.error.dispose();
  }
  vm.dispose();
  runtime.dispose();
  // After the end, the interrupt or the end's own exception is how the VM stops: not an escape.
  if (escaped && end && (escaped.includes('SimulationEnd') || escaped.startsWith('interrupted'))) escaped = undefined;
  return { kernel, end, escaped };
}

function takeError(vm: QuickJSContext, result: ReturnType<QuickJSContext['evalCode']>): string | undefined {
  if (result.error) {
    const e = vm.dump(result.error) as { message?: string; stack?: string } | string;
    result.error.dispose();
    return typeof e === 'string' ? e : `${e.message}\n${e.stack ?? ''}`;
  }
  // A module evaluates to a promise: a rejection is the bundle's uncaught exception.
  const state = vm.getPromiseState(result.value);
  let out: string | undefined;
  if (state.type === 'rejected') {
    const e = vm.dump(state.error) as { message?: string; stack?: string } | string;
    state.error.dispose();
    out = typeof e === 'string' ? e : `${e.message}\n${e.stack ?? ''}`;
  } else if (state.type === 'fulfilled' && !state.notAPromise) {
    state.value.dispose();
  }
  result.value.dispose();
  return out;
}
