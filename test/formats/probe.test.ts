import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { countingFileReader } from '../kit/format.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { parsePartitionTable, sliceReader } from '../../src/formats/partitions.ts';
import { blkidTags, probeFilesystem } from '../../src/formats/probe.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const UUID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';

const fileReader = countingFileReader;

function has(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
}

function run(cmd: string, args: string[], input?: string): void {
  execFileSync(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], input });
}

function image(name: string, size: string): string {
  const f = path.join(dir, name);
  fs.rmSync(f, { force: true });
  execFileSync('truncate', ['-s', size, f]);
  return f;
}

/**
 * `blkid -p -d -o export` as a map, without DEVNAME and partition-table keys. `-d` prints values
 * as they are: without it blkid writes bytes ≥ 0x80 in cat -v's `M-X` notation, which cannot be told
 * apart from a literal "M-a" inside a random LVM UUID.
 */
function blkid(file: string, offset?: number): Record<string, string> {
  const args = ['-p', '-d', '-o', 'export', ...(offset !== undefined ? ['-O', String(offset)] : []), file];
  const res = spawnSync('blkid', args, { encoding: 'utf8' });
  const out: Record<string, string> = {};
  for (const line of res.stdout.trim().split('\n')) {
    const eq = line.indexOf('=');
    if (eq < 0) continue;
    const key = line.slice(0, eq);
    if (key === 'DEVNAME' || key.startsWith('PT')) continue;
    out[key] = line.slice(eq + 1);
  }
  return out;
}

/** Probes with vdboot and with blkid; every key blkid reports must match, and nothing more. */
function expectSameAsBlkid(file: string): Record<string, string> {
  const r = fileReader(file);
  const mine = probeFilesystem(r);
  const theirs = blkid(file);
  expect(theirs.TYPE, 'blkid recognizes the test image').toBeDefined();
  expect(mine).not.toBeNull();
  expect(blkidTags(mine!)).toEqual(theirs);
  // A few small reads, never a scan of the device.
  expect(r.bytesRead).toBeLessThan(512 * 1024);
  return theirs;
}

describe('probeFilesystem against blkid -p', () => {
  it.each(['ext2', 'ext3', 'ext4'])('%s (mke2fs -t with -L -U): type from feature flags, UUID, LABEL, VERSION, SEC_TYPE, BLOCK_SIZE', (t) => {
    const f = image(`${t}.img`, '8M');
    run('mke2fs', ['-q', '-F', '-t', t, '-L', `lab-${t}`, '-U', UUID, f]);
    const tags = expectSameAsBlkid(f);
    expect(tags.TYPE).toBe(t);
    expect(tags.UUID).toBe(UUID);
  });

  it('ext4 without a journal is ext4, not ext2; 4 KiB blocks; UTF-8 label', () => {
    const f = image('ext4-nojournal.img', '64M');
    run('mke2fs', ['-q', '-F', '-t', 'ext4', '-O', '^has_journal', '-b', '4096', '-L', 'wurzel-ü', f]);
    expect(expectSameAsBlkid(f).TYPE).toBe('ext4');
  });

  it('ext2 with only ext2 features but an ext3 journal added is ext3', () => {
    const f = image('ext2-j.img', '16M');
    run('mke2fs', ['-q', '-F', '-t', 'ext2', f]);
    run('tune2fs', ['-j', f]);
    expect(expectSameAsBlkid(f).TYPE).toBe('ext3');
  });

  it('an external ext journal device is jbd', () => {
    const f = image('jbd.img', '8M');
    run('mke2fs', ['-q', '-F', '-O', 'journal_dev', '-L', 'jnl', f]);
    expect(expectSameAsBlkid(f).TYPE).toBe('jbd');
  });

  it('xfs (mkfs.xfs -L -m uuid=)', () => {
    const f = image('xfs.img', '300M');
    run('mkfs.xfs', ['-q', '-L', 'xfslab', '-m', `uuid=${UUID}`, f]);
    expect(expectSameAsBlkid(f).UUID).toBe(UUID);
  });

  it('btrfs (mkfs.btrfs -L -U): UUID and UUID_SUB', () => {
    const f = image('btrfs.img', '120M');
    run('mkfs.btrfs', ['-q', '-L', 'btrfs label', '-U', UUID, f]);
    const tags = expectSameAsBlkid(f);
    expect(tags.UUID_SUB).toMatch(/^[0-9a-f-]{36}$/);
  });

  it.each([12, 16, 32])('vfat FAT%i (mkfs.vfat -n -i): VERSION, volume id as XXXX-XXXX, label', (bits) => {
    const f = image(`vfat${bits}.img`, '40M');
    run('mkfs.vfat', ['-F', String(bits), '-n', `FAT${bits} LAB`, '-i', '1234ABCD', f]);
    const tags = expectSameAsBlkid(f);
    expect(tags.UUID).toBe('1234-ABCD');
    expect(tags.VERSION).toBe(`FAT${bits}`);
  });

  it.each([16, 32])('vfat FAT%i: the root directory label wins over the boot sector label, which is LABEL_FATBOOT', (bits) => {
    const f = image(`vfat${bits}-2labels.img`, '40M');
    run('mkfs.vfat', ['-F', String(bits), '-n', 'ROOTDIR', f]);
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, new TextEncoder().encode('BOOTSECT   '), 0, 11, bits === 32 ? 0x47 : 0x2b);
    fs.closeSync(fd);
    const tags = expectSameAsBlkid(f);
    expect([tags.LABEL, tags.LABEL_FATBOOT]).toEqual(['ROOTDIR', 'BOOTSECT']);
  });

  it('vfat without a label: no LABEL', () => {
    const f = image('vfat-nolabel.img', '20M');
    run('mkfs.vfat', ['-F', '16', f]);
    expect(expectSameAsBlkid(f).LABEL).toBeUndefined();
  });

  it('exfat (mkfs.exfat -L): label from the root directory, serial as UUID', () => {
    const f = image('exfat.img', '16M');
    run('mkfs.exfat', ['-L', 'exfat lab', f]);
    expect(expectSameAsBlkid(f).LABEL).toBe('exfat lab');
  });

  it('ntfs (mkntfs -F -f -L): label from $Volume, serial as UUID', () => {
    const f = image('ntfs.img', '16M');
    run('mkntfs', ['-q', '-F', '-f', '-L', 'ntfs labél', f]);
    expect(expectSameAsBlkid(f).LABEL).toBe('ntfs labél');
  });

  it('iso9660 with Joliet (genisoimage -J): a 16-character Joliet label merged with the 32-character primary one', () => {
    const src = path.join(dir, 'isosrc');
    fs.mkdirSync(src, { recursive: true });
    fs.writeFileSync(path.join(src, 'a.txt'), 'hello\n');
    const f = path.join(dir, 'joliet.iso');
    run('genisoimage', ['-quiet', '-J', '-V', 'My Long Volume Label 2024', '-publisher', 'vdboot tests', '-o', f, src]);
    const tags = expectSameAsBlkid(f);
    expect(tags.LABEL).toBe('My Long Volume Label 2024');
    expect(tags.VERSION).toBe('Joliet Extension');
  });

  it('iso9660 without Joliet: the primary label, UUID from the volume date', () => {
    const src = path.join(dir, 'isosrc');
    fs.mkdirSync(src, { recursive: true });
    fs.writeFileSync(path.join(src, 'a.txt'), 'hello\n');
    const f = path.join(dir, 'plain.iso');
    run('genisoimage', ['-quiet', '-V', 'PLAIN_ISO', '-o', f, src]);
    expect(expectSameAsBlkid(f).UUID).toMatch(/^\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d-\d\d$/);
  });

  it.each([
    ['FAT12 floppy (mkfs.vfat on 1440 KiB)', '1440K', ['mkfs.vfat', '-n', 'floppy']],
    ['FAT32 with 4096-byte sectors', '64M', ['mkfs.vfat', '-F', '32', '-S', '4096', '-n', 'BIGSECT']],
    ['exFAT with 4096-byte sectors, no label', '64M', ['mkfs.exfat', '-b', '4096']],
    ['NTFS with 4096-byte sectors and 64 KiB clusters', '64M', ['mkntfs', '-q', '-F', '-f', '-s', '4096', '-c', '65536', '-L', 'big clusters']],
    ['NTFS without a label', '16M', ['mkntfs', '-q', '-F', '-f']],
    ['xfs with 4096-byte sectors', '400M', ['mkfs.xfs', '-q', '-s', 'size=4096', '-L', 'x4']],
    ['ext4 with 64bit and metadata_csum, 1 KiB blocks', '64M', ['mke2fs', '-q', '-F', '-t', 'ext4', '-O', '64bit,metadata_csum', '-b', '1024']],
    ['swap with 64 KiB pages', '16M', ['mkswap', '-p', '65536', '-L', 's64']],
  ])('variant: %s', (name, size, cmd) => {
    const f = image(`variant-${name.replace(/\W+/g, '-')}.img`, size as string);
    const [tool, ...args] = cmd as string[];
    run(tool!, [...args, f]);
    expectSameAsBlkid(f);
  });

  it('iso9660 with an El Torito boot record and a non-ASCII Joliet label (BOOT_SYSTEM_ID, merged IDs)', () => {
    const src = path.join(dir, 'isoboot');
    fs.mkdirSync(src, { recursive: true });
    fs.writeFileSync(path.join(src, 'boot.img'), new Uint8Array(1440 * 1024));
    const f = path.join(dir, 'boot.iso');
    run('genisoimage', ['-quiet', '-J', '-b', 'boot.img', '-c', 'boot.cat', '-V', 'ünïcödé vol', '-o', f, src]);
    const tags = expectSameAsBlkid(f);
    expect(tags.BOOT_SYSTEM_ID).toBe('EL TORITO SPECIFICATION');
    expect(tags.LABEL).toBe('ünïcödé vol');
  });

  it('squashfs (mksquashfs): type and version, no UUID', () => {
    const src = path.join(dir, 'sqsrc');
    fs.mkdirSync(src, { recursive: true });
    fs.writeFileSync(path.join(src, 'a.txt'), 'hello\n');
    const f = path.join(dir, 'root.squashfs');
    run('mksquashfs', [src, f, '-quiet', '-noappend', '-no-progress']);
    const tags = expectSameAsBlkid(f);
    expect(tags.TYPE).toBe('squashfs');
    expect(tags.UUID).toBeUndefined();
  });

  it('swap (mkswap -L -U)', () => {
    const f = image('swap.img', '8M');
    run('mkswap', ['-L', 'swaplab', '-U', UUID, f]);
    expect(expectSameAsBlkid(f).TYPE).toBe('swap');
  });

  it.runIf(has('cryptsetup'))('LUKS1 and LUKS2 (cryptsetup luksFormat): crypto_LUKS, VERSION, UUID, LUKS2 LABEL and SUBSYSTEM', () => {
    const f1 = image('luks1.img', '20M');
    run('cryptsetup', ['luksFormat', '-q', '--type', 'luks1', '--iter-time', '1', '--uuid', UUID, f1, '-d', '-'], 'pw');
    expect(expectSameAsBlkid(f1).VERSION).toBe('1');
    const f2 = image('luks2.img', '20M');
    run('cryptsetup', ['luksFormat', '-q', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--label', 'luks label', '--subsystem', 'subsys', f2, '-d', '-'], 'pw');
    expect(expectSameAsBlkid(f2).LABEL).toBe('luks label');
  });

  // pvcreate refuses plain files: the PV is written through a loop device, then read from the file.
  it.runIf(has('pvcreate') && has('losetup') && process.getuid?.() === 0)('LVM2 physical volume (pvcreate on a loop device of the file): LVM2_member, UUID in LVM\'s 6-4-4-4-4-4-6 form', () => {
    const f = image('lvm.img', '20M');
    const loop = execFileSync('losetup', ['-f', '--show', f], { encoding: 'utf8' }).trim();
    try {
      run('pvcreate', ['-q', '--config', 'devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}', loop]);
    } finally {
      run('losetup', ['-d', loop]);
    }
    expect(expectSameAsBlkid(f).TYPE).toBe('LVM2_member');
  });

  it('a filesystem inside a partition of a disk, read through sliceReader (blkid -O OFFSET as the oracle)', () => {
    const f = image('disk-with-ext4.img', '64M');
    run('sfdisk', ['-q', f], 'label: gpt\nstart=2048, size=32768, type=linux\nsize=40960, type=linux\n');
    const t = parsePartitionTable(fileReader(f));
    const p2 = t.partitions[1]!;
    run('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'inside', '-E', `offset=${p2.start}`, f, `${p2.size / 1024}k`]);
    const mine = probeFilesystem(sliceReader(fileReader(f), p2.start, p2.size, `${f}2`));
    expect(blkidTags(mine!)).toEqual(blkid(f, p2.start));
    expect(mine!.label).toBe('inside');
    expect(probeFilesystem(sliceReader(fileReader(f), t.partitions[0]!.start, t.partitions[0]!.size, `${f}1`))).toBeNull();
  });
});

describe('engine neutrality', () => {
  it('partition parsing and probing give the same answers inside QuickJS (quickjs-emscripten) as on Node', async () => {
    const f = image('quickjs-disk.img', '96M');
    run('sfdisk', ['-q', f], 'label: gpt\nstart=2048, size=40960, type=uefi, name=esp\nsize=65536, type=linux, name="root ü"\nsize=16384, type=swap\n');
    const t = parsePartitionTable(fileReader(f));
    const [p1, p2, p3] = t.partitions;
    const part = (p: typeof p1) => path.join(dir, `qjs-part${p!.number}.img`);
    for (const p of [p1, p2, p3]) execFileSync('truncate', ['-s', String(p!.size), part(p)]);
    run('mkfs.vfat', ['-F', '32', '-n', 'QJSESP', part(p1)]);
    run('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'wurzel-ü', part(p2)]);
    run('mkswap', ['-L', 'qjsswap', part(p3)]);
    for (const p of [p1, p2, p3]) run('dd', [`if=${part(p)}`, `of=${f}`, 'bs=1M', `seek=${p!.start}`, 'oflag=seek_bytes', 'conv=notrunc,sparse', 'status=none']);

    const { build } = await import('esbuild');
    const { getQuickJS } = await import('quickjs-emscripten');
    const root = path.resolve(__dirname, '../..');
    const bundle = await build({
      stdin: {
        contents: `import { parsePartitionTable, sliceReader } from './src/formats/partitions.ts';
import { probeFilesystem } from './src/formats/probe.ts';
globalThis.runProbe = (size) => {
  const disk = { name: 'disk', size, read: (o, l) => new Uint8Array(__read(o, l)) };
  const t = parsePartitionTable(disk);
  return JSON.stringify({ t, fs: t.partitions.map((p) => probeFilesystem(sliceReader(disk, p.start, p.size, 'p' + p.number))) });
};`,
        resolveDir: root, loader: 'ts',
      },
      bundle: true, format: 'iife', write: false, target: 'es2022', platform: 'neutral',
    });
    const QuickJS = await getQuickJS();
    const vm = QuickJS.newContext();
    try {
      const reader = fileReader(f);
      const readFn = vm.newFunction('__read', (o, l) => {
        const bytes = reader.read(vm.getNumber(o), vm.getNumber(l));
        return vm.newArrayBuffer(bytes.slice().buffer);
      });
      vm.setProp(vm.global, '__read', readFn);
      readFn.dispose();
      vm.unwrapResult(vm.evalCode(bundle.outputFiles[0]!.text)).dispose();
      const res = vm.unwrapResult(vm.evalCode(`runProbe(${reader.size})`));
      const inQuickJS = JSON.parse(vm.getString(res));
      res.dispose();
      const onNode = JSON.parse(JSON.stringify({ t, fs: t.partitions.map((p) => probeFilesystem(sliceReader(fileReader(f), p.start, p.size, `p${p.number}`))) }));
      expect(inQuickJS).toEqual(onNode);
      expect(onNode.fs.map((r: { type: string }) => r.type)).toEqual(['vfat', 'ext4', 'swap']);
      expect(onNode.fs[1].label).toBe('wurzel-ü');
    } finally {
      vm.dispose();
    }
  });
});

describe('probeFilesystem on bad input', () => {
  it('an all-zero device and a tiny device are nothing', () => {
    expect(probeFilesystem(bytesReader('zero', new Uint8Array(1 << 20)))).toBeNull();
    expect(probeFilesystem(bytesReader('tiny', new Uint8Array(100)))).toBeNull();
  });

  it('truncated images and seeded random corruption of superblock areas give a result or null, never an exception', () => {
    const sources = ['ext4.img', 'vfat32.img', 'vfat12.img', 'exfat.img', 'ntfs.img', 'btrfs.img', 'xfs.img', 'swap.img', 'joliet.iso']
      .map((n) => path.join(dir, n)).filter((f) => fs.existsSync(f));
    expect(sources.length).toBeGreaterThan(5);
    let seed = 12345;
    const rand = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed; };
    let cases = 0;
    for (const f of sources) {
      const fd = fs.openSync(f, 'r');
      const head = new Uint8Array(Math.min(fs.fstatSync(fd).size, 160 * 1024));
      fs.readSync(fd, head, 0, head.length, 0);
      fs.closeSync(fd);
      for (const cut of [512, 1100, 4096, 70000]) {
        expect(() => probeFilesystem(bytesReader('cut', head.slice(0, Math.min(cut, head.length))))).not.toThrow();
        cases++;
      }
      for (let i = 0; i < 300; i++) {
        const m = head.slice();
        const hot = [0, 1024, 0x8000, 0x10000][rand() % 4]!;
        for (let k = 0; k < 1 + (rand() % 8); k++) {
          const at = hot + (rand() % 2048);
          if (at < m.length) m[at] = rand() & 0xff;
        }
        // An empty region out of every byte beyond what a prober needs: probing stays inside.
        const r = probeFilesystem(bytesReader('fuzz', m));
        if (r) expect(typeof r.type).toBe('string');
        cases++;
      }
    }
    expect(cases).toBeGreaterThan(1000);
  });
});
