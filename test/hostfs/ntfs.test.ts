import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostFileReader, type HostFs } from '../../src/formats/host-volume.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { fileReader, fuseWorks, pseudoRandom, run, tmpDir, unmount } from './helpers.ts';
import { expectSameAsNtfs3g, mkntfs, ntfscat, ntfsclusterRuns, ntfscp, ntfsinfoFile, ntfsls } from './ntfs-oracle.ts';

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

function open(img: string, size?: number): HostFs {
  const fsys = openHostFs(fileReader(img, size));
  expect(fsys?.type).toBe('ntfs');
  return fsys!;
}

function thrown(f: () => unknown): Error {
  try { f(); } catch (e) { return e as Error; }
  throw new Error('expected an error');
}

describe('NTFS without mounting (mkntfs + ntfscp)', () => {
  // 256 KiB clusters use the boot sector's negative-shift encoding; 4096-byte sectors still have 512-byte fixup strides
  for (const [cs, sector, mib] of [[512, 512, 48], [4096, 512, 48], [4096, 4096, 48], [65536, 512, 48], [262144, 512, 2048]] as const) {
    it(`${cs}-byte clusters, ${sector}-byte sectors: a file found by a case-folded, backslashed path reads like ntfscat, cluster for cluster`, () => {
      const img = path.join(dir, `c${cs}-${sector}.img`);
      mkntfs(img, mib, cs, `Vol${cs}`, sector);
      if (cs > 65536) expect(fileReader(img).read(13, 1)[0]).toBeGreaterThan(0x80);
      const image = pseudoRandom(3 * 1024 * 1024 + 12345, cs);
      ntfscp(img, { 'My Linux.vhdx': image, 'Jörg ünïcødé.txt': Buffer.from('grüße\n'), 'empty': Buffer.alloc(0) }, dir);
      const fsys = open(img);
      expect(fsys.clusterSize).toBe(cs);
      expect(fsys.label).toBe(`Vol${cs}`);
      expect(fsys.writeBlocker()).toBeNull();

      const f = fsys.lookup('\\MY LINUX.VHDX');
      expect(f.path).toBe('/My Linux.vhdx');
      expectSameAsNtfs3g(img, fsys, f, cs);
      expect(f.extents.every((e) => e.kind === 'data')).toBe(true);

      // non-ASCII letters fold through the volume's $UpCase table
      const small = fsys.lookup('/JÖRG ÜNÏCØDÉ.TXT');
      expect(small.path).toBe('/Jörg ünïcødé.txt');
      expect(small.resident).toBeDefined();
      expect(small.extents).toEqual([]);
      expectSameAsNtfs3g(img, fsys, small, cs);
      expect(fsys.lookup('/empty').size).toBe(0);

      const names = fsys.readdir('/').map((e) => e.name).sort();
      expect(names).toEqual(ntfsls(img, '/').sort());
    });
  }

  // with 64 KiB clusters the 4 KiB index blocks are addressed in 512-byte VCN units
  for (const [cs, count] of [[4096, 250], [65536, 150]] as const) it(`${cs}-byte clusters: a directory with ${count} entries (a multi-level $I30 B+ tree): every name is found, case-insensitively`, () => {
    const img = path.join(dir, `many${cs}.img`);
    mkntfs(img, 64, cs);
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < count; i++) {
      const name = `Datei ${String(i * 7919 % 1000).padStart(3, '0')} Größe-${i}.bin`;
      files[name] = Buffer.from(name.repeat(i % 3 === 0 ? 60 : 1)); // some resident, some not
    }
    ntfscp(img, files, dir);
    const fsys = open(img);
    expect(run('ntfsinfo', ['-i', '5', img]).toString()).toContain('$INDEX_ALLOCATION'); // the root index outgrew its MFT record
    const listed = fsys.readdir('/').map((e) => e.name);
    expect(listed.sort()).toEqual(ntfsls(img, '/').sort());
    for (const [name, data] of Object.entries(files)) {
      // upper case letter by letter, as $UpCase does (ß stays ß)
      const upper = [...name].map((c) => (c.toUpperCase().length === 1 ? c.toUpperCase() : c)).join('');
      const f = fsys.lookup('/' + upper);
      expect(f.path).toBe('/' + name);
      expect(Buffer.from(fsys.readFile(f, 0, f.size)).equals(data)).toBe(true);
    }
    const err = thrown(() => fsys.lookup('/Datei 919 Grösse-1.bin'));
    expect(isFormatError(err)).toBe(true);
    expect(err.message).toContain('/Datei 919 Grösse-1.bin not found');
    expect(err.message).toContain('/ has no "Datei 919 Grösse-1.bin"');
    expect(err.message).toContain('"Datei 919 Größe-1.bin"');
  });

  it('bytes past the initialized size (ntfsfallocate) are uninitialized extents and read as zeros', () => {
    const img = path.join(dir, 'init.img');
    mkntfs(img, 16, 4096);
    ntfscp(img, { 'pre.img': pseudoRandom(10_000, 5) }, dir);
    run('ntfsfallocate', ['-l', String(2_000_000), img, 'pre.img']);
    const info = ntfsinfoFile(img, '/pre.img');
    expect(info.initializedSize).toBe(10_000);
    const fsys = open(img);
    const f = fsys.lookup('/pre.img');
    expect(f.size).toBe(info.dataSize);
    const uninit = f.extents.filter((e) => e.kind === 'uninitialized');
    expect(uninit.length).toBeGreaterThan(0);
    expect(uninit[0]!.fileOffset).toBe(info.initializedSize);
    expect(f.extents.filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0)).toBe(info.initializedSize);
    expectSameAsNtfs3g(img, fsys, f, 4096);
  });

  it('hiberfil.sys starting with "HIBR" blocks writing and tells the user how to shut Windows down fully', () => {
    const img = path.join(dir, 'hib.img');
    mkntfs(img, 16, 4096);
    ntfscp(img, { 'hiberfil.sys': Buffer.concat([Buffer.from('HIBR'), Buffer.alloc(70_000)]) }, dir);
    const msg = open(img).writeBlocker();
    expect(msg).toMatch(/hibernated|Fast Startup/);
    expect(msg).toContain('powercfg /h off');
    expect(msg).toContain('Shift');

    const clean = path.join(dir, 'hib0.img');
    mkntfs(clean, 16, 4096);
    ntfscp(clean, { 'hiberfil.sys': Buffer.alloc(70_000) }, dir);
    expect(open(clean).writeBlocker()).toBeNull();
  });

  it('a volume marked dirty (ntfsfix schedules chkdsk, journal emptied) blocks writes through a driver until ntfsfix -d clears the flag; with Windows\' journal it blocks every write', () => {
    const img = path.join(dir, 'dirty.img');
    mkntfs(img, 16, 4096);
    run('ntfsfix', [img]);
    expect(run('ntfsinfo', ['-f', '-m', img]).toString()).toMatch(/Volume Flags: 0x0*1 DIRTY/);
    // ntfsfix empties the journal as ntfs3 and ntfs-3g do: writes inside a file's own clusters stay allowed, driver writes do not
    expect((open(img) as unknown as { logFileState(): string }).logFileState()).toBe('empty');
    expect(open(img).writeBlocker()).toBeNull();
    expect(open(img).driverWriteBlocker!()).toMatch(/marked dirty by a Linux NTFS driver.*chkdsk \/f/s);
    // the same flag with Windows' restart area in the journal: nothing is written
    const buf = fs.readFileSync(img);
    const log = open(img).lookup('/$LogFile').extents[0] as { deviceOffset: number };
    const saved = Buffer.from(buf.subarray(log.deviceOffset, log.deviceOffset + 4));
    Buffer.from('RSTR').copy(buf, log.deviceOffset);
    fs.writeFileSync(img, buf);
    expect((open(img) as unknown as { logFileState(): string }).logFileState()).toBe('restart');
    expect(open(img).writeBlocker()).toMatch(/dirty.*shut it down fully/s);
    saved.copy(buf, log.deviceOffset);
    fs.writeFileSync(img, buf);
    run('ntfsfix', ['-d', img]);
    expect(open(img).writeBlocker()).toBeNull();
    expect(open(img).driverWriteBlocker!()).toBeNull();
  });

  it('a torn MFT record (one sector not matching the update sequence) is refused', () => {
    const img = path.join(dir, 'torn.img');
    mkntfs(img, 16, 4096);
    ntfscp(img, { 'victim.vhd': pseudoRandom(100_000, 9) }, dir);
    const inode = +run('ntfsinfo', ['-F', '/victim.vhd', img]).toString().match(/Dumping Inode (\d+)/)![1]!;
    const mftLcn = +run('ntfsinfo', ['-m', img]).toString().match(/LCN of Data Attribute for FILE_MFT: (\d+)/)![1]!;
    const recOffset = mftLcn * 4096 + inode * 1024;
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.from([0xde, 0xad]), 0, 2, recOffset + 1022); // last two bytes of the record's second sector
    fs.closeSync(fd);
    expect(spawnSync('ntfscat', [img, '/victim.vhd']).status).not.toBe(0); // ntfs-3g refuses it too
    const err = thrown(() => open(img).lookup('/victim.vhd'));
    expect(isFormatError(err)).toBe(true);
    expect(err.message).toMatch(/torn/);
  });

  it('clusters past the end of the partition (a truncated partition) are a FormatError, not a read of garbage', () => {
    const img = path.join(dir, 'trunc.img');
    mkntfs(img, 32, 4096);
    ntfscp(img, { 'a.vhd': pseudoRandom(8 << 20, 3) }, dir);
    const full = open(img).lookup('/a.vhd');
    const first = full.extents[0]!;
    expect(first.kind).toBe('data');
    const cut = (first as { deviceOffset: number }).deviceOffset + 4096;
    const err = thrown(() => open(img, cut).lookup('/a.vhd'));
    expect(isFormatError(err)).toBe(true);
    expect(err.message).toMatch(/past the end of the partition/);
  });

  it('not a volume vdboot reads: null', () => {
    const img = path.join(dir, 'zero.img');
    fs.writeFileSync(img, Buffer.alloc(1 << 20));
    expect(openHostFs(fileReader(img))).toBeNull();
  });
});

describe.skipIf(!fuseWorks())('NTFS volumes filled through ntfs-3g (FUSE)', () => {
  /** Mounts `img` with ntfs-3g, runs `fill`, unmounts. */
  function withMount(img: string, fill: (mnt: string) => void, opts: string[] = []): void {
    const mnt = fs.mkdtempSync(path.join(dir, 'mnt-'));
    run('ntfs-3g', [...opts, img, mnt]);
    try { fill(mnt); } finally { unmount(mnt); }
  }

  it('a path with directories, spaces and non-ASCII letters: /Users/Jörg/VMs/My Linux.vhdx', () => {
    const img = path.join(dir, 'users.img');
    mkntfs(img, 32, 4096, 'Windows');
    const data = pseudoRandom(2_500_000, 77);
    withMount(img, (m) => {
      fs.mkdirSync(path.join(m, 'Users/Jörg/VMs'), { recursive: true });
      fs.writeFileSync(path.join(m, 'Users/Jörg/VMs/My Linux.vhdx'), data);
      fs.writeFileSync(path.join(m, 'Users/Jörg/VMs/Other.vhd'), 'x');
      fs.linkSync(path.join(m, 'Users/Jörg/VMs/My Linux.vhdx'), path.join(m, 'Users/Hard Link.vhdx'));
    });
    const fsys = open(img);
    const f = fsys.lookup('users\\JÖRG\\vms\\my linux.vhdx');
    expect(f.path).toBe('/Users/Jörg/VMs/My Linux.vhdx');
    expectSameAsNtfs3g(img, fsys, f, 4096);
    expect(fsys.readdir('/Users/Jörg/VMs').map((e) => [e.name, e.isDir]).sort()).toEqual([['My Linux.vhdx', false], ['Other.vhd', false]]);
    expect(fsys.readdir('/Users').map((e) => [e.name, e.isDir])).toEqual([['Hard Link.vhdx', false], ['Jörg', true]]);
    // a hard link: a second name in another directory, the same clusters
    expect(fsys.lookup('/Users/hard link.VHDX').extents).toEqual(f.extents);

    const err = thrown(() => fsys.lookup('/Users/Jörg/VMs/My Linux.vhd'));
    expect(err.message).toContain('/Users/Jörg/VMs has no "My Linux.vhd"');
    expect(err.message).toContain('"My Linux.vhdx"');
    const err2 = thrown(() => fsys.lookup('/Users/Joerg/VMs/My Linux.vhdx'));
    expect(err2.message).toContain('/Users has no "Joerg"');
    expect(err2.message).toContain('"Jörg"');
  });

  it('a file in hundreds of fragments whose runlist spills over $ATTRIBUTE_LIST extension records', () => {
    const img = path.join(dir, 'frag.img');
    mkntfs(img, 32, 512);
    const src = pseudoRandom(8 << 20, 11);
    withMount(img, (m) => {
      // fill the volume with small files, delete every other one: the free space is all gaps
      fs.mkdirSync(path.join(m, 'fill'));
      const small = Buffer.alloc(1024, 7);
      let made = 0;
      for (;; made++) { try { fs.writeFileSync(path.join(m, 'fill', String(made)), small); } catch { break; } }
      for (let i = 0; i < made; i += 2) fs.unlinkSync(path.join(m, 'fill', String(i)));
      const st = fs.statfsSync(m);
      fs.writeFileSync(path.join(m, 'fragmented.vhd'), src.subarray(0, Math.floor(st.bavail * st.bsize * 0.5)));
    });
    // 10,000 small files grew $MFT between their clusters: $MFT itself is fragmented now
    expect(ntfsclusterRuns(img, '/$MFT').length).toBeGreaterThan(10);
    const info = ntfsinfoFile(img, '/fragmented.vhd');
    expect(info.hasAttributeList).toBe(true);
    expect(info.dataParts).toBeGreaterThanOrEqual(3);
    const fsys = open(img);
    const f = fsys.lookup('/FRAGMENTED.VHD');
    expect(f.extents.length).toBeGreaterThan(300);
    expectSameAsNtfs3g(img, fsys, f, 512);
    // the fill directory is big too: its index is a B+ tree in $INDEX_ALLOCATION
    const names = fsys.readdir('/fill').map((e) => e.name);
    expect(names.sort()).toEqual(ntfsls(img, '/fill').sort());
    const some = names[Math.floor(names.length / 2)]!;
    expect(fsys.lookup(`/fill/${some}`).size).toBe(1024);
  });

  it('a sparse file: holes where ntfscluster shows no clusters, zeros when read', () => {
    const img = path.join(dir, 'sparse.img');
    mkntfs(img, 32, 4096);
    const src = pseudoRandom(3_000_000, 21);
    withMount(img, (m) => {
      const fd = fs.openSync(path.join(m, 'sparse.img'), 'w');
      for (let o = 0; o < src.length; o += 2 * 65536) fs.writeSync(fd, src, o, Math.min(65536, src.length - o), o);
      fs.ftruncateSync(fd, src.length + 1_000_000);
      fs.closeSync(fd);
    });
    const fsys = open(img);
    const f = fsys.lookup('/sparse.img');
    expect(f.extents.some((e) => e.kind === 'hole')).toBe(true);
    expectSameAsNtfs3g(img, fsys, f, 4096);
    expect(f.extents[f.extents.length - 1]!.kind).toBe('hole');
  });

  it('a file compressed by its folder is refused with the compact /u remedy', () => {
    const img = path.join(dir, 'comp.img');
    mkntfs(img, 32, 4096);
    withMount(img, (m) => {
      fs.mkdirSync(path.join(m, 'Zipped'));
      run('setfattr', ['-n', 'system.ntfs_attrib_be', '-v', '0x00000810', path.join(m, 'Zipped')]);
      fs.writeFileSync(path.join(m, 'Zipped', 'disk.vhd'), Buffer.alloc(300_000, 1));
    });
    expect(run('ntfsinfo', ['-F', '/Zipped/disk.vhd', img]).toString()).toMatch(/COMPRESSED/);
    const err = thrown(() => open(img).lookup('/Zipped/disk.vhd'));
    expect(isFormatError(err)).toBe(true);
    expect(err.message).toMatch(/compressed/);
    expect(err.message).toContain('compact /u');
  });

  it('a file with a DOS 8.3 name: listed once, found by either name', () => {
    const img = path.join(dir, 'dos.img');
    mkntfs(img, 16, 4096);
    withMount(img, (m) => {
      fs.writeFileSync(path.join(m, 'Long Image Name.vhdx'), pseudoRandom(20_000, 1));
      run('setfattr', ['-n', 'system.ntfs_dos_name', '-v', 'LONGIM~1.VHD', path.join(m, 'Long Image Name.vhdx')]);
    });
    expect(run('ntfsls', ['-x', img]).toString()).toContain('LONGIM~1.VHD');
    const fsys = open(img);
    expect(fsys.readdir('/').map((e) => e.name).filter((n) => !n.startsWith('$'))).toEqual(['Long Image Name.vhdx']);
    const byShort = fsys.lookup('/longim~1.vhd');
    const byLong = fsys.lookup('/Long Image Name.vhdx');
    expect(byShort.extents).toEqual(byLong.extents);
    expect(Buffer.from(hostFileReader(fsys, byLong).read(0, byLong.size)).equals(ntfscat(img, '/Long Image Name.vhdx'))).toBe(true);
  });

  it('reparse points are refused with what to do: a WOF-compressed file, a OneDrive placeholder, a junction on the path', () => {
    const img = path.join(dir, 'reparse.img');
    mkntfs(img, 16, 4096);
    /** A reparse buffer: tag, data length, reserved, data. */
    const reparse = (tag: number, body: Buffer): string => {
      const head = Buffer.alloc(8);
      head.writeUInt32LE(tag, 0);
      head.writeUInt16LE(body.length, 4);
      return '0x' + Buffer.concat([head, body]).toString('hex');
    };
    const u32s = (...n: number[]): Buffer => Buffer.concat(n.map((x) => { const b = Buffer.alloc(4); b.writeUInt32LE(x); return b; }));
    withMount(img, (m) => {
      fs.mkdirSync(path.join(m, 'VMs'));
      fs.writeFileSync(path.join(m, 'VMs', 'wof.vhdx'), pseudoRandom(100_000, 1));
      fs.writeFileSync(path.join(m, 'VMs', 'cloud.vhdx'), pseudoRandom(100_000, 2));
      fs.mkdirSync(path.join(m, 'Linked'));
      // ntfs-3g stores reparse data given through this attribute as Windows would
      run('setfattr', ['-n', 'system.ntfs_reparse_data', '-v', reparse(0x80000017, u32s(1, 2, 1, 1)), path.join(m, 'VMs', 'wof.vhdx')]);
      run('setfattr', ['-n', 'system.ntfs_reparse_data', '-v', reparse(0x9000601a, u32s(0, 0)), path.join(m, 'VMs', 'cloud.vhdx')]);
      const sub = Buffer.from('\\??\\D:\\Real VMs', 'utf16le');
      const print = Buffer.from('D:\\Real VMs', 'utf16le');
      const offsets = Buffer.alloc(8);
      offsets.writeUInt16LE(0, 0); offsets.writeUInt16LE(sub.length, 2); offsets.writeUInt16LE(sub.length + 2, 4); offsets.writeUInt16LE(print.length, 6);
      const body = Buffer.concat([offsets, sub, Buffer.alloc(2), print, Buffer.alloc(2)]);
      run('setfattr', ['-n', 'system.ntfs_reparse_data', '-v', reparse(0xa0000003, body), path.join(m, 'Linked')]);
    });
    expect(run('ntfsinfo', ['-F', '/VMs/wof.vhdx', img]).toString()).toContain('REPARSE_POINT');
    const fsys = open(img);
    expect(thrown(() => fsys.lookup('/VMs/wof.vhdx')).message).toMatch(/compact \/u \/exe "\\VMs\\wof\.vhdx"/);
    expect(thrown(() => fsys.lookup('/VMs/cloud.vhdx')).message).toMatch(/OneDrive/);
    const j = thrown(() => fsys.lookup('/Linked/disk.vhdx'));
    expect(isFormatError(j)).toBe(true);
    expect(j.message).toContain('/Linked is a junction to "D:\\Real VMs"');
  });
});
