/**
 * The end-to-end kit's recorded machine: a sysfs tree and a mount table as a QEMU machine
 * with an AHCI disk (sda, a partition sda1) and a virtio disk (vda) shows them, symlinks and
 * all, plus a loop device, a virtio network card (eth0), a Wi-Fi card and the loopback interface; for `mkinitramfs --hostonly` tests, which read them instead of
 * the build machine's.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-sysfs-'));
}

/**
 * The sysfs tree: drivers bound along each disk's device chain, with the module links and
 * modaliases the kernel writes; input devices (a USB keyboard behind xHCI, a power button
 * that is no keyboard); and, when asked, device-mapper devices with their uuids.
 */
export function recordedSysfs(opts: { dmUuids?: string[] } = {}): string {
  const sys = path.join(tmpdir(), 'sys');
  const mk = (p: string) => fs.mkdirSync(path.join(sys, p), { recursive: true });
  const ln = (target: string, p: string) => fs.symlinkSync(path.join(sys, target), path.join(sys, p));
  const write = (p: string, text: string) => fs.writeFileSync(path.join(sys, p), text);
  for (const [bus, driver, module] of [['pci', 'ahci', 'ahci'], ['scsi', 'sd', 'sd_mod'], ['virtio', 'virtio_blk', 'virtio_blk'], ['pci', 'virtio-pci', 'virtio_pci'], ['virtio', 'virtio_net', 'virtio_net'], ['pci', 'iwlwifi', 'iwlwifi']] as const) {
    mk(`module/${module}`);
    mk(`bus/${bus}/drivers/${driver}`);
    ln(`module/${module}`, `bus/${bus}/drivers/${driver}/module`);
  }
  const ahci = 'devices/pci0000:00/0000:00:1f.2';
  const scsiDisk = `${ahci}/ata1/host0/target0:0:0/0:0:0:0`;
  mk(`${scsiDisk}/block/sda/sda1`);
  write(`${ahci}/modalias`, 'pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01\n');
  ln('bus/pci/drivers/ahci', `${ahci}/driver`);
  ln('bus/scsi/drivers/sd', `${scsiDisk}/driver`);
  write(`${scsiDisk}/block/sda/sda1/partition`, '1\n');
  write(`${scsiDisk}/modalias`, 'scsi:t-0x00\n');
  const virtio = 'devices/pci0000:00/0000:00:04.0';
  mk(`${virtio}/virtio1/block/vda`);
  ln('bus/pci/drivers/virtio-pci', `${virtio}/driver`);
  ln('bus/virtio/drivers/virtio_blk', `${virtio}/virtio1/driver`);
  write(`${virtio}/virtio1/modalias`, 'virtio:d00000002v00001AF4\n');
  // network: a virtio NIC (eth0), a Wi-Fi card (wlan0, skipped), the loopback (lo, no device)
  const nic = 'devices/pci0000:00/0000:00:03.0';
  mk(`${nic}/virtio0/net/eth0`);
  ln('bus/pci/drivers/virtio-pci', `${nic}/driver`);
  ln('bus/virtio/drivers/virtio_net', `${nic}/virtio0/driver`);
  write(`${nic}/virtio0/modalias`, 'virtio:d00000001v00001AF4\n');
  const wifi = 'devices/pci0000:00/0000:00:1c.0/0000:02:00.0';
  mk(`${wifi}/net/wlan0/wireless`);
  ln('bus/pci/drivers/iwlwifi', `${wifi}/driver`);
  mk('devices/virtual/net/lo');
  mk('class/net');
  ln(`${nic}/virtio0/net/eth0`, 'class/net/eth0');
  ln(`${wifi}/net/wlan0`, 'class/net/wlan0');
  ln('devices/virtual/net/lo', 'class/net/lo');
  ln(`${nic}/virtio0`, `${nic}/virtio0/net/eth0/device`);
  ln(wifi, `${wifi}/net/wlan0/device`);
  mk('devices/virtual/block/loop0');
  mk('class/block');
  ln(`${scsiDisk}/block/sda`, 'class/block/sda');
  ln(`${scsiDisk}/block/sda/sda1`, 'class/block/sda1');
  ln(`${virtio}/virtio1/block/vda`, 'class/block/vda');
  ln('devices/virtual/block/loop0', 'class/block/loop0');
  ln(scsiDisk, `${scsiDisk}/block/sda/device`);
  ln(`${virtio}/virtio1`, `${virtio}/virtio1/block/vda/device`);

  // a USB keyboard: xHCI controller → root hub → device → HID interface → HID device → input
  for (const [bus, driver, module] of [['pci', 'xhci_hcd', 'xhci_pci'], ['usb', 'usbhid', 'usbhid'], ['hid', 'hid-generic', 'hid_generic']] as const) {
    mk(`module/${module}`);
    mk(`bus/${bus}/drivers/${driver}`);
    ln(`module/${module}`, `bus/${bus}/drivers/${driver}/module`);
  }
  mk('bus/usb/drivers/usb');
  const xhci = 'devices/pci0000:00/0000:00:14.0';
  const iface = `${xhci}/usb1/1-1/1-1:1.0`;
  const hid = `${iface}/0003:0627:0001.0001`;
  mk(`${hid}/input/input5/capabilities`);
  write(`${xhci}/modalias`, 'pci:v00008086d00001E31sv00001AF4sd00001100bc0Csc03i30\n');
  ln('bus/pci/drivers/xhci_hcd', `${xhci}/driver`);
  ln('bus/usb/drivers/usb', `${xhci}/usb1/driver`);
  ln('bus/usb/drivers/usb', `${xhci}/usb1/1-1/driver`);
  ln('bus/usb/drivers/usbhid', `${iface}/driver`);
  write(`${iface}/modalias`, 'usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00\n');
  ln('bus/hid/drivers/hid-generic', `${hid}/driver`);
  write(`${hid}/modalias`, 'hid:b0003g0001v00000627p00000001\n');
  // KEY_ENTER (28) and the letters: a keyboard
  write(`${hid}/input/input5/capabilities/key`, '1000000000007 ff800000000007ff febeffdff3cfffff fffffffffffffffe\n');
  // a power button: keys, but no KEY_ENTER
  const button = 'devices/LNXSYSTM:00/LNXPWRBN:00';
  mk(`${button}/input/input0/capabilities`);
  write(`${button}/input/input0/capabilities/key`, '10000000000000 0\n');
  mk('class/input');
  ln(`${hid}/input/input5`, 'class/input/input5');
  ln(`${button}/input/input0`, 'class/input/input0');

  for (const [i, uuid] of (opts.dmUuids ?? []).entries()) {
    mk(`devices/virtual/block/dm-${i}/dm`);
    write(`devices/virtual/block/dm-${i}/dm/uuid`, `${uuid}\n`);
    ln(`devices/virtual/block/dm-${i}`, `class/block/dm-${i}`);
  }
  return sys;
}

/**
 * The mount table: the ext4 root on vda1, and (unless `plain`) an ntfs-3g host (fuseblk) on
 * sda1 at /run/vdboot/host — a machine booted by vdboot from an image file.
 */
export function recordedMounts(opts: { plain?: boolean } = {}): string {
  const file = path.join(tmpdir(), 'mounts');
  fs.writeFileSync(file, [
    '/dev/vda1 / ext4 rw,relatime 0 0',
    'proc /proc proc rw 0 0',
    'tmpfs /run tmpfs rw 0 0',
    ...(opts.plain ? [] : ['/dev/sda1 /run/vdboot/host fuseblk rw,user_id=0 0 0']),
    '',
  ].join('\n'));
  return file;
}

