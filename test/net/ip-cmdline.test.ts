/** The network options' grammar (src/boot/net-cmdline.ts) and how the plan takes them with root=vdisk:nbd://. */
import { describe, expect, it } from 'vitest';
import { parseIp, parseIfname, prefixLength, planNet } from '../../src/boot/net-cmdline.ts';
import { planBoot } from '../../src/boot/plan.ts';

describe('ip= grammar', () => {
  it('dhcp and its synonyms', () => {
    for (const v of ['dhcp', 'on', 'any']) expect(parseIp(v)).toEqual({ method: 'dhcp', text: v });
    expect(parseIp('eth1:dhcp')).toEqual({ method: 'dhcp', iface: 'eth1', text: 'eth1:dhcp' });
    expect(parseIp('eth1:dhcp:1400:52:54:00:12:34:56')).toEqual({ method: 'dhcp', iface: 'eth1', mtu: 1400, mac: '52:54:00:12:34:56', text: 'eth1:dhcp:1400:52:54:00:12:34:56' });
  });
  it('static: CLIENT:[SERVER]:GW:NETMASK:HOSTNAME:IFACE:none', () => {
    expect(parseIp('192.168.1.20::192.168.1.1:255.255.255.0:kiosk1:eth0:none')).toEqual({
      method: 'static', address: '192.168.1.20', prefix: 24, gateway: '192.168.1.1', hostname: 'kiosk1', iface: 'eth0', text: '192.168.1.20::192.168.1.1:255.255.255.0:kiosk1:eth0:none',
    });
    expect(parseIp('10.1.2.3:10.1.0.1::16:::off')).toMatchObject({ method: 'static', address: '10.1.2.3', server: '10.1.0.1', prefix: 16 });
    expect(parseIp('10.1.2.3::::::none')).toMatchObject({ address: '10.1.2.3', prefix: 8 });
    // the kernel's trailing DNS and NTP servers are accepted and ignored
    expect(parseIp('10.0.0.5::10.0.0.1:255.0.0.0::eth0:none:10.0.0.53:10.0.0.54:10.0.0.1')).toMatchObject({ address: '10.0.0.5', prefix: 8, gateway: '10.0.0.1' });
    // the kernel's empty client with dhcp
    expect(parseIp(':::::eth0:dhcp')).toEqual({ method: 'dhcp', iface: 'eth0', text: ':::::eth0:dhcp' });
  });
  it('malformed values get a message naming the field', () => {
    expect(parseIp('192.168.1.300::192.168.1.1:255.255.255.0::eth0:none')).toMatch(/client address "192\.168\.1\.300"/);
    expect(parseIp('192.168.1.20::192.168.1.1:255.0.255.0::eth0:none')).toMatch(/netmask "255\.0\.255\.0" is not a netmask/);
    expect(parseIp('192.168.1.20::gw:24::eth0:none')).toMatch(/gateway "gw"/);
    expect(parseIp('192.168.1.20::::x:eth0:bogus')).toMatch(/"bogus" is not none, off or dhcp/);
    expect(parseIp('dhcp6')).toMatch(/IPv6 configuration is not supported/);
    expect(parseIp('eth0:dhcp:9')).toMatch(/MTU "9"/);
    expect(parseIp('eth0:dhcp:1500:zz')).toMatch(/not a MAC address/);
    expect(parseIp('nonsense')).toMatch(/not a form vdboot knows/);
  });
  it('netmasks and prefixes', () => {
    expect(prefixLength('255.255.255.0')).toBe(24);
    expect(prefixLength('255.255.254.0')).toBe(23);
    expect(prefixLength('0.0.0.0')).toBe(0);
    expect(prefixLength('255.255.255.255')).toBe(32);
    expect(prefixLength('20')).toBe(20);
    expect(prefixLength('33')).toBeUndefined();
    expect(prefixLength('255.0.255.0')).toBeUndefined();
  });
  it('ifname=NAME:MAC', () => {
    expect(parseIfname('lan0:52:54:00:AB:CD:EF')).toEqual({ name: 'lan0', mac: '52:54:00:ab:cd:ef' });
    expect(parseIfname('lan0')).toMatch(/not a MAC address/);
  });
  it('planNet: warnings for the bad ones, rd.neednet', () => {
    const w: string[] = [];
    const n = planNet({ ip: ['dhcp', 'bogus'], ifname: ['x:1'], neednet: '1' }, w);
    expect(n.ip).toHaveLength(1);
    expect(n.need).toBe(true);
    expect(w.join('\n')).toMatch(/ip=bogus .*ignored[\s\S]*ifname=x:1/);
  });
});

describe('root=vdisk:nbd:// in the plan', () => {
  it('the export, the network on, snapshot mode by default', () => {
    const p = planBoot('root=vdisk:nbd://10.0.2.100/images/disk.vhdx ip=dhcp');
    expect(p.root).toEqual({ kind: 'vdisk', path: '/images/disk.vhdx', nbd: { server: '10.0.2.100', port: 10809, export: 'images/disk.vhdx' } });
    expect(p.vdisk.mode).toBe('snapshot');
    expect(p.net.need).toBe(true);
    expect(p.warnings).toEqual([]);
  });
  it('rd.vdisk.mode=rw is kept; rd.vdisk.overlay.size is checked', () => {
    const p = planBoot('root=vdisk:nbd://10.0.2.100:10810/d.vhdx rd.vdisk.mode=rw rd.vdisk.overlay.size=lots');
    expect(p.vdisk.mode).toBe('rw');
    expect(p.warnings.join('\n')).toMatch(/rd\.vdisk\.overlay\.size=lots is not a size/);
    expect(planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay.size=25%').vdisk.overlaySize).toBe('25%');
  });
  it('rd.vdisk.attach=nbd:// and a malformed URL', () => {
    const p = planBoot('root=UUID=1234 rd.vdisk.attach=nbd://10.0.0.1/data.qcow2');
    expect(p.vdisk.attach).toEqual([{ path: '/data.qcow2', nbd: { server: '10.0.0.1', port: 10809, export: 'data.qcow2' }, from: 'rd.vdisk.attach=nbd://10.0.0.1/data.qcow2' }]);
    expect(p.vdisk.mode).toBe('snapshot');
    expect(() => planBoot('root=vdisk:nbd://10.0.0.1:99999/x')).toThrow(/port 99999/);
  });
  it('rd.neednet alone turns the network on, and is no longer called foreign', () => {
    const p = planBoot('root=/dev/vda1 rd.neednet=1 ip=eth0:dhcp');
    expect(p.net).toMatchObject({ need: true, ip: [{ method: 'dhcp', iface: 'eth0' }] });
    expect(p.warnings).toEqual([]);
  });
});
