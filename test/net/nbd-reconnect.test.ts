/**
 * The NBD reconnect daemon's logic (src/boot/nbd-reconnect.ts) without a kernel: its
 * command line, the kernel's NBD_CMD_LINK_DEAD announcements and the family's multicast
 * group as netlink bytes, the retry delays, an export checked against the device it must
 * replace (the exports served by real nbdkit servers), and the watch's state over a
 * simulated clock: lost, retried, back; refused; given up at the dead-connection timeout.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/block-reader.ts';
import { nbdHandshake, NBD_FLAG } from '../../src/formats/nbd.ts';
import { CTRL_ATTR, mcastGroupId, packAttrs, packGenl, parseAttrs } from '../../src/formats/netlink.ts';
import { NBD_NL_CMD } from '../../src/boot/nbd-client.ts';
import {
  exportMismatch, formatWatchArg, linkDeadIndexes, parseReconnectArgs, parseWatchArg, reconnectArgv, reconnectDelayMs,
  ReconnectWatch, RECONNECT_ARGV0, type AttemptFailure, type WatchedNbd,
} from '../../src/boot/nbd-reconnect.ts';
import { planBoot } from '../../src/boot/plan.ts';
import { startStdioNbdkit, type StdioNbd } from '../kit/nbd-server.ts';

const disk: WatchedNbd = { index: 0, size: 1 << 30, flags: NBD_FLAG.HAS_FLAGS | NBD_FLAG.READ_ONLY | NBD_FLAG.SEND_FLUSH, blockSize: 512, url: { server: '10.0.2.100', port: 10809, export: 'disk.vhdx' } };

describe('the daemon\'s command line', () => {
  it('a device round-trips through its argument, export names with commas, spaces and % included', () => {
    for (const name of ['disk.vhdx', 'images/a b,c%41.vhdx', '', 'ü/x']) {
      const w: WatchedNbd = { ...disk, index: 7, url: { server: '192.168.1.5', port: 10810, export: name } };
      expect(parseWatchArg(formatWatchArg(w))).toEqual(w);
    }
    expect(formatWatchArg(disk)).toBe(`nbd0,${1 << 30},7,512,nbd://10.0.2.100/disk.vhdx`);
  });

  it('malformed devices and a missing timeout are refused with a message', () => {
    expect(parseWatchArg('nbd0,12,0,512')).toMatch(/is not nbdINDEX,SIZE,FLAGS,BLOCKSIZE,nbd:/);
    expect(parseWatchArg('nbd0,12,0,500,nbd://1.2.3.4/x')).toMatch(/out of range/);
    expect(parseWatchArg('nbd0,12,70000,512,nbd://1.2.3.4/x')).toMatch(/out of range/);
    expect(parseWatchArg('nbd0,12,0,512,nbd://1.2.3.4:99999/x')).toMatch(/port 99999/);
    expect(parseReconnectArgs([formatWatchArg(disk)])).toMatch(/no --dead-timeout/);
    expect(parseReconnectArgs(['--dead-timeout=300'])).toMatch(/no device to watch/);
    expect(parseReconnectArgs(['--dead-timeout=300', 'nbd0'])).toMatch(/is not nbdINDEX/);
  });

  it('the init starts it under "@vdboot-nbd" with the timeout and every device', () => {
    const argv = reconnectArgv([disk, { ...disk, index: 3 }], 300, true);
    expect(argv[0]).toBe(RECONNECT_ARGV0);
    expect(argv[0]!.startsWith('@')).toBe(true);
    expect(parseReconnectArgs(argv.slice(1))).toEqual({ deadTimeoutS: 300, quiet: true, watched: [disk, { ...disk, index: 3 }] });
  });

  it('rd.vdisk.nbd.timeout= sets the wait; a bad value is a warning', () => {
    expect(planBoot('root=vdisk:nbd://10.0.2.100/d.vhdx rd.vdisk.nbd.timeout=900').vdisk.nbdTimeout).toBe(900);
    const bad = planBoot('root=vdisk:nbd://10.0.2.100/d.vhdx rd.vdisk.nbd.timeout=soon');
    expect(bad.vdisk.nbdTimeout).toBeUndefined();
    expect(bad.warnings.join('\n')).toMatch(/rd\.vdisk\.nbd\.timeout=soon is not a number of seconds from 1 to 86400; I\/O waits 300 s/);
  });
});

describe('the kernel\'s announcements', () => {
  const family = 0x1a;
  const linkDead = (index: number, cmd: number = NBD_NL_CMD.LINK_DEAD, fam = family) => packGenl(fam, cmd, 1, 0, [{ type: 1, u32: index }], 0);
  const concat = (...parts: Uint8Array[]) => Uint8Array.from(parts.flatMap((p) => [...p]));

  it('NBD_CMD_LINK_DEAD names the device; other commands and families are not announcements of a lost server', () => {
    expect(linkDeadIndexes(linkDead(3), family)).toEqual([3]);
    expect(linkDeadIndexes(concat(linkDead(0), linkDead(1, NBD_NL_CMD.RECONFIGURE), linkDead(2, NBD_NL_CMD.LINK_DEAD, 0x1b), linkDead(4)), family)).toEqual([0, 4]);
    // LINK_DEAD without its index names nothing
    expect(linkDeadIndexes(packGenl(family, NBD_NL_CMD.LINK_DEAD, 1, 0, [], 0), family)).toEqual([]);
  });

  it('a datagram cut short or lying about its lengths is a FormatError, never another exception', () => {
    const whole = linkDead(5);
    expect(() => linkDeadIndexes(whole.subarray(0, whole.length - 2), family)).toThrow(FormatError);
    const lying = whole.slice();
    new DataView(lying.buffer).setUint16(20, 200, true); // the attribute's length
    expect(() => linkDeadIndexes(lying, family)).toThrow(FormatError);
    for (let i = 0; i < 2000; i++) {
      const b = whole.slice();
      b[i % b.length] = (b[i % b.length]! + 1 + (i >> 4)) & 0xff;
      try { linkDeadIndexes(b, family); } catch (e) { expect(e).toBeInstanceOf(FormatError); }
    }
  });

  it('the multicast group is found by name among the family\'s groups', () => {
    const reply = packAttrs([
      { type: CTRL_ATTR.FAMILY_ID, u16: family },
      { type: CTRL_ATTR.FAMILY_NAME, str: 'nbd' },
      { type: CTRL_ATTR.MCAST_GROUPS, nested: [
        { type: 1, nested: [{ type: 2, u32: 9 }, { type: 1, str: 'other' }] },
        { type: 2, nested: [{ type: 2, u32: 11 }, { type: 1, str: 'nbd_mc_group' }] },
      ] },
    ]);
    expect(mcastGroupId(parseAttrs(reply), 'nbd_mc_group')).toBe(11);
    expect(mcastGroupId(parseAttrs(reply), 'missing')).toBeUndefined();
    expect(mcastGroupId(parseAttrs(packAttrs([{ type: CTRL_ATTR.FAMILY_ID, u16: family }])), 'nbd_mc_group')).toBeUndefined();
  });
});

describe('an export found again, checked against the device (real nbdkit servers)', () => {
  let dir: string;
  const servers: StdioNbd[] = [];
  const handshake = (args: string[]) => {
    const s = startStdioNbdkit(args);
    servers.push(s);
    return nbdHandshake(s.transport, '', 'nbd://test/');
  };
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'nbd-reconnect-'));
    writeFileSync(join(dir, 'a.img'), randomBytes(1 << 20));
    writeFileSync(join(dir, 'b.img'), randomBytes(2 << 20));
  });
  afterAll(() => {
    for (const s of servers) s.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('the same file served again is the same export', () => {
    const first = handshake(['file', join(dir, 'a.img')]);
    const w: WatchedNbd = { ...disk, size: first.size, flags: first.flags };
    expect(exportMismatch(w, handshake(['file', join(dir, 'a.img')]))).toBeUndefined();
    // a server that now allows more (writes where the device is read-only) is fine
    expect(exportMismatch({ ...w, flags: handshake(['-r', 'file', join(dir, 'a.img')]).flags }, first)).toBeUndefined();
  });

  it('another size is another image: refused, with both sizes', () => {
    const first = handshake(['file', join(dir, 'a.img')]);
    const w: WatchedNbd = { ...disk, size: first.size, flags: first.flags };
    expect(exportMismatch(w, handshake(['file', join(dir, 'b.img')]))).toBe(
      'the export is now 2097152 bytes; it was 1048576 bytes when /dev/nbd0 was connected, so the server serves another image under that name. ' +
      'vdboot does not reconnect to it (the system above /dev/nbd0 was read from the other one): serve the original image again');
  });

  it('a writable device whose server is now read-only, or no longer takes requests it sends, is refused', () => {
    const first = handshake(['file', join(dir, 'a.img')]);
    const w: WatchedNbd = { ...disk, size: first.size, flags: first.flags };
    expect(w.flags & NBD_FLAG.READ_ONLY).toBe(0);
    expect(exportMismatch(w, handshake(['-r', 'file', join(dir, 'a.img')]))).toMatch(/now exports it read-only; \/dev\/nbd0 was connected writable/);
    expect(w.flags & 64).toBe(64);
    expect(exportMismatch(w, handshake(['--filter=nozero', 'file', join(dir, 'a.img'), 'zeromode=none']))).toMatch(/no longer accepts write zeroes requests/);
    const blocks = handshake(['--filter=blocksize-policy', 'file', join(dir, 'a.img'), 'blocksize-minimum=4096', 'blocksize-preferred=4096', 'blocksize-maximum=65536']);
    expect(exportMismatch(w, blocks)).toMatch(/needs blocks of at least 4096 bytes; \/dev\/nbd0 uses 512/);
  });
});

describe('retries', () => {
  it('wait 0.5 s, then twice as long each time, at most 5 s', () => {
    expect([1, 2, 3, 4, 5, 6, 50].map(reconnectDelayMs)).toEqual([500, 1000, 2000, 4000, 5000, 5000, 5000]);
  });
});

/** A watch over a simulated clock: each attempt takes `attemptMs` and answers from `answers` (undefined: connected). */
function simulate(devices: WatchedNbd[], deadTimeoutMs: number, answer: (index: number, at: number) => AttemptFailure | undefined, attemptMs = 40) {
  let clock = 1000;
  const lines: string[] = [];
  const attempts: { index: number; at: number }[] = [];
  const watch = new ReconnectWatch(devices, deadTimeoutMs, {
    now: () => clock,
    attempt: (w) => {
      attempts.push({ index: w.index, at: clock });
      const r = answer(w.index, clock);
      clock += attemptMs;
      return r;
    },
    log: { info: (m) => lines.push(`info ${m}`), warn: (m) => lines.push(`warn ${m}`), error: (m) => lines.push(`error ${m}`) },
  });
  /** runs the daemon's loop until nothing is lost or `until` */
  const run = (until: number) => {
    for (;;) {
      const wait = watch.nextDueIn();
      if (wait === undefined || clock + wait > until) return;
      clock += wait;
      watch.runDue();
    }
  };
  return { watch, lines, attempts, run, at: () => clock, advance: (ms: number) => { clock += ms; } };
}

describe('the watch', () => {
  const closed: AttemptFailure = { error: 'nbd://10.0.2.100/disk.vhdx: the server closed the connection (0 of 16 bytes arrived)' };

  it('a lost server is retried at once, then after growing delays, and the console says when it is back', () => {
    const s = simulate([disk], 300_000, (_, at) => (at < 4000 ? closed : undefined));
    expect(s.watch.nextDueIn()).toBeUndefined();
    s.watch.linkDead(0);
    expect(s.watch.lost).toEqual([0]);
    expect(s.watch.nextDueIn()).toBe(0);
    s.run(Infinity);
    // at 1000 (the loss), then 0.5 s, 1 s, 2 s after each failed attempt (each takes 40 ms)
    expect(s.attempts.map((a) => a.at)).toEqual([1000, 1540, 2580, 4620]);
    expect(s.watch.lost).toEqual([]);
    expect(s.lines).toEqual([
      'warn nbd: lost the connection to nbd://10.0.2.100/disk.vhdx (/dev/nbd0); reconnecting. I/O on /dev/nbd0 waits until the server is back (at most 300 s)',
      // the same failure is said once, not at every attempt
      'warn nbd: /dev/nbd0: nbd://10.0.2.100/disk.vhdx: the server closed the connection (0 of 16 bytes arrived) (attempt 1; retrying for 300 s more)',
      'info nbd: reconnected /dev/nbd0 to nbd://10.0.2.100/disk.vhdx after 3.7 s (4 attempts); its I/O goes on',
    ]);
    expect(s.watch.watching).toBe(1);
  });

  it('another device\'s announcement, and a repeated one during an outage, change nothing', () => {
    const s = simulate([disk], 300_000, () => closed);
    s.watch.linkDead(5);
    expect(s.watch.lost).toEqual([]);
    expect(s.lines).toEqual([]);
    s.watch.linkDead(0);
    s.run(3000);
    const attempts = s.attempts.length;
    s.watch.linkDead(0);
    expect(s.watch.nextDueIn()).toBeGreaterThan(0);
    expect(s.lines.filter((l) => l.includes('lost the connection'))).toHaveLength(1);
    expect(s.attempts).toHaveLength(attempts);
  });

  it('a server serving another image is refused until the timeout, said again every 30 s, then given up: the device is no longer watched', () => {
    const other: AttemptFailure = { error: 'nbd://10.0.2.100/disk.vhdx: the export is now 2097152 bytes; it was 1048576 bytes …', refused: true };
    const s = simulate([disk, { ...disk, index: 1 }], 60_000, () => other);
    s.watch.linkDead(0);
    s.run(Infinity);
    const refusals = s.lines.filter((l) => l.startsWith('error nbd: /dev/nbd0: nbd://10.0.2.100/disk.vhdx: the export is now'));
    expect(refusals.length).toBe(2); // at the first attempt and 30 s later
    expect(refusals[0]).toMatch(/\(attempt 1; retrying for 60 s more\)$/);
    // the last attempt falls on the deadline (1000 + 60 000)
    expect(s.attempts.at(-1)!.at).toBe(61_000);
    expect(s.lines.at(-1)).toMatch(/^error nbd: gave up reconnecting \/dev\/nbd0 to nbd:\/\/10\.0\.2\.100\/disk\.vhdx after 60\.0 s and \d+ attempts \(last: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the export is now 2097152 bytes; it was 1048576 bytes …\)\. The kernel's dead-connection timeout \(60 s, rd\.vdisk\.nbd\.timeout=\) is over: I\/O on \/dev\/nbd0 fails from now on\./);
    expect(s.watch.watching).toBe(1);
    expect(s.watch.lost).toEqual([]);
    // nbd0 is no longer watched: a new announcement for it is ignored, nbd1's is not
    s.watch.linkDead(0);
    expect(s.watch.lost).toEqual([]);
    s.watch.linkDead(1);
    expect(s.watch.lost).toEqual([1]);
  });

  it('two devices lost at once are retried each on its own schedule', () => {
    const s = simulate([disk, { ...disk, index: 1, url: { ...disk.url, export: 'base.vhdx' } }], 300_000, (index, at) => (index === 0 ? (at < 2000 ? closed : undefined) : at < 5000 ? closed : undefined));
    s.watch.linkDead(0);
    s.watch.linkDead(1);
    s.run(Infinity);
    expect(s.attempts.filter((a) => a.index === 0).map((a) => a.at)).toEqual([1000, 1540, 2580]);
    expect(s.attempts.filter((a) => a.index === 1).map((a) => a.at)).toEqual([1040, 1580, 2620, 4660, 8700]);
    expect(s.lines.filter((l) => l.startsWith('info nbd: reconnected'))).toEqual([
      'info nbd: reconnected /dev/nbd0 to nbd://10.0.2.100/disk.vhdx after 1.6 s (3 attempts); its I/O goes on',
      'info nbd: reconnected /dev/nbd1 to nbd://10.0.2.100/base.vhdx after 7.7 s (5 attempts); its I/O goes on',
    ]);
  });
});
