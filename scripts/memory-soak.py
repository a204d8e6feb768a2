#!/usr/bin/env python3
"""Memory soak (issue #20): RSS per chat of every service after warm-up, with a margin.

`make bench-memory` (or `scripts/memory-soak.py --bins DIR`) starts its own redis-server on a
free port (never 6379) and the four binaries from DIR, then runs CLIENTS clients in a loop, each
starting a chat (`[[mock tokens=.. delay_ms=..]]`) on its own fixed session and reading its
stream to the end. Every 5 s it samples VmRSS from /proc/<pid>/status; after WARMUP seconds it
fits RSS against completed chats (least squares) and prints bytes per chat per service. Exits 1
when a service grows by more than --margin bytes per chat, so a leak shows as a failed run.
Writes the samples and the summary to OUTDIR/soak.json and OUTDIR/soak.md.

--heaptrack gateway,producer runs those services under heaptrack (profile in OUTDIR; their RSS
then includes heaptrack's own growth, so use it to find a leak, not to measure one).
Kills only the processes it started.
"""
import argparse, hashlib, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time

p = argparse.ArgumentParser()
default_bins = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/llm-bridge/target")), "release")
p.add_argument("--bins", default=default_bins, help="directory of the four binaries")
p.add_argument("--clients", type=int, default=20)
p.add_argument("--seconds", type=int, default=300)
p.add_argument("--warmup", type=int, default=90)
p.add_argument("--tokens", type=int, default=100)
p.add_argument("--delay", type=int, default=20)
p.add_argument("--heaptrack", default="", help="comma list of services to run under heaptrack")
p.add_argument("--outdir", default="bench/results/memory-soak")
p.add_argument("--margin", type=float, default=200.0, help="bytes per chat allowed after warm-up")
a = p.parse_args()
os.makedirs(a.outdir, exist_ok=True)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

KEY = "sk-soak-key"
d = tempfile.mkdtemp()
rp, mp, gp, pp, cp = (free_port() for _ in range(5))
procs = []
redis = subprocess.Popen(["redis-server", "--port", str(rp), "--save", "", "--appendonly", "no", "--dir", d],
                         stdout=subprocess.DEVNULL)
procs.append(redis)
cfg = f"""[redis]
url = "redis://127.0.0.1:{rp}"
[models.mock]
base_url = "http://127.0.0.1:{mp}/v1"
upstream_model = "mock"
[auth]
stream_token_secret = "soak-secret"
api_keys = [{{ id = "soak", sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}" }}]
[telemetry]
log_level = "warn"
[mock_llm]
addr = "127.0.0.1:{mp}"
[gateway]
addr = "127.0.0.1:{gp}"
[producer]
addr = "127.0.0.1:{pp}"
[processor]
addr = "127.0.0.1:{cp}"
"""
path = os.path.join(d, "bridge.toml"); open(path, "w").write(cfg)
time.sleep(0.3)
pids = {}
ht = set(filter(None, a.heaptrack.split(",")))
for name in ["mock-llm", "gateway", "producer", "processor"]:
    cmd = [os.path.join(a.bins, name), "--config", path]
    if name in ht:
        cmd = ["heaptrack", "-o", os.path.join(a.outdir, f"heaptrack.{name}")] + cmd
    log = open(os.path.join(a.outdir, f"{name}.log"), "w")
    pr = subprocess.Popen(cmd, stdout=log, stderr=log)
    procs.append(pr); pids[name] = pr.pid

def real_pid(name):
    # heaptrack runs the program as its child.
    pid = pids[name]
    if name not in ht: return pid
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            kids = open(f"/proc/{pid}/task/{t}/children").read().split()
            for k in kids:
                if os.path.basename(os.readlink(f"/proc/{k}/exe")) == name: return int(k)
    except OSError: pass
    return pid

def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"): return int(line.split()[1]) * 1024
    except OSError: return None

def get(port, path, headers=None, body=None, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse(); data = r.read(); c.close(); return r.status, data

deadline = time.time() + 60
for port in (gp, pp, cp):
    while True:
        try:
            if get(port, "/readyz")[0] == 200: break
        except OSError: pass
        if time.time() > deadline: sys.exit(f"port {port} not ready")
        time.sleep(0.2)

count = [0]; errors = [0]; lock = threading.Lock(); stop = threading.Event()
def client(i):
    body = json.dumps({"sessionId": f"soak-{i}", "modelId": "mock",
                       "prompt": f"[[mock tokens={a.tokens} delay_ms={a.delay}]] hello"})
    while not stop.is_set():
        try:
            st, data = get(gp, "/api/chat/start", {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, body, "POST")
            if st != 200: raise RuntimeError(f"start {st} {data[:200]}")
            url = json.loads(data)["streamUrl"]
            c = http.client.HTTPConnection("127.0.0.1", gp, timeout=60)
            c.request("GET", url); r = c.getresponse()
            if r.status != 200: raise RuntimeError(f"sse {r.status}")
            done = False
            for line in r:
                if line.startswith(b"data:") and (b'"complete"' in line or b'"error"' in line): done = True
            c.close()
            if not done: raise RuntimeError("stream ended without complete")
            with lock: count[0] += 1
        except Exception as e:
            with lock: errors[0] += 1
            print("client error:", e, file=sys.stderr); time.sleep(0.5)

threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
for t in threads: t.start()
samples = []; t0 = time.time()
svcs = ["gateway", "producer", "processor"]
try:
    while time.time() - t0 < a.seconds:
        time.sleep(5)
        with lock: n = count[0]
        s = {"t": round(time.time() - t0, 1), "chats": n, **{k: rss(real_pid(k)) for k in svcs}}
        samples.append(s); print(json.dumps(s), flush=True)
finally:
    stop.set()
    for t in threads: t.join(timeout=70)
    # heaptrack's wrapper does not pass SIGTERM on: stop the programs under it by their own pid.
    for name in ht:
        pid = real_pid(name)
        if pid != pids[name]:
            os.kill(pid, signal.SIGTERM)
    for pr in reversed(procs):
        pr.terminate()
    for pr in procs:
        try: pr.wait(timeout=15)
        except subprocess.TimeoutExpired: pr.kill()
    shutil.rmtree(d, ignore_errors=True)

def slope(xs, ys):
    n = len(xs); mx = sum(xs) / n; my = sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
after = [s for s in samples if s["t"] >= a.warmup]
summary = {"clients": a.clients, "seconds": a.seconds, "chats": count[0], "errors": errors[0]}
for k in svcs:
    xs = [s["chats"] for s in after if s[k]]; ys = [s[k] for s in after if s[k]]
    summary[k] = {"start_rss": samples[0][k], "warm_rss": after[0][k], "end_rss": samples[-1][k],
                  "bytes_per_chat_after_warmup": round(slope(xs, ys), 1) if len(xs) > 2 else None}
summary["margin_bytes_per_chat"] = a.margin
json.dump({"summary": summary, "samples": samples}, open(os.path.join(a.outdir, "soak.json"), "w"), indent=1)
lines = [f"Memory soak: {a.clients} clients, {a.seconds} s ({a.warmup} s warm-up), "
         f"{a.tokens} tokens at {a.delay} ms per chat, {count[0]} chats, {errors[0]} errors.", "",
         "| service | RSS at start | after warm-up | at end | bytes per chat after warm-up | within margin |",
         "|---|---|---|---|---|---|"]
failed = []
for k in svcs:
    s = summary[k]; slope_k = s["bytes_per_chat_after_warmup"]
    ok = slope_k is not None and slope_k <= a.margin
    if not ok: failed.append(k)
    mb = lambda v: f"{v / 1048576:.1f} MiB" if v else "?"
    lines.append(f"| {k} | {mb(s['start_rss'])} | {mb(s['warm_rss'])} | {mb(s['end_rss'])} | "
                 f"{slope_k} | {'yes' if ok else 'NO'} (margin {a.margin:g}) |")
report = "\n".join(lines) + "\n"
open(os.path.join(a.outdir, "soak.md"), "w").write(report)
print(report)
if failed or errors[0]:
    sys.exit(f"memory soak failed: {', '.join(failed) or 'client errors'}")
