#!/usr/bin/env node
// Reads ava's TAP output of one or more runs on stdin, passes it through, and ends with the
// one line CI looks at: "N passed, N failed" (", N skipped" when some were skipped).
// A run that crashed before reporting (no plan) counts as one failure.
import { createInterface } from 'node:readline';

let passed = 0, failed = 0, skipped = 0, plans = 0, expectedRuns = Number(process.argv[2] ?? 1);
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  console.log(line);
  const m = /^(not ok|ok)\b.*?(#\s*(SKIP|TODO)\b.*)?$/i.exec(line);
  if (m) {
    if (m[3]) skipped++;
    else if (m[1] === 'ok') passed++;
    else failed++;
  } else if (/^1\.\.\d+/.test(line)) {
    plans++;
  }
}
if (plans < expectedRuns) {
  console.log(`# ${expectedRuns - plans} test run(s) ended without a TAP plan (crashed or interrupted)`);
  failed += expectedRuns - plans;
}
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exitCode = failed > 0 ? 1 : 0;
