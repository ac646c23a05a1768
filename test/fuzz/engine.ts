/**
 * The fuzz runner shared by every target: seeded cases, each ending in "ok" (the checker
 * accepted what the code under test produced) or "refused" (the code's own clear error);
 * anything else — another exception, a checker finding, a case over the time limit — is a
 * failure naming the target, seed and case, so `FUZZ_SEED=… FUZZ_ONLY=…` replays it.
 *
 * FUZZ_CASES (cases per target; `npm test` runs a few hundred, `npm run fuzz` 10,000),
 * FUZZ_SEED, FUZZ_VERBOSE=1 (print the outcome counts).
 */
import { prng } from '../kit/oracle.ts';

export const FUZZ_SEED = Number(process.env['FUZZ_SEED'] ?? 20261206);

export function fuzzCases(ciDefault: number): number {
  return Number(process.env['FUZZ_CASES'] ?? ciDefault);
}

/** A case that takes longer than this is a hang (each case is in-process and synchronous). */
export const CASE_LIMIT_MS = Number(process.env['FUZZ_CASE_MS'] ?? 2000);

export interface Rng {
  /** [0, 1) */
  next(): number;
  /** an integer in [0, n) */
  int(n: number): number;
  pick<T>(xs: readonly T[]): T;
  chance(p: number): boolean;
}

export function rng(seed: number): Rng {
  const r = prng(seed);
  return {
    next: r,
    int: (n) => Math.floor(r() * n),
    pick: (xs) => xs[Math.floor(r() * xs.length)]!,
    chance: (p) => r() < p,
  };
}

/** A finding of the independent checker: the code under test accepted something unsafe. */
export class CheckFailure extends Error {}

export interface Outcomes {
  ok: number;
  refused: number;
  /** the slowest case, ms */
  slowest: number;
}

/**
 * Runs `cases` cases of a target. `one` builds its case from the rng and runs it, returning
 * 'ok' or 'refused' (it decides what counts as the code's own clear refusal) and a label
 * for messages.
 */
export async function runFuzz(target: string, cases: number, one: (r: Rng, label: string[]) => 'ok' | 'refused'): Promise<Outcomes> {
  let hash = FUZZ_SEED;
  for (const ch of target) hash = Math.imul(hash ^ ch.charCodeAt(0), 0x9e3779b1) >>> 0;
  const out: Outcomes = { ok: 0, refused: 0, slowest: 0 };
  for (let c = 0; c < cases; c++) {
    // let the test runner's messages through during long runs
    if (c % 500 === 499) await new Promise((done) => setImmediate(done));
    const r = rng((hash + Math.imul(c, 0x85ebca6b)) >>> 0);
    const label: string[] = [];
    const t0 = performance.now();
    let result: 'ok' | 'refused';
    try {
      result = one(r, label);
    } catch (e) {
      throw new Error(`fuzz ${target}, case ${c} (FUZZ_SEED=${FUZZ_SEED}): ${label.join('; ')}\n${e instanceof CheckFailure ? 'checker: ' : 'threw: '}${(e as Error)?.stack ?? String(e)}`);
    }
    const ms = performance.now() - t0;
    if (ms > out.slowest) out.slowest = ms;
    if (ms > CASE_LIMIT_MS) throw new Error(`fuzz ${target}, case ${c} (FUZZ_SEED=${FUZZ_SEED}) took ${ms.toFixed(0)} ms (limit ${CASE_LIMIT_MS}): ${label.join('; ')}`);
    out[result] += 1;
  }
  if (process.env['FUZZ_VERBOSE']) process.stderr.write(`fuzz ${target}: ${cases} cases, ${out.ok} ok, ${out.refused} refused, slowest ${out.slowest.toFixed(1)} ms\n`);
  return out;
}

/** Byte-level mutations of `b` in place (flips, bytes, interesting 32-bit values), biased to `hot` ranges; returns an undo list. */
export function mutateBytes(r: Rng, b: Uint8Array, hot: readonly [number, number][], label: string[]): [number, number][] {
  const undo: [number, number][] = [];
  const set = (at: number, v: number): void => {
    if (at < 0 || at >= b.length) return;
    undo.push([at, b[at]!]);
    b[at] = v & 0xff;
  };
  const INTERESTING = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x200, 0x1000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff];
  const n = 1 + r.int(r.chance(0.7) ? 3 : 12);
  for (let m = 0; m < n; m++) {
    let at: number;
    if (hot.length && r.chance(0.7)) {
      const [s, len] = r.pick(hot);
      at = s + r.int(Math.max(1, len));
    } else at = r.int(b.length);
    const kind = r.int(4);
    if (kind === 0) { set(at, b[at]! ^ (1 << r.int(8))); label.push(`flip ${at}`); }
    else if (kind === 1) { const v = r.int(256); set(at, v); label.push(`byte ${at}=${v}`); }
    else {
      const v = r.chance(0.5) ? r.pick(INTERESTING) : r.int(b.length);
      const le = r.chance(0.5);
      for (let i = 0; i < 4; i++) set(le ? at + i : at + 3 - i, (v >>> (8 * i)) & 0xff);
      label.push(`u32${le ? 'le' : 'be'} ${at}=${v}`);
    }
  }
  return undo;
}

export function undoBytes(b: Uint8Array, undo: [number, number][]): void {
  for (let i = undo.length - 1; i >= 0; i--) b[undo[i]![0]] = undo[i]![1];
}
