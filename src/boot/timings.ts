/**
 * Where vdboot's own time goes at boot: each step's duration (early mounts, the manifest,
 * module loading, waiting for devices, the host filesystem, planning, mapping, the root
 * mount, the switch_root preparation), and counters for work spread over several steps
 * (modules loaded by the init itself, device scans, idle waits for uevents). Under
 * rd.vdboot.debug each step gets a line when it ends and runInit prints one summary line
 * before it starts the guest's init.
 *
 * Steps nest: a step run inside another is listed inside its parent's parentheses, and
 * only top-level steps count towards the sum, so nothing is counted twice.
 */

export interface StepTime {
  label: string;
  /** how deep it was nested: 0 for a step of runInit */
  depth: number;
  ms: number;
}

export interface Counter {
  count: number;
  ms: number;
}

export class BootTimings {
  readonly steps: StepTime[] = [];
  readonly counters = new Map<string, Counter>();
  private depth = 0;
  readonly startMs: number;

  constructor(private readonly clock: () => number) {
    this.startMs = clock();
  }

  /** Runs `fn` as step `label`; its duration is recorded whether it returns or throws. */
  time<T>(label: string, fn: () => T): T {
    const entry: StepTime = { label, depth: this.depth, ms: 0 };
    this.steps.push(entry);
    const t0 = this.clock();
    this.depth++;
    try {
      return fn();
    } finally {
      this.depth--;
      entry.ms = this.clock() - t0;
    }
  }

  /** Adds `count` events that took `ms` in all to counter `name`. */
  count(name: string, count: number, ms: number): void {
    const c = this.counters.get(name) ?? { count: 0, ms: 0 };
    c.count += count;
    c.ms += ms;
    this.counters.set(name, c);
  }

  /** Runs `fn` and adds one event with its duration to counter `name`. */
  counted<T>(name: string, fn: () => T): T {
    const t0 = this.clock();
    try {
      return fn();
    } finally {
      this.count(name, 1, this.clock() - t0);
    }
  }

  /** Milliseconds since the timings started. */
  elapsedMs(): number {
    return this.clock() - this.startMs;
  }

  /**
   * One line: "early-mounts 3, manifest 41, coldplug 80, root-device 280 (…), mount 310 (…)
   * = 714 of 760 ms; modules 12 in 402 ms, …". Every figure is whole milliseconds.
   */
  summary(): string {
    const ms = (v: number): string => String(Math.round(v));
    const parts: string[] = [];
    let sum = 0;
    // Top-level steps with their children (and grandchildren) in parentheses.
    const render = (i: number): { text: string; next: number } => {
      const s = this.steps[i]!;
      const children: string[] = [];
      let j = i + 1;
      while (j < this.steps.length && this.steps[j]!.depth > s.depth) {
        const r = render(j);
        children.push(r.text);
        j = r.next;
      }
      return { text: `${s.label} ${ms(s.ms)}${children.length ? ` (${children.join(', ')})` : ''}`, next: j };
    };
    for (let i = 0; i < this.steps.length; ) {
      const s = this.steps[i]!;
      if (s.depth === 0) sum += s.ms;
      const r = render(i);
      parts.push(r.text);
      i = r.next;
    }
    const counters = [...this.counters].map(([name, c]) => `${name} ${c.count} in ${ms(c.ms)} ms`);
    return `${parts.join(', ')} = ${ms(sum)} of ${ms(this.elapsedMs())} ms${counters.length ? `; ${counters.join(', ')}` : ''}`;
  }
}
