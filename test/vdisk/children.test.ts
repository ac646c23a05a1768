/**
 * Children of an image (src/boot/children.ts): differencing images beside it whose parent
 * it is. Made by qemu-img where it can (qcow2 overlays, VMDK children), by patching a
 * qemu-made image where it cannot (a VHDX checkpoint, a VirtualBox snapshot VDI), and
 * Windows' own differencing VHD from the real-world samples.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { findChildImages, mayHaveParent } from '../../src/boot/children.ts';
import { openImage, openLayer } from '../../src/formats/chain.ts';
import type { ChainHost } from '../../src/formats/chain.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';
import { planAgainstDevices } from '../../src/cli/plan.ts';
import { BASIC_DATA, convert, devicesOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, tmpDir } from './helpers.ts';
import { cleanupTmpDirs, makeTmpDir, qemuImg, qemuIo } from '../kit/oracle.ts';
import { realWorld } from '../kit/data.ts';
import { currentHeader, makeDifferencing } from '../formats/vhdx-patch.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;

/** findChildImages over this machine's files; also counts the bytes read from each file. */
function search(image: string) {
  const base = nodeChainHost();
  const bytesRead = new Map<string, number>();
  const host: ChainHost = {
    ...base,
    openFile(p) {
      const r = base.openFile(p);
      return { name: r.name, size: r.size, read: (o: number, l: number) => { bytesRead.set(p, (bytesRead.get(p) ?? 0) + l); return r.read(o, l); } };
    },
  };
  try {
    const top = openImage(image, base).layers[0]!.layer;
    return { ...findChildImages(image, top, host), bytesRead };
  } finally {
    base.close();
  }
}

/** A VirtualBox-style differencing VDI: a qemu-made dynamic VDI patched to type 4, linked to `parent`'s UUID. */
function vdiChild(parent: string, child: string): void {
  qemuImg('create', '-q', '-f', 'vdi', child, String(8 * MiB));
  const p = fs.readFileSync(parent);
  const c = fs.readFileSync(child);
  c.writeUInt32LE(4, 0x4c);
  p.copy(c, 0x1a8, 0x188, 0x198);
  fs.writeFileSync(child, c);
}

describe('findChildImages: differencing images that read from an image', () => {
  it('a qcow2 overlay (qemu-img create -b) is a child; the base is not a child of the overlay', () => {
    const dir = makeTmpDir();
    qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '8M');
    qemuImg('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'base.qcow2', path.join(dir, 'overlay.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'other.qcow2'), '8M');
    expect(search(path.join(dir, 'base.qcow2')).children).toEqual([path.join(dir, 'overlay.qcow2')]);
    expect(search(path.join(dir, 'overlay.qcow2')).children).toEqual([]);
    expect(search(path.join(dir, 'other.qcow2')).children).toEqual([]);
  });

  it('a VMDK child (qemu-img create -f vmdk -b) by its parentFileNameHint and parentCID', () => {
    const dir = makeTmpDir();
    qemuImg('create', '-q', '-f', 'vmdk', path.join(dir, 'disk.vmdk'), '8M');
    qemuImg('create', '-q', '-f', 'vmdk', '-F', 'vmdk', '-b', 'disk.vmdk', path.join(dir, 'disk-000001.vmdk'));
    expect(search(path.join(dir, 'disk.vmdk')).children).toEqual([path.join(dir, 'disk-000001.vmdk')]);
  });

  it('a VirtualBox snapshot VMDK naming its parent by another machine\'s absolute path: found by name, confirmed by its parentCID', () => {
    const dir = makeTmpDir();
    const disk = path.join(dir, 'disk.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', disk, '8M');
    fs.mkdirSync(path.join(dir, 'Snapshots'));
    const snap = path.join(dir, 'Snapshots', '{0b5c2d1e-7777-4888-9999-aaaabbbbcccc}.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', '-F', 'vmdk', '-b', '../disk.vmdk', path.basename(snap)], { cwd: path.dirname(snap) });
    const b = fs.readFileSync(snap);
    const at = b.indexOf('parentFileNameHint="../disk.vmdk"');
    expect(at).toBeGreaterThan(0);
    // the descriptor has room after it (zero padding): the longer hint fits in place
    const hint = 'parentFileNameHint="C:\\Users\\u\\VirtualBox VMs\\Debian\\disk.vmdk"';
    const end = b.indexOf(0, at);
    const rest = b.subarray(at + 'parentFileNameHint="../disk.vmdk"'.length, end);
    Buffer.concat([Buffer.from(hint, 'latin1'), rest]).copy(b, at);
    fs.writeFileSync(snap, b);
    expect(search(disk).children).toEqual([snap]);
    // another disk.vmdk (another CID) elsewhere is not its parent
    const other = makeTmpDir();
    qemuImg('create', '-q', '-f', 'vmdk', path.join(other, 'disk.vmdk'), '8M');
    fs.mkdirSync(path.join(other, 'Snapshots'));
    fs.copyFileSync(snap, path.join(other, 'Snapshots', path.basename(snap)));
    const r = search(path.join(other, 'disk.vmdk'));
    expect(r.children).toEqual([]);
    expect(r.stale.map((x) => x.path)).toEqual([path.join(other, 'Snapshots', path.basename(snap))]);
  });

  it('a Hyper-V checkpoint (.avhdx) by relative path and the parent\'s DataWriteGuid; once the parent is written it is stale, not a child', () => {
    const dir = makeTmpDir();
    const parent = path.join(dir, 'My Linux.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', parent, String(16 * MiB));
    qemuIo(parent, 'vhdx', ['write -P 0x11 0 1M']);
    const child = path.join(dir, 'My Linux_0A1B2C3D-0000-4000-8000-000000000001.avhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', child, String(16 * MiB));
    qemuIo(child, 'vhdx', ['write -P 0x22 0 1M']);
    // Hyper-V writes the relative path as .\NAME; the name in another case, as Windows does not care
    makeDifferencing(child, currentHeader(fs.readFileSync(parent)).dataWriteGuid, './my linux.VHDX', new Map([[1, 0]]), () => false);
    expect(search(parent)).toMatchObject({ children: [child], stale: [], unreadable: [] });
    // qemu renews the parent's DataWriteGuid on its first write: the checkpoint no longer belongs to it
    qemuIo(parent, 'vhdx', ['write -P 0x33 2M 512']);
    const after = search(parent);
    expect(after.children).toEqual([]);
    expect(after.stale.map((s) => s.path)).toEqual([child]);
    expect(after.stale[0]!.why).toMatch(/data write GUID/);
  });

  it('a VirtualBox snapshot in Snapshots/{uuid}.vdi, by UUID alone; another VDI\'s snapshot is not', () => {
    const dir = makeTmpDir();
    const disk = path.join(dir, 'debian.vdi');
    const other = path.join(dir, 'other.vdi');
    qemuImg('create', '-q', '-f', 'vdi', disk, String(8 * MiB));
    qemuImg('create', '-q', '-f', 'vdi', other, String(8 * MiB));
    fs.mkdirSync(path.join(dir, 'Snapshots'));
    const snap = path.join(dir, 'Snapshots', '{5e0c1f7a-1111-4222-8333-944445555666}.vdi');
    vdiChild(disk, snap);
    expect(search(disk).children).toEqual([snap]);
    expect(search(other).children).toEqual([]);
  });

  it('Windows\' own differencing VHD (diskpart) is found beside the parent it names, by the parent\'s UUID', () => {
    const dir = makeTmpDir();
    const child = realWorld('fat-differential.vhd.xz', dir);
    const parentUuid = /[0-9a-f-]{36}/.exec(String(openImageDetails(child)['parent uuid']))![0];
    // a parent with that UUID: a qemu-made VHD whose footer (at the end, and its copy at 0) takes the UUID
    const parent = path.join(dir, 'fat-parent.vhd');
    qemuImg('create', '-q', '-f', 'vpc', parent, String(8 * MiB));
    setVhdUuid(parent, parentUuid);
    expect(search(parent).children).toEqual([child]);
    // the same file under the parent's name with another UUID is not its parent
    setVhdUuid(parent, '11111111-2222-4333-8444-555555555555');
    expect(search(parent).children).toEqual([]);
  });

  it('unrelated neighbours cost one small read each; a damaged one is reported, never thrown', () => {
    const dir = makeTmpDir();
    const disk = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', disk, '8M');
    qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'big.qcow2'), '64G');
    qemuImg('create', '-q', '-f', 'vpc', path.join(dir, 'big.vhd'), '64G');
    qemuImg('create', '-q', '-f', 'vdi', path.join(dir, 'big.vdi'), '64G');
    fs.writeFileSync(path.join(dir, 'notes.txt'), 'not an image');
    const broken = realWorld('afl9.vmdk.bz2', dir);
    const r = search(disk);
    expect(r.children).toEqual([]);
    for (const n of ['big.qcow2', 'big.vhd', 'big.vdi']) expect(r.bytesRead.get(path.join(dir, n)), n).toBeLessThanOrEqual(1024);
    expect(r.bytesRead.has(path.join(dir, 'notes.txt'))).toBe(false);
    expect(r.unreadable.map((u) => u.path)).toEqual([broken]);
  });

  it('mayHaveParent reads the headers of qcow2, VDI and VHD; VHDX and VMDK are opened to tell', () => {
    const dir = makeTmpDir();
    const f = (n: string) => path.join(dir, n);
    qemuImg('create', '-q', '-f', 'qcow2', f('a.qcow2'), '8M');
    qemuImg('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'a.qcow2', f('b.qcow2'));
    qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', f('c.vhd'), '8M');
    qemuImg('create', '-q', '-f', 'vhdx', f('d.vhdx'), '8M');
    const host = nodeChainHost();
    try {
      const may = (n: string) => mayHaveParent(host.openFile(f(n)));
      expect([may('a.qcow2'), may('b.qcow2'), may('c.vhd'), may('d.vhdx')]).toEqual([false, true, false, true]);
    } finally {
      host.close();
    }
  });
});

function openImageDetails(p: string): Record<string, unknown> {
  const host = nodeChainHost();
  try {
    // the child alone: its parent is not there yet
    return openLayer(host.openFile(p), { path: p, openFile: () => { throw new Error('no parent here'); } }).details;
  } finally {
    host.close();
  }
}

/** Sets a VHD's UUID in its footer (and the footer's copy at 0 of a dynamic VHD), with the checksum. */
function setVhdUuid(file: string, uuid: string): void {
  const b = fs.readFileSync(file);
  const hex = Buffer.from(uuid.replace(/-/g, ''), 'hex');
  for (const at of [b.length - 512, 0]) {
    if (b.toString('latin1', at, at + 8) !== 'conectix') continue;
    hex.copy(b, at + 68);
    b.writeUInt32BE(0, at + 64);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += b[at + i]!;
    b.writeUInt32BE(~sum >>> 0, at + 64);
  }
  fs.writeFileSync(file, b);
}

describe('a rw boot of an image with a child, or with a neighbour vdboot cannot check (planned on NTFS)', () => {
  it('a checkpoint beside it is named and refused; a damaged neighbour refuses rw too, naming it; snapshot boots either way', async () => {
    await loadNtfsMkdir();
    const dir = tmpDir();
    try {
      const guest = makeGuestDisk(dir);
      const disk = convert(guest, path.join(dir, 'disk.qcow2'), 'qcow2', ['preallocation=metadata']);
      const broken = realWorld('afl9.vmdk.bz2', dir);
      const ntfs = makeNtfs(dir, 'host', 60, 'Windows', { '/VMs/disk.qcow2': disk, '/VMs/old-export.vmdk': broken }, ['/VMs']);
      const host = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);
      const attempt = (cmdline: string): string => {
        const d = devicesOf([host]);
        try {
          planAgainstDevices(cmdline, d.devices);
          return 'planned';
        } catch (e) {
          return (e as Error).message;
        } finally {
          d.close();
        }
      };
      const msg = attempt('root=vdisk:LABEL=Windows:/VMs/disk.qcow2 rw');
      expect(msg).toMatch(/\/VMs\/disk\.qcow2 may be the parent of an image beside it that vdboot cannot check.*\/VMs\/old-export\.vmdk/s);
      expect(msg).toMatch(/repair or move away that file.*rd\.vdisk\.mode=snapshot/s);
      expect(attempt('root=vdisk:LABEL=Windows:/VMs/disk.qcow2 rd.vdisk.mode=snapshot')).toBe('planned');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
