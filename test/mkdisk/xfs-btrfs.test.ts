/**
 * `vdboot mkdisk --fs xfs` and `--fs btrfs` from a container-export-like tar archive made
 * without root (owners, setuid, sticky /tmp, device nodes, a fifo, a symlink, a hard link):
 * checked without mounting (xfs_db; btrfs check, dump-tree and restore) against the
 * source as GNU stat sees it under the archive's fakeroot state, then booted: vdboot's
 * initramfs loads the xfs or btrfs module, mounts the root partition by PARTUUID, and the
 * guest prints stat lines and checksums of its own files, compared with the same oracle.
 * Both boots run side by side; a name mkfs.xfs's prototype file cannot hold is refused.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { cleanupTmpDirs, makeTmpDir, run } from '../kit/oracle.ts';

/** The entries the checks look at: owners, modes and types the prototype file and --rootdir must keep. */
const CHECKED = [
  'etc/hostname', 'etc/hostname.hard', 'home/user', 'home/user/notes.txt', 'bin/tool', 'usr/sbin/grouptool',
  'tmp', 'nodes', 'nodes/null', 'nodes/vdx', 'nodes/fifo', 'bin/name-link',
];
const FILES = ['etc/hostname', 'etc/hostname.hard', 'home/user/notes.txt', 'bin/tool', 'usr/sbin/grouptool'];
const STAT_FORMAT = '%n|%u|%g|%a|%F|%t|%T|%h|%s';

let dir: string;
let archive: string;
let tree: string;
let initrd: string;
const disks: Record<'xfs' | 'btrfs', { image: string; fsFile: string; out: string; partUuid: string }> = {} as never;
const boots: Record<string, Promise<string>> = {};
const vms: Vm[] = [];

async function vdboot(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} };
  const code = await main(args, io);
  return { code, out, err };
}

/** The oracle: GNU stat on the source tree under the archive's fakeroot state, by relative path. */
function sourceStat(): Map<string, string[]> {
  const text = run('fakeroot', ['-i', path.join(dir, 'fakeroot.state'), '--', 'stat', '-c', STAT_FORMAT, ...CHECKED.map((p) => path.join(tree, p))]).toString();
  return new Map(text.trim().split('\n').map((l) => { const f = l.split('|'); return [path.relative(tree, f[0]!), f.slice(1)]; }));
}

function sha256(p: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');
}

/** The filesystem's bytes out of the raw disk (partition at 1 MiB): xfs_db and btrfs read files, not offsets. */
function extractFs(image: string, format: string, out: string, fsFile: string): { partUuid: string } {
  const raw = `${fsFile}.disk`;
  run('qemu-img', ['convert', '-f', format, '-O', 'raw', image, raw]);
  const table = JSON.parse(run('sfdisk', ['--json', raw]).toString()) as { partitiontable: { partitions: { start: number; size: number; uuid: string }[] } };
  const p = table.partitiontable.partitions[0]!;
  run('dd', [`if=${raw}`, `of=${fsFile}`, 'bs=512', `skip=${p.start}`, `count=${p.size}`, 'conv=sparse', 'status=none']);
  fs.rmSync(raw);
  expect(out.toLowerCase()).toContain(`partuuid=${p.uuid.toLowerCase()}`);
  return { partUuid: p.uuid.toLowerCase() };
}

beforeAll(async () => {
  dir = makeTmpDir();
  tree = path.join(dir, 'tree');
  const guestLines = [
    `for p in ${CHECKED.join(' ')}; do echo "VDBOOT-STAT $(stat -c '${STAT_FORMAT}' /$p)"; done`,
    `for p in ${FILES.join(' ')}; do echo "VDBOOT-SUM $(sha256sum /$p)"; done`,
    'echo "VDBOOT-LINK $(readlink /bin/name-link)"',
  ];
  buildGuestRoot(tree, { commands: guestLines, files: { 'etc/hostname': 'xfs-btrfs-guest\n', 'home/user/notes.txt': 'the user owns this\n' } });
  fs.mkdirSync(path.join(tree, 'home/user'), { recursive: true });
  fs.mkdirSync(path.join(tree, 'nodes'));
  fs.mkdirSync(path.join(tree, 'usr/sbin'), { recursive: true });
  fs.writeFileSync(path.join(tree, 'bin/tool'), crypto.randomBytes(300 * 1024));
  fs.writeFileSync(path.join(tree, 'usr/sbin/grouptool'), crypto.randomBytes(70 * 1000 + 3));
  fs.symlinkSync('../etc/hostname', path.join(tree, 'bin/name-link'));
  fs.linkSync(path.join(tree, 'etc/hostname'), path.join(tree, 'etc/hostname.hard'));
  archive = path.join(dir, 'export.tar.gz');
  // A docker-export-like archive: the owners and nodes exist only in the fakeroot state and the tarball.
  const script = [
    'set -e', `cd ${JSON.stringify(tree)}`,
    'chown -R 0:0 .', 'chown -R 1234:99 home/user', 'chmod 4755 bin/tool', 'chown 0:42 usr/sbin/grouptool', 'chmod 2711 usr/sbin/grouptool',
    'chmod 1777 tmp', 'mknod nodes/null c 1 3', 'mknod nodes/vdx b 254 300', 'mkfifo nodes/fifo', 'chmod 600 nodes/fifo',
    `tar --numeric-owner -czf ${JSON.stringify(archive)} .`,
  ].join('\n');
  run('fakeroot', ['-s', path.join(dir, 'fakeroot.state'), '--', 'sh', '-c', script]);

  initrd = path.join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  for (const [fsType, ext, qfmt] of [['xfs', 'vhdx', 'vhdx'], ['btrfs', 'qcow2', 'qcow2']] as const) {
    const image = path.join(dir, `root-${fsType}.${ext}`);
    const r = await vdboot('mkdisk', archive, '-o', image, '--fs', fsType, '--label', `root${fsType}`);
    expect(r.code, r.err).toBe(0);
    const fsFile = path.join(dir, `${fsType}.fs`);
    const { partUuid } = extractFs(image, qfmt, r.out, fsFile);
    disks[fsType] = { image, fsFile, out: r.out + r.err, partUuid };
    const vm = await bootVm({ initrd, append: `root=PARTUUID=${partUuid}`, disks: [{ file: image, format: qfmt, snapshot: true }], name: `mkdisk-${fsType}` });
    vms.push(vm);
    boots[fsType] = vm.waitFor(GUEST_MARKER, 300_000).then(() => vm.transcript());
    boots[fsType]!.catch(() => {}); // awaited in the tests
  }
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  cleanupTmpDirs();
});

function xfsDb(fsFile: string, ...cmds: string[]): string {
  return run('xfs_db', ['-r', ...cmds.flatMap((c) => ['-c', c]), fsFile]).toString();
}

describe('mkdisk --fs xfs (mkfs.xfs -p, no root, nothing mounted)', () => {
  it('owners, modes (setuid, setgid, sticky), symlink, device numbers and fifo as in the source; xfs_repair -n finds nothing', () => {
    const { fsFile } = disks.xfs;
    const src = sourceStat();
    run('xfs_repair', ['-n', fsFile]);
    for (const p of CHECKED) {
      const [uid, gid, mode, type, major, minor] = src.get(p)!;
      const typeBits = { 'regular file': 0o100000, 'regular empty file': 0o100000, directory: 0o040000, 'symbolic link': 0o120000, 'character special file': 0o020000, 'block special file': 0o060000, fifo: 0o010000 }[type!]!;
      const text = xfsDb(fsFile, `path /${p}`, 'print core.mode core.uid core.gid u3');
      expect(text, p).toContain(`core.mode = 0${(typeBits | parseInt(mode!, 8)).toString(8)}`);
      expect(text, p).toMatch(new RegExp(`core.uid = ${uid}\\b`));
      expect(text, p).toMatch(new RegExp(`core.gid = ${gid}\\b`));
      // XFS keeps a device as major << 18 | minor
      if (type!.includes('special')) expect(text, p).toContain(`u3.dev = 0x${((parseInt(major!, 16) << 18) | parseInt(minor!, 16)).toString(16)}`);
    }
    expect(xfsDb(fsFile, 'path /bin/name-link', 'print u3.symlink')).toContain('u3.symlink = "../etc/hostname"');
    expect(xfsDb(fsFile, 'sb 0', 'print fname')).toMatch(/fname = "rootxfs(\\000)*"/);
  });

  it('file content equals the source (read through the blocks xfs_db maps); the hard link became a copy, and the log says so', () => {
    const { fsFile, out } = disks.xfs;
    const sb = xfsDb(fsFile, 'sb 0', 'print agblocks blocksize');
    const agblocks = Number(/agblocks = (\d+)/.exec(sb)![1]);
    const blocksize = Number(/blocksize = (\d+)/.exec(sb)![1]);
    const fd = fs.openSync(fsFile, 'r');
    try {
      for (const p of FILES) {
        const size = Number(/core.size = (\d+)/.exec(xfsDb(fsFile, `path /${p}`, 'print core.size'))![1]);
        const data = Buffer.alloc(size);
        for (const m of xfsDb(fsFile, `path /${p}`, 'bmap').matchAll(/data offset (\d+) startblock \d+ \((\d+)\/(\d+)\) count (\d+)/g)) {
          const [fileBlock, ag, agBlock, count] = m.slice(1).map(Number) as [number, number, number, number];
          const chunk = Buffer.alloc(count * blocksize);
          fs.readSync(fd, chunk, 0, chunk.length, (ag * agblocks + agBlock) * blocksize);
          chunk.copy(data, fileBlock * blocksize, 0, Math.max(0, Math.min(chunk.length, size - fileBlock * blocksize)));
        }
        expect(crypto.createHash('sha256').update(data).digest('hex'), p).toBe(sha256(path.join(tree, p)));
      }
    } finally {
      fs.closeSync(fd);
    }
    expect(xfsDb(fsFile, 'path /etc/hostname', 'print core.nlinkv2')).toContain('core.nlinkv2 = 1');
    expect(out).toMatch(/xfs: 1 hard-linked names became copies/);
  });

  it('a name with a space is refused, naming it and the way out', async () => {
    const bad = path.join(dir, 'bad');
    fs.mkdirSync(path.join(bad, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(bad, 'etc/my file'), 'x');
    const r = await vdboot('mkdisk', bad, '-o', path.join(dir, 'bad.img'), '--fs', 'xfs', '-q');
    expect(r.code).toBe(1);
    expect(r.err).toContain('"etc/my file" (its name)');
    expect(r.err).toContain('--fs ext4 or --fs btrfs');
    expect(fs.existsSync(path.join(dir, 'bad.img'))).toBe(false);
  });
});

describe('mkdisk --fs btrfs (mkfs.btrfs --rootdir, no root, nothing mounted)', () => {
  it('btrfs check passes; owners, modes, the hard link (one inode, two links) and device numbers as in the source', () => {
    const { fsFile } = disks.btrfs;
    run('btrfs', ['check', '--readonly', fsFile]);
    const src = sourceStat();
    const dump = run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'fs', fsFile]).toString();
    // inode items by objectid, and names by their INODE_REF (objectid → name)
    const items = new Map<string, { mode: string; links: string; uid: string; gid: string; rdev: string }>();
    for (const m of dump.matchAll(/key \((\d+) INODE_ITEM 0\)[^\n]*\n[^\n]*\n\s+block group \d+ mode (\d+) links (\d+) uid (\d+) gid (\d+) rdev (\d+)/g)) {
      items.set(m[1]!, { mode: m[2]!, links: m[3]!, uid: m[4]!, gid: m[5]!, rdev: m[6]! });
    }
    // (parent objectid, name) → objectid, from each INODE_REF (key: ino INODE_REF parent)
    const refs = new Map<string, string>();
    for (const m of dump.matchAll(/key \((\d+) INODE_REF (\d+)\)[^\n]*\n((?:\s+index \d+ namelen \d+ name: [^\n]+\n)+)/g)) {
      for (const n of m[3]!.matchAll(/name: ([^\n]+)/g)) refs.set(`${m[2]}/${n[1]}`, m[1]!);
    }
    const objectid = (p: string): string => p.split('/').reduce((parent, name) => refs.get(`${parent}/${name}`)!, '256');
    const byName = new Map(CHECKED.map((p) => [p, objectid(p)]));
    for (const p of CHECKED) {
      const [uid, gid, mode, type, major, minor, links] = src.get(p)!;
      const item = items.get(byName.get(p)!)!;
      expect(item, p).toBeDefined();
      expect(item.uid, p).toBe(uid);
      expect(item.gid, p).toBe(gid);
      expect(parseInt(item.mode, 8) & 0o7777, p).toBe(parseInt(mode!, 8));
      if (type !== 'directory') expect(item.links, p).toBe(links);
      if (type!.includes('special')) {
        const maj = parseInt(major!, 16);
        const min = parseInt(minor!, 16);
        expect(BigInt(item.rdev), p).toBe((BigInt(maj) << 20n) | BigInt(min)); // the kernel's dev_t
      }
    }
    expect(byName.get('etc/hostname')).toBe(byName.get('etc/hostname.hard'));
  });

  it('btrfs restore reads every file equal to the source, and the symlink', () => {
    const out = path.join(dir, 'restored');
    fs.mkdirSync(out);
    run('btrfs', ['restore', '-S', disks.btrfs.fsFile, out]);
    for (const p of FILES) expect(sha256(path.join(out, p)), p).toBe(sha256(path.join(tree, p)));
    expect(fs.readlinkSync(path.join(out, 'bin/name-link'))).toBe('../etc/hostname');
  });
});

// As root, mkdisk unpacks without fakeroot; this runs the unprivileged path (tar, find, stat and mkfs.btrfs under fakeroot) for real.
const canDropRoot = process.getuid?.() === 0 && fs.existsSync('/usr/bin/setpriv');
describe.skipIf(!canDropRoot)('mkdisk --fs xfs|btrfs as an unprivileged user (nobody)', () => {
  it('the archive\'s owners, sticky bit and device numbers come through fakeroot into both filesystems', () => {
    const shared = path.join(dir, 'nobody');
    fs.mkdirSync(shared);
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(shared, 0o777);
    fs.copyFileSync(archive, path.join(shared, 'root.tar.gz'));
    fs.chmodSync(path.join(shared, 'root.tar.gz'), 0o644);
    const entry = path.join(shared, 'cli.mts');
    fs.writeFileSync(entry, `import { runCli } from ${JSON.stringify(path.resolve('src/cli/node-entry.ts'))};\nprocess.exitCode = await runCli(process.argv.slice(2));\n`);
    for (const fsType of ['xfs', 'btrfs']) {
      const out = path.join(shared, `${fsType}.img`);
      run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--', 'env', `HOME=${shared}`, path.resolve('node_modules/.bin/tsx'), entry,
        'mkdisk', path.join(shared, 'root.tar.gz'), '-o', out, '--partition', 'none', '--fs', fsType, '-q']);
      expect(fs.statSync(out).uid).toBe(65534);
    }
    const x = xfsDb(path.join(shared, 'xfs.img'), 'path /home/user/notes.txt', 'print core.uid core.gid', 'path /tmp', 'print core.mode', 'path /nodes/vdx', 'print core.mode u3');
    expect(x).toMatch(/core.uid = 1234\b[\s\S]*core.gid = 99\b/);
    expect(x).toContain('core.mode = 041777');
    expect(x).toContain(`u3.dev = 0x${((254 << 18) | 300).toString(16)}`);
    const dump = run('btrfs', ['inspect-internal', 'dump-tree', '-t', 'fs', path.join(shared, 'btrfs.img')]).toString();
    expect(dump).toMatch(/mode 60644 links 1 uid 0 gid 0 rdev 266338604\b/); // 254 << 20 | 300
    expect(dump).toMatch(/mode 20644 links 1 uid 0 gid 0 rdev 1048579\b/); // 1 << 20 | 3
    expect(dump).toMatch(/mode 100644 links 1 uid 1234 gid 99 /);
    expect(dump).toMatch(/mode 41777 /);
  });
});

describe('mkdisk --fs xfs|btrfs disks boot (vdboot loads the module, mounts the root by PARTUUID)', () => {
  it.each(['xfs', 'btrfs'] as const)('%s: the guest sees its files with the source\'s owners, modes, device numbers and content', async (fsType) => {
    const transcript = (await boots[fsType]!).replace(/\r/g, '');
    const facts = parseGuestFacts(transcript);
    expect(facts.root.fstype).toBe(fsType);
    expect(facts.root.device).toBe('/dev/vda1');
    const src = sourceStat();
    const seen = new Map([...transcript.matchAll(/^VDBOOT-STAT \/(\S[^|]*)\|(.*)$/gm)].map((m) => [m[1]!, m[2]!.split('|')]));
    for (const p of CHECKED) {
      const want = [...src.get(p)!];
      if (fsType === 'xfs' && p.startsWith('etc/hostname')) want[6] = '1'; // a copy, not a link, on xfs
      if (want[3] === 'directory' || want[3] === 'symbolic link') { want[6] = '-'; want[7] = '-'; } // directory link counts and sizes differ by filesystem
      const got = [...seen.get(p)!];
      if (got[3] === 'directory' || got[3] === 'symbolic link') { got[6] = '-'; got[7] = '-'; }
      expect(got, p).toEqual(want);
    }
    for (const p of FILES) expect(transcript, p).toMatch(new RegExp(`^VDBOOT-SUM ${sha256(path.join(tree, p))}  /${p}$`, 'm'));
    expect(transcript).toMatch(/^VDBOOT-LINK \.\.\/etc\/hostname$/m);
  }, 360_000);
});
