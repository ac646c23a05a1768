// NBD read benchmark (issue 12): sequential and random read inside one guest, side by side in
// the same run, of one dynamic VHDX (a guest root disk with a data file: every block of the
// read range allocated) served over NBD three ways:
//   raw     the same disk converted to raw, exported by nbdkit's file plugin (the ceiling)
//   server  the VHDX decoded server-side: qemu-nbd -f vhdx exporting raw
//   vdboot  the VHDX file's bytes exported by nbdkit, mapped client-side by vdboot
//           (root=vdisk:nbd://…: one device-mapper remap over the kernel's nbd device)
// The guest reaches the servers through QEMU's user network with restrict=on: each server
// listens on a Unix socket, and a guestfwd runs `nbdkit -s nbd socket=…` for each connection
// of the guest, a proxy on stdio to it: the same relay for every case, with no TCP of the
// host in between (a TCP relay without TCP_NODELAY, such as busybox nc, stalls every small
// request behind Nagle and delayed ACKs: ~17 random reads/s whatever the server). raw and server are attached in the guest by bench/nbd-probe.c
// (the handshake, then the socket handed to the kernel: no user space in the data path),
// which then reads every device with O_DIRECT, targets in turn, round by round; the sums of
// what each read must agree (the same virtual disk). Ratios: medians of paired rounds.
// Targets: vdboot >= 0.9x raw, >= 1.5x server.
// The vdboot case, and the boot time of 1, 2 and 4 clients starting at once from one server
// (uptime at the guest's init; target: the 4th client's <= 1.3x the 1st's), need
// root=vdisk:nbd:// in vdboot's init: until its planner accepts that, they print "not
// available" and raw/server are measured from a plain busybox initramfs with a local root.
// BENCH_NBD_SEQ_MIB (32), BENCH_NBD_RAND_OPS (500), BENCH_NBD_ROUNDS (3) size the work.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeInitramfs } from '../mkinitramfs/build.ts';
import { planBoot } from '../src/boot/plan.ts';
import { makeExt4, makePartitionedDisk } from '../qemu/disks.ts';
import { buildFloorInitramfs, FLOOR_MODULES } from '../qemu/floor-initramfs.ts';
import { buildGuestRoot, parseGuestFacts, GUEST_MARKER } from '../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion, probeAccel, type Accel } from '../qemu/harness.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const seqMiB = Math.max(1, Number(process.env.BENCH_NBD_SEQ_MIB ?? 32) || 32);
const randOps = Math.max(1, Number(process.env.BENCH_NBD_RAND_OPS ?? 500) || 500);
const rounds = Math.max(1, Number(process.env.BENCH_NBD_ROUNDS ?? 3) || 3);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-nbd-'));
const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';
const RAW_ADDR = '10.0.2.100';
const SERVER_ADDR = '10.0.2.101';
const NBD_PORT = 10809;
const servers: ChildProcess[] = [];

const keyValues = (line: string): Record<string, string> => Object.fromEntries([...line.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr ?? r.error}`);
}

/** Starts a server on the Unix socket `socket` and waits until it accepts connections. */
async function startServer(cmd: string, args: string[], socket: string): Promise<void> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  servers.push(child);
  let err = '';
  child.stderr!.on('data', (b: Buffer) => { err += b.toString(); });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const c = net.connect(socket, () => { c.destroy(); resolve(true); });
      c.on('error', () => resolve(false));
    });
    if (up) return;
    if (child.exitCode !== null) throw new Error(`${cmd} exited: ${err}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${cmd} did not listen on ${socket}: ${err}`);
}

/** vdboot's planner takes root=vdisk:nbd:// once the init can boot it. */
function vdbootNbdRoot(): string | undefined {
  try {
    planBoot(`root=vdisk:nbd://${RAW_ADDR}:${NBD_PORT}/disk.vhdx ip=dhcp`);
    return undefined;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/**
 * The user network: a guestfwd per server address runs an nbdkit proxy on stdio for each
 * connection, passing the export name the guest asks for on to the server's Unix socket.
 */
function netArgs(rawSocket: string, serverSocket: string): string[] {
  const relay = (socket: string) => `cmd:nbdkit -s --readonly nbd socket=${socket} dynamic-export=true`;
  return [
    '-netdev', `user,id=net0,restrict=on,guestfwd=tcp:${RAW_ADDR}:${NBD_PORT}-${relay(rawSocket)},guestfwd=tcp:${SERVER_ADDR}:${NBD_PORT}-${relay(serverSocket)}`,
    '-device', 'virtio-net-pci,netdev=net0',
  ];
}

interface Run { rounds: Map<string, Array<Record<string, number>>>; sums: Map<string, Set<string>> }

function parseProbe(t: string): Run {
  const error = t.split('\n').find((l) => l.includes('VDBOOT-NBD error='));
  if (error) throw new Error(error.slice(error.indexOf('error=')));
  const run: Run = { rounds: new Map(), sums: new Map() };
  for (const line of t.split('\n')) {
    if (!line.includes('VDBOOT-NBD target=')) continue;
    const kv = keyValues(line);
    const list = run.rounds.get(kv.target!) ?? [];
    list.push({ seq: Number(kv.seq_read_mibs), rand: Number(kv.rand_read_iops) });
    run.rounds.set(kv.target!, list);
    run.sums.set(`${kv.seq_sum}/${kv.rand_sum}`, new Set([...(run.sums.get(`${kv.seq_sum}/${kv.rand_sum}`) ?? []), kv.target!]));
  }
  if (run.sums.size > 1) throw new Error(`the targets read different bytes: ${[...run.sums.entries()].map(([s, ts]) => `${[...ts].join('+')}: ${s}`).join('; ')}`);
  return run;
}

async function bootAndProbe(name: string, accel: Accel, opts: { kernel: string; initrd: string; append: string; disk?: string; extra: string[] }): Promise<string> {
  const vm = await bootVm({ name, kernel: opts.kernel, initrd: opts.initrd, append: opts.append, disks: opts.disk ? [{ file: opts.disk, snapshot: true }] : [], extraArgs: opts.extra, accel, memoryMiB: 512 });
  try {
    await vm.waitFor(new RegExp(`${GUEST_MARKER}|starting the rescue shell|Kernel panic`), 3_600_000);
    const t = vm.transcript();
    if (!t.includes(GUEST_MARKER)) throw new Error(`${name}: the guest did not finish: ${(/ERROR: (.*)/.exec(t)?.[1] ?? t.slice(-600)).slice(0, 600)}`);
    return t;
  } finally {
    if (!vm.exited) await vm.kill();
  }
}

try {
  const kernel = defaultKernel();
  const release = kernelVersion(kernel);
  const accel = await probeAccel(kernel);
  console.log(`kernel ${release}, accel ${accel}, ${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  console.log(`work: ${rounds} round(s) of ${seqMiB} MiB sequential (1 MiB reads) and ${randOps} random 4 KiB reads, O_DIRECT, each target in turn`);

  // The guest root: busybox, nbd-probe, and a data file that allocates every block of the read range.
  const rootDir = path.join(work, 'root');
  const probe = `/bench/nbd-probe read ${seqMiB} ${randOps} ${rounds}`;
  buildGuestRoot(rootDir, {
    modules: { kernelVersion: release, names: ['virtio_net', 'nbd'] },
    commands: [
      'grep -q bench.boot-only /proc/cmdline && { echo VDBOOT-GUEST-OK; poweroff -f; }',
      'ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0 2>/dev/null',
      `/bench/nbd-probe attach ${RAW_ADDR} ${NBD_PORT} disk.raw /dev/nbd14`,
      `/bench/nbd-probe attach ${SERVER_ADDR} ${NBD_PORT} disk /dev/nbd15`,
      `if [ -b /dev/mapper/vdisk0 ]; then ${probe} vdboot=/dev/mapper/vdisk0 raw=/dev/nbd14 server=/dev/nbd15; else ${probe} raw=/dev/nbd14 server=/dev/nbd15; fi`,
    ],
  });
  fs.mkdirSync(path.join(rootDir, 'bench'), { recursive: true });
  const cc = spawnSync('musl-gcc', ['-static', '-O2', '-Wall', '-o', path.join(rootDir, 'bench/nbd-probe'), path.join(here, 'nbd-probe.c')], { encoding: 'utf8' });
  if (cc.error || cc.status !== 0) throw new Error(`Could not build bench/nbd-probe.c with musl-gcc (Debian package musl-tools): ${cc.stderr ?? cc.error}`);
  fs.writeFileSync(path.join(rootDir, 'data'), crypto.randomBytes((seqMiB + 8) * 1024 * 1024));
  const rootFs = path.join(work, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: seqMiB + 48, label: 'benchroot', fromDir: rootDir });
  const raw = path.join(work, 'disk.raw');
  makePartitionedDisk(raw, { table: 'gpt', partitions: [{ image: rootFs, type: ROOT_TYPE, name: 'linux' }] });
  fs.rmSync(rootFs);
  const exportsDir = path.join(work, 'exports');
  fs.mkdirSync(exportsDir);
  const vhdx = path.join(exportsDir, 'disk.vhdx');
  sh('qemu-img', ['convert', '-O', 'vhdx', '-o', 'subformat=dynamic,block_size=1M', raw, vhdx]);
  fs.symlinkSync(raw, path.join(exportsDir, 'disk.raw'));

  // The servers, as vdboot netboot prints them (nbdkit), and qemu-nbd decoding the VHDX.
  const rawSocket = path.join(work, 'nbdkit.sock');
  await startServer('nbdkit', ['--foreground', '--readonly', '--unix', rawSocket, '--filter=truncate', 'file', `dir=${exportsDir}`, 'round-up=512'], rawSocket);
  const serverSocket = path.join(work, 'qemu-nbd.sock');
  await startServer('qemu-nbd', ['--read-only', '--persistent', '--shared=8', '-f', 'vhdx', '-x', 'disk', '-k', serverSocket, vhdx], serverSocket);
  const userNet = netArgs(rawSocket, serverSocket);

  const unavailable = vdbootNbdRoot();
  let transcript: string;
  if (unavailable) {
    const floor = path.join(work, 'floor.img');
    buildFloorInitramfs(floor, { kernelVersion: release, modules: FLOOR_MODULES });
    transcript = await bootAndProbe('bench-nbd-floor', accel, { kernel, initrd: floor, append: 'root=/dev/vda1 rw', disk: raw, extra: userNet });
  } else {
    const initrd = path.join(work, 'vdboot.img');
    writeInitramfs(initrd, { kernel, without: ['ntfs-3g', 'cryptsetup'] });
    transcript = await bootAndProbe('bench-nbd-vdboot', accel, { kernel, initrd, append: `root=vdisk:nbd://${RAW_ADDR}:${NBD_PORT}/disk.vhdx ip=dhcp`, extra: userNet });
  }
  console.log(`guest root: ${parseGuestFacts(transcript).facts.root ?? '?'}`);
  const run = parseProbe(transcript);
  const targets = [...run.rounds.keys()];
  console.log(`\n${'measure'.padEnd(18)}${targets.map((x) => x.padStart(10)).join('')}   (best round)`);
  for (const [m, label] of [['seq', 'seq read MiB/s'], ['rand', 'rand read IOPS']] as const) {
    console.log(`${label.padEnd(18)}${targets.map((x) => Math.max(...run.rounds.get(x)!.map((r) => r[m]!)).toFixed(1).padStart(10)).join('')}`);
  }
  const ratio = (a: string, b: string, m: 'seq' | 'rand') => median(run.rounds.get(a)!.map((r, i) => r[m]! / run.rounds.get(b)![i]![m]!));
  console.log('');
  for (const m of ['seq', 'rand'] as const) {
    const what = m === 'seq' ? 'seq read' : 'rand read';
    console.log(`${what}: server-side decoding ${ratio('server', 'raw', m).toFixed(2)}x raw export`);
    if (run.rounds.has('vdboot')) {
      const vr = ratio('vdboot', 'raw', m);
      const vs = ratio('vdboot', 'server', m);
      console.log(`${what}: vdboot ${vr.toFixed(2)}x raw export (target 0.9x: ${vr >= 0.9 ? 'met' : 'NOT met'}), ${vs.toFixed(2)}x server-side decoding (target 1.5x: ${vs >= 1.5 ? 'met' : 'NOT met'})`);
    }
  }
  if (unavailable) console.log(`\nvdboot's client-side mapping (root=vdisk:nbd://): not available — vdboot's planner refuses it (${unavailable.slice(0, 160)}); raw and server were measured from a busybox initramfs with a local root`);

  // Boot time of 1, 2 and 4 clients starting at once from one server.
  if (unavailable) {
    console.log('boot time of 1, 2 and 4 simultaneous clients: not available (needs root=vdisk:nbd:// in vdboot\'s init)');
  } else {
    const initrd = path.join(work, 'vdboot.img');
    const firsts: number[] = [];
    for (const n of [1, 2, 4]) {
      const vms = await Promise.all(Array.from({ length: n }, (_, i) => bootVm({ name: `bench-nbd-boot${n}-${i}`, kernel, initrd, append: `root=vdisk:nbd://${RAW_ADDR}:${NBD_PORT}/disk.vhdx ip=dhcp bench.boot-only`, extraArgs: userNet, accel, memoryMiB: 512 })));
      const uptimes: number[] = [];
      try {
        for (const vm of vms) {
          await vm.waitFor(new RegExp(`${GUEST_MARKER}|starting the rescue shell`), 1_800_000);
          uptimes.push(parseGuestFacts(vm.transcript()).uptime);
        }
      } finally {
        for (const vm of vms) if (!vm.exited) await vm.kill();
      }
      uptimes.sort((a, b) => a - b);
      firsts.push(uptimes[0]!);
      console.log(`${n} client(s) at once: uptime at the guest's init ${uptimes.map((u) => `${u.toFixed(2)} s`).join(', ')}`);
      if (n === 4) {
        const r = uptimes[3]! / firsts[0]!;
        console.log(`the 4th of 4 clients: ${r.toFixed(2)}x the single client (target <= 1.3x: ${r <= 1.3 ? 'met' : 'NOT met'})`);
      }
    }
  }
} finally {
  for (const s of servers) if (s.exitCode === null) s.kill('SIGTERM');
  fs.rmSync(work, { recursive: true, force: true });
}
