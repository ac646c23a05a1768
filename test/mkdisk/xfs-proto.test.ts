/**
 * The XFS prototype file vdboot writes for `mkdisk --fs xfs`, from trees listed by
 * listTree: what it says for each kind of entry, the sticky bits left for xfs_db, hard
 * links and sockets counted, and the names its tokens cannot hold refused by name. The
 * prototype files that are accepted are fed to mkfs.xfs itself, and xfs_db reads back what
 * it made.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listTree } from '../../mkdisk/tree-listing.ts';
import { makeXfs, xfsPrototype } from '../../mkdisk/fs-xfs.ts';
import { cleanupTmpDirs, makeTmpDir, run } from '../kit/oracle.ts';

let dir: string;

beforeAll(() => {
  dir = makeTmpDir();
});
afterAll(() => cleanupTmpDirs());

function tree(name: string, build: (root: string) => void): string {
  const root = path.join(dir, name);
  fs.mkdirSync(root);
  build(root);
  return root;
}

describe('xfsPrototype', () => {
  it('directories nest with $, files name their content, symlinks their target; setuid and setgid in the mode field, sticky left for xfs_db', async () => {
    const root = tree('plain', (r) => {
      fs.mkdirSync(path.join(r, 'tmp'));
      fs.chmodSync(path.join(r, 'tmp'), 0o1777);
      fs.mkdirSync(path.join(r, 'bin'));
      fs.writeFileSync(path.join(r, 'bin/su'), 'x');
      fs.chmodSync(path.join(r, 'bin/su'), 0o4755);
      fs.writeFileSync(path.join(r, 'bin/wall'), 'y');
      fs.chmodSync(path.join(r, 'bin/wall'), 0o2755);
      fs.symlinkSync('su', path.join(r, 'bin/sudo'));
      fs.writeFileSync(path.join(r, 'a:b'), 'colon inside a name is fine');
    });
    const proto = xfsPrototype(listTree(root), root, path.join(dir, 'plain-content'));
    const lines = proto.text.split('\n').map((l) => l.trim());
    expect(lines.slice(0, 3)).toEqual(['vdboot', '0 0', 'd--755 0 0']);
    expect(lines).toContain('tmp d--777 0 0');
    expect(lines).toContain('sudo l--777 0 0 su');
    expect(lines.find((l) => l.startsWith('su '))).toMatch(/^su -u-755 0 0 \S+plain-content\/\d+$/);
    expect(lines.find((l) => l.startsWith('wall '))).toMatch(/^wall --g755 0 0 /);
    expect(proto.modeFixes).toEqual([{ path: '/tmp', mode: 0o41777 }]);
    // the content links point at the source files
    const su = lines.find((l) => l.startsWith('su '))!.split(' ')[4]!;
    expect(fs.readFileSync(su, 'utf8')).toBe('x');
    // mkfs.xfs takes it; xfs_db reads back the modes, the sticky bit included
    const img = path.join(dir, 'plain.xfs');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 320 * 1024 * 1024);
    expect(makeXfs(img, proto, path.join(dir, 'plain.proto'), 'plain')).toEqual({ ok: true });
    const db = run('xfs_db', ['-r', '-c', 'path /tmp', '-c', 'print core.mode', '-c', 'path /bin/su', '-c', 'print core.mode', '-c', 'path /bin/wall', '-c', 'print core.mode', '-c', 'path /a:b', '-c', 'print core.size', img]).toString();
    expect(db).toContain('core.mode = 041777');
    expect(db).toContain('core.mode = 0104755');
    expect(db).toContain('core.mode = 0102755');
    expect(db).toContain(`core.size = ${'colon inside a name is fine'.length}`);
    fs.rmSync(img);
  });

  it('hard links are counted as copies, sockets as left out', async () => {
    const root = tree('links', (r) => {
      fs.writeFileSync(path.join(r, 'perl'), 'p');
      fs.linkSync(path.join(r, 'perl'), path.join(r, 'perl5.36'));
      fs.linkSync(path.join(r, 'perl'), path.join(r, 'perl5'));
    });
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(path.join(root, 'sock'), resolve));
    try {
      const proto = xfsPrototype(listTree(root), root, path.join(dir, 'links-content'));
      expect(proto.hardLinkCopies).toBe(2);
      expect(proto.socketsLeftOut).toBe(1);
      expect(proto.text).not.toContain('sock');
    } finally {
      server.close();
    }
  });

  it.each([
    ['a space in a name', (r: string) => fs.writeFileSync(path.join(r, 'My File'), ''), '"My File" (its name)'],
    ['a newline in a name', (r: string) => fs.writeFileSync(path.join(r, 'two\nlines'), ''), '(its name)'],
    ['a name starting with ":"', (r: string) => fs.writeFileSync(path.join(r, ':comment'), ''), '":comment" (its name)'],
    ['the name "$"', (r: string) => fs.writeFileSync(path.join(r, '$'), ''), '"$" (its name)'],
    ['a symlink target with a space', (r: string) => fs.symlinkSync('/mnt/My Disk', path.join(r, 'disk')), '"disk" (its link target "/mnt/My Disk")'],
  ])('refuses %s, naming it and the way out', (name, build, text) => {
    const root = tree(`bad-${name.replace(/\W+/g, '-')}`, build);
    expect(() => xfsPrototype(listTree(root), root, path.join(dir, 'bad-content'))).toThrow(text);
    expect(() => xfsPrototype(listTree(root), root, path.join(dir, 'bad-content'))).toThrow(/--fs ext4 or --fs btrfs/);
  });

  it('device nodes carry their numbers, under fakeroot as a tar archive would give them', () => {
    const root = tree('dev', () => {});
    const state = path.join(dir, 'dev.state');
    const r = spawnSync('fakeroot', ['-s', state, '--', 'sh', '-c', `mknod ${root}/null c 1 3 && mknod ${root}/vdx b 254 300 && mkfifo ${root}/fifo && chown 5:6 ${root}/fifo`]);
    expect(r.status).toBe(0);
    const lines = xfsPrototype(listTree(root, state), root, path.join(dir, 'dev-content')).text.split('\n').map((l) => l.trim());
    expect(lines).toContain('null c--644 0 0 1 3');
    expect(lines).toContain('vdx b--644 0 0 254 300');
    expect(lines.find((l) => l.startsWith('fifo '))).toMatch(/^fifo p--\d{3} 5 6$/);
  });
});
