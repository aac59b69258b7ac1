"""dynamic-workload: a self-scaling job cluster built on the Python standard library.

The package holds every service of the cluster; each module owns one concern:

- ``work``: the job itself, the SHA-512 chain of the contract.
- ``config``: settings read from the environment, shared by every service.
- ``httpserver``: the fast, careful HTTP/1.1 server all services are built on.
- ``multipart``: extracting the uploaded bytes from a request body.
- ``store``: the durable queue and results in SQLite.
- ``balancer``: the balancer's HTTP API over the store, and its scaler loop.
- ``scaler``: the scaling policy and the loop that applies it to a fleet.
- ``fleets``: where workers run (local processes or EC2 instances).
- ``worker``: the process that leases jobs and computes them.
- ``endpoint``: the stateless public API.
- ``client``: keep-alive HTTP client used by endpoints and workers to reach the balancer.
- ``supervisor``: keeps the local cluster's services running, as systemd does on AWS.
"""

__version__ = "0.1.0"
