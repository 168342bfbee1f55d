#!/usr/bin/env node
// Builds dist/ftkvm-agent: ONE executable with Node embedded (Node's Single Executable
// Applications): esbuild bundles the TypeScript agent into one CommonJS file, Node turns it
// into a SEA blob, postject injects the blob into a copy of the running node binary.
// Everything is local: no download (unlike `pkg`, which is archived and fetches base binaries).
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync, chmodSync, rmSync, renameSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');
const work = join(dist, '.sea');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

function gitCommit() {
  try {
    const sha = execFileSync('git', ['rev-parse', '--short=12', 'HEAD'], { cwd: root, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: root }).toString().trim() !== '';
    return dirty ? `${sha}-dirty` : sha;
  } catch {
    return 'unknown';
  }
}

const t0 = Date.now();
mkdirSync(work, { recursive: true });
const commit = gitCommit();
await esbuild.build({
  entryPoints: [join(root, 'agent/src/main.ts')],
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  outfile: join(work, 'agent.cjs'),
  define: {
    __FTKVM_VERSION__: JSON.stringify(pkg.version),
    __FTKVM_COMMIT__: JSON.stringify(commit),
  },
  legalComments: 'none',
  logLevel: 'warning',
});
const seaConfig = join(work, 'sea-config.json');
writeFileSync(seaConfig, JSON.stringify({
  main: join(work, 'agent.cjs'),
  output: join(work, 'agent.blob'),
  disableExperimentalSEAWarning: true,
  useSnapshot: false,
  useCodeCache: true,
}));
execFileSync(process.execPath, ['--experimental-sea-config', seaConfig], { stdio: 'pipe' });
const out = join(dist, 'ftkvm-agent');
const tmp = `${out}.tmp`;
rmSync(tmp, { force: true });
copyFileSync(process.execPath, tmp);
chmodSync(tmp, 0o755);
// postject prints harmless ELF note warnings; keep only failures.
execFileSync(join(root, 'node_modules/.bin/postject'), [tmp, 'NODE_SEA_BLOB', join(work, 'agent.blob'),
  '--sentinel-fuse', 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2'], { stdio: 'ignore' });
// rename, not copy: a running agent keeps its old inode instead of failing with ETXTBSY.
renameSync(tmp, out);
console.log(`built ${out} (ftkvm ${pkg.version}, commit ${commit}, node ${process.versions.node}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
