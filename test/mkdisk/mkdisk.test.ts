/**
 * `vdboot mkdisk` end to end on the host (no VM): a tar archive made without root (owners,
 * a setuid mode, a device node, links) and a directory become disks in every format, with
 * the asked partition table (sfdisk), filesystem and label (blkid), free space (dumpe2fs)
 * and owners (debugfs); content that does not fit --size is refused with a clear message.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { OUTPUT_FORMATS, type OutputFormat } from '../../src/formats/writers/index.ts';
import { parseSize } from '../../mkdisk/build.ts';
import { cleanupTmpDirs, expectSameBytes, makeTmpDir, qemuImg, readWholeImage, run } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

const MiB = 1024 * 1024;
const QEMU_FORMAT: Record<OutputFormat, string> = { raw: 'raw', vhd: 'vpc', 'vhd-fixed': 'vpc', vhdx: 'vhdx', vdi: 'vdi', vmdk: 'vmdk', qcow2: 'qcow2' };
const EXT: Record<OutputFormat, string> = { raw: 'img', vhd: 'vhd', 'vhd-fixed': 'vhd', vhdx: 'vhdx', vdi: 'vdi', vmdk: 'vmdk', qcow2: 'qcow2' };
const LINUX_ROOT_X86_64 = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';

let dir: string;
let tree: string;
let archive: string;

async function vdboot(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} };
  const code = await main(args, io);
  return { code, out, err };
}

function toRaw(image: string, format: OutputFormat): string {
  const out = `${image}.raw`;
  run('qemu-img', ['convert', '-f', QEMU_FORMAT[format], '-O', 'raw', image, out]);
  return out;
}

interface SfdiskTable { partitiontable: { label: string; partitions: { start: number; size: number; type: string; name?: string; uuid?: string }[] } }
function sfdisk(raw: string): SfdiskTable['partitiontable'] {
  return (JSON.parse(run('sfdisk', ['--json', raw]).toString()) as SfdiskTable).partitiontable;
}

function blkid(raw: string, offset: number): Record<string, string> {
  const text = run('blkid', ['-p', '-O', String(offset), '-o', 'export', raw]).toString();
  return Object.fromEntries(text.trim().split('\n').map((l) => { const i = l.indexOf('='); return [l.slice(0, i), l.slice(i + 1).replace(/\\(.)/g, '$1')]; }));
}

function e2(raw: string, offset: number): string {
  return `${raw}?offset=${offset}`;
}

function debugfs(raw: string, offset: number, request: string): string {
  return run('debugfs', ['-R', request, e2(raw, offset)]).toString();
}

function freeBytes(raw: string, offset: number): number {
  const text = run('dumpe2fs', ['-h', e2(raw, offset)]).toString();
  const free = Number(/^Free blocks:\s+(\d+)/m.exec(text)![1]);
  const bs = Number(/^Block size:\s+(\d+)/m.exec(text)![1]);
  return free * bs;
}

beforeAll(() => {
  dir = makeTmpDir();
  // The source tree, owned as a root filesystem is, made without root through fakeroot.
  tree = path.join(dir, 'tree');
  fs.mkdirSync(path.join(tree, 'etc'), { recursive: true });
  fs.mkdirSync(path.join(tree, 'home/user'), { recursive: true });
  fs.mkdirSync(path.join(tree, 'bin'), { recursive: true });
  fs.mkdirSync(path.join(tree, 'dev'), { recursive: true });
  fs.writeFileSync(path.join(tree, 'etc/hostname'), 'vdboot-test\n');
  fs.writeFileSync(path.join(tree, 'home/user/notes.txt'), 'the user owns this\n');
  fs.writeFileSync(path.join(tree, 'bin/tool'), Buffer.alloc(300 * 1024, 7));
  fs.symlinkSync('../etc/hostname', path.join(tree, 'bin/name-link'));
  fs.linkSync(path.join(tree, 'etc/hostname'), path.join(tree, 'etc/hostname.hard'));
  archive = path.join(dir, 'root.tar.gz');
  const script = [
    'set -e',
    `cd ${JSON.stringify(tree)}`,
    'chown -R 0:0 .',
    'chown -R 1234:99 home/user',
    'chmod 4755 bin/tool',
    'mknod dev/null c 1 3',
    `tar --numeric-owner -czf ${JSON.stringify(archive)} .`,
  ].join('\n');
  run('fakeroot', ['--', 'sh', '-c', script]);
}, 60_000);

afterAll(() => cleanupTmpDirs());

describe('vdboot mkdisk', () => {
  it('a tar.gz made without root becomes a GPT qcow2 disk with the label, the free space asked for, owners, modes, links and a device node', async () => {
    const out = path.join(dir, 'from-tar.qcow2');
    const r = await vdboot('mkdisk', archive, '-o', out, '--label', 'vdroot', '--size', '+100M', '-q');
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(qemuImg('check', out)).toMatch(/No errors were found/);
    const raw = toRaw(out, 'qcow2');
    const table = sfdisk(raw);
    expect(table.label).toBe('gpt');
    expect(table.partitions).toHaveLength(1);
    expect(table.partitions[0]!.type).toBe(LINUX_ROOT_X86_64);
    expect(table.partitions[0]!.start).toBe(2048);
    const offset = table.partitions[0]!.start * 512;
    const id = blkid(raw, offset);
    expect(id.TYPE).toBe('ext4');
    expect(id.LABEL).toBe('vdroot');
    expect(r.out).toContain(`UUID=${id.UUID}`);
    expect(r.out.toLowerCase()).toContain(`partuuid=${table.partitions[0]!.uuid!.toLowerCase()}`);
    expect(freeBytes(raw, offset)).toBeGreaterThanOrEqual(100 * MiB);

    const notes = debugfs(raw, offset, 'stat /home/user/notes.txt');
    expect(notes).toMatch(/User:\s+1234\s+Group:\s+99/);
    expect(debugfs(raw, offset, 'stat /etc/hostname')).toMatch(/User:\s+0\s+Group:\s+0/);
    expect(debugfs(raw, offset, 'stat /etc/hostname')).toMatch(/Links: 2/);
    expect(debugfs(raw, offset, 'stat /bin/tool')).toMatch(/Mode:\s+04755/);
    const dev = debugfs(raw, offset, 'stat /dev/null');
    expect(dev).toMatch(/Type: character special/);
    expect(dev).toMatch(/Device major\/minor number: 01:03/);
    expect(debugfs(raw, offset, 'stat /bin/name-link')).toMatch(/Fast link dest: "\.\.\/etc\/hostname"/);
    expect(debugfs(raw, offset, 'cat /etc/hostname')).toContain('vdboot-test');
  });

  it.each(OUTPUT_FORMATS)('a directory becomes an MBR ext3 disk of exactly --size in %s that qemu-img and vdboot read the same', async (format) => {
    const out = path.join(dir, `dir-${format}.${EXT[format]}`);
    const r = await vdboot('mkdisk', tree, '-o', out, '--format', format, '--partition', 'mbr', '--fs', 'ext3', '--size', '48M', '--label', 'MBR ROOT', '-q');
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    if (['vdi', 'vhdx', 'vmdk', 'qcow2'].includes(format)) expect(qemuImg('check', '-f', QEMU_FORMAT[format], out)).toMatch(/No errors were found/);
    const info = JSON.parse(qemuImg('info', '--output=json', '-f', QEMU_FORMAT[format], out)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(48 * MiB);
    const raw = toRaw(out, format);
    const img = openHostImage(out);
    try {
      expectSameBytes(readWholeImage(img), fs.readFileSync(raw), `${format}: vdboot vs qemu-img`);
    } finally {
      img.close();
    }
    const table = sfdisk(raw);
    expect(table.label).toBe('dos');
    expect(table.partitions.map((p) => p.type)).toEqual(['83']);
    const offset = table.partitions[0]!.start * 512;
    expect(offset + table.partitions[0]!.size * 512).toBe(48 * MiB);
    const id = blkid(raw, offset);
    expect(id.TYPE).toBe('ext3');
    expect(id.LABEL).toBe('MBR ROOT');
    expect(debugfs(raw, offset, 'cat /home/user/notes.txt')).toContain('the user owns this');
    fs.rmSync(raw);
  });

  it('--partition none: the whole disk is the ext2 filesystem, from a zstd tar archive', async () => {
    const zst = path.join(dir, 'root.tar.zst');
    run('sh', ['-c', `gzip -dc ${JSON.stringify(archive)} | zstd -q -o ${JSON.stringify(zst)}`]);
    const out = path.join(dir, 'whole.img');
    const r = await vdboot('mkdisk', zst, '-o', out, '--partition', 'none', '--fs', 'ext2', '-q');
    expect(r.code).toBe(0);
    const id = blkid(out, 0);
    expect(id.TYPE).toBe('ext2');
    const sb = run('dumpe2fs', ['-h', out]).toString();
    const blocks = Number(/^Block count:\s+(\d+)/m.exec(sb)![1]);
    expect(blocks * 4096).toBe(fs.statSync(out).size);
    expect(debugfs(out, 0, 'stat /home/user/notes.txt')).toMatch(/User:\s+1234\s+Group:\s+99/);
  });

  it('content larger than --size is refused with the sizes and what to do', async () => {
    const big = path.join(dir, 'big');
    fs.mkdirSync(big);
    // Random bytes: nothing can make them smaller.
    fs.writeFileSync(path.join(big, 'blob'), Buffer.from(Array.from({ length: 24 * MiB }, (_, i) => (i * 2654435761) >>> 24)));
    const out = path.join(dir, 'small.vhdx');
    const r = await vdboot('mkdisk', big, '-o', out, '--size', '16M', '-q');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/does not fit a 16\.0 MiB disk/);
    expect(r.err).toMatch(/--size/);
    expect(fs.existsSync(out)).toBe(false);
  });

  // As root, mkdisk unpacks without fakeroot; this runs the unprivileged path for real.
  const canDropRoot = process.getuid?.() === 0 && fs.existsSync('/usr/bin/setpriv');
  it.skipIf(!canDropRoot)('as an unprivileged user (nobody), a tar archive keeps its owners and device nodes through fakeroot', () => {
    const shared = path.join(dir, 'nobody');
    fs.mkdirSync(shared);
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(shared, 0o777);
    fs.copyFileSync(archive, path.join(shared, 'root.tar.gz'));
    fs.chmodSync(path.join(shared, 'root.tar.gz'), 0o644);
    const entry = path.join(shared, 'cli.mts');
    fs.writeFileSync(entry, `import { runCli } from ${JSON.stringify(path.resolve('src/cli/node-entry.ts'))};\nprocess.exitCode = await runCli(process.argv.slice(2));\n`);
    const out = path.join(shared, 'out.img');
    run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--', 'env', `HOME=${shared}`, path.resolve('node_modules/.bin/tsx'), entry,
      'mkdisk', path.join(shared, 'root.tar.gz'), '-o', out, '--partition', 'none', '-q']);
    expect(fs.statSync(out).uid).toBe(65534);
    expect(debugfs(out, 0, 'stat /home/user/notes.txt')).toMatch(/User:\s+1234\s+Group:\s+99/);
    expect(debugfs(out, 0, 'stat /dev/null')).toMatch(/Device major\/minor number: 01:03/);
  });

  it('usage errors name the option', async () => {
    expect((await vdboot('mkdisk', tree, '-o', path.join(dir, 'x.img'), '--fs', 'zfs')).err).toMatch(/--fs zfs: vdboot mkdisk makes ext4, ext3, ext2, xfs, btrfs/);
    expect((await vdboot('mkdisk', tree)).err).toMatch(/-o OUT/);
    expect((await vdboot('mkdisk', tree, '-o', path.join(dir, 'x.img'), '--label', 'a label longer than 16')).err).toMatch(/16 bytes/);
    expect(() => parseSize('12Q')).toThrow(/--size 12Q/);
    expect(parseSize('+1.5G')).toEqual({ bytes: 1.5 * 1024 * MiB, free: true });
  });
});
