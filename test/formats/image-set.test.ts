/**
 * An image set is untrusted: the files it names must lie in the image's folder (or below),
 * be regular files, and be identified by what they are, not how they are spelled
 * (issue #14, cases 2, 3 and 4). Each case is crafted with qemu-img or a hand-written
 * descriptor and must be refused with the file named; --allow-outside lets a person who
 * trusts the set open files outside the folder.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { openHostImage } from '../../src/sys/host-image.ts';
import { command as catCommand } from '../../src/cli/cat.ts';
import { command as inspectCommand } from '../../src/cli/inspect.ts';
import { parseKitArgs } from '../../src/cli/kit.ts';
import { command as vdiskTableCommand } from '../../src/cli/vdisk-table.ts';
import { readWriteObstacle } from '../../mkdisk/kit.ts';
import { cleanupTmpDirs, makeTmpDir, qemuImg, qemuImgIn, qemuIo, qemuIoIn } from '../kit/oracle.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;

function refusal(p: string, opts: { allowOutside?: boolean } = {}): string {
  try {
    openHostImage(p, opts).close();
  } catch (e) {
    expect(isFormatError(e), String(e)).toBe(true);
    return (e as Error).message;
  }
  throw new Error(`${p} opened`);
}

function opens(p: string, opts: { allowOutside?: boolean } = {}): void {
  openHostImage(p, opts).close();
}

function descriptor(file: string, extents: string[], extra: string[] = []): string {
  fs.writeFileSync(file, ['# Disk DescriptorFile', 'version=1', 'CID=12345678', 'parentCID=ffffffff', 'createType="monolithicFlat"', ...extra, ...extents, ''].join('\n'));
  return file;
}

async function runCommand(cmd: typeof catCommand, args: string[]): Promise<{ code: number; out: number; err: string }> {
  let out = 0;
  let err = '';
  const io = { stdout: (t: string) => { out += t.length; }, stderr: (t: string) => { err += t; }, stdoutBytes: async (b: Uint8Array) => { out += b.length; } };
  try {
    return { code: await cmd.run(args, io), out, err };
  } catch (e) {
    return { code: 1, out, err: err + (e as Error).message };
  }
}

/** A qcow2 naming a data file: qemu-img writes `made`'s name, which is then patched to `named` (same length). */
function qcow2WithDataFile(dir: string, name: string, made: string, named: string, extra: string[] = []): string {
  expect(made.length).toBe(named.length);
  const p = path.join(dir, name);
  qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', ['data_file=' + made, 'data_file_raw=on', ...extra].join(','), name, String(MiB));
  const b = fs.readFileSync(p);
  const at = b.indexOf(Buffer.from(made));
  expect(at).toBeGreaterThan(0);
  Buffer.from(named).copy(b, at);
  fs.writeFileSync(p, b);
  return p;
}

describe('confinement: an image names only files in its folder or below', () => {
  const root = makeTmpDir();
  const vm = path.join(root, 'vm');
  const outside = path.join(root, 'outside');
  fs.mkdirSync(path.join(vm, 'sub'), { recursive: true });
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, 'secret.bin'), Buffer.alloc(MiB, 0x53));
  fs.writeFileSync(path.join(vm, 'd.raw'), Buffer.alloc(MiB, 0x44));
  fs.writeFileSync(path.join(vm, 'sub', 'e.raw'), Buffer.alloc(MiB, 0x45));

  it('a VMDK extent with an absolute path is refused, naming it and the way out; --allow-outside opens it', () => {
    const p = descriptor(path.join(vm, 'abs.vmdk'), [`RW 2048 FLAT "${path.join(outside, 'secret.bin')}" 0`]);
    const msg = refusal(p);
    expect(msg).toContain(path.join(outside, 'secret.bin'));
    expect(msg).toContain(`image's folder ${vm}`);
    expect(msg).toContain('rd.vdisk.allow-outside=1');
    expect(msg).toContain('--allow-outside');
    opens(p, { allowOutside: true });
  });

  it('a VMDK extent "../outside/secret.bin" leaving the folder is refused; one in a subfolder opens', () => {
    expect(refusal(descriptor(path.join(vm, 'up.vmdk'), ['RW 2048 FLAT "../outside/secret.bin" 0']))).toContain(`names ${path.join(outside, 'secret.bin')}, which lies outside that folder`);
    opens(descriptor(path.join(vm, 'down.vmdk'), ['RW 2048 FLAT "sub/e.raw" 0']));
  });

  it('a symbolic link in the folder to a file outside it is refused, naming where it leads', () => {
    fs.symlinkSync(path.join(outside, 'secret.bin'), path.join(vm, 'link.raw'));
    const msg = refusal(descriptor(path.join(vm, 'link.vmdk'), ['RW 2048 FLAT "link.raw" 0']));
    expect(msg).toContain(`a link to ${fs.realpathSync(path.join(outside, 'secret.bin'))}`);
  });

  it('a Windows absolute path of another machine is found by its name in the image\'s folder', () => {
    const img = openHostImage(descriptor(path.join(vm, 'win.vmdk'), ['RW 2048 FLAT "C:\\VMs\\d.raw" 0']));
    try {
      expect(img.map.files).toEqual([path.join(vm, 'win.vmdk'), path.join(vm, 'd.raw')]);
    } finally {
      img.close();
    }
  });

  it('a qcow2 data_file with an absolute path is refused', () => {
    const p = qcow2WithDataFile(vm, 'absdata.qcow2', 'x'.repeat(outside.length + 11), path.join(outside, 'secret.bin'));
    expect(refusal(p)).toContain(`absdata.qcow2 names ${path.join(outside, 'secret.bin')}`);
  });

  it('vdboot cat of a qcow2 whose backing file is /etc/passwd refuses and prints nothing; inspect too', async () => {
    const p = path.join(vm, 'passwd.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/passwd', '-F', 'raw', p, String(MiB));
    const cat = await runCommand(catCommand, [p]);
    expect(cat.code).not.toBe(0);
    expect(cat.out).toBe(0);
    expect(cat.err).toContain('/etc/passwd');
    expect(cat.err).toContain('outside');
    const inspect = await runCommand(inspectCommand, [p]);
    expect(inspect.code).not.toBe(0);
    expect(inspect.err).toContain('/etc/passwd');
  });

  it('/dev/zero as a backing file is refused, and so is a link in the folder to it', () => {
    const p = path.join(vm, 'zero.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '/dev/zero', '-F', 'raw', p, String(MiB));
    const msg = refusal(p);
    expect(msg).toContain('/dev/zero');
    // in the folder: a device node is refused as such
    fs.symlinkSync('/dev/zero', path.join(vm, 'zero.raw'));
    expect(refusal(descriptor(path.join(vm, 'devlink.vmdk'), ['RW 2048 FLAT "zero.raw" 0']))).toContain('a link to /dev/zero');
  });

  it('a disk definition\'s partition "../outside/secret.bin" is refused', () => {
    const p = path.join(vm, 'def.vdisk.json');
    fs.writeFileSync(p, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: '../outside/secret.bin' }] }));
    expect(refusal(p)).toContain(path.join(outside, 'secret.bin'));
  });

  it('vdboot vdisk-table refuses a partition outside the folder and writes nothing; --allow-outside writes the table', async () => {
    const p = path.join(vm, 'out.vdisk.json');
    fs.writeFileSync(p, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: '../outside/secret.bin' }] }));
    const table = path.join(vm, 'out.vdisk.table');
    const refused = await runCommand(vdiskTableCommand, [p]);
    expect(refused.code).toBe(1);
    expect(refused.err).toContain(path.join(outside, 'secret.bin'));
    expect(refused.err).toContain('--allow-outside');
    expect(fs.existsSync(table)).toBe(false);
    const allowed = await runCommand(vdiskTableCommand, [p, '--allow-outside']);
    expect(allowed.code, allowed.err).toBe(0);
    expect(fs.statSync(table).size).toBeGreaterThan(0);
    // the table file then opens with the set (GPT of one partition of 1 MiB), and again only with the permission
    expect(refusal(p)).toContain(path.join(outside, 'secret.bin'));
    const img = openHostImage(p, { allowOutside: true });
    try {
      expect(img.map.extents.some((e) => e.kind === 'unmappable')).toBe(false);
    } finally {
      img.close();
    }
  });

  it('vdboot kit --allow-outside: the image is checked with the permission and the entries boot with rd.vdisk.allow-outside=1', () => {
    const p = descriptor(path.join(vm, 'kit-abs.vmdk'), [`RW 2048 FLAT "${path.join(outside, 'secret.bin')}" 0`]);
    expect(() => readWriteObstacle(p)).toThrow(/outside|image's folder/);
    expect(readWriteObstacle(p, { allowOutside: true })).toBeUndefined();
    const o = parseKitArgs(['--image', p, '--root-dir', root, '--allow-outside']);
    expect(o.allowOutside).toBe(true);
    expect(parseKitArgs(['--image', p, '--root-dir', root]).allowOutside).toBeUndefined();
    // by layer: a flat VMDK's extent file is its own (read-write as is), an overlay's backing file is a parent's
    expect(readWriteObstacle(descriptor(path.join(vm, 'kit-flat.vmdk'), ['RW 2048 FLAT "d.raw" 0']))).toBeUndefined();
    qemuImgIn(vm, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', 'kit-base.qcow2', String(MiB));
    qemuIoIn(vm, 'kit-base.qcow2', ['write -P 0x61 0 1M'], 'qcow2');
    qemuImgIn(vm, 'create', '-q', '-f', 'qcow2', '-b', 'kit-base.qcow2', '-F', 'qcow2', 'kit-top.qcow2');
    expect(readWriteObstacle(path.join(vm, 'kit-top.qcow2'))).toMatch(/reads ranges from its parent image/);
  });
});

describe('identity, not spelling: one file under two names is one file', () => {
  const dir = makeTmpDir();
  fs.writeFileSync(path.join(dir, 'd.raw'), Buffer.alloc(MiB, 0x44));

  it('FLAT "d.raw" 0 and FLAT "./d.raw" 0 map the same bytes twice: refused', () => {
    const msg = refusal(descriptor(path.join(dir, 'twice.vmdk'), ['RW 2048 FLAT "d.raw" 0', 'RW 2048 FLAT "./d.raw" 0']));
    expect(msg).toContain('mapped onto the same bytes of');
    expect(msg).toContain('d.raw');
  });

  it('a hard link is the same file too', () => {
    fs.linkSync(path.join(dir, 'd.raw'), path.join(dir, 'hard.raw'));
    expect(refusal(descriptor(path.join(dir, 'hard.vmdk'), ['RW 2048 FLAT "d.raw" 0', 'RW 2048 FLAT "hard.raw" 0']))).toContain('mapped onto the same bytes of');
  });

  it('SPARSE "s.vmdk" plus FLAT "./s.vmdk" 0 would expose the sparse file\'s header and tables: refused', () => {
    qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicSparse', 's.vmdk', String(MiB));
    qemuIo(path.join(dir, 's.vmdk'), 'vmdk', ['write -P 0x11 0 64k']);
    const size = fs.statSync(path.join(dir, 's.vmdk')).size;
    const p = path.join(dir, 'mixed.vmdk');
    fs.writeFileSync(p, ['# Disk DescriptorFile', 'version=1', 'CID=12345678', 'parentCID=ffffffff', 'createType="twoGbMaxExtentSparse"',
      'RW 2048 SPARSE "s.vmdk"', `RW ${Math.floor(size / 512)} FLAT "./s.vmdk" 0`, ''].join('\n'));
    expect(refusal(p)).toMatch(/s\.vmdk/);
  });

  it('a qcow2 whose data_file names the qcow2 itself (preallocation=metadata): its header and tables would be guest data, refused', () => {
    const p = qcow2WithDataFile(dir, 'self.qcow2', 'self.data0', 'self.qcow2', ['preallocation=metadata']);
    fs.truncateSync(p, 2 * MiB); // as large as the disk, so that no offset is past its end
    const msg = refusal(p);
    expect(msg).toContain('self.qcow2');
    expect(msg).toMatch(/header|L1|L2|refcount|same bytes/);
  });
});

describe('a child that names its parent\'s file as its own data is refused (parent bytes by layer)', () => {
  const dir = makeTmpDir();

  it('a qcow2 overlay whose data_file is its backing file', () => {
    fs.writeFileSync(path.join(dir, 'base.raw'), Buffer.alloc(MiB, 0x42));
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '-o', 'data_file=base.rax', 'ov.qcow2', String(MiB));
    qemuIoIn(dir, 'ov.qcow2', ['write -P 0x5a 64k 64k'], 'qcow2');
    const b = fs.readFileSync(path.join(dir, 'ov.qcow2'));
    Buffer.from('base.raw').copy(b, b.indexOf(Buffer.from('base.rax')));
    fs.writeFileSync(path.join(dir, 'ov.qcow2'), b);
    const msg = refusal(path.join(dir, 'ov.qcow2'));
    expect(msg).toContain(`${path.join(dir, 'base.raw')} is a file of two layers of the chain`);
  });

  it('a VMDK child with FLAT "base-flat.vmdk" 0, the extent of its parent base.vmdk (parentFileNameHint)', () => {
    qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'base.vmdk', String(MiB));
    const cid = /CID=([0-9a-f]+)/.exec(fs.readFileSync(path.join(dir, 'base.vmdk'), 'latin1'))![1]!;
    const p = path.join(dir, 'child.vmdk');
    fs.writeFileSync(p, ['# Disk DescriptorFile', 'version=1', 'CID=abcdef01', `parentCID=${cid}`, 'createType="monolithicFlat"', 'parentFileNameHint="base.vmdk"',
      'RW 1024 FLAT "base-flat.vmdk" 0', 'RW 1024 FLAT "base-flat.vmdk" 1024', ''].join('\n'));
    expect(refusal(p)).toContain('is a file of two layers of the chain');
  });
});

describe('the folder an image set is confined to', () => {
  it('is the named image\'s folder; a VirtualBox snapshot in the VM\'s Snapshots/ folder reaches the VM folder above it', async () => {
    const { confinementRoot } = await import('../../src/formats/chain.ts');
    expect(confinementRoot('/VMs/linux/disk.vdi')).toBe('/VMs/linux');
    expect(confinementRoot('/VMs/linux/Snapshots/{2b7e}.vdi')).toBe('/VMs/linux');
    expect(confinementRoot('/VMs/linux/snapshots/x.vdi')).toBe('/VMs/linux');
    expect(confinementRoot('/VMs/linux/Snapshots-old/x.vdi')).toBe('/VMs/linux/Snapshots-old');
    expect(confinementRoot('disk.vhdx')).toBe(confinementRoot('./disk.vhdx'));
  });
});
