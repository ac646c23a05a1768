/**
 * The console log: one short line per step, stamped with the kernel's uptime and the
 * time the step took, so a slow boot shows where the time went. `quiet` keeps only
 * warnings and errors; `rd.vdboot.debug` adds detail lines.
 */
import type { Sys } from '../sys/sys.ts';
import { utf8Encode } from '../formats/text.ts';
import { BootTimings } from './timings.ts';

export class ConsoleLog {
  quiet = false;
  debugOn = false;

  /** each step's duration, for the rd.vdboot.debug summary (timings.ts) */
  readonly timings: BootTimings;

  constructor(private readonly sys: Sys, private readonly fd = 1) {
    this.timings = new BootTimings(() => {
      try { return sys.monotonicMs(); } catch { return 0; }
    });
  }

  private stamp(): string {
    let t = 0;
    try { t = this.sys.uptimeSec(); } catch { /* no clock: stamp 0 */ }
    return `[${t.toFixed(3).padStart(8)}]`;
  }

  write(text: string): void {
    const bytes = utf8Encode(text);
    let off = 0;
    try {
      while (off < bytes.length) off += this.sys.write(this.fd, bytes.subarray(off));
    } catch { /* the console is gone: nothing else to tell */ }
  }

  info(message: string): void {
    if (!this.quiet) this.write(`vdboot: ${this.stamp()} ${message}\n`);
  }

  debug(message: string): void {
    if (this.debugOn) this.write(`vdboot: ${this.stamp()} (debug) ${message}\n`);
  }

  warn(message: string): void {
    this.write(`vdboot: ${this.stamp()} WARNING: ${message}\n`);
  }

  /** A failure, written as a paragraph for the person at the console. */
  error(message: string): void {
    this.write(`\nvdboot: ${this.stamp()} ERROR: ${message}\n\n`);
  }

  /** Runs one step and logs it with the time it took. */
  step<T>(label: string, fn: () => T, summary?: (result: T) => string): T {
    const t0 = this.sys.monotonicMs();
    const result = this.timings.time(label, fn);
    const ms = this.sys.monotonicMs() - t0;
    this.info(`${summary ? summary(result) : label} (${(ms / 1000).toFixed(2)} s)`);
    return result;
  }

  /** Runs one step quietly: its time goes to the timings, and to a debug line. */
  timed<T>(label: string, fn: () => T): T {
    const t0 = this.sys.monotonicMs();
    try {
      return this.timings.time(label, fn);
    } finally {
      this.debug(`step ${label}: ${Math.round(this.sys.monotonicMs() - t0)} ms`);
    }
  }
}
