#!/usr/bin/env node
// Builds (or reuses) the small real Linux test guest and the test-only TCG COLO shim.
//
//   node scripts/build-test-guest.mjs [--json]
//
// Guest = Debian's cloud kernel + a busybox initramfs holding the virtio modules of the SAME
// kernel package (modules of another build do not load: virtio_blk silently missing), the
// guest /init from lab/guest/. Everything comes from Debian packages. Outputs live in the
// cache (FTKVM_CACHE, default ~/.cache/ftkvm), keyed by a hash of every input, so a second
// run is instant and any input change (kernel update, init script edit) rebuilds.
import { $, fs, path, os, argv } from 'zx';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';

$.verbose = false;
const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cache = process.env.FTKVM_CACHE || path.join(os.homedir(), '.cache', 'ftkvm');
const MODULES = ['virtio_ring', 'virtio', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci',
  'failover', 'net_failover', 'virtio_net', 'virtio_blk'];
const GUEST_FILES = { 'init': 'lab/guest/init.sh', 'bin/txn-handler': 'lab/guest/txn-handler.sh', 'bin/dirty-loop': 'lab/guest/dirty-loop.sh' };
const BUILDER_REVISION = 1; // bump when the layout below changes
const log = (m) => { if (!argv.json) console.error(`[guest] ${m}`); };

const sha = (...parts) => createHash('sha256').update(parts.join('\0')).digest('hex').slice(0, 16);

async function kernelPackage() {
  // The meta package points at the current kernel ABI package, e.g. linux-image-6.1.0-56-cloud-amd64.
  const deps = (await $`apt-cache depends linux-image-cloud-amd64`).stdout;
  const m = deps.match(/Depends: (linux-image-[0-9][^\s]*-cloud-amd64)/);
  if (!m) throw new Error('cannot resolve linux-image-cloud-amd64 (is the Debian archive in apt sources? run apt-get update)');
  const name = m[1];
  const show = (await $`apt-cache show --no-all-versions ${name}`).stdout;
  const version = show.match(/^Version: (.+)$/m)?.[1] ?? 'unknown';
  return { name, version };
}

async function buildShim() {
  const src = path.join(root, 'test/tcg-shim/colo-tcg-bql-fix.c');
  const key = sha(await fs.readFile(src, 'utf8'));
  const out = path.join(cache, 'tcg-shim', key, 'colo-tcg-bql-fix.so');
  if (!(await fs.pathExists(out))) {
    log('compiling the TCG COLO shim (test-only)');
    await fs.mkdirp(path.dirname(out));
    await $`gcc -O2 -shared -fPIC -o ${out}.tmp ${src} -ldl`;
    await fs.rename(`${out}.tmp`, out);
  }
  return out;
}

async function buildGuest() {
  const kernel = await kernelPackage();
  const busybox = (await $`dpkg-query -W -f=${'${Version}'} busybox-static`).stdout.trim();
  const scripts = await Promise.all(Object.values(GUEST_FILES).map((f) => fs.readFile(path.join(root, f), 'utf8')));
  const key = sha(BUILDER_REVISION, kernel.name, kernel.version, busybox, ...scripts);
  const dir = path.join(cache, 'guest', key);
  const manifestPath = path.join(dir, 'manifest.json');
  if (await fs.pathExists(manifestPath)) return JSON.parse(await fs.readFile(manifestPath, 'utf8'));

  const t0 = Date.now();
  log(`building test guest from ${kernel.name} ${kernel.version} + busybox-static ${busybox}`);
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'ftkvm-guest-'));
  try {
    await $({ cwd: work })`apt-get download ${kernel.name}`;
    const deb = (await fs.readdir(work)).find((f) => f.endsWith('.deb'));
    await $`dpkg-deb -x ${path.join(work, deb)} ${path.join(work, 'k')}`;
    const bootDir = path.join(work, 'k', 'boot');
    const vmlinuz = (await fs.readdir(bootDir)).find((f) => f.startsWith('vmlinuz-'));
    const kver = vmlinuz.replace(/^vmlinuz-/, '');
    const modRoot = path.join(work, 'k', 'lib', 'modules', kver);
    const rd = path.join(work, 'rd');
    for (const d of ['bin', 'dev', 'proc', 'sys', 'run', 'tmp', 'lib/modules']) await fs.mkdirp(path.join(rd, d));
    const found = (await $`find ${modRoot} -name *.ko -o -name *.ko.xz -o -name *.ko.zst`).stdout.trim().split('\n');
    for (const m of MODULES) {
      const f = found.find((p) => path.basename(p).replace(/\.ko(\.xz|\.zst)?$/, '') === m);
      if (!f) { log(`module ${m} not in ${kernel.name} (built in?)`); continue; }
      const dst = path.join(rd, 'lib/modules', `${m}.ko`);
      if (f.endsWith('.xz')) await $`xz -dc ${f} > ${dst}`;
      else if (f.endsWith('.zst')) await $`zstd -qdc ${f} > ${dst}`;
      else await fs.copy(f, dst);
    }
    await fs.copy('/bin/busybox', path.join(rd, 'bin/busybox'));
    for (const [dst, src] of Object.entries(GUEST_FILES)) {
      await fs.copy(path.join(root, src), path.join(rd, dst));
      await fs.chmod(path.join(rd, dst), 0o755);
    }
    await fs.mkdirp(dir);
    await fs.copy(path.join(bootDir, vmlinuz), path.join(dir, 'vmlinuz'));
    await $({ cwd: rd })`find . | cpio -o -H newc --quiet | gzip -9 > ${path.join(dir, 'initrd.gz')}`;
    const manifest = {
      key, kernelPackage: kernel.name, kernelVersion: kernel.version, kernelRelease: kver, busybox,
      kernel: path.join(dir, 'vmlinuz'), initrd: path.join(dir, 'initrd.gz'),
      append: 'console=ttyS0 quiet panic=-1',
      builtAt: new Date().toISOString(),
    };
    await fs.writeFile(manifestPath, JSON.stringify(manifest, null, 2));
    log(`built in ${((Date.now() - t0) / 1000).toFixed(1)} s -> ${dir}`);
    return manifest;
  } finally {
    await fs.remove(work);
  }
}

const guest = await buildGuest();
const shim = await buildShim();
const result = { ...guest, tcgShim: shim };
if (argv.json) console.log(JSON.stringify(result));
else console.log(`kernel: ${result.kernel}\ninitrd: ${result.initrd}\ntcg shim (tests only): ${result.tcgShim}`);
