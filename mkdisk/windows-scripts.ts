/**
 * `windows-install.cmd` and `windows-uninstall.cmd`, written by `vdboot kit` beside the
 * Secure Boot chain in EFI/vdboot/: run as administrator on Windows, they copy the folder
 * they are in to the PC's EFI system partition and add a firmware boot entry for its
 * shimx64.efi (`bcdedit /copy {bootmgr}`, then `path`), and undo exactly that.
 *
 * What they touch, in order, and what each failure leaves:
 *  install:   net session (no admin rights: nothing is changed) → mountvol S: /S (S: must
 *             be free) → a previous install (EFI\vdboot\bcd-id.txt) stops it → xcopy the
 *             folder (a failure removes the partial copy) → bcdedit /copy (no id: the copy
 *             is removed) → bcdedit /set path, displayorder (a failure deletes the new entry
 *             and the copy) → the id into EFI\vdboot\bcd-id.txt → mountvol S: /D.
 *  uninstall: net session → mountvol S: /S → bcd-id.txt names the entry → bcdedit /delete →
 *             rmdir EFI\vdboot → mountvol S: /D.
 * Batch files are read by cmd.exe with CRLF line ends; both files are plain ASCII.
 */

/** A name for bcdedit /d and echo: printable ASCII without the characters cmd.exe treats specially inside quotes. */
export function windowsEntryName(title: string): string {
  const clean = title.replace(/[^\x20-\x7e]/g, '?').replace(/["%!^]/g, '').trim();
  return clean || 'Linux (vdboot)';
}

function crlf(lines: string[]): string {
  return lines.join('\r\n') + '\r\n';
}

const ADMIN_CHECK = [
  'net session >nul 2>&1',
  'if errorlevel 1 (',
  '  echo vdboot: this needs administrator rights: right-click %~nx0 and choose "Run as administrator".',
  '  echo vdboot: nothing was changed.',
  '  pause',
  '  exit /b 1',
  ')',
];

const MOUNT_ESP = [
  'if exist S:\\ (',
  '  echo vdboot: drive S: is in use; this script mounts the EFI system partition there. Free S: and run it again.',
  '  echo vdboot: nothing was changed.',
  '  pause',
  '  exit /b 1',
  ')',
  'mountvol S: /S',
  'if errorlevel 1 (',
  '  echo vdboot: mountvol S: /S could not mount the EFI system partition: is this PC started in UEFI mode? ^(msinfo32: BIOS mode^)',
  '  echo vdboot: nothing was changed.',
  '  pause',
  '  exit /b 1',
  ')',
];

export function windowsInstallScript(title: string): string {
  const name = windowsEntryName(title);
  return crlf([
    '@echo off',
    `rem vdboot kit: adds "${name}" to this PC's firmware boot menu.`,
    'rem It copies the folder this file is in (shim, GRUB, the kernel, the initramfs) to the',
    'rem EFI system partition as \\EFI\\vdboot and adds a boot entry for \\EFI\\vdboot\\shimx64.efi',
    'rem (signed for Secure Boot). Run it as administrator. windows-uninstall.cmd undoes it.',
    'setlocal EnableExtensions EnableDelayedExpansion',
    ...ADMIN_CHECK,
    'set "SRC=%~dp0"',
    'if "%SRC:~-1%"=="\\" set "SRC=%SRC:~0,-1%"',
    'if not exist "%SRC%\\shimx64.efi" (',
    '  echo vdboot: "%SRC%\\shimx64.efi" is missing: run this file from the EFI\\vdboot folder the kit wrote.',
    '  echo vdboot: nothing was changed.',
    '  pause',
    '  exit /b 1',
    ')',
    ...MOUNT_ESP,
    'if exist "S:\\EFI\\vdboot\\bcd-id.txt" (',
    '  set /p OLD=<"S:\\EFI\\vdboot\\bcd-id.txt"',
    '  echo vdboot: already installed as boot entry !OLD!: run windows-uninstall.cmd first.',
    '  mountvol S: /D',
    '  pause',
    '  exit /b 1',
    ')',
    // Debian's signed GRUB reads EFI\debian\grub.cfg before the one in its own folder
    'if exist "S:\\EFI\\debian\\grub.cfg" echo vdboot: note: S:\\EFI\\debian\\grub.cfg exists ^(a Debian on this PC^): the new entry will show Debian\'s GRUB menu; add the kit\'s GRUB entry to that Debian instead.',
    'echo vdboot: copying "%SRC%" to S:\\EFI\\vdboot',
    'xcopy "%SRC%" "S:\\EFI\\vdboot\\" /E /I /Y /Q',
    'if errorlevel 1 (',
    '  echo vdboot: the copy failed ^(is the EFI system partition full? it needs about 40 MB^); removing the partial copy.',
    '  rmdir /s /q "S:\\EFI\\vdboot"',
    '  mountvol S: /D',
    '  pause',
    '  exit /b 1',
    ')',
    'set "ID="',
    `for /f "tokens=2 delims={}" %%G in ('bcdedit /copy {bootmgr} /d "${name}"') do set "ID={%%G}"`,
    'if not defined ID (',
    '  echo vdboot: bcdedit /copy {bootmgr} gave no new entry id; removing the copy.',
    '  rmdir /s /q "S:\\EFI\\vdboot"',
    '  mountvol S: /D',
    '  pause',
    '  exit /b 1',
    ')',
    'bcdedit /set !ID! path \\EFI\\vdboot\\shimx64.efi',
    'if errorlevel 1 goto :undo',
    'bcdedit /set {fwbootmgr} displayorder !ID! /addlast',
    'if errorlevel 1 goto :undo',
    '>"S:\\EFI\\vdboot\\bcd-id.txt" echo !ID!',
    'echo.',
    `echo vdboot: added the firmware boot entry !ID! "${name}":`,
    'bcdedit /enum !ID!',
    'echo vdboot: the files are in \\EFI\\vdboot on the EFI system partition; choose the entry in the',
    'echo vdboot: firmware boot menu ^(or: bcdedit /set {fwbootmgr} bootsequence !ID!, then restart^).',
    'mountvol S: /D',
    'pause',
    'exit /b 0',
    ':undo',
    'echo vdboot: bcdedit failed; deleting the new entry !ID! and the copy.',
    'bcdedit /delete !ID!',
    'rmdir /s /q "S:\\EFI\\vdboot"',
    'mountvol S: /D',
    'pause',
    'exit /b 1',
  ]);
}

export function windowsUninstallScript(title: string): string {
  const name = windowsEntryName(title);
  return crlf([
    '@echo off',
    `rem vdboot kit: removes "${name}" (the boot entry and \\EFI\\vdboot) that windows-install.cmd added.`,
    'rem Run it as administrator.',
    'setlocal EnableExtensions EnableDelayedExpansion',
    ...ADMIN_CHECK,
    ...MOUNT_ESP,
    'if not exist "S:\\EFI\\vdboot\\bcd-id.txt" (',
    '  echo vdboot: S:\\EFI\\vdboot\\bcd-id.txt does not exist: windows-install.cmd was not run on this PC ^(nothing to undo^).',
    '  mountvol S: /D',
    '  pause',
    '  exit /b 1',
    ')',
    'set /p ID=<"S:\\EFI\\vdboot\\bcd-id.txt"',
    'echo vdboot: deleting the firmware boot entry !ID!',
    'bcdedit /delete !ID!',
    'if errorlevel 1 echo vdboot: bcdedit /delete !ID! failed ^(already deleted?^); removing the files anyway.',
    'echo vdboot: removing S:\\EFI\\vdboot',
    'rmdir /s /q "S:\\EFI\\vdboot"',
    'mountvol S: /D',
    `echo vdboot: "${name}" is removed.`,
    'pause',
    'exit /b 0',
  ]);
}
