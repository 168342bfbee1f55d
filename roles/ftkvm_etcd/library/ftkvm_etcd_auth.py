#!/usr/bin/python
# -*- coding: utf-8 -*-
# Converges etcd's users and roles for ftkvm through the v3 JSON gateway: a root user, one role
# per pair limited to the pair's key prefix, one user per node holding only its pair's role;
# then authentication on. Idempotent (a second run changes nothing) and check-mode safe.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: ftkvm_etcd_auth
short_description: Users and roles of the ftkvm lease store in etcd
description:
  - Creates the root user (with the root role), one role C(ftkvm-PAIR) per pair allowed to read
    and write only the keys under PREFIX/PAIR/, and one user per node with its pair's role (and no
    other ftkvm role); sets a node's password when it no longer authenticates; enables
    authentication. Talks to one endpoint over the v3 JSON gateway (HTTPS with a client
    certificate when given).
options:
  endpoint:
    description: Client URL of one member, e.g. https://10.0.0.5:2379.
    type: str
    required: true
  ca_file:
    description: CA certificate to verify the member (https).
    type: path
  cert_file:
    description: Client certificate (when the members require one).
    type: path
  key_file:
    description: Key of the client certificate.
    type: path
  root_password:
    description: Password of etcd's root user (set on the first run, checked afterwards).
    type: str
    required: true
    no_log: true
  prefix:
    description: Key prefix of ftkvm's leases (the agents' witness.etcd.prefix).
    type: str
    default: /ftkvm
  nodes:
    description: The hosts of the pairs.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: Node name (the agent's node.name), used as the etcd user name.
        type: str
        required: true
      pair:
        description: The node's pair.
        type: str
        required: true
      password:
        description: The node's password (its witness.etcd.password_file).
        type: str
        required: true
        no_log: true
author: ftkvm
"""

EXAMPLES = r"""
- name: Users and roles of the lease store, authentication on
  ftkvm.ftkvm.ftkvm_etcd_auth:
    endpoint: https://10.0.30.5:2379
    ca_file: /etc/ftkvm/tls/ca.pem
    cert_file: /etc/ftkvm/tls/node.pem
    key_file: /etc/ftkvm/tls/node.key
    prefix: /ftkvm
    root_password: "{{ etcd_root_password }}"
    nodes:
      - {name: kvm-a1, pair: prod1, password: "{{ etcd_password_kvm_a1 }}"}
      - {name: kvm-a2, pair: prod1, password: "{{ etcd_password_kvm_a2 }}"}
  run_once: true
  register: etcd_auth

- name: Report what changed
  ansible.builtin.debug:
    msg: "{{ etcd_auth.actions }}"
"""

RETURN = r"""
actions:
  description: What was (or in check mode would be) done, in order.
  type: list
  elements: str
  returned: always
"""

import base64
import json
import ssl

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError

ROLE_PREFIX = "ftkvm-"


class EtcdError(Exception):
    pass


class Gateway(object):
    def __init__(self, module):
        p = module.params
        self.base = p["endpoint"].rstrip("/")
        self.kw = dict(ca_path=p["ca_file"], client_cert=p["cert_file"], client_key=p["key_file"],
                       timeout=10, validate_certs=True)
        self.token = None

    def call(self, path, body, allow=()):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = self.token
        try:
            r = open_url(self.base + path, data=json.dumps(body), method="POST", headers=headers, **self.kw)
            out = json.loads(r.read() or b"{}")
        except HTTPError as e:
            try:
                out = json.loads(e.read() or b"{}")
            except ValueError:
                raise EtcdError("%s: HTTP %s" % (path, e.code))
        except (URLError, ssl.SSLError, OSError) as e:
            raise EtcdError("%s%s: %s" % (self.base, path, e))
        # etcd 3.4's gateway answers {error, message, code}; later ones {code, message}.
        err = out.get("error") or (out.get("message") if out.get("code") else None)
        if err:
            if any(a in err for a in allow):
                return None
            raise EtcdError("%s: %s" % (path, err))
        return out


def b64(s):
    return base64.b64encode(s.encode()).decode()


def prefix_range(key):
    """The [key, range_end) of every key starting with `key` (etcd's --prefix)."""
    return b64(key), b64(key[:-1] + chr(ord(key[-1]) + 1))


def run(module):
    p = module.params
    g = Gateway(module)
    check = module.check_mode
    actions = []

    def do(what, path, body):
        actions.append(what)
        if not check:
            g.call(path, body)

    for n in p["nodes"]:
        for k in ("name", "pair", "password"):
            if not n.get(k):
                raise EtcdError("nodes: every node needs name, pair and password (%s)" % json.dumps({x: y for x, y in n.items() if x != "password"}))
    names = [n["name"] for n in p["nodes"]]
    if len(set(names)) != len(names) or "root" in names:
        raise EtcdError("nodes: node names must be distinct and not 'root' (%s)" % ", ".join(names))

    # Is authentication on? Then the root password must work: it is the only way in.
    auth = g.call("/v3/auth/authenticate", {"name": "root", "password": p["root_password"]},
                  allow=("authentication is not enabled",))
    enabled = auth is not None
    if enabled:
        g.token = auth["token"]

    users = set(g.call("/v3/auth/user/list", {}).get("users") or [])
    roles = set(g.call("/v3/auth/role/list", {}).get("roles") or [])

    if not enabled:
        if "root" not in users:
            do("add user root", "/v3/auth/user/add", {"name": "root", "password": p["root_password"]})
        else:
            do("set root's password", "/v3/auth/user/changepw", {"name": "root", "password": p["root_password"]})
        if "root" not in roles:
            do("add role root", "/v3/auth/role/add", {"name": "root"})
        root_roles = (g.call("/v3/auth/user/get", {"name": "root"}, allow=("user name not found",)) or {}).get("roles") or []
        if "root" not in root_roles:
            do("grant role root to root", "/v3/auth/user/grant", {"user": "root", "role": "root"})

    # One role per pair: read-write on PREFIX/PAIR/ and nothing else.
    prefix = p["prefix"].rstrip("/")
    for pair in sorted(set(n["pair"] for n in p["nodes"])):
        role = ROLE_PREFIX + pair
        key, end = prefix_range("%s/%s/" % (prefix, pair))
        perms = []
        if role in roles:
            perms = g.call("/v3/auth/role/get", {"role": role}).get("perm") or []
        else:
            do("add role %s" % role, "/v3/auth/role/add", {"name": role})
        want = {"permType": "READWRITE", "key": key, "range_end": end}
        for perm in perms:
            if (perm.get("permType", "READ"), perm.get("key"), perm.get("range_end")) != ("READWRITE", key, end):
                do("revoke %s's permission on %s" % (role, base64.b64decode(perm.get("key", "")).decode(errors="replace")),
                   "/v3/auth/role/revoke", {"role": role, "key": perm.get("key"), "range_end": perm.get("range_end")})
        if not any((perm.get("permType", "READ"), perm.get("key"), perm.get("range_end")) == ("READWRITE", key, end) for perm in perms):
            do("grant %s read-write on %s/%s/" % (role, prefix, pair), "/v3/auth/role/grant", {"name": role, "perm": want})

    # One user per node, with its pair's role only.
    for n in p["nodes"]:
        role = ROLE_PREFIX + n["pair"]
        have = []
        if n["name"] not in users:
            do("add user %s" % n["name"], "/v3/auth/user/add", {"name": n["name"], "password": n["password"]})
        else:
            have = g.call("/v3/auth/user/get", {"name": n["name"]}).get("roles") or []
            # A password can only be checked by logging in (with authentication on).
            ok = enabled and Gateway(module).call("/v3/auth/authenticate", {"name": n["name"], "password": n["password"]},
                                                  allow=("authentication failed",)) is not None
            if not ok:
                do("set %s's password" % n["name"], "/v3/auth/user/changepw", {"name": n["name"], "password": n["password"]})
        for r in have:
            if r.startswith(ROLE_PREFIX) and r != role:
                do("revoke role %s from %s" % (r, n["name"]), "/v3/auth/user/revoke", {"name": n["name"], "role": r})
        if role not in have:
            do("grant role %s to %s" % (role, n["name"]), "/v3/auth/user/grant", {"user": n["name"], "role": role})

    if not enabled:
        do("enable authentication", "/v3/auth/enable", {})
    return actions


def main():
    module = AnsibleModule(
        argument_spec=dict(
            endpoint=dict(type="str", required=True),
            ca_file=dict(type="path"),
            cert_file=dict(type="path"),
            key_file=dict(type="path"),
            root_password=dict(type="str", required=True, no_log=True),
            prefix=dict(type="str", default="/ftkvm"),
            nodes=dict(type="list", elements="dict", required=True, options=dict(
                name=dict(type="str", required=True),
                pair=dict(type="str", required=True),
                password=dict(type="str", required=True, no_log=True),
            )),
        ),
        supports_check_mode=True,
    )
    try:
        actions = run(module)
    except EtcdError as e:
        module.fail_json(msg="etcd at %s: %s" % (module.params["endpoint"], e))
    module.exit_json(changed=bool(actions), actions=actions)


if __name__ == "__main__":
    main()
