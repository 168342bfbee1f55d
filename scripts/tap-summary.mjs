#!/usr/bin/env node
// Reads ava's TAP output of one or more runs on stdin, passes it through, and ends with the
// one line CI looks at: "N passed, N failed" (", N skipped" when some were skipped).
// A run that crashed before reporting (no plan) counts as one failure.
//
// A failing system test attaches long agent logs (t.log) which ava prints BEFORE the YAML block
// that says what failed; a CI page that shows only the lines around "not ok" then shows logs
// and never the reason. So a failure's YAML block is moved up, right under its "not ok" line,
// and the failures are recapped (title + message) just above the final count.
import { createInterface } from 'node:readline';

let passed = 0, failed = 0, skipped = 0, plans = 0;
const expectedRuns = Number(process.argv[2] ?? 1);
const recap = [];

/** Lines of the failure being read: its "not ok" line, comments, YAML block. */
let failure = null;

function flushFailure() {
  if (!failure) return;
  const { head, comments, yaml } = failure;
  console.log(head);
  for (const l of yaml) console.log(l);
  for (const l of comments) console.log(l);
  const field = (key) => {
    const i = yaml.findIndex((l) => new RegExp(`^\\s+${key}:`).test(l));
    if (i < 0) return undefined;
    const v = yaml[i].replace(/^\s+\w+:\s*/, '');
    // a block scalar (|-, >-): its first line says enough for a recap
    return /^[|>][-+]?$/.test(v) ? yaml[i + 1]?.trim() : v;
  };
  const message = field('message');
  const name = field('name');
  recap.push(`#   ${head.replace(/^not ok \d+ - /, '')}: ${message ?? name ?? '(no message)'}`);
  failure = null;
}

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  const m = /^(not ok|ok)\b.*?(#\s*(SKIP|TODO)\b.*)?$/i.exec(line);
  if (m || /^1\.\.\d+/.test(line) || /^TAP version/.test(line)) flushFailure();
  if (m) {
    if (m[3]) skipped++;
    else if (m[1] === 'ok') passed++;
    else { failed++; failure = { head: line, comments: [], yaml: [], inYaml: false }; continue; }
  } else if (/^1\.\.\d+/.test(line)) {
    plans++;
  }
  if (failure) {
    if (/^\s+---\s*$/.test(line)) failure.inYaml = true;
    (failure.inYaml ? failure.yaml : failure.comments).push(line);
    if (failure.inYaml && /^\s+\.\.\.\s*$/.test(line)) failure.inYaml = false;
    continue;
  }
  console.log(line);
}
flushFailure();
if (plans < expectedRuns) {
  console.log(`# ${expectedRuns - plans} test run(s) ended without a TAP plan (crashed or interrupted)`);
  failed += expectedRuns - plans;
}
if (recap.length) console.log(['# failed:', ...recap].join('\n'));
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exitCode = failed > 0 ? 1 : 0;
