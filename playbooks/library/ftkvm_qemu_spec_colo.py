#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ftkvm contributors
# Apache-2.0
"""Edits a RHEL/CentOS Stream qemu-kvm.spec so that the package it builds can run COLO."""
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: ftkvm_qemu_spec_colo
short_description: Edit the distribution's qemu-kvm.spec so that the build can run COLO
description:
  - RHEL and CentOS Stream build qemu-kvm with C(%{disable_everything}) (which contains
    C(--disable-replication)) followed by the options of the one C(run_configure) call of
    C(%build); options given later win. This module adds C(--enable-replication) (the
    C(replication) block driver, the C(x-colo) migration capability, C(x-colo-lost-heartbeat))
    and, from QEMU 8.1 on where the option exists, C(--enable-colo-proxy) (C(filter-rewriter);
    C(colo-compare) needs replication or the proxy) right after C(run_configure \), adds
    C(quorum) and C(replication) to C(%global block_drivers_rw_list) (the read-write block
    driver whitelist the build passes as C(--block-drv-rw-whitelist)), and appends a suffix to
    C(Release:).
  - Idempotent (an edited spec is left as it is) and check-mode safe. Fails, naming the
    anchor, when the spec does not have the layout these edits were written for, and (by
    default) when its QEMU version has the upstream COLO regression that ftkvm_host and the
    agent refuse.
options:
  path:
    description: Path of qemu-kvm.spec (edited in place). Either I(path) or I(version).
    type: path
  version:
    description:
      - Only check this QEMU version (x.y.z) for the COLO regression, before there is a spec (the
        playbook asks with the version of the source RPM before downloading it). Either I(path) or I(version).
    type: str
  release_suffix:
    description: Appended to the value of C(Release:) (a previous C(.ftkvmN) suffix is replaced).
    type: str
    default: .ftkvm1
  block_drivers:
    description: Block drivers added to C(%global block_drivers_rw_list).
    type: list
    elements: str
    default: [quorum, replication]
  refuse_colo_regression:
    description: Fail, before changing anything, when the spec's QEMU version has the upstream COLO regression.
    type: bool
    default: true
author: ftkvm
'''

EXAMPLES = r'''
- name: Refuse a QEMU with the upstream COLO regression before downloading its source
  ftkvm.ftkvm.ftkvm_qemu_spec_colo:
    version: 10.1.0

- name: Edit the spec of an unpacked qemu-kvm source RPM for COLO
  ftkvm.ftkvm.ftkvm_qemu_spec_colo:
    path: /var/lib/ftkvm-qemu-build/qemu-kvm-9.1.0-15.el10_0.3/SPECS/qemu-kvm.spec
    release_suffix: .ftkvm1
  register: spec
'''

RETURN = r'''
version:
  description: QEMU version of the spec (C(Version:)), or the I(version) given.
  type: str
  returned: success
  sample: 10.1.0
release:
  description: Value of C(Release:) after the edit (macros not expanded).
  type: str
  returned: with I(path)
  sample: 16%{?rcrel}%{?dist}%{?cc_suffix}.ftkvm1
edits:
  description: What was changed (or would be, in check mode); empty when the spec was already edited.
  type: list
  elements: str
  returned: with I(path)
configure_options:
  description: The options this module makes sure the build's C(run_configure) call has.
  type: list
  elements: str
  returned: with I(path)
colo_regression:
  description: Why this QEMU version must not run COLO (upstream regression of 10.0.0), or an empty string.
  type: str
  returned: always
'''

import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

# The upstream COLO regression of 10.0.0 (the primary completes the migration instead of entering
# COLO), fixed by 0b5bf4ea7620 in 10.2.0 and backported to 10.0.7 and 10.1.3:
# (major, minor) -> first fixed micro release.
# Keep in step with agent/src/qemu/probe.ts and roles/ftkvm_host/library/ftkvm_qemu_colo_probe.py
# (test/unit/qemu-spec.test.ts checks that the three agree).
COLO_REGRESSION_FIXED_IN = {(10, 0): 7, (10, 1): 3}

# QEMU gained --enable/--disable-colo-proxy in 8.1 (6c1e3906ce0b); before, the proxy was always built.
COLO_PROXY_OPTION_SINCE = (8, 1)

MARKER = '# ftkvm: COLO needs replication and the COLO proxy (edited by ftkvm_qemu_spec_colo)'


class AnchorError(Exception):
    """The spec does not have the layout the edits were written for."""

    def __init__(self, anchor, detail):
        Exception.__init__(self, 'anchor %s: %s' % (anchor, detail))
        self.anchor = anchor


def colo_regression(version):
    """Why QEMU `version` (x.y.z) must not run COLO, or ''."""
    major, minor, micro = (int(x) for x in version.split('.'))
    fixed_micro = COLO_REGRESSION_FIXED_IN.get((major, minor))
    if fixed_micro is None or micro >= fixed_micro:
        return ''
    return ('QEMU %s has the upstream COLO regression of 10.0.0 (the primary completes the migration instead of '
            'entering COLO): upgrade to %d.%d.%d or later in this series, or to 10.2.0 or later (fix 0b5bf4ea7620)'
            % (version, major, minor, fixed_micro))


def _one_line(lines, pattern, anchor):
    idx = [i for i, l in enumerate(lines) if re.match(pattern, l)]
    if not idx:
        raise AnchorError(anchor, 'no such line in the spec (its layout changed)')
    return idx[0]


def _configure_block(lines, start):
    """Indices of the lines of the shell command that starts at lines[start]: continued by a
    trailing backslash, with rpm conditionals (%if/%endif...) inside it, up to a blank line."""
    out = [start]
    i = start
    while i + 1 < len(lines):
        prev = lines[i].rstrip()
        conditional = re.match(r'^%(if|ifarch|ifnarch|else|elif|endif)\b', prev)
        if (prev.endswith('\\') or conditional) and lines[i + 1].strip():
            i += 1
            out.append(i)
        else:
            break
    return out


def spec_version(text):
    """QEMU version (x.y.z) of the spec's 'Version:' line. Raises AnchorError."""
    m = re.search(r'^Version:[ \t]*(\S+)[ \t]*$', text, re.M)
    if not m:
        raise AnchorError("'Version:'", 'no such line in the spec (its layout changed)')
    if not re.match(r'^\d+\.\d+\.\d+$', m.group(1)):
        raise AnchorError("'Version:'", 'expected a plain x.y.z QEMU version, got %r' % m.group(1))
    return m.group(1)


def analyse(text, release_suffix='.ftkvm1', block_drivers=('quorum', 'replication')):
    """Pure part: the edited spec text, the list of edits, the version and the release.

    Raises AnchorError when an anchor is missing.
    """
    lines = text.split('\n')
    edits = []

    version = spec_version(text)
    vtuple = tuple(int(x) for x in version.split('.'))

    # The build must pass the whitelist macro we edit, and run_configure() must put "$@" (the
    # options of the call) after %{disable_everything}, so that the call's options win.
    if not any('--block-drv-rw-whitelist=%{block_drivers_rw_list}' in l for l in lines):
        raise AnchorError("'--block-drv-rw-whitelist=%{block_drivers_rw_list}'",
                          'the build does not pass the read-write whitelist macro to configure (its layout changed)')
    f = _one_line(lines, r'^run_configure\(\)\s*\{', "'run_configure() {'")
    body = []
    for l in lines[f + 1:]:
        if l.startswith('}'):
            break
        body.append(l)
    dis = [k for k, l in enumerate(body) if '%{disable_everything}' in l]
    args = [k for k, l in enumerate(body) if '"$@"' in l]
    if not dis or not args or args[0] < dis[0]:
        raise AnchorError("'%{disable_everything} ... \"$@\"' in run_configure()",
                          'run_configure() must pass the options of its call after %{disable_everything} '
                          '(its layout changed: the added --enable-replication would not win)')

    # Release
    i = _one_line(lines, r'^Release:\s*\S', "'Release:'")
    head, value = lines[i].split(':', 1)
    value = value.strip()
    new_value = value
    if not value.endswith(release_suffix):
        new_value = re.sub(r'\.ftkvm\d+$', '', value) + release_suffix
        lines[i] = '%s: %s' % (head, new_value)
        edits.append('Release: %s -> %s' % (value, new_value))

    # Read-write block driver whitelist
    i = _one_line(lines, r'^%global\s+block_drivers_rw_list\s+\S', "'%global block_drivers_rw_list'")
    m = re.match(r'^(%global\s+block_drivers_rw_list\s+)(\S+)(.*)$', lines[i])
    drivers = m.group(2).split(',')
    add = [d for d in block_drivers if d not in drivers]
    if add:
        lines[i] = m.group(1) + ','.join(drivers + add) + m.group(3)
        edits.append('block_drivers_rw_list: added %s' % ', '.join(add))

    # The build's configure call
    calls = [k for k, l in enumerate(lines) if re.match(r'^run_configure\s*\\\s*$', l)]
    if len(calls) != 1:
        raise AnchorError("'run_configure \\' (the build's configure call)",
                          'expected exactly one, found %d (its layout changed)' % len(calls))
    call = calls[0]
    options = ['--enable-replication']
    if vtuple[:2] >= COLO_PROXY_OPTION_SINCE:
        options.append('--enable-colo-proxy')
    block = [lines[k] for k in _configure_block(lines, call)]
    missing = [o for o in options if not any(re.match(r'^\s*%s\s*\\?\s*$' % re.escape(o), l) for l in block)]
    if missing:
        lines[call + 1:call + 1] = ['  %s \\' % o for o in missing]
        edits.append('run_configure: added %s' % ' '.join(missing))
    if call == 0 or lines[call - 1] != MARKER:
        lines.insert(call, MARKER)
        if not missing:
            edits.append('run_configure: added the marker comment')

    return '\n'.join(lines), edits, version, new_value, options


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path'),
            version=dict(type='str'),
            release_suffix=dict(type='str', default='.ftkvm1'),
            block_drivers=dict(type='list', elements='str', default=['quorum', 'replication']),
            refuse_colo_regression=dict(type='bool', default=True),
        ),
        required_one_of=[('path', 'version')],
        mutually_exclusive=[('path', 'version')],
        supports_check_mode=True,
    )
    p = module.params
    if p['version'] is not None:
        if not re.match(r'^\d+\.\d+\.\d+$', p['version']):
            module.fail_json(msg='version must be a plain x.y.z QEMU version (got %r)' % p['version'], colo_regression='')
        regression = colo_regression(p['version'])
        if regression and p['refuse_colo_regression']:
            module.fail_json(msg='refusing to build QEMU %s: %s. ftkvm_host and the agent refuse this QEMU too.'
                             % (p['version'], regression), version=p['version'], colo_regression=regression)
        module.exit_json(changed=False, version=p['version'], colo_regression=regression)
    if not re.match(r'^\.[A-Za-z0-9_.+~]+$', p['release_suffix']):
        module.fail_json(msg='release_suffix must start with a dot and hold only letters, digits and _.+~ (got %r)'
                         % p['release_suffix'], colo_regression='')
    try:
        with open(p['path'], 'rb') as fh:
            raw = fh.read()
    except (IOError, OSError) as e:
        module.fail_json(msg='cannot read the spec %s: %s' % (p['path'], e), colo_regression='')
    text = raw.decode('utf-8', 'surrogateescape')
    try:
        version = spec_version(text)
        regression = colo_regression(version)
        if regression and p['refuse_colo_regression']:
            module.fail_json(msg='%s: refusing to build it: %s. ftkvm_host and the agent refuse this QEMU too.'
                             % (p['path'], regression), version=version, colo_regression=regression)
        new_text, edits, version, release, options = analyse(text, p['release_suffix'], p['block_drivers'])
    except AnchorError as e:
        module.fail_json(msg='%s: the spec does not have the layout ftkvm_qemu_spec_colo edits, %s' % (p['path'], e),
                         anchor=e.anchor, colo_regression='')
    changed = new_text != text
    if changed and not module.check_mode:
        d = os.path.dirname(os.path.abspath(p['path']))
        fd, tmp = tempfile.mkstemp(prefix='.qemu-kvm.spec.', dir=d)
        with os.fdopen(fd, 'wb') as fh:
            fh.write(new_text.encode('utf-8', 'surrogateescape'))
        module.atomic_move(tmp, p['path'])
    module.exit_json(changed=changed, edits=edits, version=version, release=release, configure_options=options,
                     colo_regression=regression, path=p['path'])


if __name__ == '__main__':
    main()
