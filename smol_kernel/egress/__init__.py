"""The network guard: the host processes between a VM's network device and the world.

One of two helpers runs per VM with a network, each its own process (``python -I``;
standard library and ``error_root`` only; ``vm/network.py`` starts them):

* ``netfilter.py``: the guard between the VM and passt when the network is simply on;
* ``proxy.py``: the egress proxy when the network is an allow-list (``allow_hosts``), with
  its guest-facing TCP endpoint (``guest_tcp.py``), its resolver and synthetic names
  (``names.py``) and its reading of HTTP requests (``http_requests.py``).

What they share: the egress log and the reading of a connection's first bytes
(``log.py``), DNS messages (``dns.py``) and allow-list entries (``allowlist.py``, which the
server imports too, to check a list before any VM starts).

Nothing here imports ``smol_kernel.vm``: the VM side depends on this package, never the
other way round.
"""
