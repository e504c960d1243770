#!/usr/bin/env python3
"""Where an API call's time goes: medians of 200 calls each of health (no auth), GET sandbox
(auth + fsynced audit event), exec true (+ the agent's fork/exec) and files/stat (+ an agent
round trip), against a fresh `moat serve`. Usage: bench/calls.py target/x86_64-unknown-linux-gnu/release/moat"""
import http.client, json, os, subprocess, tempfile, time, socket, statistics, sys, shutil
moat=sys.argv[1]
state=tempfile.mkdtemp(); s=socket.socket(); s.bind(("127.0.0.1",0)); port=s.getsockname()[1]; s.close()
p=subprocess.Popen([moat,"serve","--listen",f"127.0.0.1:{port}","--state-dir",state],stderr=subprocess.DEVNULL)
for _ in range(300):
    try:
        c=http.client.HTTPConnection("127.0.0.1",port); c.request("GET","/v1/health"); c.getresponse().read(); break
    except OSError: time.sleep(0.02)
key=open(state+"/admin.key").read().strip()
c=http.client.HTTPConnection("127.0.0.1",port)
def call(m,path,body=None):
    h={"Authorization":"Bearer "+key}
    if body is not None: h["Content-Type"]="application/json"
    t=time.perf_counter(); c.request(m,path,body=json.dumps(body) if body is not None else None,headers=h); r=c.getresponse(); d=r.read(); 
    return (time.perf_counter()-t)*1e3, d
_,d=call("POST","/v1/sandboxes",{}); sid=json.loads(d)["id"]
for name,m,path,body in [("health","GET","/v1/health",None),("get sandbox (auth+audit)","GET",f"/v1/sandboxes/{sid}",None),("exec true","POST",f"/v1/sandboxes/{sid}/exec",{"cmd":["true"]}),("exec /bin/true abs","POST",f"/v1/sandboxes/{sid}/exec",{"cmd":["/bin/true"]}),("stat","GET",f"/v1/sandboxes/{sid}/files/stat?path=/work",None)]:
    ts=[call(m,path,body)[0] for _ in range(200)]
    print(f"{name:30s} median {statistics.median(ts):.3f} ms")
c.request("DELETE", f"/v1/sandboxes/{sid}", headers={"Authorization": "Bearer " + key}); c.getresponse().read()
p.terminate(); p.wait(); shutil.rmtree(state, ignore_errors=True)
