/**
 * Self-test of the static host, run as PID 1 under QEMU by host.test.ts: exercises the
 * native `sys` module against the real kernel and prints one line
 * `SELFTEST-RESULT {json}` with what it observed; the test compares that with oracles
 * computed on the host. Then powers the machine off.
 */
import * as native from 'sys';
import { quickjsSys } from '../../src/sys/quickjs.ts';
import { AF, MS, NETLINK, NETLINK_ADD_MEMBERSHIP, O, POLLIN, REBOOT, S, SOCK, SOL_NETLINK, SysError } from '../../src/sys/sys.ts';
import { attrU16, CTRL_ATTR, CTRL_CMD_GETFAMILY, GENL_ID_CTRL, mcastGroupId, packGenl, parseAttrs, parseMessages } from '../../src/formats/netlink.ts';

const sys = quickjsSys(native);
const result: Record<string, unknown> = {};

/** Runs one check; a failure is recorded as its message instead of stopping the rest. */
function check(name: string, f: () => unknown): void {
  try {
    result[name] = f();
  } catch (e) {
    result[name] = { threw: String(e), stack: (e as Error).stack };
  }
}

function errorOf(f: () => unknown): unknown {
  try {
    f();
    return 'no exception';
  } catch (e) {
    const s = e as SysError;
    return { isSysError: e instanceof SysError, name: s.name, code: s.code, errno: s.errno, call: s.call };
  }
}

function readAll(fd: number): string {
  const buf = new Uint8Array(4096);
  let out = '';
  for (;;) {
    const n = sys.read(fd, buf);
    if (n === 0) return out;
    out += String.fromCharCode(...buf.subarray(0, n));
  }
}

result.pid = sys.getpid();
result.argv = sys.argv();

check('mounts', () => {
  sys.mount('proc', '/proc', 'proc', MS.NOSUID | MS.NODEV | MS.NOEXEC, '');
  sys.mount('sysfs', '/sys', 'sysfs', MS.NOSUID | MS.NODEV | MS.NOEXEC, '');
  sys.mount('devtmpfs', '/dev', 'devtmpfs', MS.NOSUID, 'mode=0755');
  return 'ok';
});
check('stdioOpen', () => [0, 1, 2].map((fd) => sys.readlink(`/proc/self/fd/${fd}`)));
check('exe', () => sys.readlink('/proc/self/exe'));
check('uname', () => sys.uname().release);
check('procStatfsType', () => sys.statfs('/proc').type);
check('rootEntries', () => sys.readdir('/').sort());
check('devNull', () => {
  const st = sys.stat('/dev/null');
  return { isChr: (st.mode & S.IFMT) === S.IFCHR, major: st.rdevMajor, minor: st.rdevMinor };
});
check('binShIsLink', () => (sys.lstat('/bin/sh').mode & S.IFMT) === S.IFLNK && sys.readlink('/bin/sh'));
check('enoent', () => errorOf(() => sys.open('/no/such/file', O.RDONLY)));
check('eexist', () => errorOf(() => sys.mkdir('/proc', 0o755)));
check('typeError', () => {
  try {
    sys.open(42 as unknown as string, 0);
    return 'no exception';
  } catch (e) {
    return (e as Error).name;
  }
});
check('tmpFile', () => {
  sys.mkdir('/tmp', 0o1777);
  sys.mount('tmpfs', '/tmp', 'tmpfs', 0, 'size=8m');
  const fd = sys.open('/tmp/f', O.RDWR | O.CREAT | O.TRUNC, 0o644);
  const data = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
  sys.pwrite(fd, data.subarray(2, 6), 100);
  const back = new Uint8Array(4);
  const n = sys.pread(fd, back, 100);
  sys.truncate(fd, 50);
  sys.fsync(fd);
  const size = sys.stat('/tmp/f').size;
  sys.close(fd);
  sys.symlink('f', '/tmp/l');
  sys.link('/tmp/f', '/tmp/h');
  sys.rename('/tmp/h', '/tmp/h2');
  sys.chmod('/tmp/f', 0o600);
  sys.lchown('/tmp/l', 12, 34);
  sys.mknod('/tmp/zero', S.IFCHR | 0o666, 1, 5);
  const z = sys.open('/tmp/zero', O.RDONLY);
  const zb = new Uint8Array([9, 9]);
  sys.read(z, zb);
  sys.close(z);
  const st = sys.stat('/tmp/f');
  const l = sys.lstat('/tmp/l');
  sys.unlink('/tmp/l');
  sys.mkdir('/tmp/d', 0o755);
  sys.rmdir('/tmp/d');
  return {
    n, back: [...back], size, mode: st.mode & 0o7777, nlink: st.nlink, link: [l.uid, l.gid],
    zero: [...zb], entries: sys.readdir('/tmp').sort(),
  };
});
check('spawnEcho', () => {
  const [r, w] = sys.pipe();
  const pid = sys.spawn('/bin/busybox', ['echo', 'hello from', 'busybox'], [], { stdio: [0, w, 2] });
  sys.close(w);
  const out = readAll(r);
  sys.close(r);
  const st = sys.waitpid(pid, 0);
  return { out, exitCode: st.exitCode, samePid: st.pid === pid };
});
check('memfd', () => {
  // a program's stdout into a memfd, read back through a read-only reopen (how modules are decompressed for finit_module)
  const mem = sys.memfdCreate('selftest', 1 /* MFD_CLOEXEC */);
  const pid = sys.spawn('/bin/busybox', ['echo', 'into a memfd'], [], { stdio: [0, mem, 2] });
  const exitCode = sys.waitpid(pid, 0).exitCode;
  const link = sys.readlink(`/proc/self/fd/${mem}`);
  const ro = sys.open(`/proc/self/fd/${mem}`, O.RDONLY | O.CLOEXEC);
  sys.close(mem);
  const out = readAll(ro);
  sys.close(ro);
  return { exitCode, out, link, badName: errorOf(() => (native.memfdCreate as (n: unknown) => number)(42)) };
});
check('spawnExit7', () => sys.waitpid(sys.spawn('/bin/sh', ['sh', '-c', 'exit 7'], []), 0).exitCode);
check('spawnEnv', () => {
  const [r, w] = sys.pipe();
  const pid = sys.spawn('/bin/sh', ['sh', '-c', 'echo "$VDBOOT_X"; ls /proc/self/fd'], ['VDBOOT_X=42'], { stdio: [0, w, w], setsid: true });
  sys.close(w);
  const out = readAll(r);
  sys.waitpid(pid, 0);
  return out.split('\n').filter((x) => x);
});
check('spawnMissing', () => errorOf(() => sys.spawn('/no/such/program', ['x'], [])));
check('killed', () => {
  const pid = sys.spawn('/bin/busybox', ['sleep', '30'], []);
  const before = sys.waitpid(pid, 1);
  sys.kill(pid, 9);
  const after = sys.waitpid(pid, 0);
  return { runningPid: before.pid, signal: after.termSignal, exitCode: after.exitCode };
});
check('fork', () => {
  const pid = sys.fork();
  if (pid === 0) sys._exit(42);
  return sys.waitpid(pid, 0).exitCode;
});
check('echild', () => errorOf(() => sys.waitpid(-1, 0)));
check('pollPipe', () => {
  const [r, w] = sys.pipe();
  const empty = sys.poll([{ fd: r, events: POLLIN }], 20)[0];
  sys.write(w, new Uint8Array([65]));
  const ready = sys.poll([{ fd: r, events: POLLIN }], 1000)[0];
  sys.close(r);
  sys.close(w);
  return { empty, ready };
});
check('clocks', () => {
  const a = sys.monotonicMs();
  sys.sleepMs(30);
  const b = sys.monotonicMs();
  return { advanced: b > a, slept: b - a >= 30, uptimePositive: sys.uptimeSec() > 0 };
});

// Sockets: TCP connect with its errno, a generic netlink request answered by the kernel.
check('sockets', () => {
  const tcp = sys.socket(AF.INET, SOCK.STREAM, 0);
  const addr = new Uint8Array(16);
  new DataView(addr.buffer).setUint16(0, AF.INET, true);
  new DataView(addr.buffer).setUint16(2, 9, false);
  addr.set([127, 0, 0, 1], 4);
  const connect = errorOf(() => sys.connect(tcp, addr, 2000));
  sys.close(tcp);
  const nl = sys.socket(AF.NETLINK, SOCK.RAW, NETLINK.GENERIC);
  sys.write(nl, packGenl(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, 1, [{ type: CTRL_ATTR.FAMILY_NAME, str: 'nlctrl' }]));
  const ready = sys.poll([{ fd: nl, events: POLLIN }], 2000)[0];
  const buf = new Uint8Array(65536);
  const n = sys.read(nl, buf);
  const reply = parseMessages(buf.subarray(0, n))[0]!;
  const attrs = parseAttrs(reply.payload.subarray(4));
  // nlctrl's own multicast group "notify", joined as the nbd reconnect daemon joins nbd's
  const notifyGroup = mcastGroupId(attrs, 'notify');
  const joined = errorOf(() => sys.setsockopt(nl, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, Uint8Array.of(notifyGroup ?? 0, 0, 0, 0)));
  sys.close(nl);
  const badFd = errorOf(() => sys.setsockopt(nl, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, Uint8Array.of(1, 0, 0, 0)));
  return { connect, ready, family: attrU16(attrs.get(CTRL_ATTR.FAMILY_ID)), notifyGroup, joined, badFd };
});

// Kernel modules, uevents and a real block device.
check('virtioDisk', () => {
  const sock = sys.ueventSocket();
  for (const name of ['virtio_ring', 'virtio', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci', 'virtio_blk']) {
    const fd = sys.open(`/modules/${name}.ko`, O.RDONLY | O.CLOEXEC);
    sys.finitModule(fd, '', 0);
    sys.close(fd);
  }
  const again = sys.open('/modules/virtio_blk.ko', O.RDONLY);
  const reload = errorOf(() => sys.finitModule(again, '', 0));
  sys.close(again);

  let uevent = '';
  const buf = new Uint8Array(64 * 1024);
  const deadline = sys.monotonicMs() + 20_000;
  while (!uevent && sys.monotonicMs() < deadline) {
    if (sys.poll([{ fd: sock, events: POLLIN }], 500)[0] === 0) continue;
    for (;;) {
      let n: number;
      try {
        n = sys.read(sock, buf);
      } catch (e) {
        if (e instanceof SysError && e.code === 'EAGAIN') break;
        throw e;
      }
      const fields = String.fromCharCode(...buf.subarray(0, n)).split('\0');
      if (fields.includes('ACTION=add') && fields.includes('DEVNAME=vda')) uevent = fields[0];
    }
  }
  const drained = errorOf(() => sys.read(sock, buf));
  sys.close(sock);

  while (sys.monotonicMs() < deadline) {
    try {
      sys.stat('/dev/vda');
      break;
    } catch {
      sys.sleepMs(50);
    }
  }
  const fd = sys.open('/dev/vda', O.RDONLY);
  const arg = new ArrayBuffer(8);
  const rc = sys.ioctl(fd, 0x80081272 /* BLKGETSIZE64 */, arg);
  const size = new DataView(arg).getBigUint64(0, true).toString();
  // The same ioctl through a view that starts 8 bytes into its buffer.
  const whole = new Uint8Array(16);
  native.ioctl(fd, 0x80081272, whole.subarray(8));
  const viaView = new DataView(whole.buffer).getBigUint64(8, true).toString();
  const flush = sys.ioctlInt(fd, 0x1261 /* BLKFLSBUF */, 0);
  const marker = new Uint8Array(32);
  const got = sys.pread(fd, marker, 4.5 * 2 ** 30);
  sys.close(fd);
  return {
    uevent, reload, drained: (drained as { code?: string }).code, rc, size, viaView, flush, got,
    marker: String.fromCharCode(...marker).replace(/\0+$/, ''),
  };
});

native.print('SELFTEST-RESULT ' + JSON.stringify(result));
sys.sync();
// Let the serial line drain (about 0.15 s for this line at 115200 baud): the kernel's own
// "reboot: Power down" would otherwise land in the middle of it.
sys.sleepMs(1000);
sys.reboot(REBOOT.POWER_OFF);
