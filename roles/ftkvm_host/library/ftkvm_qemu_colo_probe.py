#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ftkvm contributors
# Apache-2.0
"""Asks a QEMU binary over QMP whether it has what COLO needs (read-only)."""
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: ftkvm_qemu_colo_probe
short_description: Check that a QEMU binary can run COLO (replication, proxy objects)
description:
  - Starts the binary with C(-machine none -S -qmp stdio), reads its QMP introspection
    (query-version, query-migrate-capabilities, qom-list-types, query-qmp-schema) and quits it.
  - Never changes anything; works in check mode.
options:
  binary:
    description: Path of the QEMU system emulator.
    type: path
    required: true
  accelerator:
    description: Accelerator passed as C(-accel).
    type: str
    default: kvm
  environment:
    description: Extra environment variables for QEMU.
    type: dict
    default: {}
  timeout:
    description: Seconds to wait for QEMU.
    type: int
    default: 60
author: ftkvm
'''

EXAMPLES = r'''
- name: Ask QEMU over QMP whether it can run COLO
  ftkvm.ftkvm.ftkvm_qemu_colo_probe:
    binary: /usr/libexec/qemu-kvm
  register: colo

- name: Require a COLO-capable QEMU
  ansible.builtin.assert:
    that: colo.colo_capable
    fail_msg: "QEMU {{ colo.version }} cannot run COLO: {{ colo.problems | join('; ') }}"

- name: Probe without KVM (a nested or CI machine)
  ftkvm.ftkvm.ftkvm_qemu_colo_probe:
    binary: /usr/bin/qemu-system-x86_64
    accelerator: tcg
    timeout: 120
'''

RETURN = r'''
colo_capable:
  description: True when nothing COLO needs is missing and the version has no known COLO regression (C(problems) is empty).
  type: bool
  returned: always
missing:
  description: What COLO needs and this QEMU lacks.
  type: list
  elements: str
  returned: always
problems:
  description: The entries of C(missing), plus a known COLO regression of this QEMU version if it has one.
  type: list
  elements: str
  returned: always
version:
  description: QEMU version (major.minor.micro).
  type: str
  returned: always
  sample: 7.2.22
package:
  description: QEMU's package string (query-version), e.g. the distribution's package version.
  type: str
  returned: always
binary:
  description: The binary that was probed.
  type: str
  returned: always
'''

import json
import os
import select
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

# Keep in line with agent/src/qemu/probe.ts
# The upstream COLO regression of 10.0.0 (migration never enters COLO), fixed by 0b5bf4ea7620 in
# 10.2.0 and backported to 10.0.7 and 10.1.3: (major, minor) -> first fixed micro release.
# Keep in step with agent/src/qemu/probe.ts.
COLO_REGRESSION_FIXED_IN = {(10, 0): 7, (10, 1): 3}
REQUIRED_TYPES = ['colo-compare', 'filter-mirror', 'filter-redirector', 'filter-rewriter', 'iothread']
REQUIRED_DRIVERS = ['quorum', 'replication', 'nbd']
REQUIRED_COMMANDS = ['x-colo-lost-heartbeat', 'x-blockdev-change', 'query-colo-status', 'drive-mirror',
                     'nbd-server-start', 'announce-self']

SCRIPT = [
    {'execute': 'qmp_capabilities'},
    {'execute': 'query-version', 'id': 'version'},
    {'execute': 'query-migrate-capabilities', 'id': 'caps'},
    {'execute': 'qom-list-types', 'id': 'types'},
    {'execute': 'query-qmp-schema', 'id': 'schema'},
]
ANSWERS = ('version', 'caps', 'types', 'schema')


def converse(proc, timeout):
    """Sends SCRIPT, reads until every answer is in (or QEMU exits, or the deadline), then quits.

    'quit' is sent only after the answers arrived: sent with the rest, QEMU could exit before
    it had written the whole (large) schema answer to the pipe, and the answer was lost
    (seen under load: 'did not answer schema over QMP (exit 0)').
    """
    proc.stdin.write(''.join(json.dumps(c) + '\n' for c in SCRIPT).encode('utf-8'))
    proc.stdin.flush()
    answers, buf = {}, b''
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while any(k not in answers for k in ANSWERS):
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break  # QEMU exited
        buf += chunk
        lines = buf.split(b'\n')
        buf = lines.pop()
        for line in lines:
            line = line.strip()
            if not line.startswith(b'{'):
                continue
            try:
                msg = json.loads(line.decode('utf-8', 'replace'))
            except ValueError:
                continue
            if 'id' in msg and 'return' in msg:
                answers[msg['id']] = msg['return']
    try:
        proc.stdin.write(b'{"execute": "quit"}\n')
        proc.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        err = proc.stderr.read() if proc.wait(timeout=max(1, deadline - time.monotonic())) is not None else b''
    except subprocess.TimeoutExpired:
        proc.kill()
        err = b''
    return answers, err


def main():
    module = AnsibleModule(
        argument_spec=dict(
            binary=dict(type='path', required=True),
            accelerator=dict(type='str', default='kvm'),
            environment=dict(type='dict', default={}),
            timeout=dict(type='int', default=60),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not os.access(p['binary'], os.X_OK):
        module.fail_json(msg='QEMU binary %s does not exist or is not executable' % p['binary'])
    env = dict(os.environ)
    env.update(dict((k, str(v)) for k, v in p['environment'].items()))
    argv = [p['binary'], '-machine', 'none', '-accel', p['accelerator'], '-nodefaults', '-display', 'none',
            '-S', '-qmp', 'stdio']
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        module.fail_json(msg='cannot run %s: %s' % (p['binary'], e))
    try:
        answers, err = converse(proc, p['timeout'])
    except subprocess.TimeoutExpired:
        proc.kill()
        module.fail_json(msg='QEMU %s did not answer QMP within %d s' % (p['binary'], p['timeout']))
    missing_answers = [k for k in ANSWERS if k not in answers]
    if missing_answers:
        module.fail_json(msg='QEMU %s did not answer %s over QMP (exit %s): %s' % (
            p['binary'], ', '.join(missing_answers), proc.returncode, err.decode('utf-8', 'replace').strip()[-2000:]),
            argv=argv)
    ver = answers['version']
    q = ver.get('qemu', {})
    version = '%s.%s.%s' % (q.get('major'), q.get('minor'), q.get('micro'))
    package = (ver.get('package') or '').strip()
    missing = []
    caps = [c.get('capability') for c in answers['caps']]
    if 'x-colo' not in caps:
        missing.append("migration capability 'x-colo'")
    types = set(t.get('name') for t in answers['types'])
    for t in REQUIRED_TYPES:
        if t not in types:
            missing.append("object type '%s'" % t)
    schema = answers['schema']
    commands = set(e.get('name') for e in schema if e.get('meta-type') == 'command')
    for c in REQUIRED_COMMANDS:
        if c not in commands:
            missing.append("QMP command '%s'" % c)
    drivers = set()
    for e in schema:
        vals = e.get('values') or []
        if e.get('meta-type') == 'enum' and 'quorum' in vals and 'qcow2' in vals:
            drivers.update(vals)
    for d in REQUIRED_DRIVERS:
        if d not in drivers:
            missing.append("block driver '%s'" % d)
    problems = list(missing)
    fixed_micro = COLO_REGRESSION_FIXED_IN.get((q.get('major'), q.get('minor')))
    if fixed_micro is not None and (q.get('micro') or 0) < fixed_micro:
        problems.append('QEMU %s has the upstream COLO regression of 10.0.0 (the primary completes the migration '
                        'instead of entering COLO): upgrade to %s.%s.%s or later in this series, or to 10.2.0 or '
                        'later (fix 0b5bf4ea7620)' % (version, q.get('major'), q.get('minor'), fixed_micro))
    module.exit_json(changed=False, colo_capable=not problems, missing=missing, problems=problems,
                     version=version, package=package, binary=p['binary'])


if __name__ == '__main__':
    main()
