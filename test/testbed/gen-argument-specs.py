#!/usr/bin/python3
# Regenerates roles/<role>/meta/argument_specs.yml from the role's defaults/main.yml (descriptions
# are the comments above each variable; types from the default values plus the overrides below).
#   python3 test/testbed/gen-argument-specs.py ftkvm_agent   (test/unit/ansible-lint.test.ts checks both agree)
import os, sys, yaml, re
role = sys.argv[1]
base = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'roles', role)
text = open(f'{base}/defaults/main.yml').read()
data = yaml.safe_load(text)
lines = text.splitlines()
desc = {}
comment = []
last = None
for ln in lines:
    if ln.startswith('#'):
        c = ln.lstrip('#').strip()
        if c.startswith('---') : comment = []; continue
        comment.append(c)
    elif re.match(r'^[a-z_]+:', ln):
        k = ln.split(':')[0]
        d = ' '.join(x for x in comment if x)
        if not d:
            sys.exit(f'{base}/defaults/main.yml: {k} has no comment of its own: document every public variable')
        desc[k] = d
        comment = []
    elif ln.strip() == '':
        comment = []; last = None
    elif not ln.startswith(' ') and not ln.startswith('-'):
        pass
OVR = {
 'ftkvm_pair_hosts': {'type': 'list', 'elements': 'str'},
 'ftkvm_token_hosts': {'type': 'list', 'elements': 'str'},
 'ftkvm_agent_limit_memlock': {'type': 'str'},
 'ftkvm_accelerator': {'choices': ['kvm', 'tcg']},
 'ftkvm_replication_type': {'choices': ['bond', 'interface']},
 'ftkvm_qemu_packages_state': {'choices': ['present', 'latest']},
 'ftkvm_log_level': {'choices': ['debug', 'info', 'warn', 'error']},
 'ftkvm_replication_bond_mode': {'choices': ['active-backup', '802.3ad', 'balance-alb', 'balance-rr', 'balance-tlb', 'balance-xor', 'broadcast']},
}
VM_OPTIONS = {
  'name': {'type': 'str', 'required': True, 'description': 'VM name (lowercase letters, digits, "-")'},
  'memory_mib': {'type': 'int', 'required': True, 'description': 'Memory in MiB'},
  'vcpus': {'type': 'int', 'required': True, 'description': 'Virtual CPUs'},
  'disk': {'type': 'dict', 'required': True, 'description': 'Disk image: one of src (upload), size (create) or path (existing)',
           'options': {'path': {'type': 'str', 'description': 'Path on the hosts'},
                       'format': {'type': 'str', 'choices': ['qcow2', 'raw'], 'description': 'Image format'},
                       'src': {'type': 'str', 'description': 'Image on the controller, uploaded when missing on a host'},
                       'size': {'type': 'str', 'description': 'Size of an empty image created when missing (qemu-img syntax)'}}},
  'boot': {'type': 'dict', 'required': True, 'description': 'Direct kernel boot or firmware: bios',
           'options': {'kernel': {'type': 'str', 'description': 'Kernel path on the hosts'},
                       'kernel_src': {'type': 'str', 'description': 'Kernel on the controller (uploaded)'},
                       'initrd': {'type': 'str', 'description': 'Initrd path on the hosts'},
                       'initrd_src': {'type': 'str', 'description': 'Initrd on the controller (uploaded)'},
                       'append': {'type': 'str', 'description': 'Kernel command line'},
                       'firmware': {'type': 'str', 'choices': ['bios'], 'description': 'Boot with the BIOS from the disk'}}},
  'nic': {'type': 'dict', 'required': True, 'description': 'Network interface on the guest bridge',
          'options': {'mac': {'type': 'str', 'required': True, 'description': 'Lowercase unicast MAC'},
                      'bridge': {'type': 'str', 'description': 'Bridge (default ftkvm_guest_bridge)'},
                      'tap': {'type': 'str', 'description': 'Tap device name'}}},
  'base_port': {'type': 'int', 'required': True, 'description': 'First of the COLO ports (base_port+1 .. base_port+99)'},
  'preferred_primary': {'type': 'str', 'required': True, 'description': 'Host of the pair that runs the VM when both are up'},
  'probe': {'type': 'dict', 'description': 'TCP service of the guest the drill checks',
            'options': {'address': {'type': 'str', 'required': True, 'description': 'IP address'},
                        'port': {'type': 'int', 'required': True, 'description': 'TCP port'},
                        'request': {'type': 'str', 'description': 'A line the drill sends repeatedly over one connection (one reply line each)'},
                        'counter': {'type': 'bool', 'description': 'Replies are integers that must go up by exactly one (no transaction lost or repeated)'},
                        'interval_ms': {'type': 'int', 'description': 'Pause between probe requests (ms)'}}},
  'checkpoint_delay_ms': {'type': 'int', 'description': 'COLO checkpoint period of this VM (ms)'},
}
def typ(v):
    if isinstance(v, bool): return {'type': 'bool'}
    if isinstance(v, int): return {'type': 'int'}
    if isinstance(v, list):
        return {'type': 'list', 'elements': 'str'}
    if isinstance(v, dict): return {'type': 'dict'}
    return {'type': 'str'}
opts = {}
for k, v in data.items():
    o = {'description': desc.get(k, k)}
    o.update(typ(v))
    o['default'] = v if not (isinstance(v, str) and '{{' in v) else None
    if o['default'] is None: del o['default']
    o.update(OVR.get(k, {}))
    if k == 'ftkvm_vms':
        o['elements'] = 'dict'
        if role == 'ftkvm_agent': o['options'] = VM_OPTIONS
    if k in ('ftkvm_qemu_extra_args',): o['elements'] = 'str'
    if k in ('ftkvm_qemu_environment', 'ftkvm_sysctl_extra', 'ftkvm_colo_settings', 'ftkvm_agent_config_overrides'): o['type'] = 'dict'
    opts[k] = o
spec = {'argument_specs': {'main': {
    'short_description': open(f'{base}/meta/main.yml').read().split('description: ')[1].split('\n')[0],
    'description': [ ' '.join(x.lstrip('#').strip() for x in text.split('\n\n')[0].splitlines()[1:] if x.startswith('#')) ],
    'author': ['ftkvm'],
    'options': opts}}}
class D(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False): return super().increase_indent(flow, False)
out = '---\n# Generated from defaults/main.yml by test/testbed/gen-argument-specs.py; keep both in step.\n' + yaml.dump(spec, Dumper=D, sort_keys=False, width=120, default_flow_style=False)
open(f'{base}/meta/argument_specs.yml', 'w').write(out)
print(role, len(opts))
