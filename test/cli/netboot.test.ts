/**
 * `vdboot netboot` on real images made with qemu-img (a dynamic VHDX, a qcow2 with a backing
 * file): the files it writes (kernel, initramfs, iPXE/PXELINUX/GRUB entries, parsed back and
 * compared), then the nbdkit command it printed, run on 127.0.0.1, each export read back with
 * qemu-img and compared with the image files (the oracle); the curl variant against an HTTP
 * server on 127.0.0.1; the refusals; and one boot where QEMU netboots the iPXE script from
 * the output folder over TFTP (user network, restrict=on) into vdboot's init.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../../src/cli/main.ts';
import { parseNetbootArgs } from '../../src/cli/netboot.ts';
import { readCpio } from '../../src/formats/cpio.ts';
import { bootVm, defaultKernel } from '../../qemu/harness.ts';
import { rangeServer } from '../kit/http-range.ts';
import { imageArchives } from '../kit/initramfs-image.ts';

const run = promisify(execFile);
const hasNbdkit = spawnOk('nbdkit', ['--version']);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'netboot-test-'));
const children: ChildProcess[] = [];

function spawnOk(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

async function vdboot(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const code = await main(args, { stdout: (t) => { stdout += t; }, stderr: (t) => { stderr += t; }, stdoutBytes: async () => {} });
  return { code, stdout, stderr };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Splits a printed command line into words (plain words and single-quoted ones, as netboot prints them). */
function shellWords(line: string): string[] {
  return [...line.trim().matchAll(/'((?:[^']|'\\'')*)'|(\S+)/g)].map((m) => (m[1] !== undefined ? m[1].replace(/'\\''/g, "'") : m[2]!));
}

/** Starts a printed nbdkit command, bound to 127.0.0.1, in the foreground; resolves once it accepts connections. */
async function startNbdkit(argv: string[], port: number): Promise<ChildProcess> {
  expect(argv[0]).toBe('nbdkit');
  const child = spawn('nbdkit', ['--foreground', '-i', '127.0.0.1', ...argv.slice(1)], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (b: Buffer) => { err += b.toString(); });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1', () => { c.destroy(); resolve(true); });
      c.on('error', () => resolve(false));
    });
    if (up) return child;
    if (child.exitCode !== null) throw new Error(`nbdkit exited: ${err}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nbdkit did not listen on ${port}: ${err}`);
}

/** An export's bytes as an NBD client reads them (qemu-img, raw): the file, then zeros up to 512 bytes. */
async function expectExportIsFile(port: number, name: string, file: string): Promise<void> {
  const out = path.join(work, `read-${port}-${name}`);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd://127.0.0.1:${port}/${name}`, out]);
  const got = fs.readFileSync(out);
  const want = fs.readFileSync(file);
  expect(got.length, name).toBe(Math.ceil(want.length / 512) * 512);
  expect(Buffer.compare(got.subarray(0, want.length), want), `${name}: the export's bytes are the file's`).toBe(0);
  expect(got.subarray(want.length).every((b) => b === 0)).toBe(true);
  fs.rmSync(out);
}

/** The images of the tests, with data written at known places. */
function makeImages(dir: string): { vhdx: string; child: string; base: string } {
  fs.mkdirSync(dir, { recursive: true });
  const vhdx = path.join(dir, 'fleet.vhdx');
  const base = path.join(dir, 'base.qcow2');
  const child = path.join(dir, 'lab.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'subformat=dynamic', vhdx, '64M']);
  execFileSync('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0xa5 1M 3M', '-c', 'write -P 0x3c 40M 64k', vhdx], { stdio: 'ignore' });
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '32M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 2M', base], { stdio: 'ignore' });
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', child]);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 2M', child], { stdio: 'ignore' });
  return { vhdx, child, base };
}

const images = makeImages(path.join(work, 'images'));

afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  fs.rmSync(work, { recursive: true, force: true });
});

describe('vdboot netboot: arguments', () => {
  it('parses the options, with the defaults', () => {
    const o = parseNetbootArgs(['--image', 'a.vhdx', '--image=b.qcow2', '-o', 'out', '--server', '192.168.7.2', '--append', 'console=ttyS0,115200 quiet']);
    expect(o).toMatchObject({ images: ['a.vhdx', 'b.qcow2'], output: 'out', server: '192.168.7.2', port: 10809, append: ['console=ttyS0,115200', 'quiet'], force: false });
    expect(parseNetbootArgs(['--image', 'a', '-o', 'd', '--server', '[fd00::1]', '--port', '10810', '--force']).port).toBe(10810);
  });

  it.each([
    [[], /give at least one --image/],
    [['--image', 'a'], /give -o DIR/],
    [['--image', 'a', '-o', 'd', '--port', '0'], /--port 0: give a TCP port number from 1 to 65535/],
    [['--image', 'a', '-o', 'd', '--port', '70000'], /--port 70000/],
    [['--image', 'a', '-o', 'd', '--server', '300.1.1.1'], /not an IPv4 address/],
    [['--image', 'a', '-o', 'd', '--server', 'fd00::1'], /an IPv6 address goes in brackets \(\[fd00::1\]\)/],
    [['--image', 'a', '-o', 'd', '--server', 'bad host'], /give an IPv4 address, a host name, or \[IPv6\]/],
    [['--image', 'a', '-o', 'd', '--append', 'root=/dev/sda'], /writes root= and ip= itself/],
    [['--image', 'a', '-o', 'd', '--url', 'nope'], /--url nope: give the base URL/],
    [['--image', 'a', '-o', 'd', '--frobnicate'], /unknown argument "--frobnicate"/],
    [['--image'], /--image needs a value/],
  ])('%j is refused: %s', async (args, message) => {
    const r = await vdboot(['netboot', ...(args as string[])]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message as RegExp);
  });
});

describe('vdboot netboot on a dynamic VHDX and a qcow2 with a backing file', () => {
  let out: string;
  let port: number;
  let stdout: string;
  beforeAll(async () => {
    out = path.join(work, 'tftp');
    port = await freePort();
    const r = await vdboot(['netboot', '--image', images.vhdx, '--image', images.child, '-o', out, '--server', '127.0.0.1', '--port', String(port), '--kernel', defaultKernel()]);
    expect(r.code, r.stderr).toBe(0);
    stdout = r.stdout;
  }, 120_000);

  it('writes the kernel, a vdboot initramfs with network drivers and nbd, and the entries', () => {
    expect(Buffer.compare(fs.readFileSync(path.join(out, 'vmlinuz')), fs.readFileSync(defaultKernel()))).toBe(0);
    const cpio = imageArchives(fs.readFileSync(path.join(out, 'initrd.img'))).main;
    const entries = new Map(readCpio(new Uint8Array(cpio)).map((e) => [e.name, e]));
    expect(entries.has('init')).toBe(true);
    const manifest = JSON.parse(Buffer.from(entries.get('etc/vdboot/manifest.json')!.data).toString('utf8'));
    for (const m of ['nbd', 'virtio_net', 'e1000', 'e1000e', 'r8169']) expect(manifest.modules[m], m).toBeDefined();
    expect(fs.readdirSync(path.join(out, 'nbd-exports')).sort()).toEqual(['base.qcow2', 'fleet.vhdx', 'lab.qcow2']);
    // PXELINUX's own files, from Debian's pxelinux and syslinux-common (scripts/debian-packages.txt)
    expect(Buffer.compare(fs.readFileSync(path.join(out, 'pxelinux.0')), fs.readFileSync('/usr/lib/PXELINUX/pxelinux.0'))).toBe(0);
    expect(Buffer.compare(fs.readFileSync(path.join(out, 'ldlinux.c32')), fs.readFileSync('/usr/lib/syslinux/modules/bios/ldlinux.c32'))).toBe(0);
  });

  it('iPXE, PXELINUX and GRUB boot each image with the same command line: root=vdisk:nbd://SERVER:PORT/EXPORT ip=dhcp', () => {
    const want = (e: string) => `root=vdisk:nbd://127.0.0.1:${port}/${e} ip=dhcp`;
    const ipxe = fs.readFileSync(path.join(out, 'boot.ipxe'), 'utf8').split('\n');
    expect(ipxe[0]).toBe('#!ipxe');
    // the menu's items and their labels, each label's kernel line, initrd and boot
    const items = ipxe.filter((l) => l.startsWith('item ')).map((l) => l.split(' ')[1]);
    expect(items).toEqual(['img0', 'img1']);
    expect(ipxe.find((l) => l.startsWith('choose '))).toMatch(/--default img0/);
    const ipxeCmdlines = items.map((item) => {
      const at = ipxe.indexOf(`:${item}`);
      expect(at).toBeGreaterThan(0);
      const [kernel, initrd, boot] = ipxe.slice(at + 1, at + 4);
      expect(initrd).toBe('initrd initrd.img');
      expect(boot).toBe('boot');
      const words = kernel!.split(' ');
      expect(words.slice(0, 3)).toEqual(['kernel', 'vmlinuz', 'initrd=initrd.img']);
      return words.slice(3).join(' ');
    });
    expect(ipxeCmdlines).toEqual([want('fleet.vhdx'), want('lab.qcow2')]);

    const pxe = fs.readFileSync(path.join(out, 'pxelinux.cfg', 'default'), 'utf8').split('\n').map((l) => l.trim());
    expect(pxe).toContain('DEFAULT img0');
    const labels = pxe.flatMap((l, i) => (l.startsWith('LABEL ') ? [i] : []));
    expect(labels).toHaveLength(2);
    const pxeCmdlines = labels.map((i) => {
      const block = pxe.slice(i + 1, labels.find((j) => j > i) ?? pxe.length);
      expect(block).toContain('KERNEL vmlinuz');
      expect(block).toContain('INITRD initrd.img');
      return block.find((l) => l.startsWith('APPEND '))!.slice(7);
    });
    expect(pxeCmdlines).toEqual(ipxeCmdlines);

    const grub = fs.readFileSync(path.join(out, 'boot', 'grub', 'grub.cfg'), 'utf8');
    const menu = [...grub.matchAll(/menuentry '([^']+)' \{\n\tlinux \/vmlinuz ([^\n]*)\n\tinitrd \/initrd\.img\n\}/g)];
    expect(menu.map((m) => m[2])).toEqual(ipxeCmdlines);
    expect(menu[1]![1]).toMatch(/lab\.qcow2/);
    // GRUB's own parser reads the file (grub-script-check, from grub-common)
    execFileSync('grub-script-check', [path.join(out, 'boot', 'grub', 'grub.cfg')]);
  });

  it.skipIf(!hasNbdkit)('the printed nbdkit command serves every file of both chains by name, byte for byte; the exports rebuild the chain', async () => {
    const line = stdout.split('\n').find((l) => l.trim().startsWith('nbdkit ') && l.includes(' file '));
    expect(line, stdout).toBeDefined();
    const argv = shellWords(line!);
    expect(argv).toContain('--readonly');
    const server = await startNbdkit(argv, port);
    for (const [name, file] of [['fleet.vhdx', images.vhdx], ['lab.qcow2', images.child], ['base.qcow2', images.base]] as const) await expectExportIsFile(port, name, file);
    // the two exports of the qcow2 chain, copied side by side under their export names, are the chain
    const copy = path.join(work, 'rebuilt');
    fs.mkdirSync(copy);
    for (const name of ['lab.qcow2', 'base.qcow2']) await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd://127.0.0.1:${port}/${name}`, path.join(copy, name)]);
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(copy, 'lab.qcow2'), images.child]);
    // nothing else is served: not another file of the folder, not the default export
    fs.writeFileSync(path.join(path.dirname(images.vhdx), 'private.txt'), 'not for the network');
    await expect(run('qemu-img', ['info', `nbd://127.0.0.1:${port}/private.txt`])).rejects.toThrow(/export|not available/i);
    await expect(run('qemu-img', ['info', `nbd://127.0.0.1:${port}`])).rejects.toThrow();
    // read-only: a write is refused by the server
    await expect(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', `nbd://127.0.0.1:${port}/fleet.vhdx`])).rejects.toThrow();
    server.kill('SIGTERM');
  }, 120_000);

  it('--force rewrites the folder; without it a non-empty folder is refused', async () => {
    const again = await vdboot(['netboot', '--image', images.vhdx, '-o', out, '--server', '127.0.0.1', '--kernel', defaultKernel()]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/-o .* is not empty \(.*\): give an empty or new folder, or --force/);
    const forced = await vdboot(['netboot', '--image', images.vhdx, '-o', out, '--server', '127.0.0.1', '--kernel', defaultKernel(), '--force']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(fs.readdirSync(path.join(out, 'nbd-exports'))).toEqual(['fleet.vhdx']);
    expect(fs.readFileSync(path.join(out, 'boot.ipxe'), 'utf8')).not.toMatch(/lab\.qcow2|menu/);
    // a file of the person's own in nbd-exports/ is never deleted
    fs.writeFileSync(path.join(out, 'nbd-exports', 'notes.txt'), 'mine');
    const kept = await vdboot(['netboot', '--image', images.vhdx, '-o', out, '--server', '127.0.0.1', '--kernel', defaultKernel(), '--force']);
    expect(kept.code).toBe(1);
    expect(kept.stderr).toMatch(/notes\.txt is not a link vdboot netboot made/);
    expect(fs.readFileSync(path.join(out, 'nbd-exports', 'notes.txt'), 'utf8')).toBe('mine');
  }, 120_000);
});

describe('vdboot netboot refuses', () => {
  it('an image whose backing file lies outside its folder, naming it', async () => {
    const dir = path.join(work, 'outside', 'vms');
    fs.mkdirSync(dir, { recursive: true });
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(work, 'outside', 'base.qcow2'), '16M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', path.join(dir, 'top.qcow2')]);
    const r = await vdboot(['netboot', '--image', path.join(dir, 'top.qcow2'), '-o', path.join(work, 'o1'), '--server', '10.0.0.1', '--kernel', defaultKernel()]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/top\.qcow2.*names .*base\.qcow2, which lies outside that folder/);
    expect(fs.existsSync(path.join(work, 'o1'))).toBe(false);
  });

  it('two different files that would share an export name', async () => {
    const other = path.join(work, 'other');
    fs.mkdirSync(other);
    execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', path.join(other, 'fleet.vhdx'), '16M']);
    const r = await vdboot(['netboot', '--image', images.vhdx, '--image', path.join(other, 'fleet.vhdx'), '-o', path.join(work, 'o2'), '--server', '10.0.0.1', '--kernel', defaultKernel()]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/two different files would both be the export "fleet\.vhdx"/);
  });

  it('a file name that cannot be an export name on every command line', async () => {
    const spaced = path.join(work, 'My Linux.vhdx');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', spaced, '16M']);
    const r = await vdboot(['netboot', '--image', spaced, '-o', path.join(work, 'o3'), '--server', '10.0.0.1', '--kernel', defaultKernel()]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/the image is named "My Linux\.vhdx", which cannot be an NBD export name .*rename the file/);
  });

  it('a missing image, the same image twice, a missing kernel, an -o that is a file', async () => {
    const o = path.join(work, 'o4');
    expect((await vdboot(['netboot', '--image', path.join(work, 'nope.vhdx'), '-o', o, '--server', '10.0.0.1'])).stderr).toMatch(/--image .*nope\.vhdx: no such file/);
    expect((await vdboot(['netboot', '--image', images.vhdx, '--image', images.vhdx, '-o', o, '--server', '10.0.0.1'])).stderr).toMatch(/given twice/);
    const k = await vdboot(['netboot', '--image', images.vhdx, '-o', o, '--server', '10.0.0.1', '--kernel', '9.9.9-nope']);
    expect(k.code).toBe(1);
    expect(k.stderr).toMatch(/--kernel 9\.9\.9-nope: neither a file nor a release/);
    const file = path.join(work, 'a-file');
    fs.writeFileSync(file, '');
    expect((await vdboot(['netboot', '--image', images.vhdx, '-o', file, '--server', '10.0.0.1', '--kernel', defaultKernel()])).stderr).toMatch(/is a file, not a folder/);
    expect(fs.existsSync(o)).toBe(false);
  });

  it('--url for an image with a backing file (the curl plugin serves one URL per process)', async () => {
    const r = await vdboot(['netboot', '--image', images.child, '-o', path.join(work, 'o5'), '--server', '10.0.0.1', '--url', 'http://127.0.0.1:1/', '--kernel', defaultKernel()]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--url: lab\.qcow2 reads base\.qcow2 too.*flatten the image first/);
  });
});

describe.skipIf(!hasNbdkit)('vdboot netboot --url: images on an HTTP server, through nbdkit\'s curl plugin', () => {
  it('each image on its own port, its entries naming that port; each export reads back as the file', async () => {
    const web = path.join(work, 'web');
    fs.mkdirSync(web);
    fs.copyFileSync(images.vhdx, path.join(web, 'fleet.vhdx'));
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(web, 'kiosk.qcow2'), '8M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 1M', path.join(web, 'kiosk.qcow2')], { stdio: 'ignore' });
    const http = await rangeServer(web);
    try {
      const port = await freePort();
      const out = path.join(work, 'tftp-curl');
      const r = await vdboot(['netboot', '--image', path.join(web, 'fleet.vhdx'), '--image', path.join(web, 'kiosk.qcow2'), '-o', out, '--server', '127.0.0.1', '--port', String(port), '--url', `http://127.0.0.1:${http.port}/`, '--kernel', defaultKernel()]);
      expect(r.code, r.stderr).toBe(0);
      expect(fs.existsSync(path.join(out, 'nbd-exports'))).toBe(false);
      const lines = r.stdout.split('\n').filter((l) => l.trim().startsWith('nbdkit ') && l.includes(' curl ') && !l.includes('HOST/PATH'));
      expect(lines).toHaveLength(2);
      const pxe = fs.readFileSync(path.join(out, 'pxelinux.cfg', 'default'), 'utf8');
      expect(pxe).toContain(`APPEND root=vdisk:nbd://127.0.0.1:${port}/fleet.vhdx ip=dhcp`);
      expect(pxe).toContain(`APPEND root=vdisk:nbd://127.0.0.1:${port + 1}/kiosk.qcow2 ip=dhcp`);
      for (const [k, name] of ['fleet.vhdx', 'kiosk.qcow2'].entries()) {
        const argv = shellWords(lines[k]!);
        expect(argv).toContain(`url=http://127.0.0.1:${http.port}/${name}`);
        const server = await startNbdkit(argv, port + k);
        await expectExportIsFile(port + k, name, path.join(web, name));
        server.kill('SIGTERM');
      }
      expect(http.requests()).toBeGreaterThan(2);
    } finally {
      http.close();
    }
  }, 120_000);
});

describe('QEMU netboots the iPXE script from the output folder', () => {
  it('iPXE fetches boot.ipxe, the kernel and the initramfs over TFTP; the kernel runs vdboot with the NBD root on its command line', async () => {
    const out = path.join(work, 'tftp-boot');
    const r = await vdboot(['netboot', '--image', images.vhdx, '-o', out, '--server', '10.0.2.2', '--port', '10809', '--kernel', defaultKernel(), '--append', 'console=ttyS0,115200 panic=-1 rd.shell=0']);
    expect(r.code, r.stderr).toBe(0);
    const vm = await bootVm({ name: 'netboot-ipxe', netboot: { tftp: out, bootfile: 'boot.ipxe' }, accel: 'tcg', maxLifetimeMs: 8 * 60_000 });
    try {
      // iPXE's own console output goes to the screen, not the serial port: the kernel's line shows the script ran
      const kernelLine = await vm.waitFor(/Kernel command line: .*console=ttyS0,115200 panic=-1 rd\.shell=0$/, 6 * 60_000);
      expect(kernelLine).toContain('initrd=initrd.img root=vdisk:nbd://10.0.2.2:10809/fleet.vhdx ip=dhcp console=ttyS0,115200');
      // vdboot's init is PID 1 and reads that command line (the NBD root itself is the init's to reach)
      // (waited for up to the timestamp's closing bracket: a line still being printed matches a shorter pattern)
      const first = await vm.waitFor(/^vdboot: \[[^\]]*\]/, 3 * 60_000);
      expect(first).toMatch(/^vdboot: \[[\d.\s]+\]/);
      expect(vm.transcript()).toMatch(/Run \/init as init process/);
    } finally {
      await vm.kill();
    }
  }, 10 * 60_000);
});
