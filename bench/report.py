"""The table (text) and the plot (PNG) of a bench run, and its targets, from results.json's dict."""

# Published defaults of the alternatives, for the scaling section (see README-section.md).
ALTERNATIVES = [
    ("Ray autoscaler", "updates every 5 s (AUTOSCALER_UPDATE_INTERVAL_S); idle nodes removed after 5 min"),
    ("KEDA", "polls every 30 s (pollingInterval); back to zero after a 300 s cooldownPeriod"),
    ("EC2 Auto Scaling target tracking", "scale-out alarm needs 3 one-minute datapoints (>= 3 min); "
                                         "scale-in 15 (>= 15 min)"),
]


def _get(results, *path):
    value = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def targets(results):
    """[(what, target, measured, met)] for every target whose section ran."""
    out = []
    c8 = _get(results, "enqueue", "c8")
    if c8:
        out.append(("enqueue c=8: endpoint req/s vs bare", ">= 35%", f"{c8['ratio']:.0%}", c8["ratio"] >= 0.35))
        p99 = c8["endpoint"]["p99_ms"]
        out.append(("enqueue c=8: endpoint p99", "< 20 ms", f"{p99:.1f} ms", p99 < 20))
    e2e = results.get("e2e")
    if e2e and "ours" in e2e:
        peers = [e2e[k]["jobs_per_s"] for k in ("rq_simple", "rq_forking") if k in e2e]
        if peers:
            ratio = e2e["ours"]["jobs_per_s"] / max(peers)
            out.append(("end to end: jobs/s vs RQ's best", ">= 3x", f"{ratio:.2f}x", ratio >= 3))
    worker = results.get("worker")
    if worker:
        out.append(("worker: 2M iterations, cluster vs bare", "within 5%", f"{worker['overhead']:+.1%}",
                    worker["overhead"] <= 0.05))
    scaling = results.get("scaling")
    if scaling:
        first = scaling["first_launch_decision"]
        out.append(("scaling: first launch decision", "<= 1 s", _s(first), first is not None and first <= 1))
        zero = scaling["zero_after_last_completion"]
        limit = scaling["idle_timeout"] + 2
        out.append(("scaling: 0 workers after last completion", f"<= {limit:g} s", _s(zero), zero <= limit))
    memory = results.get("memory")
    if memory:
        rss_mb = memory["balancer_rss_mib"] * 2**20 / 1e6
        out.append((f"memory: balancer RSS, {memory['queued']:,} x {memory['job_bytes'] // 1024} KB queued",
                    "< 100 MB", f"{rss_mb:.0f} MB", rss_mb < 100))
        out.append(("memory: lease rate behind the backlog vs small queue", ">= 80%",
                    f"{memory['lease_ratio']:.0%}", memory["lease_ratio"] >= 0.8))
    return out


def _s(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f} s"


def _cpu(cores):
    if not cores:
        return ""
    return ", ".join(f"{name} {value:.2f}" for name, value in cores.items())


def table(results):
    m = results["machine"]
    lines = [
        f"dynamic-workload bench, {results['started']}"
        + (f", services at {results['commit']}" if results.get("commit") else "")
        + f": {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, SQLite {m['sqlite']}, kernel {m['kernel']}",
        f"load average at start {results['load_average_start'][0]}, at end "
        f"{(results.get('load_average_end') or ['?'])[0]}"
        + ("  (other work was running on this machine: figures are noisy)"
           if max(results["load_average_start"][0], (results.get("load_average_end") or [0])[0]) > 1.0 else "")
        + (f"; took {results['seconds']:.0f} s" if "seconds" in results else ""),
    ]
    enqueue = results.get("enqueue")
    if enqueue:
        core = results.get("load_generator_core")
        lines += ["", f"1. Enqueue: PUT /enqueue?iterations=10, 100-byte bodies, keep-alive, {enqueue['tool']} "
                      f"pinned to CPU {core}; best of {enqueue['rounds_per_server']} x {enqueue['seconds']} s "
                      f"per server (alternating)",
                  f"   {'concurrency':>11}  {'bare req/s':>10}  {'endpoint req/s':>14}  {'ratio':>6}  "
                  f"{'bare p50/p99 ms':>16}  {'endpoint p50/p99 ms':>20}  cores used (endpoint run)"]
        for key in sorted((k for k in enqueue if k.startswith("c") and k[1:].isdigit()), key=lambda k: int(k[1:])):
            row = enqueue[key]
            bare, ep = row["bare"], row["endpoint"]
            lines.append(
                f"   {row['concurrency']:>11}  {bare['rps']:>10,.0f}  {ep['rps']:>14,.0f}  {row['ratio']:>6.0%}  "
                f"{bare['p50_ms']:>7.2f} /{bare['p99_ms']:>7.2f}  {ep['p50_ms']:>10.2f} /{ep['p99_ms']:>7.2f}  "
                f"{_cpu(ep.get('cpu_cores'))}")
    e2e = results.get("e2e")
    if e2e:
        lines += ["", f"2. End to end: {e2e['jobs']:,} jobs (100 random bytes, {e2e['iterations']} iterations), "
                      f"2 workers already running, {e2e['threads']} client threads; first enqueue to last completion",
                  f"   {'system':<44}  {'seconds':>8}  {'jobs/s':>7}  {'enqueued in':>11}  cores used"]
        rows = [("dynamic-workload (SQLite synchronous=FULL)", e2e.get("ours"))]
        versions = e2e.get("peer_versions", {})
        rows.append((f"RQ {versions.get('rq', '')} SimpleWorker (Redis, no persistence)", e2e.get("rq_simple")))
        rows.append((f"RQ {versions.get('rq', '')} Worker, forking (Redis, no persistence)", e2e.get("rq_forking")))
        for name, row in rows:
            if row:
                lines.append(f"   {name:<44}  {row['seconds']:>8.2f}  {row['jobs_per_s']:>7,.0f}  "
                             f"{row['enqueue_seconds']:>9.2f} s  {_cpu(row.get('cpu_cores'))}")
    worker = results.get("worker")
    if worker:
        n = worker["iterations"]
        lines += ["", f"3. Worker efficiency: one job of {n:,} iterations (best of {worker['rounds']}, alternating)",
                  f"   through the cluster, enqueue to result recorded    {worker['cluster_best']:.3f} s  "
                  f"({worker['ns_per_iteration_cluster']:.0f} ns/iteration; the worker's own timing "
                  f"{min(x for x in worker['worker_compute_seconds'] if x is not None):.3f} s"
                  + (f", the cluster's part {worker['cluster_seconds_beyond_compute'] * 1000:.1f} ms"
                     if worker.get("cluster_seconds_beyond_compute") is not None else "") + ")",
                  f"   bare Python process, the worker's loop (work.py)   {worker['bare_best']:.3f} s  "
                  f"({worker['ns_per_iteration_bare']:.0f} ns/iteration)  overhead {worker['overhead']:+.1%}",
                  f"   bare Python process, the contract's loop as written {worker['bare_contract_loop_best']:.3f} s"]
        if worker.get("openssl_ns_per_64_byte_block"):
            lines.append(f"   openssl speed sha512, 64-byte blocks (the limit)    {worker['openssl_seconds_for_job']:.3f} s  "
                         f"({worker['openssl_ns_per_64_byte_block']:.0f} ns/block)")
    scaling = results.get("scaling")
    if scaling:
        lines += ["", f"4. Scaling reaction (local fleet, 0 workers, cap {scaling['cap']}, scaler tick "
                      f"{scaling['scaler_interval']:g} s, idle timeout {scaling['idle_timeout']} s): a burst of "
                      f"{scaling['jobs']} jobs x {scaling['iterations']:,} iterations",
                  f"   first launch decision {_s(scaling['first_launch_decision'])} after the burst began; "
                  f"cap decided {_s(scaling['cap_decision'])}; {scaling['cap']} workers counted "
                  f"{_s(scaling['cap_seen'])}, all live (reported in) {_s(scaling['cap_live'])}; never more than "
                  f"{scaling['max_workers_seen']}",
                  f"   0 workers {_s(scaling['zero_after_last_completion'])} after the last completion",
                  "   the alternatives' published defaults:"]
        lines += [f"     {name}: {text}" for name, text in ALTERNATIVES]
    memory = results.get("memory")
    if memory:
        disk = memory["disk_bytes"]
        lines += ["", f"5. Memory and scale: {memory['queued']:,} queued jobs of {memory['job_bytes'] // 1024} KB, "
                      f"no workers (filled through {memory['fill_path']} at {memory['fill_rate']:,.0f} jobs/s)",
                  f"   balancer RSS {memory['balancer_rss_mib'] * 2**20 / 1e6:.0f} MB (peak "
                  f"{memory['balancer_rss_peak_mib'] * 2**20 / 1e6:.0f} MB, "
                  f"{memory['balancer_rss_mib_before'] * 2**20 / 1e6:.0f} MB empty); disk "
                  f"{memory['disk_mib'] * 2**20 / 1e9:.2f} GB (database {disk['db'] / 1e9:.2f} GB, "
                  f"WAL {disk['-wal'] / 1e6:.0f} MB)",
                  f"   lease rate (store.py Store, 8 threads, one job per lease, each committed): "
                  f"{memory['lease_rate_backlog']:,.0f}/s behind the backlog vs "
                  f"{memory['lease_rate_empty']:,.0f}/s with {memory['lease_jobs']:,} queued "
                  f"({memory['lease_ratio']:.0%}; medians of {memory['lease_rounds']} alternating rounds)"]
    checks = targets(results)
    if checks:
        lines += ["", "Targets:"]
        for what, target, measured, met in checks:
            lines.append(f"   {'MET    ' if met else 'NOT MET'}  {what:<56} {target:>9}  measured {measured}")
    if results.get("failed"):
        lines += ["", "THE RUN DID NOT FINISH: " + results["failed"].strip().splitlines()[-1]]
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.flatten()
    m = results["machine"]
    fig.suptitle(f"dynamic-workload bench, {results['started'][:16]}: {m['cores']} cores, Python {m['python']}, "
                 f"load average {results['load_average_start'][0]} at start", fontsize=12)

    ax = axes[0]
    enqueue = results.get("enqueue")
    if enqueue:
        keys = sorted((k for k in enqueue if k.startswith("c") and k[1:].isdigit()), key=lambda k: int(k[1:]))
        x = range(len(keys))
        bare = [enqueue[k]["bare"]["rps"] for k in keys]
        ep = [enqueue[k]["endpoint"]["rps"] for k in keys]
        ax.bar([i - 0.2 for i in x], bare, 0.4, label="bare ThreadingHTTPServer", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], ep, 0.4, label="endpoint (stored durably)", color="#1f77b4")
        for i, k in enumerate(keys):
            ax.text(i + 0.2, ep[i], f"{enqueue[k]['ratio']:.0%}\np99 {enqueue[k]['endpoint']['p99_ms']:.0f} ms",
                    ha="center", va="bottom", fontsize=8)
            ax.text(i - 0.2, bare[i], f"p99 {enqueue[k]['bare']['p99_ms']:.0f} ms", ha="center", va="bottom",
                    fontsize=8)
        if "c8" in keys:
            ax.axhline(0.35 * bare[keys.index("c8")], color="#d62728", ls="--", lw=1, label="target: 35% of bare (c=8)")
        ax.set_ylim(0, max(bare + ep) * 1.5)
        ax.set_xticks(list(x), [f"concurrency {k[1:]}" for k in keys])
        ax.set_ylabel("requests/s")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title("1. Enqueue throughput")

    ax = axes[1]
    e2e = results.get("e2e")
    if e2e:
        names, values, colors = [], [], []
        for key, name, color in (("ours", "dynamic-workload\n(durable)", "#1f77b4"),
                                 ("rq_simple", "RQ SimpleWorker\n(no persistence)", "#ff7f0e"),
                                 ("rq_forking", "RQ Worker\n(forking)", "#ffbb78")):
            if key in e2e:
                names.append(name)
                values.append(e2e[key]["jobs_per_s"])
                colors.append(color)
        ax.bar(names, values, color=colors)
        ax.tick_params(axis="x", labelsize=8)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
        peers = [e2e[k]["jobs_per_s"] for k in ("rq_simple", "rq_forking") if k in e2e]
        if peers:
            ax.axhline(3 * max(peers), color="#d62728", ls="--", lw=1, label="target: 3x RQ's best")
            ax.set_ylim(0, max(values + [3 * max(peers)]) * 1.15)
            ax.legend(fontsize=8)
        ax.set_ylabel("jobs/s (first enqueue to last completion)")
    ax.set_title(f"2. End to end, {e2e['jobs'] if e2e else 2000:,} jobs, 2 workers")

    ax = axes[2]
    worker = results.get("worker")
    if worker:
        names = ["openssl\n(raw SHA-512)", "bare Python\n(contract loop)", "bare Python\n(worker loop)",
                 "through the\ncluster"]
        values = [worker.get("openssl_seconds_for_job") or 0, worker["bare_contract_loop_best"],
                  worker["bare_best"], worker["cluster_best"]]
        ax.bar(names, values, color=["#2ca02c", "#bbbbbb", "#999999", "#1f77b4"])
        ax.tick_params(axis="x", labelsize=8)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f} s", ha="center", va="bottom", fontsize=9)
        ax.axhline(1.05 * worker["bare_best"], color="#d62728", ls="--", lw=1, label="target: bare + 5%")
        ax.legend(fontsize=8)
        ax.set_ylabel("seconds")
    ax.set_title(f"3. One job of {worker['iterations'] if worker else 2_000_000:,} iterations")

    ax = axes[3]
    scaling = results.get("scaling")
    if scaling and scaling.get("timeline"):
        t = [row[0] for row in scaling["timeline"]]
        ax.step(t, [row[1] for row in scaling["timeline"]], where="post", label="workers (booting + live)")
        ax.step(t, [row[2] for row in scaling["timeline"]], where="post", label="live workers")
        ax2 = ax.twinx()
        ax2.plot(t, [row[3] for row in scaling["timeline"]], color="#7f7f7f", lw=1, label="completed jobs")
        ax2.set_ylabel("completed jobs")
        ax2.set_ylim(bottom=0)
        if scaling["first_launch_decision"] is not None:
            ax.axvline(scaling["first_launch_decision"], color="#2ca02c", ls=":", lw=1, label="first launch decision")
        ax.axvline(scaling["last_completion"], color="#9467bd", ls=":", lw=1, label="last completion")
        ax.set_xlabel("seconds since the burst")
        ax.set_ylabel("workers")
        ax.set_ylim(0, scaling["cap"] + 1.5)
        handles, labels = ax.get_legend_handles_labels()
        handles2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(handles + handles2, labels + labels2, fontsize=7, loc="upper center", ncol=2)
    ax.set_title("4. Scaling reaction (local fleet)")

    ax = axes[4]
    memory = results.get("memory")
    if memory:
        values = [memory["balancer_rss_mib_before"] * 2**20 / 1e6, memory["balancer_rss_mib"] * 2**20 / 1e6]
        ax.bar(["empty queue", f"{memory['queued']:,} x 16 KB\nqueued"], values, color=["#bbbbbb", "#1f77b4"])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f} MB", ha="center", va="bottom", fontsize=9)
        ax.axhline(100, color="#d62728", ls="--", lw=1, label="target: 100 MB")
        ax.set_ylabel("balancer RSS (MB)")
        ax.legend(fontsize=8)
    ax.set_title("5. Balancer memory")

    ax = axes[5]
    if memory:
        values = [memory["lease_rate_empty"], memory["lease_rate_backlog"]]
        ax.bar([f"{memory['lease_jobs']:,} queued", f"{memory['queued']:,} queued"], values,
               color=["#bbbbbb", "#1f77b4"])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}/s", ha="center", va="bottom", fontsize=9)
        ax.axhline(0.8 * values[0], color="#d62728", ls="--", lw=1, label="target: within 20%")
        ax.set_ylabel("leases/s (Store, 8 threads)")
        ax.set_ylim(0, max(values) * 1.25)
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title("5. Lease rate behind a backlog")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
