/**
 * Run by native.test.ts as an ordinary process: utimensat and lsetxattr of the static
 * host on the files named in argv, and the *at calls the unpacker makes entries with in
 * the directory named third, printing what happened as one JSON line.
 */
import * as native from 'sys';
import { quickjsSys } from '../../src/sys/quickjs.ts';
import { AT, O, RESOLVE, S } from '../../src/sys/sys.ts';

const sys = quickjsSys(native);
const [file, link, dir] = native.args.slice(1);
const out: Record<string, unknown> = {};
const attempt = (name: string, f: () => unknown): void => {
  try {
    out[name] = f() ?? 'ok';
  } catch (e) {
    const err = e as { name?: string; code?: string; message?: string };
    out[name] = `${err.name} ${err.code ?? err.message}`;
  }
};
attempt('fileTime', () => sys.utimensat(file!, 1_600_000_000, 123_456_789, true));
attempt('linkTime', () => sys.utimensat(link!, 1_500_000_000, 0, true));
attempt('xattr', () => sys.lsetxattr(file!, 'user.vdboot', new Uint8Array([0x68, 0x69, 0x00, 0xff])));
attempt('capability', () => sys.lsetxattr(file!, 'security.capability', new Uint8Array([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])));
attempt('missing', () => sys.utimensat(`${file}.missing`, 0, 0, true));
attempt('badNsec', () => sys.utimensat(file!, 0, 1_000_000_000, true));
// In `dir`: "sub" a directory, "out" a symbolic link to the directory outside it.
const beneath = RESOLVE.BENEATH | RESOLVE.NO_SYMLINKS | RESOLVE.NO_MAGICLINKS;
const dirFlags = O.PATH | O.DIRECTORY | O.CLOEXEC;
const root = sys.open(dir!, dirFlags);
attempt('throughLink', () => sys.openat2(root, 'out', dirFlags, 0, beneath));
attempt('dotDot', () => sys.openat2(root, 'sub/../..', dirFlags, 0, beneath));
attempt('make', () => {
  const sub = sys.openat2(root, 'sub', dirFlags, 0, beneath);
  sys.mkdirat(sub, 'd', 0o750);
  const fd = sys.openat(sub, 'f', O.WRONLY | O.CREAT | O.EXCL | O.CLOEXEC, 0o640);
  sys.write(fd, new Uint8Array([0x61, 0x62]));
  sys.close(fd);
  sys.symlinkat('f', sub, 'l');
  sys.linkat(sub, 'f', sub, 'h', 0);
  sys.mknodat(sub, 'p', S.IFIFO | 0o600, 0, 0);
  sys.fchownat(sub, 'f', 1000, 100, AT.SYMLINK_NOFOLLOW);
  sys.fchownat(sub, 'l', 1001, 101, AT.SYMLINK_NOFOLLOW);
  sys.fchmodat(sub, 'f', 0o4750);
  sys.utimensatAt(sub, 'l', 1_500_000_000, 5, AT.SYMLINK_NOFOLLOW);
  sys.utimensatAt(sub, 'f', 1_600_000_000, 7, AT.SYMLINK_NOFOLLOW);
  const st = sys.fstatat(sub, 'h', AT.SYMLINK_NOFOLLOW);
  const lst = sys.fstatat(sub, 'l', AT.SYMLINK_NOFOLLOW);
  sys.mkdirat(sub, 'gone', 0o700);
  sys.unlinkat(sub, 'gone', AT.REMOVEDIR);
  sys.close(sub);
  return { mode: st.mode, nlink: st.nlink, uid: st.uid, linkType: lst.mode & S.IFMT };
});
attempt('directoryOnFile', () => sys.openat(AT.FDCWD, file!, dirFlags));
attempt('noFollow', () => sys.openat(AT.FDCWD, link!, O.RDONLY | O.NOFOLLOW | O.CLOEXEC));
attempt('exclusive', () => sys.openat(root, 'sub/f', O.WRONLY | O.CREAT | O.EXCL | O.CLOEXEC, 0o600));
sys.close(root);
const block = new Uint8Array(600);
for (let i = 0; i < block.length; i++) block[i] = (i * 7 + 3) & 255;
attempt('byteSum', () => [sys.byteSum(block), sys.byteSum(block.subarray(88, 600)), sys.byteSum(new Uint8Array(512).fill(255))]);
sys.print(`TMPFS-NATIVE ${JSON.stringify(out)}`);
sys.exit(0);
